//! Route table tests on the real Petstore documents and the fixtures in
//! `swagger-examples/` (every server, variable value, relative URL and
//! override; default handler names), on hand-made conflicts, and a
//! property test: random valid documents route every declared operation
//! to itself, and route alike through the table an ingress builds from
//! the Trons' broadcast and through its flat matchers (what the nginx
//! ingress routes by, read here with a router written as the Lua one is).

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use funcatron_bundle::{parse_api, ApiDoc, Bundle, RuntimeKind};
use funcatron_control::admission::AdmissionTable;
use funcatron_tron::routes::Route;
use funcatron_tron::{servable, RouteError, RouteOutcome, RouteTable};

fn bundle_of(name: &str, file: &Path, doc: &str) -> Bundle {
    bundle_of_api(name, file, parse_api(file, doc).unwrap())
}

fn bundle_of_api(name: &str, file: &Path, api: ApiDoc) -> Bundle {
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
        check_formats: true,
        check_responses: false,
        concurrency: None,
        debug: false,
        auth: Default::default(),
        cors: None,
        async_policy: Default::default(),
        chainable: false,
        store_access: Default::default(),
        collections: Default::default(),
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

/// What a router decides, comparable across tables: Found(func,
/// operation, method, template, params), NotFound, 405 with methods,
/// Preflight with methods.
#[derive(Debug, PartialEq)]
enum Flat {
    Found(String, String, String, String, Vec<(String, String)>),
    NotFound,
    NotAllowed(Vec<String>),
    Preflight(String, Vec<String>),
}

fn flat_of(o: RouteOutcome<'_>) -> Flat {
    match o {
        RouteOutcome::Found(r) => Flat::Found(
            r.func.into(),
            r.operation_id.into(),
            r.method.into(),
            r.template.into(),
            r.params
                .iter()
                .map(|(k, v)| ((*k).into(), v.clone()))
                .collect(),
        ),
        RouteOutcome::NotFound => Flat::NotFound,
        RouteOutcome::MethodNotAllowed(a) => {
            Flat::NotAllowed(a.iter().map(|m| (*m).into()).collect())
        }
        RouteOutcome::Preflight(r, a) => {
            Flat::Preflight(r.func.into(), a.iter().map(|m| (*m).into()).collect())
        }
    }
}

/// Route by the broadcast's flat matchers, step for step as
/// `ingress-lua/lib/funcatron/routes.lua` does.
fn flat_route(t: &AdmissionTable, host: &str, method: &str, path: &str) -> Flat {
    let re = |p: &str, fold: bool| {
        regex::RegexBuilder::new(p)
            .case_insensitive(fold)
            .build()
            .unwrap()
    };
    let mut denied: Option<(usize, Vec<String>)> = None;
    for m in &t.matchers {
        if denied.as_ref().is_some_and(|(f, _)| *f != m.func) {
            continue;
        }
        if m.host.as_ref().is_some_and(|h| !re(h, true).is_match(host)) {
            continue;
        }
        let rest = match &m.base {
            None => path.to_owned(),
            Some(b) => match re(b, false).captures(path) {
                None => continue,
                Some(c) => match c.get(1).map(|g| g.as_str()) {
                    None | Some("") => "/".to_owned(),
                    Some(r) => r.to_owned(),
                },
            },
        };
        for p in &m.paths {
            let Some(caps) = re(&p.regex, false).captures(&rest) else {
                continue;
            };
            let Some((meth, op)) = p
                .methods
                .iter()
                .find(|(x, _)| x.eq_ignore_ascii_case(method))
            else {
                if denied.is_none() {
                    denied = Some((m.func, p.methods.iter().map(|(x, _)| x.clone()).collect()));
                }
                break;
            };
            let params = p
                .names
                .iter()
                .zip(caps.iter().skip(1))
                .map(|(n, c)| {
                    let raw = c.map(|g| g.as_str()).unwrap_or_default();
                    let v = percent_encoding::percent_decode_str(raw).decode_utf8_lossy();
                    (n.clone(), v.into_owned())
                })
                .collect();
            return Flat::Found(
                t.funcs[m.func].func.clone(),
                op.clone(),
                meth.clone(),
                p.template.clone(),
                params,
            );
        }
    }
    match denied {
        Some((f, allow)) if method.eq_ignore_ascii_case("OPTIONS") => {
            Flat::Preflight(t.funcs[f].func.clone(), allow)
        }
        Some((_, allow)) => Flat::NotAllowed(allow),
        None => Flat::NotFound,
    }
}

/// The broadcast a Tron would send of `t`.
fn broadcast_of(t: &RouteTable) -> AdmissionTable {
    AdmissionTable {
        funcs: t
            .func_infos()
            .iter()
            .map(|f| f.admission().clone())
            .collect(),
        matchers: t.matchers(),
        ..AdmissionTable::default()
    }
}

/// `t`, the table built from its broadcast, and its flat matchers route
/// (`host`, `method`, `path`) alike.
fn routes_alike(t: &RouteTable, host: &str, method: &str, path: &str) -> Result<(), String> {
    let b = broadcast_of(t);
    let again = RouteTable::from_admission(&b.funcs).map_err(|e| e.to_string())?;
    let want = flat_of(t.route(host, method, path));
    let rebuilt = flat_of(again.route(host, method, path));
    let flat = flat_route(&b, host, method, path);
    if want != rebuilt || want != flat {
        return Err(format!(
            "{method} {host}{path}: table {want:?}, rebuilt {rebuilt:?}, flat {flat:?}"
        ));
    }
    Ok(())
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
    // OPTIONS on a path without an `options` operation: a preflight for
    // the Func, with the path's methods and parameters.
    match t.route("petstore.swagger.io", "OPTIONS", "/v2/pet/7") {
        RouteOutcome::Preflight(r, allow) => {
            assert_eq!(allow, vec!["GET", "POST", "DELETE"]);
            assert_eq!(
                (r.method, r.template, r.operation_id),
                ("OPTIONS", "/pet/{petId}", "")
            );
            assert_eq!(r.params, vec![("petId", "7".to_owned())]);
        }
        other => panic!("expected a preflight, got {other:?}"),
    }
    assert_eq!(
        t.route("petstore.swagger.io", "OPTIONS", "/v2/nothing/here"),
        RouteOutcome::NotFound
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
    let err = parse_api(Path::new("bad.yaml"), doc)
        .unwrap_err()
        .to_string();
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
    assert!(
        err.contains("/a/{oops") && err.contains("unclosed"),
        "{err}"
    );
}

/// `route` is `Found` at this operation, its method and template.
fn at<'t>(t: &'t RouteTable, host: &str, method: &str, path: &str) -> Route<'t> {
    match t.route(host, method, path) {
        RouteOutcome::Found(r) => r,
        other => panic!("{method} {host}{path}: expected a route, got {other:?}"),
    }
}

#[test]
fn openapi31_routes_on_both_servers_and_not_its_webhooks() {
    let b = bundle_from("events", &examples().join("openapi31-webhooks.yaml"));
    let t = RouteTable::build(&[b]).unwrap();
    for (host, base) in [
        ("pets.example.com", "/api"),
        ("pets.example.com:443", "/api"),
        ("localhost:8080", "/events/v1"),
        ("localhost:8080", "/events/v2"),
    ] {
        let r = at(&t, host, "GET", &format!("{base}/pets/7"));
        assert_eq!(
            (r.operation_id, r.method, r.template),
            ("showPetById", "GET", "/pets/{petId}")
        );
        assert_eq!(r.params, vec![("petId", "7".to_owned())]);
        assert_eq!(
            at(&t, host, "POST", &format!("{base}/pets")).operation_id,
            "addPet"
        );
    }
    for (host, path) in [
        ("pets.example.com", "/events/v1/pets"),
        ("localhost:8080", "/api/pets"),
        ("localhost", "/events/v1/pets"),
        ("localhost:8080", "/events/v3/pets"),
        ("other.example.com", "/api/pets"),
        // The webhook is something the API sends: nothing routes to it.
        ("pets.example.com", "/api/newPet"),
    ] {
        assert_eq!(
            t.route(host, "GET", path),
            RouteOutcome::NotFound,
            "{host}{path}"
        );
    }
}

#[test]
fn every_server_enum_value_variable_and_override_routes() {
    let b = bundle_from("servers", &examples().join("servers.yaml"));
    let t = RouteTable::build(&[b]).unwrap();
    let mut doc_bases: Vec<(String, String)> = Vec::new();
    for region in ["eu", "us"] {
        for version in ["v1", "v2"] {
            doc_bases.push((format!("{region}.api.example.com"), format!("/{version}")));
        }
    }
    for (tenant, port) in [
        ("acme", ""),
        ("zed", ":443"),
        ("x-1", ":8443"),
        ("acme", ":9999"),
    ] {
        doc_bases.push((format!("{tenant}.shop.example.org{port}"), "/shop".into()));
    }
    for host in ["anything.local", "127.0.0.1:8000"] {
        doc_bases.push((host.into(), "/relative".into()));
        doc_bases.push((host.into(), "/dot/v1".into()));
    }
    for (host, base) in &doc_bases {
        let r = at(&t, host, "GET", &format!("{base}/orders/o-1"));
        assert_eq!(
            (r.operation_id, r.template),
            ("showOrder", "/orders/{orderId}")
        );
        assert_eq!(
            at(&t, host, "GET", &format!("{base}/orders")).operation_id,
            "listOrders"
        );
        // The path item and the operation with their own servers are not
        // served on the document's (POST /health is).
        assert_eq!(
            t.route(host, "GET", &format!("{base}/reports")),
            RouteOutcome::NotFound,
            "{host}{base}"
        );
        assert_eq!(
            t.route(host, "GET", &format!("{base}/health")),
            RouteOutcome::MethodNotAllowed(vec!["POST"]),
            "{host}{base}"
        );
    }
    // The :9999 port is served only because :443 (https's own) matches any;
    // :8443 is an enum value. Other values and shapes are not.
    for (host, path) in [
        ("de.api.example.com", "/v1/orders"),
        ("eu.api.example.com", "/v3/orders"),
        ("api.example.com", "/v1/orders"),
        ("a.b.shop.example.org", "/shop/orders"),
        ("shop.example.org", "/shop/orders"),
        ("eu.api.example.com", "/orders"),
        ("anything.local", "/orders"),
    ] {
        assert_eq!(
            t.route(host, "GET", path),
            RouteOutcome::NotFound,
            "{host}{path}"
        );
    }
    let r = at(&t, "reports.example.com", "GET", "/reports");
    assert_eq!(r.operation_id, "listReports");
    assert_eq!(
        t.route("reports.example.com", "GET", "/orders"),
        RouteOutcome::NotFound
    );
    // GET /health has its own server; POST /health the document's.
    assert_eq!(
        at(&t, "localhost:8080", "GET", "/internal/health").operation_id,
        "health"
    );
    assert_eq!(
        at(&t, "localhost:1234", "GET", "/internal/health").operation_id,
        "health"
    );
    assert_eq!(
        t.route("localhost", "GET", "/internal/health"),
        RouteOutcome::NotFound
    );
    assert_eq!(
        at(&t, "x", "POST", "/relative/health").operation_id,
        "setHealth"
    );
    assert_eq!(
        t.route("x", "GET", "/relative/health"),
        RouteOutcome::MethodNotAllowed(vec!["POST"])
    );
    // POST on the GET-only server: that template there allows GET only.
    assert_eq!(
        t.route("localhost:8080", "POST", "/internal/health"),
        RouteOutcome::MethodNotAllowed(vec!["GET"])
    );
}

#[test]
fn default_handler_names_and_shared_operation_ids_route() {
    let b = bundle_from("handlers", &examples().join("no-operation-ids.yaml"));
    let t = RouteTable::build(&[b]).unwrap();
    let h = "handlers.example.com";
    for (method, path, op, template) in [
        ("GET", "/h", "get_root", "/"),
        ("GET", "/h/", "get_root", "/"),
        ("GET", "/h/pets/1", "get_pets_petId", "/pets/{petId}"),
        ("DELETE", "/h/pets/1", "delete_pets_petId", "/pets/{petId}"),
        (
            "PUT",
            "/h/pets/1/photo.jpg",
            "put_pets_petId_photo_jpg",
            "/pets/{petId}/photo.jpg",
        ),
        ("GET", "/h/a", "shared", "/a"),
        ("GET", "/h/b", "shared", "/b"),
        ("POST", "/h/b", "shared", "/b"),
    ] {
        let r = at(&t, h, method, path);
        assert_eq!(
            (r.operation_id, r.method, r.template),
            (op, method, template)
        );
    }
}

fn doc31(servers: &str, paths: &str) -> String {
    format!("openapi: 3.1.0\ninfo: {{title: t, version: '1'}}\nservers: {servers}\npaths:\n{paths}")
}

#[test]
fn conflicts_are_found_on_every_base_and_servable_keeps_the_rest() {
    let a = bundle_text(
        "alpha",
        &doc31(
            "[{url: 'https://a.example.com/v1'}, {url: /shared}]",
            "  /a:\n    get: {}\n",
        ),
    );
    // Its second server is alpha's second.
    let b = bundle_text(
        "beta",
        &doc31(
            "[{url: 'https://b.example.com/v1'}, {url: ./shared/}]",
            "  /b:\n    get: {}\n",
        ),
    );
    // Equally specific variable hosts that can match one request
    // (a.x.io).
    let c = bundle_text(
        "gamma",
        &doc31(
            "[{url: 'https://{t}.x.io/', variables: {t: {default: a}}}]",
            "  /c:\n    get: {}\n",
        ),
    );
    let d = bundle_text(
        "delta",
        &doc31(
            "[{url: 'https://a.{r}.io/', variables: {r: {default: x}}}]",
            "  /d:\n    get: {}\n",
        ),
    );
    // More specific than gamma and delta, and than alpha's `*/shared`:
    // no conflict.
    let e = bundle_text(
        "epsilon",
        &doc31(
            "[{url: 'https://api.x.io/'}, {url: 'https://h.io/shared'}]",
            "  /e:\n    get: {}\n",
        ),
    );
    // An operation's own server conflicting with alpha's first.
    let f = bundle_text(
        "zeta",
        &doc31(
            "[{url: /zeta}]",
            "  /z:\n    get:\n      servers: [{url: 'https://a.example.com/v1/'}]\n",
        ),
    );
    let err = RouteTable::build(&[a.clone(), b.clone()]).unwrap_err();
    assert!(matches!(err, RouteError::Conflict(_)));
    let msg = err.to_string();
    assert!(
        msg.contains("`alpha`")
            && msg.contains("`beta`")
            && msg.contains("host `*` basePath `/shared`"),
        "{msg}"
    );
    let msg = RouteTable::build(&[c.clone(), d.clone()])
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("`gamma`")
            && msg.contains("`delta`")
            && msg.contains("{t}.x.io/")
            && msg.contains("a.{r}.io/"),
        "{msg}"
    );
    assert!(RouteTable::build(&[a.clone(), e.clone(), c.clone()]).is_ok());
    let msg = RouteTable::build(&[a.clone(), f.clone()])
        .unwrap_err()
        .to_string();
    assert!(msg.contains("`alpha`") && msg.contains("`zeta`"), "{msg}");

    let named_twice = bundle_text("epsilon", &doc31("[{url: /other}]", "  /o:\n    get: {}\n"));
    let (kept, errors) = servable(vec![a, b, c, d, e, f, named_twice]);
    let kept: Vec<&str> = kept.iter().map(|b| b.name.as_str()).collect();
    assert_eq!(kept, Vec::<&str>::new(), "{errors:?}");
    let texts: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(texts.len(), 4, "{texts:#?}");
    assert!(
        texts[0].contains("two bundles are named `epsilon`"),
        "{texts:#?}"
    );

    // One conflicting pair among good bundles: only the pair is refused.
    let x = bundle_text("x", &doc31("[{url: /same}]", "  /x:\n    get: {}\n"));
    let y = bundle_text("y", &doc31("[{url: /same/}]", "  /y:\n    get: {}\n"));
    let good = bundle_text("good", &doc31("[{url: /good}]", "  /g:\n    get: {}\n"));
    let (kept, errors) = servable(vec![x, good, y]);
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].name, "good");
    assert_eq!(errors.len(), 1);
    let t = RouteTable::build(&kept).unwrap();
    assert_eq!(at(&t, "h", "GET", "/good/g").func, "good");
}

#[test]
fn a_literal_base_beats_a_variable_one_and_the_variable_takes_the_rest() {
    let lit = bundle_text("lit", &doc31("[{url: /v1}]", "  /x:\n    get: {}\n"));
    let var = bundle_text(
        "var",
        &doc31(
            "[{url: '/{version}', variables: {version: {default: v2}}}]",
            "  /x:\n    get: {}\n  /y:\n    get: {}\n",
        ),
    );
    let t = RouteTable::build(&[var, lit]).unwrap();
    assert_eq!(at(&t, "h", "GET", "/v1/x").func, "lit");
    assert_eq!(at(&t, "h", "GET", "/v9/x").func, "var");
    // Not served by the literal base: on to the variable one.
    assert_eq!(at(&t, "h", "GET", "/v1/y").func, "var");
}

mod generated {
    //! Random valid documents: every declared operation routes to itself
    //! on every server and variable value, and other hosts find nothing.

    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    #[derive(Debug, Clone)]
    enum Label {
        Lit(String),
        /// A variable without enum.
        Any,
        /// A variable with an enum.
        OneOf(Vec<String>),
    }

    #[derive(Debug, Clone)]
    struct Server {
        /// `None`: a relative URL.
        host: Option<Vec<Label>>,
        path: Vec<Label>,
    }

    #[derive(Debug, Clone)]
    struct Op {
        method: &'static str,
        id: Option<String>,
    }

    #[derive(Debug, Clone)]
    struct PathSpec {
        segments: Vec<Option<String>>,
        ops: Vec<Op>,
        servers: Option<Vec<Server>>,
    }

    fn word() -> impl Strategy<Value = String> {
        "[a-z][a-z0-9]{0,5}"
    }

    fn label() -> impl Strategy<Value = Label> {
        prop_oneof![
            3 => word().prop_map(Label::Lit),
            1 => Just(Label::Any),
            1 => proptest::collection::btree_set(word(), 1..3)
                .prop_map(|s| Label::OneOf(s.into_iter().collect())),
        ]
    }

    fn server() -> impl Strategy<Value = Server> {
        (
            proptest::option::weighted(0.8, proptest::collection::vec(label(), 1..4)),
            proptest::collection::vec(label(), 0..3),
        )
            .prop_map(|(host, path)| Server { host, path })
    }

    fn op() -> impl Strategy<Value = Op> {
        (
            proptest::sample::select(vec!["get", "put", "post", "delete", "patch"]),
            proptest::option::of("[a-zA-Z][a-zA-Z0-9_]{0,8}"),
        )
            .prop_map(|(method, id)| Op { method, id })
    }

    fn path_spec() -> impl Strategy<Value = PathSpec> {
        (
            proptest::collection::vec(proptest::option::of(word()), 0..3),
            proptest::collection::vec(op(), 1..4),
            proptest::option::weighted(0.2, proptest::collection::vec(server(), 1..3)),
        )
            .prop_map(|(segments, mut ops, servers)| {
                let mut seen = Vec::new();
                ops.retain(|o| {
                    !seen.contains(&o.method) && {
                        seen.push(o.method);
                        true
                    }
                });
                PathSpec {
                    segments,
                    ops,
                    servers,
                }
            })
    }

    /// Server URL text and its `variables`.
    fn server_json(s: &Server, n: &mut usize) -> Value {
        let mut vars = serde_json::Map::new();
        let mut text = |labels: &[Label], sep: &str| -> String {
            labels
                .iter()
                .map(|l| match l {
                    Label::Lit(w) => w.clone(),
                    Label::Any => {
                        *n += 1;
                        vars.insert(format!("v{n}"), json!({"default": "dflt"}));
                        format!("{{v{n}}}")
                    }
                    Label::OneOf(values) => {
                        *n += 1;
                        vars.insert(
                            format!("v{n}"),
                            json!({"default": values[0], "enum": values}),
                        );
                        format!("{{v{n}}}")
                    }
                })
                .collect::<Vec<_>>()
                .join(sep)
        };
        let path = text(&s.path, "/");
        let url = match &s.host {
            Some(h) => format!("https://{}.test/{path}", text(h, ".")),
            None => format!("/{path}"),
        };
        json!({"url": url, "variables": vars})
    }

    /// The template of path number `i` (a unique first segment keeps
    /// templates from overlapping).
    fn template(i: usize, p: &PathSpec) -> String {
        let mut t = format!("/p{i}");
        for (k, s) in p.segments.iter().enumerate() {
            match s {
                Some(w) => t.push_str(&format!("/{w}")),
                None => t.push_str(&format!("/{{q{k}}}")),
            }
        }
        t
    }

    fn document(servers: &[Server], paths: &[PathSpec]) -> String {
        let mut n = 0;
        let mut doc_paths = serde_json::Map::new();
        for (i, p) in paths.iter().enumerate() {
            let mut item = serde_json::Map::new();
            for o in &p.ops {
                let mut op = json!({"responses": {"200": {"description": "ok"}}});
                if let Some(id) = &o.id {
                    op["operationId"] = json!(id);
                }
                item.insert(o.method.into(), op);
            }
            if let Some(s) = &p.servers {
                item.insert(
                    "servers".into(),
                    s.iter().map(|s| server_json(s, &mut n)).collect(),
                );
            }
            doc_paths.insert(template(i, p), Value::Object(item));
        }
        let servers: Vec<Value> = servers.iter().map(|s| server_json(s, &mut n)).collect();
        json!({"openapi": "3.1.0", "info": {"title": "t", "version": "1"},
               "servers": servers, "paths": doc_paths})
        .to_string()
    }

    /// Concrete values of `labels`: every enum value (cycled through, so
    /// each one appears), the others `any` for a variable.
    fn concrete(labels: &[Label], round: usize, any: &str) -> Vec<String> {
        labels
            .iter()
            .map(|l| match l {
                Label::Lit(w) => w.clone(),
                Label::Any => any.to_owned(),
                Label::OneOf(values) => values[round % values.len()].clone(),
            })
            .collect()
    }

    /// (host, base path) requests for a server: each enum value at least once.
    fn requests(s: &Server) -> Vec<(String, String)> {
        let rounds = s
            .host
            .iter()
            .flatten()
            .chain(&s.path)
            .map(|l| match l {
                Label::OneOf(v) => v.len(),
                _ => 1,
            })
            .max()
            .unwrap_or(1);
        (0..rounds)
            .map(|r| {
                let host = match &s.host {
                    Some(h) => format!("{}.test", concrete(h, r, "zz9").join(".")),
                    None => "any.host.example".to_owned(),
                };
                let path: String = concrete(&s.path, r, "seg7")
                    .iter()
                    .map(|p| format!("/{p}"))
                    .collect();
                (host, path)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]

        #[test]
        fn every_operation_routes_to_itself(
            servers in proptest::collection::vec(server(), 1..4),
            paths in proptest::collection::vec(path_spec(), 1..6),
        ) {
            let text = document(&servers, &paths);
            let api = parse_api(Path::new("gen.json"), &text)
                .map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            let b = bundle_of_api("gen", Path::new("gen.json"), api);
            let t = RouteTable::build(&[b]).unwrap();
            for (i, p) in paths.iter().enumerate() {
                let tpl = template(i, p);
                let concrete_path: String = p
                    .segments
                    .iter()
                    .map(|s| format!("/{}", s.as_deref().unwrap_or("val")))
                    .collect::<String>();
                let rel = format!("/p{i}{concrete_path}");
                for s in p.servers.as_ref().unwrap_or(&servers) {
                    for (host, base) in requests(s) {
                        for o in &p.ops {
                            let path = format!("{base}{rel}");
                            let method = o.method.to_ascii_uppercase();
                            let r = match t.route(&host, &method, &path) {
                                RouteOutcome::Found(r) => r,
                                other => {
                                    return Err(TestCaseError::fail(format!(
                                        "{method} {host}{path}: {other:?}\n{text}"
                                    )))
                                }
                            };
                            let want = o
                                .id
                                .clone()
                                .unwrap_or_else(|| funcatron_bundle::default_handler_name(o.method, &tpl));
                            prop_assert_eq!(r.operation_id, want.as_str());
                            prop_assert_eq!(r.template, tpl.as_str());
                            prop_assert_eq!(r.method, method.as_str());
                            for m in [method.as_str(), "OPTIONS", "TRACE"] {
                                routes_alike(&t, &host, m, &path).map_err(TestCaseError::fail)?;
                                routes_alike(&t, &host.to_ascii_uppercase(), m, &path).map_err(TestCaseError::fail)?;
                                routes_alike(&t, &format!("{host}:8443"), m, &path).map_err(TestCaseError::fail)?;
                            }
                            routes_alike(&t, &host, &method, &format!("{path}/extra")).map_err(TestCaseError::fail)?;
                        }
                    }
                }
                routes_alike(&t, "nowhere.invalid", "GET", &rel).map_err(TestCaseError::fail)?;
                if servers.iter().chain(p.servers.iter().flatten()).all(|s| s.host.is_some()) {
                    let r = t.route("nowhere.invalid", "GET", &rel);
                    prop_assert_eq!(r, RouteOutcome::NotFound);
                }
            }
        }
    }
}

#[test]
fn a_named_func_routes_below_its_primary_base_among_its_own_routes_only() {
    let root = bundle_text("root", "swagger: '2.0'\npaths:\n  /{any}:\n    get: {operationId: any}\n  /api/v1/x:\n    get: {operationId: shadow}\n");
    let api = bundle_text(
        "api",
        "swagger: '2.0'\nbasePath: /api/v1\npaths:\n  /x:\n    get: {operationId: x}\n",
    );
    let t = RouteTable::build(&[root, api]).unwrap();
    // `/api/v1/x` is api's on an ordinary path; named, root's own.
    assert_eq!(found(t.route("h", "GET", "/api/v1/x")).func, "api");
    let r = found(t.route_func("root", "GET", "/api/v1/x").unwrap());
    assert_eq!((r.func, r.operation_id), ("root", "shadow"));
    let r = found(t.route_func("api", "GET", "/x").unwrap());
    assert_eq!((r.func, r.operation_id), ("api", "x"));
    assert_eq!(
        t.route_func("api", "GET", "/y").unwrap(),
        RouteOutcome::NotFound
    );
    assert!(t.route_func("nope", "GET", "/x").is_none());

    // An ingress's table from the admission entries routes alike.
    let entries: Vec<_> = t
        .func_infos()
        .iter()
        .map(|f| f.admission().clone())
        .collect();
    let again = RouteTable::from_admission(&entries).unwrap();
    for path in ["/api/v1/x", "/api/v1/y", "/hello", "/a/b"] {
        let func = |o: RouteOutcome<'_>| match o {
            RouteOutcome::Found(r) => Some(r.func.to_owned()),
            _ => None,
        };
        assert_eq!(
            func(t.route("h", "GET", path)),
            func(again.route("h", "GET", path)),
            "{path}"
        );
        for method in ["GET", "POST", "OPTIONS"] {
            routes_alike(&t, "h", method, path).unwrap();
        }
    }
}

#[test]
fn every_example_document_routes_alike_through_its_broadcast_and_flat_matchers() {
    let mut bundles = Vec::new();
    for entry in std::fs::read_dir(examples()).unwrap() {
        let file = entry.unwrap().path();
        let Some(ext) = file.extension().and_then(|e| e.to_str()) else {
            continue;
        };
        if !["yaml", "yml", "json"].contains(&ext) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        let Ok(api) = parse_api(&file, &text) else {
            continue;
        };
        let name = file
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .replace('.', "-");
        bundles.push(bundle_of_api(&name, &file, api));
    }
    let (kept, _) = servable(bundles);
    assert!(
        kept.len() >= 3,
        "{} example documents route together",
        kept.len()
    );
    let t = RouteTable::build(&kept).unwrap();
    let mut probes = 0;
    for b in &kept {
        for op in &b.operations {
            for base in op.bases_in(&b.bases) {
                let host = base
                    .host
                    .as_deref()
                    .unwrap_or("any.example")
                    .replace(['{', '}'], "");
                let path = op.path.replace('{', "x").replace('}', "");
                let full = match base.path.as_str() {
                    "/" => path.clone(),
                    bp => format!("{}{path}", bp.replace(['{', '}'], "")),
                };
                for method in [op.method.as_str(), "OPTIONS", "PATCH"] {
                    routes_alike(&t, &host, method, &full).unwrap();
                    probes += 1;
                }
            }
        }
    }
    assert!(probes > 50, "{probes} probes");
}
