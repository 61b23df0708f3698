//! What a bundle asks of the document store: the collections its Func may
//! use and how (`store`), and the collections it defines if they are
//! missing (`collections`), both in its manifest (`x-funcatron` or
//! `funcatron.yaml`).
//!
//! The loader checks them here; the Tron defines the declared collections
//! when it serves the bundle (an existing definition is the operator's and
//! is left alone), refuses an upload whose store triggers or `store`
//! entries name a collection that is neither defined nor declared, and
//! answers a Func's store calls (through its Runner) only within `store`.
//! See `docs/store.md`.
//!
//! ```yaml
//! x-funcatron:
//!   runtime: lua
//!   store:
//!     orders: [read]
//!     invoices: [read, write]
//!   collections:
//!     invoices: {schema: {type: object, required: [total]}}
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::triggers::check_name;

/// What a Func may do with a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreOp {
    /// Get and list documents.
    Read,
    /// Create, replace, patch and delete documents.
    Write,
}

/// Check `store` and `collections`; an error is (the field, why).
pub fn check(
    store: &BTreeMap<String, Vec<StoreOp>>,
    collections: &BTreeMap<String, Value>,
) -> Result<(), String> {
    for (name, ops) in store {
        check_name(name).map_err(|e| format!("field `store`: collection name {e}"))?;
        if ops.is_empty() {
            return Err(format!(
                "field `store.{name}`: list at least one of read, write"
            ));
        }
    }
    for (name, def) in collections {
        check_name(name).map_err(|e| format!("field `collections`: collection name {e}"))?;
        let at = format!("field `collections.{name}`");
        let obj = def
            .as_object()
            .ok_or_else(|| format!("{at}: a mapping of schema, read, write"))?;
        for (key, value) in obj {
            match key.as_str() {
                "schema" => {
                    jsonschema::validator_for(value).map_err(|e| {
                        format!("field `collections.{name}.schema`: not a JSON Schema: {e}")
                    })?;
                }
                "read" | "write" => {
                    if !matches!(value.as_str(), Some("public" | "token" | "operator")) {
                        return Err(format!(
                            "field `collections.{name}.{key}`: one of public, token, operator"
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "{at}: unknown field `{other}` (schema, read, write)"
                    ))
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn declarations_are_checked() {
        let mut store = BTreeMap::new();
        store.insert("orders".to_owned(), vec![StoreOp::Read]);
        let mut cols = BTreeMap::new();
        cols.insert(
            "orders".to_owned(),
            json!({"schema": {"type": "object"}, "read": "public"}),
        );
        assert!(check(&store, &cols).is_ok());
        store.insert("Bad".to_owned(), vec![StoreOp::Read]);
        assert!(check(&store, &cols).is_err());
        store.remove("Bad");
        store.insert("empty".to_owned(), vec![]);
        assert!(check(&store, &cols).is_err());
        store.remove("empty");
        cols.insert("x".to_owned(), json!({"schema": {"type": 3}}));
        let e = check(&store, &cols).unwrap_err();
        assert!(e.contains("collections.x.schema"), "{e}");
        cols.insert("x".to_owned(), json!({"read": "everyone"}));
        assert!(check(&store, &cols).is_err());
        cols.insert("x".to_owned(), json!({"rules": {}}));
        assert!(check(&store, &cols).is_err());
    }
}
