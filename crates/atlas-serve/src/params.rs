//! Request parameters of the object-set endpoints, shared by the object,
//! aggregate, GraphQL and stream handlers: query-string pairs checked
//! against the names a route takes, object sets decoded from JSON, page
//! sizes and tokens, orderings, selections and narrowings (`patientId`,
//! `dateFrom`, `dateTo`). Every error names the parameter.

use std::collections::HashMap;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value as Json;

use atlas_objectset::{Decoder, ObjectSet};
use atlas_ontology::ObjectType;

use crate::ontology::object_type;
use crate::query::{Narrow, OrderField, PageRequest};
use crate::{ApiError, AppState};

pub(crate) fn bad(
    name: &'static str,
    parameter: &str,
    value: &str,
    message: impl Into<String>,
) -> ApiError {
    ApiError::new(StatusCode::BAD_REQUEST, name, parameter, value, message)
}

/// A request body's `objectSet`, narrowed by its top-level `where` when
/// given, checked against the ontology; with the set's object type.
pub(crate) fn decode_set<'s>(
    state: &'s AppState,
    object_set: &Json,
    where_: Option<&Json>,
) -> Result<(ObjectSet, &'s ObjectType), ApiError> {
    let decoder = Decoder::new(&state.ontology);
    let mut set = decoder
        .object_set(object_set, "objectSet")
        .map_err(|e| bad("InvalidObjectSet", &e.path, "", e.to_string()))?;
    let t = object_type(&state.ontology, set.object_type())?;
    if let Some(w) = where_ {
        let filter = decoder
            .where_clause(w, &t.api_name, "where")
            .map_err(|e| bad("InvalidObjectSet", &e.path, "", e.to_string()))?;
        set = ObjectSet::Filter {
            set: Box::new(set),
            filter,
        };
    }
    Ok((set, t))
}

/// The body of `loadObjects`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct LoadObjectsBody {
    pub(crate) object_set: Json,
    /// A filter applied to the set (a shorthand for a `filter` set).
    #[serde(rename = "where")]
    pub(crate) where_: Option<Json>,
    pub(crate) order_by: Option<Json>,
    pub(crate) select: Option<Vec<String>>,
    pub(crate) page_size: Option<Json>,
    pub(crate) page_token: Option<String>,
    /// Count every object of the set (exact; costs a scan).
    #[serde(default)]
    pub(crate) include_total_count: bool,
    /// Accepted for Foundry clients; objects carry no rid here.
    #[serde(default)]
    pub(crate) exclude_rid: bool,
}

/// The query string as a map: unknown and repeated parameters are refused.
pub(crate) fn params(
    raw: Option<String>,
    allowed: &[&str],
) -> Result<HashMap<String, String>, ApiError> {
    let mut out = HashMap::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if !allowed.contains(&k.as_ref()) {
            return Err(bad(
                "InvalidQueryParameters",
                &k,
                &v,
                format!(
                    "unknown query parameter '{k}'; this endpoint takes: {}",
                    allowed.join(", ")
                ),
            ));
        }
        if out.insert(k.to_string(), v.to_string()).is_some() {
            return Err(bad(
                "InvalidQueryParameters",
                &k,
                &v,
                format!("query parameter '{k}' is given more than once"),
            ));
        }
    }
    Ok(out)
}

pub(crate) fn page_size(v: Option<&Json>, state: &AppState) -> Result<usize, ApiError> {
    let max = state.config.max_page_size;
    let Some(v) = v else {
        return Ok(state.config.default_page_size);
    };
    let n = match v {
        Json::Number(n) => n.as_u64(),
        Json::String(s) => s.parse::<u64>().ok(),
        _ => None,
    };
    match n {
        Some(n) if n >= 1 && n <= max as u64 => Ok(n as usize),
        _ => Err(bad(
            "InvalidPageSize",
            "pageSize",
            &v.to_string(),
            format!("pageSize must be a whole number from 1 to {max}"),
        )),
    }
}

/// `patientId`, `dateFrom`, `dateTo` from the query string.
pub(crate) fn narrow(p: &HashMap<String, String>) -> Result<Narrow, ApiError> {
    let date = |name: &str| -> Result<Option<String>, ApiError> {
        let Some(v) = p.get(name) else {
            return Ok(None);
        };
        if is_date_prefix(v) {
            Ok(Some(v.clone()))
        } else {
            Err(bad(
                "InvalidParameter",
                name,
                v,
                format!("{name} must be a date: YYYY, YYYY-MM or YYYY-MM-DD"),
            ))
        }
    };
    Ok(Narrow {
        patient: p.get("patientId").cloned(),
        date_from: date("dateFrom")?,
        date_to: date("dateTo")?,
    })
}

/// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, and a real date (`2020-13-45` and
/// `2021-02-29` are not).
fn is_date_prefix(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let real = |ymd: &str| chrono::NaiveDate::parse_from_str(ymd, "%Y-%m-%d").is_ok();
    match b.len() {
        4 => digits(0..4),
        7 => digits(0..4) && b[4] == b'-' && digits(5..7) && real(&format!("{s}-01")),
        10 => {
            digits(0..4) && b[4] == b'-' && digits(5..7) && b[7] == b'-' && digits(8..10) && real(s)
        }
        _ => false,
    }
}

/// `orderBy` in the body: `{"orderType": "fields", "fields": [{"field": f,
/// "direction": "asc"|"desc"}]}`.
pub(crate) fn order_body(v: Option<&Json>, t: &ObjectType) -> Result<Vec<OrderField>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let path = "orderBy";
    let obj = v.as_object().ok_or_else(|| {
        bad(
            "InvalidOrderBy",
            path,
            &v.to_string(),
            "orderBy must be an object",
        )
    })?;
    for k in obj.keys() {
        if k != "orderType" && k != "fields" {
            return Err(bad(
                "InvalidOrderBy",
                &format!("{path}.{k}"),
                k,
                format!("unknown field '{k}' (orderBy takes orderType and fields)"),
            ));
        }
    }
    if let Some(ot) = obj.get("orderType")
        && ot.as_str() != Some("fields")
    {
        return Err(bad(
            "InvalidOrderBy",
            "orderBy.orderType",
            &ot.to_string(),
            "orderType must be \"fields\"",
        ));
    }
    let fields = obj.get("fields").and_then(Json::as_array).ok_or_else(|| {
        bad(
            "InvalidOrderBy",
            "orderBy.fields",
            "",
            "orderBy.fields must be a list of {field, direction}",
        )
    })?;
    let mut out = Vec::new();
    for (i, f) in fields.iter().enumerate() {
        let at = format!("orderBy.fields[{i}]");
        let field = f.get("field").and_then(Json::as_str).ok_or_else(|| {
            bad(
                "InvalidOrderBy",
                &format!("{at}.field"),
                &f.to_string(),
                "field must be a property name",
            )
        })?;
        let ascending = match f.get("direction").map(|d| d.as_str()) {
            None | Some(Some("asc")) => true,
            Some(Some("desc")) => false,
            Some(_) => {
                return Err(bad(
                    "InvalidOrderBy",
                    &format!("{at}.direction"),
                    &f.to_string(),
                    "direction must be \"asc\" or \"desc\"",
                ));
            }
        };
        if let Some(k) = f
            .as_object()
            .and_then(|o| o.keys().find(|k| *k != "field" && *k != "direction"))
        {
            return Err(bad(
                "InvalidOrderBy",
                &format!("{at}.{k}"),
                k,
                format!("unknown field '{k}'"),
            ));
        }
        check_property(t, field, &format!("{at}.field"))?;
        out.push(OrderField {
            property: field.to_owned(),
            ascending,
        });
    }
    Ok(out)
}

/// `orderBy=effective:desc,id` in a query string.
pub(crate) fn order_param(v: Option<&String>, t: &ObjectType) -> Result<Vec<OrderField>, ApiError> {
    let Some(v) = v else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for part in v.split(',').filter(|p| !p.is_empty()) {
        let (field, dir) = part.split_once(':').unwrap_or((part, "asc"));
        let field = field.strip_prefix("p.").unwrap_or(field);
        let ascending = match dir {
            "asc" => true,
            "desc" => false,
            _ => {
                return Err(bad(
                    "InvalidOrderBy",
                    "orderBy",
                    v,
                    format!("'{part}': direction must be asc or desc"),
                ));
            }
        };
        check_property(t, field, "orderBy")?;
        out.push(OrderField {
            property: field.to_owned(),
            ascending,
        });
    }
    Ok(out)
}

pub(crate) fn check_property(t: &ObjectType, name: &str, at: &str) -> Result<(), ApiError> {
    if t.property(name).is_some() {
        return Ok(());
    }
    Err(bad(
        "PropertyNotFound",
        at,
        name,
        format!(
            "object type '{}' has no property '{name}'; it has: {}",
            t.api_name,
            t.properties
                .iter()
                .map(|p| p.api_name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    ))
}

pub(crate) fn select(
    list: Option<Vec<String>>,
    t: &ObjectType,
    at: &str,
) -> Result<Option<Vec<String>>, ApiError> {
    let Some(list) = list else { return Ok(None) };
    for (i, p) in list.iter().enumerate() {
        check_property(t, p, &format!("{at}[{i}]"))?;
    }
    Ok(Some(list))
}

pub(crate) fn select_param(
    v: Option<&String>,
    t: &ObjectType,
) -> Result<Option<Vec<String>>, ApiError> {
    select(
        v.map(|s| {
            s.split(',')
                .filter(|p| !p.is_empty())
                .map(str::to_owned)
                .collect()
        }),
        t,
        "select",
    )
}

pub(crate) const LIST_PARAMS: &[&str] = &[
    "pageSize",
    "pageToken",
    "orderBy",
    "select",
    "patientId",
    "dateFrom",
    "dateTo",
    "includeTotalCount",
    "excludeRid",
];

pub(crate) fn page_params(
    p: &HashMap<String, String>,
    state: &AppState,
) -> Result<PageRequest, ApiError> {
    Ok(PageRequest {
        size: page_size(
            p.get("pageSize").map(|s| Json::String(s.clone())).as_ref(),
            state,
        )?,
        token: p.get("pageToken").cloned(),
        total: match p.get("includeTotalCount").map(String::as_str) {
            None | Some("false") => false,
            Some("true") => true,
            Some(other) => {
                return Err(bad(
                    "InvalidParameter",
                    "includeTotalCount",
                    other,
                    "includeTotalCount must be true or false",
                ));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::is_date_prefix;

    #[test]
    fn date_prefixes_must_be_real_dates() {
        for ok in ["2020", "2020-12", "2020-02-29", "1999-01-31"] {
            assert!(is_date_prefix(ok), "{ok}");
        }
        for bad in [
            "2020-13-45",
            "2020-13",
            "2020-00",
            "2021-02-29",
            "2020-04-31",
            "2020-1-1",
            "20201",
            "2020-12-00",
        ] {
            assert!(!is_date_prefix(bad), "{bad}");
        }
    }
}
