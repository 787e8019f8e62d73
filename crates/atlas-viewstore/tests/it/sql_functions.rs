//! `fhirpath`, `fhirpath_first` and the JSON functions in `atlas sql`,
//! over a lake of synthetic patients plus hand-written edge cases. Expected
//! answers are computed from the input files with serde_json, not with the
//! FHIRPath engine under test.

use std::collections::BTreeMap;
use std::path::Path;

use atlas_viewstore::ViewStore;
use serde_json::Value as Json;

/// Hand-written resources: an exact decimal, a string value, a primitive
/// that has only an extension, two given names.
const EXTRA: &str = concat!(
    r#"{"resourceType":"Observation","id":"obs-decimal","status":"final","code":{"text":"bp"},"valueQuantity":{"value":140.50,"unit":"mm[Hg]"}}"#,
    "\n",
    r#"{"resourceType":"Observation","id":"obs-edge","status":"final","code":{"text":"bp"},"valueQuantity":{"value":140,"unit":"mm[Hg]"}}"#,
    "\n",
    r#"{"resourceType":"Observation","id":"obs-string","status":"final","code":{"text":"note"},"valueString":"a \"quoted\" text"}"#,
    "\n",
    r#"{"resourceType":"Patient","id":"pt-ext","name":[{"family":"Doe","given":["Ann","Marie"]}],"_birthDate":{"extension":[{"url":"http://hl7.org/fhir/StructureDefinition/data-absent-reason","valueCode":"unknown"}]}}"#,
    "\n",
);

/// Every line of every `.ndjson` file under `dir`.
fn lines(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "ndjson") {
            out.extend(
                std::fs::read_to_string(&path)
                    .unwrap()
                    .lines()
                    .map(str::to_owned),
            );
        }
    }
    out
}

/// The exact text of `valueQuantity.value` in a resource line (serde_json's
/// own `f64` parsing may be one unit in the last place off; this is not).
fn quantity_value_text(line: &str) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Resource<'a> {
        #[serde(rename = "valueQuantity", borrow)]
        quantity: Option<Quantity<'a>>,
    }
    #[derive(serde::Deserialize)]
    struct Quantity<'a> {
        #[serde(borrow)]
        value: Option<&'a serde_json::value::RawValue>,
    }
    let r: Resource<'_> = serde_json::from_str(line).unwrap();
    Some(r.quantity?.value?.get().to_owned())
}

/// Runs a query; planning and execution errors alike come back as text.
async fn query(store: &ViewStore, sql: &str) -> Result<Vec<Vec<Option<String>>>, String> {
    let df = store.sql(sql).await.map_err(|e| e.to_string())?;
    let batches = df.collect().await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for b in &batches {
        for r in 0..b.num_rows() {
            rows.push(
                (0..b.num_columns())
                    .map(|c| {
                        let col = b.column(c);
                        (!col.is_null(r))
                            .then(|| arrow::util::display::array_value_to_string(col, r).unwrap())
                    })
                    .collect(),
            );
        }
    }
    Ok(rows)
}

/// The error a query must end with.
async fn err(store: &ViewStore, sql: &str) -> String {
    match query(store, sql).await {
        Ok(rows) => panic!("{sql} should fail, gave {rows:?}"),
        Err(e) => e,
    }
}

/// The single text column of a query, in order.
async fn column(store: &ViewStore, sql: &str) -> Vec<Option<String>> {
    query(store, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .map(|mut r| r.remove(0))
        .collect()
}

/// A lake with `patients` synthetic patients (0 for none) plus [`EXTRA`];
/// returns the store and every input line.
async fn lake(dir: &Path, patients: usize) -> (ViewStore, Vec<String>) {
    let extra = dir.join("extra");
    std::fs::create_dir_all(&extra).unwrap();
    std::fs::write(extra.join("extra.ndjson"), EXTRA).unwrap();
    let mut inputs = lines(&extra);
    let lake = super::local_lake(dir);
    if patients > 0 {
        let data = super::synth(dir, patients, 11);
        inputs.extend(lines(&data));
        super::ingest(&lake, &[&data, &extra]).await;
    } else {
        super::ingest(&lake, &[&extra]).await;
    }
    (ViewStore::new(lake), inputs)
}

fn of_type<'a>(inputs: &'a [Json], ty: &str) -> impl Iterator<Item = &'a Json> {
    let ty = ty.to_owned();
    inputs
        .iter()
        .filter(move |r| r["resourceType"] == *ty.as_str())
}

fn id(r: &Json) -> String {
    r["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_functions_fhirpath_answers_what_the_json_says() {
    let dir = tempfile::tempdir().unwrap();
    let (store, lines) = lake(dir.path(), 15).await;
    let inputs: Vec<Json> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();

    // The issue's query: observations whose Quantity value is above 140.
    let mut expected: Vec<String> = of_type(&inputs, "Observation")
        .filter(|o| {
            o["valueQuantity"]["value"]
                .as_f64()
                .is_some_and(|v| v > 140.0)
        })
        .map(id)
        .collect();
    expected.sort();
    assert!(expected.len() > 3, "the data must exercise the filter");
    assert!(expected.contains(&"obs-decimal".to_string()));
    let got = column(
        &store,
        "SELECT id FROM resources WHERE resource_type = 'Observation' \
         AND fhirpath(resource, 'value.ofType(Quantity).value > 140') = 'true' ORDER BY id",
    )
    .await;
    let got: Vec<String> = got.into_iter().flatten().collect();
    assert_eq!(got, expected);

    // fhirpath_first as text and as a number: every Quantity value,
    // exactly as the JSON has it.
    let expected: BTreeMap<String, (String, f64)> = lines
        .iter()
        .zip(&inputs)
        .filter(|(_, r)| r["resourceType"] == "Observation")
        .filter_map(|(line, r)| {
            let text = quantity_value_text(line)?;
            let number = text.parse().unwrap();
            Some((id(r), (text, number)))
        })
        .collect();
    let rows = query(
        &store,
        "SELECT id, fhirpath_first(resource, 'value.ofType(Quantity).value') AS text, \
         CAST(fhirpath_first(resource, 'value.ofType(Quantity).value') AS DOUBLE) AS number \
         FROM resources WHERE resource_type = 'Observation'",
    )
    .await
    .unwrap();
    let got: BTreeMap<String, (String, f64)> = rows
        .into_iter()
        .filter_map(|r| {
            let number = r[2].as_deref()?.parse().unwrap();
            Some((r[0].clone()?, (r[1].clone()?, number)))
        })
        .collect();
    assert_eq!(got, expected);

    // fhirpath_first as a date, in an aggregate.
    let born_before_1970 = of_type(&inputs, "Patient")
        .filter(|p| p["birthDate"].as_str().is_some_and(|d| d < "1970-01-01"))
        .count();
    let got = column(
        &store,
        "SELECT CAST(count(*) AS VARCHAR) FROM resources WHERE resource_type = 'Patient' \
         AND CAST(fhirpath_first(resource, 'birthDate') AS DATE) < DATE '1970-01-01'",
    )
    .await;
    assert_eq!(got, vec![Some(born_before_1970.to_string())]);

    // Empty results are NULL: exactly the patients without a deceased[x].
    let alive = of_type(&inputs, "Patient")
        .filter(|p| {
            !p.as_object()
                .unwrap()
                .keys()
                .any(|k| k.starts_with("deceased"))
        })
        .count();
    let got = column(
        &store,
        "SELECT CAST(count(*) AS VARCHAR) FROM resources WHERE resource_type = 'Patient' \
         AND fhirpath(resource, 'deceased') IS NULL AND fhirpath_first(resource, 'deceased') IS NULL",
    )
    .await;
    assert_eq!(got, vec![Some(alive.to_string())]);

    // The rendering rules, one edge case each.
    let cases: [(&str, &str, &str, Option<&str>); 12] = [
        // (function, expression, resource id, expected text)
        (
            "fhirpath",
            "value.ofType(Quantity).value",
            "obs-decimal",
            Some("140.50"),
        ),
        (
            "fhirpath_first",
            "value.ofType(Quantity).value",
            "obs-decimal",
            Some("140.50"),
        ),
        (
            "fhirpath",
            "value.ofType(Quantity).value > 140",
            "obs-edge",
            Some("false"),
        ),
        (
            "fhirpath",
            "value",
            "obs-string",
            Some(r#""a \"quoted\" text""#),
        ),
        (
            "fhirpath_first",
            "value",
            "obs-string",
            Some(r#"a "quoted" text"#),
        ),
        (
            "fhirpath",
            "name.given",
            "pt-ext",
            Some(r#"["Ann","Marie"]"#),
        ),
        ("fhirpath_first", "name.given", "pt-ext", Some("Ann")),
        ("fhirpath", "name.family", "pt-ext", Some(r#""Doe""#)),
        // A primitive with only an extension has no value.
        ("fhirpath", "birthDate", "pt-ext", None),
        (
            "fhirpath",
            "birthDate.extension.value",
            "pt-ext",
            Some(r#""unknown""#),
        ),
        (
            "fhirpath",
            "name.given.count() + 0.5",
            "pt-ext",
            Some("2.5"),
        ),
        (
            "fhirpath",
            "value.ofType(Quantity)",
            "obs-edge",
            Some(r#"{"value":140,"unit":"mm[Hg]"}"#),
        ),
    ];
    for (f, expr, rid, want) in cases {
        let sql = format!("SELECT {f}(resource, '{expr}') FROM resources WHERE id = '{rid}'");
        assert_eq!(
            column(&store, &sql).await,
            vec![want.map(str::to_owned)],
            "{sql}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_functions_refuse_bad_arguments_and_json_functions_work() {
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = lake(dir.path(), 0).await;
    // A syntax error names the expression and the parser's position.
    let e = err(
        &store,
        "SELECT fhirpath(resource, 'name.where(given = ') FROM resources",
    )
    .await;
    assert!(
        e.contains("invalid FHIRPath expression 'name.where(given = '") && e.contains(" at 1:"),
        "{e}"
    );
    let e = err(
        &store,
        "SELECT fhirpath_first(resource, 'name..given') FROM resources",
    )
    .await;
    assert!(
        e.contains("fhirpath_first: invalid FHIRPath expression 'name..given'")
            && e.contains("at 1:"),
        "{e}"
    );
    // The expression must be a literal: not a column, not NULL, not too long.
    let e = err(
        &store,
        "SELECT fhirpath(resource, resource_type) FROM resources",
    )
    .await;
    assert!(e.contains("must be a string literal"), "{e}");
    let e = err(
        &store,
        "SELECT fhirpath_first(resource, id || '.x') FROM resources",
    )
    .await;
    assert!(e.contains("must be a string literal"), "{e}");
    let e = err(&store, "SELECT fhirpath(resource, NULL) FROM resources").await;
    assert!(e.contains("expression (second argument) is NULL"), "{e}");
    let long = format!(
        "SELECT fhirpath(resource, '{}') FROM resources",
        "id or ".repeat(700) + "id"
    );
    let e = query(&store, &long).await.unwrap_err();
    assert!(e.contains("at most 4096"), "{e}");
    // The resource must be text.
    let e = err(&store, "SELECT fhirpath(line, 'id') FROM resources").await;
    assert!(e.contains("must be a resource as JSON text"), "{e}");
    // An evaluation error names the expression and the resource.
    let e = err(
        &store,
        "SELECT fhirpath(resource, 'name.given + ''x''') FROM resources WHERE id = 'pt-ext'",
    )
    .await;
    assert!(
        e.contains("fhirpath('name.given + 'x'') on Patient/pt-ext") && e.contains("single item"),
        "{e}"
    );
    // Text that is not JSON.
    let e = err(&store, "SELECT fhirpath('{not json', 'id')").await;
    assert!(e.contains("not valid JSON"), "{e}");

    // Literal resources work too (a scalar in, a scalar out).
    let got = column(
        &store,
        r#"SELECT fhirpath('{"resourceType":"Patient","id":"x"}', 'id')"#,
    )
    .await;
    assert_eq!(got, vec![Some(r#""x""#.to_string())]);

    // JSON functions, with their operators.
    let got = query(
        &store,
        "SELECT json_get_str(resource, 'id'), resource->>'resourceType', \
         CAST(json_get_float(resource, 'valueQuantity', 'value') AS VARCHAR), \
         CAST(json_length(resource, 'name', 0, 'given') AS VARCHAR), \
         CAST(json_contains(resource, 'valueString') AS VARCHAR) \
         FROM resources ORDER BY id",
    )
    .await
    .unwrap();
    let s = |v: &str| Some(v.to_string());
    assert_eq!(
        got,
        vec![
            vec![
                s("obs-decimal"),
                s("Observation"),
                s("140.5"),
                None,
                s("false")
            ],
            vec![
                s("obs-edge"),
                s("Observation"),
                s("140.0"),
                None,
                s("false")
            ],
            vec![s("obs-string"), s("Observation"), None, None, s("true")],
            vec![s("pt-ext"), s("Patient"), None, s("2"), s("false")],
        ]
    );
}
