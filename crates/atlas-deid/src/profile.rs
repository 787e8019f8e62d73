//! Built-in profiles.
//!
//! **safe-harbor-minimal** removes or transforms the 18 HIPAA Safe Harbor
//! identifiers (45 CFR 164.514(b)(2)) and keeps clinical codes and values.
//! It is written in the same rule format users write, so `atlas deid
//! --profile safe-harbor-minimal --print-config` shows exactly what it does
//! and can be copied as a starting point. Rules apply in order; the first
//! rule to reach an element decides its fate:
//!
//! 1. Dates (`date`, `dateTime`, `instant`) shift by one offset per
//!    patient: 200 years back (`dateShiftBaseDays: -73052`, whole weeks)
//!    plus a keyed 30–365 days either way. Intervals within a patient's
//!    record stay exact, and every shifted date lands far from any real
//!    record, so no real date (and no real year) can reappear by
//!    coincidence. Dates more than 89 years ago are removed (ages over 89);
//!    a year or year-month moves with the patient at its precision.
//! 2. Resource ids, references and Bundle `fullUrl`s are replaced by a keyed
//!    HMAC-SHA256 of the id, so references still resolve.
//! 3. Codes and measurements stay: `Coding`, `CodeableConcept`, quantities,
//!    ranges, ratios, Observation values, extension URLs, identifier
//!    systems and types, `meta.profile`.
//! 4. `Age` values over 89 are removed.
//! 5. Names, telecom (phone, fax, email, URLs), identifiers (MRN, SSN, plan,
//!    account, licence, device numbers), attachments (photos, documents),
//!    narratives, notes, signatures, locations' coordinates are removed.
//! 6. Addresses keep state and country, and a 3-digit ZIP (`021` + `00`)
//!    unless the ZIP3 is one of the sparsely populated areas, which become
//!    `000`; lines, city, district, text and coordinates are removed.
//! 7. Every other free-text or identifier-like primitive (`string`,
//!    `markdown`, `uri`, `url`, `oid`, `uuid`, `id`, `base64Binary`) is
//!    removed: default-deny for text, so an unexpected field cannot carry a
//!    name out. Codes, numbers, booleans and times stay.

use crate::config::{ConfigError, DeidConfig};

/// The names `--profile` accepts.
pub const PROFILES: &[&str] = &["safe-harbor-minimal"];

/// ZIP3 areas with 20,000 people or fewer (HHS guidance, 2000 census, and the
/// upstream tool's list from the 2010 census): their ZIP3 becomes `000`.
pub const RESTRICTED_ZIP3: &[&str] = &[
    "036", "059", "063", "102", "203", "205", "369", "556", "692", "790", "821", "823", "830",
    "831", "878", "879", "884", "890", "893",
];

fn json_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Safe-Harbor-minimal configuration as JSON, with `secret` as the key for
/// hashing and date offsets.
pub fn safe_harbor_minimal_json(secret: &str) -> String {
    let rules: &[(&str, &str)] = &[
        ("nodesByType('date')", "dateShift"),
        ("nodesByType('dateTime')", "dateShift"),
        ("nodesByType('instant')", "dateShift"),
        ("Resource.id", "cryptoHash"),
        ("nodesByType('Reference').reference", "cryptoHash"),
        ("Bundle.entry.fullUrl", "cryptoHash"),
        ("nodesByType('Coding')", "keep"),
        ("nodesByType('CodeableConcept')", "keep"),
        ("nodesByType('Quantity')", "keep"),
        ("nodesByType('SimpleQuantity')", "keep"),
        ("nodesByType('MoneyQuantity')", "keep"),
        ("nodesByType('Money')", "keep"),
        ("nodesByType('Duration')", "keep"),
        ("nodesByType('Count')", "keep"),
        ("nodesByType('Distance')", "keep"),
        ("nodesByType('Range')", "keep"),
        ("nodesByType('Ratio')", "keep"),
        ("nodesByType('SampledData')", "keep"),
        ("Observation.value", "keep"),
        ("Observation.component.value", "keep"),
        ("nodesByType('Extension').url", "keep"),
        ("nodesByType('Identifier').system", "keep"),
        ("nodesByType('Identifier').use", "keep"),
        ("nodesByType('Meta').profile", "keep"),
        ("nodesByType('Age')", "redact"),
        ("nodesByType('HumanName')", "redact"),
        ("nodesByType('ContactPoint')", "redact"),
        ("nodesByType('Identifier')", "redact"),
        ("nodesByType('Attachment')", "redact"),
        ("nodesByType('Narrative')", "redact"),
        ("nodesByType('Annotation')", "redact"),
        ("nodesByType('Signature')", "redact"),
        ("Location.position", "redact"),
        ("nodesByType('Address').state", "keep"),
        ("nodesByType('Address').country", "keep"),
        ("nodesByType('Address')", "redact"),
        ("nodesByType('string')", "redact"),
        ("nodesByType('markdown')", "redact"),
        ("nodesByType('uri')", "redact"),
        ("nodesByType('url')", "redact"),
        ("nodesByType('oid')", "redact"),
        ("nodesByType('uuid')", "redact"),
        ("nodesByType('id')", "redact"),
        ("nodesByType('base64Binary')", "redact"),
    ];
    let rules: Vec<String> = rules
        .iter()
        .map(|(p, m)| format!("    {{\"path\": {}, \"method\": \"{m}\"}}", json_string(p)))
        .collect();
    let zips: Vec<String> = RESTRICTED_ZIP3.iter().map(|z| format!("\"{z}\"")).collect();
    format!(
        "{{\n  \"fhirVersion\": \"R4\",\n  \"processingErrors\": \"raise\",\n  \"fhirPathRules\": [\n{}\n  ],\n  \"parameters\": {{\n    \"dateShiftKey\": {key},\n    \"dateShiftScope\": \"patient\",\n    \"dateShiftBaseDays\": -73052,\n    \"cryptoHashKey\": {key},\n    \"enablePartialAgesForRedact\": true,\n    \"enablePartialDatesForRedact\": true,\n    \"enablePartialZipCodesForRedact\": true,\n    \"restrictedZipCodeTabulationAreas\": [{}]\n  }}\n}}\n",
        rules.join(",\n"),
        zips.join(", "),
        key = json_string(secret),
    )
}

/// A built-in profile by name.
pub fn by_name(name: &str, secret: &str) -> Result<DeidConfig, ConfigError> {
    match name {
        "safe-harbor-minimal" => DeidConfig::from_json(&safe_harbor_minimal_json(secret)),
        other => Err(ConfigError(format!(
            "unknown profile '{other}'; built-in profiles: {}",
            PROFILES.join(", ")
        ))),
    }
}

/// The profile's JSON by name (for `--print-config`).
pub fn json_by_name(name: &str, secret: &str) -> Option<String> {
    (name == "safe-harbor-minimal").then(|| safe_harbor_minimal_json(secret))
}
