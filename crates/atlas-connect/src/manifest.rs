//! Bulk Data manifests, as servers write them:
//! * STU2 (2.0.0): `transactionTime`, `request`, `requiresAccessToken`,
//!   `output[{type, url, count}]`, `error[]`, `deleted[]`, `extension` (object);
//! * STU3 (3.0.0): adds `outputOrganizedBy`, `continuesInFile` and a
//!   `link[{relation: "next", url}]` to a further page of a partial manifest;
//! * STU4 (4.0.0 ballot): `manifestType`, `error` renamed `outcome`, no
//!   `request`, `extension` an array.
//!
//! Every member but `transactionTime` and `output` is optional; unknown
//! members are ignored (the spec lets servers add them).

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ConnectError;

/// One file the manifest lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputFile {
    /// The resource type (absent in organized-by-patient and some `deleted` entries).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub resource_type: Option<String>,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    #[serde(
        default,
        rename = "continuesInFile",
        skip_serializing_if = "Option::is_none"
    )]
    pub continues_in_file: Option<String>,
}

/// What a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileKind {
    /// Resources (`output`).
    Output,
    /// Transaction Bundles of DELETE entries (`deleted`).
    Deleted,
    /// OperationOutcomes (`error`, STU4 `outcome`).
    Error,
}

#[derive(Debug, Clone, Deserialize)]
struct Link {
    #[serde(default)]
    relation: String,
    url: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    transaction_time: Option<String>,
    #[serde(default)]
    request: Option<String>,
    #[serde(default)]
    requires_access_token: Option<bool>,
    #[serde(default)]
    output: Vec<OutputFile>,
    #[serde(default)]
    error: Vec<OutputFile>,
    #[serde(default)]
    outcome: Vec<OutputFile>,
    #[serde(default)]
    deleted: Vec<OutputFile>,
    #[serde(default)]
    link: Vec<Link>,
    #[serde(default)]
    output_organized_by: Option<String>,
    #[serde(default)]
    organize_output_by: Option<String>,
    #[serde(default)]
    manifest_type: Option<String>,
    #[serde(default)]
    extension: Option<Value>,
}

/// A complete-status manifest (one page of it, or all pages merged).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub transaction_time: String,
    pub request: Option<String>,
    pub requires_access_token: bool,
    pub output: Vec<OutputFile>,
    pub error: Vec<OutputFile>,
    pub deleted: Vec<OutputFile>,
    pub organized_by: Option<String>,
    pub manifest_type: Option<String>,
    /// `extension` as sent (an object in STU2/3, an array in STU4).
    pub extension: Option<Value>,
    /// `link[relation=next]`: the next page of a partial manifest.
    pub next: Option<String>,
}

impl Manifest {
    /// Reads a manifest; `url` names it in errors.
    pub fn parse(bytes: &[u8], url: &str) -> Result<Manifest, ConnectError> {
        let raw: Raw = serde_json::from_slice(bytes)
            .map_err(|e| ConnectError::protocol(url, format!("the manifest is not valid: {e}")))?;
        let transaction_time = raw
            .transaction_time
            .ok_or_else(|| ConnectError::protocol(url, "the manifest has no transactionTime"))?;
        if chrono::DateTime::parse_from_rfc3339(&transaction_time).is_err() {
            return Err(ConnectError::protocol(
                url,
                format!(
                    "the manifest's transactionTime {transaction_time:?} is not a FHIR instant"
                ),
            ));
        }
        let mut error = raw.error;
        error.extend(raw.outcome);
        Ok(Manifest {
            transaction_time,
            request: raw.request,
            // Absent means false in every version of the spec.
            requires_access_token: raw.requires_access_token.unwrap_or(false),
            output: raw.output,
            error,
            deleted: raw.deleted,
            organized_by: raw.output_organized_by.or(raw.organize_output_by),
            manifest_type: raw.manifest_type,
            extension: raw.extension,
            next: raw
                .link
                .into_iter()
                .find(|l| l.relation == "next")
                .map(|l| l.url),
        })
    }

    /// Adds a further page of a partial manifest.
    pub fn merge(&mut self, page: Manifest) {
        self.output.extend(page.output);
        self.error.extend(page.error);
        self.deleted.extend(page.deleted);
        self.requires_access_token |= page.requires_access_token;
        self.next = page.next;
    }

    /// Drops files listed twice (same kind and URL), keeping the first.
    pub fn dedupe(&mut self) {
        for list in [&mut self.output, &mut self.error, &mut self.deleted] {
            let mut seen = std::collections::HashSet::new();
            list.retain(|f| seen.insert(f.url.clone()));
        }
    }

    /// Every file with its kind, in manifest order.
    pub fn files(&self) -> impl Iterator<Item = (FileKind, &OutputFile)> {
        self.output
            .iter()
            .map(|f| (FileKind::Output, f))
            .chain(self.deleted.iter().map(|f| (FileKind::Deleted, f)))
            .chain(self.error.iter().map(|f| (FileKind::Error, f)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stu4_shape() {
        let m = Manifest::parse(
            br#"{"transactionTime":"2021-01-01T00:00:00Z","requiresAccessToken":true,
            "output":[{"type":"Patient","url":"u1"}],"outcome":[{"url":"e1"}],
            "deleted":[{"url":"d1"}],"extension":[{"url":"x","valueBoolean":true}]}"#,
            "m",
        )
        .unwrap();
        assert_eq!(m.error.len(), 1);
        assert_eq!(m.deleted[0].url, "d1");
        assert!(m.requires_access_token);
        assert_eq!(m.files().count(), 3);
    }

    #[test]
    fn missing_transaction_time_is_an_error() {
        let e = Manifest::parse(br#"{"output":[]}"#, "http://s/m").unwrap_err();
        assert!(e.to_string().contains("transactionTime"), "{e}");
        let e =
            Manifest::parse(br#"{"transactionTime":"yesterday","output":[]}"#, "m").unwrap_err();
        assert!(e.to_string().contains("instant"), "{e}");
    }
}
