//! [`Egress`]: the only place a row or a resource leaves Atlas.
//!
//! # Contract
//! Every path that answers with data from the lake (object-set pages and
//! streams, aggregates, GraphQL, FHIR read/search/`$everything` and its
//! NDJSON, view rows, SQL, and whatever comes next: Bulk export, events,
//! AI context) hands each row or resource to an `Egress` release right
//! before it is encoded, and encodes only what the release returns. A
//! release, for every row or resource it lets out:
//!
//! 1. **notes the patient** it belongs to in the request's audit facts
//!    (rows of no patient note nothing; aggregates mark the patients as
//!    not counted rather than claim none);
//! 2. **counts** it in the record's `rows`;
//! 3. **removes what the grant hides**: object properties and view columns
//!    that read a hidden element path are not written, and hidden elements
//!    are removed from resource JSON;
//! 4. **applies the grant's de-identification**: a resource is
//!    de-identified by the grant's engine (its id hashed as the engine
//!    says); rows and objects carry identified values (names, dates, ids),
//!    so a de-identifying grant is refused for them here, whatever the
//!    caller decided before.
//!
//! The release decides nothing about *which* rows leave: that is the
//! scoped scan's job ([`crate::query::Planner::scan`]); the egress is what
//! makes the answer's shape and its audit facts match the grant.
//!
//! An `Egress` carries its request's facts handle, taken when it is made:
//! releases may run on other tasks (a streamed body's later polls,
//! DataFusion partitions, GraphQL's batched loads) and still note into the
//! right record.
//!
//! Mutation check (`scripts/egress-mutants.sh`): the lines marked
//! `duty:` below are each disabled in turn, and the access tests fail for
//! every one.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use arrow::array::{Array, ArrayRef, RecordBatch};
use arrow::datatypes::Schema;
use atlas_ontology::{ObjectType, Property};
use atlas_policy::Grant;

use crate::facts::{self, Facts};
use crate::query::ObjectWriter;
use crate::text::{text, utf8};
use crate::{Access, AccessError};

/// The request's way out. Cheap to clone; clones note into the same
/// record.
#[derive(Clone, Default)]
pub struct Egress {
    facts: Option<Arc<Mutex<Facts>>>,
}

impl Egress {
    /// The egress of the request running on this task (its audit facts);
    /// outside a request, one that notes nothing.
    pub fn for_request() -> Egress {
        Egress {
            facts: facts::current(),
        }
    }

    /// An egress noting into `facts`: a long-lived connection's record
    /// (an SSE connection, a subscription's deliveries), not a request's.
    pub fn with_facts(facts: Arc<Mutex<Facts>>) -> Egress {
        Egress { facts: Some(facts) }
    }

    /// One change notice without its resource (a delete): counted, its
    /// patient noted.
    pub fn notice(&self, patient: Option<&str>) {
        self.patient(patient);
        self.count(1);
    }

    /// Notes a patient an answer is about without counting a row (a
    /// FHIRcast context's patient).
    pub fn note_patient(&self, patient: &str) {
        self.patient(Some(patient));
    }

    fn note(&self, f: impl FnOnce(&mut Facts)) {
        if let Some(x) = &self.facts {
            facts::note_into(x, f);
        }
    }

    /// Counts `n` rows answered.
    fn count(&self, n: u64) {
        self.note(|f| f.rows += n); // duty: count
    }

    /// Notes one answered patient.
    fn patient(&self, p: Option<&str>) {
        if let Some(p) = p {
            self.note(|f| facts::add_patient(f, p)); // duty: patient-note
        }
    }

    /// Notes the patients of a column of a batch, and counts its rows.
    fn batch_answered(&self, patients: Option<&ArrayRef>, rows: usize) {
        self.count(rows as u64);
        let Some(col) = patients else { return };
        let Ok(col) = utf8(col) else { return };
        if let Some(x) = &self.facts {
            facts::note_into(x, |f| {
                for row in 0..rows {
                    if let Some(p) = text(col.as_ref(), row) {
                        facts::add_patient(f, p); // duty: patient-note
                    }
                }
            });
        }
    }

    /// The patients of rows a query read to compute its answer (SQL: an
    /// answer's rows need not carry a patient key, so the scans note it).
    pub fn read_by_query(&self, patients: &ArrayRef) {
        let Ok(col) = utf8(patients) else { return };
        if let Some(x) = &self.facts {
            facts::note_into(x, |f| {
                for row in 0..col.len() {
                    if let Some(p) = text(col.as_ref(), row) {
                        facts::add_patient(f, p); // duty: patient-note
                    }
                }
            });
        }
    }

    /// `n` rows of a computed answer (SQL), counted.
    pub fn computed_rows(&self, n: u64) {
        self.count(n);
    }

    /// An access decision behind what this egress lets out, noted.
    pub fn decision(&self, resource_type: &str, d: &atlas_policy::Decision) {
        self.note(|f| facts::add_decision(f, resource_type, d));
    }

    /// `n` aggregate groups answered: counted, and the record says the
    /// patients behind them are not counted (`null`, not 0).
    pub fn aggregates(&self, n: u64) {
        self.count(n);
        self.note(|f| f.patients_unknown = true);
    }

    /// Objects of type `t` written as JSON, with the properties `props`
    /// (the caller's selection) less those the grant hides.
    pub fn objects<'t>(
        &self,
        t: &'t ObjectType,
        grant: &Grant,
        props: Vec<&'t Property>,
    ) -> Result<ObjectRelease<'t>, AccessError> {
        refuse_deid(grant, &t.api_name)?;
        let hidden = crate::policy::hidden_properties(t, grant);
        let props = props
            .into_iter()
            .filter(|p| !hidden.contains(&p.api_name)) // duty: hidden-field
            .collect();
        let patient = t
            .patient_property
            .as_deref()
            .and_then(|p| t.property(p))
            .map(|p| p.column.clone());
        Ok(ObjectRelease {
            egress: self.clone(),
            t,
            props,
            patient,
        })
    }

    /// Arrow batches of object type `t` whose columns are named by
    /// property api names (object-set streams).
    pub fn object_batches(
        &self,
        t: &ObjectType,
        grant: &Grant,
        patient_column: Option<&str>,
    ) -> Result<BatchRelease, AccessError> {
        refuse_deid(grant, &t.api_name)?;
        Ok(self.batches(crate::policy::hidden_properties(t, grant), patient_column))
    }

    /// Arrow batches of a view's rows, columns by their view names.
    pub fn view_batches(
        &self,
        view: &str,
        definition: &serde_json::Value,
        grant: &Grant,
        patient_column: Option<&str>,
    ) -> Result<BatchRelease, AccessError> {
        refuse_deid(grant, view)?;
        let hidden =
            crate::policy::hidden_columns(&crate::policy::column_elements(definition), grant);
        Ok(self.batches(hidden, patient_column))
    }

    fn batches(&self, hidden: BTreeSet<String>, patient_column: Option<&str>) -> BatchRelease {
        BatchRelease {
            egress: self.clone(),
            hidden,
            patient: patient_column.map(str::to_owned),
        }
    }

    /// FHIR resources; [`ResourceRelease::admit`] each type's grant first.
    pub fn resources(&self) -> ResourceRelease {
        ResourceRelease {
            egress: self.clone(),
            types: HashMap::new(),
        }
    }
}

/// Rows and objects carry identified values: a de-identifying grant reads
/// FHIR resources only.
fn refuse_deid(grant: &Grant, what: &str) -> Result<(), AccessError> {
    // The planner refuses these grants first (`query::allowed_rows`); this
    // keeps a path that forgets from letting identified rows out.
    if grant.deid.is_some() {
        return Err(crate::deid::refused(
            "objectType",
            what,
            "this path returns identified values; use FHIR search (/fhir/{type}?code=…)",
        ));
    }
    Ok(())
}

/// Writes objects of one type as JSON (see [`Egress::objects`]).
pub struct ObjectRelease<'t> {
    egress: Egress,
    t: &'t ObjectType,
    props: Vec<&'t Property>,
    /// The patient key column, when the type has one.
    patient: Option<String>,
}

impl<'t> ObjectRelease<'t> {
    /// The properties each object carries.
    pub fn properties(&self) -> &[&'t Property] {
        &self.props
    }

    /// A writer for the rows of `b` (column positions worked out once).
    pub fn batch(&self, b: &RecordBatch, pk: &str, title: &str) -> ObjectBatch<'_, 't> {
        let schema = b.schema();
        ObjectBatch {
            release: self,
            writer: ObjectWriter::new(self.t, &self.props, schema.as_ref(), pk, title),
            patients: self
                .patient
                .as_deref()
                .and_then(|c| b.column_by_name(c))
                .and_then(|c| utf8(c).ok()),
        }
    }
}

/// [`ObjectRelease`] over the rows of one batch.
pub struct ObjectBatch<'r, 't> {
    release: &'r ObjectRelease<'t>,
    writer: ObjectWriter,
    patients: Option<ArrayRef>,
}

impl ObjectBatch<'_, '_> {
    /// Writes row `row` of `b` (the batch this was made for) as one
    /// object: its patient noted, counted.
    pub fn write(&self, out: &mut Vec<u8>, b: &RecordBatch, row: usize) {
        let egress = &self.release.egress;
        if let Some(c) = &self.patients {
            egress.patient(text(c.as_ref(), row));
        }
        egress.count(1);
        self.writer.write(out, b, row);
    }
}

/// Lets Arrow batches out (see [`Egress::object_batches`],
/// [`Egress::view_batches`]).
pub struct BatchRelease {
    egress: Egress,
    hidden: BTreeSet<String>,
    /// The patient key column; dropped after noting when its name starts
    /// with `__` (it came along for the audit only).
    patient: Option<String>,
}

impl BatchRelease {
    /// The schema released batches have, given the plan's.
    pub fn schema(&self, schema: &Schema) -> Result<Arc<Schema>, AccessError> {
        let keep = self.keep(schema);
        schema
            .project(&keep)
            .map(Arc::new)
            .map_err(AccessError::internal)
    }

    fn keep(&self, schema: &Schema) -> Vec<usize> {
        let internal = self.patient.as_deref().filter(|p| p.starts_with("__"));
        (0..schema.fields().len())
            .filter(|&i| !self.hidden.contains(schema.field(i).name())) // duty: hidden-field
            .filter(|&i| Some(schema.field(i).name().as_str()) != internal)
            .collect()
    }

    /// The batch as it may leave: patients noted, rows counted, hidden
    /// and audit-only columns removed.
    pub fn release(&self, b: &RecordBatch) -> Result<RecordBatch, AccessError> {
        let patients = self.patient.as_deref().and_then(|c| b.column_by_name(c));
        self.egress.batch_answered(patients, b.num_rows());
        b.project(&self.keep(b.schema().as_ref()))
            .map_err(AccessError::internal)
    }
}

/// Per resource type, what leaves differently from the stored JSON: hidden
/// elements removed and, for a de-identifying grant, the resource
/// de-identified. Types with neither go out byte for byte.
#[derive(Clone)]
pub struct ResourceRelease {
    egress: Egress,
    types: HashMap<String, (Grant, Option<Arc<atlas_deid::Deidentifier>>)>,
}

/// A resource as it leaves: its JSON and the id it goes out under (hashed
/// when de-identified; `None` when the engine removes it).
pub struct Released<'a> {
    pub json: Cow<'a, str>,
    pub id: Option<Cow<'a, str>>,
}

impl ResourceRelease {
    /// Registers the grant `resource_type` is read under.
    pub fn admit(
        &mut self,
        access: &Access,
        resource_type: &str,
        grant: &Grant,
    ) -> Result<(), AccessError> {
        let engine = match &grant.deid {
            Some(spec) => Some(access.deid.get(spec)?),
            None => None,
        };
        if !grant.hidden.is_empty() || engine.is_some() {
            self.types
                .insert(resource_type.to_owned(), (grant.clone(), engine));
        }
        Ok(())
    }

    /// The resource `json` of `resource_type`/`id`, belonging to `patient`,
    /// as it may leave: patient noted, counted, hidden elements removed,
    /// de-identified when the grant says so.
    pub fn release<'a>(
        &self,
        resource_type: &str,
        id: &'a str,
        json: &'a str,
        patient: Option<&str>,
    ) -> Released<'a> {
        self.egress.patient(patient);
        self.egress.count(1);
        let Some((grant, engine)) = self.types.get(resource_type) else {
            return Released {
                json: Cow::Borrowed(json),
                id: Some(Cow::Borrowed(id)),
            };
        };
        let base = match crate::policy::strip_resource(json, grant) {
            Some(s) if !grant.hidden.is_empty() => Cow::Owned(s), // duty: hidden-field
            _ => Cow::Borrowed(json),
        };
        let mut deidentify = None;
        deidentify = deidentify.or(engine.as_ref()); // duty: deid-resource
        match deidentify {
            Some(e) => {
                let (out, new_id) = crate::deid::apply(e, resource_type, &base, patient);
                Released {
                    json: Cow::Owned(out),
                    id: new_id.map(Cow::Owned),
                }
            }
            None => Released {
                json: base,
                id: Some(Cow::Borrowed(id)),
            },
        }
    }
}
