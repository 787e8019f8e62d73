//! SQL for people: one read-only query over the views (and the resource
//! store) as one principal's grant sees them.
//!
//! * [`check`] accepts exactly one `SELECT` or `WITH` statement; DDL, DML,
//!   `COPY`, `SET`, `EXPLAIN` and the rest are refused naming the
//!   construct. DataFusion's own `SQLOptions` refuse them again when the
//!   statement is planned.
//! * [`SqlSession::open`] builds a fresh DataFusion session whose only
//!   tables are [`ScopedTable`]s: each materialized view whose resource
//!   type the `PolicyEngine` lets the principal search, without the columns
//!   the grant hides, and `resources` (the store's live rows) for the types
//!   the principal may read whole (no hidden elements, no
//!   de-identification). No file-reading table functions, no URL tables,
//!   no `information_schema`. A de-identifying grant reads FHIR search
//!   only: its types get no table here.
//! * Each table's row scope is applied inside [`ScopeExec`], an operator
//!   the optimizer cannot push the query's filters, limits or projections
//!   through and which reports no statistics: every expression of the
//!   query (a join key, a `CAST` that fails, a division by zero, a
//!   `count(*)` answered from file statistics) sees only rows inside the
//!   scope, so no answer, error or count depends on a row outside it.
//! * Limits: rows answered, seconds, and memory (DataFusion's memory pool;
//!   sorts and joins that need more fail with a clear error).
//! * Egress: the patients of the rows each scan reads are noted for the
//!   audit record (an aggregate's answer is computed from them); the
//!   answer's rows are counted.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::execution::SendableRecordBatchStream;
use datafusion::execution::context::{SQLOptions, SessionConfig, SessionContext, TaskContext};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, col, lit};
use datafusion::physical_expr::EquivalenceProperties;
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
};
use futures::StreamExt;
use http::StatusCode;
use serde::Deserialize;

use atlas_policy::{Action, Decision, Principal, RowScope};

use crate::egress::Egress;
use crate::query::scope_predicate;
use crate::{Access, AccessError};

/// `[sql]` in `atlas.toml`: the bounds of one `/api/v2/sql` query.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlLimits {
    /// Rows an answer may hold; a query that would answer more is refused
    /// (add a `LIMIT`).
    pub max_rows: usize,
    /// Seconds a query may run (inside the request's own deadline).
    pub timeout_secs: u64,
    /// Memory a query's operators may hold, in MiB.
    pub memory_mb: usize,
    /// The longest query text, in bytes.
    pub max_query_bytes: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        SqlLimits {
            max_rows: 100_000,
            timeout_secs: 30,
            memory_mb: 512,
            max_query_bytes: 64 * 1024,
        }
    }
}

fn refused(construct: &str, message: String) -> AccessError {
    AccessError::new(
        StatusCode::BAD_REQUEST,
        "SqlNotAllowed",
        "query",
        construct,
        message,
    )
}

fn invalid(message: String) -> AccessError {
    AccessError::new(StatusCode::BAD_REQUEST, "InvalidSql", "query", "…", message)
}

/// Accepts one read-only `SELECT`/`WITH` statement; anything else is a
/// 400 naming the construct.
pub fn check(sql: &str, limits: &SqlLimits) -> Result<(), AccessError> {
    use datafusion::sql::parser::{DFParser, Statement as DfStatement};
    use datafusion::sql::sqlparser::ast::Statement;
    if sql.len() > limits.max_query_bytes {
        return Err(invalid(format!(
            "the query is {} bytes; at most {} are accepted",
            sql.len(),
            limits.max_query_bytes
        )));
    }
    let statements = DFParser::parse_sql(sql).map_err(|e| invalid(e.to_string()))?;
    if statements.len() != 1 {
        return Err(invalid(format!(
            "one statement per request, got {}",
            statements.len()
        )));
    }
    let Some(statement) = statements.front() else {
        return Err(invalid("no statement".into()));
    };
    match statement {
        DfStatement::Statement(s) if matches!(s.as_ref(), Statement::Query(_)) => Ok(()),
        other => {
            let text = other.to_string();
            let construct: String = text
                .split_whitespace()
                .take(if text.to_ascii_uppercase().starts_with("CREATE") {
                    2
                } else {
                    1
                })
                .collect::<Vec<_>>()
                .join(" ")
                .to_ascii_uppercase();
            Err(refused(
                &construct,
                format!(
                    "{construct} is not allowed: /api/v2/sql runs one read-only SELECT or WITH query"
                ),
            ))
        }
    }
}

/// A session whose tables are what one principal may read.
pub struct SqlSession {
    ctx: SessionContext,
    limits: SqlLimits,
    egress: Egress,
    /// The tables offered, for the error that names what exists.
    pub tables: Vec<String>,
}

impl SqlSession {
    /// The views and the store as `who` sees them.
    pub async fn open(
        access: &Access,
        who: &Principal,
        limits: &SqlLimits,
    ) -> Result<SqlSession, AccessError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_limit(limits.memory_mb.saturating_mul(1 << 20), 1.0)
            .build_arc()
            .map_err(AccessError::internal)?;
        let config = SessionConfig::new()
            .with_target_partitions(2)
            .with_information_schema(false);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        atlas_viewstore::sql_functions::register(&ctx).map_err(AccessError::internal)?;
        let egress = Egress::for_request();
        let mut session = SqlSession {
            ctx,
            limits: limits.clone(),
            egress,
            tables: Vec::new(),
        };
        session.add_views(access, who).await?;
        session.add_resources(access, who).await?;
        Ok(session)
    }

    fn register(&mut self, name: &str, table: ScopedTable) -> Result<(), AccessError> {
        self.ctx
            .register_table(name, Arc::new(table))
            .map_err(AccessError::internal)?;
        self.tables.push(name.to_owned());
        Ok(())
    }

    async fn add_views(&mut self, access: &Access, who: &Principal) -> Result<(), AccessError> {
        let views = atlas_viewstore::ViewStore::new(access.lake.clone())
            .list()
            .await
            .map_err(AccessError::internal)?;
        for view in views {
            let decision = access.decide_unnoted(who, &view.resource_type, Action::Search);
            let Decision::Allow(grant) = &decision else {
                continue;
            };
            if grant.deid.is_some() {
                continue;
            }
            let dir = atlas_viewstore::view_table_dir(&view.name);
            // A view not yet materialized has no table to offer.
            let Ok(version) = access.tables.latest_version(&dir).await else {
                continue;
            };
            let inner = access.tables.provider(&dir, version).await?;
            let pcol = view.patient_column.as_deref();
            let Ok(scope) = scope_predicate(pcol, &grant.rows) else {
                // Patient-bound, and the view has no patient column.
                continue;
            };
            let hidden = crate::policy::hidden_columns(
                &crate::policy::column_elements(&view.definition),
                grant,
            );
            let mut table = ScopedTable::new(inner, scope, &hidden, pcol, self.egress.clone())?;
            table.decisions = vec![(view.resource_type.clone(), decision.clone())];
            self.register(&view.name, table)?;
        }
        Ok(())
    }

    /// `resources`: the live rows of every type `who` may read whole (no
    /// hidden elements, no de-identification), each inside its row scope.
    async fn add_resources(&mut self, access: &Access, who: &Principal) -> Result<(), AccessError> {
        // Types grouped by their row scope: one `IN` list per scope.
        let mut groups: Vec<(RowScope, Vec<&str>)> = Vec::new();
        let mut decisions = Vec::new();
        for &t in atlas_fhir::R4_RESOURCE_TYPES {
            let decision = access.decide_unnoted(who, t, Action::Search);
            let Decision::Allow(grant) = &decision else {
                continue;
            };
            if grant.deid.is_some() || !grant.hidden.is_empty() {
                continue;
            }
            match groups.iter_mut().find(|(s, _)| *s == grant.rows) {
                Some((_, types)) => types.push(t),
                None => groups.push((grant.rows.clone(), vec![t])),
            }
            decisions.push((t.to_owned(), decision));
        }
        let mut any: Option<Expr> = None;
        for (scope, types) in &groups {
            let list = types.iter().map(|t| lit(*t)).collect();
            let mut rows = col("resource_type").in_list(list, false);
            match scope_predicate(Some("patient_id"), scope) {
                Ok(Some(s)) => rows = rows.and(s),
                Ok(None) => {}
                Err(_) => continue,
            }
            any = Some(match any {
                Some(a) => a.or(rows),
                None => rows,
            });
        }
        let Some(rows) = any else { return Ok(()) };
        let Ok(version) = crate::tables::store_version(&access.tables).await else {
            return Ok(());
        };
        let inner = access
            .tables
            .provider(crate::tables::STORE_DIR, version)
            .await?;
        let scope = col("deleted").eq(lit(false)).and(rows);
        let mut table = ScopedTable::new(
            inner,
            Some(scope),
            &Default::default(),
            Some("patient_id"),
            self.egress.clone(),
        )?;
        table.decisions = decisions;
        self.register("resources", table)
    }

    /// Runs `sql` (already [`check`]ed) and collects its answer, bounded
    /// by the limits.
    pub async fn run(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), AccessError> {
        check(sql, &self.limits)?;
        let options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_dml(false)
            .with_allow_statements(false);
        let seconds = self.limits.timeout_secs;
        let work = async {
            let df = self
                .ctx
                .sql_with_options(sql, options)
                .await
                .map_err(|e| self.explain(e))?;
            let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
            // One row past the limit tells an answer that fits from one
            // that does not, without computing the rest.
            let df = df
                .limit(0, Some(self.limits.max_rows + 1))
                .map_err(|e| self.explain(e))?;
            let batches = df.collect().await.map_err(|e| self.explain(e))?;
            Ok::<_, AccessError>((schema, batches))
        };
        let (schema, batches) = tokio::time::timeout(Duration::from_secs(seconds), work)
            .await
            .map_err(|_| {
                AccessError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "SqlTimeout",
                    "query",
                    "…",
                    format!("the query ran longer than {seconds} s ([sql] timeout_secs)"),
                )
            })??;
        let rows: usize = batches.iter().map(RecordBatch::num_rows).sum();
        if rows > self.limits.max_rows {
            return Err(AccessError::new(
                StatusCode::BAD_REQUEST,
                "SqlTooManyRows",
                "query",
                "…",
                format!(
                    "the answer has more than {} rows ([sql] max_rows); add a LIMIT or aggregate",
                    self.limits.max_rows
                ),
            ));
        }
        self.egress.computed_rows(rows as u64);
        Ok((schema, batches))
    }

    /// A DataFusion error as the caller sees it: planning errors (unknown
    /// tables and columns, type errors) and execution errors name what the
    /// query did wrong; running out of memory names the limit.
    fn explain(&self, e: datafusion::error::DataFusionError) -> AccessError {
        use datafusion::error::DataFusionError as E;
        match e.find_root() {
            E::ResourcesExhausted(_) => AccessError::new(
                StatusCode::BAD_REQUEST,
                "SqlMemoryExceeded",
                "query",
                "…",
                format!(
                    "the query needs more than {} MiB of memory ([sql] memory_mb)",
                    self.limits.memory_mb
                ),
            ),
            E::Plan(_) | E::SQL(..) | E::SchemaError(..) | E::NotImplemented(_) => {
                let mut m = e.strip_backtrace();
                if m.contains("table") && m.contains("not found") {
                    m.push_str(&format!("; tables: {}", self.tables.join(", ")));
                }
                invalid(m)
            }
            _ => AccessError::new(
                StatusCode::BAD_REQUEST,
                "SqlFailed",
                "query",
                "…",
                e.strip_backtrace(),
            ),
        }
    }
}

/// A table as one grant sees it: the inner table's rows inside `scope`,
/// without the hidden columns.
#[derive(Debug)]
pub struct ScopedTable {
    inner: Arc<dyn TableProvider>,
    scope: Option<Expr>,
    /// The visible columns (names, in the inner table's order).
    schema: SchemaRef,
    patient: Option<String>,
    egress: EgressHandle,
    /// The decisions behind the table, noted when a query reads it.
    decisions: Vec<(String, Decision)>,
}

/// [`Egress`] for `Debug` (a table provider must be).
#[derive(Clone)]
struct EgressHandle(Egress);

impl fmt::Debug for EgressHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Egress")
    }
}

impl ScopedTable {
    fn new(
        inner: Arc<dyn TableProvider>,
        scope: Option<Expr>,
        hidden: &std::collections::BTreeSet<String>,
        patient: Option<&str>,
        egress: Egress,
    ) -> Result<ScopedTable, AccessError> {
        let full = inner.schema();
        let keep: Vec<usize> = (0..full.fields().len())
            .filter(|&i| !hidden.contains(full.field(i).name()))
            .collect();
        let schema = Arc::new(full.project(&keep).map_err(AccessError::internal)?);
        Ok(ScopedTable {
            inner,
            scope,
            schema,
            patient: patient.map(str::to_owned),
            egress: EgressHandle(egress),
            decisions: Vec::new(),
        })
    }
}

#[async_trait::async_trait]
impl TableProvider for ScopedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    /// The scoped rows, with the requested columns and the patient key
    /// (for the audit record; dropped again by [`ScopeExec`]). The query's
    /// filters and limit are not taken: they run above the scope.
    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        for (t, d) in &self.decisions {
            self.egress.0.decision(t, d);
        }
        let names: Vec<String> = match projection {
            Some(p) => p
                .iter()
                .map(|&i| self.schema.field(i).name().clone())
                .collect(),
            None => self
                .schema
                .fields()
                .iter()
                .map(|f| f.name().clone())
                .collect(),
        };
        let mut cols: Vec<Expr> = names.iter().map(|n| col(n.as_str())).collect();
        let noted = match &self.patient {
            Some(p) => {
                cols.push(col(p.as_str()).alias(PATIENT));
                Some(names.len())
            }
            None => None,
        };
        let mut b =
            LogicalPlanBuilder::scan("scoped", provider_as_source(self.inner.clone()), None)?;
        if let Some(s) = &self.scope {
            b = b.filter(s.clone())?;
        }
        let plan = b.project(cols)?.build()?;
        let input = state.create_physical_plan(&plan).await?;
        let out = Arc::new(
            input
                .schema()
                .project(&(0..names.len()).collect::<Vec<_>>())?,
        );
        Ok(Arc::new(ScopeExec::new(
            input,
            out,
            noted,
            self.egress.0.clone(),
        )))
    }
}

/// The alias the patient key travels under between the scan and
/// [`ScopeExec`].
const PATIENT: &str = "__atlas_patient";

/// The scope barrier: passes the scoped scan's batches on, notes their
/// patients, and drops the audit-only column. It takes no filter, limit or
/// projection from above and reports no statistics, so nothing the query
/// computes reaches below it.
#[derive(Debug)]
pub struct ScopeExec {
    input: Arc<dyn ExecutionPlan>,
    schema: SchemaRef,
    noted: Option<usize>,
    egress: EgressHandle,
    properties: Arc<PlanProperties>,
}

impl ScopeExec {
    fn new(
        input: Arc<dyn ExecutionPlan>,
        schema: SchemaRef,
        noted: Option<usize>,
        egress: Egress,
    ) -> ScopeExec {
        let partitions = input.properties().partitioning.partition_count();
        let properties = Arc::new(PlanProperties::new(
            EquivalenceProperties::new(schema.clone()),
            Partitioning::UnknownPartitioning(partitions),
            EmissionType::Incremental,
            Boundedness::Bounded,
        ));
        ScopeExec {
            input,
            schema,
            noted,
            egress: EgressHandle(egress),
            properties,
        }
    }
}

impl DisplayAs for ScopeExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ScopeExec")
    }
}

impl ExecutionPlan for ScopeExec {
    fn name(&self) -> &str {
        "ScopeExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    /// The barrier holds no expressions of its own.
    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(
            &Arc<dyn datafusion::physical_expr::PhysicalExpr>,
        ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion>,
    ) -> DfResult<datafusion::common::tree_node::TreeNodeRecursion> {
        Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let input = children.into_iter().next().unwrap_or(self.input.clone());
        Ok(Arc::new(ScopeExec::new(
            input,
            self.schema.clone(),
            self.noted,
            self.egress.0.clone(),
        )))
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        let input = self.input.execute(partition, context)?;
        let keep: Vec<usize> = (0..self.schema.fields().len()).collect();
        let noted = self.noted;
        let egress = self.egress.0.clone();
        let schema = self.schema.clone();
        let out = input.map(move |b| {
            let b = b?;
            if let Some(i) = noted {
                egress.read_by_query(b.column(i));
            }
            Ok(b.project(&keep)?)
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, out)))
    }
}
