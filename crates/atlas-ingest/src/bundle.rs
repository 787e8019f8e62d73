//! Bundles: unpacking entries, turning `urn:uuid:` fullUrls into `Type/id`
//! references, and resolving conditional references (`Type?identifier=s|v`)
//! against an identifier index built from the same run and the store.
//!
//! DELETE entries (transaction Bundles, Bulk `$export` `deleted` files, REST
//! `_history` Bundles) become [`Event::Delete`]s. Their `request.url` may be
//! `Type/id`, `/Type/id`, `http(s)://host/any/base/Type/id`, each optionally
//! with `/_history/n` (still `Type/id`), or a conditional
//! `Type?identifier=system|value` (or `identifier=value`, URL-decoded). A
//! conditional delete matching one resource of the index becomes a delete of
//! that id; matching none, it is carried to the caller
//! ([`DeleteTarget::Identifier`]), whose store may know more; matching
//! several, it is quarantined, as FHIR's single-match conditional delete
//! refuses them. The deletion's version comes from the entry's
//! `response.etag` (`W/"3"`) and `response.lastModified`, so that the store
//! can tell a deletion from before the stored version from a newer one.

use std::borrow::Cow;
use std::collections::HashMap;

use atlas_fhir::{
    VersionStamp, is_resource_type, is_valid_id, parse_etag, parse_instant_micros,
    rewrite_references, split_resource_url, split_type_url,
};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::classify::{
    ClassifyOptions, DeleteTarget, Deletion, Event, Origin, Reason, Rejection, classify_text,
};

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
        match self.matches(ty, &percent_decode(value)) {
            [one] => Some(format!("{ty}/{one}")),
            _ => None,
        }
    }

    /// The ids of the resources of type `ty` carrying `identifier`
    /// (`system|value`, or a bare `value` in any system; already URL-decoded).
    pub fn matches(&self, ty: &str, identifier: &str) -> &[String] {
        let map = if identifier.contains('|') {
            &self.by_system_value
        } else {
            &self.by_value
        };
        map.get(&(ty.to_owned(), identifier.to_owned()))
            .map_or(&[], Vec::as_slice)
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
    /// Kept raw: its position is the lineage of an entry without a resource
    /// (a DELETE), and a malformed one rejects its entry, not the Bundle.
    #[serde(borrow)]
    request: Option<&'a RawValue>,
    /// Read only for DELETEs, and leniently (see [`response_stamp`]).
    #[serde(borrow)]
    response: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RequestHead {
    method: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct ResponseHead<'a> {
    #[serde(borrow)]
    etag: Option<&'a RawValue>,
    #[serde(rename = "lastModified", borrow)]
    last_modified: Option<&'a RawValue>,
}

/// The version of a deleted resource as the server reported it in the
/// entry's `response`: `etag` `W/"3"` is versionId `3`, `lastModified` an
/// instant. Unreadable parts are left out rather than rejected: they only
/// order the deletion, and a deletion without a version still applies (it
/// is then ordered by its position, as before versions were read).
fn response_stamp(response: Option<&RawValue>) -> VersionStamp {
    let head = response.and_then(|r| serde_json::from_str::<ResponseHead>(r.get()).ok());
    let text =
        |raw: Option<&RawValue>| raw.and_then(|v| serde_json::from_str::<String>(v.get()).ok());
    let (etag, last_modified) = match head {
        Some(h) => (text(h.etag), text(h.last_modified)),
        None => (None, None),
    };
    VersionStamp {
        version_id: etag.as_deref().and_then(parse_etag).map(str::to_owned),
        last_updated: last_modified.and_then(|t| parse_instant_micros(&t).ok()),
        content_hash: 0,
    }
}

/// The event of DELETE entry `i` of a Bundle, whose `request.url` is `url`.
fn delete_event(
    i: usize,
    url: &str,
    response: Option<&RawValue>,
    index: &IdentifierIndex,
    origin: Origin,
) -> Event {
    let reject = |reason: Reason, message: String, ty: Option<&str>, origin: Origin| {
        let mut r = Rejection::new(reason, message, url.as_bytes(), origin);
        r.resource_type = ty.map(str::to_owned);
        r.field = Some("request.url".into());
        Event::Reject(Box::new(r))
    };
    let unknown_type = |ty: &str, origin: Origin| {
        reject(
            Reason::UnknownResourceType,
            format!("entry {i}: DELETE of `{url}`: `{ty}` is not an R4 resource type"),
            None,
            origin,
        )
    };
    let delete = |ty: &str, target: DeleteTarget, origin: Origin| {
        Event::Delete(Deletion {
            resource_type: ty.to_owned(),
            target,
            version: response_stamp(response),
            origin,
        })
    };
    let Some((path, query)) = url.split_once('?') else {
        return match split_resource_url(url) {
            Some((ty, id)) if is_resource_type(ty) => {
                delete(ty, DeleteTarget::Id(id.to_owned()), origin)
            }
            Some((ty, _)) => unknown_type(ty, origin),
            None => reject(
                Reason::UnsupportedEntry,
                format!(
                    "entry {i}: DELETE of `{url}`: not a resource URL (`Type/id`, `/Type/id` or `http(s)://host/base/Type/id`, optionally with `/_history/n`) nor a conditional `Type?identifier=system|value`"
                ),
                None,
                origin,
            ),
        };
    };
    let Some(ty) = split_type_url(path) else {
        return reject(
            Reason::UnsupportedEntry,
            format!(
                "entry {i}: conditional DELETE `{url}`: `{path}` does not name a resource type"
            ),
            None,
            origin,
        );
    };
    if !is_resource_type(ty) {
        return unknown_type(ty, origin);
    }
    let identifier = match conditional_identifier(query) {
        Ok(v) => v,
        Err(why) => {
            return reject(
                Reason::UnsupportedEntry,
                format!("entry {i}: conditional DELETE `{url}`: {why}"),
                Some(ty),
                origin,
            );
        }
    };
    match index.matches(ty, &identifier) {
        [one] => delete(ty, DeleteTarget::Id(one.clone()), origin),
        [] => delete(
            ty,
            DeleteTarget::Identifier {
                identifier,
                url: url.to_owned(),
                entry: i,
            },
            origin,
        ),
        many => reject(
            Reason::AmbiguousConditionalDelete,
            format!(
                "entry {i}: conditional DELETE `{url}` matches {} {ty} resources ({}); a conditional delete must match exactly one, so nothing was deleted",
                many.len(),
                list_ids(ty, many)
            ),
            Some(ty),
            origin,
        ),
    }
}

/// The first few of `ids` as `Type/id`, for messages.
pub fn list_ids(ty: &str, ids: &[String]) -> String {
    let mut out: Vec<String> = ids.iter().take(5).map(|id| format!("{ty}/{id}")).collect();
    if ids.len() > 5 {
        out.push(format!("and {} more", ids.len() - 5));
    }
    out.join(", ")
}

/// The URL-decoded value of the one search parameter Atlas resolves
/// conditional deletes by, `identifier`; why not, for anything else.
fn conditional_identifier(query: &str) -> Result<String, String> {
    if query.is_empty() {
        return Err("no search parameter (it would match every resource of the type)".into());
    }
    let mut identifier = None;
    for param in query.split('&') {
        let (name, value) = param.split_once('=').unwrap_or((param, ""));
        if name != "identifier" {
            return Err(format!(
                "search parameter `{name}` is not supported (only one `identifier=system|value` or `identifier=value`)"
            ));
        }
        if identifier.replace(value).is_some() {
            return Err("`identifier` is given more than once (only one is supported)".into());
        }
    }
    let value = percent_decode(identifier.unwrap_or_default()).into_owned();
    if value.is_empty() || value.ends_with('|') {
        return Err(format!(
            "`identifier={value}` names no value (only `system|value` or `value` are supported)"
        ));
    }
    Ok(value)
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
        // Lineage: the line of the file where this entry's resource starts
        // (its request, for an entry without one: a DELETE).
        let offset = entry
            .resource
            .or(entry.request)
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
        let request = match entry
            .request
            .map(|r| serde_json::from_str::<RequestHead>(r.get()))
        {
            Some(Ok(r)) => Some(r),
            None => None,
            Some(Err(e)) => {
                let raw = entry.request.map_or("", |r| r.get());
                let mut r = Rejection::new(
                    Reason::WrongType,
                    format!("entry {i}: `request`: {e}"),
                    raw.as_bytes(),
                    here,
                );
                r.field = Some("request".into());
                events.push(Event::Reject(Box::new(r)));
                continue;
            }
        };
        let method = request.as_ref().and_then(|r| r.method.as_deref());
        if method == Some("DELETE") {
            let url = request
                .as_ref()
                .and_then(|r| r.url.as_deref())
                .unwrap_or("");
            events.push(delete_event(i, url, entry.response, index, here));
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
            matches!(&ev[3], Event::Delete(d) if d.id() == Some("c9") && d.resource_type == "Condition")
        );
        assert_eq!(ev[3].origin_line(), 5, "a DELETE's line is its request's");
    }

    impl Event {
        fn origin_line(&self) -> u64 {
            match self {
                Event::Resource(r) => r.origin.line,
                Event::Delete(d) => d.origin.line,
                Event::Reject(r) => r.origin.line,
                Event::Skip(o) => o.line,
            }
        }
    }

    /// The events of a transaction Bundle of `entries`, one per line.
    fn unpack(entries: &[String], index: &IdentifierIndex) -> Vec<Event> {
        let text = format!(
            "{{\"resourceType\":\"Bundle\",\"type\":\"transaction\",\"entry\":[\n{}\n]}}",
            entries.join(",\n")
        );
        unpack_bundle(
            &text,
            text.as_bytes(),
            &origin(),
            &ClassifyOptions::default(),
            index,
        )
        .expect("a transaction Bundle is unpacked")
    }

    fn delete_entry(url: &str) -> String {
        format!(
            r#"{{"request":{{"method":"DELETE","url":{}}}}}"#,
            serde_json::to_string(url).unwrap()
        )
    }

    fn one_delete(url: &str, index: &IdentifierIndex) -> Event {
        let mut ev = unpack(&[delete_entry(url)], index);
        assert_eq!(ev.len(), 1);
        ev.remove(0)
    }

    fn deleted(ev: &Event) -> Option<(&str, &DeleteTarget)> {
        match ev {
            Event::Delete(d) => Some((d.resource_type.as_str(), &d.target)),
            _ => None,
        }
    }

    fn rejected(ev: &Event) -> Option<(Reason, &str)> {
        match ev {
            Event::Reject(r) => {
                assert_eq!(r.field.as_deref(), Some("request.url"), "{r:?}");
                assert_eq!(r.origin.line, 2, "{r:?}");
                Some((r.reason, r.message.as_str()))
            }
            _ => None,
        }
    }

    #[test]
    fn delete_urls() {
        let index = IdentifierIndex::default();
        let id = |s: &str| DeleteTarget::Id(s.to_owned());
        for url in [
            "Patient/p1",
            "/Patient/p1",
            "Patient/p1/_history/3",
            "/Patient/p1/_history/3",
            "http://fhir.example.org/Patient/p1",
            "https://fhir.example.org:8443/any/base/R4/Patient/p1",
            "https://fhir.example.org/base/Patient/p1/_history/12",
        ] {
            let ev = one_delete(url, &index);
            assert_eq!(deleted(&ev), Some(("Patient", &id("p1"))), "{url}: {ev:?}");
            assert_eq!(ev.origin_line(), 2);
        }
        for url in [
            "Patinet/p1",
            "/Patinet/p1/_history/2",
            "https://h/base/Patinet/p1",
        ] {
            let ev = one_delete(url, &index);
            let (reason, msg) = rejected(&ev).unwrap_or_else(|| panic!("{url}: {ev:?}"));
            assert_eq!(reason, Reason::UnknownResourceType, "{url}");
            assert!(
                msg.contains("entry 0") && msg.contains(url) && msg.contains("`Patinet`"),
                "{msg}"
            );
        }
        for url in [
            "",
            "Patient",
            "patient/p1",
            "Patient/p 1",
            "Patient/p1/extra",
            "base/Patient/p1",
            "urn:uuid:6b1f6f0e-0000-0000-0000-000000000000",
            "https://h/base/Patient/p1/",
            "ftp://h/Patient/p1",
            "Patient/p1#x",
        ] {
            let ev = one_delete(url, &index);
            let (reason, msg) = rejected(&ev).unwrap_or_else(|| panic!("{url:?}: {ev:?}"));
            assert_eq!(reason, Reason::UnsupportedEntry, "{url}");
            assert!(
                msg.contains("entry 0") && msg.contains(&format!("`{url}`")),
                "{msg}"
            );
        }
        // A DELETE without a url at all.
        let ev = unpack(&[r#"{"request":{"method":"DELETE"}}"#.to_owned()], &index);
        assert_eq!(
            rejected(&ev[0]).map(|r| r.0),
            Some(Reason::UnsupportedEntry)
        );
    }

    #[test]
    fn conditional_deletes() {
        let mut index = IdentifierIndex::default();
        index.insert("Patient", "p1", "http://sys|A 1");
        index.insert("Patient", "p2", "http://sys|B");
        index.insert("Patient", "p3", "other|B");
        let id = |s: &str| DeleteTarget::Id(s.to_owned());
        for (url, want) in [
            ("Patient?identifier=http://sys|A 1", "p1"),
            ("Patient?identifier=http%3A%2F%2Fsys%7CA%201", "p1"),
            ("/Patient?identifier=A%201", "p1"),
            ("https://h/base/Patient?identifier=http://sys|B", "p2"),
            ("Patient?identifier=other%7CB", "p3"),
        ] {
            let ev = one_delete(url, &index);
            assert_eq!(deleted(&ev), Some(("Patient", &id(want))), "{url}: {ev:?}");
        }
        // Not in the index: carried to the store, decoded.
        let ev = one_delete("Patient?identifier=http%3A%2F%2Fsys%7CZ", &index);
        assert_eq!(
            deleted(&ev),
            Some((
                "Patient",
                &DeleteTarget::Identifier {
                    identifier: "http://sys|Z".into(),
                    url: "Patient?identifier=http%3A%2F%2Fsys%7CZ".into(),
                    entry: 0,
                }
            ))
        );
        // Two matches: refused, naming the count.
        let ev = one_delete("Patient?identifier=B", &index);
        let (reason, msg) = rejected(&ev).expect("ambiguous");
        assert_eq!(reason, Reason::AmbiguousConditionalDelete);
        assert!(msg.contains("matches 2 Patient resources"), "{msg}");
        assert!(
            msg.contains("Patient/p2") && msg.contains("Patient/p3"),
            "{msg}"
        );
        assert!(
            msg.contains("entry 0") && msg.contains("Patient?identifier=B"),
            "{msg}"
        );
        // Other search parameters, named.
        for (url, names) in [
            ("Patient?name=smith", "`name`"),
            ("Patient?identifier=sys|A&_count=1", "`_count`"),
            ("Patient?identifier:of-type=x|y|z", "`identifier:of-type`"),
            ("Patient?identifier=a&identifier=b", "more than once"),
            ("Patient?", "no search parameter"),
            ("Patient?identifier=", "names no value"),
            ("Patient?identifier=sys|", "names no value"),
            (
                "base/Patient?identifier=sys|A",
                "does not name a resource type",
            ),
        ] {
            let ev = one_delete(url, &index);
            let (reason, msg) = rejected(&ev).unwrap_or_else(|| panic!("{url}: {ev:?}"));
            assert_eq!(reason, Reason::UnsupportedEntry, "{url}");
            assert!(msg.contains(names) && msg.contains(url), "{url}: {msg}");
        }
        let ev = one_delete("Patinet?identifier=sys|A", &index);
        assert_eq!(
            rejected(&ev).map(|r| r.0),
            Some(Reason::UnknownResourceType)
        );
    }

    #[test]
    fn deletion_versions_from_the_response() {
        let index = IdentifierIndex::default();
        let entry = |response: &str| {
            format!(
                r#"{{"request":{{"method":"DELETE","url":"Patient/p1"}},"response":{response}}}"#
            )
        };
        let stamp = |response: &str| match unpack(&[entry(response)], &index).remove(0) {
            Event::Delete(d) => (
                d.version.version_id,
                d.version.last_updated,
                d.version.content_hash,
            ),
            other => panic!("{response}: {other:?}"),
        };
        assert_eq!(
            stamp(r#"{"status":"204","etag":"W/\"3\""}"#),
            (Some("3".into()), None, 0)
        );
        assert_eq!(
            stamp(r#"{"etag":"\"12\"","lastModified":"2024-05-01T10:00:00.5+02:00"}"#),
            (Some("12".into()), Some(1_714_550_400_500_000), 0)
        );
        assert_eq!(
            stamp(r#"{"lastModified":"2024-05-01T08:00:00Z"}"#),
            (None, Some(1_714_550_400_000_000), 0)
        );
        // Garbage is ignored, part by part; the deletion still applies.
        for garbage in [
            r#"{"etag":"W/3"}"#,
            r#"{"etag":"W/\"\""}"#,
            r#"{"etag":"W/\"3 4\""}"#,
            r#"{"etag":3}"#,
            r#"{"etag":{"v":"3"}}"#,
            r#"{"etag":null,"lastModified":null}"#,
            r#"{"lastModified":"yesterday"}"#,
            r#"{"lastModified":20240501}"#,
            r#""W/\"3\"""#,
            r#"[]"#,
            "null",
        ] {
            assert_eq!(stamp(garbage), (None, None, 0), "{garbage}");
        }
        assert_eq!(
            stamp(r#"{"etag":"garbage","lastModified":"2024-05-01T08:00:00Z"}"#),
            (None, Some(1_714_550_400_000_000), 0)
        );
        // No response: no version.
        let ev = one_delete("Patient/p1", &index);
        assert!(matches!(&ev, Event::Delete(d) if !d.version.has_version_facts()));
    }

    #[test]
    fn a_malformed_request_rejects_its_entry_only() {
        let ev = unpack(
            &[
                r#"{"request":{"method":5,"url":"Patient/p1"}}"#.to_owned(),
                delete_entry("Patient/p2"),
            ],
            &IdentifierIndex::default(),
        );
        assert!(
            matches!(&ev[0], Event::Reject(r) if r.reason == Reason::WrongType && r.field.as_deref() == Some("request") && r.message.starts_with("entry 0")),
            "{ev:?}"
        );
        assert!(matches!(&ev[1], Event::Delete(d) if d.id() == Some("p2")));
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
