//! The Safe-Harbor-minimal profile on the 615-patient Synthea set
//! (`../shared/data/fhir/large/smart-generated-sample-data-R4/ndjson`):
//! identifiers gone, codes and values unchanged, each patient's dates moved
//! by one offset so intervals are exact, and the counts reconcile.

use atlas_deid::stream::{Progress, StreamOptions};
use atlas_deid::{Deidentifier, profile};
use atlas_ingest::{ClassifyOptions, Event, Origin};
use serde_json::Value;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::BufRead;
use std::path::Path;
use std::sync::Arc;

const KEY: &str = "safe-harbor-test-key";

fn read_gz_lines(path: &Path) -> Vec<String> {
    let f = std::fs::File::open(path).unwrap();
    std::io::BufReader::new(flate2::read::GzDecoder::new(f))
        .lines()
        .map(Result::unwrap)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// Every string value in a JSON document (not keys).
fn strings<'a>(v: &'a Value, out: &mut Vec<&'a str>) {
    match v {
        Value::String(s) => out.push(s),
        Value::Array(a) => a.iter().for_each(|x| strings(x, out)),
        Value::Object(o) => o.values().for_each(|x| strings(x, out)),
        _ => {}
    }
}

fn tokens(s: &str) -> impl Iterator<Item = &str> {
    s.split(|c: char| !c.is_alphanumeric())
        .filter(|t| !t.is_empty())
}

/// Name tokens of three letters or more.
fn unique_tokens(s: &str) -> impl Iterator<Item = String> + '_ {
    tokens(s)
        .filter(|t| t.chars().count() >= 3)
        .map(str::to_string)
}

/// Words the profile keeps on purpose: code displays, CodeableConcept texts,
/// state and country names, Observation string values. A name that is also
/// such a word (`Brown` the colour, `White` the race, a city inside a kept
/// state such as `Novosibirsk Oblast`) cannot be told apart, so the token
/// check skips those words; whole values are still checked.
fn vocabulary(v: &Value, out: &mut HashSet<String>, whole: &mut HashSet<String>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| vocabulary(x, out, whole)),
        Value::Object(o) => {
            for (k, x) in o {
                let kept = matches!(k.as_str(), "display" | "state" | "country" | "code")
                    || (k == "text" && o.contains_key("coding"));
                if kept && let Some(s) = x.as_str() {
                    out.extend(tokens(s).map(str::to_string));
                    whole.insert(s.to_string());
                }
                vocabulary(x, out, whole);
            }
        }
        _ => {}
    }
}

/// Every Coding (system|code|display) in a resource, in document order.
fn codings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| codings(x, out)),
        Value::Object(o) => {
            if o.contains_key("code") && o.contains_key("system") && o["code"].is_string() {
                out.push(format!(
                    "{}|{}|{}",
                    o["system"].as_str().unwrap_or(""),
                    o["code"].as_str().unwrap_or(""),
                    o.get("display").and_then(Value::as_str).unwrap_or("")
                ));
            }
            o.values().for_each(|x| codings(x, out));
        }
        _ => {}
    }
}

/// The `YYYY-MM-DD` a date or dateTime value starts with.
fn full_date(s: &str) -> Option<String> {
    let d = s.get(..10)?;
    (s.as_bytes()[4] == b'-' && day_number(d).is_some()).then(|| d.to_string())
}

fn day_number(s: &str) -> Option<i64> {
    let d = chrono::NaiveDate::parse_from_str(s.get(..10)?, "%Y-%m-%d").ok()?;
    Some(
        d.signed_duration_since(chrono::NaiveDate::default())
            .num_days(),
    )
}

/// Walks source and output together; for each full date in the source that
/// the output still has at the same place, records output − source in days.
fn date_shifts(src: &Value, out: Option<&Value>, shifts: &mut Vec<i64>, total: &mut usize) {
    match src {
        Value::String(s) if s.len() >= 10 && day_number(s).is_some() && s.as_bytes()[4] == b'-' => {
            *total += 1;
            if let Some(o) = out.and_then(Value::as_str).and_then(day_number) {
                shifts.push(o - day_number(s).unwrap_or_default());
            }
        }
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                date_shifts(x, out.and_then(|o| o.get(i)), shifts, total);
            }
        }
        Value::Object(o) => {
            for (k, x) in o {
                date_shifts(x, out.and_then(|o| o.get(k)), shifts, total);
            }
        }
        _ => {}
    }
}

#[test]
fn safe_harbor_minimal_on_615_patients() {
    let Some(shared) = crate::shared() else {
        return crate::missing("../shared/data/fhir (615-patient Synthea set)");
    };
    let dir = shared.join("data/fhir/large/smart-generated-sample-data-R4/ndjson");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".ndjson.gz"))
        .collect();
    files.sort();
    assert_eq!(files.len(), 16);

    let engine = Deidentifier::new(profile::by_name("safe-harbor-minimal", KEY).unwrap());
    let out_dir = tempfile::tempdir().unwrap();
    let out = out_dir.path().join("deid");
    let paths: Vec<String> = files.iter().map(|p| p.display().to_string()).collect();
    let set = atlas_ingest::collect_inputs(&paths, &mut std::io::empty()).unwrap();
    let opts = StreamOptions {
        write_changes: true,
        ..StreamOptions::default()
    };
    let started = std::time::Instant::now();
    let summary =
        atlas_deid::stream::run(&engine, &set.inputs, &out, &opts, &Progress::default()).unwrap();
    println!(
        "de-identified in {:.1} s: {summary:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(summary.reconciles(), "{summary:?}");
    assert_eq!(summary.read, 189_111, "{summary:?}");
    assert_eq!(summary.written, 189_111, "{summary:?}");

    // Source: resources by (type, hashed id), their patient, and the PHI to look for.
    let mut source: HashMap<(String, String), (Value, Option<String>)> = HashMap::new();
    let mut names = HashSet::new();
    let mut exact = HashSet::new(); // values that must not appear as a whole string
    let mut birth_dates = HashMap::new();
    let mut vocab = HashSet::new();
    let mut kept_values = HashSet::new();
    // Every full date (YYYY-MM-DD, alone or starting a dateTime) in the source.
    let mut source_days: HashSet<String> = HashSet::new();
    for f in &files {
        for (n, line) in read_gz_lines(f).into_iter().enumerate() {
            let origin = Origin {
                file: Arc::from("src"),
                line: n as u64 + 1,
            };
            let Event::Resource(p) = atlas_ingest::classify::classify_line(
                line.as_bytes(),
                origin,
                false,
                &ClassifyOptions::default(),
            ) else {
                panic!("source line {} of {} did not classify", n + 1, f.display());
            };
            let v: Value = serde_json::from_str(&line).unwrap();
            vocabulary(&v, &mut vocab, &mut kept_values);
            let mut all = Vec::new();
            strings(&v, &mut all);
            source_days.extend(all.into_iter().filter_map(full_date));
            if let Some(s) = v.get("valueString").and_then(Value::as_str) {
                vocab.extend(tokens(s).map(str::to_string));
            }
            for key in ["name", "contact"] {
                for name in v.get(key).and_then(Value::as_array).into_iter().flatten() {
                    let name = name.get("name").unwrap_or(name);
                    for part in ["given", "family", "prefix", "suffix"] {
                        let mut s = Vec::new();
                        if let Some(x) = name.get(part) {
                            strings(x, &mut s);
                        }
                        for t in s {
                            names.extend(unique_tokens(t));
                            exact.insert(t.to_string());
                        }
                    }
                }
            }
            for a in v
                .get("address")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                for part in ["line", "city", "text"] {
                    let mut s = Vec::new();
                    if let Some(x) = a.get(part) {
                        strings(x, &mut s);
                    }
                    exact.extend(s.into_iter().map(str::to_string));
                }
            }
            if p.resource_type == "Patient" {
                let city = |a: &Value| a.get("city").and_then(Value::as_str).map(str::to_string);
                for a in v["address"].as_array().into_iter().flatten() {
                    exact.extend(city(a));
                }
                for e in v["extension"].as_array().into_iter().flatten() {
                    if let Some(s) = e.get("valueString").and_then(Value::as_str)
                        && e["url"]
                            .as_str()
                            .unwrap_or("")
                            .ends_with("mothersMaidenName")
                    {
                        names.extend(unique_tokens(s));
                        exact.insert(s.to_string());
                    }
                    if let Some(a) = e.get("valueAddress") {
                        exact.extend(city(a));
                    }
                }
                if let Some(b) = v["birthDate"].as_str() {
                    birth_dates.insert(engine.hash(&p.id), b.to_string());
                }
            }
            for t in v
                .get("telecom")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(s) = t.get("value").and_then(Value::as_str) {
                    exact.insert(s.to_string());
                }
            }
            for i in v
                .get("identifier")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                if let Some(s) = i.get("value").and_then(Value::as_str) {
                    exact.insert(s.to_string());
                }
            }
            source.insert(
                (p.resource_type.clone(), engine.hash(&p.id)),
                (v, p.patient_id.clone()),
            );
        }
    }
    names.retain(|n| !vocab.contains(n));
    // A city that is also a kept state (`Moscow`, `Mexico City`), or an
    // identifier value that is also a code (`20`), is kept as that.
    exact.retain(|v| !kept_values.contains(v));
    assert!(
        names.len() > 1000 && exact.len() > 3000,
        "{} {}",
        names.len(),
        exact.len()
    );
    println!(
        "checking {} unique name tokens and {} identifying values",
        names.len(),
        exact.len()
    );

    // Output: no identifier survives anywhere; codes and values are unchanged.
    let mut out_tokens: HashSet<String> = HashSet::new();
    let mut out_strings: HashSet<String> = HashSet::new();
    let mut out_days: HashSet<String> = HashSet::new();
    let mut shifts_by_patient: BTreeMap<String, HashSet<i64>> = BTreeMap::new();
    let (mut compared_dates, mut source_dates) = (0usize, 0usize);
    let mut outputs = 0;
    let today = chrono::Utc::now().date_naive();
    // Age in whole years today, as HIPAA counts "ages over 89".
    let age = |d: &str| {
        use chrono::Datelike;
        let b = chrono::NaiveDate::parse_from_str(&d[..10], "%Y-%m-%d").unwrap();
        today.year() - b.year() - i32::from((today.month(), today.day()) < (b.month(), b.day()))
    };
    for entry in std::fs::read_dir(&out).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".ndjson") || name == "quarantine.ndjson" || name == "changes.ndjson" {
            continue;
        }
        for line in read_lines(&path) {
            outputs += 1;
            let o: Value = serde_json::from_str(&line).unwrap();
            let mut s = Vec::new();
            strings(&o, &mut s);
            for t in s {
                out_tokens.extend(tokens(t).map(str::to_string));
                out_strings.insert(t.to_string());
                if let Some(d) = full_date(t) {
                    out_days.insert(d);
                }
            }
            let rt = o["resourceType"].as_str().unwrap().to_string();
            let id = o["id"].as_str().unwrap().to_string();
            let (src, patient) = source
                .get(&(rt.clone(), id.clone()))
                .unwrap_or_else(|| panic!("{rt}/{id} has no source with that hashed id"));
            // Codings are unchanged (the labels the profile adds aside).
            let mut unlabelled = o.clone();
            if let Some(m) = unlabelled.get_mut("meta").and_then(Value::as_object_mut) {
                m.remove("security");
            }
            let (mut a, mut b) = (Vec::new(), Vec::new());
            codings(src, &mut a);
            codings(&unlabelled, &mut b);
            assert_eq!(a, b, "codings of {rt}/{id} changed");
            for k in [
                "valueQuantity",
                "valueCodeableConcept",
                "valueString",
                "component",
            ] {
                assert_eq!(src.get(k), o.get(k), "{rt}/{id}.{k} changed");
            }
            // Dates: one offset per patient, never zero, never under 30 days.
            let mut shifts = Vec::new();
            let mut total = 0;
            date_shifts(src, Some(&o), &mut shifts, &mut total);
            source_dates += total;
            compared_dates += shifts.len();
            if let Some(pid) = patient {
                let want = engine.patient_date_offset(pid);
                // About 200 years back, then 30 to 365 days either way per patient.
                assert!((30..=365).contains(&(want + 73_052).abs()), "{want}");
                for d in &shifts {
                    assert_eq!(
                        *d, want,
                        "{rt}/{id}: a date moved by {d}, its patient's by {want}"
                    );
                }
                shifts_by_patient
                    .entry(pid.clone())
                    .or_default()
                    .extend(shifts);
            }
            if rt == "Patient" {
                let b = &birth_dates[&id];
                let kept = o.get("birthDate").and_then(Value::as_str);
                assert_ne!(kept, Some(b.as_str()), "Patient/{id} kept its birth date");
                if age(b) > 89 {
                    assert_eq!(
                        kept, None,
                        "Patient/{id}: born over 89 years ago, birthDate must go"
                    );
                }
            }
        }
    }
    assert_eq!(outputs, 189_111);
    let leaked_names: Vec<&String> = names.iter().filter(|n| out_tokens.contains(*n)).collect();
    assert!(
        leaked_names.is_empty(),
        "names or cities in the output: {leaked_names:?}"
    );
    let leaked: Vec<&String> = exact.iter().filter(|v| out_strings.contains(*v)).collect();
    assert!(leaked.is_empty(), "identifiers in the output: {leaked:?}");
    // Almost every date survives (shifted); those that do not are over 89 years old
    // or year-only.
    assert!(
        compared_dates * 100 >= source_dates * 99,
        "{compared_dates} of {source_dates} dates kept"
    );
    assert_eq!(shifts_by_patient.len(), 615);
    // No full date of the source appears anywhere in the output: shifted
    // timelines sit about 200 years before any real record.
    let leaked_days: Vec<&String> = source_days.intersection(&out_days).take(10).collect();
    assert!(
        leaked_days.is_empty(),
        "{} source dates in the output, e.g. {leaked_days:?}",
        source_days.intersection(&out_days).count()
    );
    assert!(source_days.len() > 10_000 && out_days.len() > 10_000);
    assert!(shifts_by_patient.values().all(|s| s.len() == 1));

    // The change records name what changed, per resource.
    let changes = read_lines(&out.join("changes.ndjson"));
    assert_eq!(changes.len(), 189_111);
    let first: Value =
        serde_json::from_str(changes.iter().find(|l| l.contains("\"Patient\"")).unwrap()).unwrap();
    let ops: HashSet<&str> = first["changes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["op"].as_str().unwrap())
        .collect();
    for op in ["redact", "cryptoHash", "dateShift", "abstract"] {
        assert!(ops.contains(op), "{op} missing from {first}");
    }
    println!(
        "safe-harbor-minimal: {} resources, {} names/cities and {} identifiers checked absent, {compared_dates}/{source_dates} dates shifted by their patient's offset, none of {} distinct source dates among {} output dates",
        outputs,
        names.len(),
        exact.len(),
        source_days.len(),
        out_days.len()
    );
}
