//! Streaming an object set whole, as NDJSON, an Arrow IPC stream or a
//! Parquet file, chosen by `Accept` or `format=`: `loadObjects` with
//! `format=ndjson` (or `Accept: application/x-ndjson`) streams every object
//! of the set instead of one page.
//!
//! The plan is the same as a page's (policy scope on every scan, the set's
//! filters), executed as a DataFusion stream: each record batch is encoded
//! and sent as it arrives, and the next is pulled only when the client has
//! taken the previous one (the response body is the stream, so a slow
//! client slows the scan instead of filling memory). Without `orderBy` no
//! operator needs the whole result, so memory stays flat however large the
//! set is; an `orderBy` sorts first (DataFusion spills if it must).

use std::sync::{Arc, Mutex};

use arrow::datatypes::{Field, Schema};
use arrow::record_batch::RecordBatch;
use axum::body::Body;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use futures::StreamExt;

use atlas_access::Egress;
use atlas_ontology::{ObjectType, Property};
use atlas_policy::Principal;

use crate::error::internal;
use crate::query::{ObjectWriter, Planner, Query, column, snapshot};
use crate::{ApiError, AppState};

/// An encoding of a streamed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Format {
    Ndjson,
    Arrow,
    Parquet,
}

impl Format {
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Ndjson => "application/x-ndjson",
            Format::Arrow => "application/vnd.apache.arrow.stream",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }

    /// From `format=` (wins) or the `Accept` header; `None`: a JSON page.
    pub fn choose(param: Option<&str>, accept: Option<&str>) -> Result<Option<Format>, ApiError> {
        if let Some(p) = param {
            return match p {
                "ndjson" => Ok(Some(Format::Ndjson)),
                "arrow" => Ok(Some(Format::Arrow)),
                "parquet" => Ok(Some(Format::Parquet)),
                "json" => Ok(None),
                other => Err(crate::error::bad(
                    "InvalidParameter",
                    "format",
                    other,
                    "format must be json, ndjson, arrow or parquet".into(),
                )),
            };
        }
        let accept = accept.unwrap_or("");
        for f in [Format::Ndjson, Format::Arrow, Format::Parquet] {
            if accept.contains(f.content_type()) {
                return Ok(Some(f));
            }
        }
        if accept.contains("application/fhir+ndjson") {
            return Ok(Some(Format::Ndjson));
        }
        Ok(None)
    }
}

/// Streams every object of `q` in `format`.
pub(crate) async fn stream_objects(
    state: &AppState,
    who: &Principal,
    q: &Query,
    format: Format,
) -> Result<Response, ApiError> {
    let (_, providers) = snapshot(state, &q.set, None).await?;
    let t: ObjectType = crate::ontology::object_type(&state.ontology, q.set.object_type())?.clone();
    let mut planner = Planner::new(state, who, q.action, &providers);
    let mut b = planner
        .set_plan(&q.set)?
        .filter(planner.narrow_expr(&t, &q.narrow)?)
        .map_err(internal)?;
    if !q.order.is_empty() {
        let mut sort = Vec::new();
        for o in &q.order {
            sort.push(column(planner.property_column(&t, &o.property)?).sort(o.ascending, false));
        }
        sort.push(column(planner.key_column(&t, &t.primary_key)?).sort(true, false));
        b = b.sort(sort).map_err(internal)?;
    }
    let props: Vec<Property> = planner
        .output_properties(&t, q.select.as_deref())?
        .into_iter()
        .cloned()
        .collect();
    // Columns renamed to the properties' api names; the primary key and
    // title come along for NDJSON's `__primaryKey` and `__title`.
    let pk = planner.key_column(&t, &t.primary_key)?.to_owned();
    let title = planner.title_column(&t)?.to_owned();
    let mut exprs: Vec<datafusion::logical_expr::Expr> = props
        .iter()
        .map(|p| column(&p.column).alias(p.api_name.as_str()))
        .collect();
    if format == Format::Ndjson {
        exprs.push(column(&pk).alias("__pk"));
        exprs.push(column(&title).alias("__title"));
    }
    // The patient key comes along for the audit record's patients, and is
    // taken out before encoding.
    if let Some(pp) = t.patient_property.as_deref() {
        exprs.push(column(planner.key_column(&t, pp)?).alias(PATIENT));
    }
    let plan = b.project(exprs).and_then(|b| b.build()).map_err(internal)?;
    let release = Egress::for_request().object_batches(&t, &planner.scope(&t)?, Some(PATIENT))?;
    let stream = state.tables.execute_stream(plan).await?;
    let schema = release.schema(stream.schema().as_ref())?;
    // The properties written are the columns the egress lets out.
    let props: Vec<Property> = props
        .into_iter()
        .filter(|p| schema.index_of(&p.api_name).is_ok())
        .collect();
    let metrics = state.metrics.clone();
    let rows_route = match format {
        Format::Ndjson => "stream.ndjson",
        Format::Arrow => "stream.arrow",
        Format::Parquet => "stream.parquet",
    };
    let mut encoder = Encoder::new(format, &t, &props, schema.as_ref())?;
    let body_stream = async_stream(stream, move |batch| {
        metrics.rows(
            rows_route,
            batch.as_ref().map_or(0, |b| b.num_rows() as u64),
        );
        let batch = match batch {
            Some(b) => Some(release.release(&b).map_err(std::io::Error::other)?),
            None => None,
        };
        encoder.encode(batch)
    });
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body_stream),
    )
        .into_response())
}

/// The column alias carrying a streamed object's patient key.
const PATIENT: &str = "__patient";

/// Maps each batch (then one final `None`) to bytes, lazily.
pub(crate) fn async_stream(
    input: datafusion::execution::SendableRecordBatchStream,
    mut f: impl FnMut(Option<RecordBatch>) -> Result<bytes::Bytes, std::io::Error> + Send + 'static,
) -> impl futures::Stream<Item = Result<bytes::Bytes, std::io::Error>> + Send + 'static {
    let end = futures::stream::once(async { None });
    input
        .map(Some)
        .chain(end)
        .map(move |item| match item {
            Some(Ok(batch)) => f(Some(batch)),
            Some(Err(e)) => Err(std::io::Error::other(e.to_string())),
            None => f(None),
        })
        .filter(|r| futures::future::ready(!matches!(r, Ok(b) if b.is_empty())))
}

/// A `Write` whose bytes are taken out after each batch.
#[derive(Clone, Default)]
struct Shared(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("poisoned"))?
            .extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Shared {
    fn take(&self) -> bytes::Bytes {
        self.0
            .lock()
            .map(|mut v| bytes::Bytes::from(std::mem::take(&mut *v)))
            .unwrap_or_default()
    }
}

enum Encoder {
    Ndjson {
        t: ObjectType,
        props: Vec<Property>,
    },
    /// NDJSON of plain rows (a view's): one object per row, columns by name.
    Rows,
    Arrow {
        out: Shared,
        writer: Option<arrow::ipc::writer::StreamWriter<Shared>>,
    },
    Parquet {
        out: Shared,
        writer: Option<parquet::arrow::ArrowWriter<Shared>>,
    },
}

impl Encoder {
    fn new(
        format: Format,
        t: &ObjectType,
        props: &[Property],
        schema: &Schema,
    ) -> Result<Encoder, ApiError> {
        match format {
            Format::Ndjson => Ok(Encoder::Ndjson {
                t: t.clone(),
                props: props.to_vec(),
            }),
            _ => Encoder::columnar(format, schema),
        }
    }

    /// An encoder for plain rows of `schema`: NDJSON objects keyed by
    /// column name, an Arrow IPC stream or a Parquet file.
    fn columnar(format: Format, schema: &Schema) -> Result<Encoder, ApiError> {
        let out = Shared::default();
        // Output columns are nullable whatever the view says.
        let schema = Arc::new(Schema::new(
            schema
                .fields()
                .iter()
                .map(|f| Field::new(f.name(), f.data_type().clone(), true))
                .collect::<Vec<_>>(),
        ));
        Ok(match format {
            Format::Ndjson => Encoder::Rows,
            Format::Arrow => Encoder::Arrow {
                writer: Some(
                    arrow::ipc::writer::StreamWriter::try_new(out.clone(), &schema)
                        .map_err(internal)?,
                ),
                out,
            },
            Format::Parquet => {
                let props = parquet::file::properties::WriterProperties::builder()
                    .set_compression(parquet::basic::Compression::ZSTD(Default::default()))
                    .build();
                Encoder::Parquet {
                    writer: Some(
                        parquet::arrow::ArrowWriter::try_new(out.clone(), schema, Some(props))
                            .map_err(internal)?,
                    ),
                    out,
                }
            }
        })
    }

    fn encode(&mut self, batch: Option<RecordBatch>) -> Result<bytes::Bytes, std::io::Error> {
        let err = |e: &dyn std::fmt::Display| std::io::Error::other(e.to_string());
        match self {
            Encoder::Ndjson { t, props } => {
                let Some(b) = batch else {
                    return Ok(bytes::Bytes::new());
                };
                let refs: Vec<&Property> = props.iter().collect();
                // The batch's columns carry api names; write_object looks
                // columns up by `column`, so point each property at its alias.
                let renamed: Vec<Property> = refs
                    .iter()
                    .map(|p| Property {
                        column: p.api_name.clone(),
                        ..(*p).clone()
                    })
                    .collect();
                let renamed_refs: Vec<&Property> = renamed.iter().collect();
                let writer = ObjectWriter::new(t, &renamed_refs, &b.schema(), "__pk", "__title");
                let mut out = Vec::with_capacity(b.num_rows() * 256);
                for row in 0..b.num_rows() {
                    writer.write(&mut out, &b, row);
                    out.push(b'\n');
                }
                Ok(bytes::Bytes::from(out))
            }
            Encoder::Rows => {
                let Some(b) = batch else {
                    return Ok(bytes::Bytes::new());
                };
                let schema = b.schema();
                let names: Vec<Vec<u8>> = schema
                    .fields()
                    .iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let mut n = vec![if i == 0 { b'{' } else { b',' }];
                        crate::query::write_str(&mut n, f.name());
                        n.push(b':');
                        n
                    })
                    .collect();
                let mut out = Vec::with_capacity(b.num_rows() * 256);
                for row in 0..b.num_rows() {
                    if names.is_empty() {
                        out.push(b'{');
                    }
                    for (i, name) in names.iter().enumerate() {
                        out.extend_from_slice(name);
                        crate::query::write_value(&mut out, b.column(i).as_ref(), row);
                    }
                    out.extend_from_slice(b"}\n");
                }
                Ok(bytes::Bytes::from(out))
            }
            Encoder::Arrow { out, writer } => {
                match (batch, writer.as_mut()) {
                    (Some(b), Some(w)) => {
                        let b = relax(b).map_err(|e| err(&e))?;
                        w.write(&b).map_err(|e| err(&e))?
                    }
                    (None, Some(_)) => {
                        if let Some(mut w) = writer.take() {
                            w.finish().map_err(|e| err(&e))?;
                        }
                    }
                    _ => {}
                }
                Ok(out.take())
            }
            Encoder::Parquet { out, writer } => {
                match (batch, writer.as_mut()) {
                    (Some(b), Some(w)) => {
                        let b = relax(b).map_err(|e| err(&e))?;
                        w.write(&b).map_err(|e| err(&e))?;
                        // Send whole row groups as they fill.
                        if w.in_progress_rows() >= 64 * 1024 {
                            w.flush().map_err(|e| err(&e))?;
                        }
                    }
                    (None, Some(_)) => {
                        if let Some(w) = writer.take() {
                            w.close().map_err(|e| err(&e))?;
                        }
                    }
                    _ => {}
                }
                Ok(out.take())
            }
        }
    }
}

/// The batch with every field nullable (the writer's schema).
fn relax(b: RecordBatch) -> Result<RecordBatch, arrow::error::ArrowError> {
    let schema = Arc::new(Schema::new(
        b.schema()
            .fields()
            .iter()
            .map(|f| Field::new(f.name(), f.data_type().clone(), true))
            .collect::<Vec<_>>(),
    ));
    RecordBatch::try_new(schema, b.columns().to_vec())
}

/// Every row of a view (built-in or user), streamed: NDJSON (one JSON
/// object per row, columns by name), an Arrow IPC stream or a Parquet file.
/// The view's resource type goes through the `PolicyEngine` like an object
/// type; a patient-bound scope filters on the view's patient column (a view
/// without one is refused to such a token).
#[utoipa::path(get, path = "/api/v2/views/{view}/rows", tag = "objects", security(("bearer" = [])), params(("view" = String, Path, description = "View name (`atlas views list`)"), ("format" = Option<String>, Query, description = "ndjson (default), arrow or parquet; or by Accept"), ("patientId" = Option<String>, Query, description = "Only this patient's rows (views with a patient column)")), responses((status = 200, description = "The rows, streamed", content_type = "application/x-ndjson"), (status = 400, description = "Invalid input; the body names the field", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 403, description = "The PolicyEngine denies the view's resource type", body = crate::openapi::ErrorBody), (status = 404, description = "No such view", body = crate::openapi::ErrorBody)))]
pub(crate) async fn view_rows(
    axum::extract::State(state): axum::extract::State<AppState>,
    axum::extract::Path(view): axum::extract::Path<String>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
    headers: axum::http::HeaderMap,
    who: Principal,
) -> Result<Response, ApiError> {
    use datafusion::logical_expr::{LogicalPlanBuilder, lit};
    let p = crate::params::params(raw, &["format", "patientId"])?;
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let format =
        Format::choose(p.get("format").map(String::as_str), accept)?.unwrap_or(Format::Ndjson);
    let entry = match atlas_viewstore::ViewStore::new(state.lake.clone())
        .get(&view)
        .await
    {
        Ok(e) => e,
        Err(atlas_viewstore::ViewStoreError::NotFound(_)) => {
            return Err(ApiError::not_found(
                "view",
                &view,
                "no such view (see `atlas views list`)",
            ));
        }
        Err(e) => return Err(internal(e)),
    };
    let grant = crate::query::allowed_rows(
        &state,
        &who,
        &entry.resource_type,
        atlas_policy::Action::Search,
        ("view", &view),
    )?;
    let dir = atlas_viewstore::view_table_dir(&view);
    let version = state.tables.latest_version(&dir).await?;
    let provider = state.tables.provider(&dir, version).await?;
    let mut b = LogicalPlanBuilder::scan(
        "view",
        datafusion::datasource::provider_as_source(provider),
        None,
    )
    .map_err(internal)?;
    let patient_col = entry.patient_column.clone();
    match crate::query::scope_predicate(patient_col.as_deref(), &grant.rows) {
        Ok(None) => {}
        Ok(Some(p)) => b = b.filter(p).map_err(internal)?,
        Err(patients) => {
            return Err(ApiError::new(
                axum::http::StatusCode::FORBIDDEN,
                "PermissionDenied",
                "view",
                &view,
                format!("view {view} has no patient column, and this token only sees {patients}"),
            ));
        }
    }
    if let Some(pid) = p.get("patientId") {
        let Some(pc) = &patient_col else {
            return Err(crate::error::bad(
                "InvalidParameter",
                "patientId",
                pid,
                format!("view {view} has no patient column"),
            ));
        };
        b = b
            .filter(
                column(pc)
                    .is_not_null()
                    .and(column(pc).eq(lit(pid.as_str()))),
            )
            .map_err(internal)?;
    }
    // Columns reading hidden elements are left out where rows leave (the
    // key and patient columns cannot be hidden: the policy refuses such
    // rules).
    let release = Egress::for_request().view_batches(
        &view,
        &entry.definition,
        &grant,
        patient_col.as_deref(),
    )?;
    let plan = b.build().map_err(internal)?;
    let stream = state.tables.execute_stream(plan).await?;
    let schema = release.schema(stream.schema().as_ref())?;
    let metrics = state.metrics.clone();
    let mut encoder = Encoder::columnar(format, schema.as_ref())?;
    let body = async_stream(stream, move |batch| {
        metrics.rows(
            "view.rows",
            batch.as_ref().map_or(0, |b| b.num_rows() as u64),
        );
        let batch = match batch {
            Some(b) => Some(release.release(&b).map_err(std::io::Error::other)?),
            None => None,
        };
        encoder.encode(batch)
    });
    Ok((
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response())
}

pub(crate) fn routes() -> utoipa_axum::router::OpenApiRouter<AppState> {
    utoipa_axum::router::OpenApiRouter::new().routes(utoipa_axum::routes!(view_rows))
}
