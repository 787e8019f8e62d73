//! De-identification configurations: Microsoft's FHIR anonymizer format
//! (`fhirPathRules` + `parameters`), read and checked up front so a bad
//! rule fails before the first resource, naming the rule.

use crate::select::Selector;
use atlas_fhirpath::Expr;
use atlas_fhirpath::json::{JsonObject, JsonValue};

/// Why a configuration was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("de-identification config: {0}")]
pub struct ConfigError(pub String);

fn err(msg: impl Into<String>) -> ConfigError {
    ConfigError(msg.into())
}

/// Which value seeds the date-shift offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DateShiftScope {
    /// The resource's id (upstream's default; a Bundle's entries use the Bundle's id).
    #[default]
    Resource,
    /// The input file's name.
    File,
    /// The input folder's name.
    Folder,
    /// The patient the resource belongs to (Atlas): one offset per patient across
    /// all of its resources, so intervals between a patient's events are kept.
    Patient,
}

/// What happens when a rule fails on a resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ProcessingErrors {
    /// The resource fails (upstream's default).
    #[default]
    Raise,
    /// The resource is replaced by an empty one labelled REDACTED.
    Skip,
}

/// The `parameters` block.
#[derive(Debug, Clone, Default)]
pub struct Parameters {
    pub date_shift_key: String,
    pub date_shift_scope: DateShiftScope,
    /// Atlas: days added to every date-shift offset (default 0). A large
    /// value moves shifted dates out of the range real records use, so no
    /// shifted date can equal a real one; `safe-harbor-minimal` uses about
    /// −200 years.
    pub date_shift_base_days: i64,
    pub crypto_hash_key: String,
    pub encrypt_key: String,
    pub enable_partial_ages_for_redact: bool,
    pub enable_partial_dates_for_redact: bool,
    pub enable_partial_zip_codes_for_redact: bool,
    pub restricted_zip_code_tabulation_areas: Vec<String>,
}

/// A generalize case: a FHIRPath condition on `$this` and the value expression.
#[derive(Debug, Clone)]
pub(crate) struct Case {
    pub condition: Expr,
    pub value: Expr,
}

#[derive(Debug, Clone)]
pub(crate) enum Method {
    Keep,
    Redact,
    DateShift,
    CryptoHash,
    Encrypt,
    Substitute {
        replace_with: Option<JsonValue<'static>>,
    },
    Perturb {
        span: f64,
        proportional: bool,
        round_to: u32,
    },
    Generalize {
        cases: Vec<Case>,
        redact_others: bool,
    },
}

impl Method {
    pub(crate) fn name(&self) -> &'static str {
        match self {
            Method::Keep => "keep",
            Method::Redact => "redact",
            Method::DateShift => "dateShift",
            Method::CryptoHash => "cryptoHash",
            Method::Encrypt => "encrypt",
            Method::Substitute { .. } => "substitute",
            Method::Perturb { .. } => "perturb",
            Method::Generalize { .. } => "generalize",
        }
    }
}

/// One `fhirPathRules` entry.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The path as written.
    pub path: String,
    /// The leading type name (`Patient` in `Patient.name`), empty when none.
    pub(crate) resource_type: String,
    /// `None` when the path is only a type name (`Patient`, `Resource`): the resource itself.
    pub(crate) selector: Option<Selector>,
    pub(crate) method: Method,
}

impl Rule {
    /// The method name, as upstream spells it.
    pub fn method(&self) -> &'static str {
        self.method.name()
    }

    pub(crate) fn applies_to(&self, resource_type: &str) -> bool {
        self.resource_type.is_empty()
            || self.resource_type == resource_type
            || self.resource_type == "Resource"
            || self.resource_type == "DomainResource"
    }
}

/// A whole configuration.
#[derive(Debug, Clone)]
pub struct DeidConfig {
    pub rules: Vec<Rule>,
    pub parameters: Parameters,
    pub processing_errors: ProcessingErrors,
}

fn get_str<'a>(o: &'a JsonObject<'_>, key: &str) -> Option<&'a str> {
    o.get(key).and_then(JsonValue::as_str)
}

fn get_bool(o: &JsonObject<'_>, key: &str) -> Result<bool, ConfigError> {
    match o.get(key) {
        None | Some(JsonValue::Null) => Ok(false),
        Some(JsonValue::Bool(b)) => Ok(*b),
        Some(_) => Err(err(format!("parameters.{key} must be true or false"))),
    }
}

/// The text of a JSON scalar (`"1"` and `1` both give `1`).
fn scalar_text(v: &JsonValue<'_>) -> Option<String> {
    match v {
        JsonValue::String(s) => Some(s.to_string()),
        JsonValue::Number(n) => Some(n.to_string()),
        JsonValue::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

impl DeidConfig {
    /// Reads a configuration file's text (a UTF-8 BOM is accepted).
    pub fn from_json(text: &str) -> Result<DeidConfig, ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let doc = atlas_fhirpath::json::parse(text).map_err(|e| err(format!("not JSON: {e}")))?;
        let root = doc
            .as_object()
            .ok_or_else(|| err("the configuration must be a JSON object"))?;
        if let Some(v) = get_str(root, "fhirVersion")
            && !v.is_empty()
            && !v.eq_ignore_ascii_case("R4")
        {
            return Err(err(format!(
                "fhirVersion {v} is not supported; Atlas reads FHIR R4"
            )));
        }
        let processing_errors = match get_str(root, "processingErrors") {
            None => ProcessingErrors::Raise,
            Some(s) if s.eq_ignore_ascii_case("raise") => ProcessingErrors::Raise,
            Some(s) if s.eq_ignore_ascii_case("skip") => ProcessingErrors::Skip,
            Some(s) => {
                return Err(err(format!(
                    "processingErrors '{s}' is not one of raise, skip"
                )));
            }
        };
        let parameters = match root.get("parameters") {
            None | Some(JsonValue::Null) => Parameters::default(),
            Some(JsonValue::Object(p)) => parse_parameters(p)?,
            Some(_) => return Err(err("parameters must be an object")),
        };
        let rules_json = match root.get("fhirPathRules") {
            Some(JsonValue::Array(items)) => items,
            _ => return Err(err("fhirPathRules (an array of rules) is missing")),
        };
        let mut rules = Vec::with_capacity(rules_json.len());
        for (i, r) in rules_json.iter().enumerate() {
            let o = r
                .as_object()
                .ok_or_else(|| err(format!("fhirPathRules[{i}] must be an object")))?;
            rules.push(parse_rule(i, o)?);
        }
        if !parameters.encrypt_key.is_empty()
            && !matches!(parameters.encrypt_key.len(), 16 | 24 | 32)
        {
            return Err(err(format!(
                "encryptKey is {} bits; AES needs 128, 192 or 256 bits (16, 24 or 32 bytes)",
                parameters.encrypt_key.len() * 8
            )));
        }
        Ok(DeidConfig {
            rules,
            parameters,
            processing_errors,
        })
    }
}

fn parse_parameters(p: &JsonObject<'_>) -> Result<Parameters, ConfigError> {
    let scope = match get_str(p, "dateShiftScope") {
        None => DateShiftScope::Resource,
        Some(s) if s.eq_ignore_ascii_case("resource") => DateShiftScope::Resource,
        Some(s) if s.eq_ignore_ascii_case("file") => DateShiftScope::File,
        Some(s) if s.eq_ignore_ascii_case("folder") => DateShiftScope::Folder,
        Some(s) if s.eq_ignore_ascii_case("patient") => DateShiftScope::Patient,
        Some(s) => {
            return Err(err(format!(
                "dateShiftScope '{s}' is not one of resource, file, folder, patient"
            )));
        }
    };
    let zips = match p.get("restrictedZipCodeTabulationAreas") {
        None | Some(JsonValue::Null) => Vec::new(),
        Some(JsonValue::Array(items)) => items
            .iter()
            .map(|z| {
                z.as_str().map(str::to_string).ok_or_else(|| {
                    err("restrictedZipCodeTabulationAreas must be a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(err("restrictedZipCodeTabulationAreas must be a list")),
    };
    Ok(Parameters {
        date_shift_key: get_str(p, "dateShiftKey").unwrap_or_default().to_string(),
        date_shift_base_days: match p.get("dateShiftBaseDays") {
            None | Some(JsonValue::Null) => 0,
            Some(v) => v.as_i64().filter(|d| d.abs() <= 366_000).ok_or_else(|| {
                err("dateShiftBaseDays must be a whole number of days within 1,000 years")
            })?,
        },
        date_shift_scope: scope,
        crypto_hash_key: get_str(p, "cryptoHashKey").unwrap_or_default().to_string(),
        encrypt_key: get_str(p, "encryptKey").unwrap_or_default().to_string(),
        enable_partial_ages_for_redact: get_bool(p, "enablePartialAgesForRedact")?,
        enable_partial_dates_for_redact: get_bool(p, "enablePartialDatesForRedact")?,
        enable_partial_zip_codes_for_redact: get_bool(p, "enablePartialZipCodesForRedact")?,
        restricted_zip_code_tabulation_areas: zips,
    })
}

/// Splits `Patient.name.family` into the leading type name and the rest, as upstream does.
fn split_type_prefix(path: &str) -> (&str, &str) {
    let bytes = path.as_bytes();
    if bytes.first().is_some_and(u8::is_ascii_uppercase) {
        let end = path
            .char_indices()
            .find(|(_, c)| !c.is_ascii_alphabetic())
            .map_or(path.len(), |(i, _)| i);
        let rest = &path[end..];
        let rest = rest.strip_prefix('.').unwrap_or(rest);
        return (&path[..end], rest);
    }
    ("", path)
}

fn parse_rule(i: usize, o: &JsonObject<'_>) -> Result<Rule, ConfigError> {
    let path = get_str(o, "path")
        .ok_or_else(|| err(format!("fhirPathRules[{i}]: path is missing")))?
        .to_string();
    let method_name = get_str(o, "method")
        .ok_or_else(|| err(format!("fhirPathRules[{i}] ({path}): method is missing")))?;
    let at = format!("fhirPathRules[{i}] ({path})");
    let method = match method_name.to_ascii_lowercase().as_str() {
        "keep" => Method::Keep,
        "redact" => Method::Redact,
        "dateshift" => Method::DateShift,
        "cryptohash" => Method::CryptoHash,
        "encrypt" => Method::Encrypt,
        "substitute" => {
            let replace_with = match o.get("replaceWith") {
                None => return Err(err(format!("{at}: substitute needs replaceWith"))),
                Some(JsonValue::Null) => None,
                Some(v) => Some(v.clone().into_owned()),
            };
            Method::Substitute { replace_with }
        }
        "perturb" => {
            let span = o
                .get("span")
                .and_then(scalar_text)
                .ok_or_else(|| err(format!("{at}: perturb needs span")))?
                .parse::<f64>()
                .ok()
                .filter(|s| *s >= 0.0 && s.is_finite())
                .ok_or_else(|| err(format!("{at}: span must be a number ≥ 0")))?;
            let round_to = match o.get("roundTo").and_then(scalar_text) {
                None => 2,
                Some(t) => t
                    .parse::<u32>()
                    .ok()
                    .filter(|r| *r <= 28)
                    .ok_or_else(|| err(format!("{at}: roundTo must be an integer 0..=28")))?,
            };
            let proportional = match get_str(o, "rangeType") {
                None => false,
                Some(s) if s.eq_ignore_ascii_case("fixed") => false,
                Some(s) if s.eq_ignore_ascii_case("proportional") => true,
                Some(s) => {
                    return Err(err(format!(
                        "{at}: rangeType '{s}' is not one of fixed, proportional"
                    )));
                }
            };
            Method::Perturb {
                span,
                proportional,
                round_to,
            }
        }
        "generalize" => {
            let cases_obj = match o.get("cases") {
                Some(JsonValue::Object(c)) => c,
                _ => return Err(err(format!("{at}: generalize needs a cases object"))),
            };
            let mut cases = Vec::new();
            for (cond, value) in cases_obj.iter() {
                let value_text = scalar_text(value)
                    .ok_or_else(|| err(format!("{at}: case '{cond}' needs an expression value")))?;
                let condition = Expr::parse(cond)
                    .map_err(|e| err(format!("{at}: case condition '{cond}': {e}")))?;
                let value = Expr::parse(&value_text)
                    .map_err(|e| err(format!("{at}: case value '{value_text}': {e}")))?;
                cases.push(Case { condition, value });
            }
            let redact_others = match get_str(o, "otherValues") {
                None => true,
                Some(s) if s.eq_ignore_ascii_case("redact") => true,
                Some(s) if s.eq_ignore_ascii_case("keep") => false,
                Some(s) => {
                    return Err(err(format!(
                        "{at}: otherValues '{s}' is not one of redact, keep"
                    )));
                }
            };
            Method::Generalize {
                cases,
                redact_others,
            }
        }
        other => {
            return Err(err(format!(
                "{at}: method '{other}' is not one of keep, redact, dateShift, cryptoHash, encrypt, substitute, perturb, generalize"
            )));
        }
    };
    let (resource_type, expression) = split_type_prefix(&path);
    let selector = if expression.is_empty() {
        None
    } else {
        Some(Selector::parse(expression).map_err(|e| err(format!("{at}: {e}")))?)
    };
    Ok(Rule {
        resource_type: resource_type.to_string(),
        selector,
        method,
        path,
    })
}
