//! `objectSets/aggregate`: metrics (count, min, max, avg, sum,
//! exactDistinct, approximateDistinct) over an object set, optionally
//! grouped (exact values, fixed-width numeric buckets, explicit ranges,
//! calendar durations), in the shape of Foundry's ontology API v2.
//!
//! It plans through the same [`Planner`] as `loadObjects`, so the policy
//! scope is applied to every scan before any group or metric is computed:
//! counts and extremes never include rows the caller cannot read.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use datafusion::functions_aggregate::expr_fn as agg;
use datafusion::logical_expr::{Expr, LogicalPlan, case, lit};
use datafusion::prelude::cast;
use serde::Deserialize;
use serde_json::Value as Json;

use arrow::datatypes::DataType;
use arrow::record_batch::RecordBatch;
use atlas_objectset::{ObjectSet, PropertyKind, Value};
use atlas_ontology::ObjectType;
use atlas_policy::{Action, Principal};

use crate::error::{bad, internal};
use crate::query::{Narrow, Planner, column, snapshot, write_str, write_value};
use crate::{ApiError, AppState};

/// Groups returned at most; more is a 400 asking for a narrower grouping.
const MAX_GROUPS: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub(crate) struct AggregateBody {
    object_set: Json,
    #[serde(rename = "where")]
    where_: Option<Json>,
    aggregation: Vec<Json>,
    #[serde(default)]
    group_by: Vec<Json>,
    /// `REQUIRE_ACCURATE` refuses approximate metrics.
    accuracy: Option<String>,
}

struct Metric {
    name: String,
    expr: Expr,
}

struct Group {
    name: String,
    expr: Expr,
    /// For `ranges`: the (start, end) JSON of each range, by index.
    ranges: Option<Vec<(Json, Json)>>,
}

fn at(i: usize, list: &str, key: &str) -> String {
    format!("{list}[{i}].{key}")
}

fn str_field<'j>(v: &'j Json, path: &str, key: &str) -> Result<&'j str, ApiError> {
    v.get(key).and_then(Json::as_str).ok_or_else(|| {
        bad(
            "InvalidAggregation",
            &format!("{path}.{key}"),
            &v.to_string(),
            format!("{path}.{key} must be a string"),
        )
    })
}

fn only_keys(v: &Json, path: &str, keys: &[&str]) -> Result<(), ApiError> {
    let obj = v.as_object().ok_or_else(|| {
        bad(
            "InvalidAggregation",
            path,
            &v.to_string(),
            format!("{path} must be an object"),
        )
    })?;
    if let Some(k) = obj.keys().find(|k| !keys.contains(&k.as_str())) {
        return Err(bad(
            "InvalidAggregation",
            &format!("{path}.{k}"),
            k,
            format!("unknown field '{k}'; {path} takes: {}", keys.join(", ")),
        ));
    }
    Ok(())
}

fn property<'t>(
    t: &'t ObjectType,
    v: &Json,
    path: &str,
) -> Result<&'t atlas_ontology::Property, ApiError> {
    let name = str_field(v, path, "field")?;
    t.property(name).ok_or_else(|| {
        bad(
            "PropertyNotFound",
            &format!("{path}.field"),
            name,
            format!("object type '{}' has no property '{name}'", t.api_name),
        )
    })
}

fn metric(t: &ObjectType, v: &Json, i: usize, approximate_ok: bool) -> Result<Metric, ApiError> {
    let path = format!("aggregation[{i}]");
    let ty = str_field(v, &path, "type")?;
    let needs_field = ty != "count";
    let keys: &[&str] = if needs_field {
        &["type", "field", "name"]
    } else {
        &["type", "name"]
    };
    only_keys(v, &path, keys)?;
    let name = match v.get("name") {
        None => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(other) => {
            return Err(bad(
                "InvalidAggregation",
                &at(i, "aggregation", "name"),
                &other.to_string(),
                "name must be a string".to_owned(),
            ));
        }
    };
    if !needs_field {
        return Ok(Metric {
            name: name.unwrap_or_else(|| "count".into()),
            expr: agg::count(lit(1)),
        });
    }
    let p = property(t, v, &path)?;
    let c = column(&p.column);
    let kind = PropertyKind::of_fhir_type(&p.r#type);
    let numeric = matches!(kind, PropertyKind::Int | PropertyKind::Decimal);
    let expr = match ty {
        "min" => agg::min(c),
        "max" => agg::max(c),
        "sum" | "avg" if !numeric => {
            return Err(bad(
                "InvalidAggregation",
                &at(i, "aggregation", "field"),
                &p.api_name,
                format!(
                    "{ty} needs a numeric property; '{}' is {}",
                    p.api_name, p.r#type
                ),
            ));
        }
        "sum" => agg::sum(c),
        "avg" => agg::avg(c),
        "exactDistinct" => agg::count_distinct(c),
        "approximateDistinct" if !approximate_ok => {
            return Err(bad(
                "InvalidAggregation",
                &at(i, "aggregation", "type"),
                ty,
                "approximateDistinct is approximate and accuracy is REQUIRE_ACCURATE; use exactDistinct".to_owned(),
            ));
        }
        "approximateDistinct" => agg::approx_distinct(c),
        other => {
            return Err(bad(
                "InvalidAggregation",
                &at(i, "aggregation", "type"),
                other,
                format!(
                    "unknown metric '{other}'; known: count, min, max, avg, sum, exactDistinct, approximateDistinct"
                ),
            ));
        }
    };
    Ok(Metric {
        name: name.unwrap_or_else(|| format!("{ty}_{}", p.api_name)),
        expr,
    })
}

fn number(v: &Json, path: &str) -> Result<f64, ApiError> {
    v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
        bad(
            "InvalidAggregation",
            path,
            &v.to_string(),
            format!("{path} must be a number"),
        )
    })
}

fn group(planner: &Planner<'_>, t: &ObjectType, v: &Json, i: usize) -> Result<Group, ApiError> {
    let path = format!("groupBy[{i}]");
    let ty = str_field(v, &path, "type")?;
    let p = property(t, v, &path)?;
    let c = column(&p.column);
    let kind = PropertyKind::of_fhir_type(&p.r#type);
    let name = p.api_name.clone();
    match ty {
        "exact" => {
            only_keys(v, &path, &["type", "field", "maxGroupCount"])?;
            Ok(Group {
                name,
                expr: c,
                ranges: None,
            })
        }
        "fixedWidth" => {
            only_keys(v, &path, &["type", "field", "fixedWidth"])?;
            let w = v
                .get("fixedWidth")
                .map(|w| number(w, &at(i, "groupBy", "fixedWidth")))
                .transpose()?;
            let w = w.filter(|w| *w > 0.0).ok_or_else(|| {
                bad(
                    "InvalidAggregation",
                    &at(i, "groupBy", "fixedWidth"),
                    &v.to_string(),
                    "fixedWidth must be a positive number".to_owned(),
                )
            })?;
            let expr = match kind {
                PropertyKind::Int if w.fract() == 0.0 => {
                    // Floor to a multiple of w, also for negative values.
                    let w = lit(w as i64);
                    c.clone() - ((c % w.clone()) + w.clone()) % w
                }
                PropertyKind::Int | PropertyKind::Decimal => {
                    let x = cast(c, DataType::Float64);
                    datafusion::functions::math::expr_fn::floor(x / lit(w)) * lit(w)
                }
                _ => {
                    return Err(bad(
                        "InvalidAggregation",
                        &at(i, "groupBy", "field"),
                        &p.api_name,
                        format!(
                            "fixedWidth needs a numeric property; '{}' is {}",
                            p.api_name, p.r#type
                        ),
                    ));
                }
            };
            Ok(Group {
                name,
                expr,
                ranges: None,
            })
        }
        "ranges" => {
            only_keys(v, &path, &["type", "field", "ranges"])?;
            let list = v.get("ranges").and_then(Json::as_array).ok_or_else(|| {
                bad(
                    "InvalidAggregation",
                    &at(i, "groupBy", "ranges"),
                    &v.to_string(),
                    "ranges must be a list of {startValue, endValue}".to_owned(),
                )
            })?;
            if list.is_empty() || list.len() > 1000 {
                return Err(bad(
                    "InvalidAggregation",
                    &at(i, "groupBy", "ranges"),
                    &list.len().to_string(),
                    "give from 1 to 1000 ranges".to_owned(),
                ));
            }
            let mut builder: Option<
                datafusion::logical_expr::conditional_expressions::CaseBuilder,
            > = None;
            let mut bounds = Vec::new();
            for (j, r) in list.iter().enumerate() {
                let rp = format!("{path}.ranges[{j}]");
                only_keys(r, &rp, &["startValue", "endValue"])?;
                let mut cond = c.clone().is_not_null();
                let mut pair = (Json::Null, Json::Null);
                for (key, lower) in [("startValue", true), ("endValue", false)] {
                    let Some(b) = r.get(key) else { continue };
                    let value = bound_value(b, kind).ok_or_else(|| {
                        bad(
                            "InvalidAggregation",
                            &format!("{rp}.{key}"),
                            &b.to_string(),
                            format!(
                                "{key} does not fit property '{}' ({})",
                                p.api_name, p.r#type
                            ),
                        )
                    })?;
                    let (_, l) = planner.literal(t, &p.api_name, &value)?;
                    cond = cond.and(if lower {
                        c.clone().gt_eq(l)
                    } else {
                        c.clone().lt(l)
                    });
                    if lower {
                        pair.0 = b.clone();
                    } else {
                        pair.1 = b.clone();
                    }
                }
                bounds.push(pair);
                let idx = lit(j as i64);
                builder = Some(match builder {
                    None => case(lit(true)).when(cond, idx),
                    Some(mut b) => {
                        b.when(cond, idx);
                        b
                    }
                });
            }
            let expr = match builder {
                Some(b) => b.end().map_err(internal)?,
                None => lit(datafusion::common::ScalarValue::Null),
            };
            Ok(Group {
                name,
                expr,
                ranges: Some(bounds),
            })
        }
        "duration" => {
            only_keys(v, &path, &["type", "field", "value", "unit"])?;
            if !matches!(kind, PropertyKind::Date | PropertyKind::Timestamp) {
                return Err(bad(
                    "InvalidAggregation",
                    &at(i, "groupBy", "field"),
                    &p.api_name,
                    format!(
                        "duration needs a date or dateTime property; '{}' is {}",
                        p.api_name, p.r#type
                    ),
                ));
            }
            let unit = str_field(v, &path, "unit")?;
            let value = v.get("value").and_then(Json::as_u64).unwrap_or(1);
            if value != 1 {
                return Err(bad(
                    "InvalidAggregation",
                    &at(i, "groupBy", "value"),
                    &value.to_string(),
                    "only value 1 is supported (one bucket per calendar unit)".to_owned(),
                ));
            }
            // FHIR dates are text: a calendar bucket is a prefix, padded to
            // its first day. Partial dates shorter than the unit stay short.
            let left = |n: i64| datafusion::functions::unicode::expr_fn::left(c.clone(), lit(n));
            let concat = |a: Expr, b: &str| {
                datafusion::functions::string::expr_fn::concat(vec![a, lit(b.to_owned())])
            };
            let expr = match unit {
                "YEARS" => concat(left(4), "-01-01"),
                "MONTHS" => concat(left(7), "-01"),
                "DAYS" => left(10),
                other => {
                    return Err(bad(
                        "InvalidAggregation",
                        &at(i, "groupBy", "unit"),
                        other,
                        "unit must be YEARS, MONTHS or DAYS".to_owned(),
                    ));
                }
            };
            Ok(Group {
                name,
                expr,
                ranges: None,
            })
        }
        other => Err(bad(
            "InvalidAggregation",
            &at(i, "groupBy", "type"),
            other,
            format!("unknown grouping '{other}'; known: exact, fixedWidth, ranges, duration"),
        )),
    }
}

/// A range bound as a filter value of the property's kind.
fn bound_value(b: &Json, kind: PropertyKind) -> Option<Value> {
    Some(match (kind, b) {
        (PropertyKind::Int, Json::Number(n)) => Value::Int(n.as_i64()?),
        (PropertyKind::Decimal, Json::Number(n)) => Value::Decimal(n.to_string()),
        (PropertyKind::Date, Json::String(s)) => Value::Date(s.clone()),
        (PropertyKind::Timestamp, Json::String(s)) => Value::Timestamp(s.clone()),
        (PropertyKind::Text, Json::String(s)) => Value::Str(s.clone()),
        _ => return None,
    })
}

#[utoipa::path(post, path = "/api/v2/ontologies/{ontology}/objectSets/aggregate", tag = "objects", security(("bearer" = [])), params(("ontology" = String, Path, description = "The ontology: `atlas` or its rid"), ("patientId" = Option<String>, Query, description = "Only this patient's objects"), ("dateFrom" = Option<String>, Query, description = "Time property on or after (YYYY, YYYY-MM or YYYY-MM-DD)"), ("dateTo" = Option<String>, Query, description = "Time property on or before (same forms, inclusive)")), request_body(content = Object, description = "objectSet, where, aggregation (count, min, max, avg, sum, exactDistinct, approximateDistinct), groupBy (exact, fixedWidth, ranges, duration), accuracy", content_type = "application/json"), responses((status = 200, description = "Groups and metrics"), (status = 400, description = "Invalid input; the body names the field", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "The PolicyEngine denies the type", body = crate::openapi::ErrorBody)))]
pub(crate) async fn aggregate(
    State(state): State<AppState>,
    Path(ontology): Path<String>,
    RawQuery(raw): RawQuery,
    who: Principal,
    body: Bytes,
) -> Result<Response, ApiError> {
    crate::ontology::check_ontology(&ontology)?;
    let p = crate::params::params(raw, &["patientId", "dateFrom", "dateTo"])?;
    let narrow: Narrow = crate::params::narrow(&p)?;
    let (body, approximate_ok) = parse_body(&body)?;
    let (set, t) = crate::params::decode_set(&state, &body.object_set, body.where_.as_ref())?;
    check_sizes(&body)?;
    let metrics = parse_metrics(t, &body, approximate_ok)?;

    let (_, providers) = snapshot(&state, &set, None).await?;
    let mut planner = Planner::new(&state, &who, Action::Search, &providers);
    refuse_hidden_fields(&planner, t, &body)?;
    let groups = parse_groups(&planner, t, &body)?;
    let plan = aggregate_plan(&mut planner, t, &set, &narrow, &groups, &metrics)?;
    let batches = state.tables.collect(plan).await?;
    let total: usize = batches.iter().map(|b| b.num_rows()).sum();
    if total > MAX_GROUPS {
        return Err(bad(
            "AggregationGroupCountExceeded",
            "groupBy",
            "",
            format!("more than {MAX_GROUPS} groups; group more coarsely or filter the set"),
        ));
    }

    let out = write_answer(&body, &groups, &metrics, &batches, total);
    state.metrics.rows("aggregate", total as u64);
    // Groups and metrics hold no patient's rows as such: the record says
    // the patients are not counted (null), not that there were none.
    atlas_access::Egress::for_request().aggregates(total as u64);
    Ok(([(header::CONTENT_TYPE, "application/json")], out).into_response())
}

/// The request body, and whether it allows approximate metrics
/// (`accuracy`).
fn parse_body(body: &[u8]) -> Result<(AggregateBody, bool), ApiError> {
    let body: AggregateBody = serde_json::from_slice(body).map_err(|e| {
        bad(
            "InvalidRequestBody",
            "body",
            "",
            format!("the request body is not an aggregate request: {e}"),
        )
    })?;
    let approximate_ok = match body.accuracy.as_deref() {
        None | Some("ALLOW_APPROXIMATE") => true,
        Some("REQUIRE_ACCURATE") => false,
        Some(other) => {
            return Err(bad(
                "InvalidAggregation",
                "accuracy",
                other,
                "accuracy must be REQUIRE_ACCURATE or ALLOW_APPROXIMATE".to_owned(),
            ));
        }
    };
    Ok((body, approximate_ok))
}

/// From 1 to 100 metrics, at most 8 groupings.
fn check_sizes(body: &AggregateBody) -> Result<(), ApiError> {
    if body.aggregation.is_empty() || body.aggregation.len() > 100 {
        return Err(bad(
            "InvalidAggregation",
            "aggregation",
            &body.aggregation.len().to_string(),
            "give from 1 to 100 metrics".to_owned(),
        ));
    }
    if body.group_by.len() > 8 {
        return Err(bad(
            "InvalidAggregation",
            "groupBy",
            &body.group_by.len().to_string(),
            "at most 8 groupings".to_owned(),
        ));
    }
    Ok(())
}

/// The metrics asked for, each under its own name.
fn parse_metrics(
    t: &ObjectType,
    body: &AggregateBody,
    approximate_ok: bool,
) -> Result<Vec<Metric>, ApiError> {
    let metrics = body
        .aggregation
        .iter()
        .enumerate()
        .map(|(i, v)| metric(t, v, i, approximate_ok))
        .collect::<Result<Vec<_>, _>>()?;
    let mut names = std::collections::HashSet::new();
    for (i, m) in metrics.iter().enumerate() {
        if !names.insert(m.name.as_str()) {
            return Err(bad(
                "InvalidAggregation",
                &at(i, "aggregation", "name"),
                &m.name,
                format!("metric name '{}' is used twice", m.name),
            ));
        }
    }
    Ok(metrics)
}

/// Hidden properties may not be aggregated or grouped on: the planner
/// refuses them, and the error names the field.
fn refuse_hidden_fields<'a>(
    planner: &Planner<'a>,
    t: &'a ObjectType,
    body: &AggregateBody,
) -> Result<(), ApiError> {
    for (list, items) in [
        ("aggregation", &body.aggregation),
        ("groupBy", &body.group_by),
    ] {
        for (i, v) in items.iter().enumerate() {
            if let Some(f) = v.get("field").and_then(Json::as_str)
                && t.property(f).is_some()
            {
                planner.property_column(t, f).map_err(|mut e| {
                    e.parameter = at(i, list, "field");
                    e
                })?;
            }
        }
    }
    Ok(())
}

/// The groupings asked for, each property grouped once.
fn parse_groups(
    planner: &Planner<'_>,
    t: &ObjectType,
    body: &AggregateBody,
) -> Result<Vec<Group>, ApiError> {
    let groups = body
        .group_by
        .iter()
        .enumerate()
        .map(|(i, v)| group(planner, t, v, i))
        .collect::<Result<Vec<_>, _>>()?;
    let mut seen = std::collections::HashSet::new();
    for (i, g) in groups.iter().enumerate() {
        if !seen.insert(g.name.as_str()) {
            return Err(bad(
                "InvalidAggregation",
                &at(i, "groupBy", "field"),
                &g.name,
                format!("property '{}' is grouped twice", g.name),
            ));
        }
    }
    Ok(groups)
}

/// The plan: the set as the caller may read it, narrowed, without the rows
/// in no range of a `ranges` grouping; grouped (columns `g0`, `g1`, …) with
/// the metrics (`m0`, …), sorted by group and cut one past `MAX_GROUPS`.
fn aggregate_plan(
    planner: &mut Planner<'_>,
    t: &ObjectType,
    set: &ObjectSet,
    narrow: &Narrow,
    groups: &[Group],
    metrics: &[Metric],
) -> Result<LogicalPlan, ApiError> {
    let narrowed = planner
        .set_plan(set)?
        .filter(planner.narrow_expr(t, narrow)?)
        .map_err(internal)?;
    // Rows in no range of a `ranges` grouping are not in any group.
    let mut input = narrowed;
    for g in groups {
        if g.ranges.is_some() {
            input = input
                .filter(g.expr.clone().is_not_null())
                .map_err(internal)?;
        }
    }
    let group_exprs: Vec<Expr> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| g.expr.clone().alias(format!("g{i}")))
        .collect();
    let metric_exprs: Vec<Expr> = metrics
        .iter()
        .enumerate()
        .map(|(i, m)| m.expr.clone().alias(format!("m{i}")))
        .collect();
    let sort = (0..groups.len())
        .map(|i| column(&format!("g{i}")).sort(true, false))
        .collect::<Vec<_>>();
    let mut grouped = input
        .aggregate(group_exprs, metric_exprs)
        .map_err(internal)?;
    if !sort.is_empty() {
        grouped = grouped
            .sort(sort)
            .and_then(|b| b.limit(0, Some(MAX_GROUPS + 1)))
            .map_err(internal)?;
    }
    grouped.build().map_err(internal)
}

/// The answer: its accuracy, then one `{group, metrics}` per result row.
fn write_answer(
    body: &AggregateBody,
    groups: &[Group],
    metrics: &[Metric],
    batches: &[RecordBatch],
    total: usize,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + total * 64);
    out.extend_from_slice(b"{\"accuracy\":");
    write_str(
        &mut out,
        if body
            .aggregation
            .iter()
            .any(|a| a.get("type").and_then(Json::as_str) == Some("approximateDistinct"))
        {
            "APPROXIMATE"
        } else {
            "ACCURATE"
        },
    );
    out.extend_from_slice(b",\"excludedItems\":0,\"data\":[");
    let mut first = true;
    for b in batches {
        for row in 0..b.num_rows() {
            if !first {
                out.push(b',');
            }
            first = false;
            write_row(&mut out, groups, metrics, b, row);
        }
    }
    out.extend_from_slice(b"]}");
    out
}

/// One result row: `{"group":{…},"metrics":[…]}` (a `ranges` group as its
/// range's bounds).
fn write_row(out: &mut Vec<u8>, groups: &[Group], metrics: &[Metric], b: &RecordBatch, row: usize) {
    out.extend_from_slice(b"{\"group\":{");
    for (i, g) in groups.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_str(out, &g.name);
        out.push(b':');
        let a = b.column(i);
        match &g.ranges {
            Some(bounds) => {
                let idx =
                    arrow::array::AsArray::as_primitive::<arrow::datatypes::Int64Type>(a.as_ref())
                        .value(row);
                let (s, e) = bounds.get(idx as usize).cloned().unwrap_or_default();
                let pair = serde_json::json!({"startValue": s, "endValue": e});
                out.extend_from_slice(pair.to_string().as_bytes());
            }
            None => write_value(out, a.as_ref(), row),
        }
    }
    out.extend_from_slice(b"},\"metrics\":[");
    for (i, m) in metrics.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"name\":");
        write_str(out, &m.name);
        out.extend_from_slice(b",\"value\":");
        write_value(out, b.column(groups.len() + i).as_ref(), row);
        out.push(b'}');
    }
    out.extend_from_slice(b"]}");
}

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(aggregate))
}
