//! Run the input as a GraphQL request (query text, or a JSON body with
//! query and variables) against the schema generated from the built-in
//! ontology, with the server's depth and complexity limits. No lake is
//! attached, so resolvers that would read data answer with an error: what is
//! fuzzed is the entry (parsing, validation, limits, argument handling).
//! Errors are fine; a panic or a hang is a bug.
#![no_main]

use std::sync::LazyLock;

use async_graphql::dynamic::Schema;
use libfuzzer_sys::fuzz_target;

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    let mut config = atlas_serve::ServeConfig::default();
    config.auth.dev = true; // introspection on: the larger surface
    atlas_serve::graphql::schema(&atlas_ontology::Ontology::builtin(), &config)
        .expect("the built-in ontology gives a schema")
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
});

fuzz_target!(|data: &[u8]| {
    if data.len() > 16 * 1024 {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let request = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => {
            let query = o.get("query").and_then(|q| q.as_str()).unwrap_or("").to_owned();
            let mut r = async_graphql::Request::new(query);
            if let Some(v) = o.get("variables") {
                r = r.variables(async_graphql::Variables::from_json(v.clone()));
            }
            r
        }
        _ => async_graphql::Request::new(text),
    };
    let response = RUNTIME.block_on(SCHEMA.execute(request));
    let _ = serde_json::to_vec(&response);
});
