//! `atlas fhirpath eval` and `atlas fhirpath test`: one expression over one
//! resource, or the HL7 FHIRPath suite. Parsing, checking and evaluating
//! are `atlas-fhirpath`'s job.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use atlas_fhirpath::{EvalContext, Expr};
use clap::Subcommand;

#[derive(Subcommand)]
pub enum FhirpathCommand {
    /// Evaluate an expression against a FHIR R4 JSON resource and print the
    /// result collection as JSON.
    #[command(after_help = "Examples:
  atlas fhirpath eval 'Patient.name.where(use = \'official\').given.first()' patient.json
  atlas fhirpath eval 'Observation.value.ofType(Quantity).value' obs.json
  atlas fhirpath eval 'name.given.count() > %n' patient.json --var n=1
  atlas fhirpath eval --check 'Patient.nmae' patient.json      # static check first

A malformed expression is reported with its position (`expected ')' at 1:17`).")]
    Eval {
        /// The FHIRPath expression.
        expression: String,
        /// A JSON file holding one resource (or `-` for stdin).
        resource: String,
        /// A variable as name=JSON (used as %name); repeatable.
        #[arg(long = "var", value_name = "NAME=JSON")]
        vars: Vec<String>,
        /// Type-check the expression against the resource's type before
        /// evaluating; problems are printed and the command fails.
        #[arg(long)]
        check: bool,
    },
    /// Run the HL7 FHIRPath suite (tests-fhir-r4.xml) and print
    /// `N passed, N failed, N skipped`.
    #[command(after_help = "Example:
  atlas fhirpath test ../shared/conformance/fhirpath/tests-fhir-r4.xml \\
      --inputs ../shared/conformance/fhirpath/r4-input --report fhirpath-report.json

Inputs are read as JSON; a test whose input exists only as XML is skipped and
named. --convert-xml converts such inputs instead.")]
    Test {
        /// The suite file.
        suite: PathBuf,
        /// The folder with the suite's input resources.
        #[arg(long)]
        inputs: PathBuf,
        /// Write every test's result as JSON here.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Convert inputs that exist only as XML instead of skipping their tests.
        #[arg(long)]
        convert_xml: bool,
        /// Also list the failing tests.
        #[arg(long, short)]
        verbose: bool,
    },
}

pub fn run(cmd: FhirpathCommand) -> Result<()> {
    match cmd {
        FhirpathCommand::Eval {
            expression,
            resource,
            vars,
            check,
        } => eval(&expression, &resource, &vars, check),
        FhirpathCommand::Test {
            suite,
            inputs,
            report,
            convert_xml,
            verbose,
        } => test(&suite, &inputs, report.as_deref(), convert_xml, verbose),
    }
}

fn eval(expression: &str, resource: &str, vars: &[String], check: bool) -> Result<()> {
    let json = read_resource(resource)?;
    let expr = Expr::parse(expression).map_err(|e| anyhow::anyhow!("invalid expression: {e}"))?;
    if check {
        check_against(&expr, &json, resource)?;
    }
    let values = parse_vars(vars)?;
    let mut ctx = EvalContext::new();
    for (name, value) in &values {
        ctx = ctx.with_json_variable(name, value);
    }
    let out = expr
        .evaluate(&json, &ctx)
        .map_err(|e| anyhow::anyhow!("evaluation failed: {e}"))?;
    println!("{}", serde_json::to_string_pretty(&out.to_json())?);
    Ok(())
}

/// The resource in the file `resource`, or on stdin for `-`.
fn read_resource(resource: &str) -> Result<serde_json::Value> {
    let text = if resource == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin().lock(), &mut s)
            .context("reading the resource from stdin")?;
        s
    } else {
        std::fs::read_to_string(resource).with_context(|| format!("reading {resource}"))?
    };
    serde_json::from_str(&text).with_context(|| format!("{resource}: not valid JSON"))
}

/// `--check`: the static type check against the resource's own type;
/// prints every problem and fails when there is one.
fn check_against(expr: &Expr, json: &serde_json::Value, resource: &str) -> Result<()> {
    let ty = json
        .get("resourceType")
        .and_then(|t| t.as_str())
        .with_context(|| format!("{resource}: no resourceType to check against"))?;
    let problems = expr.check(ty);
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("{p}");
        }
        bail!("{} problem(s) in the expression", problems.len());
    }
    Ok(())
}

/// `--var NAME=JSON`; a value that is not JSON is taken as a string, so
/// `--var code=8867-4` needs no quoting.
fn parse_vars(vars: &[String]) -> Result<Vec<(String, serde_json::Value)>> {
    let mut values = Vec::with_capacity(vars.len());
    for v in vars {
        let (name, value) = v
            .split_once('=')
            .with_context(|| format!("--var {v}: expected NAME=JSON"))?;
        let value: serde_json::Value =
            serde_json::from_str(value).unwrap_or_else(|_| serde_json::Value::String(value.into()));
        values.push((name.to_owned(), value));
    }
    Ok(values)
}

fn test(
    suite: &Path,
    inputs: &Path,
    report: Option<&Path>,
    convert_xml: bool,
    verbose: bool,
) -> Result<()> {
    use atlas_fhirpath::suite::{RunOptions, Status, run_with};
    let result = run_with(
        suite,
        inputs,
        &RunOptions {
            convert_xml_inputs: convert_xml,
        },
    )?;
    for t in &result.tests {
        let reason = t.reason.as_deref().unwrap_or("");
        match t.status {
            Status::Skip => println!("skipped {}/{}: {reason}", t.group, t.name),
            Status::Fail if verbose => println!(
                "failed  {}/{}: {} -- {reason}",
                t.group, t.name, t.expression
            ),
            _ => {}
        }
    }
    if let Some(path) = report {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", result.summary());
    Ok(())
}
