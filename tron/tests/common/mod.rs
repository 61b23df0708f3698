//! Helpers the Tron's in-process tests share.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;
use std::sync::Arc;

use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_tron::registry::{Ceilings, Registry, RegistryOptions};
use funcatron_tron::TronContext;

/// A registry with its store in `store`, on an embedded broker, with no
/// static bundles and no extra checks.
pub async fn open_registry(store: &Path) -> Arc<Registry> {
    open_registry_with(store, Ceilings::default()).await
}

/// [`open_registry`] with these ceilings.
pub async fn open_registry_with(store: &Path, ceilings: Ceilings) -> Arc<Registry> {
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(1024));
    let (registry, _routes) = Registry::open(
        RegistryOptions {
            store: store.to_owned(),
            advertise: "http://127.0.0.1:1".into(),
            ceilings,
            ..Default::default()
        },
        TronContext::new(broker),
    )
    .await
    .unwrap();
    registry
}

/// A Lua bundle archive named `s` at `/s`; `manifest` adds fields to its
/// `x-funcatron` (e.g. `, timeout_ms: 5000`).
pub fn lua_archive(manifest: &str) -> Vec<u8> {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("swagger.yaml"),
        format!(
            "swagger: '2.0'\nbasePath: /s\nx-funcatron: {{name: s, runtime: lua{manifest}}}\npaths:\n  /:\n    get: {{operationId: hi}}\n"
        ),
    )
    .unwrap();
    std::fs::write(
        src.path().join("main.lua"),
        "return { hi = function() return 'hi' end }",
    )
    .unwrap();
    funcatron_bundle::archive::build(src.path()).unwrap().1
}

/// Check `v`, the JSON answer of `method template` with `status`, against
/// the management API document's schema for it, made strict (no
/// properties besides the documented ones).
pub fn check_answer(method: &str, template: &str, status: u16, v: &serde_json::Value) {
    fn strict(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if m.contains_key("properties") && !m.contains_key("additionalProperties") {
                    m.insert("additionalProperties".into(), false.into());
                }
                m.values_mut().for_each(strict);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(strict),
            _ => {}
        }
    }
    let doc = serde_json::to_value(funcatron_tron::mgmt::openapi()).unwrap();
    let op = &doc["paths"][template][method.to_ascii_lowercase()];
    let mut root =
        op["responses"][status.to_string()]["content"]["application/json"]["schema"].clone();
    assert!(
        root.is_object(),
        "{method} {template}: no JSON schema for {status}"
    );
    let mut components = doc["components"].clone();
    strict(&mut components);
    root["components"] = components;
    let validator = jsonschema::validator_for(&root).unwrap();
    let errors: Vec<String> = validator
        .iter_errors(v)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {template} {status}: {v}\n  {errors:#?}"
    );
}
