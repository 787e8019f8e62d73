//! End-to-end checks of `generate` and `scale` on real files.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use atlas_fhir::{is_fhir_date, is_valid_id, parse_instant_micros, split_relative_reference};
use proptest::prelude::*;
use serde_json::Value;

use crate::{GENERATED_TYPES, SynthError, SynthOptions, generate, scale};

fn opts(patients: usize, seed: u64) -> SynthOptions {
    SynthOptions {
        patients,
        seed,
        ..SynthOptions::default()
    }
}

fn read_bytes(path: &Path) -> Vec<u8> {
    let raw = std::fs::read(path).unwrap();
    if path.to_string_lossy().ends_with(".gz") {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .unwrap();
        out
    } else {
        raw
    }
}

fn read_lines(path: &Path) -> Vec<String> {
    String::from_utf8(read_bytes(path))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn file_of(dir: &Path, ty: &str) -> PathBuf {
    dir.join(format!("{ty}.ndjson"))
}

fn micros(v: &Value) -> i64 {
    parse_instant_micros(v.as_str().unwrap()).unwrap()
}

/// Every `reference` string anywhere in a resource.
fn references(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                match (k.as_str(), child) {
                    ("reference", Value::String(r)) => out.push(r.clone()),
                    _ => references(child, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|c| references(c, out)),
        _ => {}
    }
}

/// Checks every date-like value anywhere in a resource with the FHIR parser.
fn check_dates(v: &Value) {
    const DATE_TIMES: [&str; 11] = [
        "lastUpdated",
        "deceasedDateTime",
        "start",
        "end",
        "effectiveDateTime",
        "issued",
        "onsetDateTime",
        "abatementDateTime",
        "recordedDate",
        "authoredOn",
        "birthDate",
    ];
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if DATE_TIMES.contains(&k.as_str()) {
                    let text = child
                        .as_str()
                        .unwrap_or_else(|| panic!("{k} is not a string"));
                    if k == "birthDate" {
                        assert!(is_fhir_date(text), "{k}: {text}");
                    } else {
                        assert!(text.len() >= 20, "{k} should carry a time and zone: {text}");
                        assert!(parse_instant_micros(text).is_ok(), "{k}: {text}");
                    }
                } else {
                    check_dates(child);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(check_dates),
        _ => {}
    }
}

/// All resources of a generated folder, by type, parsed; checks what holds
/// for any run and returns the resources for further checks.
fn check_dataset(dir: &Path, end_date: &str) -> HashMap<String, Vec<Value>> {
    let end = parse_instant_micros(end_date).unwrap();
    let mut by_type: HashMap<String, Vec<Value>> = HashMap::new();
    let mut keys = HashSet::new();
    for ty in GENERATED_TYPES {
        for line in read_lines(&file_of(dir, ty)) {
            let v: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(v["resourceType"], ty);
            let id = v["id"].as_str().unwrap().to_owned();
            assert!(is_valid_id(&id), "{id}");
            assert!(
                keys.insert((ty.to_owned(), id.clone())),
                "duplicate {ty}/{id}"
            );
            let tags = v["meta"]["tag"].as_array().unwrap();
            assert!(tags.iter().any(|t| t["code"] == "HTEST"
                && t["system"] == "http://terminology.hl7.org/CodeSystem/v3-ActReason"));
            check_dates(&v);
            by_type.entry(ty.to_owned()).or_default().push(v);
        }
    }
    // Referential integrity.
    for resources in by_type.values() {
        for v in resources {
            let mut refs = Vec::new();
            references(v, &mut refs);
            for r in refs {
                let (ty, id) =
                    split_relative_reference(&r).unwrap_or_else(|| panic!("not relative: {r}"));
                assert!(
                    keys.contains(&(ty.to_owned(), id.to_owned())),
                    "dangling {r}"
                );
            }
        }
    }
    let empty = Vec::new();
    let get = |ty: &str| by_type.get(ty).unwrap_or(&empty);
    let patients: HashMap<String, &Value> = get("Patient")
        .iter()
        .map(|p| (format!("Patient/{}", p["id"].as_str().unwrap()), p))
        .collect();
    let mut periods = HashMap::new();
    for e in get("Encounter") {
        let (start, stop) = (micros(&e["period"]["start"]), micros(&e["period"]["end"]));
        assert!(stop >= start, "{e}");
        assert!(stop <= end, "encounter after the end date: {e}");
        let patient = patients[e["subject"]["reference"].as_str().unwrap()];
        assert!(
            start >= micros(&patient["birthDate"]),
            "encounter before birth"
        );
        if let Some(death) = patient.get("deceasedDateTime") {
            assert!(stop <= micros(death), "encounter after death");
        }
        assert_eq!(e["status"], "finished");
        assert!(["AMB", "EMER", "IMP"].contains(&e["class"]["code"].as_str().unwrap()));
        periods.insert(
            format!("Encounter/{}", e["id"].as_str().unwrap()),
            (start, stop),
        );
    }
    for o in get("Observation") {
        let (start, stop) = periods[o["encounter"]["reference"].as_str().unwrap()];
        let effective = micros(&o["effectiveDateTime"]);
        assert!(
            (start..=stop).contains(&effective),
            "effective outside its encounter: {o}"
        );
        assert!(micros(&o["issued"]) >= effective);
        let quantities = o.get("valueQuantity").into_iter().chain(
            o.get("component")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| &c["valueQuantity"]),
        );
        for q in quantities {
            assert!(q["value"].as_f64().unwrap() > 0.0, "{o}");
            assert_eq!(q["system"], "http://unitsofmeasure.org");
            assert_eq!(q["unit"], q["code"]);
        }
        let values = [
            "valueQuantity",
            "valueCodeableConcept",
            "valueString",
            "component",
        ];
        assert_eq!(
            values.iter().filter(|k| o.get(**k).is_some()).count(),
            1,
            "{o}"
        );
    }
    for c in get("Condition") {
        let onset = micros(&c["onsetDateTime"]);
        assert!(onset <= micros(&c["recordedDate"]));
        let status = c["clinicalStatus"]["coding"][0]["code"].as_str().unwrap();
        match c.get("abatementDateTime") {
            Some(a) => {
                assert_eq!(status, "resolved");
                assert!(micros(a) >= onset && micros(a) <= end);
            }
            None => assert_eq!(status, "active"),
        }
    }
    for m in get("MedicationRequest") {
        assert!(["active", "completed", "stopped"].contains(&m["status"].as_str().unwrap()));
        assert_eq!(m["intent"], "order");
        assert!(micros(&m["authoredOn"]) <= end);
        let (start, stop) = periods[m["encounter"]["reference"].as_str().unwrap()];
        assert!((start..=stop).contains(&micros(&m["authoredOn"])));
    }
    by_type
}

#[test]
fn generated_data_is_consistent() {
    let dir = tempfile::tempdir().unwrap();
    let progress = AtomicU64::new(0);
    let summary = generate(&opts(30, 7), dir.path(), &progress).unwrap();
    assert_eq!(progress.load(Ordering::Relaxed), 30);
    let data = check_dataset(dir.path(), "2026-01-01T00:00:00Z");
    assert_eq!(data["Patient"].len(), 30);
    assert!(data["Organization"].len() >= 5 && data["Practitioner"].len() >= 5);
    for ty in ["Encounter", "Observation", "Condition", "MedicationRequest"] {
        assert!(data.get(ty).is_some_and(|v| !v.is_empty()), "no {ty}");
    }
    // The summary matches the files.
    assert_eq!(summary.files.len(), GENERATED_TYPES.len());
    let mut bytes = 0;
    for (path, count) in &summary.files {
        assert_eq!(read_lines(path).len() as u64, *count, "{}", path.display());
        bytes += std::fs::metadata(path).unwrap().len();
    }
    assert_eq!(summary.bytes, bytes);
    assert_eq!(
        summary.resources,
        summary.files.iter().map(|f| f.1).sum::<u64>()
    );
}

#[test]
fn patients_look_like_us_core() {
    let dir = tempfile::tempdir().unwrap();
    generate(&opts(40, 3), dir.path(), &AtomicU64::new(0)).unwrap();
    for line in read_lines(&file_of(dir.path(), "Patient")) {
        let p: Value = serde_json::from_str(&line).unwrap();
        let ext_urls: Vec<&str> = p["extension"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["url"].as_str().unwrap())
            .collect();
        for url in ["us-core-race", "us-core-ethnicity", "us-core-birthsex"] {
            assert!(ext_urls.iter().any(|u| u.ends_with(url)), "{url}");
        }
        let race = &p["extension"][0];
        assert_eq!(race["extension"][0]["url"], "ombCategory");
        assert_eq!(race["extension"][1]["url"], "text");
        let systems: Vec<&str> = p["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|i| i["system"].as_str())
            .collect();
        assert!(
            systems.contains(&"http://hl7.org/fhir/sid/us-ssn")
                && systems.contains(&"https://atlas.example/mrn")
        );
        let ssn = p["identifier"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["system"] == "http://hl7.org/fhir/sid/us-ssn")
            .unwrap();
        let ssn = ssn["value"].as_str().unwrap();
        assert!(ssn.starts_with("999-") && ssn.len() == 11, "{ssn}");
        assert!(
            p["telecom"][0]["value"]
                .as_str()
                .unwrap()
                .starts_with("555-")
        );
        assert_eq!(p["name"][0]["use"], "official");
        assert!(["male", "female"].contains(&p["gender"].as_str().unwrap()));
        assert_eq!(p["address"][0]["country"], "US");
        assert!(
            p["generalPractitioner"][0]["reference"]
                .as_str()
                .unwrap()
                .starts_with("Practitioner/")
        );
        assert!(
            p["managingOrganization"]["reference"]
                .as_str()
                .unwrap()
                .starts_with("Organization/")
        );
        assert_eq!(
            p["maritalStatus"]["coding"][0]["system"],
            "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"
        );
    }
}

#[test]
fn chronic_conditions_drive_labs_and_medications() {
    let dir = tempfile::tempdir().unwrap();
    generate(&opts(400, 11), dir.path(), &AtomicU64::new(0)).unwrap();
    let data = check_dataset(dir.path(), "2026-01-01T00:00:00Z");
    let subject = |v: &Value| v["subject"]["reference"].as_str().unwrap().to_owned();
    let code = |v: &Value, field: &str| v[field]["coding"][0]["code"].as_str().unwrap().to_owned();
    let diabetics: HashSet<String> = data["Condition"]
        .iter()
        .filter(|c| code(c, "code") == "44054006")
        .map(subject)
        .collect();
    assert!(!diabetics.is_empty(), "no diabetic in 400 patients");
    let on_metformin: HashSet<String> = data["MedicationRequest"]
        .iter()
        .filter(|m| code(m, "medicationCodeableConcept") == "860975")
        .map(subject)
        .collect();
    assert_eq!(diabetics, on_metformin);
    let hypertensive: HashSet<String> = data["Condition"]
        .iter()
        .filter(|c| ["38341003", "59621000"].contains(&code(c, "code").as_str()))
        .map(subject)
        .collect();
    assert!(!hypertensive.is_empty());
    for m in data["MedicationRequest"]
        .iter()
        .filter(|m| code(m, "medicationCodeableConcept") == "314076")
    {
        assert!(hypertensive.contains(&subject(m)));
    }
    // A1c is higher among diabetics.
    let (mut dm, mut other) = (Vec::new(), Vec::new());
    for o in data["Observation"]
        .iter()
        .filter(|o| code(o, "code") == "4548-4")
    {
        let v = o["valueQuantity"]["value"].as_f64().unwrap();
        if diabetics.contains(&subject(o)) {
            dm.push(v)
        } else {
            other.push(v)
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    assert!(!dm.is_empty() && !other.is_empty());
    assert!(
        mean(&dm) > mean(&other) + 0.5,
        "{} vs {}",
        mean(&dm),
        mean(&other)
    );
    // Every kind of observation value and the loinc codes asked for appear.
    let loinc: HashSet<String> = data["Observation"]
        .iter()
        .map(|o| code(o, "code"))
        .collect();
    for c in [
        "8302-2", "29463-7", "39156-5", "8867-4", "9279-1", "8310-5", "85354-9", "2339-0",
        "4548-4", "2093-3", "2160-0", "718-7", "72166-2",
    ] {
        assert!(loinc.contains(c), "no {c}");
    }
    assert!(
        data["Observation"]
            .iter()
            .any(|o| o.get("valueString").is_some())
    );
    // Some decimals keep every digit of a double.
    let text = std::fs::read_to_string(file_of(dir.path(), "Observation")).unwrap();
    assert!(
        text.split("\"value\":")
            .skip(1)
            .any(|v| v.split(['.', ',']).nth(1).is_some_and(|f| f.len() >= 10))
    );
}

fn all_bytes(dir: &Path, gzip: bool) -> Vec<Vec<u8>> {
    let ext = if gzip { "ndjson.gz" } else { "ndjson" };
    GENERATED_TYPES
        .iter()
        .map(|ty| std::fs::read(dir.join(format!("{ty}.{ext}"))).unwrap())
        .collect()
}

#[test]
fn deterministic_across_runs_and_threads() {
    let run = |o: &SynthOptions, threads: usize| {
        let dir = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| generate(o, dir.path(), &AtomicU64::new(0)))
            .unwrap();
        all_bytes(dir.path(), o.gzip)
    };
    // More than one block, so block order matters.
    let o = opts(crate::BLOCK_PATIENTS + 150, 5);
    let a = run(&o, 1);
    assert_eq!(a, run(&o, 3));
    assert_ne!(a, run(&opts(o.patients, 6), 2));
    let gz = SynthOptions {
        gzip: true,
        ..o.clone()
    };
    let gz_bytes = run(&gz, 2);
    assert_eq!(gz_bytes, run(&gz, 1));
    // Gzip holds exactly the plain bytes.
    let dir = tempfile::tempdir().unwrap();
    generate(&gz, dir.path(), &AtomicU64::new(0)).unwrap();
    for (ty, plain) in GENERATED_TYPES.iter().zip(&a) {
        assert_eq!(
            &read_bytes(&dir.path().join(format!("{ty}.ndjson.gz"))),
            plain,
            "{ty}"
        );
    }
    // A different end date moves the histories.
    assert_ne!(
        a,
        run(
            &SynthOptions {
                end_date: (2020, 6, 30),
                ..o
            },
            2
        )
    );
}

#[test]
fn empty_runs_and_bad_options() {
    for gzip in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let o = SynthOptions {
            patients: 0,
            gzip,
            ..SynthOptions::default()
        };
        let summary = generate(&o, dir.path(), &AtomicU64::new(0)).unwrap();
        assert_eq!(summary.files.len(), 7);
        let ext = if gzip { "ndjson.gz" } else { "ndjson" };
        assert!(read_lines(&dir.path().join(format!("Patient.{ext}"))).is_empty());
        assert_eq!(
            read_lines(&dir.path().join(format!("Organization.{ext}"))).len(),
            5
        );
    }
    let dir = tempfile::tempdir().unwrap();
    for end_date in [(2025, 2, 29), (2025, 13, 1), (1850, 1, 1)] {
        let o = SynthOptions {
            end_date,
            ..SynthOptions::default()
        };
        assert!(matches!(
            generate(&o, dir.path(), &AtomicU64::new(0)),
            Err(SynthError::InvalidOption(_))
        ));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]
    #[test]
    fn any_small_run_is_consistent(patients in 0usize..12, seed in any::<u64>(), year in 1990i32..2040) {
        let dir = tempfile::tempdir().unwrap();
        let o = SynthOptions { patients, seed, gzip: false, end_date: (year, 3, 1) };
        generate(&o, dir.path(), &AtomicU64::new(0)).unwrap();
        let data = check_dataset(dir.path(), &format!("{year}-03-01T00:00:00Z"));
        prop_assert_eq!(data.get("Patient").map_or(0, Vec::len), patients);
    }
}

// --- scale -----------------------------------------------------------------

const CONTAINED: &str = r##"{"resourceType":"Observation","id":"obs-contained","meta":{"tag":[{"system":"http://terminology.hl7.org/CodeSystem/v3-ActReason","code":"HTEST"}]},"contained":[{"resourceType":"Patient","id":"inner"}],"status":"final","code":{"text":"x"},"subject":{"reference":"#inner"},"performer":[{"reference":"http://example.org/fhir/Practitioner/1"},{"reference":"urn:uuid:5c0e0b2c-2a6c-4d5e-9f00-000000000000"},{"reference":"Patient?identifier=a|b"}],"valueQuantity":{"value":176.35499866729558,"unit":"cm"}}"##;
const MALFORMED: &str = r#"{"resourceType":"Observation","id":"broken","#;

/// A generated dataset plus one hand-written and one malformed Observation.
fn scale_input(dir: &Path) {
    generate(&opts(20, 9), dir, &AtomicU64::new(0)).unwrap();
    let path = file_of(dir, "Observation");
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str(CONTAINED);
    text.push('\n');
    text.push_str(MALFORMED);
    text.push('\n');
    std::fs::write(path, text).unwrap();
}

#[test]
fn scale_multiplies_and_keeps_integrity() {
    let input = tempfile::tempdir().unwrap();
    scale_input(input.path());
    let out = tempfile::tempdir().unwrap();
    let progress = AtomicU64::new(0);
    let summary = scale(&[input.path().to_path_buf()], 3, out.path(), &progress).unwrap();
    let input_bytes: u64 = GENERATED_TYPES
        .iter()
        .map(|t| std::fs::metadata(file_of(input.path(), t)).unwrap().len())
        .sum();
    assert_eq!(progress.load(Ordering::Relaxed), input_bytes);
    assert_eq!(summary.files.len(), GENERATED_TYPES.len());

    let mut keys = HashSet::new();
    let mut all = Vec::new();
    for ty in GENERATED_TYPES {
        let original = read_lines(&file_of(input.path(), ty));
        let scaled = read_lines(&file_of(out.path(), ty));
        assert_eq!(scaled.len(), 3 * original.len(), "{ty}");
        // Small files are one block: copy 0 first, byte for byte.
        assert_eq!(&scaled[..original.len()], &original[..], "{ty}");
        for line in scaled {
            if line == MALFORMED {
                continue;
            }
            let v: Value = serde_json::from_str(&line).unwrap();
            let id = v["id"].as_str().unwrap().to_owned();
            assert!(is_valid_id(&id));
            assert!(keys.insert((ty.to_owned(), id)), "duplicate id in {ty}");
            all.push(v);
        }
    }
    // Which copy an id belongs to: generated ids are UUIDs, so copy k >= 1 is
    // exactly the ids ending in `-s<k>`.
    let copy_of = |id: &str| {
        id.rsplit_once("-s")
            .map_or(0, |(_, k)| k.parse::<u32>().unwrap_or(0))
    };
    for v in &all {
        let own = copy_of(v["id"].as_str().unwrap());
        let mut refs = Vec::new();
        references(v, &mut refs);
        for r in refs {
            if let Some((ty, id)) = split_relative_reference(&r) {
                assert!(
                    keys.contains(&(ty.to_owned(), id.to_owned())),
                    "dangling {r}"
                );
                assert_eq!(copy_of(id), own, "copy {own} refers to another copy: {r}");
            }
        }
    }
    let obs = std::fs::read_to_string(file_of(out.path(), "Observation")).unwrap();
    assert_eq!(obs.lines().filter(|l| *l == MALFORMED).count(), 3);
    assert_eq!(obs.matches("176.35499866729558").count(), 3);
    for copy in ["obs-contained", "obs-contained-s1", "obs-contained-s2"] {
        let line = obs
            .lines()
            .find(|l| l.contains(&format!("\"id\":\"{copy}\"")))
            .unwrap();
        // Only the top-level id and Type/id references change.
        assert_eq!(
            line,
            CONTAINED.replace("\"id\":\"obs-contained\"", &format!("\"id\":\"{copy}\""))
        );
    }
    assert_eq!(summary.resources, 3 * (all.len() as u64 / 3 + 1));
}

#[test]
fn scale_gzip_and_threads() {
    let input = tempfile::tempdir().unwrap();
    generate(
        &SynthOptions {
            gzip: true,
            ..opts(15, 4)
        },
        input.path(),
        &AtomicU64::new(0),
    )
    .unwrap();
    let run = |threads: usize| {
        let out = tempfile::tempdir().unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            scale(
                &[input.path().to_path_buf()],
                2,
                out.path(),
                &AtomicU64::new(0),
            )
        })
        .unwrap();
        GENERATED_TYPES
            .iter()
            .map(|t| std::fs::read(out.path().join(format!("{t}.ndjson.gz"))).unwrap())
            .collect::<Vec<_>>()
    };
    let a = run(1);
    assert_eq!(a, run(3));
    let patients = read_lines(&input.path().join("Patient.ndjson.gz"));
    let out = tempfile::tempdir().unwrap();
    scale(
        &[input.path().join("Patient.ndjson.gz")],
        2,
        out.path(),
        &AtomicU64::new(0),
    )
    .unwrap();
    let scaled = read_lines(&out.path().join("Patient.ndjson.gz"));
    assert_eq!(scaled.len(), 2 * patients.len());
    assert_eq!(&scaled[..patients.len()], &patients[..]);
}

#[test]
fn scale_blocks_interleave_copies() {
    let input = tempfile::tempdir().unwrap();
    let n = crate::scale::MAX_BLOCK_LINES * 2 + 10;
    let text: String = (0..n)
        .map(|i| format!("{{\"resourceType\":\"Basic\",\"id\":\"b{i}\"}}\n"))
        .collect();
    let path = input.path().join("Basic.ndjson");
    std::fs::write(&path, text).unwrap();
    let out = tempfile::tempdir().unwrap();
    scale(&[path], 2, out.path(), &AtomicU64::new(0)).unwrap();
    let lines = read_lines(&out.path().join("Basic.ndjson"));
    assert_eq!(lines.len(), 2 * n);
    let b = crate::scale::MAX_BLOCK_LINES;
    assert_eq!(lines[0], r#"{"resourceType":"Basic","id":"b0"}"#);
    assert_eq!(lines[b], r#"{"resourceType":"Basic","id":"b0-s1"}"#);
    assert_eq!(
        lines[2 * b],
        format!(r#"{{"resourceType":"Basic","id":"b{b}"}}"#)
    );
    assert_eq!(
        lines[2 * n - 1],
        format!(r#"{{"resourceType":"Basic","id":"b{}-s1"}}"#, n - 1)
    );
}

#[test]
fn scale_odd_inputs() {
    let input = tempfile::tempdir().unwrap();
    let nested = input.path().join("a").join("b");
    std::fs::create_dir_all(&nested).unwrap();
    // No final newline, CRLF, blank lines, invalid UTF-8, a non-object, a Bundle.
    let mut bytes =
        b"{\"resourceType\":\"Patient\",\"id\":\"p1\"}\r\n\n  \n\xff\xfe{\"id\":\"x\"}\n[1,2]\n"
            .to_vec();
    bytes.extend_from_slice(br#"{"resourceType":"Encounter","id":"e1","subject":{"reference":"Patient/p1/_history/2"}}"#);
    std::fs::write(nested.join("Mixed.ndjson"), &bytes).unwrap();
    std::fs::write(
        input.path().join("Mixed.ndjson"),
        "{\"resourceType\":\"Patient\",\"id\":\"p2\"}\n",
    )
    .unwrap();
    std::fs::write(input.path().join("notes.txt"), "ignored").unwrap();
    let out = tempfile::tempdir().unwrap();
    let summary = scale(
        &[input.path().to_path_buf()],
        2,
        out.path(),
        &AtomicU64::new(0),
    )
    .unwrap();
    let names: Vec<String> = summary
        .files
        .iter()
        .map(|(p, _)| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["Mixed.ndjson", "Mixed-2.ndjson"]);
    // Folders are walked in name order: the top-level file comes first.
    let text = std::fs::read(out.path().join("Mixed-2.ndjson")).unwrap();
    let mut expected = bytes.clone();
    expected.push(b'\n');
    assert!(text.starts_with(&expected));
    let copy1 = String::from_utf8_lossy(&text[expected.len()..]).into_owned();
    assert!(copy1.starts_with("{\"resourceType\":\"Patient\",\"id\":\"p1-s1\"}\r\n\n  \n"));
    assert!(copy1.ends_with(
        "{\"resourceType\":\"Encounter\",\"id\":\"e1-s1\",\"subject\":{\"reference\":\"Patient/p1-s1/_history/2\"}}\n"
    ));
    assert_eq!(summary.files[1].1, 2 * 4);
    assert_eq!(read_lines(&out.path().join("Mixed.ndjson")).len(), 2);

    // Errors name the file.
    let missing = input.path().join("nope.ndjson");
    let err = scale(&[missing], 2, out.path(), &AtomicU64::new(0)).unwrap_err();
    assert!(err.to_string().contains("nope.ndjson"), "{err}");
    let err = scale(
        &[input.path().to_path_buf()],
        2,
        input.path(),
        &AtomicU64::new(0),
    )
    .unwrap_err();
    assert!(matches!(err, SynthError::Input { .. }), "{err}");
    assert!(matches!(
        scale(&[], 0, out.path(), &AtomicU64::new(0)),
        Err(SynthError::InvalidOption(_))
    ));
    let corrupt = input.path().join("bad.ndjson.gz");
    std::fs::write(&corrupt, b"\x1f\x8b\x08\x00garbage").unwrap();
    let err = scale(&[corrupt], 2, out.path(), &AtomicU64::new(0)).unwrap_err();
    assert!(err.to_string().contains("bad.ndjson.gz"), "{err}");
}

/// The id and reference rewrite `scale` promises, done on the parsed tree.
fn rename_tree(v: &mut Value, copy: u32, top: bool) {
    match v {
        Value::Object(map) => {
            for (k, child) in map.iter_mut() {
                match (k.as_str(), &*child) {
                    ("id", Value::String(id)) if top && is_valid_id(id) => {
                        *child = Value::String(crate::scaled_id(id, copy));
                    }
                    ("reference", Value::String(r)) => {
                        if let Some((ty, id)) = split_relative_reference(r) {
                            let rest = &r[ty.len() + 1 + id.len()..];
                            *child =
                                Value::String(format!("{ty}/{}{rest}", crate::scaled_id(id, copy)));
                        }
                    }
                    _ => rename_tree(child, copy, false),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|c| rename_tree(c, copy, false)),
        _ => {}
    }
}

/// `(input line, copy)` of each output line, per the documented block layout.
fn expected_layout(lines: &[String], factor: u32) -> Vec<(usize, u32)> {
    use crate::scale::{MAX_BLOCK_LINES, MIN_BLOCK_BYTES, OUTPUT_BLOCK_BYTES};
    let budget = (OUTPUT_BLOCK_BYTES / factor as usize).max(MIN_BLOCK_BYTES);
    let mut layout = Vec::new();
    let mut start = 0;
    while start < lines.len() {
        let (mut end, mut bytes) = (start, 0);
        while end < lines.len() && bytes < budget && end - start < MAX_BLOCK_LINES {
            bytes += lines[end].len() + 1;
            end += 1;
        }
        for copy in 0..factor {
            layout.extend((start..end).map(|i| (i, copy)));
        }
        start = end;
    }
    layout
}

/// Real bulk-export data (Synthea via SMART), when `../shared` is present.
#[test]
fn scale_real_bulk_export() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../../../shared/data/fhir/medium/smart-sample-bulk-fhir-datasets-partial/10-patients",
    );
    if !data.is_dir() {
        println!("MISSING: {} (skipped)", data.display());
        return;
    }
    let out = tempfile::tempdir().unwrap();
    let factor = 3;
    scale(
        std::slice::from_ref(&data),
        factor,
        out.path(),
        &AtomicU64::new(0),
    )
    .unwrap();
    let mut checked = 0;
    for entry in std::fs::read_dir(&data).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !name.ends_with(".ndjson.gz") {
            continue;
        }
        let original = read_lines(&path);
        let scaled = read_lines(&out.path().join(&name));
        let layout = expected_layout(&original, factor);
        assert_eq!(scaled.len(), layout.len(), "{name}");
        for (j, (&(i, copy), dst)) in layout.iter().zip(&scaled).enumerate() {
            let src = &original[i];
            if copy == 0 {
                assert!(src == dst, "{name}: output line {j} is not input line {i}");
                continue;
            }
            let Ok(mut expected) = serde_json::from_str::<Value>(src) else {
                assert!(
                    src == dst,
                    "{name}: line {i} is not JSON and must pass through"
                );
                continue;
            };
            rename_tree(&mut expected, copy, true);
            let got: Value = serde_json::from_str(dst).unwrap();
            assert!(got == expected, "{name}: copy {copy} of line {i} differs");
            // Only ids and references grew, by whole suffixes: other bytes kept.
            let suffix = format!("-s{copy}").len();
            assert_eq!((dst.len() - src.len()) % suffix, 0, "{name}: line {i}");
            checked += 1;
        }
    }
    assert!(checked > 1000, "{checked}");
}

/// Throughput of `generate` and `scale`, run by hand:
/// `cargo test -p atlas-synth --release -- --ignored --nocapture throughput`
/// (`SYNTH_BENCH_PATIENTS`, default 10000; `SYNTH_BENCH_GZIP=1` for gzip only).
#[test]
#[ignore]
fn throughput() {
    let patients = std::env::var("SYNTH_BENCH_PATIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let modes: &[bool] = if std::env::var("SYNTH_BENCH_GZIP").is_ok() {
        &[true]
    } else {
        &[false, true]
    };
    for &gzip in modes {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let o = SynthOptions {
            patients,
            seed: 1,
            gzip,
            ..SynthOptions::default()
        };
        let t = std::time::Instant::now();
        let s = generate(&o, dir.path(), &AtomicU64::new(0)).unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "generate gzip={gzip}: {patients} patients, {} resources, {:.1} MB in {secs:.2} s: \
             {:.0} patients/s, {:.0} resources/s, {:.0} MB/s written",
            s.resources,
            s.bytes as f64 / 1e6,
            patients as f64 / secs,
            s.resources as f64 / secs,
            s.bytes as f64 / 1e6 / secs
        );
        for (path, n) in &s.files {
            println!("  {} {n}", path.file_name().unwrap().to_string_lossy());
        }
        let out = tempfile::tempdir_in("/var/tmp").unwrap();
        let t = std::time::Instant::now();
        let scaled = scale(
            &[dir.path().to_path_buf()],
            3,
            out.path(),
            &AtomicU64::new(0),
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        println!(
            "scale x3 gzip={gzip}: {} resources, {:.1} MB in {secs:.2} s: {:.0} resources/s",
            scaled.resources,
            scaled.bytes as f64 / 1e6,
            scaled.resources as f64 / secs
        );
    }
}
