//! FHIRPath evaluation and parse cost over the SMART 615-patient R4 sample
//! (`../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson/`,
//! relative to the workspace root). Skips (exit 0) when the data is missing.
//!
//! ```text
//! CARGO_TARGET_DIR=/var/tmp/fuzz-target cargo bench -p atlas-fhirpath --bench eval \
//!     -- --warm-up-time 1 --measurement-time 5
//! ```
//!
//! Evaluation benches iterate over every loaded resource per iteration with
//! `Throughput::Elements(n)`, so criterion prints the time per resource.
//!
//! * `eval/*`: over `serde_json::Value`s parsed outside the timing;
//! * `eval_tree/*`: the same over `atlas_fhirpath::json` trees parsed outside the timing;
//! * `text_eval/*_serde` vs `text_eval/*_tree`: parse each resource's text
//!   (serde_json vs `atlas_fhirpath::json::parse`) and evaluate, both timed;
//! * `json_parse/*`: parsing alone.

use std::hint::black_box;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use atlas_fhirpath::{EvalContext, Expr, JsonValue, json};
use criterion::{Criterion, Throughput};
use serde_json::Value as Json;

const OBSERVATION_EXPR: &str = "Observation.value.ofType(Quantity).value";
const PATIENT_EXPR: &str = "Patient.name.where(use='official').given.first()";
/// Observation.ndjson.gz has ~88k lines; the first 20k keep memory and load time modest.
const MAX_OBSERVATIONS: usize = 20_000;

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson")
}

/// Up to `limit` non-empty lines of a gzipped NDJSON file.
fn load(path: &Path, limit: usize) -> Vec<String> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let reader = BufReader::new(flate2::read::GzDecoder::new(file));
    let mut out = Vec::new();
    for (i, line) in reader.lines().enumerate() {
        if out.len() >= limit {
            break;
        }
        let line = line.unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1));
        if line.trim().is_empty() {
            continue;
        }
        out.push(line);
    }
    out
}

/// Evaluate `expr` on every resource; returns the total number of result items
/// so the work cannot be optimised away.
fn eval_all(expr: &Expr, resources: &[Json], ctx: &EvalContext<'_>) -> usize {
    let mut items = 0;
    for r in resources {
        let out = expr.evaluate(r, ctx).expect("evaluates");
        items += out.len();
    }
    items
}

fn bench_eval(c: &mut Criterion, name: &str, source: &str, resources: &[Json]) {
    let expr = Expr::parse(source).expect("parses");
    let ctx = EvalContext::new();
    let items = eval_all(&expr, resources, &ctx);
    println!(
        "{name}: `{source}` over {} resources -> {items} items",
        resources.len()
    );
    let mut group = c.benchmark_group("eval");
    group.throughput(Throughput::Elements(resources.len() as u64));
    group.bench_function(name, |b| {
        b.iter(|| eval_all(&expr, black_box(resources), &ctx))
    });
    group.finish();
}

fn eval_all_tree(expr: &Expr, resources: &[JsonValue<'_>], ctx: &EvalContext<'_>) -> usize {
    let mut items = 0;
    for r in resources {
        let out = expr.evaluate_tree(r, ctx).expect("evaluates");
        items += out.len();
    }
    items
}

/// Evaluation over pre-parsed trees, then parse + evaluate from text with
/// serde_json and with our parser.
fn bench_tree(c: &mut Criterion, name: &str, source: &str, lines: &[String]) {
    let expr = Expr::parse(source).expect("parses");
    let ctx = EvalContext::new();
    let trees: Vec<JsonValue<'_>> = lines
        .iter()
        .map(|l| json::parse(l).expect("valid JSON"))
        .collect();
    let n = Throughput::Elements(lines.len() as u64);
    let mut group = c.benchmark_group("eval_tree");
    group.throughput(n.clone());
    group.bench_function(name, |b| {
        b.iter(|| eval_all_tree(&expr, black_box(&trees), &ctx))
    });
    group.finish();
    drop(trees);

    let mut group = c.benchmark_group("text_eval");
    group.throughput(n);
    group.bench_function(format!("{name}_serde"), |b| {
        b.iter(|| {
            let mut items = 0;
            for l in black_box(lines) {
                let v: Json = serde_json::from_str(l).expect("valid JSON");
                items += expr.evaluate(&v, &ctx).expect("evaluates").len();
            }
            items
        })
    });
    group.bench_function(format!("{name}_tree"), |b| {
        b.iter(|| {
            let mut items = 0;
            for l in black_box(lines) {
                let v = json::parse(l).expect("valid JSON");
                items += expr.evaluate_tree(&v, &ctx).expect("evaluates").len();
            }
            items
        })
    });
    group.finish();
}

fn bench_json_parse(c: &mut Criterion, name: &str, lines: &[String]) {
    let bytes: usize = lines.iter().map(String::len).sum();
    let mut group = c.benchmark_group("json_parse");
    group.throughput(Throughput::Bytes(bytes as u64));
    group.bench_function(format!("{name}_serde"), |b| {
        b.iter(|| {
            for l in black_box(lines) {
                black_box(serde_json::from_str::<Json>(l).expect("valid JSON"));
            }
        })
    });
    group.bench_function(format!("{name}_tree"), |b| {
        b.iter(|| {
            for l in black_box(lines) {
                black_box(json::parse(l).expect("valid JSON"));
            }
        })
    });
    group.finish();
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("parse");
    group.throughput(Throughput::Elements(1));
    for (name, source) in [
        ("observation_value", OBSERVATION_EXPR),
        ("patient_official_given", PATIENT_EXPR),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| Expr::parse(black_box(source)).expect("parses"))
        });
    }
    group.finish();
}

fn main() {
    let dir = data_dir();
    let obs_path = dir.join("Observation.ndjson.gz");
    let pat_path = dir.join("Patient.ndjson.gz");
    for p in [&obs_path, &pat_path] {
        if !p.is_file() {
            println!("MISSING: {}", p.display());
            return;
        }
    }
    let observation_lines = load(&obs_path, MAX_OBSERVATIONS);
    let patient_lines = load(&pat_path, usize::MAX);
    let parse_all = |lines: &[String]| -> Vec<Json> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).expect("valid JSON"))
            .collect()
    };
    let observations = parse_all(&observation_lines);
    let patients = parse_all(&patient_lines);

    let mut c = Criterion::default().configure_from_args();
    bench_eval(
        &mut c,
        "observation_value_quantity",
        OBSERVATION_EXPR,
        &observations,
    );
    bench_eval(
        &mut c,
        "patient_official_given_first",
        PATIENT_EXPR,
        &patients,
    );
    drop((observations, patients));
    bench_tree(
        &mut c,
        "observation_value_quantity",
        OBSERVATION_EXPR,
        &observation_lines,
    );
    bench_tree(
        &mut c,
        "patient_official_given_first",
        PATIENT_EXPR,
        &patient_lines,
    );
    bench_json_parse(&mut c, "observations", &observation_lines);
    bench_json_parse(&mut c, "patients", &patient_lines);
    bench_parse(&mut c);
    c.final_summary();
}
