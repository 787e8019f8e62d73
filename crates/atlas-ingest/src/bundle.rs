//! Bundles: unpacking entries, turning `urn:uuid:` fullUrls into `Type/id`
//! references, and resolving conditional references (`Type?identifier=s|v`)
//! against an identifier index built from the same run and the store.

use std::borrow::Cow;
use std::collections::HashMap;

use atlas_fhir::{is_resource_type, is_valid_id, rewrite_references};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::classify::{ClassifyOptions, Deletion, Event, Origin, Reason, Rejection, classify_text};

/// Identifiers of known resources: `(type, "system|value")` and `(type, value)` to ids.
#[derive(Debug, Default, Clone)]
pub struct IdentifierIndex {
    by_system_value: HashMap<(String, String), Vec<String>>,
    by_value: HashMap<(String, String), Vec<String>>,
    /// `urn:uuid:`/`urn:oid:` fullUrls of every Bundle entry of the run, to
    /// `Type/id`: files may refer to entries of other files (a Group listing
    /// the patients of per-patient Bundles).
    full_urls: HashMap<String, String>,
}

impl IdentifierIndex {
    /// Records that the Bundle entry `full_url` is the resource `reference` (`Type/id`).
    pub fn insert_full_url(&mut self, full_url: &str, reference: String) {
        if full_url.starts_with("urn:") {
            self.full_urls.insert(full_url.to_owned(), reference);
        }
    }

    /// The `Type/id` of a `urn:` reference to an entry anywhere in the run.
    pub fn resolve_full_url(&self, reference: &str) -> Option<&String> {
        self.full_urls.get(reference)
    }

    /// Records that resource `ty/id` carries `ident` (`system|value`).
    pub fn insert(&mut self, ty: &str, id: &str, ident: &str) {
        let push = |map: &mut HashMap<(String, String), Vec<String>>, key: String| {
            let ids = map.entry((ty.to_owned(), key)).or_default();
            if !ids.iter().any(|x| x == id) {
                ids.push(id.to_owned());
            }
        };
        push(&mut self.by_system_value, ident.to_owned());
        if let Some((_, value)) = ident.split_once('|') {
            push(&mut self.by_value, value.to_owned());
        }
    }

    pub fn len(&self) -> usize {
        self.by_system_value.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_system_value.is_empty() && self.full_urls.is_empty()
    }

    /// True when the run has Bundle entries addressable by `urn:` fullUrl.
    pub fn has_full_urls(&self) -> bool {
        !self.full_urls.is_empty()
    }

    /// Resolves a conditional reference to `Type/id` when exactly one resource matches.
    pub fn resolve(&self, reference: &str) -> Option<String> {
        let (ty, query) = reference.split_once('?')?;
        if !is_resource_type(ty) {
            return None;
        }
        let (param, value) = query.split_once('=')?;
        if param != "identifier" || query.contains('&') {
            return None;
        }
        let value = percent_decode(value);
        let ids = if value.contains('|') {
            self.by_system_value
                .get(&(ty.to_owned(), value.into_owned()))
        } else {
            self.by_value.get(&(ty.to_owned(), value.into_owned()))
        }?;
        match ids.as_slice() {
            [one] => Some(format!("{ty}/{one}")),
            _ => None,
        }
    }
}

/// True when a reference is a conditional one (`Type?query`).
pub fn is_conditional_reference(reference: &str) -> bool {
    reference
        .split_once('?')
        .is_some_and(|(ty, _)| is_resource_type(ty))
}

fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') && !s.contains('+') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 3 <= b.len() => {
                let hex = |c: u8| (c as char).to_digit(16);
                match (hex(b[i + 1]), hex(b[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                    }
                    _ => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[derive(Deserialize)]
struct BundleHead<'a> {
    #[serde(rename = "type", borrow)]
    bundle_type: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    entry: Vec<EntryHead<'a>>,
}

#[derive(Deserialize)]
struct EntryHead<'a> {
    #[serde(rename = "fullUrl", borrow)]
    full_url: Option<Cow<'a, str>>,
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
    request: Option<RequestHead>,
}

#[derive(Deserialize)]
struct RequestHead {
    method: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct KeyHead<'a> {
    #[serde(rename = "resourceType", borrow)]
    resource_type: Option<Cow<'a, str>>,
    #[serde(borrow)]
    id: Option<Cow<'a, str>>,
}

/// Bundle types whose entries are stored one by one. Documents and messages
/// are resources in their own right and are stored whole.
const UNPACKED: &[&str] = &[
    "transaction",
    "batch",
    "collection",
    "searchset",
    "history",
    "transaction-response",
    "batch-response",
];

/// Cheap test: is this text a Bundle worth unpacking? (Parses only on a hint.)
pub(crate) fn looks_like_bundle(text: &str) -> bool {
    text.contains("\"Bundle\"") && text.contains("\"entry\"")
}

/// Unpacks a Bundle's entries into events, or returns `None` when `text` is
/// not an unpackable Bundle (then it is classified as one resource).
pub(crate) fn unpack_bundle(
    text: &str,
    raw: &[u8],
    origin: &Origin,
    opts: &ClassifyOptions,
    index: &IdentifierIndex,
) -> Option<Vec<Event>> {
    let top: KeyHead = serde_json::from_str(text).ok()?;
    if top.resource_type.as_deref() != Some("Bundle") {
        return None;
    }
    let head: BundleHead = match serde_json::from_str(text) {
        Ok(h) => h,
        Err(e) => {
            let mut r = Rejection::new(
                Reason::WrongType,
                format!("Bundle.entry: {e}"),
                raw,
                origin.clone(),
            );
            r.resource_type = Some("Bundle".into());
            r.field = Some("entry".into());
            return Some(vec![Event::Reject(Box::new(r))]);
        }
    };
    if !head
        .bundle_type
        .as_deref()
        .is_some_and(|t| UNPACKED.contains(&t))
    {
        return None;
    }

    // fullUrl -> Type/id, for every entry whose resource has a type and id
    // (or whose urn:uuid fullUrl supplies the id).
    let mut urls: HashMap<&str, String> = HashMap::new();
    let mut keys: Vec<Option<(String, String, bool)>> = Vec::with_capacity(head.entry.len());
    for e in &head.entry {
        let key = e
            .resource
            .and_then(|r| serde_json::from_str::<KeyHead>(r.get()).ok())
            .and_then(|k| {
                let ty = k.resource_type?.into_owned();
                match k.id {
                    Some(id) => Some((ty, id.into_owned(), false)),
                    None => {
                        let uuid = e.full_url.as_deref()?.strip_prefix("urn:uuid:")?;
                        is_valid_id(uuid).then(|| (ty, uuid.to_owned(), true))
                    }
                }
            });
        if let (Some(url), Some((ty, id, _))) = (e.full_url.as_deref(), &key) {
            urls.insert(url, format!("{ty}/{id}"));
        }
        keys.push(key);
    }

    let base = text.as_ptr() as usize;
    let mut events = Vec::with_capacity(head.entry.len());
    let mut counted_to = 0usize;
    let mut line = origin.line;
    for (i, entry) in head.entry.iter().enumerate() {
        // Lineage: the line of the file where this entry's resource starts.
        let offset = entry
            .resource
            .map(|r| r.get().as_ptr() as usize - base)
            .unwrap_or(counted_to);
        if offset >= counted_to {
            line += text.as_bytes()[counted_to..offset]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u64;
            counted_to = offset;
        }
        let here = Origin {
            file: origin.file.clone(),
            line,
        };
        let method = entry.request.as_ref().and_then(|r| r.method.as_deref());
        if method == Some("DELETE") {
            let url = entry
                .request
                .as_ref()
                .and_then(|r| r.url.as_deref())
                .unwrap_or("");
            match atlas_fhir::split_relative_reference(url.trim_start_matches('/')) {
                Some((ty, id)) => events.push(Event::Delete(Deletion {
                    resource_type: ty.to_owned(),
                    id: id.to_owned(),
                    origin: here,
                })),
                None => events.push(Event::Reject(Box::new(Rejection::new(
                    Reason::UnsupportedEntry,
                    format!("entry {i}: DELETE of `{url}` (only `Type/id` deletes are supported)"),
                    url.as_bytes(),
                    here,
                )))),
            }
            continue;
        }
        let Some(resource) = entry.resource else {
            events.push(Event::Reject(Box::new(Rejection::new(
                Reason::UnsupportedEntry,
                format!("entry {i} has no resource and is not a DELETE"),
                b"",
                here,
            ))));
            continue;
        };
        let mut unresolved = 0u32;
        let body = resource.get();
        let rewritten = rewrite_references(body, |r| {
            if let Some(target) = urls.get(r).or_else(|| index.resolve_full_url(r)) {
                return Some(target.clone());
            }
            if is_conditional_reference(r) {
                let hit = index.resolve(r);
                if hit.is_none() {
                    unresolved += 1;
                }
                return hit;
            }
            if r.starts_with("urn:uuid:") || r.starts_with("urn:oid:") {
                unresolved += 1;
            }
            None
        });
        let mut json: Cow<str> = match rewritten {
            Ok(j) => j,
            Err(e) => {
                events.push(Event::Reject(Box::new(Rejection::new(
                    Reason::InvalidJson,
                    format!("entry {i}: {e}"),
                    body.as_bytes(),
                    here,
                ))));
                continue;
            }
        };
        if let Some((_, id, true)) = &keys[i] {
            // The entry's resource has no id: the urn:uuid fullUrl names it.
            if let Some(pos) = json.find('{') {
                let mut s = String::with_capacity(json.len() + id.len() + 8);
                s.push_str(&json[..=pos]);
                s.push_str(&format!("\"id\":\"{id}\","));
                s.push_str(&json[pos + 1..]);
                json = Cow::Owned(s);
            }
        }
        let mut event = classify_text(&json, body.as_bytes(), here, false, opts, Some(unresolved));
        if let (Event::Resource(r), Some(url)) = (&mut event, entry.full_url.as_deref()) {
            r.full_url = Some(url.to_owned());
        }
        events.push(event);
    }
    Some(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn origin() -> Origin {
        Origin {
            file: Arc::from("b.json"),
            line: 1,
        }
    }

    #[test]
    fn unpacks_and_rewrites() {
        let text = r#"{"resourceType":"Bundle","type":"transaction","entry":[
{"fullUrl":"urn:uuid:p1","resource":{"resourceType":"Patient","id":"p1"},"request":{"method":"POST","url":"Patient"}},
{"fullUrl":"urn:uuid:o1","resource":{"resourceType":"Observation","id":"o1","subject":{"reference":"urn:uuid:p1"},"performer":[{"reference":"Practitioner?identifier=http://hl7.org/fhir/sid/us-npi%7C42"}],"valueQuantity":{"value":16942.30}},"request":{"method":"POST","url":"Observation"}},
{"fullUrl":"urn:uuid:e1","resource":{"resourceType":"Encounter","subject":{"reference":"urn:uuid:p1"},"participant":[{"individual":{"reference":"Practitioner?identifier=x|nope"}}]}},
{"request":{"method":"DELETE","url":"Condition/c9"}}
]}"#;
        let mut index = IdentifierIndex::default();
        index.insert("Practitioner", "pr7", "http://hl7.org/fhir/sid/us-npi|42");
        let ev = unpack_bundle(
            text,
            text.as_bytes(),
            &origin(),
            &ClassifyOptions::default(),
            &index,
        )
        .unwrap();
        assert_eq!(ev.len(), 4);
        let Event::Resource(o) = &ev[1] else {
            panic!("observation")
        };
        assert_eq!(o.origin.line, 3);
        assert_eq!(o.patient_id.as_deref(), Some("p1"));
        assert!(o.json.contains(r#""reference":"Patient/p1""#));
        assert!(o.json.contains(r#""reference":"Practitioner/pr7""#));
        assert!(o.json.contains("16942.30"));
        assert_eq!(o.unresolved_refs, 0);
        let Event::Resource(e) = &ev[2] else {
            panic!("encounter")
        };
        assert_eq!(e.id, "e1", "id taken from the urn:uuid fullUrl");
        assert_eq!(e.unresolved_refs, 1);
        assert!(
            e.json.contains("Practitioner?identifier=x|nope"),
            "unresolved kept as written"
        );
        assert!(
            matches!(&ev[3], Event::Delete(d) if d.id == "c9" && d.resource_type == "Condition")
        );
    }

    #[test]
    fn documents_are_not_unpacked() {
        let text = r#"{"resourceType":"Bundle","id":"d","type":"document","entry":[{"resource":{"resourceType":"Composition","id":"c"}}]}"#;
        assert!(
            unpack_bundle(
                text,
                text.as_bytes(),
                &origin(),
                &ClassifyOptions::default(),
                &IdentifierIndex::default()
            )
            .is_none()
        );
    }

    #[test]
    fn conditional_matching() {
        let mut index = IdentifierIndex::default();
        index.insert("Organization", "o1", "sys|A");
        index.insert("Organization", "o2", "other|A");
        assert_eq!(
            index.resolve("Organization?identifier=sys|A").as_deref(),
            Some("Organization/o1")
        );
        assert_eq!(
            index.resolve("Organization?identifier=A"),
            None,
            "ambiguous without a system"
        );
        assert_eq!(index.resolve("Organization?name=A"), None);
        assert_eq!(index.resolve("Nope?identifier=sys|A"), None);
    }
}
