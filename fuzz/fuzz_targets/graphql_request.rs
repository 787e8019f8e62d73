//! Run the input as a GraphQL request (query text, or a JSON body with
//! query and variables) against the schema generated from the built-in
//! ontology, through the server's bounded entry (`graphql::bounded`: text
//! size, nesting, fragment spreads, aliases, root fields, expanded fields,
//! rows reserved) and its depth and complexity limits. No lake is
//! attached, so resolvers that would read data answer with an error: what is
//! fuzzed is the entry (parsing, validation, limits, argument handling).
//! Errors are fine; a panic or a hang is a bug.
#![no_main]

use std::sync::LazyLock;

use async_graphql::dynamic::Schema;
use libfuzzer_sys::fuzz_target;

static CONFIG: LazyLock<atlas_serve::ServeConfig> = LazyLock::new(|| {
    let mut config = atlas_serve::ServeConfig::default();
    config.auth.dev = true; // introspection on: the larger surface
    config
});

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    atlas_serve::graphql::schema(&atlas_ontology::Ontology::builtin(), &CONFIG)
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
    let (query, variables) = match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(o)) => (
            o.get("query").and_then(|q| q.as_str()).unwrap_or("").to_owned(),
            o.get("variables").cloned(),
        ),
        _ => (text.to_owned(), None),
    };
    let Ok(request) = atlas_serve::graphql::bounded(&CONFIG, query, variables, None) else {
        return;
    };
    let response = RUNTIME.block_on(SCHEMA.execute(request));
    let _ = serde_json::to_vec(&response);
});
