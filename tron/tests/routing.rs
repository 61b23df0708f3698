//! Route table tests on the real Petstore documents in `swagger-examples/`
//! and on hand-made conflicts.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use funcatron_bundle::{parse_api, Bundle, RuntimeKind};
use funcatron_tron::routes::Route;
use funcatron_tron::{RouteError, RouteOutcome, RouteTable};

fn bundle_of(name: &str, file: &Path, doc: &str) -> Bundle {
    let api = parse_api(file, doc).unwrap();
    Bundle {
        name: name.into(),
        dir: file.parent().unwrap_or(Path::new(".")).into(),
        spec_file: file.into(),
        spec_version: Some(api.version),
        host: api.host,
        base_path: api.base_path,
        bases: api.bases,
        operations: api.operations,
        runtime: RuntimeKind::Lua,
        handler: "main.lua".into(),
        timeout_ms: None,
        memory_bytes: None,
        command: Vec::new(),
        style: Default::default(),
        env: Default::default(),
        secrets: Vec::new(),
        validate: true,
        concurrency: None,
        doc: Default::default(),
        version: "v1".into(),
    }
}

fn bundle_from(name: &str, file: &Path) -> Bundle {
    bundle_of(name, file, &std::fs::read_to_string(file).unwrap())
}

fn bundle_text(name: &str, doc: &str) -> Bundle {
    bundle_of(name, &PathBuf::from(format!("{name}.yaml")), doc)
}

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../swagger-examples")
}

fn found<'t>(o: RouteOutcome<'t>) -> Route<'t> {
    match o {
        RouteOutcome::Found(r) => r,
        other => panic!("expected a route, got {other:?}"),
    }
}

#[test]
fn petstore_swagger2_routes_by_host_base_path_template_and_method() {
    let b = bundle_from("petstore2", &examples().join("petstore-swagger2.yaml"));
    assert_eq!(b.host.as_deref(), Some("petstore.swagger.io"));
    assert_eq!(b.base_path, "/v2");
    assert_eq!(b.operations.len(), 20);
    let t = RouteTable::build(&[b]).unwrap();

    let r = found(t.route("petstore.swagger.io", "GET", "/v2/pet/42"));
    assert_eq!(
        (r.func, r.operation_id, r.queue),
        ("petstore2", "getPetById", "funcatron.func.petstore2.v1")
    );
    assert_eq!(r.params, vec![("petId", "42".to_string())]);
    // Literal segments beat parameters.
    assert_eq!(
        found(t.route("petstore.swagger.io", "GET", "/v2/pet/findByStatus")).operation_id,
        "findPetsByStatus"
    );
    assert_eq!(
        found(t.route("petstore.swagger.io", "GET", "/v2/user/login")).operation_id,
        "loginUser"
    );
    let r = found(t.route("petstore.swagger.io", "GET", "/v2/user/j%C3%BCrgen"));
    assert_eq!(
        (r.operation_id, r.params[0].1.as_str()),
        ("getUserByName", "jürgen")
    );
    // Methods on one path.
    assert_eq!(
        found(t.route("petstore.swagger.io", "DELETE", "/v2/pet/7")).operation_id,
        "deletePet"
    );
    assert_eq!(
        found(t.route("petstore.swagger.io", "post", "/v2/pet/7")).operation_id,
        "updatePetWithForm"
    );
    let r = found(t.route("petstore.swagger.io:443", "POST", "/v2/pet/7/uploadImage"));
    assert_eq!((r.operation_id, r.params.len()), ("uploadFile", 1));
    // Host with a port matches the bare host; other hosts do not.
    assert!(matches!(
        t.route("petstore.swagger.io:8080", "GET", "/v2/store/inventory"),
        RouteOutcome::Found(_)
    ));
    assert_eq!(
        t.route("other.example.com", "GET", "/v2/store/inventory"),
        RouteOutcome::NotFound
    );
    // Wrong method: 405 with the allowed ones.
    assert_eq!(
        t.route("petstore.swagger.io", "PATCH", "/v2/pet/7"),
        RouteOutcome::MethodNotAllowed(vec!["GET", "POST", "DELETE"])
    );
    assert_eq!(
        t.route("petstore.swagger.io", "GET", "/v2/pet"),
        RouteOutcome::MethodNotAllowed(vec!["PUT", "POST"])
    );
    // Outside the base path or no such template.
    assert_eq!(
        t.route("petstore.swagger.io", "GET", "/v1/pet/1"),
        RouteOutcome::NotFound
    );
    assert_eq!(
        t.route("petstore.swagger.io", "GET", "/v2x/pet/1"),
        RouteOutcome::NotFound
    );
    assert_eq!(
        t.route("petstore.swagger.io", "GET", "/v2/pet/1/extra/deep"),
        RouteOutcome::NotFound
    );
}

#[test]
fn petstore_openapi3_routes_on_any_host_under_servers_url() {
    let b = bundle_from("petstore3", &examples().join("petstore-openapi3.yaml"));
    assert_eq!(b.host, None);
    assert_eq!(b.base_path, "/api/v3");
    assert_eq!(b.operations.len(), 19);
    let t = RouteTable::build(&[b]).unwrap();
    for (method, path, op) in [
        ("PUT", "/api/v3/pet", "updatePet"),
        ("POST", "/api/v3/pet", "addPet"),
        ("GET", "/api/v3/pet/findByTags", "findPetsByTags"),
        ("GET", "/api/v3/store/order/5", "getOrderById"),
        ("DELETE", "/api/v3/store/order/5", "deleteOrder"),
        ("GET", "/api/v3/user/logout", "logoutUser"),
        ("PUT", "/api/v3/user/bob", "updateUser"),
    ] {
        let r = found(t.route("anything.local", method, path));
        assert_eq!(r.operation_id, op, "{method} {path}");
    }
    assert_eq!(t.route("x", "GET", "/api/v3"), RouteOutcome::NotFound);
}

#[test]
fn longest_base_path_wins_and_named_host_beats_wildcard() {
    let root = bundle_text("root", "swagger: '2.0'\npaths:\n  /{any}:\n    get: {operationId: any}\n  /api/v1/x:\n    get: {operationId: shadow}\n");
    let api = bundle_text(
        "api",
        "swagger: '2.0'\nbasePath: /api/v1\npaths:\n  /x:\n    get: {operationId: x}\n",
    );
    let named = bundle_text("named", "swagger: '2.0'\nhost: example.com\nbasePath: /api/v1\npaths:\n  /x:\n    get: {operationId: nx}\n");
    let t = RouteTable::build(&[root, api, named]).unwrap();
    assert_eq!(
        found(t.route("example.com", "GET", "/api/v1/x")).func,
        "named"
    );
    assert_eq!(found(t.route("other.com", "GET", "/api/v1/x")).func, "api");
    assert_eq!(found(t.route("other.com", "GET", "/hello")).func, "root");
    // A path the longer base does not serve falls through to a shorter one.
    assert_eq!(
        t.route("other.com", "GET", "/api/v1/y"),
        RouteOutcome::NotFound
    );
}

#[test]
fn two_bundles_on_one_host_and_base_path_are_refused_naming_both() {
    let a = bundle_text(
        "alpha",
        "swagger: '2.0'\nhost: '*'\nbasePath: /v1/\npaths:\n  /a:\n    get: {operationId: a}\n",
    );
    let b = bundle_text("beta", "openapi: 3.0.0\ninfo: {title: b, version: '1'}\nservers: [{url: /v1}]\npaths:\n  /b:\n    get: {operationId: b, responses: {'200': {description: ok}}}\n");
    let err = RouteTable::build(&[a, b]).unwrap_err();
    assert!(matches!(err, RouteError::Conflict(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("alpha") && msg.contains("beta") && msg.contains("/v1"),
        "{msg}"
    );
}

#[test]
fn bad_templates_are_refused_by_the_loader_and_the_table() {
    let doc = "swagger: '2.0'\npaths:\n  /a/{oops:\n    get: {operationId: a}\n";
    let err = parse_api(Path::new("bad.yaml"), doc).unwrap_err().to_string();
    assert!(
        err.contains("bad.yaml:4:5: /paths/~1a~1{oops") && err.contains("unclosed"),
        "{err}"
    );
    // A bundle built by hand still gets a clear error from the table.
    let mut b = bundle_text(
        "bad",
        "swagger: '2.0'\npaths:\n  /a:\n    get: {operationId: a}\n",
    );
    b.operations[0].path = "/a/{oops".into();
    let err = RouteTable::build(&[b]).unwrap_err().to_string();
    assert!(err.contains("/a/{oops") && err.contains("unclosed"), "{err}");
}
