//! Staging rewrites: one bundle, routes per deployment environment.

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_bundle::Bundle;
use funcatron_ingress::IngressOptions;

#[tokio::test]
async fn the_environment_rewrites_host_and_base_path() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello", "petshop"]);
    let (bundles, errors) = Bundle::load_all_in(root.path(), Some("production"));
    assert!(errors.is_empty(), "{errors:?}");
    let c = spawn_in_process(
        AnyBroker::Embedded(EmbeddedBroker::new(1000)),
        bundles,
        IngressOptions::default(),
        true,
    )
    .await;
    wait_ready(&format!("{}/hello/ready", c.base)).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/shop/pets/1", c.base))
        .header("host", "pets.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The document's own basePath and other hosts no longer route there.
    let r = http
        .get(format!("{}/petshop/pets/1", c.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = http
        .get(format!("{}/shop/pets/1", c.base))
        .header("host", "pets.staging.example")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
}

#[test]
fn bundle_show_prints_effective_routes_and_names_bad_rules() {
    let show = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_funcatron"))
            .arg("bundle")
            .arg("show")
            .args(args)
            .output()
            .unwrap()
    };
    let dir = repo().join("func-bundles/petshop");
    let out = show(&[dir.to_str().unwrap(), "--environment", "staging"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success());
    assert!(
        text.contains("host: pets.staging.example  basePath: /petshop"),
        "{text}"
    );
    assert!(
        text.contains("GET     pets.staging.example/petshop/pets/{petId}  ->  showPetById"),
        "{text}"
    );
    let out = show(&[dir.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("host: *  basePath: /petshop"), "{text}");

    let root = tempfile::tempdir().unwrap();
    let b = write_bundle(
        root.path(),
        "bad-rule",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /x\nx-funcatron:\n  runtime: lua\n  environments:\n    test:\n      - {field: host, match: 'a', replace: 'b'}\npaths:\n  /:\n    get: {operationId: a}\n",
            ),
            ("main.lua", "return {a = function() end}"),
        ],
    );
    let out = show(&[b.to_str().unwrap(), "--environment", "test"]);
    assert!(!out.status.success());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("environments.test[0]") && err.contains("`host` is not in the document"),
        "{err}"
    );
}
