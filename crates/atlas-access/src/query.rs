//! Object sets run against the view tables: the policy scope first, then
//! the set's filters and links, then order, keyset paging and projection,
//! all as one DataFusion plan over the snapshot a page token names.
//!
//! Every table a query reads (the set's own type and each type a
//! `searchAround` passes through) is opened through [`Planner::scan`], which
//! asks the `PolicyEngine` and applies the row scope to the scan itself, so
//! no filter, order, count or link sees rows outside it.
//!
//! Filters are two-valued: a comparison with a null property is false (not
//! unknown), so `not` and `subtract` return exactly the complement.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Not;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Decimal128Type, Int64Type, Schema};
use datafusion::catalog::TableProvider;
use datafusion::common::{Column, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::{Expr, LogicalPlan, LogicalPlanBuilder, in_subquery, lit};
use http::StatusCode;
use serde_json::{Value as Json, json};

use atlas_objectset::{CompareOp, ObjectSet, Value, Where};
use atlas_ontology::{ObjectType, Ontology};
use atlas_policy::{Action, Decision, Grant, Principal, RowScope};

use crate::Egress;
use crate::token::digest;
use crate::{Access, AccessError};

/// Narrowing parameters (`patientId`, `dateFrom`, `dateTo`), applied to the
/// set before paging.
#[derive(Debug, Clone, Default)]
pub struct Narrow {
    pub patient: Option<String>,
    /// `YYYY`, `YYYY-MM` or `YYYY-MM-DD`, inclusive.
    pub date_from: Option<String>,
    pub date_to: Option<String>,
}

#[derive(Debug, Clone)]
pub struct OrderField {
    pub property: String,
    pub ascending: bool,
}

/// A query over an object set, checked against the ontology.
#[derive(Debug, Clone)]
pub struct Query {
    pub set: ObjectSet,
    pub order: Vec<OrderField>,
    /// Properties to return (`None`: all).
    pub select: Option<Vec<String>>,
    pub narrow: Narrow,
    pub action: Action,
}

/// Which page to return.
#[derive(Debug, Clone)]
pub struct PageRequest {
    pub size: usize,
    pub token: Option<String>,
    pub total: bool,
}

/// One page of objects, already as JSON text.
pub struct Page {
    /// `[{...},{...}]`
    pub data: Vec<u8>,
    pub rows: usize,
    pub next: Option<String>,
    pub total: Option<usize>,
}

impl Query {
    /// The normalised request a page token binds (page size excluded: a
    /// client may change it between pages).
    fn normalised(&self) -> String {
        json!({
            "objectSet": self.set.to_json(),
            "orderBy": self.order.iter().map(|o| json!([o.property, o.ascending])).collect::<Vec<_>>(),
            "select": self.select,
            "patientId": self.narrow.patient,
            "dateFrom": self.narrow.date_from,
            "dateTo": self.narrow.date_to,
            "action": self.action.as_str(),
        })
        .to_string()
    }
}

/// [`AccessError::internal`], as a function to hand to `map_err`.
pub fn internal(e: impl std::fmt::Display) -> AccessError {
    AccessError::internal(e)
}

/// [`AccessError::bad`].
pub fn bad(name: &'static str, parameter: &str, value: &str, message: String) -> AccessError {
    AccessError::bad(name, parameter, value, message)
}

pub fn column(name: &str) -> Expr {
    Expr::Column(Column::new_unqualified(name))
}

/// The FHIR resource type behind an object type (the backing view's
/// `resource`), which is what scopes and policies name.
pub fn resource_type(t: &ObjectType) -> String {
    atlas_ontology::builtin_view(&t.backing_view)
        .and_then(|v| {
            v.json_value()
                .get("resource")
                .and_then(Json::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| t.api_name.clone())
}

fn types_of(set: &ObjectSet, out: &mut BTreeSet<String>) {
    out.insert(set.object_type().to_owned());
    match set {
        ObjectSet::Filter { set, .. } | ObjectSet::SearchAround { set, .. } => types_of(set, out),
        ObjectSet::Union(s) | ObjectSet::Intersect(s) | ObjectSet::Subtract(s) => {
            s.iter().for_each(|x| types_of(x, out))
        }
        ObjectSet::Base { .. } | ObjectSet::Static { .. } | ObjectSet::Reference { .. } => {}
    }
}

/// The access decision as the API answers it: what `who` may read of
/// `resource_type` (rows, hidden fields), or a 403 naming `at` (the
/// parameter and value the request used for the type) with the engine's
/// reason.
pub fn allowed_rows(
    state: &Access,
    who: &Principal,
    resource_type: &str,
    action: Action,
    at: (&str, &str),
) -> Result<Grant, AccessError> {
    let grant = allowed_resources(state, who, resource_type, action, at)?;
    if grant.deid.is_some() {
        // Rows carry identified columns (names, dates, ids): a grant that
        // reads de-identified data reads FHIR search results only.
        return Err(crate::deid::refused(
            at.0,
            at.1,
            "this path returns identified values; use FHIR search (/fhir/{type}?code=…)",
        ));
    }
    Ok(grant)
}

/// [`allowed_rows`] for the paths that send whole FHIR resources through
/// the de-identifier (FHIR search and its NDJSON stream): de-identifying
/// grants pass.
pub fn allowed_resources(
    state: &Access,
    who: &Principal,
    resource_type: &str,
    action: Action,
    at: (&str, &str),
) -> Result<Grant, AccessError> {
    match state.decide(who, resource_type, action) {
        Decision::Allow(grant) => Ok(grant),
        // The client learns that it was refused, not which rule refused it
        // or what would pass: the reason goes to the log and the audit
        // record (noted by `decide`); `atlas policy explain` explains.
        Decision::Deny(d) => {
            tracing::info!(reason = %crate::facts::redact(&d.to_string()), "request refused: 403");
            Err(AccessError::new(
                StatusCode::FORBIDDEN,
                "PermissionDenied",
                at.0,
                at.1,
                format!("this request may not read {resource_type}"),
            ))
        }
    }
}

/// The rows of a patient-bound scope: `col` (a patient key column) is one
/// of `patients`.
pub fn in_patients(col: &str, patients: &[String]) -> Expr {
    if patients.is_empty() {
        return lit(false);
    }
    let c = column(col);
    let list = patients.iter().map(|p| lit(p.as_str())).collect();
    c.clone().is_not_null().and(c.in_list(list, false))
}

/// A row scope as a predicate over `col` (a patient key column; `None`
/// when the table has none): every path turns a [`RowScope`] into a filter
/// here (object sets, FHIR, view streams). `Ok(None)`: every row. `Err`
/// carries the patients of a scope the table cannot honour.
pub fn scope_predicate(col: Option<&str>, scope: &RowScope) -> Result<Option<Expr>, String> {
    match (scope, col) {
        (RowScope::All, _) => Ok(None),
        (RowScope::Patients(ps), Some(c)) => Ok(Some(in_patients(c, ps))),
        (RowScope::Except(ps), Some(c)) => {
            let cc = column(c);
            let list = ps.iter().map(|p| lit(p.as_str())).collect();
            Ok(Some(cc.clone().is_null().or(cc.in_list(list, true))))
        }
        (RowScope::Patients(ps), None) => Err(if ps.is_empty() {
            "no patients".to_owned()
        } else {
            ps.join(", ")
        }),
        // Rows that belong to no patient are outside every patient set.
        (RowScope::Except(_), None) => Ok(None),
    }
}

/// Builds the plan of one query; every scan goes through the policy.
pub struct Planner<'a> {
    pub state: &'a Access,
    pub who: &'a Principal,
    pub action: Action,
    pub providers: &'a Providers,
    aliases: usize,
    /// The decision per object type, made once per request.
    grants: std::sync::Mutex<HashMap<String, Grant>>,
    /// The plan only selects which FHIR resources a search returns (its
    /// view values never leave): de-identifying grants may use it.
    selects_resources: bool,
}

impl<'a> Planner<'a> {
    pub fn new(
        state: &'a Access,
        who: &'a Principal,
        action: Action,
        providers: &'a Providers,
    ) -> Planner<'a> {
        Planner {
            state,
            who,
            action,
            providers,
            aliases: 0,
            grants: Default::default(),
            selects_resources: false,
        }
    }

    /// A planner for FHIR search filters (`code`, `status`, `date`): its
    /// scans pick resources whose stored JSON is what leaves (de-identified
    /// when the grant says so), so a de-identifying grant is not refused.
    pub fn for_resource_filters(mut self) -> Planner<'a> {
        self.selects_resources = true;
        self
    }

    fn ontology(&self) -> &'a Ontology {
        &self.state.ontology
    }

    fn object_type(&self, name: &str) -> Result<&'a ObjectType, AccessError> {
        crate::object_type(&self.state.ontology, name)
    }

    fn provider(&self, t: &ObjectType) -> Result<&'a Arc<dyn TableProvider>, AccessError> {
        self.providers
            .get(&t.backing_view)
            .ok_or_else(|| internal(format!("view {} was not opened", t.backing_view)))
    }

    /// The `PolicyEngine`'s decision for this principal on `t`: its grant
    /// (rows, hidden fields), or a 403. Asked once per type per request.
    pub fn scope(&self, t: &ObjectType) -> Result<Grant, AccessError> {
        if let Ok(g) = self.grants.lock()
            && let Some(x) = g.get(&t.api_name)
        {
            return Ok(x.clone());
        }
        let check = if self.selects_resources {
            allowed_resources
        } else {
            allowed_rows
        };
        let grant = check(
            self.state,
            self.who,
            &resource_type(t),
            self.action,
            ("objectType", &t.api_name),
        )?;
        if let Ok(mut g) = self.grants.lock() {
            g.insert(t.api_name.clone(), grant.clone());
        }
        Ok(grant)
    }

    /// The properties of `t` this principal's grant hides.
    pub fn hidden(&self, t: &ObjectType) -> Result<BTreeSet<String>, AccessError> {
        Ok(crate::policy::hidden_properties(t, &self.scope(t)?))
    }

    /// The object type's rows this principal may read, as a predicate over
    /// the type's columns: the access seam. `scan` applies it to the scan;
    /// the one-patient slice path evaluates the same predicate.
    pub fn scope_expr(&self, t: &ObjectType) -> Result<Expr, AccessError> {
        let grant = self.scope(t)?;
        let pcol = t
            .patient_property
            .as_deref()
            .and_then(|p| t.property(p))
            .map(|p| p.column.as_str());
        match scope_predicate(pcol, &grant.rows) {
            Ok(None) => Ok(lit(true)),
            Ok(Some(e)) => Ok(e),
            Err(patients) => Err(AccessError::new(
                StatusCode::FORBIDDEN,
                "PermissionDenied",
                "objectType",
                &t.api_name,
                format!(
                    "{} objects belong to no patient compartment, and this token only sees {patients}",
                    t.api_name
                ),
            )),
        }
    }

    /// The object type's rows this principal may read: the access seam.
    pub fn scan(&mut self, t: &ObjectType) -> Result<LogicalPlanBuilder, AccessError> {
        let scope = self.scope_expr(t)?;
        self.aliases += 1;
        let alias = format!("{}_{}", t.backing_view, self.aliases);
        let source = provider_as_source(self.provider(t)?.clone());
        let scan = LogicalPlanBuilder::scan(alias, source, None).map_err(internal)?;
        if scope == lit(true) {
            Ok(scan)
        } else {
            scan.filter(scope).map_err(internal)
        }
    }

    /// The set's objects: the scoped scan of its type, filtered by the set.
    pub fn set_plan(&mut self, set: &ObjectSet) -> Result<LogicalPlanBuilder, AccessError> {
        let t = self.object_type(set.object_type())?;
        let scan = self.scan(t)?;
        let pred = self.predicate(set, t)?;
        scan.filter(pred).map_err(internal)
    }

    /// A two-valued predicate over `t`'s columns selecting the set's objects.
    pub fn predicate(&mut self, set: &ObjectSet, t: &ObjectType) -> Result<Expr, AccessError> {
        Ok(match set {
            ObjectSet::Base { .. } | ObjectSet::Reference { .. } => lit(true),
            ObjectSet::Static { primary_keys, .. } => {
                let pk = self.key_column(t, &t.primary_key)?;
                let keys = primary_keys.iter().map(|k| lit(k.as_str())).collect();
                column(pk)
                    .is_not_null()
                    .and(column(pk).in_list(keys, false))
            }
            ObjectSet::Filter { set, filter } => {
                let inner = self.predicate(set, t)?;
                inner.and(self.where_expr(t, filter)?)
            }
            ObjectSet::Union(sets) => {
                let mut acc = lit(false);
                for s in sets {
                    acc = acc.or(self.predicate(s, t)?);
                }
                acc
            }
            ObjectSet::Intersect(sets) => {
                let mut acc = lit(true);
                for s in sets {
                    acc = acc.and(self.predicate(s, t)?);
                }
                acc
            }
            ObjectSet::Subtract(sets) => {
                let mut it = sets.iter();
                let mut acc = match it.next() {
                    Some(first) => self.predicate(first, t)?,
                    None => lit(false),
                };
                for s in it {
                    acc = acc.and(self.predicate(s, t)?.not());
                }
                acc
            }
            ObjectSet::SearchAround { set, link, .. } => {
                let source = self.object_type(set.object_type())?;
                let (source_prop, target_prop) = self.link_sides(source, link)?;
                let source_col = self.property_column(source, source_prop)?.to_owned();
                let target_col = self.property_column(t, target_prop)?.to_owned();
                let inner = self
                    .set_plan(set)?
                    .filter(column(&source_col).is_not_null())
                    .and_then(|b| b.project(vec![column(&source_col)]))
                    .and_then(|b| b.build())
                    .map_err(internal)?;
                column(&target_col)
                    .is_not_null()
                    .and(in_subquery(column(&target_col), Arc::new(inner)))
            }
        })
    }

    /// (source property, target property) of `link` navigated from `source`.
    fn link_sides(
        &self,
        source: &'a ObjectType,
        link: &str,
    ) -> Result<(&'a str, &'a str), AccessError> {
        let o = self.ontology();
        if let Some(l) = o.links_from(&source.api_name).find(|l| l.api_name == link) {
            return Ok((&l.from_property, &l.to_property));
        }
        if let Some(l) = o
            .links_to(&source.api_name)
            .find(|l| l.reverse_api_name == link)
        {
            return Ok((&l.to_property, &l.from_property));
        }
        Err(bad(
            "LinkTypeNotFound",
            "link",
            link,
            format!("object type '{}' has no link '{link}'", source.api_name),
        ))
    }

    /// The column of a property a request names (in a filter, sort,
    /// selection, narrowing or link): refused when the grant hides it.
    pub fn property_column(
        &self,
        t: &'a ObjectType,
        property: &str,
    ) -> Result<&'a str, AccessError> {
        let grant = self.scope(t)?;
        if !grant.hidden.is_empty()
            && crate::policy::hidden_properties(t, &grant).contains(property)
        {
            return Err(AccessError::new(
                StatusCode::FORBIDDEN,
                "PropertyHidden",
                "property",
                property,
                // Which other elements are hidden is the policy's business:
                // the audit and the log have the list, the caller does not.
                {
                    let hidden = grant.hidden.join(", ");
                    crate::facts::note(|f| {
                        f.reason = Some(format!("hidden elements: {hidden}"));
                    });
                    format!(
                        "property '{property}' of {} is hidden from this principal by policy",
                        t.api_name
                    )
                },
            ));
        }
        self.key_column(t, property)
    }

    /// The properties a response carries: the selection (each checked
    /// like a filter's field) or every property (see `Egress::objects`).
    pub fn output_properties(
        &self,
        t: &'a ObjectType,
        select: Option<&[String]>,
    ) -> Result<Vec<&'a atlas_ontology::Property>, AccessError> {
        match select {
            Some(sel) => {
                let mut out = Vec::with_capacity(sel.len());
                for p in sel {
                    self.property_column(t, p)?;
                    out.extend(t.property(p));
                }
                Ok(out)
            }
            // Every property: what the grant hides is removed where the
            // answer leaves (`Egress`), the one place that does it.
            None => {
                self.scope(t)?;
                Ok(t.properties.iter().collect())
            }
        }
    }

    /// The time property's column for a default ordering, unless the grant
    /// hides it (then the order must not depend on it).
    pub fn time_sort_column(&self, t: &'a ObjectType) -> Result<Option<&'a str>, AccessError> {
        match t.time_property.as_deref() {
            Some(tp) if !self.hidden(t)?.contains(tp) => Ok(Some(self.key_column(t, tp)?)),
            _ => Ok(None),
        }
    }

    /// The column shown as an object's title: the title property, or the
    /// primary key when the grant hides the title.
    pub fn title_column(&self, t: &'a ObjectType) -> Result<&'a str, AccessError> {
        if self.hidden(t)?.contains(&t.title_property) {
            self.key_column(t, &t.primary_key)
        } else {
            self.key_column(t, &t.title_property)
        }
    }

    /// The column of a property the server itself uses (primary key,
    /// title, patient key): not subject to hiding.
    pub fn key_column(&self, t: &'a ObjectType, property: &str) -> Result<&'a str, AccessError> {
        t.property(property)
            .map(|p| p.column.as_str())
            .ok_or_else(|| {
                bad(
                    "PropertyNotFound",
                    "property",
                    property,
                    format!("object type '{}' has no property '{property}'", t.api_name),
                )
            })
    }

    pub fn column_type(&self, t: &ObjectType, col: &str) -> Result<DataType, AccessError> {
        let schema = self.provider(t)?.schema();
        schema
            .field_with_name(col)
            .map(|f| f.data_type().clone())
            .map_err(|_| internal(format!("view {} has no column {col}", t.backing_view)))
    }

    pub fn literal(
        &self,
        t: &ObjectType,
        field: &str,
        v: &Value,
    ) -> Result<(Expr, Expr), AccessError> {
        let col = self.property_column(t, field)?;
        let ty = self.column_type(t, col)?;
        let scalar = value_scalar(v, &ty).ok_or_else(|| {
            bad(
                "InvalidFilterValue",
                field,
                &v.to_json().to_string(),
                format!(
                    "{} cannot be compared with property '{field}' ({ty})",
                    v.to_json()
                ),
            )
        })?;
        Ok((column(col), lit(scalar)))
    }

    /// The filter as a two-valued predicate: null properties never match.
    fn where_expr(&self, t: &ObjectType, w: &Where) -> Result<Expr, AccessError> {
        Ok(match w {
            Where::Compare { op, field, value } => {
                let (c, v) = self.literal(t, field, value)?;
                let cmp = match op {
                    CompareOp::Eq => c.clone().eq(v),
                    CompareOp::Gt => c.clone().gt(v),
                    CompareOp::Gte => c.clone().gt_eq(v),
                    CompareOp::Lt => c.clone().lt(v),
                    CompareOp::Lte => c.clone().lt_eq(v),
                };
                c.is_not_null().and(cmp)
            }
            Where::IsNull { field, is_null } => {
                let c = column(self.property_column(t, field)?);
                if *is_null {
                    c.is_null()
                } else {
                    c.is_not_null()
                }
            }
            Where::In { field, values } => {
                let mut list = Vec::with_capacity(values.len());
                let mut c = lit(true);
                for v in values {
                    let (col, l) = self.literal(t, field, v)?;
                    c = col;
                    list.push(l);
                }
                if list.is_empty() {
                    lit(false)
                } else {
                    c.clone().is_not_null().and(c.in_list(list, false))
                }
            }
            Where::Contains { field, value } => {
                let c = column(self.property_column(t, field)?);
                c.clone()
                    .is_not_null()
                    .and(datafusion::functions::string::expr_fn::contains(
                        c,
                        lit(value.as_str()),
                    ))
            }
            Where::StartsWith { field, value } => {
                let c = column(self.property_column(t, field)?);
                c.clone()
                    .is_not_null()
                    .and(datafusion::functions::string::expr_fn::starts_with(
                        c,
                        lit(value.as_str()),
                    ))
            }
            Where::ContainsTerms { all, field, terms } => {
                let c = column(self.property_column(t, field)?);
                let matches = |term: &str| {
                    datafusion::functions::regex::expr_fn::regexp_like(
                        c.clone(),
                        lit(format!(r"(?i)(^|\s){}($|\s)", regex_escape(term))),
                        None,
                    )
                };
                let mut acc = if *all { lit(true) } else { lit(false) };
                for term in terms {
                    acc = if *all {
                        acc.and(matches(term))
                    } else {
                        acc.or(matches(term))
                    };
                }
                if terms.is_empty() {
                    lit(false)
                } else {
                    c.is_not_null().and(acc)
                }
            }
            Where::And(ws) => {
                let mut acc = lit(true);
                for w in ws {
                    acc = acc.and(self.where_expr(t, w)?);
                }
                acc
            }
            Where::Or(ws) => {
                let mut acc = lit(false);
                for w in ws {
                    acc = acc.or(self.where_expr(t, w)?);
                }
                acc
            }
            Where::Not(w) => self.where_expr(t, w)?.not(),
        })
    }

    /// `patientId`, `dateFrom`, `dateTo` as a predicate over `t`.
    pub fn narrow_expr(&self, t: &ObjectType, n: &Narrow) -> Result<Expr, AccessError> {
        let mut acc = lit(true);
        if let Some(p) = &n.patient {
            let Some(pp) = t.patient_property.as_deref() else {
                return Err(bad(
                    "InvalidParameter",
                    "patientId",
                    p,
                    format!("{} objects do not belong to a patient", t.api_name),
                ));
            };
            let c = column(self.key_column(t, pp)?);
            acc = acc.and(c.clone().is_not_null().and(c.eq(lit(p.as_str()))));
        }
        for (param, value, from) in [
            ("dateFrom", &n.date_from, true),
            ("dateTo", &n.date_to, false),
        ] {
            let Some(v) = value else { continue };
            let Some(tp) = t.time_property.as_deref() else {
                return Err(bad(
                    "InvalidParameter",
                    param,
                    v,
                    format!("{} objects have no time property to filter on", t.api_name),
                ));
            };
            let c = column(self.property_column(t, tp)?);
            // Dates are FHIR text: compare the value's prefix of the same
            // precision, so dateTo=2020-12 includes all of December and a
            // time of day never falls outside its own date.
            let prefix =
                datafusion::functions::unicode::expr_fn::left(c.clone(), lit(v.len() as i64));
            let cmp = if from {
                prefix.gt_eq(lit(v.as_str()))
            } else {
                prefix.lt_eq(lit(v.as_str()))
            };
            acc = acc.and(c.is_not_null().and(cmp));
        }
        Ok(acc)
    }
}

/// Escapes regex metacharacters (the regex crate accepts `\` before any
/// ASCII punctuation).
fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    for ch in s.chars() {
        if ch.is_ascii_punctuation() {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

/// A filter value as a scalar of the column's type; `None` when they do not fit.
pub fn value_scalar(v: &Value, ty: &DataType) -> Option<ScalarValue> {
    match (v, ty) {
        (
            Value::Str(s) | Value::Date(s) | Value::Timestamp(s),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View,
        ) => Some(ScalarValue::Utf8(Some(s.clone()))),
        (Value::Bool(b), DataType::Boolean) => Some(ScalarValue::Boolean(Some(*b))),
        (Value::Int(i), DataType::Int64) => Some(ScalarValue::Int64(Some(*i))),
        (Value::Decimal(s), DataType::Decimal128(p, sc)) => {
            arrow::compute::kernels::cast_utils::parse_decimal::<Decimal128Type>(s, *p, *sc)
                .ok()
                .map(|x| ScalarValue::Decimal128(Some(x), *p, *sc))
        }
        (Value::Int(i), DataType::Decimal128(p, sc)) => {
            arrow::compute::kernels::cast_utils::parse_decimal::<Decimal128Type>(
                &i.to_string(),
                *p,
                *sc,
            )
            .ok()
            .map(|x| ScalarValue::Decimal128(Some(x), *p, *sc))
        }
        _ => None,
    }
}

/// A key value for a page token: exact (decimals as their unscaled integer).
pub fn key_json(a: &dyn Array, row: usize) -> Json {
    if a.is_null(row) {
        return Json::Null;
    }
    match a.data_type() {
        DataType::Utf8 => Json::from(a.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Json::from(a.as_string::<i64>().value(row)),
        DataType::Utf8View => Json::from(a.as_string_view().value(row)),
        DataType::Boolean => Json::from(a.as_boolean().value(row)),
        DataType::Int64 => Json::from(a.as_primitive::<Int64Type>().value(row)),
        DataType::Decimal128(..) => {
            Json::from(a.as_primitive::<Decimal128Type>().value(row).to_string())
        }
        DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, _) => Json::from(
            a.as_primitive::<arrow::datatypes::TimestampMicrosecondType>()
                .value(row),
        ),
        _ => Json::Null,
    }
}

fn key_scalar(j: &Json, ty: &DataType) -> Option<ScalarValue> {
    Some(match (j, ty) {
        (Json::Null, _) => ScalarValue::try_from(ty).ok()?,
        (Json::String(s), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
            ScalarValue::Utf8(Some(s.clone()))
        }
        (Json::Bool(b), DataType::Boolean) => ScalarValue::Boolean(Some(*b)),
        (Json::Number(n), DataType::Int64) => ScalarValue::Int64(Some(n.as_i64()?)),
        (Json::String(s), DataType::Decimal128(p, sc)) => {
            ScalarValue::Decimal128(Some(s.parse().ok()?), *p, *sc)
        }
        (Json::Number(n), DataType::Timestamp(arrow::datatypes::TimeUnit::Microsecond, tz)) => {
            ScalarValue::TimestampMicrosecond(Some(n.as_i64()?), tz.clone())
        }
        _ => return None,
    })
}

/// The plan's sort for `keys` (nulls last in both directions, as keyset
/// paging assumes).
pub fn sort_exprs(keys: &[(String, bool, DataType)]) -> Vec<datafusion::logical_expr::SortExpr> {
    keys.iter()
        .map(|(c, asc, _)| column(c).sort(*asc, false))
        .collect()
}

/// Keyset paging: rows strictly after `after` in the order of `keys`
/// (nulls last in both directions).
pub fn after_expr(keys: &[(String, bool, DataType)], after: &[Json]) -> Option<Expr> {
    if after.len() != keys.len() {
        return None;
    }
    let mut any = lit(false);
    for i in 0..keys.len() {
        let mut all = lit(true);
        for j in 0..i {
            let (name, _, ty) = &keys[j];
            let v = key_scalar(&after[j], ty)?;
            all = all.and(if v.is_null() {
                column(name).is_null()
            } else {
                column(name).eq(lit(v))
            });
        }
        let (name, asc, ty) = &keys[i];
        let v = key_scalar(&after[i], ty)?;
        if v.is_null() {
            continue; // nothing sorts after a null (nulls last)
        }
        let c = column(name);
        let beyond = if *asc {
            c.clone().gt(lit(v))
        } else {
            c.clone().lt(lit(v))
        };
        any = any.or(all.and(beyond.or(c.is_null())));
    }
    Some(any)
}

/// The table versions a set reads (the pinned ones of a page token, or the
/// latest) and a provider for each.
pub async fn snapshot(
    state: &Access,
    set: &ObjectSet,
    pinned: Option<&BTreeMap<String, u64>>,
) -> Result<(BTreeMap<String, u64>, Providers), AccessError> {
    let mut types = BTreeSet::new();
    types_of(set, &mut types);
    let mut versions = BTreeMap::new();
    let mut providers = HashMap::new();
    for name in &types {
        let t = crate::object_type(&state.ontology, name)?;
        let view = &t.backing_view;
        if versions.contains_key(view) {
            continue;
        }
        let dir = atlas_viewstore::view_table_dir(view);
        let version = match pinned {
            Some(p) => *p.get(view).ok_or_else(|| {
                bad(
                    "PageTokenMismatch",
                    "pageToken",
                    "…",
                    "the page token does not cover this request's tables".into(),
                )
            })?,
            None => state.tables.latest_version(&dir).await?,
        };
        providers.insert(view.clone(), state.tables.provider(&dir, version).await?);
        versions.insert(view.clone(), version);
    }
    Ok((versions, providers))
}

pub type Providers = HashMap<String, Arc<dyn TableProvider>>;

/// A lookup by key that found nothing within the caller's rows: when a row
/// with that key exists all the same (`table` scanned with `key`, no
/// scope), the audit record marks it as out of scope. The answer does not
/// change (the same 404 as for a missing key); only the record says more.
pub async fn note_if_out_of_scope(
    state: &Access,
    table: &Arc<dyn TableProvider>,
    key: Expr,
    what: &str,
) {
    let plan = LogicalPlanBuilder::scan("unscoped", provider_as_source(table.clone()), None)
        // No LIMIT: a key that exists costs what a missing one does, so
        // the time of the 404 does not tell them apart.
        .and_then(|b| b.filter(key))
        .and_then(|b| b.build());
    let Ok(plan) = plan else { return };
    let found = DataFrame::new(state.tables.session().state(), plan)
        .count()
        .await
        .unwrap_or(0);
    if found > 0 {
        crate::facts::note(|f| {
            f.out_of_scope = true;
            f.reason = Some(format!(
                "{what} exists outside the caller's rows (answered 404)"
            ));
        });
    }
}

/// Runs one page of a query for `who`.
pub async fn run(
    state: &Access,
    who: &Principal,
    q: &Query,
    page: &PageRequest,
) -> Result<Page, AccessError> {
    let request = digest(&q.normalised());
    let token = match &page.token {
        Some(t) => Some(state.page_tokens.read(t, &who.key(), &request)?),
        None => None,
    };
    let (versions, providers) = snapshot(state, &q.set, token.as_ref().map(|t| &t.t)).await?;
    let t = crate::object_type(&state.ontology, q.set.object_type())?;
    let mut planner = Planner::new(state, who, q.action, &providers);
    // Sort keys: the requested fields, then the primary key (a total order).
    let mut keys: Vec<(String, bool, DataType)> = Vec::new();
    for o in &q.order {
        let c = planner.property_column(t, &o.property)?;
        keys.push((c.to_owned(), o.ascending, planner.column_type(t, c)?));
    }
    let pk = planner.key_column(t, &t.primary_key)?.to_owned();
    if !keys.iter().any(|k| k.0 == pk) {
        keys.push((pk.clone(), true, planner.column_type(t, &pk)?));
    }

    let after = match &token {
        Some(tok) => Some(after_expr(&keys, &tok.a).ok_or_else(|| {
            bad(
                "InvalidPageToken",
                "pageToken",
                "…",
                "the page token's position does not fit this request".into(),
            )
        })?),
        None => None,
    };
    let props = planner.output_properties(t, q.select.as_deref())?;
    let mut cols: Vec<String> = props.iter().map(|p| p.column.clone()).collect();
    let title = planner.title_column(t)?.to_owned();
    // The patient key comes along for the audit record's patients.
    let pcol = match t.patient_property.as_deref() {
        Some(p) => Some(planner.key_column(t, p)?.to_owned()),
        None => None,
    };
    for extra in keys
        .iter()
        .map(|k| &k.0)
        .chain([&pk, &title])
        .chain(pcol.as_ref())
    {
        if !cols.contains(extra) {
            cols.push(extra.clone());
        }
    }
    let sliced = match slice_patient(&planner, t, q)? {
        Some(p) if state.settings.slice_reads => {
            slice_rows(state, &planner, t, &versions, &p).await?
        }
        _ => None,
    };
    if sliced.is_some() {
        state
            .counters
            .slice_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    let (batches, total) = match sliced {
        // One patient's rows, prefetched: the same predicates, evaluated
        // on them instead of planned over the table.
        Some(rows) => {
            let pred = planner
                .scope_expr(t)?
                .and(planner.predicate(&q.set, t)?)
                .and(planner.narrow_expr(t, &q.narrow)?);
            let rows = filter_rows(state, &rows, pred)?;
            let total = page.total.then_some(rows.num_rows());
            let rows = match after {
                Some(a) => filter_rows(state, &rows, a)?,
                None => rows,
            };
            (vec![sort_rows(&rows, &keys, page.size + 1)?], total)
        }
        None => {
            let narrowed = planner
                .set_plan(&q.set)?
                .filter(planner.narrow_expr(t, &q.narrow)?)
                .map_err(internal)?;
            let total = if page.total {
                let plan = narrowed.clone().build().map_err(internal)?;
                let df = DataFrame::new(state.tables.session().state(), plan);
                Some(df.count().await.map_err(internal)?)
            } else {
                None
            };
            let mut paged = narrowed;
            if let Some(a) = after {
                paged = paged.filter(a).map_err(internal)?;
            }
            let plan: LogicalPlan = paged
                .sort(sort_exprs(&keys))
                .and_then(|b| b.limit(0, Some(page.size + 1)))
                .and_then(|b| b.project(cols.iter().map(|c| column(c))))
                .and_then(|b| b.build())
                .map_err(internal)?;
            let batches = state.tables.collect(plan).await?;
            (batches, total)
        }
    };

    let release = Egress::for_request().objects(t, &planner.scope(t)?, props)?;
    let mut out = Vec::with_capacity(page.size * 256);
    out.push(b'[');
    let mut rows = 0usize;
    let mut last_key: Option<Vec<Json>> = None;
    let mut more = false;
    'batches: for b in &batches {
        let writer = release.batch(b, &pk, &title);
        for row in 0..b.num_rows() {
            if rows == page.size {
                more = true;
                break 'batches;
            }
            if rows > 0 {
                out.push(b',');
            }
            writer.write(&mut out, b, row);
            rows += 1;
            last_key = Some(
                keys.iter()
                    .map(|(c, _, _)| {
                        b.column_by_name(c)
                            .map_or(Json::Null, |a| key_json(a.as_ref(), row))
                    })
                    .collect(),
            );
        }
    }
    out.push(b']');
    let next = match (more, last_key) {
        (true, Some(after)) => Some(
            state
                .page_tokens
                .issue(&who.key(), &request, versions, after),
        ),
        _ => None,
    };
    Ok(Page {
        data: out,
        rows,
        next,
        total,
    })
}

/// The patient a query reads only the rows of, when it can take the slice
/// path: a set over one object type with a patient property, no
/// `searchAround`, and a `patientId` narrowing (or a token bound to one
/// patient).
fn slice_patient(
    planner: &Planner<'_>,
    t: &ObjectType,
    q: &Query,
) -> Result<Option<String>, AccessError> {
    fn linked(set: &ObjectSet) -> bool {
        match set {
            ObjectSet::SearchAround { .. } => true,
            ObjectSet::Filter { set, .. } => linked(set),
            ObjectSet::Union(s) | ObjectSet::Intersect(s) | ObjectSet::Subtract(s) => {
                s.iter().any(linked)
            }
            ObjectSet::Base { .. } | ObjectSet::Static { .. } | ObjectSet::Reference { .. } => {
                false
            }
        }
    }
    if t.patient_property.is_none() || linked(&q.set) {
        return Ok(None);
    }
    if let Some(p) = &q.narrow.patient {
        return Ok(Some(p.clone()));
    }
    Ok(match planner.scope(t)?.rows {
        RowScope::Patients(p) if p.len() == 1 => p.into_iter().next(),
        _ => None,
    })
}

/// Every live row of `t`'s view whose patient column is `patient`, from the
/// slice index of the snapshot in `versions`; `None` when the table cannot
/// be sliced or its files' schema is not the provider's.
async fn slice_rows(
    state: &Access,
    planner: &Planner<'_>,
    t: &ObjectType,
    versions: &BTreeMap<String, u64>,
    patient: &str,
) -> Result<Option<RecordBatch>, AccessError> {
    let view = &t.backing_view;
    let Some(&version) = versions.get(view) else {
        return Ok(None);
    };
    let Some(pp) = t.patient_property.as_deref() else {
        return Ok(None);
    };
    let pcol = planner.key_column(t, pp)?;
    let index = state
        .tables
        .slice_index(&atlas_viewstore::view_table_dir(view), version)
        .await?;
    let Ok(index) = index.as_ref() else {
        return Ok(None);
    };
    // The provider's schema is what every expression was typed against;
    // files store strings as Utf8 where the provider reads views, and any
    // other difference sends the query down the planned path.
    let provider = planner.provider(t)?.schema();
    let string =
        |d: &DataType| matches!(d, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View);
    let fits = provider.fields().len() == index.schema().fields().len()
        && provider
            .fields()
            .iter()
            .zip(index.schema().fields())
            .all(|(x, y)| {
                x.name() == y.name()
                    && (x.data_type() == y.data_type()
                        || (string(x.data_type()) && string(y.data_type())))
            });
    if !fits {
        return Ok(None);
    }
    let Some(rows) = index.read(pcol, patient).await.map_err(internal)? else {
        return Ok(None);
    };
    let columns = rows
        .columns()
        .iter()
        .zip(provider.fields())
        .map(|(c, f)| arrow::compute::cast(c, f.data_type()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(internal)?;
    RecordBatch::try_new(provider.clone(), columns)
        .map(Some)
        .map_err(internal)
}

/// The rows of `batch` for which `pred` is true (null counts as false, as
/// in a plan's filter).
fn filter_rows(
    state: &Access,
    batch: &RecordBatch,
    pred: Expr,
) -> Result<RecordBatch, AccessError> {
    let schema = datafusion::common::DFSchema::try_from(batch.schema().as_ref().clone())
        .map_err(internal)?;
    let phys = state
        .tables
        .session()
        .create_physical_expr(pred, &schema)
        .map_err(internal)?;
    let mask = phys
        .evaluate(batch)
        .and_then(|v| v.into_array(batch.num_rows()))
        .map_err(internal)?;
    let mask = mask
        .as_boolean_opt()
        .ok_or_else(|| internal("a filter did not evaluate to booleans"))?;
    arrow::compute::filter_record_batch(batch, mask).map_err(internal)
}

/// The first `limit` rows of `batch` in the order of `keys` (nulls last),
/// as the plan's sort and limit give them.
fn sort_rows(
    batch: &RecordBatch,
    keys: &[(String, bool, DataType)],
    limit: usize,
) -> Result<RecordBatch, AccessError> {
    let mut cols = Vec::with_capacity(keys.len());
    for (c, asc, _) in keys {
        let values = batch
            .column_by_name(c)
            .ok_or_else(|| internal(format!("sort column {c} missing")))?
            .clone();
        cols.push(arrow::compute::SortColumn {
            values,
            options: Some(arrow::compute::SortOptions {
                descending: !asc,
                nulls_first: false,
            }),
        });
    }
    let idx = arrow::compute::lexsort_to_indices(&cols, Some(limit)).map_err(internal)?;
    arrow::compute::take_record_batch(batch, &idx).map_err(internal)
}

/// Writes objects of one type from the rows of batches with one schema:
/// `__apiName`, `__primaryKey`, `__title`, then the properties (nulls as
/// null). Column positions and the escaped property names are worked out
/// once, not per row.
pub struct ObjectWriter {
    /// `{"__apiName":"Observation","__primaryKey":`
    head: Vec<u8>,
    pk: Option<usize>,
    title: Option<usize>,
    /// `,"name":` and the column, per property.
    props: Vec<(Vec<u8>, Option<usize>)>,
}

impl ObjectWriter {
    pub fn new(
        t: &ObjectType,
        props: &[&atlas_ontology::Property],
        schema: &Schema,
        pk: &str,
        title: &str,
    ) -> ObjectWriter {
        let mut head = b"{\"__apiName\":".to_vec();
        write_str(&mut head, &t.api_name);
        head.extend_from_slice(b",\"__primaryKey\":");
        ObjectWriter {
            head,
            pk: schema.index_of(pk).ok(),
            title: schema.index_of(title).ok(),
            props: props
                .iter()
                .map(|p| {
                    let mut name = vec![b','];
                    write_str(&mut name, &p.api_name);
                    name.push(b':');
                    (name, schema.index_of(&p.column).ok())
                })
                .collect(),
        }
    }

    pub fn write(&self, out: &mut Vec<u8>, b: &RecordBatch, row: usize) {
        let cell = |out: &mut Vec<u8>, i: Option<usize>| match i {
            Some(i) => write_value(out, b.column(i).as_ref(), row),
            None => out.extend_from_slice(b"null"),
        };
        out.extend_from_slice(&self.head);
        cell(out, self.pk);
        out.extend_from_slice(b",\"__title\":");
        cell(out, self.title);
        for (name, i) in &self.props {
            out.extend_from_slice(name);
            cell(out, *i);
        }
        out.push(b'}');
    }
}

pub fn write_str(out: &mut Vec<u8>, s: &str) {
    // serde_json's escaping; writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

/// A cell as JSON: text as strings, decimals as exact numbers, lists as arrays.
pub fn write_value(out: &mut Vec<u8>, a: &dyn Array, row: usize) {
    use std::io::Write;
    if a.is_null(row) {
        out.extend_from_slice(b"null");
        return;
    }
    match a.data_type() {
        DataType::Utf8 => write_str(out, a.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => write_str(out, a.as_string::<i64>().value(row)),
        DataType::Utf8View => write_str(out, a.as_string_view().value(row)),
        DataType::Boolean => out.extend_from_slice(if a.as_boolean().value(row) {
            b"true"
        } else {
            b"false"
        }),
        DataType::Int64 => {
            let _ = write!(out, "{}", a.as_primitive::<Int64Type>().value(row));
        }
        DataType::Decimal128(_, scale) => {
            let v = a.as_primitive::<Decimal128Type>().value(row);
            out.extend_from_slice(decimal_text(v, *scale).as_bytes());
        }
        DataType::List(_) => {
            let list = a.as_list::<i32>().value(row);
            out.push(b'[');
            for i in 0..list.len() {
                if i > 0 {
                    out.push(b',');
                }
                write_value(out, list.as_ref(), i);
            }
            out.push(b']');
        }
        _ => {
            let text = arrow::util::display::array_value_to_string(a, row).unwrap_or_default();
            write_str(out, &text);
        }
    }
}

/// An unscaled decimal as the shortest exact text (`72.5`, `-0.001`, `3`).
fn decimal_text(v: i128, scale: i8) -> String {
    if scale <= 0 {
        return (v * 10i128.pow(scale.unsigned_abs() as u32)).to_string();
    }
    let neg = v < 0;
    let digits = v.unsigned_abs().to_string();
    let scale = scale as usize;
    let (int, frac) = if digits.len() > scale {
        digits.split_at(digits.len() - scale)
    } else {
        ("0", digits.as_str())
    };
    let frac = format!("{frac:0>scale$}");
    let frac = frac.trim_end_matches('0');
    let mut s = String::new();
    if neg {
        s.push('-');
    }
    s.push_str(int);
    if !frac.is_empty() {
        s.push('.');
        s.push_str(frac);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals_print_exactly_and_short() {
        assert_eq!(decimal_text(72_500_000_000_000_000_000, 18), "72.5");
        assert_eq!(decimal_text(-1_000_000_000_000_000, 18), "-0.001");
        assert_eq!(decimal_text(3_000_000_000_000_000_000, 18), "3");
        assert_eq!(decimal_text(0, 18), "0");
        assert_eq!(decimal_text(12, 0), "12");
    }

    #[test]
    fn regex_terms_are_literal() {
        assert_eq!(regex_escape("a.b(c)"), r"a\.b\(c\)");
        assert_eq!(regex_escape("héllo"), "héllo");
    }
}
