//! `atlas token`: a bearer token from the lake's local dev issuer
//! (`atlas-serve::DevIssuer`), for `atlas serve --dev-auth` on the same lake.

use anyhow::{Context, Result};
use atlas_serve::{DevIssuer, TokenRequest};
use clap::Args;

use crate::lake::open_lake;

// Doc comments here are `--help` text, where `[auth] dev` names a config
// section, not a rustdoc link.
#[allow(rustdoc::broken_intra_doc_links)]
#[derive(Args)]
#[command(after_help = "Examples:
  atlas --lake /tmp/demo-lake token --sub alice --scope 'user/*.rs'
  atlas --lake /tmp/demo-lake token --sub bob --scope 'patient/*.rs' --patient 42 --ttl 15m

Scopes are SMART on FHIR (v1 user/*.read or v2 user/*.rs). --patient binds the token to one
patient's compartment: it then sees only that patient's objects on every path.")]
pub struct TokenArgs {
    /// The token's subject (who it is for).
    #[arg(long)]
    pub sub: String,
    /// SMART scopes, space-separated.
    #[arg(long, default_value = "user/*.rs")]
    pub scope: String,
    /// Bind the token to this patient's compartment.
    #[arg(long)]
    pub patient: Option<String>,
    /// Lifetime: seconds, or with a unit (90s, 15m, 1h, 1d).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    /// A role for the token's `roles` claim (repeatable; policy rules
    /// may name roles).
    #[arg(long = "role")]
    pub roles: Vec<String>,
    /// The token's `purpose_of_use` claim (TREAT, HRESCH, ...); several,
    /// comma-separated (TREAT,HRESCH), let a request pick one with the
    /// X-Purpose-Of-Use header. Without a claim the header is refused
    /// unless the server sets [auth] purpose_header_without_claim.
    #[arg(long)]
    pub purpose: Option<String>,
    /// The FHIRcast topic to bind the token to (the `hub.topic` claim):
    /// its holder may subscribe and publish to that topic of the hub.
    #[arg(long)]
    pub fhircast_topic: Option<String>,
}

pub async fn run(args: TokenArgs, lake_location: &str) -> Result<()> {
    // The lifetime is checked before the lake is opened: a typo should not
    // wait for object storage.
    let ttl_secs = parse_duration(&args.ttl).with_context(|| {
        format!(
            "--ttl {:?}: give seconds or a number with s, m, h or d",
            args.ttl
        )
    })?;
    let request = TokenRequest {
        subject: args.sub,
        scope: args.scope,
        patient: args.patient,
        roles: args.roles,
        purpose: args.purpose,
        fhircast_topic: args.fhircast_topic,
        ttl_secs,
    };
    let lake = open_lake(lake_location)?;
    let issuer = DevIssuer::open(&lake).await?;
    let token = issuer.mint(&request)?;
    println!("{token}");
    Ok(())
}

/// `90`, `90s`, `15m`, `1h`, `1d` as seconds; `None` for anything else,
/// zero, or an overflow.
fn parse_duration(text: &str) -> Option<u64> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => t.split_at(i),
        None => (t, "s"),
    };
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return None,
    };
    n.checked_mul(mult).filter(|s| *s > 0)
}

#[cfg(test)]
mod tests {
    use super::parse_duration;

    #[test]
    fn durations_take_seconds_or_a_unit() {
        assert_eq!(parse_duration("90"), Some(90));
        assert_eq!(parse_duration("90s"), Some(90));
        assert_eq!(parse_duration("15m"), Some(900));
        assert_eq!(parse_duration(" 1h "), Some(3600));
        assert_eq!(parse_duration("1d"), Some(86_400));
        for bad in [
            "",
            "0",
            "0s",
            "1w",
            "h",
            "-1",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }
}
