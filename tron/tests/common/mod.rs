//! Helpers the Tron's in-process tests share.

#![allow(clippy::unwrap_used, dead_code)]

use std::path::Path;
use std::sync::Arc;

use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_tron::registry::{Registry, RegistryOptions};
use funcatron_tron::TronContext;

/// A registry with its store in `store`, on an embedded broker, with no
/// static bundles and no extra checks.
pub async fn open_registry(store: &Path) -> Arc<Registry> {
    let broker = AnyBroker::Embedded(EmbeddedBroker::new(1024));
    let (registry, _routes) = Registry::open(
        RegistryOptions {
            store: store.to_owned(),
            environment: None,
            static_bundles: Vec::new(),
            advertise: "http://127.0.0.1:1".into(),
            limits: Default::default(),
            check: None,
        },
        TronContext::new(broker),
    )
    .await
    .unwrap();
    registry
}
