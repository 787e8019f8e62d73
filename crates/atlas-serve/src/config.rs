//! Server configuration: defaults, then `atlas.toml`, then environment
//! variables, then command-line flags (the CLI applies those last).

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// Settings of `atlas serve`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address to listen on.
    pub bind: SocketAddr,
    /// Page size when a request gives none.
    pub default_page_size: usize,
    /// Largest page size a request may ask for.
    pub max_page_size: usize,
    /// How long a page token stays valid, in seconds.
    pub page_token_ttl_secs: u64,
    /// Answer one-patient object-set reads from the view files' patient
    /// clustering (cached footers and page indexes, no query plan). Off:
    /// every query is planned in DataFusion (for comparison).
    pub slice_reads: bool,
    /// Who may call the server (`[auth]`).
    pub auth: crate::auth::AuthConfig,
    /// GraphQL limits and introspection (`[graphql]`).
    pub graphql: crate::graphql::GraphqlConfig,
    /// HTTPS certificate and key (`[tls]`); plain HTTP without.
    pub tls: Option<crate::tls::TlsConfig>,
    /// The policy file (`[policy]`); SMART scopes only without one.
    pub policy: crate::policy::PolicyConfig,
    /// The audit trail (`[audit]`).
    pub audit: crate::audit::AuditConfig,
    /// De-identification at egress (`[deid]`): the key for rules with `deid`.
    pub deid: crate::deid::DeidConfigSection,

    // --- Links (issue 18, part 4) ---
    /// The server's public base URL (`https://fhir.example.org`, no query):
    /// every link the server writes (FHIR Bundle `self`, `next`, `fullUrl`,
    /// the CapabilityStatement's `implementation.url`) starts with it. The
    /// request's `Host` header is never used. Unset: `http(s)://<bind>`.
    pub public_base_url: Option<String>,
    /// Request deadlines, turns per principal, shutdown deadline (`[limits]`).
    pub limits: crate::limits::LimitsConfig,
    /// Bounds of `/api/v2/sql` queries (`[sql]`: rows, seconds, memory).
    pub sql: atlas_access::sql::SqlLimits,

    // --- Events (issue 21) ---
    /// The change feed watcher, `GET /events` and its tickets (`[events]`).
    pub events: crate::events::EventsConfig,
    /// Live views (`[views] auto_refresh`).
    pub views: crate::events::ViewsConfig,
    /// The FHIRcast STU3 hub (`[fhircast]`).
    pub fhircast: crate::fhircast::FhircastConfig,
    /// FHIR Subscriptions, R4 backport (`[subscriptions]`).
    pub subscriptions: crate::subscriptions::SubscriptionsConfig,
}

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            default_page_size: 250,
            max_page_size: 10_000,
            page_token_ttl_secs: 3600,
            slice_reads: true,
            auth: crate::auth::AuthConfig::default(),
            graphql: crate::graphql::GraphqlConfig::default(),
            tls: None,
            policy: crate::policy::PolicyConfig::default(),
            audit: crate::audit::AuditConfig::default(),
            deid: crate::deid::DeidConfigSection::default(),
            public_base_url: None,
            limits: crate::limits::LimitsConfig::default(),
            sql: atlas_access::sql::SqlLimits::default(),
            events: Default::default(),
            views: Default::default(),
            fhircast: Default::default(),
            subscriptions: Default::default(),
        }
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    File { path: String, message: String },
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl ServeConfig {
    /// Reads a TOML file (keys as the fields of [`ServeConfig`]; unknown
    /// keys are refused, naming them).
    pub fn from_file(path: &Path) -> Result<ServeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::File {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses TOML text.
    pub fn from_toml(text: &str) -> Result<ServeConfig, String> {
        let c: ServeConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        c.check().map_err(|e| e.to_string())?;
        Ok(c)
    }

    /// Applies `ATLAS_SERVE_BIND`, `ATLAS_SERVE_DEFAULT_PAGE_SIZE` and
    /// `ATLAS_SERVE_MAX_PAGE_SIZE` from `env` (a lookup, so tests need not
    /// touch the process environment).
    pub fn with_env(
        mut self,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<ServeConfig, ConfigError> {
        if let Some(v) = env("ATLAS_SERVE_BIND") {
            self.bind = v.parse().map_err(|e| ConfigError::Env {
                name: "ATLAS_SERVE_BIND",
                value: v.clone(),
                message: format!("not a socket address (like 127.0.0.1:8080): {e}"),
            })?;
        }
        for (name, slot) in [
            ("ATLAS_SERVE_DEFAULT_PAGE_SIZE", &mut self.default_page_size),
            ("ATLAS_SERVE_MAX_PAGE_SIZE", &mut self.max_page_size),
        ] {
            if let Some(v) = env(name) {
                *slot = v.parse().map_err(|e| ConfigError::Env {
                    name,
                    value: v.clone(),
                    message: format!("not a whole number: {e}"),
                })?;
            }
        }
        self.check()?;
        Ok(self)
    }

    /// The base every link is built from (no trailing slash): the
    /// configured `public_base_url`, else the bind address.
    pub fn public_base(&self) -> String {
        match &self.public_base_url {
            Some(u) => u.trim_end_matches('/').to_owned(),
            None => {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                format!("{scheme}://{}", self.bind)
            }
        }
    }

    /// Refuses settings that cannot work together.
    pub fn check(&self) -> Result<(), ConfigError> {
        if let Some(u) = &self.public_base_url {
            let ok = url::Url::parse(u).is_ok_and(|p| {
                matches!(p.scheme(), "http" | "https")
                    && p.host().is_some()
                    && p.query().is_none()
                    && p.fragment().is_none()
                    && p.username().is_empty()
                    && p.password().is_none()
            });
            if !ok {
                return Err(ConfigError::Invalid(format!(
                    "public_base_url {u:?} must be an http(s) URL with a host and no query, like https://fhir.example.org"
                )));
            }
        }
        self.auth.check().map_err(ConfigError::Invalid)?;
        self.limits.check().map_err(ConfigError::Invalid)?;
        if self.max_page_size == 0 || self.default_page_size == 0 {
            return Err(ConfigError::Invalid(
                "default_page_size and max_page_size must be at least 1".into(),
            ));
        }
        if self.default_page_size > self.max_page_size {
            return Err(ConfigError::Invalid(format!(
                "default_page_size {} is larger than max_page_size {}",
                self.default_page_size, self.max_page_size
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env_override_defaults() {
        let c = ServeConfig::from_toml("bind = \"0.0.0.0:9000\"\nmax_page_size = 500\n").unwrap();
        assert_eq!(c.bind.port(), 9000);
        assert_eq!(c.default_page_size, 250);
        let c = c
            .with_env(|k| (k == "ATLAS_SERVE_DEFAULT_PAGE_SIZE").then(|| "100".into()))
            .unwrap();
        assert_eq!(c.default_page_size, 100);
        assert_eq!(c.max_page_size, 500);
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        let e = ServeConfig::from_toml("bnid = \"x\"").unwrap_err();
        assert!(e.contains("bnid"), "{e}");
        let e = ServeConfig::from_toml("default_page_size = 900\nmax_page_size = 10").unwrap_err();
        assert!(e.contains("larger than max_page_size"), "{e}");
        let e = ServeConfig::default()
            .with_env(|k| (k == "ATLAS_SERVE_BIND").then(|| "localhost".into()))
            .unwrap_err()
            .to_string();
        assert!(e.contains("ATLAS_SERVE_BIND"), "{e}");
    }
}
