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

    // Every base, operations' own servers, default handler names.
    let root = tempfile::tempdir().unwrap();
    let examples = repo().join("swagger-examples");
    for (name, file) in [
        ("servers", "servers.yaml"),
        ("handlers", "no-operation-ids.yaml"),
    ] {
        write_bundle(
            root.path(),
            name,
            &[
                (
                    "openapi.yaml",
                    &std::fs::read_to_string(examples.join(file)).unwrap(),
                ),
                ("funcatron.yaml", "runtime: lua\n"),
                ("main.lua", "return {}"),
            ],
        );
    }
    let out = show(&[root.path().join("servers").to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    for line in [
        "host: eu.api.example.com  basePath: /v1",
        "served on: eu.api.example.com/v1, eu.api.example.com/v2, us.api.example.com/v1, us.api.example.com/v2, {tenant}.shop.example.org/shop, {tenant}.shop.example.org:8443/shop, */relative, */dot/v1",
        "GET     eu.api.example.com/v1/orders/{orderId}  ->  showOrder",
        "GET     reports.example.com/reports  ->  listReports",
        "GET     localhost:{port}/internal/health  ->  health",
    ] {
        assert!(text.contains(line), "{text}\nlacks: {line}");
    }
    let out = show(&[root.path().join("handlers").to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("GET     handlers.example.com/h/pets/{petId}  ->  get_pets_petId  (no operationId: default name)"),
        "{text}"
    );

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

#[tokio::test]
async fn up_refuses_a_conflicting_pair_and_a_broken_bundle_and_serves_the_rest() {
    let root = tempfile::tempdir().unwrap();
    copy_examples(root.path(), &["hello"]);
    let lua = ("main.lua", "return {a = function() return 'a' end}");
    write_bundle(
        root.path(),
        "clash-a",
        &[
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /clash\nx-funcatron: {runtime: lua}\npaths:\n  /a:\n    get: {operationId: a}\n",
            ),
            lua,
        ],
    );
    // Its second server claims clash-a's base.
    write_bundle(
        root.path(),
        "clash-b",
        &[
            (
                "openapi.yaml",
                "openapi: 3.1.0\ninfo: {title: b, version: '1'}\nx-funcatron: {runtime: lua}\nservers: [{url: /elsewhere}, {url: /clash/}]\npaths:\n  /b:\n    get: {operationId: a}\n",
            ),
            lua,
        ],
    );
    write_bundle(
        root.path(),
        "broken",
        &[
            (
                "openapi.yaml",
                "openapi: 3.1.0\ninfo: {title: b, version: '1'}\nx-funcatron: {runtime: lua}\npaths:\n  /b:\n    get:\n      responses: [1]\n",
            ),
            lua,
        ],
    );
    let addr = free_addr().to_string();
    let log = root.path().join("up.log");
    let _up = funcatron_logged(
        &[
            "up",
            "--listen",
            &addr,
            "--bundles",
            root.path().to_str().unwrap(),
        ],
        "",
        &log,
    );
    let base = format!("http://{addr}");
    wait_ready(&format!("{base}/hello/ready")).await;
    for path in ["/clash/a", "/elsewhere/b", "/clash/b", "/b"] {
        assert_eq!(text(&format!("{base}{path}")).await.0, 404, "{path}");
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("bundle rejected")
            && logged.contains("`clash-a`")
            && logged.contains("`clash-b`")
            && logged.contains("host `*` basePath `/clash`"),
        "{logged}"
    );
    assert!(
        logged.contains(
            "broken/openapi.yaml:7:18: /paths/~1b/get/responses: `responses` must be a mapping"
        ),
        "{logged}"
    );
}
