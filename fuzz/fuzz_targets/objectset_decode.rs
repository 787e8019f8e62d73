//! Parse the input as JSON and decode it as an object set against the
//! built-in ontology (the `objectSet` / `where` body of `loadObjects`).
//! Refusals are fine; a panic or a hang is a bug, and whatever decodes must
//! decode again, identically, from its normalised form.
#![no_main]

use std::sync::LazyLock;

use atlas_objectset::Decoder;
use atlas_ontology::Ontology;
use libfuzzer_sys::fuzz_target;
use serde_json::Value as Json;

static ONTOLOGY: LazyLock<Ontology> = LazyLock::new(Ontology::builtin);

fuzz_target!(|data: &[u8]| {
    if data.len() > 64 * 1024 {
        return;
    }
    let Ok(json) = serde_json::from_slice::<Json>(data) else {
        return;
    };
    let decoder = Decoder::new(&ONTOLOGY);
    if let Ok(set) = decoder.object_set(&json, "objectSet") {
        let again = decoder
            .object_set(&set.to_json(), "objectSet")
            .expect("the normalised form decodes");
        assert_eq!(again, set, "round trip changed the set");
    }
    // The same input as a filter over each object type.
    for t in &ONTOLOGY.object_types {
        if let Ok(w) = decoder.where_clause(&json, &t.api_name, "where") {
            let again = decoder
                .where_clause(&w.to_json(), &t.api_name, "where")
                .expect("the normalised filter decodes");
            assert_eq!(again, w, "round trip changed the filter");
        }
    }
});
