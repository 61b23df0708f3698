//! The loader on the fixture documents in `swagger-examples/`: OpenAPI
//! 3.1, servers and variables, default handler names, external `$ref`s
//! (and hostile ones), errors that say where they are, and the event
//! triggers and document-store declarations a bundle makes.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use funcatron_bundle::store::StoreOp;
use funcatron_bundle::triggers::{CatchUp, StoreEvent, TriggerKind};
use funcatron_bundle::{parse_api, Base, Bundle, BundleError, SpecVersion, REFS_KEY};
use serde_json::Value;

fn examples() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../swagger-examples")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(examples().join(name)).unwrap()
}

fn shown(bases: &[Base]) -> Vec<String> {
    bases.iter().map(Base::to_string).collect()
}

/// A bundle directory holding `doc` as `file` and a Lua handler.
fn lua_bundle(file: &str, doc: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join(file), doc).unwrap();
    std::fs::write(dir.path().join("main.lua"), "return {}").unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    Bundle::load(dir).unwrap_err().to_string()
}

#[test]
fn openapi31_with_webhooks_dialect_and_ref_siblings_loads() {
    let api = parse_api(Path::new("w.yaml"), &read("openapi31-webhooks.yaml")).unwrap();
    assert_eq!(api.version, SpecVersion::OpenApi31);
    let ops: Vec<(&str, &str, &str)> = api
        .operations
        .iter()
        .map(|o| (o.method.as_str(), o.path.as_str(), o.operation_id.as_str()))
        .collect();
    // The webhook is not an operation anyone can call.
    assert_eq!(
        ops,
        [
            ("GET", "/pets", "listPets"),
            ("POST", "/pets", "addPet"),
            ("GET", "/pets/{petId}", "showPetById"),
        ]
    );
    assert_eq!(
        shown(&api.bases),
        [
            "pets.example.com/api",
            "localhost:8080/events/v1",
            "localhost:8080/events/v2"
        ]
    );
    assert_eq!(
        (api.host.as_deref(), api.base_path.as_str()),
        (Some("pets.example.com"), "/api")
    );

    // Loaded as a bundle: the path item `$ref` is replaced by its target,
    // its sibling winning; the Runner's validation compiles it.
    let dir = lua_bundle("openapi.yaml", &read("openapi31-webhooks.yaml"));
    std::fs::write(dir.path().join("funcatron.yaml"), "runtime: lua\n").unwrap();
    let b = Bundle::load(dir.path()).unwrap();
    assert_eq!(b.spec_version, Some(SpecVersion::OpenApi31));
    let item = b.doc.pointer("/paths/~1pets~1{petId}").unwrap();
    assert!(item.get("$ref").is_none(), "{item}");
    assert_eq!(
        item["summary"],
        "One pet (a sibling of the path item's $ref)"
    );
    assert_eq!(item["get"]["operationId"], "showPetById");
    funcatron_bundle::validate::compile_bundle(&b).unwrap();
}

#[test]
fn every_server_variable_and_override_becomes_a_base() {
    let api = parse_api(Path::new("s.yaml"), &read("servers.yaml")).unwrap();
    assert_eq!(
        shown(&api.bases),
        [
            "eu.api.example.com/v1",
            "eu.api.example.com/v2",
            "us.api.example.com/v1",
            "us.api.example.com/v2",
            // :443 is https's own port: any port matches.
            "{tenant}.shop.example.org/shop",
            "{tenant}.shop.example.org:8443/shop",
            "*/relative",
            "*/dot/v1",
        ]
    );
    assert_eq!(api.host.as_deref(), Some("eu.api.example.com"));
    let own = |id: &str| {
        let op = api
            .operations
            .iter()
            .find(|o| o.operation_id == id)
            .unwrap();
        op.bases.as_deref().map(shown)
    };
    assert_eq!(own("listOrders"), None);
    assert_eq!(
        own("listReports"),
        Some(vec!["reports.example.com/".to_owned()])
    );
    assert_eq!(
        own("health"),
        Some(vec!["localhost:{port}/internal".to_owned()])
    );
    assert_eq!(own("setHealth"), None);
}

#[test]
fn operations_without_operation_id_get_default_names_or_the_bundle_default() {
    let api = parse_api(Path::new("n.yaml"), &read("no-operation-ids.yaml")).unwrap();
    let ids: Vec<&str> = api
        .operations
        .iter()
        .map(|o| o.operation_id.as_str())
        .collect();
    // Sorted by path (serde_json keeps mappings sorted), methods in
    // get, put, post, delete order.
    assert_eq!(
        ids,
        [
            "get_root",
            "shared",
            "shared",
            "shared",
            "get_pets_petId",
            "delete_pets_petId",
            "put_pets_petId_photo_jpg",
        ]
    );
    assert_eq!(shown(&api.bases), ["handlers.example.com/h"]);

    let dir = lua_bundle("swagger.yaml", &read("no-operation-ids.yaml"));
    std::fs::write(
        dir.path().join("funcatron.yaml"),
        "runtime: lua\ndefault_handler: handle\n",
    )
    .unwrap();
    let b = Bundle::load(dir.path()).unwrap();
    let ids: Vec<(&str, bool)> = b
        .operations
        .iter()
        .map(|o| (o.operation_id.as_str(), o.has_operation_id))
        .collect();
    assert_eq!(ids[0], ("handle", false));
    assert_eq!(ids[1], ("shared", true));
    assert_eq!(ids[4..], [("handle", false); 3]);
    std::fs::write(
        dir.path().join("funcatron.yaml"),
        "runtime: lua\ndefault_handler: 2fast\n",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("default_handler") && err.contains("identifier"),
        "{err}"
    );
}

/// Every `$ref` in `v` as (pointer, value).
fn refs(v: &Value, at: String, out: &mut Vec<(String, String)>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                if k == "$ref" {
                    out.push((at.clone(), child.as_str().unwrap_or_default().to_owned()));
                }
                refs(
                    child,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                refs(child, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn external_refs_are_bundled_into_a_self_contained_document() {
    let b = Bundle::load(&examples().join("multi-file")).unwrap();
    let ops: Vec<&str> = b
        .operations
        .iter()
        .map(|o| o.operation_id.as_str())
        .collect();
    assert_eq!(
        ops,
        ["listPets", "addPet", "showPetById", "getTree", "putTree"]
    );
    assert_eq!(
        funcatron_bundle::refs_pointer(&b.doc),
        "/components/x-funcatron-refs"
    );
    let files: Vec<&String> = b.doc["components"][REFS_KEY]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    assert_eq!(
        files,
        [
            "common.yaml",
            "paths/pet.json",
            "paths/pets.yaml",
            "schemas/pet.yaml",
            "schemas/tree.yaml"
        ]
    );
    let mut all = Vec::new();
    refs(&b.doc, String::new(), &mut all);
    for (at, r) in &all {
        let target = r.strip_prefix('#').unwrap_or_else(|| panic!("{at}: {r}"));
        assert!(
            b.doc.pointer(target).is_some(),
            "{at}: {r} does not resolve"
        );
    }
    let get = |p: &str| b.doc.pointer(p).unwrap().as_str().unwrap().to_owned();
    // Path items inlined from their files, refs rewritten relative to them.
    assert_eq!(
        get("/paths/~1pets/get/parameters/0/$ref"),
        "#/components/x-funcatron-refs/common.yaml/parameters/limit"
    );
    assert_eq!(
        get("/paths/~1pets/get/responses/default/content/application~1json/schema/$ref"),
        "#/components/schemas/Error"
    );
    assert_eq!(
        get("/paths/~1pets~1{petId}/get/responses/200/content/application~1json/schema/$ref"),
        "#/components/x-funcatron-refs/schemas~1pet.yaml"
    );
    // A referenced file's own local refs, and a recursive schema.
    assert_eq!(
        get("/components/x-funcatron-refs/schemas~1pet.yaml/properties/tag/$ref"),
        "#/components/x-funcatron-refs/schemas~1pet.yaml/$defs/Tag"
    );
    assert_eq!(
        get("/components/x-funcatron-refs/schemas~1tree.yaml/properties/children/items/$ref"),
        "#/components/x-funcatron-refs/schemas~1tree.yaml"
    );
    // What the Runner compiles and what an upload unpacks agree with it.
    funcatron_bundle::validate::compile_bundle(&b).unwrap();
    let (_, bytes) = funcatron_bundle::archive::build(&examples().join("multi-file")).unwrap();
    let dest = tempfile::tempdir().unwrap();
    funcatron_bundle::archive::extract(&bytes, dest.path(), Default::default()).unwrap();
    let unpacked = Bundle::load(dest.path()).unwrap();
    assert_eq!(unpacked.doc, b.doc);
}

#[test]
fn hostile_refs_are_refused_naming_file_line_and_ref() {
    for (case, needles) in [
        (
            "cycle",
            &[
                "cycle/a.yaml:2:7: /$ref: ",
                "never reach a definition: b.yaml# -> a.yaml# -> b.yaml#",
            ][..],
        ),
        (
            "self-loop",
            &[
                "loop.yaml:2:7",
                "never reach a definition: loop.yaml# -> loop.yaml#",
            ][..],
        ),
        ("escape", &["openapi.yaml:14:", "leaves the bundle"][..]),
        (
            "absolute",
            &["openapi.yaml:14:", "/etc/passwd", "absolute path"][..],
        ),
        (
            "url",
            &["openapi.yaml:14:", "a URL: nothing is fetched"][..],
        ),
        (
            "missing",
            &[
                "openapi.yaml:14:",
                "no file schemas/nope.yaml in the bundle",
            ][..],
        ),
        (
            "bad-fragment",
            &["openapi.yaml:14:", "schema.yaml#/Pett", "does not resolve"][..],
        ),
    ] {
        let err = load_err(&examples().join("hostile-refs").join(case));
        for n in needles {
            assert!(err.contains(n), "{case}: {err}\nlacks: {n}");
        }
    }
}

#[test]
fn errors_in_a_referenced_file_name_that_file_and_line() {
    let doc = "openapi: 3.0.3\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\npaths:\n  /p:\n    $ref: paths/p.yaml\n";
    let dir = lua_bundle("openapi.yaml", doc);
    std::fs::create_dir(dir.path().join("paths")).unwrap();
    let item = "get:\n  operationId: p\n  parameters:\n    - $ref: '../../x.yaml'\n";
    std::fs::write(dir.path().join("paths/p.yaml"), item).unwrap();
    let err = load_err(dir.path());
    let want = format!(
        "{}:4:13: /get/parameters/0/$ref: `$ref: ../../x.yaml`: the path leaves the bundle",
        dir.path().join("paths/p.yaml").display()
    );
    assert_eq!(err, want);
    // A semantic error in the path item, likewise.
    let item = "get:\n  operationId: p\n  servers: {url: /x}\n";
    std::fs::write(dir.path().join("paths/p.yaml"), item).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.starts_with(&format!(
            "{}:3:12: /get/servers: `servers` must be a list",
            dir.path().join("paths/p.yaml").display()
        )),
        "{err}"
    );
}

#[test]
fn symbolic_links_out_of_the_bundle_are_refused_and_in_are_followed() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.yaml"), "type: string\n").unwrap();
    let doc = "openapi: 3.0.3\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\npaths:\n  /x:\n    get:\n      operationId: x\n      parameters:\n        - {name: q, in: query, schema: {$ref: 'link.yaml'}}\n      responses: {'200': {description: ok}}\n";
    let dir = lua_bundle("openapi.yaml", doc);
    std::os::unix::fs::symlink(
        outside.path().join("secret.yaml"),
        dir.path().join("link.yaml"),
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("symbolic link that leaves the bundle"),
        "{err}"
    );
    std::fs::remove_file(dir.path().join("link.yaml")).unwrap();
    std::fs::write(dir.path().join("real.yaml"), "type: string\n").unwrap();
    std::os::unix::fs::symlink(dir.path().join("real.yaml"), dir.path().join("link.yaml")).unwrap();
    let b = Bundle::load(dir.path()).unwrap();
    assert_eq!(
        b.doc
            .pointer("/paths/~1x/get/parameters/0/schema/$ref")
            .unwrap(),
        "#/components/x-funcatron-refs/real.yaml"
    );
    // Dot files are not part of a bundle (an archive leaves them out).
    std::fs::write(dir.path().join(".hidden.yaml"), "type: string\n").unwrap();
    std::fs::write(
        dir.path().join("openapi.yaml"),
        doc.replace("link.yaml", ".hidden.yaml"),
    )
    .unwrap();
    assert!(load_err(dir.path()).contains("dot files"));
}

#[test]
fn the_work_refs_cause_is_bounded() {
    let head = "openapi: 3.0.3\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\npaths:\n  /x:\n    get:\n      operationId: x\n      responses: {'200': {description: ok}}\ncomponents:\n  schemas:\n";
    // Files referring to files, 40 deep.
    let dir = lua_bundle(
        "openapi.yaml",
        &format!("{head}    A: {{$ref: 'f0.yaml'}}\n"),
    );
    for i in 0..40 {
        std::fs::write(
            dir.path().join(format!("f{i}.yaml")),
            format!(
                "type: object\nproperties:\n  next: {{$ref: 'f{}.yaml'}}\n",
                i + 1
            ),
        )
        .unwrap();
    }
    std::fs::write(dir.path().join("f40.yaml"), "type: string\n").unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("more than 32 deep"), "{err}");
    // Too many files.
    let mut doc = head.to_owned();
    let dir = lua_bundle("openapi.yaml", "");
    for i in 0..300 {
        doc.push_str(&format!("    S{i}: {{$ref: 's{i}.yaml'}}\n"));
        std::fs::write(dir.path().join(format!("s{i}.yaml")), "type: string\n").unwrap();
    }
    std::fs::write(dir.path().join("openapi.yaml"), doc).unwrap();
    let err = load_err(dir.path());
    assert!(err.contains("more than 256 files"), "{err}");
    // Too many bytes.
    let dir = lua_bundle(
        "openapi.yaml",
        &format!("{head}    Big: {{$ref: 'big.yaml'}}\n"),
    );
    let big = format!("description: \"{}\"\n", "x".repeat(17 * 1024 * 1024));
    std::fs::write(dir.path().join("big.yaml"), big).unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("big.yaml") && err.contains("bytes together"),
        "{err}"
    );
    // The reserved key is the loader's.
    let dir = lua_bundle(
        "openapi.yaml",
        &format!("{head}    S: {{type: string}}\n  x-funcatron-refs: {{}}\n"),
    );
    assert!(load_err(dir.path()).contains("reserved"));
}

#[test]
fn parse_errors_name_file_line_and_column() {
    let at = |f: &str| {
        let path = examples().join("parse-errors").join(f);
        let text = std::fs::read_to_string(&path).unwrap();
        parse_api(&path, &text).unwrap_err().to_string()
    };
    let err = at("bad-indent.yaml");
    assert!(
        err.contains("bad-indent.yaml:7:6: not valid YAML or JSON: "),
        "{err}"
    );
    let err = at("missing-comma.json");
    assert!(
        err.contains("missing-comma.json:5:5: not valid YAML or JSON: did not find expected ','"),
        "{err}"
    );
    let err = at("field-type.yaml");
    assert!(
        err.contains(
            "field-type.yaml:8:9: /paths/~1pets/get/responses: `responses` must be a mapping"
        ),
        "{err}"
    );
    // A manifest field of the wrong type: the line, column and field.
    let dir = lua_bundle("swagger.yaml", &read("parse-errors/manifest-type.yaml"));
    let err = load_err(dir.path());
    assert!(
        err.contains("swagger.yaml:5:13: x-funcatron.validate: invalid type: integer `0`, expected a boolean"),
        "{err}"
    );
    // And in funcatron.yaml.
    std::fs::write(
        dir.path().join("funcatron.yaml"),
        "runtime: lua\ntimeout_ms: soon\n",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("funcatron.yaml:2:13: timeout_ms: invalid type"),
        "{err}"
    );
}

#[test]
fn reserved_paths_are_refused_on_every_base() {
    let doc = "openapi: 3.1.0\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\nservers:\n  - url: /ok\n  - url: /_funcatron\npaths:\n  /x:\n    get: {operationId: x}\n";
    let dir = lua_bundle("openapi.yaml", doc);
    let err = load_err(dir.path());
    assert!(
        err.contains("reserved") && err.contains("/_funcatron/x"),
        "{err}"
    );
    let doc = "openapi: 3.1.0\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\npaths:\n  /x:\n    get:\n      operationId: x\n      servers: [{url: 'https://h.io/_funcatron/'}]\n";
    let dir = lua_bundle("openapi.yaml", doc);
    assert!(load_err(dir.path()).contains("reserved"));
}

#[test]
fn a_document_without_operations_is_not_a_func() {
    let doc = "openapi: 3.1.0\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\nwebhooks:\n  ping:\n    post: {operationId: ping}\n";
    let dir = lua_bundle("openapi.yaml", doc);
    let err = load_err(dir.path());
    assert!(
        err.contains("no operations") && err.contains("webhooks"),
        "{err}"
    );
}

#[test]
fn malformed_pipelines_are_refused_naming_the_operation_and_step() {
    let flow = |f: &str| {
        format!("swagger: '2.0'\ninfo: {{title: t, version: '1'}}\nx-funcatron: {{name: p, runtime: lua}}\npaths:\n  /x:\n    post:\n      operationId: x\n      x-funcatron-flow: {f}\n")
    };
    for (f, needle) in [
        ("{steps: []}", "at least one step"),
        (
            "{steps: [{apply: {func: 'a b'}}]}",
            "steps[0]: apply: \"a b\" is not a Func name",
        ),
        (
            "{steps: [{modify: ok}], on_failure: {apply: {func: a, mode: async}}}",
            "on_failure: mode async is for apply steps in steps",
        ),
        (
            "{steps: [{parallel: [{func: a, mode: async}]}]}",
            "steps[0]: mode async is for apply steps in steps",
        ),
        (
            "{steps: [{apply: {func: a, mode: later}}]}",
            "steps[0]: apply: mode \"later\" is not sync or async",
        ),
        ("{steps: [{callback: {url: 'ftp://x'}}]}", "is not http(s)"),
        ("{steps: [{teleport: x}]}", "unknown variant"),
        (
            "{steps: [{modify: ok}], finally: {parallel: []}}",
            "finally: parallel",
        ),
        (
            "{steps: [{modify: ok}], cleanup: {modify: x}}",
            "unknown field",
        ),
    ] {
        let dir = lua_bundle("swagger.yaml", &flow(f));
        let err = load_err(dir.path());
        assert!(
            err.contains(needle) && err.contains("x-funcatron-flow"),
            "{f}: {err}"
        );
    }
    let dir = lua_bundle(
        "swagger.yaml",
        &flow("{steps: [{modify: 'return data'}, {parallel: {a: {func: x}, b: {func: y}}}]}"),
    );
    let b = Bundle::load(dir.path()).unwrap();
    let spec = funcatron_bundle::openapi::flow_of(&b.doc, "POST", "/x")
        .unwrap()
        .unwrap();
    assert_eq!(spec.steps.len(), 2);
}

/// A Swagger 2.0 bundle whose manifest is `x-funcatron: {name: t, runtime:
/// lua, <manifest>}` and whose `paths` are `paths` (YAML, indented by 2).
fn triggered_bundle(manifest: &str, paths: &str) -> tempfile::TempDir {
    lua_bundle(
        "swagger.yaml",
        &format!(
            "swagger: '2.0'\ninfo: {{title: t, version: '1'}}\nbasePath: /t\nx-funcatron: {{name: t, runtime: lua{manifest}}}\npaths:\n{paths}"
        ),
    )
}

/// `paths` with one `method` operation on `path` whose triggers are `list`.
fn one_operation(method: &str, path: &str, list: &str) -> String {
    format!(
        "  {path}:\n    {method}:\n      operationId: tick\n      x-funcatron-triggers: {list}\n"
    )
}

#[test]
fn triggers_are_read_into_their_operations() {
    let paths = format!(
        "{}{}  /plain:\n    post: {{operationId: plain}}\n",
        one_operation(
            "post",
            "/tick",
            "[{name: nightly, schedule: {cron: '0 30 3 * * *', timezone: Europe/Paris, catch_up: all}}, {store: {collection: orders, events: [created]}}]"
        ),
        "  /in:\n    post:\n      operationId: TakeOrders\n      x-funcatron-triggers: [{queue: {queue: orders, batch: 10, concurrency: 2}}]\n",
    );
    let dir = triggered_bundle(", collections: {orders: {}}", &paths);
    let b = Bundle::load(dir.path()).unwrap();
    let of = |path: &str| {
        &b.operations
            .iter()
            .find(|o| o.path == path)
            .unwrap()
            .triggers
    };
    let tick = of("/tick");
    assert_eq!(
        tick.iter().map(|t| t.name.as_str()).collect::<Vec<_>>(),
        ["nightly", "tick-1"],
        "an unnamed trigger of several is named after its operation and place"
    );
    match &tick[0].kind {
        TriggerKind::Schedule(s) => {
            assert_eq!(s.cron, "0 30 3 * * *");
            assert_eq!(s.timezone, "Europe/Paris");
            assert_eq!(s.catch_up, CatchUp::All);
        }
        other => panic!("{other:?}"),
    }
    match &tick[1].kind {
        TriggerKind::Store(s) => {
            assert_eq!(s.collection, "orders");
            assert_eq!(s.events, [StoreEvent::Created]);
        }
        other => panic!("{other:?}"),
    }
    let take = of("/in");
    assert_eq!(take.len(), 1);
    assert_eq!(
        take[0].name, "takeorders",
        "a lone trigger is its operation"
    );
    match &take[0].kind {
        TriggerKind::Queue(q) => {
            assert_eq!(q.queue.as_deref(), Some("orders"));
            assert_eq!((q.batch, q.concurrency), (10, 2));
        }
        other => panic!("{other:?}"),
    }
    assert!(of("/plain").is_empty());
    assert!(b.collections.contains_key("orders"));
}

#[test]
fn bad_triggers_are_refused_naming_their_place() {
    let ext = "x-funcatron-triggers";
    let cases = [
        (
            one_operation("post", "/tick", "[{schedule: {cron: '61 * * * *'}}]"),
            format!("/paths/~1tick/post/{ext}/0/schedule"),
            "cron",
        ),
        (
            one_operation(
                "post",
                "/tick",
                "[{name: a, schedule: {cron: '* * * * *'}}, {name: b, schedule: {cron: '* * * * *', timezone: Mars/Olympus}}]",
            ),
            format!("/paths/~1tick/post/{ext}/1/schedule"),
            "unknown time zone \"Mars/Olympus\"",
        ),
        (
            one_operation("get", "/tick", "[{schedule: {cron: '* * * * *'}}]"),
            format!("/paths/~1tick/get/{ext}"),
            "with POST; this one is GET",
        ),
        (
            format!(
                "  /tick/{{id}}:\n    post:\n      operationId: tick\n      parameters: [{{name: id, in: path, required: true, type: string}}]\n      {ext}: [{{schedule: {{cron: '* * * * *'}}}}]\n"
            ),
            format!("/paths/~1tick~1{{id}}/post/{ext}"),
            "has no parameters",
        ),
        (
            one_operation(
                "post",
                "/tick",
                "[{name: same, schedule: {cron: '* * * * *'}}, {name: same, store: {collection: orders}}]",
            ),
            "/paths/~1tick".to_owned(),
            "two triggers are named \"same\"",
        ),
        (
            format!(
                "{}  /tock:\n    post:\n      operationId: tock\n      {ext}: [{{name: same, schedule: {{cron: '* * * * *'}}}}]\n",
                one_operation("post", "/tick", "[{name: same, schedule: {cron: '* * * * *'}}]")
            ),
            "/paths/~1tock".to_owned(),
            "names are unique in a bundle",
        ),
        (
            one_operation("post", "/tick", "[{name: Bad, schedule: {cron: '* * * * *'}}]"),
            format!("/paths/~1tick/post/{ext}/0/name"),
            "trigger name",
        ),
        (
            one_operation("post", "/tick", "[{store: {collection: orders, events: []}}]"),
            format!("/paths/~1tick/post/{ext}/0/store/events"),
            "at least one of",
        ),
        (
            one_operation("post", "/tick", "{schedule: {cron: '* * * * *'}}"),
            format!("/paths/~1tick/post/{ext}"),
            "a list of triggers",
        ),
    ];
    for (paths, pointer, why) in cases {
        let dir = triggered_bundle("", &paths);
        let err = Bundle::load(dir.path()).unwrap_err();
        assert!(
            matches!(err, BundleError::Located { .. }),
            "{paths}: located: {err:?}"
        );
        let err = err.to_string();
        assert!(
            err.contains("swagger.yaml:") && err.contains(&format!(": {pointer}: ")),
            "{paths}: {pointer} in {err}"
        );
        assert!(err.contains(why), "{paths}: {why:?} in {err}");
    }
}

#[test]
fn store_and_collections_mistakes_in_the_manifest_are_refused_naming_the_field() {
    let paths = "  /x:\n    post: {operationId: x}\n";
    for (manifest, needle) in [
        (
            ", store: {Bad: [read]}",
            "field `store`: collection name \"Bad\"",
        ),
        (
            ", store: {orders: []}",
            "field `store.orders`: list at least one of read, write",
        ),
        (", store: {orders: [delete]}", "unknown variant `delete`"),
        (", collections: {x: 3}", "field `collections.x`: a mapping"),
        (
            ", collections: {x: {schema: {type: 3}}}",
            "field `collections.x.schema`: not a JSON Schema",
        ),
        (
            ", collections: {x: {read: everyone}}",
            "field `collections.x.read`: one of public, token, operator",
        ),
        (
            ", collections: {x: {write: 7}}",
            "field `collections.x.write`",
        ),
        (
            ", collections: {x: {rules: {}}}",
            "field `collections.x`: unknown field `rules`",
        ),
        (
            ", collections: {'-x': {}}",
            "field `collections`: collection name",
        ),
    ] {
        let dir = triggered_bundle(manifest, paths);
        let err = Bundle::load(dir.path()).unwrap_err();
        let shown = err.to_string();
        assert!(
            shown.contains("swagger.yaml") && shown.contains(needle),
            "{manifest}: {needle:?} in {shown}"
        );
    }
    // In funcatron.yaml the same checks name that file.
    let dir = triggered_bundle("", paths);
    std::fs::write(
        dir.path().join("funcatron.yaml"),
        "runtime: lua\ncollections:\n  x: {schema: {type: 3}}\n",
    )
    .unwrap();
    let err = load_err(dir.path());
    assert!(
        err.contains("funcatron.yaml") && err.contains("collections.x.schema"),
        "{err}"
    );
    // And good declarations are kept.
    let dir = triggered_bundle(
        ", store: {orders: [read], invoices: [read, write]}, collections: {invoices: {schema: {type: object, required: [total]}, read: token, write: operator}}",
        paths,
    );
    let b = Bundle::load(dir.path()).unwrap();
    assert_eq!(b.store_access["invoices"], [StoreOp::Read, StoreOp::Write]);
    assert_eq!(b.collections["invoices"]["read"], "token");
}

#[test]
fn the_triggered_example_bundles_load_with_their_triggers() {
    let bundles = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../func-bundles");
    let clock = Bundle::load(&bundles.join("clock")).unwrap();
    assert_eq!(clock.name, "clock");
    let tick = clock
        .operations
        .iter()
        .find(|o| o.method == "POST" && o.path == "/tick")
        .unwrap();
    assert_eq!(tick.triggers.len(), 1);
    assert_eq!(tick.triggers[0].name, "every-minute");
    match &tick.triggers[0].kind {
        TriggerKind::Schedule(s) => {
            assert_eq!(
                (s.cron.as_str(), s.timezone.as_str(), s.catch_up),
                ("0 * * * * *", "UTC", CatchUp::Latest)
            );
            // Every minute on the minute: 2026-01-01T00:00:00Z, then +60 s.
            let start = 1_767_225_600_000;
            assert_eq!(s.next_after(start), Some(start + 60_000));
        }
        other => panic!("{other:?}"),
    }
    funcatron_bundle::validate::compile_bundle(&clock).unwrap();

    let audit = Bundle::load(&bundles.join("order-audit")).unwrap();
    assert_eq!(audit.name, "order-audit");
    assert!(audit.collections.contains_key("orders"));
    let event = audit
        .operations
        .iter()
        .find(|o| o.method == "POST" && o.path == "/event")
        .unwrap();
    assert_eq!(event.triggers.len(), 1);
    assert_eq!(event.triggers[0].name, "orders-changed");
    match &event.triggers[0].kind {
        TriggerKind::Store(s) => {
            assert_eq!(s.collection, "orders");
            assert_eq!(
                s.events,
                [
                    StoreEvent::Created,
                    StoreEvent::Updated,
                    StoreEvent::Deleted
                ]
            );
        }
        other => panic!("{other:?}"),
    }
    funcatron_bundle::validate::compile_bundle(&audit).unwrap();

    let worker = Bundle::load(&bundles.join("queue-worker")).unwrap();
    let jobs = worker
        .operations
        .iter()
        .find(|o| o.path == "/jobs")
        .unwrap();
    match &jobs.triggers[0].kind {
        TriggerKind::Queue(q) => assert_eq!(
            (
                q.queue.as_deref(),
                q.batch,
                q.batch_window_ms,
                q.concurrency
            ),
            (Some("jobs"), 10, 100, 2)
        ),
        other => panic!("{other:?}"),
    }
    funcatron_bundle::validate::compile_bundle(&worker).unwrap();

    let words = Bundle::load(&bundles.join("word-count")).unwrap();
    assert_eq!(
        words.store_access["article-stats"],
        [StoreOp::Read, StoreOp::Write]
    );
    assert_eq!(words.store_access["articles"], [StoreOp::Read]);
    let on = words
        .operations
        .iter()
        .find(|o| o.path == "/on-article")
        .unwrap();
    match &on.triggers[0].kind {
        TriggerKind::Store(s) => {
            assert_eq!(
                (s.collection.as_str(), s.events.as_slice()),
                ("articles", [StoreEvent::Created].as_slice())
            )
        }
        other => panic!("{other:?}"),
    }
    funcatron_bundle::validate::compile_bundle(&words).unwrap();
}
