//! `POST /api/v2/sql`: one read-only SQL query over the views as the
//! caller's grant sees them (`atlas_access::sql`), answered as JSON,
//! NDJSON, CSV, an Arrow IPC stream or a Parquet file.
//!
//! The answer is collected (at most `[sql] max_rows` rows) before it is
//! encoded, so its audit record holds its rows and the patients read.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use atlas_access::sql::{SqlSession, check};
use atlas_policy::Principal;

use crate::error::{bad, internal};
use crate::{ApiError, AppState};

pub(crate) fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(handler))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SqlBody {
    query: String,
    #[serde(default)]
    format: Option<String>,
}

#[derive(Clone, Copy)]
enum Format {
    Json,
    Ndjson,
    Csv,
    Arrow,
    Parquet,
}

impl Format {
    fn parse(s: Option<&str>) -> Result<Format, ApiError> {
        Ok(match s.unwrap_or("json") {
            "json" => Format::Json,
            "ndjson" => Format::Ndjson,
            "csv" => Format::Csv,
            "arrow" => Format::Arrow,
            "parquet" => Format::Parquet,
            other => {
                return Err(bad(
                    "InvalidParameter",
                    "format",
                    other,
                    "format is json, ndjson, csv, arrow or parquet".into(),
                ));
            }
        })
    }

    fn content_type(self) -> &'static str {
        match self {
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
            Format::Csv => "text/csv",
            Format::Arrow => "application/vnd.apache.arrow.stream",
            Format::Parquet => "application/vnd.apache.parquet",
        }
    }
}

#[utoipa::path(post, path = "/api/v2/sql", operation_id = "sql", tag = "sql", security(("bearer" = [])), request_body(content = Object, description = "{\"query\": \"SELECT gender, count(*) FROM patient GROUP BY gender\", \"format\": \"json|ndjson|csv|arrow|parquet\"}", content_type = "application/json"), responses((status = 200, description = "The answer: a JSON array of row objects (or NDJSON, CSV, Arrow IPC, Parquet)"), (status = 400, description = "Not one read-only SELECT/WITH (the construct is named), a planning or execution error, or a limit (rows, memory) exceeded", body = crate::openapi::ErrorBody), (status = 401, description = "No or bad bearer token", body = crate::openapi::ErrorBody), (status = 503, description = "The query ran past `[sql] timeout_secs`", body = crate::openapi::ErrorBody)))]
/// One SQL query over the views (and `resources`) the caller may read:
/// row scope applied under the query, hidden columns absent, FHIRPath in
/// SQL (`fhirpath`, `fhirpath_first`) and JSON functions available.
pub(crate) async fn handler(
    State(state): State<AppState>,
    who: Principal,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: SqlBody = serde_json::from_slice(&body).map_err(|e| {
        bad(
            "InvalidRequestBody",
            "body",
            "",
            format!("the body is {{\"query\": \"SELECT …\", \"format\": \"json\"}}: {e}"),
        )
    })?;
    let format = Format::parse(body.format.as_deref())?;
    check(&body.query, &state.config.sql)?;
    let session = SqlSession::open(&state, &who, &state.config.sql).await?;
    let (schema, batches) = session.run(&body.query).await?;
    let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
    state.metrics.rows("sql", rows as u64);
    let bytes = tokio::task::spawn_blocking(move || encode(format, &schema, &batches))
        .await
        .map_err(internal)??;
    let mut response = ([(header::CONTENT_TYPE, format.content_type())], bytes).into_response();
    // Collected before it is sent: the first audit record holds it all.
    response.extensions_mut().insert(crate::audit::Whole);
    Ok(response)
}

fn encode(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<u8>, ApiError> {
    let mut out = Vec::new();
    match format {
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut out);
            for b in batches {
                w.write(b).map_err(internal)?;
            }
            w.finish().map_err(internal)?;
            drop(w);
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
        }
        Format::Ndjson => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b).map_err(internal)?;
            }
            w.finish().map_err(internal)?;
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            if batches.iter().all(|b| b.num_rows() == 0) {
                // The header alone, for an empty answer.
                w.write(&RecordBatch::new_empty(schema.clone()))
                    .map_err(internal)?;
            }
            for b in batches {
                w.write(b).map_err(internal)?;
            }
        }
        Format::Arrow => {
            let mut w =
                arrow::ipc::writer::StreamWriter::try_new(&mut out, schema).map_err(internal)?;
            for b in batches {
                w.write(b).map_err(internal)?;
            }
            w.finish().map_err(internal)?;
        }
        Format::Parquet => {
            let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema.clone(), None)
                .map_err(internal)?;
            for b in batches {
                w.write(b).map_err(internal)?;
            }
            w.close().map_err(internal)?;
        }
    }
    Ok(out)
}
