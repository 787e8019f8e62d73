//! FHIR REST reads: `Type?_lastUpdated=...` search (current versions in
//! `(lastUpdated, id)` order, paged with a keyset cursor so pages neither
//! repeat nor skip while data changes), read and vread, and `_history`
//! (system, type, instance; newest first, deletes as DELETE entries, paged
//! with a cursor on the write log).

use std::ops::Bound;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;

use crate::MockEhr;
use crate::auth::{self, Grant};
use crate::clock::{format_instant, parse_instant};
use crate::json::quote;
use crate::respond::{FHIR_JSON, error, query_pairs, query_string, set_header, with_body};
use crate::store::{Store, Version};

/// The most entries one page holds, whatever `_count` asks.
const MAX_COUNT: usize = 1000;

/// The grant, checked for reading `ty` (403 otherwise).
fn reader(ehr: &MockEhr, headers: &HeaderMap, ty: &str) -> Result<Grant, Response> {
    let grant = auth::check(ehr, headers)?;
    if !grant.can_read(ty) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the token's scopes do not allow reading {ty}"),
        ));
    }
    Ok(grant)
}

fn count(ehr: &MockEhr, pairs: &[(String, String)]) -> Result<usize, Response> {
    match pairs.iter().find(|(k, _)| k == "_count") {
        None => Ok(ehr.config.page_size.min(MAX_COUNT)),
        Some((_, v)) => v
            .parse::<usize>()
            .map(|n| n.clamp(1, MAX_COUNT))
            .map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!("_count {v:?} is not a number"),
                )
            }),
    }
}

/// `path?query` with the cursor replaced: the next page's link.
fn next_link(ehr: &MockEhr, path: &str, pairs: &[(String, String)], cursor: String) -> String {
    let mut next: Vec<(String, String)> = pairs
        .iter()
        .filter(|(k, _)| k != "_cursor")
        .cloned()
        .collect();
    next.push(("_cursor".into(), cursor));
    format!("{}/{path}?{}", ehr.fhir_base(), query_string(&next))
}

/// A Bundle around pre-rendered entries (resources stay byte for byte).
fn bundle(
    ehr: &MockEhr,
    kind: &str,
    total: Option<usize>,
    links: &[(&str, String)],
    entries: &[String],
) -> Response {
    let links: Vec<String> = links
        .iter()
        .map(|(rel, url)| format!(r#"{{"relation":{},"url":{}}}"#, quote(rel), quote(url)))
        .collect();
    let total = total
        .map(|t| format!(r#","total":{t}"#))
        .unwrap_or_default();
    let body = format!(
        r#"{{"resourceType":"Bundle","meta":{{"lastUpdated":{}}},"type":{}{total},"link":[{}],"entry":[{}]}}"#,
        quote(&ehr.now()),
        quote(kind),
        links.join(","),
        entries.join(",")
    );
    with_body(StatusCode::OK, FHIR_JSON, body)
}

/// `_lastUpdated` bounds: `(lower, inclusive)` and `(upper, inclusive)`.
#[derive(Default)]
struct Window {
    lower: Option<(i64, bool)>,
    upper: Option<(i64, bool)>,
}

impl Window {
    fn parse(pairs: &[(String, String)]) -> Result<Window, String> {
        let mut w = Window::default();
        for (_, v) in pairs.iter().filter(|(k, _)| k == "_lastUpdated") {
            let (prefix, instant) = match v.get(..2) {
                Some(p @ ("gt" | "ge" | "lt" | "le" | "eq")) => (p, &v[2..]),
                _ => ("eq", v.as_str()),
            };
            let at = parse_instant(instant)
                .ok_or_else(|| format!("_lastUpdated {v:?} is not an instant"))?;
            match prefix {
                "gt" => w.lower = Some((at, false)),
                "ge" => w.lower = Some((at, true)),
                "lt" => w.upper = Some((at, false)),
                "le" => w.upper = Some((at, true)),
                _ => {
                    w.lower = Some((at, true));
                    w.upper = Some((at, true));
                }
            }
        }
        Ok(w)
    }

    fn above_lower(&self, lu: i64) -> bool {
        self.lower
            .is_none_or(|(at, inc)| lu > at || (inc && lu == at))
    }

    fn below_upper(&self, lu: i64) -> bool {
        self.upper
            .is_none_or(|(at, inc)| lu < at || (inc && lu == at))
    }
}

/// A search's checked parameters.
struct SearchParams {
    pairs: Vec<(String, String)>,
    count: usize,
    window: Window,
    /// The last `(lastUpdated, id)` of the previous page.
    cursor: Option<(i64, String)>,
}

impl SearchParams {
    fn parse(ehr: &MockEhr, query: Option<&str>) -> Result<SearchParams, Response> {
        let pairs = query_pairs(query);
        let count = count(ehr, &pairs)?;
        let bad = |code: &str, why: &str| error(StatusCode::BAD_REQUEST, code, why);
        if let Some((_, sort)) = pairs.iter().find(|(k, _)| k == "_sort")
            && sort != "_lastUpdated"
        {
            let why = format!("_sort {sort:?}: only _lastUpdated is supported");
            return Err(bad("not-supported", &why));
        }
        let window = Window::parse(&pairs).map_err(|why| bad("invalid", &why))?;
        let cursor = match pairs.iter().find(|(k, _)| k == "_cursor") {
            None => None,
            Some((_, c)) => {
                let parsed = c
                    .split_once('.')
                    .and_then(|(lu, id)| Some((lu.parse().ok()?, id.to_string())));
                Some(parsed.ok_or_else(|| bad("invalid", "_cursor is not one this server wrote"))?)
            }
        };
        Ok(SearchParams {
            pairs,
            count,
            window,
            cursor,
        })
    }
}

/// `GET /fhir/{ty}`.
pub(crate) fn search(
    ehr: &MockEhr,
    ty: &str,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    if let Err(r) = reader(ehr, headers, ty) {
        return r;
    }
    let p = match SearchParams::parse(ehr, query) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (n, w) = (p.count, &p.window);
    let base = ehr.fhir_base();
    let store = ehr.lock_store();
    let empty = Default::default();
    let live = store.live.get(ty).unwrap_or(&empty);
    // Keyset paging: start after the cursor, else at the lower bound.
    let from = match (&p.cursor, w.lower) {
        (Some(c), _) => Bound::Excluded(c.clone()),
        (None, Some((at, inc))) => Bound::Included((if inc { at } else { at + 1 }, String::new())),
        (None, None) => Bound::Unbounded,
    };
    let within = |lu: i64| w.above_lower(lu) && w.below_upper(lu);
    let page: Vec<&(i64, String)> = live
        .range((from, Bound::Unbounded))
        .filter(|(lu, _)| w.above_lower(*lu))
        .take_while(|(lu, _)| w.below_upper(*lu))
        .take(n + 1)
        .collect();
    let total = live.iter().filter(|(lu, _)| within(*lu)).count();
    let entries: Vec<String> = page
        .iter()
        .take(n)
        .filter_map(|(_, id)| {
            let body = store.current(ty, id)?.body.clone()?;
            let full_url = quote(&format!("{base}/{ty}/{id}"));
            Some(format!(
                r#"{{"fullUrl":{full_url},"resource":{body},"search":{{"mode":"match"}}}}"#
            ))
        })
        .collect();
    let mut links = vec![("self", format!("{base}/{ty}?{}", query_string(&p.pairs)))];
    if page.len() > n
        && let Some((lu, id)) = page.get(n - 1)
    {
        links.push(("next", next_link(ehr, ty, &p.pairs, format!("{lu}.{id}"))));
    }
    drop(store);
    bundle(ehr, "searchset", Some(total), &links, &entries)
}

/// A resource version as a response, with its ETag and Last-Modified.
fn version_response(ty: &str, id: &str, v: &Version) -> Response {
    let Some(body) = &v.body else {
        return error(
            StatusCode::GONE,
            "deleted",
            &format!("{ty}/{id} was deleted"),
        );
    };
    let mut r = with_body(StatusCode::OK, FHIR_JSON, body.to_string());
    set_header(&mut r, header::ETAG, &format!("W/\"{}\"", v.version_id));
    if let Some(t) = chrono::DateTime::from_timestamp_micros(v.last_updated) {
        set_header(
            &mut r,
            header::LAST_MODIFIED,
            &t.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        );
    }
    r
}

/// `GET /fhir/{ty}/{id}` and `GET /fhir/{ty}/{id}/_history/{vid}`.
pub(crate) fn read(
    ehr: &MockEhr,
    ty: &str,
    id: &str,
    vid: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    if let Err(r) = reader(ehr, headers, ty) {
        return r;
    }
    let store = ehr.lock_store();
    let Some(versions) = store.records.get(&(ty.to_string(), id.to_string())) else {
        drop(store);
        if ty == "Group"
            && let Some(group) = ehr.group_resource(id)
        {
            return crate::respond::fhir(StatusCode::OK, &group);
        }
        return error(StatusCode::NOT_FOUND, "not-found", &format!("no {ty}/{id}"));
    };
    let v = match vid {
        None => versions.last(),
        Some(vid) => vid
            .parse::<usize>()
            .ok()
            .and_then(|n| n.checked_sub(1))
            .and_then(|i| versions.get(i)),
    };
    match v {
        Some(v) => version_response(ty, id, v),
        None => error(
            StatusCode::NOT_FOUND,
            "not-found",
            &format!("no {ty}/{id} version {}", vid.unwrap_or("?")),
        ),
    }
}

/// One `_history` entry.
fn history_entry(base: &str, ty: &str, id: &str, v: &Version) -> String {
    let (method, url, status) = match (&v.body, v.version_id) {
        (None, _) => ("DELETE", format!("{ty}/{id}"), "204 No Content"),
        (Some(_), 1) => ("POST", ty.to_string(), "201 Created"),
        (Some(_), _) => ("PUT", format!("{ty}/{id}"), "200 OK"),
    };
    let resource = v
        .body
        .as_ref()
        .map(|b| format!(r#""resource":{b},"#))
        .unwrap_or_default();
    format!(
        r#"{{"fullUrl":{},{resource}"request":{{"method":"{method}","url":{}}},"response":{{"status":"{status}","etag":{},"lastModified":{}}}}}"#,
        quote(&format!("{base}/{ty}/{id}")),
        quote(&url),
        quote(&format!("W/\"{}\"", v.version_id)),
        quote(&format_instant(v.last_updated)),
    )
}

/// Which `_history`: system, one type, or one resource.
pub(crate) enum HistoryOf<'a> {
    System,
    Type(&'a str),
    Instance(&'a str, &'a str),
}

/// `GET /fhir/_history`, `/fhir/{ty}/_history`, `/fhir/{ty}/{id}/_history`.
pub(crate) fn history(
    ehr: &MockEhr,
    of: HistoryOf,
    query: Option<&str>,
    headers: &HeaderMap,
) -> Response {
    if !ehr.config.history {
        return error(
            StatusCode::NOT_FOUND,
            "not-supported",
            "this server does not support _history",
        );
    }
    let grant = match auth::check(ehr, headers) {
        Ok(g) => g,
        Err(r) => return r,
    };
    let pairs = query_pairs(query);
    let n = match count(ehr, &pairs) {
        Ok(n) => n,
        Err(r) => return r,
    };
    let since = match pairs.iter().find(|(k, _)| k == "_since") {
        None => None,
        Some((_, v)) => match parse_instant(v) {
            Some(t) => Some(t),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "invalid",
                    &format!("_since {v:?} is not an instant"),
                );
            }
        },
    };
    let before = pairs
        .iter()
        .find(|(k, _)| k == "_cursor")
        .and_then(|(_, c)| c.parse::<u64>().ok());
    let base = ehr.fhir_base();
    let store = ehr.lock_store();
    let (path, page) = newest_first(&store, &of, &grant, since, before, n + 1);
    let entries: Vec<String> = page
        .iter()
        .take(n)
        .map(|(ty, id, v)| history_entry(&base, ty, id, v))
        .collect();
    let mut links = vec![("self", format!("{base}/{path}?{}", query_string(&pairs)))];
    if page.len() > n
        && let Some((_, _, v)) = page.get(n - 1)
    {
        links.push(("next", next_link(ehr, &path, &pairs, v.seq.to_string())));
    }
    drop(store);
    bundle(ehr, "history", None, &links, &entries)
}

type Entry<'s> = (&'s str, &'s str, &'s Version);

/// Up to `limit` versions, newest first, written before `before` (a log
/// position) and at or after `since`; the path the Bundle's links use.
fn newest_first<'s>(
    store: &'s Store,
    of: &HistoryOf,
    grant: &Grant,
    since: Option<i64>,
    before: Option<u64>,
    limit: usize,
) -> (String, Vec<Entry<'s>>) {
    let end = before.map_or(store.log.len(), |b| (b as usize).min(store.log.len()));
    let recent = |v: &Version| since.is_none_or(|s| v.last_updated >= s);
    let mut out = Vec::new();
    let path = match of {
        HistoryOf::Instance(ty, id) => {
            if let Some((key, versions)) = store
                .records
                .get_key_value(&(ty.to_string(), id.to_string()))
                && grant.can_read(ty)
            {
                out.extend(
                    versions
                        .iter()
                        .rev()
                        .filter(|v| (v.seq as usize) < end)
                        .take_while(|v| recent(v))
                        .take(limit)
                        .map(|v| (key.0.as_str(), key.1.as_str(), v)),
                );
            }
            format!("{ty}/{id}/_history")
        }
        HistoryOf::Type(_) | HistoryOf::System => {
            let only = match of {
                HistoryOf::Type(t) => Some(*t),
                _ => None,
            };
            for (key, idx) in store.log[..end].iter().rev() {
                let Some(v) = store.records.get(key).and_then(|vs| vs.get(*idx)) else {
                    continue;
                };
                if !recent(v) || out.len() == limit {
                    break;
                }
                if only.is_none_or(|t| t == key.0) && grant.can_read(&key.0) {
                    out.push((key.0.as_str(), key.1.as_str(), v));
                }
            }
            only.map_or("_history".to_string(), |t| format!("{t}/_history"))
        }
    };
    (path, out)
}
