//! The serving side of the access seam.
//!
//! * [`PolicyHandle`]: the policy in force (`[policy] file`, or SMART scopes
//!   only), reloaded when the file changes; a file that no longer parses is
//!   logged and the previous policy stays.
//! * [`LakeDirectory`]: resolves the policy's patient sets over the store's
//!   current Patient and CareTeam resources (managing organization, general
//!   practitioner, care-team members, FHIRPath criteria), rebuilt when the
//!   store's version moves.
//! * What a [`Grant`]'s hidden element paths mean for the two shapes data
//!   leaves in: object properties (a property is hidden when its view
//!   column's FHIRPath reads a hidden element) and stored resource JSON
//!   (the elements are removed).
//!
//! Handlers never decide access themselves: they call [`Access::decide`]
//! (via `query::allowed_rows`) and apply the [`Grant`].

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use atlas_ontology::ObjectType;
use atlas_policy::{
    Action, Decision, Grant, PatientDirectory, PatientSet, Policy, PolicyEngine, Principal,
};
use datafusion::logical_expr::{LogicalPlanBuilder, col, lit};
use serde::Deserialize;
use serde_json::Value as Json;

use crate::Access;

/// `[policy]` in `atlas.toml`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// The policy file (TOML, see `docs/security.md`). Without one, SMART
    /// scopes and the `patient` claim alone decide.
    pub file: Option<PathBuf>,
    /// How often the file's modification time and the store's version are
    /// checked, in seconds.
    pub refresh_secs: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            file: None,
            refresh_secs: 5,
        }
    }
}

/// The policy and the directory its decisions read, swapped as a whole.
pub struct Snapshot {
    pub engine: PolicyEngine,
    pub directory: LakeDirectory,
}

/// The policy in force.
pub struct PolicyHandle {
    current: RwLock<Arc<Snapshot>>,
    file: Option<PathBuf>,
    modified: RwLock<Option<SystemTime>>,
}

/// Reads and parses a policy file.
pub fn read_policy(path: &std::path::Path) -> Result<Policy, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Policy::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

fn modified(path: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl PolicyHandle {
    /// Loads the configured policy and resolves its patient sets.
    pub async fn open(
        config: &PolicyConfig,
        tables: &crate::tables::Tables,
    ) -> Result<PolicyHandle, String> {
        let (policy, stamp) = match &config.file {
            None => (Policy::scopes_only(), None),
            Some(f) => (read_policy(f)?, modified(f)),
        };
        let directory = LakeDirectory::load(&policy, tables)
            .await
            .map_err(|e| format!("policy patient sets: {e}"))?;
        Ok(PolicyHandle {
            current: RwLock::new(Arc::new(Snapshot {
                engine: PolicyEngine::new(policy),
                directory,
            })),
            file: config.file.clone(),
            modified: RwLock::new(stamp),
        })
    }

    pub fn current(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn set(&self, s: Snapshot) {
        match self.current.write() {
            Ok(mut g) => *g = Arc::new(s),
            Err(p) => *p.into_inner() = Arc::new(s),
        }
    }

    /// Re-reads the file if it changed and rebuilds the directory if the
    /// store moved. Errors keep the policy in force.
    pub async fn refresh(&self, tables: &crate::tables::Tables) {
        let now = self.current();
        let mut policy = None;
        if let Some(f) = &self.file {
            let stamp = modified(f);
            let seen = self.modified.read().map(|g| *g).unwrap_or(None);
            if stamp != seen {
                if let Ok(mut g) = self.modified.write() {
                    *g = stamp;
                }
                match read_policy(f) {
                    Ok(p) => {
                        tracing::info!(file = %f.display(), rules = p.rules.len(), "policy reloaded");
                        policy = Some(p);
                    }
                    Err(e) => tracing::error!("policy not reloaded, the previous one stays: {e}"),
                }
            }
        }
        let store_moved = now.directory.needs_data
            && crate::tables::store_version(tables).await.ok() != now.directory.store_version;
        if policy.is_none() && !store_moved {
            return;
        }
        let policy = policy.unwrap_or_else(|| now.engine.policy().clone());
        match LakeDirectory::load(&policy, tables).await {
            Ok(directory) => self.set(Snapshot {
                engine: PolicyEngine::new(policy),
                directory,
            }),
            Err(e) => tracing::error!("policy patient sets not rebuilt: {e}"),
        }
    }

    /// Checks for a changed file or store every `every`.
    pub fn spawn_refresh(self: &Arc<Self>, tables: Arc<crate::tables::Tables>, every: Duration) {
        let handle = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(h) = handle.upgrade() else {
                    return;
                };
                h.refresh(&tables).await;
            }
        });
    }
}

impl Access {
    /// The one access decision every path asks for.
    pub fn decide(&self, who: &Principal, resource_type: &str, action: Action) -> Decision {
        let d = self.decide_unnoted(who, resource_type, action);
        crate::facts::note_decision(resource_type, &d);
        d
    }

    /// [`Access::decide`] without noting it in the audit facts: for
    /// offering tables a query may or may not read (SQL notes the
    /// decisions of the tables it plans).
    pub fn decide_unnoted(&self, who: &Principal, resource_type: &str, action: Action) -> Decision {
        let s = self.policy.current();
        s.engine
            .decide_with(who, resource_type, action, &s.directory)
    }
}

/// A reference as `Type/id`: absolute URLs and `_history` suffixes reduced.
fn normal_reference(r: &str) -> String {
    let r = r.split("/_history/").next().unwrap_or(r);
    let parts: Vec<&str> = r.rsplitn(3, '/').collect();
    if parts.len() >= 2 {
        format!("{}/{}", parts[1], parts[0])
    } else {
        r.to_owned()
    }
}

/// The policy's patient sets, resolved over the store.
#[derive(Default)]
pub struct LakeDirectory {
    /// Whether the policy names sets beyond explicit ids.
    needs_data: bool,
    store_version: Option<u64>,
    by_organization: HashMap<String, BTreeSet<String>>,
    by_practitioner: HashMap<String, BTreeSet<String>>,
    by_care_team_member: HashMap<String, BTreeSet<String>>,
    by_criterion: HashMap<String, Result<BTreeSet<String>, String>>,
}

impl LakeDirectory {
    /// Reads the store's current Patient and CareTeam resources when the
    /// policy needs them (nothing otherwise).
    pub async fn load(
        policy: &Policy,
        tables: &crate::tables::Tables,
    ) -> Result<LakeDirectory, String> {
        let mut d = LakeDirectory {
            needs_data: policy.patient_sets().iter().any(|s| !s.is_explicit()),
            ..Default::default()
        };
        if !d.needs_data {
            return Ok(d);
        }
        let mut criteria = Vec::new();
        for c in policy.criteria() {
            match atlas_fhirpath::Expr::parse(&c) {
                Ok(e) => {
                    d.by_criterion.insert(c.clone(), Ok(BTreeSet::new()));
                    criteria.push((c, e));
                }
                Err(e) => {
                    d.by_criterion
                        .insert(c.clone(), Err(format!("criterion '{c}': {e}")));
                }
            }
        }
        let Ok(version) = crate::tables::store_version(tables).await else {
            // No store yet: every data-dependent set is empty.
            return Ok(d);
        };
        d.store_version = Some(version);
        let provider = tables
            .provider(crate::tables::STORE_DIR, version)
            .await
            .map_err(|e| e.message)?;
        let plan = LogicalPlanBuilder::scan(
            "store",
            datafusion::datasource::provider_as_source(provider),
            None,
        )
        .and_then(|b| {
            b.filter(
                col("resource_type")
                    .in_list(vec![lit("Patient"), lit("CareTeam")], false)
                    .and(col("deleted").eq(lit(false))),
            )
        })
        .and_then(|b| {
            b.project(vec![
                col("resource_type"),
                col("patient_id"),
                col("resource"),
            ])
        })
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
        let batches = tables.collect(plan).await.map_err(|e| e.message)?;
        let ctx = atlas_fhirpath::EvalContext::new();
        for b in &batches {
            let ty = crate::text::utf8(b.column(0)).map_err(|e| e.message)?;
            let pid = crate::text::utf8(b.column(1)).map_err(|e| e.message)?;
            let res = crate::text::utf8(b.column(2)).map_err(|e| e.message)?;
            for row in 0..b.num_rows() {
                let (Some(t), Some(p), Some(r)) = (
                    crate::text::text(&ty, row),
                    crate::text::text(&pid, row),
                    crate::text::text(&res, row),
                ) else {
                    continue;
                };
                let Ok(json) = serde_json::from_str::<Json>(r) else {
                    continue;
                };
                let refs = |v: Option<&Json>| -> Vec<String> {
                    match v {
                        Some(Json::Array(a)) => a
                            .iter()
                            .filter_map(|x| x.get("reference").and_then(Json::as_str))
                            .map(normal_reference)
                            .collect(),
                        Some(x) => x
                            .get("reference")
                            .and_then(Json::as_str)
                            .map(normal_reference)
                            .into_iter()
                            .collect(),
                        None => Vec::new(),
                    }
                };
                if t == "Patient" {
                    for o in refs(json.get("managingOrganization")) {
                        d.by_organization.entry(o).or_default().insert(p.to_owned());
                    }
                    for g in refs(json.get("generalPractitioner")) {
                        d.by_practitioner.entry(g).or_default().insert(p.to_owned());
                    }
                    for (source, expr) in &criteria {
                        let yes = expr
                            .evaluate(&json, &ctx)
                            .map(|v| v.to_json() == serde_json::json!([true]))
                            .unwrap_or(false);
                        if yes && let Some(Ok(set)) = d.by_criterion.get_mut(source) {
                            set.insert(p.to_owned());
                        }
                    }
                } else {
                    let members: Vec<String> = json
                        .get("participant")
                        .and_then(Json::as_array)
                        .map(|ps| ps.iter().flat_map(|x| refs(x.get("member"))).collect())
                        .unwrap_or_default();
                    for m in members {
                        d.by_care_team_member
                            .entry(m)
                            .or_default()
                            .insert(p.to_owned());
                    }
                }
            }
        }
        Ok(d)
    }
}

impl PatientDirectory for LakeDirectory {
    fn resolve(&self, set: &PatientSet) -> Result<Arc<BTreeSet<String>>, String> {
        let mut out: BTreeSet<String> = set.ids.iter().cloned().collect();
        let lookups = [
            (&set.organization, &self.by_organization),
            (&set.general_practitioner, &self.by_practitioner),
            (&set.care_team_member, &self.by_care_team_member),
        ];
        for (want, map) in lookups {
            if let Some(r) = want
                && let Some(ps) = map.get(&normal_reference(r))
            {
                out.extend(ps.iter().cloned());
            }
        }
        if let Some(c) = &set.criterion {
            match self.by_criterion.get(c) {
                Some(Ok(ps)) => out.extend(ps.iter().cloned()),
                Some(Err(e)) => return Err(e.clone()),
                None => return Err(format!("criterion '{c}' was not loaded")),
            }
        }
        Ok(Arc::new(out))
    }
}

// ---------------------------------------------------------------------
// Hidden fields.

/// The element paths each column of a view reads: the identifiers of its
/// FHIRPath (with its `forEach` context), in order. Conservative: a column
/// whose expression mentions a hidden element's names in order is hidden.
pub fn column_elements(view: &Json) -> HashMap<String, Vec<String>> {
    fn idents(expr: &str, out: &mut Vec<String>) {
        let b = expr.as_bytes();
        let mut i = 0;
        while i < b.len() {
            let c = b[i];
            if c == b'\'' {
                i += 1;
                while i < b.len() && b[i] != b'\'' {
                    if b[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            } else if c == b'`' {
                let s = i + 1;
                i = s;
                while i < b.len() && b[i] != b'`' {
                    i += 1;
                }
                out.push(expr[s..i.min(b.len())].to_owned());
                i += 1;
            } else if c == b'%' || c == b'@' || c == b'$' {
                // %constant, @date literal, $this: not elements.
                i += 1;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b"_-:.+TZ".contains(&b[i])) {
                    i += 1;
                }
            } else if c.is_ascii_alphabetic() || c == b'_' {
                let s = i;
                while i < b.len() && (b[i].is_ascii_alphanumeric() || b[i] == b'_') {
                    i += 1;
                }
                out.push(expr[s..i].to_owned());
            } else {
                i += 1;
            }
        }
    }
    fn walk(select: &Json, context: &[String], out: &mut HashMap<String, Vec<String>>) {
        let mut ctx = context.to_vec();
        for k in ["forEach", "forEachOrNull"] {
            if let Some(p) = select.get(k).and_then(Json::as_str) {
                idents(p, &mut ctx);
            }
        }
        for c in select
            .get("column")
            .and_then(Json::as_array)
            .into_iter()
            .flatten()
        {
            let (Some(name), Some(path)) = (
                c.get("name").and_then(Json::as_str),
                c.get("path").and_then(Json::as_str),
            ) else {
                continue;
            };
            let mut ids = ctx.clone();
            idents(path, &mut ids);
            out.entry(name.to_owned()).or_default().extend(ids);
        }
        for k in ["select", "unionAll"] {
            for s in select.get(k).and_then(Json::as_array).into_iter().flatten() {
                walk(s, &ctx, out);
            }
        }
    }
    let mut out = HashMap::new();
    walk(view, &[], &mut out);
    out
}

/// Whether `elements` (a column's identifiers) read the hidden path `h`:
/// its segments appear in order.
fn reads(elements: &[String], h: &str) -> bool {
    let mut segs = h.split('.').peekable();
    for e in elements {
        if segs.peek() == Some(&e.as_str()) {
            segs.next();
        }
    }
    segs.peek().is_none()
}

/// The columns of a view a grant hides.
pub fn hidden_columns(elements: &HashMap<String, Vec<String>>, grant: &Grant) -> BTreeSet<String> {
    if grant.hidden.is_empty() {
        return BTreeSet::new();
    }
    elements
        .iter()
        .filter(|(_, ids)| grant.hidden.iter().any(|h| reads(ids, h)))
        .map(|(c, _)| c.clone())
        .collect()
}

/// Column → element paths for every built-in view (by view name), made
/// once.
pub fn builtin_elements() -> &'static HashMap<String, HashMap<String, Vec<String>>> {
    static ELEMENTS: std::sync::OnceLock<HashMap<String, HashMap<String, Vec<String>>>> =
        std::sync::OnceLock::new();
    ELEMENTS.get_or_init(|| {
        atlas_ontology::builtin_views()
            .iter()
            .map(|v| (v.name.to_owned(), column_elements(&v.json_value())))
            .collect()
    })
}

/// The properties (api names) of an object type a grant hides.
pub fn hidden_properties(t: &ObjectType, grant: &Grant) -> BTreeSet<String> {
    if grant.hidden.is_empty() {
        return BTreeSet::new();
    }
    let Some(elements) = builtin_elements().get(&t.backing_view) else {
        // A type over a view we cannot analyse: hide every property but
        // the keys rather than guess.
        return t
            .properties
            .iter()
            .filter(|p| {
                p.api_name != t.primary_key
                    && Some(p.api_name.as_str()) != t.patient_property.as_deref()
            })
            .map(|p| p.api_name.clone())
            .collect();
    };
    let cols = hidden_columns(elements, grant);
    t.properties
        .iter()
        .filter(|p| cols.contains(&p.column))
        .map(|p| p.api_name.clone())
        .collect()
}

/// Removes the hidden elements from a resource's JSON. `None`: nothing was
/// hidden and the stored bytes can go out as they are.
pub fn strip_resource(json: &str, grant: &Grant) -> Option<String> {
    if grant.hidden.is_empty() {
        return None;
    }
    let Ok(mut v) = serde_json::from_str::<Json>(json) else {
        // Fail closed: never send what could not be redacted.
        return Some(
            r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"processing","diagnostics":"the stored resource could not be redacted"}]}"#
                .to_owned(),
        );
    };
    fn remove(v: &mut Json, path: &[&str]) {
        match v {
            Json::Array(a) => a.iter_mut().for_each(|x| remove(x, path)),
            Json::Object(o) => {
                let [first, rest @ ..] = path else {
                    return;
                };
                if rest.is_empty() {
                    // `deceased` also names `deceasedBoolean` and
                    // `deceasedDateTime` (choice elements).
                    o.retain(|k, _| {
                        !(k == first
                            || (k.starts_with(first)
                                && k[first.len()..].starts_with(|c: char| c.is_ascii_uppercase())))
                    });
                    o.remove(&format!("_{first}"));
                } else if let Some(x) = o.get_mut(*first) {
                    remove(x, rest);
                }
            }
            _ => {}
        }
    }
    for h in &grant.hidden {
        let path: Vec<&str> = h.split('.').collect();
        remove(&mut v, &path);
    }
    serde_json::to_string(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(hidden: &[&str]) -> Grant {
        Grant {
            rows: atlas_policy::RowScope::All,
            hidden: hidden.iter().map(|s| s.to_string()).collect(),
            rules: vec![],
            deid: None,
        }
    }

    #[test]
    fn patient_view_columns_are_hidden_by_the_elements_they_read() {
        let e = &builtin_elements()["patient"];
        let cols = |h: &[&str]| hidden_columns(e, &grant(h)).into_iter().collect::<Vec<_>>();
        assert_eq!(cols(&["name"]), ["family", "given"]);
        assert_eq!(cols(&["name.given"]), ["given"]);
        let b = cols(&["birthDate"]);
        assert!(
            b.contains(&"birth_date".to_owned()) && b.contains(&"age".to_owned()),
            "{b:?}"
        );
        assert!(
            cols(&["address.line"])
                .iter()
                .all(|c| c.contains("line") || c.contains("address"))
        );
        assert!(cols(&[]).is_empty());
    }

    #[test]
    fn stripping_removes_elements_choices_and_their_extensions() {
        let j = r#"{"resourceType":"Patient","id":"1","telecom":[{"value":"555"}],"_telecom":[{}],
            "address":[{"line":["1 Main"],"city":"X"}],"deceasedBoolean":false,"gender":"male"}"#;
        let out: Json = serde_json::from_str(
            &strip_resource(j, &grant(&["telecom", "address.line", "deceased"])).unwrap(),
        )
        .unwrap();
        assert_eq!(
            out,
            serde_json::json!({"resourceType":"Patient","id":"1","address":[{"city":"X"}],"gender":"male"})
        );
        assert_eq!(strip_resource(j, &grant(&[])), None);
    }

    #[test]
    fn references_are_compared_as_type_and_id() {
        assert_eq!(normal_reference("Organization/1"), "Organization/1");
        assert_eq!(
            normal_reference("https://x.org/fhir/Organization/1/_history/2"),
            "Organization/1"
        );
        assert_eq!(normal_reference("urn:uuid:abc"), "urn:uuid:abc");
    }
}
