//! The versioned resource store behind every endpoint: all versions of
//! every key, the write log in order (for `_history`), the live versions per
//! type ordered by `(lastUpdated, id)` (for `_lastUpdated` search), and the
//! deterministic change generator behind [`crate::MockEhr::tick`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use crate::clock::{START_MICROS, format_instant};
use crate::json::{Members, Parsed, compartment_patients, quote, stamp_meta};

/// A resource key: `(resourceType, id)`.
pub(crate) type Key = (String, String);

/// One version of a resource.
pub(crate) struct Version {
    pub version_id: u64,
    /// Microseconds on the mock's clock.
    pub last_updated: i64,
    /// Position in the write log.
    pub seq: u64,
    /// The resource text; `None` for a delete.
    pub body: Option<Arc<str>>,
    /// The patients whose compartment holds this version (kept on deletes).
    pub patients: Arc<[String]>,
}

impl Version {
    pub fn deleted(&self) -> bool {
        self.body.is_none()
    }
}

/// What one write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One change a tick applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: (String, String),
    pub kind: ChangeKind,
    pub version_id: u64,
    /// The new version's `meta.lastUpdated` (FHIR instant).
    pub last_updated: String,
}

/// The changes one [`crate::MockEhr::tick`] applied, in write order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    pub changes: Vec<Change>,
}

impl ChangeSet {
    fn keys(&self, kind: ChangeKind) -> Vec<(String, String)> {
        self.changes
            .iter()
            .filter(|c| c.kind == kind)
            .map(|c| c.key.clone())
            .collect()
    }
    pub fn created(&self) -> Vec<(String, String)> {
        self.keys(ChangeKind::Created)
    }
    pub fn updated(&self) -> Vec<(String, String)> {
        self.keys(ChangeKind::Updated)
    }
    pub fn deleted(&self) -> Vec<(String, String)> {
        self.keys(ChangeKind::Deleted)
    }
}

/// A key's state at some instant, as [`crate::MockEhr::snapshot`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub version_id: u64,
    pub last_updated: String,
    pub deleted: bool,
}

pub(crate) struct Store {
    pub records: BTreeMap<Key, Vec<Version>>,
    /// Every write in order: the key and the index of its version.
    pub log: Vec<(Key, usize)>,
    /// Live (not deleted) current versions per type, as `(lastUpdated, id)`.
    pub live: BTreeMap<String, BTreeSet<(i64, String)>>,
    /// Keys in creation order; ticks pick from here.
    order: Vec<Key>,
    /// Patient ids in creation order: their index decides `every_nth_patient`.
    pub patient_ordinal: HashMap<String, usize>,
    /// The clock: the instant of the last write.
    pub clock: i64,
    rng: ChaCha8Rng,
    ticks: u64,
}

impl Store {
    pub fn new(seed: u64) -> Store {
        Store {
            records: BTreeMap::new(),
            log: Vec::new(),
            live: BTreeMap::new(),
            order: Vec::new(),
            patient_ordinal: HashMap::new(),
            clock: START_MICROS,
            rng: ChaCha8Rng::seed_from_u64(seed),
            ticks: 0,
        }
    }

    /// Adds a resource as version 1 at the start instant. False when the key
    /// is already there (the first copy wins).
    pub fn insert_initial(&mut self, parsed: Parsed) -> bool {
        let key = (parsed.ty.clone(), parsed.id.clone());
        if self.records.contains_key(&key) {
            return false;
        }
        let patients = compartment_patients(&parsed.ty, &parsed.id, &parsed.members);
        let mut meta = parsed.members.meta();
        stamp_meta(&mut meta, 1, &format_instant(START_MICROS));
        let body = parsed.members.render(&meta);
        self.push(key, Some(body), patients.into(), START_MICROS);
        true
    }

    /// Appends a version to `key` at instant `at`.
    fn push(&mut self, key: Key, body: Option<String>, patients: Arc<[String]>, at: i64) -> u64 {
        let seq = self.log.len() as u64;
        let versions = self.records.entry(key.clone()).or_default();
        if versions.is_empty() {
            self.order.push(key.clone());
            if key.0 == "Patient" {
                let n = self.patient_ordinal.len();
                self.patient_ordinal.entry(key.1.clone()).or_insert(n);
            }
        }
        let live = self.live.entry(key.0.clone()).or_default();
        if let Some(prev) = versions.last().filter(|v| !v.deleted()) {
            live.remove(&(prev.last_updated, key.1.clone()));
        }
        if body.is_some() {
            live.insert((at, key.1.clone()));
        }
        let version_id = versions.len() as u64 + 1;
        versions.push(Version {
            version_id,
            last_updated: at,
            seq,
            body: body.map(Arc::from),
            patients,
        });
        self.log.push((key, versions.len() - 1));
        version_id
    }

    /// The version of `key` current at `at`, deleted or not.
    pub fn as_of(versions: &[Version], at: i64) -> Option<&Version> {
        versions.iter().rev().find(|v| v.last_updated <= at)
    }

    /// The current live version of `key`.
    pub fn current(&self, ty: &str, id: &str) -> Option<&Version> {
        self.records
            .get(&(ty.to_string(), id.to_string()))
            .and_then(|v| v.last())
    }

    pub fn snapshot(&self, at: i64) -> BTreeMap<Key, VersionInfo> {
        self.records
            .iter()
            .filter_map(|(key, versions)| {
                let v = Store::as_of(versions, at)?;
                Some((
                    key.clone(),
                    VersionInfo {
                        version_id: v.version_id,
                        last_updated: format_instant(v.last_updated),
                        deleted: v.deleted(),
                    },
                ))
            })
            .collect()
    }

    /// Applies `n` changes to distinct keys: mostly updates, some creates
    /// (copies of an existing resource under a new id) and some deletes.
    pub fn tick(&mut self, n: usize) -> ChangeSet {
        self.ticks += 1;
        let mut set = ChangeSet::default();
        let mut touched = BTreeSet::new();
        for i in 0..n {
            let Some(key) = self.pick(&touched) else {
                break;
            };
            touched.insert(key.clone());
            let roll = self.rng.gen_range(0..10u32);
            let change = match roll {
                0..=5 => self.update(key),
                6..=7 => {
                    let new_id = format!("mock-{}-{i}", self.ticks);
                    let created = self.create(&key, new_id);
                    if let Some(c) = &created {
                        touched.insert(c.key.clone());
                    }
                    created
                }
                _ => self.delete(key),
            };
            set.changes.extend(change);
        }
        set
    }

    /// A random live key not touched by this tick yet.
    fn pick(&mut self, touched: &BTreeSet<Key>) -> Option<Key> {
        if self.order.is_empty() {
            return None;
        }
        for _ in 0..32 {
            let key = &self.order[self.rng.gen_range(0..self.order.len())];
            let live = self
                .records
                .get(key)
                .and_then(|v| v.last())
                .is_some_and(|v| !v.deleted());
            if live && !touched.contains(key) {
                return Some(key.clone());
            }
        }
        None
    }

    /// Moves the clock by 1 ms to 1 s (seeded) and returns the new instant.
    fn step(&mut self) -> i64 {
        self.clock += self.rng.gen_range(1..=1000i64) * 1000;
        self.clock
    }

    fn tag(&self) -> Value {
        serde_json::json!({"system": "https://atlas.invalid/mockehr", "code": format!("tick-{}", self.ticks)})
    }

    /// `members` with `meta` stamped for `version_id` at `at` and tagged with this tick.
    fn restamp(&self, members: &Members, version_id: u64, at: i64) -> String {
        let mut meta = members.meta();
        stamp_meta(&mut meta, version_id, &format_instant(at));
        let mut tags = match meta.remove("tag") {
            Some(Value::Array(t)) => t,
            _ => Vec::new(),
        };
        tags.retain(|t| {
            t.get("system").and_then(Value::as_str) != Some("https://atlas.invalid/mockehr")
        });
        tags.push(self.tag());
        meta.insert("tag".into(), Value::Array(tags));
        members.render(&meta)
    }

    fn latest(&self, key: &Key) -> Option<(&Version, Members)> {
        let v = self.records.get(key)?.last()?;
        let members = Members::parse(v.body.as_deref()?)?;
        Some((v, members))
    }

    fn update(&mut self, key: Key) -> Option<Change> {
        let (prev, members) = self.latest(&key)?;
        let (version_id, patients) = (prev.version_id + 1, prev.patients.clone());
        let at = self.step();
        let body = self.restamp(&members, version_id, at);
        self.push(key.clone(), Some(body), patients, at);
        Some(change(key, ChangeKind::Updated, version_id, at))
    }

    fn create(&mut self, template: &Key, new_id: String) -> Option<Change> {
        let (_, mut members) = self.latest(template)?;
        for (name, value) in members.0.iter_mut() {
            if name == "id" {
                *value = serde_json::value::RawValue::from_string(quote(&new_id)).ok()?;
            }
        }
        let key = (template.0.clone(), new_id);
        let patients = compartment_patients(&key.0, &key.1, &members);
        let at = self.step();
        let body = self.restamp(&members, 1, at);
        self.push(key.clone(), Some(body), patients.into(), at);
        Some(change(key, ChangeKind::Created, 1, at))
    }

    fn delete(&mut self, key: Key) -> Option<Change> {
        let prev = self.records.get(&key)?.last()?;
        let (version_id, patients) = (prev.version_id + 1, prev.patients.clone());
        let at = self.step();
        self.push(key.clone(), None, patients, at);
        Some(change(key, ChangeKind::Deleted, version_id, at))
    }
}

fn change(key: Key, kind: ChangeKind, version_id: u64, at: i64) -> Change {
    Change {
        key,
        kind,
        version_id,
        last_updated: format_instant(at),
    }
}
