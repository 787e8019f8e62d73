//! `atlas policy check` and `atlas policy explain`: the server's access
//! decision for a principal and a request path, made by the same
//! `PolicyEngine` over the same lake data, before the policy is deployed.

use anyhow::{Context, Result, bail};
use atlas_policy::{Action, Decision, PatientDirectory, Policy, PolicyEngine, Principal};
use clap::{Args, Subcommand};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// The decision for one principal and request: allowed rows, hidden
    /// fields and the rules that made it (exit status 1 when denied).
    #[command(after_help = "Examples:
  atlas --lake /tmp/demo-lake policy check --policy policy.toml --as alice --role clinician \\
    --path 'Observation?patient=42'
  atlas --lake /tmp/demo-lake policy check --policy policy.toml --as bob --purpose TREAT \\
    --path 'Patient/42'
  atlas --lake /tmp/demo-lake policy check --config atlas.toml --as etl --client loader \\
    --scope 'system/*.rs' --path Condition")]
    Check(CheckArgs),
    /// Like check, and how every rule fared (applied, or why not).
    #[command(after_help = "Example:
  atlas --lake /tmp/demo-lake policy explain --policy policy.toml --as alice --role clinician \\
    --path 'Patient/42/$everything'")]
    Explain(CheckArgs),
}

#[derive(Args)]
pub struct CheckArgs {
    /// The policy file (TOML; see docs/security.md).
    #[arg(long, conflicts_with = "config")]
    policy: Option<PathBuf>,
    /// An `atlas serve` configuration whose `[policy] file` to use.
    #[arg(long)]
    config: Option<PathBuf>,
    /// The token's subject.
    #[arg(long = "as", value_name = "SUBJECT")]
    subject: String,
    /// A role from the token's `roles` claim (repeatable).
    #[arg(long = "role")]
    roles: Vec<String>,
    /// The token's client id.
    #[arg(long)]
    client: Option<String>,
    /// The token's SMART scopes.
    #[arg(long, default_value = "user/*.rs")]
    scope: String,
    /// The token's `patient` claim (a patient-bound token).
    #[arg(long)]
    patient: Option<String>,
    /// The request's purpose of use (X-Purpose-Of-Use).
    #[arg(long)]
    purpose: Option<String>,
    /// The request, as a FHIR path: `Observation?patient=42`,
    /// `Patient/42`, `Patient/42/$everything`, `Condition`.
    #[arg(long)]
    path: String,
}

/// What a FHIR request path asks for.
struct Request {
    resource_type: String,
    action: Action,
    /// The patient the request is about, when it names one.
    patient: Option<String>,
}

fn parse_path(path: &str) -> Result<Request> {
    let path = path.trim().trim_start_matches('/');
    let path = path.strip_prefix("fhir/").unwrap_or(path);
    let (route, query) = path.split_once('?').unwrap_or((path, ""));
    let segs: Vec<&str> = route.split('/').filter(|s| !s.is_empty()).collect();
    let Some(&ty) = segs.first() else {
        bail!("--path {path:?}: name a resource type (Observation?patient=42)");
    };
    if !ty.starts_with(|c: char| c.is_ascii_uppercase())
        || !ty.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        bail!("--path {path:?}: '{ty}' is not a resource type");
    }
    let mut patient = None;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if k == "patient" || k == "subject" {
            patient = Some(v.strip_prefix("Patient/").unwrap_or(v).to_owned());
        }
    }
    let action = match segs.as_slice() {
        [_] => Action::Search,
        [_, id] => {
            if ty == "Patient" {
                patient = Some((*id).to_owned());
            }
            Action::Read
        }
        [_, id, "$everything"] if ty == "Patient" => {
            patient = Some((*id).to_owned());
            Action::Search
        }
        _ => {
            bail!("--path {path:?}: expected Type, Type/id, Type?params or Patient/id/$everything")
        }
    };
    Ok(Request {
        resource_type: ty.to_owned(),
        action,
        patient,
    })
}

fn load_policy(args: &CheckArgs) -> Result<(Policy, String)> {
    let file = match (&args.policy, &args.config) {
        (Some(p), _) => Some(p.clone()),
        (None, Some(c)) => atlas_serve::ServeConfig::from_file(c)?.policy.file,
        (None, None) => None,
    };
    match file {
        Some(f) => Ok((
            atlas_serve::read_policy(&f).map_err(anyhow::Error::msg)?,
            f.display().to_string(),
        )),
        None => Ok((
            Policy::scopes_only(),
            "no policy file (SMART scopes only)".to_owned(),
        )),
    }
}

/// The principal a token with these claims would authenticate as.
fn principal(args: &CheckArgs) -> Principal {
    let mut who = Principal::new(&args.subject, "atlas policy check").with_scopes(&args.scope);
    who = who.with_roles(args.roles.iter().cloned());
    if let Some(c) = &args.client {
        who = who.with_client(c);
    }
    if let Some(p) = &args.patient {
        who = who.with_patient(p);
    }
    if let Some(p) = &args.purpose {
        who = who.with_purpose(p);
    }
    who
}

pub async fn run(cmd: PolicyCommand, lake_location: &str) -> Result<()> {
    let (args, explain) = match cmd {
        PolicyCommand::Check(a) => (a, false),
        PolicyCommand::Explain(a) => (a, true),
    };
    let request = parse_path(&args.path)?;
    let (policy, source) = load_policy(&args)?;
    let lake = crate::lake::open_lake(lake_location)?;
    let tables = atlas_serve::Tables::new(lake);
    let directory = atlas_serve::LakeDirectory::load(&policy, &tables)
        .await
        .map_err(anyhow::Error::msg)
        .context("resolving the policy's patient sets over the lake")?;
    let who = principal(&args);
    let engine = PolicyEngine::new(policy);
    let (decision, trace) = engine.explain(
        &who,
        &request.resource_type,
        request.action,
        &directory as &dyn PatientDirectory,
    );
    println!("policy: {source}");
    println!(
        "request: {} on {}{}",
        request.action.as_str(),
        request.resource_type,
        request
            .patient
            .as_deref()
            .map(|p| format!(" (patient {p})"))
            .unwrap_or_default()
    );
    println!("decision: {}", decision.describe());
    let mut ok = matches!(decision, Decision::Allow(_));
    if let (Decision::Allow(g), Some(p)) = (&decision, &request.patient) {
        if g.rows.admits(Some(p)) {
            println!("patient {p}: inside the allowed rows");
        } else {
            println!(
                "patient {p}: outside the allowed rows (the server answers as if it had no data for them)"
            );
            ok = false;
        }
    }
    if explain {
        println!("rules:");
        for t in &trace {
            println!(
                "  {} {}: {}",
                if t.applied { "applied" } else { "skipped" },
                t.rule,
                t.note
            );
        }
    }
    if !ok {
        std::process::exit(1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_paths_name_type_action_and_patient() {
        let r = parse_path("Observation?patient=42&code=x").unwrap();
        assert_eq!(
            (r.resource_type.as_str(), r.action, r.patient.as_deref()),
            ("Observation", Action::Search, Some("42"))
        );
        let r = parse_path("/fhir/Patient/7").unwrap();
        assert_eq!((r.action, r.patient.as_deref()), (Action::Read, Some("7")));
        let r = parse_path("Patient/7/$everything").unwrap();
        assert_eq!(
            (r.action, r.patient.as_deref()),
            (Action::Search, Some("7"))
        );
        let r = parse_path("Condition?subject=Patient/9").unwrap();
        assert_eq!(r.patient.as_deref(), Some("9"));
        for bad in ["", "observation", "Observation/1/2", "Obs-x"] {
            assert!(parse_path(bad).is_err(), "{bad}");
        }
    }
}
