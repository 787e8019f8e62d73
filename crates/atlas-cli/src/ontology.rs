//! `atlas ontology show`: the built-in ontology (`atlas-ontology`): object
//! types backed by views, their properties, links and saved object sets.

use anyhow::Result;
use atlas_ontology::Ontology;
use clap::Subcommand;

#[derive(Subcommand)]
pub enum OntologyCommand {
    /// Print the object types, their properties, links and saved object sets.
    #[command(
        after_help = "Example:\n  atlas ontology show\n  atlas ontology show --json | jq '.objectTypes[].apiName'"
    )]
    Show {
        #[arg(long)]
        json: bool,
    },
}

pub fn run(cmd: OntologyCommand) -> Result<()> {
    let OntologyCommand::Show { json } = cmd;
    let ontology = Ontology::builtin();
    if json {
        println!("{}", serde_json::to_string_pretty(&ontology)?);
    } else {
        print!("{}", ontology.render_text());
    }
    Ok(())
}
