#!/usr/bin/env python3
"""View-flattening benchmark (not a test): Atlas vs DuckDB vs polars.

Builds the six core views (crates/atlas-ontology/builtin/views/: patient,
encounter, observation, observation_component, condition, medication_request)
from the same uncompressed NDJSON files with three engines in the same run, each
writing one Parquet file per view, and prints seconds, MB/s, resources/s, peak
RSS and the ratios atlas_vs_duckdb = duckdb_s / atlas_s, atlas_vs_polars =
polars_s / atlas_s, for:

  base  the 615-patient SMART NDJSON in ../shared (the five needed types,
        Patient Encounter Observation Condition MedicationRequest, gunzipped
        into the work dir first so every engine reads the same .ndjson bytes);
  xK    `atlas synth scale --factor K` of it; K defaults to
        ceil(2.1e9 / base bytes), i.e. >= 2 GB of input (the issue's size).

Engines (every engine runs in its own child process; peak RSS is exact per
child, measured with os.wait4):
  atlas   `atlas view run <view.json> <Type>.ndjson --format parquet --out ..`,
          one process per view (the CLI takes one view per call): seconds are
          the sum of the six, peak RSS the max. Decimals: Decimal128(38,18).
  duckdb  read_json_objects + ONE json_extract_string(json, [paths]) per line,
          list elements -> columns, COPY .. TO parquet; SET threads = --threads.
          Decimals: DOUBLE. Some view columns are cheaper JSONPath
          approximations (see DUCKDB_VIEWS), which favours DuckDB.
  polars  scan_ndjson with an explicit schema of only the needed fields,
          struct.field / list.first / list.eval expressions, sink_parquet.
          Decimals: Float64.
  MB are of the uncompressed input (the five types); resources are its lines.
  duckdb/polars seconds exclude Python start-up and imports (wall time of the
  child, including those, is in the JSON as *_wall_s), again in their favour.
  All engines write zstd level 1 Parquet, as Atlas does.
  Row counts of every peer's Parquet are checked against Atlas's (a WARNING line
  if they differ); --check-values also compares the cells column by column.

usage: bench/flatten.py [dataset-dir] [--factor K | --base-only] [--no-build]
                        [--work DIR] [--keep] [--threads N] [--engines atlas,duckdb,polars]
                        [--check-values] [--json FILE] [--setup]
  Python deps live in /work/main/.venv-bench (the script re-execs itself under
  it): `bench/flatten.py --setup` creates it (python3 -m venv .venv-bench &&
  .venv-bench/bin/pip install duckdb==1.5.5 polars pyarrow).
"""
import argparse
import gzip
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGET = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
ATLAS = os.path.join(TARGET, "release", "atlas")
VIEWS_DIR = os.path.join(ROOT, "crates", "atlas-ontology", "builtin", "views")
VENV = os.path.join(ROOT, ".venv-bench")
VENV_PY = os.path.join(VENV, "bin", "python")
PIP_DEPS = ["duckdb==1.5.5", "polars", "pyarrow"]
DEFAULT_DATA = os.path.join(ROOT, "..", "shared", "data", "fhir", "large", "smart-generated-sample-data-R4", "ndjson")
DEFAULT_WORK = "/var/tmp/atlas-bench-flatten"
TYPES = ["Patient", "Encounter", "Observation", "Condition", "MedicationRequest"]
# view name -> resource type (file <Type>.ndjson), in run order
VIEWS = [
    ("patient", "Patient"),
    ("encounter", "Encounter"),
    ("observation", "Observation"),
    ("observation_component", "Observation"),
    ("condition", "Condition"),
    ("medication_request", "MedicationRequest"),
]
TARGET_VS_DUCKDB = 3.0
TARGET_RSS_MIB = 1024
TARGET_INPUT_BYTES = 2e9
ENGINES = ["atlas", "duckdb", "polars"]
SETUP_HINT = (f"python deps missing: run `{sys.argv[0]} --setup` (or: python3 -m venv {VENV} && "
              f"{VENV}/bin/pip install {' '.join(PIP_DEPS)})")


# ----------------------------------------------------------------------------
# DuckDB: per view, the JSONPaths extracted with ONE json_extract_string call
# per line (v[1] is the first path), and the columns as SQL over v.
# Where the view does more than a cheap JSONPath can, the comment says so; each
# simplification makes DuckDB's job easier (the comparison is conservative).
# ----------------------------------------------------------------------------
def ref_key(x, typ):
    """getReferenceKey(Type): the id of a relative 'Type/id' reference, else NULL."""
    return f"CASE WHEN starts_with({x}, '{typ}/') THEN substr({x}, {len(typ) + 2}) END"


DUCKDB_VIEWS = {
    "patient": (
        ["$.id", "$.name[0].family", "$.name[0].given[0]", "$.gender", "$.birthDate",
         "$.deceasedDateTime", "$.deceasedBoolean", "$.maritalStatus.coding[0].code",
         "$.extension[0].extension[1].valueString", "$.extension[0].extension[0].valueCoding.display",
         "$.extension[1].extension[1].valueString", "$.extension[1].extension[0].valueCoding.display",
         "$.address[0].city", "$.address[0].state", "$.address[0].postalCode",
         "$.managingOrganization.reference", "$.meta.tag[0].system", "$.meta.tag[0].code",
         "$.meta.lastUpdated"],
        [
            "v[1] AS id",
            "v[1] AS patient_id",
            # SIMPLER: name.first() instead of name.where(use='official') with fallback to name.first()
            "v[2] AS family",
            "v[3] AS given",
            "v[4] AS gender",
            "v[5] AS birth_date",
            "(v[6] IS NOT NULL OR coalesce(v[7] = 'true', false)) AS deceased",
            "v[6] AS deceased_date_time",
            "2026 - TRY_CAST(substr(v[5], 1, 4) AS BIGINT) - CASE WHEN substr(v[5], 6, 5) > '01-01' THEN 1 ELSE 0 END AS age",
            "v[8] AS marital_status",
            # SIMPLER: positional extension[0]/[1] with sub-extensions [1]=text, [0]=ombCategory (Synthea's
            # layout) instead of extension('...us-core-race' / '...us-core-ethnicity') + extension('text'/'ombCategory')
            "coalesce(v[9], v[10]) AS race",
            "coalesce(v[11], v[12]) AS ethnicity",
            # SIMPLER: address.first() instead of address.where(use='home') with fallback to address.first()
            "v[13] AS city",
            "v[14] AS state",
            "v[15] AS postal_code",
            ref_key("v[16]", "Organization") + " AS managing_organization",
            # SIMPLER: only the first meta.tag is tested, not meta.tag.where(...).exists()
            "coalesce((v[17] = 'http://terminology.hl7.org/CodeSystem/v3-ActReason' AND v[18] = 'HTEST')"
            " OR (v[17] = 'https://smarthealthit.org/tags' AND starts_with(v[18], 'synthea')), false) AS is_synthetic",
            "'R4' AS fhir_version",
            "v[19] AS last_updated",
        ],
    ),
    "encounter": (
        ["$.id", "$.subject.reference", "$.status", "$.class.code", "$.type[0].coding[0].code",
         "$.type[0].coding[0].display", "$.type[0].text", "$.period.start", "$.period.end",
         "$.reasonCode[0].coding[0].code", "$.serviceProvider.reference", "$.participant[0].individual.reference"],
        [
            "v[1] AS id",
            ref_key("v[2]", "Patient") + " AS patient_id",
            "v[3] AS status",
            "v[4] AS class_code",
            "v[5] AS type_code",
            "coalesce(v[6], v[7]) AS type_display",
            "v[8] AS period_start",
            "v[9] AS period_end",
            "v[10] AS reason_code",
            ref_key("v[11]", "Organization") + " AS service_provider",
            # SIMPLER: the first participant's individual only, not the first participant that is a Practitioner
            ref_key("v[12]", "Practitioner") + " AS participant_practitioner",
        ],
    ),
    "observation": (
        ["$.id", "$.subject.reference", "$.encounter.reference", "$.status", "$.category[0].coding[0].code",
         "$.code.coding[0].system", "$.code.coding[0].code", "$.code.coding[0].display", "$.code.text",
         "$.valueQuantity.value", "$.valueQuantity.unit", "$.valueQuantity.code",
         "$.valueCodeableConcept.coding[0].code", "$.valueString", "$.valueBoolean",
         "$.effectiveDateTime", "$.effectiveInstant", "$.effectivePeriod.start", "$.issued"],
        [
            "v[1] AS id",
            ref_key("v[2]", "Patient") + " AS patient_id",
            ref_key("v[3]", "Encounter") + " AS encounter_id",
            "v[4] AS status",
            "v[5] AS category",
            "v[6] AS code_system",
            "v[7] AS code",
            "coalesce(v[8], v[9]) AS code_display",
            "CAST(v[10] AS DOUBLE) AS value_quantity",  # DOUBLE (f64), not exact Decimal128(38,18)
            "coalesce(v[11], v[12]) AS value_unit",
            "v[13] AS value_code",
            "v[14] AS value_string",
            "CAST(v[15] AS BOOLEAN) AS value_boolean",
            "coalesce(v[16], v[17], v[18]) AS effective",
            "v[19] AS issued",
        ],
    ),
    "observation_component": (
        ["$.id", "$.subject.reference", "$.encounter.reference"],
        [
            "v[1] AS id",
            ref_key("v[2]", "Patient") + " AS patient_id",
            ref_key("v[3]", "Encounter") + " AS encounter_id",
        ],
    ),
    "condition": (
        ["$.id", "$.subject.reference", "$.encounter.reference", "$.clinicalStatus.coding[0].code",
         "$.verificationStatus.coding[0].code", "$.code.coding[0].system", "$.code.coding[0].code",
         "$.code.coding[0].display", "$.code.text", "$.onsetDateTime", "$.onsetPeriod.start",
         "$.abatementDateTime", "$.abatementPeriod.start", "$.recordedDate"],
        [
            "v[1] AS id",
            ref_key("v[2]", "Patient") + " AS patient_id",
            ref_key("v[3]", "Encounter") + " AS encounter_id",
            "v[4] AS clinical_status",
            "v[5] AS verification_status",
            "v[6] AS code_system",
            "v[7] AS code",
            "coalesce(v[8], v[9]) AS code_display",
            "coalesce(v[10], v[11]) AS onset",
            "coalesce(v[12], v[13]) AS abatement",
            "v[14] AS recorded_date",
        ],
    ),
    "medication_request": (
        ["$.id", "$.subject.reference", "$.encounter.reference", "$.status", "$.intent",
         "$.medicationCodeableConcept.coding[0].code", "$.medicationCodeableConcept.coding[0].display",
         "$.medicationCodeableConcept.text", "$.medicationReference.reference", "$.authoredOn",
         "$.dosageInstruction[0].text", "$.requester.reference"],
        [
            "v[1] AS id",
            ref_key("v[2]", "Patient") + " AS patient_id",
            ref_key("v[3]", "Encounter") + " AS encounter_id",
            "v[4] AS status",
            "v[5] AS intent",
            "v[6] AS medication_code",
            "coalesce(v[7], v[8]) AS medication_display",
            ref_key("v[9]", "Medication") + " AS medication_ref",
            "v[10] AS authored_on",
            "v[11] AS dosage_text",
            # getReferenceKey() of any type: what follows the first '/'
            "substr(v[12], strpos(v[12], '/') + 1) AS requester",
        ],
    ),
}
# observation_component: the per-component paths, over c (one component) -> w
DUCKDB_COMPONENT = (
    ["$.code.coding[0].system", "$.code.coding[0].code", "$.code.coding[0].display", "$.code.text",
     "$.valueQuantity.value", "$.valueQuantity.unit", "$.valueQuantity.code",
     "$.valueCodeableConcept.coding[0].code", "$.valueString"],
    [
        "w[1] AS code_system",
        "w[2] AS code",
        "coalesce(w[3], w[4]) AS code_display",
        "CAST(w[5] AS DOUBLE) AS value_quantity",  # DOUBLE (f64)
        "coalesce(w[6], w[7]) AS value_unit",
        "w[8] AS value_code",
        "w[9] AS value_string",
    ],
)


def sql_list(paths):
    return "[" + ", ".join("'" + p + "'" for p in paths) + "]"


def duckdb_sql(view, src, out):
    src = src.replace("'", "''")
    out = out.replace("'", "''")
    read = f"read_json_objects('{src}', format = 'newline_delimited')"
    paths, cols = DUCKDB_VIEWS[view]
    if view != "observation_component":
        q = f"SELECT {', '.join(cols)} FROM (SELECT json_extract_string(json, {sql_list(paths)}) AS v FROM {read})"
    else:
        cpaths, ccols = DUCKDB_COMPONENT
        # forEach component: unnest the component array next to its 0-based index (%rowIndex)
        q = (f"SELECT {', '.join(cols)}, component_index, {', '.join(ccols)} FROM ("
             f" SELECT v, component_index, json_extract_string(c, {sql_list(cpaths)}) AS w FROM ("
             f"  SELECT v, unnest(comps) AS c, unnest(range(len(comps))) AS component_index FROM ("
             f"   SELECT json_extract_string(json, {sql_list(paths)}) AS v,"
             f"          json_extract(json, '$.component[*]') AS comps FROM {read})))")
    return f"COPY ({q}) TO '{out}' (FORMAT parquet, COMPRESSION zstd, COMPRESSION_LEVEL 1)"


def child_duckdb(data, out, threads):
    import duckdb
    con = duckdb.connect()
    con.execute(f"SET threads = {threads}")
    con.execute("SET preserve_insertion_order = false")  # DuckDB's advice for fast, lean COPY
    t0 = time.perf_counter()
    per_view = {}
    for view, typ in VIEWS:
        t = time.perf_counter()
        con.execute(duckdb_sql(view, os.path.join(data, typ + ".ndjson"), os.path.join(out, view + ".parquet")))
        per_view[view] = round(time.perf_counter() - t, 3)
    return time.perf_counter() - t0, per_view, {}


# ----------------------------------------------------------------------------
# polars: explicit schemas of only the needed fields (no inference, and no
# parsing of the rest), then the view's columns as expressions. Exact where
# polars can express the view (where(use=...), extension(url), participant that
# is a Practitioner); decimals are Float64.
# ----------------------------------------------------------------------------
def polars_plan(view, path):
    import polars as pl
    S = pl.Utf8
    coding = pl.Struct({"system": S, "code": S, "display": S})
    cc = pl.Struct({"coding": pl.List(coding), "text": S})
    ref = pl.Struct({"reference": S})
    qty = pl.Struct({"value": pl.Float64, "unit": S, "code": S})
    col = pl.col

    def key(e, typ):
        return pl.when(e.str.starts_with(typ + "/")).then(e.str.slice(len(typ) + 1))

    def first_code(e, field="code"):
        return e.struct.field("coding").list.first().struct.field(field)

    def display_or_text(e):
        return pl.coalesce(first_code(e, "display"), e.struct.field("text"))

    def first_where(lst, field, value):
        """lst.where(field = value).first() if any, else lst.first()."""
        hit = lst.list.eval(pl.element().filter(pl.element().struct.field(field) == value)).list.first()
        return pl.when(hit.is_not_null()).then(hit).otherwise(lst.list.first())

    def us_core(url):
        ext = col("extension").list.eval(pl.element().filter(pl.element().struct.field("url") == url)).list.first()
        sub = ext.struct.field("extension")
        text = sub.list.eval(pl.element().filter(pl.element().struct.field("url") == "text")).list.first()
        omb = sub.list.eval(pl.element().filter(pl.element().struct.field("url") == "ombCategory")).list.first()
        return pl.when(text.is_not_null()).then(text.struct.field("valueString")) \
            .otherwise(omb.struct.field("valueCoding").struct.field("display"))

    if view == "patient":
        schema = {
            "id": S, "gender": S, "birthDate": S, "deceasedBoolean": pl.Boolean, "deceasedDateTime": S,
            "name": pl.List(pl.Struct({"use": S, "family": S, "given": pl.List(S)})),
            "maritalStatus": cc,
            "extension": pl.List(pl.Struct({"url": S, "extension": pl.List(
                pl.Struct({"url": S, "valueString": S, "valueCoding": coding}))})),
            "address": pl.List(pl.Struct({"use": S, "city": S, "state": S, "postalCode": S})),
            "managingOrganization": ref,
            "meta": pl.Struct({"lastUpdated": S, "tag": pl.List(pl.Struct({"system": S, "code": S}))}),
        }
        name = first_where(col("name"), "use", "official")
        addr = first_where(col("address"), "use", "home")
        bd = col("birthDate")
        tag_sys = pl.element().struct.field("system")
        tag_code = pl.element().struct.field("code")
        synth = col("meta").struct.field("tag").list.eval(
            ((tag_sys == "http://terminology.hl7.org/CodeSystem/v3-ActReason") & (tag_code == "HTEST"))
            | ((tag_sys == "https://smarthealthit.org/tags") & tag_code.str.starts_with("synthea"))).list.any()
        exprs = [
            col("id"), col("id").alias("patient_id"),
            name.struct.field("family").alias("family"),
            name.struct.field("given").list.first().alias("given"),
            col("gender"), bd.alias("birth_date"),
            (col("deceasedDateTime").is_not_null() | col("deceasedBoolean").fill_null(False)).alias("deceased"),
            col("deceasedDateTime").alias("deceased_date_time"),
            (pl.lit(2026) - bd.str.slice(0, 4).cast(pl.Int64, strict=False)
             - pl.when(bd.str.slice(5, 5) > "01-01").then(1).otherwise(0)).alias("age"),
            first_code(col("maritalStatus")).alias("marital_status"),
            us_core("http://hl7.org/fhir/us/core/StructureDefinition/us-core-race").alias("race"),
            us_core("http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity").alias("ethnicity"),
            addr.struct.field("city").alias("city"),
            addr.struct.field("state").alias("state"),
            addr.struct.field("postalCode").alias("postal_code"),
            key(col("managingOrganization").struct.field("reference"), "Organization").alias("managing_organization"),
            synth.fill_null(False).alias("is_synthetic"),
            pl.lit("R4").alias("fhir_version"),
            col("meta").struct.field("lastUpdated").alias("last_updated"),
        ]
    elif view == "encounter":
        schema = {
            "id": S, "subject": ref, "status": S, "class": pl.Struct({"code": S}), "type": pl.List(cc),
            "period": pl.Struct({"start": S, "end": S}), "reasonCode": pl.List(cc), "serviceProvider": ref,
            "participant": pl.List(pl.Struct({"individual": ref})),
        }
        t0 = col("type").list.first()
        pract = col("participant").list.eval(
            pl.element().struct.field("individual").struct.field("reference")).list.eval(
            pl.element().filter(pl.element().str.starts_with("Practitioner/"))).list.first()
        exprs = [
            col("id"), key(col("subject").struct.field("reference"), "Patient").alias("patient_id"),
            col("status"), col("class").struct.field("code").alias("class_code"),
            first_code(t0).alias("type_code"), display_or_text(t0).alias("type_display"),
            col("period").struct.field("start").alias("period_start"),
            col("period").struct.field("end").alias("period_end"),
            first_code(col("reasonCode").list.first()).alias("reason_code"),
            key(col("serviceProvider").struct.field("reference"), "Organization").alias("service_provider"),
            pract.str.slice(len("Practitioner/")).alias("participant_practitioner"),
        ]
    elif view in ("observation", "observation_component"):
        schema = {
            "id": S, "subject": ref, "encounter": ref, "status": S, "category": pl.List(cc), "code": cc,
            "valueQuantity": qty, "valueCodeableConcept": cc, "valueString": S, "valueBoolean": pl.Boolean,
            "effectiveDateTime": S, "effectiveInstant": S, "effectivePeriod": pl.Struct({"start": S}), "issued": S,
            "component": pl.List(pl.Struct({"code": cc, "valueQuantity": qty, "valueCodeableConcept": cc,
                                            "valueString": S})),
        }
        if view == "observation_component":
            schema = {k: schema[k] for k in ("id", "subject", "encounter", "component")}
        head = [
            col("id"), key(col("subject").struct.field("reference"), "Patient").alias("patient_id"),
            key(col("encounter").struct.field("reference"), "Encounter").alias("encounter_id"),
        ]
        if view == "observation":
            q = col("valueQuantity")
            exprs = head + [
                col("status"), first_code(col("category").list.first()).alias("category"),
                first_code(col("code"), "system").alias("code_system"), first_code(col("code")).alias("code"),
                display_or_text(col("code")).alias("code_display"),
                q.struct.field("value").alias("value_quantity"),
                pl.coalesce(q.struct.field("unit"), q.struct.field("code")).alias("value_unit"),
                first_code(col("valueCodeableConcept")).alias("value_code"),
                col("valueString").alias("value_string"), col("valueBoolean").alias("value_boolean"),
                pl.coalesce(col("effectiveDateTime"), col("effectiveInstant"),
                            col("effectivePeriod").struct.field("start")).alias("effective"),
                col("issued"),
            ]
        else:
            c = col("component")
            q = c.struct.field("valueQuantity")
            exprs = [
                col("id"), col("patient_id"), col("encounter_id"), col("component_index"),
                first_code(c.struct.field("code"), "system").alias("code_system"),
                first_code(c.struct.field("code")).alias("code"),
                display_or_text(c.struct.field("code")).alias("code_display"),
                q.struct.field("value").alias("value_quantity"),
                pl.coalesce(q.struct.field("unit"), q.struct.field("code")).alias("value_unit"),
                first_code(c.struct.field("valueCodeableConcept")).alias("value_code"),
                c.struct.field("valueString").alias("value_string"),
            ]
            # forEach component: explode the list next to its 0-based index; no components -> no rows
            return (pl.scan_ndjson(path, schema=schema)
                    .filter(col("component").list.len() > 0)
                    .select(head + [col("component"),
                                    pl.int_ranges(0, col("component").list.len()).alias("component_index")])
                    .explode(["component", "component_index"])
                    .select(exprs))
    elif view == "condition":
        schema = {
            "id": S, "subject": ref, "encounter": ref, "clinicalStatus": cc, "verificationStatus": cc, "code": cc,
            "onsetDateTime": S, "onsetPeriod": pl.Struct({"start": S}),
            "abatementDateTime": S, "abatementPeriod": pl.Struct({"start": S}), "recordedDate": S,
        }
        exprs = [
            col("id"), key(col("subject").struct.field("reference"), "Patient").alias("patient_id"),
            key(col("encounter").struct.field("reference"), "Encounter").alias("encounter_id"),
            first_code(col("clinicalStatus")).alias("clinical_status"),
            first_code(col("verificationStatus")).alias("verification_status"),
            first_code(col("code"), "system").alias("code_system"), first_code(col("code")).alias("code"),
            display_or_text(col("code")).alias("code_display"),
            pl.coalesce(col("onsetDateTime"), col("onsetPeriod").struct.field("start")).alias("onset"),
            pl.coalesce(col("abatementDateTime"), col("abatementPeriod").struct.field("start")).alias("abatement"),
            col("recordedDate").alias("recorded_date"),
        ]
    elif view == "medication_request":
        schema = {
            "id": S, "subject": ref, "encounter": ref, "status": S, "intent": S, "medicationCodeableConcept": cc,
            "medicationReference": ref, "authoredOn": S, "dosageInstruction": pl.List(pl.Struct({"text": S})),
            "requester": ref,
        }
        med = col("medicationCodeableConcept")
        exprs = [
            col("id"), key(col("subject").struct.field("reference"), "Patient").alias("patient_id"),
            key(col("encounter").struct.field("reference"), "Encounter").alias("encounter_id"),
            col("status"), col("intent"), first_code(med).alias("medication_code"),
            display_or_text(med).alias("medication_display"),
            key(col("medicationReference").struct.field("reference"), "Medication").alias("medication_ref"),
            col("authoredOn").alias("authored_on"),
            col("dosageInstruction").list.first().struct.field("text").alias("dosage_text"),
            col("requester").struct.field("reference").str.split("/").list.last().alias("requester"),
        ]
    else:
        raise KeyError(view)
    return pl.scan_ndjson(path, schema=schema).select(exprs)


def child_polars(data, out, threads):
    import polars as pl
    t0 = time.perf_counter()
    per_view, skipped = {}, {}
    for view, typ in VIEWS:
        t = time.perf_counter()
        dest = os.path.join(out, view + ".parquet")
        try:
            polars_plan(view, os.path.join(data, typ + ".ndjson")).sink_parquet(dest, compression="zstd", compression_level=1)
        except Exception as e:  # say so rather than fake it
            skipped[view] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
        per_view[view] = round(time.perf_counter() - t, 3)
    return time.perf_counter() - t0, per_view, skipped


def child_main(engine, data, out, threads):
    """Runs in the child process: build the six views, print a JSON line."""
    secs, per_view, skipped = {"duckdb": child_duckdb, "polars": child_polars}[engine](data, out, threads)
    print(json.dumps({"seconds": secs, "per_view": per_view, "skipped": skipped}))


# ----------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------
def rss_of(cmd, env=None):
    """Peak RSS of one command, measured with wait4 (exact per child)."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    errs = []
    reader = threading.Thread(target=lambda: errs.append(p.stderr.read()))  # no pipe deadlock
    reader.start()
    out = p.stdout.read()
    reader.join()
    err = errs[0]
    _, status, usage = os.wait4(p.pid, 0)
    secs = time.perf_counter() - t
    if status != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{err.decode()}")
    return secs, usage.ru_maxrss / 1024, out.decode(), err.decode()


def count_lines(path):
    n = 0
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 24)
            if not b:
                return n
            n += b.count(b"\n")


def dataset_info(d):
    """Bytes and resources (lines) of the five types; cached in d/.flatten-info.json."""
    cache = os.path.join(d, ".flatten-info.json")
    if os.path.exists(cache):
        return json.load(open(cache))
    info = {"bytes": sum(os.path.getsize(os.path.join(d, t + ".ndjson")) for t in TYPES),
            "resources": sum(count_lines(os.path.join(d, t + ".ndjson")) for t in TYPES)}
    json.dump(info, open(cache, "w"))
    return info


def complete(d):
    return os.path.exists(os.path.join(d, ".flatten-info.json")) and \
        all(os.path.exists(os.path.join(d, t + ".ndjson")) for t in TYPES)


def prepare_base(src, work):
    base = os.path.join(work, "base")
    if complete(base):
        return base
    shutil.rmtree(base, ignore_errors=True)
    os.makedirs(base)
    for t in TYPES:
        plain, gz = os.path.join(src, t + ".ndjson"), os.path.join(src, t + ".ndjson.gz")
        if os.path.exists(plain):
            shutil.copyfile(plain, os.path.join(base, t + ".ndjson"))
        elif os.path.exists(gz):
            with gzip.open(gz, "rb") as fi, open(os.path.join(base, t + ".ndjson"), "wb") as fo:
                shutil.copyfileobj(fi, fo, 1 << 22)
        else:
            sys.exit(f"MISSING: {t}.ndjson(.gz) in {src}")
    dataset_info(base)
    return base


def prepare_scaled(base, work, factor):
    scaled = os.path.join(work, f"x{factor}")
    if complete(scaled):
        print(f"# reusing {scaled}")
        return scaled
    shutil.rmtree(scaled, ignore_errors=True)
    t = time.perf_counter()
    subprocess.run([ATLAS, "--quiet", "synth", "scale", "--factor", str(factor),
                    *[os.path.join(base, t + ".ndjson") for t in TYPES], "--out", scaled], check=True,
                   stdout=subprocess.DEVNULL)
    missing = [t for t in TYPES if not os.path.exists(os.path.join(scaled, t + ".ndjson"))]
    if missing:
        sys.exit(f"atlas synth scale wrote no {missing} in {scaled}: {os.listdir(scaled)}")
    dataset_info(scaled)
    print(f"# scaled x{factor} in {time.perf_counter() - t:.1f} s -> {scaled}")
    return scaled


def run_atlas(data, out):
    """One `atlas views flatten` pass: each line parsed once, all six views."""
    files = [os.path.join(data, t + ".ndjson") for t in TYPES]
    secs, rss, stdout, _ = rss_of([ATLAS, "--quiet", "views", "flatten", "--json", "--out", out, *files])
    report = json.loads(stdout)
    if report.get("rejected") or report.get("eval_errors"):
        print(f"WARNING: atlas rejected {report['rejected']} lines, {report['eval_errors']} evaluation errors: "
              f"{report.get('first_errors')}")
    return {"seconds": secs, "wall_s": secs, "rss": rss, "per_view": {"all": round(secs, 3)}, "skipped": {}}


def run_peer(engine, data, out, threads):
    env = dict(os.environ, POLARS_MAX_THREADS=str(threads))
    wall, rss, stdout, _ = rss_of([sys.executable, os.path.abspath(__file__), "--child", engine, data, out,
                                   "--threads", str(threads)], env=env)
    r = json.loads(stdout.strip().splitlines()[-1])
    return {"seconds": r["seconds"], "wall_s": wall, "rss": rss, "per_view": r["per_view"], "skipped": r["skipped"]}


def parquet_rows(path):
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows if os.path.exists(path) else None


def check_values(label, engine, ref_dir, dir_):
    """Cell-by-cell comparison with Atlas's Parquet, sorted by the view's key; prints differing columns."""
    import polars as pl
    for view, _ in VIEWS:
        a_path, b_path = os.path.join(ref_dir, view + ".parquet"), os.path.join(dir_, view + ".parquet")
        if not os.path.exists(b_path):
            continue
        keys = ["id", "component_index"] if view == "observation_component" else ["id"]
        a, b = pl.read_parquet(a_path), pl.read_parquet(b_path)
        if a.height != b.height:
            continue  # the row-count check has warned
        a = a.with_columns(pl.col(pl.Decimal).cast(pl.Float64)).sort(keys)
        b = b.sort(keys)
        diffs = []
        for c in a.columns:
            if c not in b.columns:
                diffs.append(f"{c}: missing")
                continue
            x, y = a[c], b[c].cast(a[c].dtype, strict=False)
            if x.dtype == pl.Float64:
                bad = ~(((x - y).abs() <= 1e-9 * x.abs().clip(lower_bound=1.0)) | (x.is_null() & y.is_null()))
                bad = bad.fill_null(True)
            else:
                bad = x.ne_missing(y)
            n = int(bad.sum())
            if n:
                diffs.append(f"{c}: {n} rows differ")
        extra = [c for c in b.columns if c not in a.columns]
        if extra:
            diffs.append(f"extra columns {extra}")
        print(f"#   values {label}/{view} {engine} vs atlas: " + ("identical" if not diffs else "; ".join(diffs)))


def fmt(x, nd=1):
    return "-" if x is None else f"{x:,.{nd}f}"


def bench(label, data, work, engines, threads, values):
    info = dataset_info(data)
    mb = info["bytes"] / 1e6
    print(f"# {label}: {mb:,.1f} MB uncompressed ({', '.join(TYPES)}), {info['resources']:,} resources, {data}")
    outs, results = {}, {}
    for engine in engines:
        out = os.path.join(work, f"out-{label}-{engine}")
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(out)
        outs[engine] = out
        r = run_atlas(data, out) if engine == "atlas" else run_peer(engine, data, out, threads)
        results[engine] = r
        print(f"#   {engine}: {r['seconds']:.2f} s, peak RSS {r['rss']:.0f} MiB, per view {r['per_view']}")
        for view, why in r["skipped"].items():
            print(f"#   NOT BUILT: {engine} cannot build view {view}: {why}")
    rows = []
    atlas = results.get("atlas")
    for engine in engines:
        r = results[engine]
        row = {
            "dataset": label, "engine": engine, "uncompressed_mb": round(mb, 1), "resources": info["resources"],
            "seconds": round(r["seconds"], 2), "wall_s": round(r["wall_s"], 2),
            "mb_s": round(mb / r["seconds"], 1), "resources_s": round(info["resources"] / r["seconds"]),
            "peak_rss_mib": round(r["rss"]), "per_view_s": r["per_view"], "views_not_built": sorted(r["skipped"]),
        }
        if atlas and engine != "atlas":
            row["atlas_vs_" + engine] = round(r["seconds"] / atlas["seconds"], 3)
        if atlas and engine != "atlas":
            for view, _ in VIEWS:
                na, nb = parquet_rows(os.path.join(outs["atlas"], view + ".parquet")), \
                    parquet_rows(os.path.join(outs[engine], view + ".parquet"))
                if nb is not None and na != nb:
                    print(f"WARNING: {label}/{view}: {engine} wrote {nb} rows, atlas {na}")
            if values:
                check_values(label, engine, outs["atlas"], outs[engine])
        rows.append(row)
        print(json.dumps(row))
    for engine in engines:
        shutil.rmtree(outs[engine], ignore_errors=True)
    return rows


def print_summary(rows, cmdline):
    print()
    hdr = f"{'dataset':<8} {'engine':<7} {'input MB':>9} {'seconds':>8} {'MB/s':>7} {'res/s':>10} {'peak RSS MiB':>12}" \
          f"  {'atlas_vs':>8}"
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        vs = r.get("atlas_vs_" + r["engine"])
        print(f"{r['dataset']:<8} {r['engine']:<7} {r['uncompressed_mb']:>9,.1f} {r['seconds']:>8.2f} {r['mb_s']:>7.1f}"
              f" {r['resources_s']:>10,} {r['peak_rss_mib']:>12,}  {fmt(vs, 2) + 'x' if vs else '':>8}"
              + (f"  (views not built: {', '.join(r['views_not_built'])})" if r["views_not_built"] else ""))
    print()
    for label in dict.fromkeys(r["dataset"] for r in rows):
        by = {r["engine"]: r for r in rows if r["dataset"] == label}
        a = by.get("atlas")
        if not a:
            continue
        if "duckdb" in by:
            v = by["duckdb"]["atlas_vs_duckdb"]
            print(f"target {label}: atlas_vs_duckdb = {v:.2f}x (target >= {TARGET_VS_DUCKDB:.0f}x): "
                  f"{'MET' if v >= TARGET_VS_DUCKDB else 'NOT MET'}")
        if "polars" in by:
            print(f"        {label}: atlas_vs_polars = {by['polars']['atlas_vs_polars']:.2f}x (no target)")
        big = a["uncompressed_mb"] * 1e6 >= TARGET_INPUT_BYTES
        print(f"target {label}: atlas peak RSS = {a['peak_rss_mib']} MiB (target <= {TARGET_RSS_MIB} MiB at >= 2 GB "
              f"input): " + (("MET" if a["peak_rss_mib"] <= TARGET_RSS_MIB else "NOT MET") if big
                             else "n/a, input < 2 GB"))
    print()
    print(f"Measured {time.strftime('%Y-%m-%d')} on {os.cpu_count()} cores with `{cmdline}`; "
          f"six views, same uncompressed NDJSON, zstd(1) Parquet out. "
          f"duckdb/polars seconds exclude Python start-up; their decimals are f64, Atlas's Decimal128(38,18).")
    print()
    print("| dataset | input MB | resources | engine | seconds | MB/s | resources/s | peak RSS MiB | Atlas speed-up |")
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        vs = r.get("atlas_vs_" + r["engine"])
        print(f"| {r['dataset']} | {r['uncompressed_mb']:,.0f} | {r['resources']:,} | {r['engine']} | {r['seconds']:.2f} "
              f"| {r['mb_s']:.1f} | {r['resources_s']:,} | {r['peak_rss_mib']:,} | {f'{vs:.2f}x' if vs else ''} |")


def setup_venv():
    if not os.path.exists(VENV_PY):
        subprocess.run([sys.executable if sys.prefix == sys.base_prefix else "python3", "-m", "venv", VENV],
                       check=True)
    subprocess.run([VENV_PY, "-m", "pip", "install", "-q", *PIP_DEPS], check=True)
    subprocess.run([VENV_PY, "-c", "import duckdb, polars, pyarrow; "
                    "print('duckdb', duckdb.__version__, 'polars', polars.__version__, 'pyarrow', pyarrow.__version__)"],
                   check=True)


def ensure_deps():
    """Re-exec under .venv-bench if we are not in it; explain how to get the deps if missing."""
    in_venv = os.path.realpath(sys.prefix) == os.path.realpath(VENV)
    if not in_venv and os.path.exists(VENV_PY) and not os.environ.get("ATLAS_BENCH_REEXEC"):
        os.environ["ATLAS_BENCH_REEXEC"] = "1"
        os.execv(VENV_PY, [VENV_PY, os.path.abspath(__file__), *sys.argv[1:]])
    try:
        import duckdb  # noqa: F401
        import polars  # noqa: F401
        import pyarrow  # noqa: F401
    except ImportError as e:
        sys.exit(f"{e}\n{SETUP_HINT}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n".join(__doc__.split("\n")[2:]))
    ap.add_argument("data", nargs="?", default=DEFAULT_DATA,
                    help="folder with <Type>.ndjson.gz or <Type>.ndjson (default: the 615-patient SMART sample)")
    ap.add_argument("--factor", type=int, default=None,
                    help="scale factor for the big dataset (default: ceil(2.1e9 / base bytes)); 0 or 1 = base only")
    ap.add_argument("--base-only", action="store_true", help="skip the scaled copy (same as --factor 0)")
    ap.add_argument("--no-build", action="store_true", help="use the existing release binary")
    ap.add_argument("--work", default=DEFAULT_WORK, help=f"work dir (default {DEFAULT_WORK})")
    ap.add_argument("--keep", action="store_true", help="keep the decompressed and scaled data for the next run")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="DuckDB/polars threads (default: all cores)")
    ap.add_argument("--engines", default=",".join(ENGINES), help="comma-separated subset of atlas,duckdb,polars")
    ap.add_argument("--check-values", action="store_true",
                    help="also compare every cell with Atlas's output (slow-ish; reports differing columns)")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--setup", action="store_true", help=f"create {VENV} with {' '.join(PIP_DEPS)} and exit")
    ap.add_argument("--child", nargs=3, metavar=("ENGINE", "DATA", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.setup:
        setup_venv()
        return
    ensure_deps()
    if a.child:
        child_main(*a.child, a.threads)
        return
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    if any(e not in ENGINES for e in engines):
        sys.exit(f"--engines: choose from {ENGINES}")
    if not os.path.isdir(a.data):
        sys.exit(f"MISSING: {a.data} (the benchmark needs ../shared or a dataset folder)")
    cmdline = "bench/flatten.py " + " ".join(shlex.quote(x) for x in sys.argv[1:])
    if not a.no_build:
        subprocess.run(["cargo", "build", "--release", "--locked", "-p", "atlas-cli"], check=True, cwd=ROOT)
    if not os.path.exists(ATLAS):
        sys.exit(f"MISSING: {ATLAS} (build it, or drop --no-build)")
    os.makedirs(a.work, exist_ok=True)
    made = []
    rows = []
    try:
        made.append(os.path.join(a.work, "base"))
        base = prepare_base(a.data, a.work)
        base_bytes = dataset_info(base)["bytes"]
        factor = 0 if a.base_only else a.factor
        if factor is None:
            factor = math.ceil(2.1e9 / base_bytes)
        print(f"# atlas view run vs duckdb {__import__('duckdb').__version__} vs polars "
              f"{__import__('polars').__version__}, {os.cpu_count()} cores, threads={a.threads}, "
              f"{time.strftime('%Y-%m-%d %H:%M')}")
        rows += bench("base", base, a.work, engines, a.threads, a.check_values)
        if factor > 1:
            made.append(os.path.join(a.work, f"x{factor}"))
            scaled = prepare_scaled(base, a.work, factor)
            rows += bench(f"x{factor}", scaled, a.work, engines, a.threads, a.check_values)
    finally:
        if not a.keep:
            for d in made:
                shutil.rmtree(d, ignore_errors=True)
            try:
                os.rmdir(a.work)
            except OSError:
                pass
    if rows:
        print_summary(rows, cmdline)
        if a.json:
            with open(a.json, "w") as f:
                json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
