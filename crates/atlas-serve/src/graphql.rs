//! GraphQL at `/graphql`, its schema generated from the ontology.
//!
//! * One object type per ontology type, a field per property (text, dates
//!   and codes as `String`, integers as `Int`, decimals as `Float`,
//!   booleans as `Boolean`), plus one field per link: forward links are
//!   lists (`encounters`, `observations(code:, from:, to:, where:, first:)`),
//!   reverse links of one-to-many links single objects (`patient`).
//! * Root fields: each saved object set as a connection
//!   (`PatientAll(first:, after:, where:, orderBy:, patientId:, dateFrom:,
//!   dateTo:) { nodes, pageInfo { hasNextPage endCursor }, totalCount }`),
//!   whose cursors are the signed page tokens of `loadObjects` (the same
//!   snapshot guarantee), and one lookup per type (`patient(id:)`).
//! * `where` takes the object-set filter JSON of `loadObjects`.
//! * Links are loaded in batches (one query per link and argument set per
//!   level, whatever the number of parents), through the same planner and
//!   policy scope as every other path.
//! * Depth, complexity and total rows per request are bounded; introspection
//!   follows the configuration (on with `--dev-auth` unless set).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use async_graphql::dataloader::{DataLoader, Loader};
use async_graphql::dynamic::{
    Field, FieldFuture, FieldValue, InputValue, Object, ResolverContext, Scalar, Schema, TypeRef,
};
use async_graphql::{ErrorExtensions, Value as GqlValue};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use datafusion::logical_expr::lit;
use serde::Deserialize;
use serde_json::{Map, Value as Json};

use atlas_objectset::{Decoder, ObjectSet};
use atlas_ontology::{Cardinality, Link, ObjectType, Ontology};
use atlas_policy::{Action, Principal};

use crate::error::{bad, internal};
use crate::graphql_limits::{DocumentLimits, scan_text};
use crate::query::{Narrow, PageRequest, Planner, Query, column, snapshot};
use crate::{ApiError, AppState};

pub use crate::graphql_limits::GraphqlConfig;

/// One object being resolved: its type and properties (by api name).
struct Obj {
    props: Map<String, Json>,
}

/// What every resolver of one request shares.
struct RequestCtx {
    state: AppState,
    who: Principal,
    rows: AtomicUsize,
    link_queries: AtomicUsize,
    /// The request's audit facts, for link loads that run in tasks of
    /// their own.
    audit: Option<Arc<std::sync::Mutex<atlas_access::facts::Facts>>>,
}

impl RequestCtx {
    fn take_rows(&self, n: usize) -> Result<(), async_graphql::Error> {
        let max = self.state.config.graphql.max_rows;
        let total = self.rows.fetch_add(n, Ordering::Relaxed) + n;
        if total > max {
            // Not answered: the count stays what the response holds.
            self.rows.fetch_sub(n, Ordering::Relaxed);
            return Err(async_graphql::Error::new(format!(
                "the result is larger than {max} objects; ask for fewer (first:) or narrow the query"
            ))
            .extend_with(|_, e| e.set("errorName", "ResultTooLarge")));
        }
        Ok(())
    }
}

fn gql_error(e: impl Into<ApiError>) -> async_graphql::Error {
    let e: ApiError = e.into();
    async_graphql::Error::new(e.message.clone()).extend_with(|_, x| {
        x.set("errorName", e.name);
        x.set("parameter", e.parameter.clone());
        x.set("status", e.status.as_u16());
    })
}

fn lower_first(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(f) => f.to_lowercase().chain(c).collect(),
        None => String::new(),
    }
}

fn scalar_type(fhir: &str) -> &'static str {
    match fhir {
        "boolean" => "Boolean",
        "integer" | "positiveInt" | "unsignedInt" | "integer64" => "Int",
        "decimal" => "Float",
        _ => "String",
    }
}

/// A link navigated from one side.
#[derive(Clone)]
struct LinkSide {
    link: Link,
    forward: bool,
}

impl LinkSide {
    fn target(&self) -> &str {
        if self.forward {
            &self.link.to
        } else {
            &self.link.from
        }
    }
    fn source_property(&self) -> &str {
        if self.forward {
            &self.link.from_property
        } else {
            &self.link.to_property
        }
    }
    fn target_property(&self) -> &str {
        if self.forward {
            &self.link.to_property
        } else {
            &self.link.from_property
        }
    }
    /// Many targets per source.
    fn many(&self) -> bool {
        matches!(
            (self.link.cardinality, self.forward),
            (Cardinality::OneToMany, true) | (Cardinality::ManyToOne, false)
        )
    }
}

/// Builds the schema for an ontology.
pub fn schema(ontology: &Ontology, config: &crate::ServeConfig) -> Result<Schema, String> {
    let g = &config.graphql;
    let mut query = Object::new("Query");
    let mut builder_types: Vec<Object> = Vec::new();
    builder_types.push(
        Object::new("PageInfo")
            .field(Field::new(
                "hasNextPage",
                TypeRef::named_nn(TypeRef::BOOLEAN),
                |ctx| {
                    FieldFuture::new(async move {
                        let p = ctx
                            .parent_value
                            .try_downcast_ref::<(bool, Option<String>)>()?;
                        Ok(Some(FieldValue::value(p.0)))
                    })
                },
            ))
            .field(Field::new(
                "endCursor",
                TypeRef::named(TypeRef::STRING),
                |ctx| {
                    FieldFuture::new(async move {
                        let p = ctx
                            .parent_value
                            .try_downcast_ref::<(bool, Option<String>)>()?;
                        Ok(p.1.clone().map(FieldValue::value))
                    })
                },
            )),
    );
    for t in &ontology.object_types {
        let mut obj = Object::new(t.api_name.as_str()).description(t.description.clone());
        for p in &t.properties {
            let name = p.api_name.clone();
            obj = obj.field(
                Field::new(
                    p.api_name.as_str(),
                    TypeRef::named(scalar_type(&p.r#type)),
                    move |ctx| {
                        let name = name.clone();
                        FieldFuture::new(async move {
                            let o = ctx.parent_value.try_downcast_ref::<Obj>()?;
                            match o.props.get(&name) {
                                None | Some(Json::Null) => Ok(None),
                                Some(v) => {
                                    Ok(Some(FieldValue::value(GqlValue::from_json(v.clone())?)))
                                }
                            }
                        })
                    },
                )
                .description(p.description.clone()),
            );
        }
        let sides = ontology
            .links_from(&t.api_name)
            .map(|l| LinkSide {
                link: l.clone(),
                forward: true,
            })
            .chain(ontology.links_to(&t.api_name).map(|l| LinkSide {
                link: l.clone(),
                forward: false,
            }));
        for side in sides {
            let name = if side.forward {
                side.link.api_name.clone()
            } else {
                side.link.reverse_api_name.clone()
            };
            let target = ontology
                .object_type(side.target())
                .ok_or_else(|| format!("link {name}: unknown type {}", side.target()))?;
            obj = obj.field(link_field(&name, side, target));
        }
        builder_types.push(obj);

        // Root: the lookup by primary key.
        let tname = t.api_name.clone();
        query = query.field(
            Field::new(
                lower_first(&t.api_name),
                TypeRef::named(t.api_name.as_str()),
                move |ctx| {
                    let tname = tname.clone();
                    FieldFuture::new(async move {
                        let rc = ctx.data::<Arc<RequestCtx>>()?;
                        let id = ctx.args.try_get("id")?.string()?.to_owned();
                        let q = Query {
                            set: ObjectSet::Static {
                                object_type: tname,
                                primary_keys: vec![id],
                            },
                            order: Vec::new(),
                            select: None,
                            narrow: Narrow::default(),
                            action: Action::Read,
                        };
                        let page = PageRequest {
                            size: 1,
                            token: None,
                            total: false,
                        };
                        let page = crate::query::run(&rc.state, &rc.who, &q, &page)
                            .await
                            .map_err(gql_error)?;
                        let mut objs = parse_objects(&page.data)?;
                        rc.take_rows(objs.len())?;
                        Ok(objs.pop().map(FieldValue::owned_any))
                    })
                },
            )
            .argument(InputValue::new("id", TypeRef::named_nn(TypeRef::STRING))),
        );
    }
    // Root: each saved object set as a connection.
    for set in &ontology.object_sets {
        let t = ontology
            .object_type(&set.object_type)
            .ok_or_else(|| format!("object set {}: unknown type", set.api_name))?;
        let conn = format!("{}Connection", t.api_name);
        if !builder_types.iter().any(|o| o.type_name() == conn) {
            builder_types.push(connection_type(&conn, &t.api_name));
        }
        let set_name = set.api_name.clone();
        let tname = t.api_name.clone();
        query = query.field(
            Field::new(
                set.api_name.as_str(),
                TypeRef::named_nn(conn.as_str()),
                move |ctx| {
                    let set_name = set_name.clone();
                    let tname = tname.clone();
                    FieldFuture::new(async move { root_connection(&ctx, &set_name, &tname).await })
                },
            )
            .argument(InputValue::new("first", TypeRef::named(TypeRef::INT)))
            .argument(InputValue::new("after", TypeRef::named(TypeRef::STRING)))
            .argument(InputValue::new("where", TypeRef::named("JSON")))
            .argument(InputValue::new("orderBy", TypeRef::named(TypeRef::STRING)))
            .argument(InputValue::new(
                "patientId",
                TypeRef::named(TypeRef::STRING),
            ))
            .argument(InputValue::new("dateFrom", TypeRef::named(TypeRef::STRING)))
            .argument(InputValue::new("dateTo", TypeRef::named(TypeRef::STRING))),
        );
    }
    let mut b = Schema::build("Query", None, None)
        .register(
            Scalar::new("JSON").description("A JSON value: the object-set filter of loadObjects"),
        )
        .register(query)
        .limit_depth(g.max_depth)
        .limit_complexity(g.max_complexity)
        .limit_recursive_depth(64)
        .limit_directives(16);
    for o in builder_types {
        b = b.register(o);
    }
    if !g.introspection.unwrap_or(config.auth.dev) {
        b = b.disable_introspection();
    }
    b.finish().map_err(|e| e.to_string())
}

fn connection_type(name: &str, node: &str) -> Object {
    Object::new(name)
        .field(Field::new(
            "nodes",
            TypeRef::named_nn_list_nn(node),
            |ctx| {
                FieldFuture::new(async move {
                    let c = ctx.parent_value.try_downcast_ref::<Connection>()?;
                    Ok(Some(FieldValue::list(c.nodes.iter().map(|o| {
                        FieldValue::owned_any(Obj {
                            props: o.props.clone(),
                        })
                    }))))
                })
            },
        ))
        .field(Field::new(
            "pageInfo",
            TypeRef::named_nn("PageInfo"),
            |ctx| {
                FieldFuture::new(async move {
                    let c = ctx.parent_value.try_downcast_ref::<Connection>()?;
                    Ok(Some(FieldValue::owned_any((
                        c.next.is_some(),
                        c.next.clone(),
                    ))))
                })
            },
        ))
        .field(Field::new(
            "totalCount",
            TypeRef::named(TypeRef::INT),
            |ctx| {
                FieldFuture::new(async move {
                    let c = ctx.parent_value.try_downcast_ref::<Connection>()?;
                    Ok(c.total.map(|n| FieldValue::value(n as i64)))
                })
            },
        ))
}

struct Connection {
    nodes: Vec<Obj>,
    next: Option<String>,
    total: Option<usize>,
}

fn parse_objects(data: &[u8]) -> Result<Vec<Obj>, async_graphql::Error> {
    let v: Vec<Map<String, Json>> = serde_json::from_slice(data)?;
    Ok(v.into_iter().map(|props| Obj { props }).collect())
}

fn opt_string(
    ctx: &ResolverContext<'_>,
    name: &str,
) -> Result<Option<String>, async_graphql::Error> {
    match ctx.args.get(name) {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => Ok(Some(v.string()?.to_owned())),
    }
}

fn where_json(ctx: &ResolverContext<'_>) -> Result<Option<Json>, async_graphql::Error> {
    match ctx.args.get("where") {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => Ok(Some(v.as_value().clone().into_json()?)),
    }
}

fn first(
    ctx: &ResolverContext<'_>,
    default: usize,
    max: usize,
) -> Result<usize, async_graphql::Error> {
    match ctx.args.get("first") {
        None => Ok(default),
        Some(v) if v.is_null() => Ok(default),
        Some(v) => {
            let n = v.i64()?;
            if n < 1 || n as u64 > max as u64 {
                return Err(
                    async_graphql::Error::new(format!("first must be from 1 to {max}"))
                        .extend_with(|_, e| e.set("errorName", "InvalidPageSize")),
                );
            }
            Ok(n as usize)
        }
    }
}

fn narrow_args(ctx: &ResolverContext<'_>) -> Result<Narrow, async_graphql::Error> {
    let mut p = HashMap::new();
    for (arg, param) in [
        ("patientId", "patientId"),
        ("dateFrom", "dateFrom"),
        ("dateTo", "dateTo"),
        ("from", "dateFrom"),
        ("to", "dateTo"),
    ] {
        if let Some(v) = opt_string(ctx, arg)? {
            p.insert(param.to_owned(), v);
        }
    }
    crate::params::narrow(&p).map_err(gql_error)
}

async fn root_connection<'a>(
    ctx: &ResolverContext<'a>,
    set_name: &str,
    tname: &str,
) -> Result<Option<FieldValue<'a>>, async_graphql::Error> {
    let rc = ctx.data::<Arc<RequestCtx>>()?;
    let state = &rc.state;
    let t = crate::ontology::object_type(&state.ontology, tname).map_err(gql_error)?;
    let mut set = ObjectSet::Reference {
        name: set_name.to_owned(),
        object_type: tname.to_owned(),
    };
    if let Some(w) = where_json(ctx)? {
        let filter = Decoder::new(&state.ontology)
            .where_clause(&w, tname, "where")
            .map_err(|e| gql_error(bad("InvalidObjectSet", &e.path, "", e.to_string())))?;
        set = ObjectSet::Filter {
            set: Box::new(set),
            filter,
        };
    }
    let order =
        crate::params::order_param(opt_string(ctx, "orderBy")?.as_ref(), t).map_err(gql_error)?;
    let q = Query {
        set,
        order,
        select: None,
        narrow: narrow_args(ctx)?,
        action: Action::Search,
    };
    let page = PageRequest {
        size: first(
            ctx,
            state.config.default_page_size,
            state.config.max_page_size,
        )?,
        token: opt_string(ctx, "after")?,
        total: ctx.look_ahead().field("totalCount").exists(),
    };
    let page = crate::query::run(state, &rc.who, &q, &page)
        .await
        .map_err(gql_error)?;
    let nodes = parse_objects(&page.data)?;
    rc.take_rows(nodes.len())?;
    Ok(Some(FieldValue::owned_any(Connection {
        nodes,
        next: page.next,
        total: page.total,
    })))
}

fn link_field(name: &str, side: LinkSide, target: &ObjectType) -> Field {
    let many = side.many();
    let ty = if many {
        TypeRef::named_nn_list_nn(target.api_name.as_str())
    } else {
        TypeRef::named(target.api_name.as_str())
    };
    let has_code = target.property("code").is_some();
    let has_time = target.time_property.is_some();
    let side = Arc::new(side);
    let mut f = Field::new(name, ty, move |ctx| {
        let side = side.clone();
        FieldFuture::new(async move {
            let rc = ctx.data::<Arc<RequestCtx>>()?;
            let loader = ctx.data::<DataLoader<LinkLoader>>()?;
            let parent = ctx.parent_value.try_downcast_ref::<Obj>()?;
            let key_value = match parent.props.get(side.source_property()) {
                Some(Json::String(s)) => s.clone(),
                Some(Json::Null) | None => {
                    return Ok(if many {
                        Some(FieldValue::list(Vec::<FieldValue>::new()))
                    } else {
                        None
                    });
                }
                Some(other) => other.to_string(),
            };
            let args = LinkArgs {
                where_: where_json(&ctx)?.map(|w| w.to_string()),
                code: opt_string(&ctx, "code")?,
                narrow_from: opt_string(&ctx, "from")?,
                narrow_to: opt_string(&ctx, "to")?,
                first: first(
                    &ctx,
                    rc.state.config.graphql.default_link_size,
                    rc.state.config.max_page_size,
                )?,
            };
            let key = LinkKey {
                side: side.clone(),
                args: Arc::new(args),
                parent: key_value,
            };
            let objs = loader
                .load_one(key)
                .await
                .map_err(gql_error)?
                .unwrap_or_default();
            rc.take_rows(objs.len())?;
            if many {
                Ok(Some(FieldValue::list(
                    objs.iter()
                        .map(|o| FieldValue::owned_any(Obj { props: o.clone() })),
                )))
            } else {
                Ok(objs
                    .first()
                    .map(|o| FieldValue::owned_any(Obj { props: o.clone() })))
            }
        })
    });
    if many {
        f = f
            .argument(InputValue::new("first", TypeRef::named(TypeRef::INT)))
            .argument(InputValue::new("where", TypeRef::named("JSON")));
        if has_code {
            f = f.argument(InputValue::new("code", TypeRef::named(TypeRef::STRING)));
        }
        if has_time {
            f = f
                .argument(InputValue::new("from", TypeRef::named(TypeRef::STRING)))
                .argument(InputValue::new("to", TypeRef::named(TypeRef::STRING)));
        }
    }
    f
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct LinkArgs {
    where_: Option<String>,
    code: Option<String>,
    narrow_from: Option<String>,
    narrow_to: Option<String>,
    first: usize,
}

#[derive(Clone)]
struct LinkKey {
    side: Arc<LinkSide>,
    args: Arc<LinkArgs>,
    parent: String,
}

impl LinkKey {
    fn group(&self) -> (String, bool, Arc<LinkArgs>) {
        (
            self.side.link.api_name.clone() + "\u{1f}" + &self.side.link.from,
            self.side.forward,
            self.args.clone(),
        )
    }
}

impl PartialEq for LinkKey {
    fn eq(&self, o: &Self) -> bool {
        self.group() == o.group() && self.parent == o.parent
    }
}
impl Eq for LinkKey {}
impl std::hash::Hash for LinkKey {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        self.group().hash(h);
        self.parent.hash(h);
    }
}

/// Loads one link for many parents in one query.
struct LinkLoader {
    ctx: Arc<RequestCtx>,
}

impl Loader<LinkKey> for LinkLoader {
    type Value = Arc<Vec<Map<String, Json>>>;
    type Error = ApiError;

    async fn load(&self, keys: &[LinkKey]) -> Result<HashMap<LinkKey, Self::Value>, ApiError> {
        let mut groups: HashMap<(String, bool, Arc<LinkArgs>), Vec<&LinkKey>> = HashMap::new();
        for k in keys {
            groups.entry(k.group()).or_default().push(k);
        }
        let mut out = HashMap::new();
        for (_, ks) in groups {
            let side = ks[0].side.clone();
            let args = ks[0].args.clone();
            let parents: Vec<String> = ks.iter().map(|k| k.parent.clone()).collect();
            let mut by_parent = atlas_access::facts::scoped(
                self.ctx.audit.clone(),
                self.load_group(&side, &args, &parents),
            )
            .await?;
            for k in ks {
                let v = by_parent.remove(&k.parent).unwrap_or_default();
                out.insert(k.clone(), Arc::new(v));
            }
        }
        Ok(out)
    }
}

impl LinkLoader {
    async fn load_group(
        &self,
        side: &LinkSide,
        args: &LinkArgs,
        parents: &[String],
    ) -> Result<HashMap<String, Vec<Map<String, Json>>>, ApiError> {
        let state = &self.ctx.state;
        let max = state.config.graphql.max_link_queries;
        if self.ctx.link_queries.fetch_add(1, Ordering::Relaxed) >= max {
            return Err(bad(
                "QueryTooComplex",
                "query",
                "",
                format!(
                    "the query needs more than {max} link queries; select fewer links or fewer argument sets"
                ),
            ));
        }
        state.metrics.link_query();
        let t = crate::ontology::object_type(&state.ontology, side.target())?;
        let mut set = ObjectSet::Base {
            object_type: t.api_name.clone(),
        };
        if let Some(w) = &args.where_ {
            let w: Json = serde_json::from_str(w).map_err(internal)?;
            let filter = Decoder::new(&state.ontology)
                .where_clause(&w, &t.api_name, "where")
                .map_err(|e| bad("InvalidObjectSet", &e.path, "", e.to_string()))?;
            set = ObjectSet::Filter {
                set: Box::new(set),
                filter,
            };
        }
        let narrow = {
            let mut p = HashMap::new();
            if let Some(v) = &args.narrow_from {
                p.insert("dateFrom".to_owned(), v.clone());
            }
            if let Some(v) = &args.narrow_to {
                p.insert("dateTo".to_owned(), v.clone());
            }
            crate::params::narrow(&p)?
        };
        let (_, providers) = snapshot(state, &set, None).await?;
        let mut planner = Planner::new(state, &self.ctx.who, Action::Search, &providers);
        let target_col = planner
            .property_column(t, side.target_property())?
            .to_owned();
        let keys = parents.iter().map(|p| lit(p.as_str())).collect();
        let mut b = planner
            .set_plan(&set)?
            .filter(planner.narrow_expr(t, &narrow)?)
            .and_then(|b| b.filter(column(&target_col).in_list(keys, false)))
            .map_err(internal)?;
        if let Some(code) = &args.code {
            let c = planner.property_column(t, "code")?;
            b = b
                .filter(column(c).eq(lit(code.as_str())))
                .map_err(internal)?;
        }
        let pk = planner.key_column(t, &t.primary_key)?.to_owned();
        let title = planner.title_column(t)?.to_owned();
        let mut sort = vec![column(&target_col).sort(true, false)];
        if let Some(tc) = planner.time_sort_column(t)? {
            sort.push(column(tc).sort(true, false));
        }
        sort.push(column(&pk).sort(true, false));
        let plan = b.sort(sort).and_then(|b| b.build()).map_err(internal)?;
        let batches = state.tables.collect(plan).await?;
        let props = planner.output_properties(t, None)?;
        let release = atlas_access::Egress::for_request().objects(t, &planner.scope(t)?, props)?;
        let mut out: HashMap<String, Vec<Map<String, Json>>> = HashMap::new();
        let mut buf = Vec::new();
        for batch in &batches {
            let writer = release.batch(batch, &pk, &title);
            let Some(keycol) = batch.column_by_name(&target_col) else {
                continue;
            };
            for row in 0..batch.num_rows() {
                let mut k = Vec::new();
                crate::query::write_value(&mut k, keycol.as_ref(), row);
                let key = match serde_json::from_slice::<Json>(&k) {
                    Ok(Json::String(s)) => s,
                    Ok(other) => other.to_string(),
                    Err(_) => continue,
                };
                let list = out.entry(key).or_default();
                if list.len() >= args.first {
                    continue;
                }
                buf.clear();
                writer.write(&mut buf, batch, row);
                let obj: Map<String, Json> = serde_json::from_slice(&buf).map_err(internal)?;
                list.push(obj);
            }
        }
        Ok(out)
    }
}

#[derive(Deserialize)]
struct GraphqlBody {
    query: String,
    #[serde(default)]
    variables: Option<Json>,
    #[serde(default, rename = "operationName")]
    operation_name: Option<String>,
}

#[utoipa::path(post, path = "/graphql", tag = "graphql", security(("bearer" = [])), request_body(content = Object, description = "query, variables, operationName", content_type = "application/json"), responses((status = 200, description = "data and errors (field errors next to data)"), (status = 400, description = "Parse, validation or limit errors (no data)"), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody)))]
pub(crate) async fn handler(
    State(state): State<AppState>,
    who: Principal,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: GraphqlBody = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "InvalidRequestBody",
            "body",
            "",
            format!(
                "a GraphQL request is a JSON object with query, variables and operationName: {e}"
            ),
        )
    })?;
    let req = match bounded_request(&state, body).await? {
        Ok(req) => req,
        Err(refused) => return Ok(refused),
    };
    let rc = Arc::new(RequestCtx {
        state: state.clone(),
        who,
        rows: AtomicUsize::new(0),
        link_queries: AtomicUsize::new(0),
        audit: atlas_access::facts::current(),
    });
    // Link loads run in tasks of their own: they end with the request (its
    // deadline drops this future, and `LinkTasks` with it).
    let tasks = LinkTasks::default();
    let loader = DataLoader::new(LinkLoader { ctx: rc.clone() }, tasks.spawner());
    let resp = state
        .graphql
        .execute(req.data(rc.clone()).data(loader))
        .await;
    state
        .metrics
        .rows("graphql", rc.rows.load(Ordering::Relaxed) as u64);
    let rows = resp.data.clone();
    // A request that produced no data at all (parse, validation, limits) is
    // the client's error: 400. Field errors next to data stay 200.
    let status = if !resp.errors.is_empty() && matches!(rows, GqlValue::Null) {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    let bytes = serde_json::to_vec(&resp).map_err(internal)?;
    Ok((status, [(header::CONTENT_TYPE, "application/json")], bytes).into_response())
}

/// Parses the request and checks it against [`DocumentLimits`] on the
/// blocking pool (the work is linear in the text, but it is CPU work).
/// A document that breaks a limit or does not parse is answered with a
/// 400 GraphQL error response, without ever reaching the executor.
async fn bounded_request(
    state: &AppState,
    body: GraphqlBody,
) -> Result<Result<async_graphql::Request, Response>, ApiError> {
    let config = state.config.clone();
    let checked = tokio::task::spawn_blocking(move || {
        bounded(&config, body.query, body.variables, body.operation_name)
    })
    .await
    .map_err(internal)?;
    Ok(checked.map_err(|resp| {
        let bytes = serde_json::to_vec(&resp).unwrap_or_default();
        (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "application/json")],
            bytes,
        )
            .into_response()
    }))
}

/// A GraphQL request parsed and checked against the `[graphql]` limits
/// (`DocumentLimits`), ready for the executor; or the error response
/// (parse error, or the limit broken). Linear in the text: what the server
/// runs before anything else looks at a document (and what the fuzz
/// target drives).
pub fn bounded(
    config: &crate::ServeConfig,
    query: String,
    variables: Option<Json>,
    operation_name: Option<String>,
) -> Result<async_graphql::Request, Box<async_graphql::Response>> {
    let limits = DocumentLimits {
        graphql: &config.graphql,
        default_page_size: config.default_page_size,
    };
    scan_text(&query, &limits).map_err(|e| limit_error(&e.0, "QueryTooLarge"))?;
    let mut req = async_graphql::Request::new(query);
    if let Some(v) = variables {
        req = req.variables(async_graphql::Variables::from_json(v));
    }
    if let Some(op) = &operation_name {
        req = req.operation_name(op.clone());
    }
    let vars = req.variables.clone();
    let doc = req
        .parsed_query()
        .map_err(|e| Box::new(async_graphql::Response::from_errors(vec![e])))?;
    limits
        .check(doc, operation_name.as_deref(), &vars)
        .map_err(|e| limit_error(&e.0, "QueryTooComplex"))?;
    Ok(req)
}

fn limit_error(message: &str, name: &'static str) -> Box<async_graphql::Response> {
    let e = async_graphql::ServerError::new(message, None);
    let mut ext = async_graphql::ErrorExtensionValues::default();
    ext.set("errorName", name);
    Box::new(async_graphql::Response::from_errors(vec![
        async_graphql::ServerError {
            extensions: Some(ext),
            ..e
        },
    ]))
}

/// The link-load tasks of one request, aborted when the request ends (at
/// its deadline too), so that no scan outlives the request that asked.
#[derive(Default)]
struct LinkTasks(Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>);

impl LinkTasks {
    fn spawner(&self) -> impl Fn(futures::future::BoxFuture<'static, ()>) + Send + Sync + 'static {
        let tasks = self.0.clone();
        move |fut| {
            let handle = tokio::spawn(fut).abort_handle();
            if let Ok(mut t) = tasks.lock() {
                t.retain(|h| !h.is_finished());
                t.push(handle);
            }
        }
    }
}

impl Drop for LinkTasks {
    fn drop(&mut self) {
        if let Ok(t) = self.0.lock() {
            t.iter().for_each(tokio::task::AbortHandle::abort);
        }
    }
}

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(handler))
}
