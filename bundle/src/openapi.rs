//! The API document: Swagger 2.0, OpenAPI 3.0.x and 3.1.x, read into what
//! the platform routes on.
//!
//! Bundle loading: read the document -> environment rewrites -> external
//! `$ref`s bundled ([`crate::refs`]) -> **this module** -> [`ApiDoc`]: the
//! bases ([`crate::servers`]) and the operations. The Tron builds its
//! route table from them; the Runner calls handlers by
//! [`Operation::operation_id`]. The document is walked as a
//! `serde_json::Value`, so 3.0 and 3.1 are read by one code path; only the
//! fields routing uses are checked (their types, with the JSON pointer and
//! line of the one at fault), the rest is left to request validation.
//!
//! OpenAPI 3.1's `webhooks` are requests the API sends, not ones it
//! serves: they are accepted and not routed; a 3.1 document may have no
//! `paths` at all. Path items that are `$ref`s are followed (3.1 siblings
//! such as `summary` win over the referenced item) and, in the loaded
//! bundle, replaced by what they refer to.

use serde_json::{Map, Value};

use crate::locate::{escape_token, Problem, Sources};
use crate::servers::{self, Base, MAX_BASES};
use crate::{BundleError, METHODS};

/// Which specification a document follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecVersion {
    /// `swagger: "2.0"`; schemas are JSON Schema draft 4 (a subset).
    Swagger2,
    /// `openapi: 3.0.x`; schemas are JSON Schema draft 4-ish plus `nullable`.
    OpenApi30,
    /// `openapi: 3.1.x`; schemas are JSON Schema 2020-12 (or the
    /// document's `jsonSchemaDialect`).
    OpenApi31,
}

/// One operation: what the Tron routes to and the Runner invokes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Operation {
    /// Upper-case HTTP method.
    pub method: String,
    /// Path template relative to the base path, exactly the document's
    /// `paths` key, e.g. `/pets/{petId}`. With [`Operation::method`] it is
    /// the operation's key (the Tron's `x-funcatron-route` header).
    pub path: String,
    /// The handler: the `operationId`, or for an operation without one
    /// the bundle's `default_handler`, else [`default_handler_name`].
    /// Several operations may share one.
    pub operation_id: String,
    /// The document names this operation's `operationId` (false: a
    /// default handler name is used).
    pub has_operation_id: bool,
    /// Where this operation is served when its path item or itself
    /// declares `servers` (OpenAPI 3); `None`: the document's bases.
    pub bases: Option<Vec<Base>>,
    /// `x-funcatron-direct: true` on the operation: its requests go in
    /// direct mode (only the head is queued; the body streams to the
    /// Runner over HTTP and the answer streams back, see
    /// `docs/runtimes.md#direct-mode-and-streaming`).
    pub direct: bool,
    /// What besides HTTP requests invokes it (`x-funcatron-triggers`,
    /// [`crate::triggers`]).
    pub triggers: Vec<crate::triggers::Trigger>,
}

/// The operation extension that marks a route direct ([`Operation::direct`]).
pub const DIRECT_EXTENSION: &str = "x-funcatron-direct";

/// The operation extension that makes an operation a pipeline
/// (`funcatron_envelope::flow::FlowSpec`, `docs/flows.md`).
pub const FLOW_EXTENSION: &str = "x-funcatron-flow";

/// The pipeline an operation of `doc` declares, checked: `None` when it
/// declares none.
pub fn flow_of(
    doc: &Value,
    method: &str,
    template: &str,
) -> Option<Result<funcatron_envelope::flow::FlowSpec, String>> {
    let v = doc
        .get("paths")?
        .get(template)?
        .get(method.to_ascii_lowercase())?
        .get(FLOW_EXTENSION)?;
    Some(
        serde_json::from_value::<funcatron_envelope::flow::FlowSpec>(v.clone())
            .map_err(|e| e.to_string())
            .and_then(|f| f.check().map(|()| f)),
    )
}

impl Operation {
    /// This operation's bases: its own, else the document's.
    pub fn bases_in<'a>(&'a self, document: &'a [Base]) -> &'a [Base] {
        self.bases.as_deref().unwrap_or(document)
    }
}

/// The parts of a document the platform uses.
#[derive(Debug, Clone, PartialEq)]
pub struct ApiDoc {
    /// Which specification it follows.
    pub version: SpecVersion,
    /// The primary host (the first server, variables at their defaults);
    /// `None` for any host.
    pub host: Option<String>,
    /// The primary base path, normalised.
    pub base_path: String,
    /// Every base of the document (each server, each enum value), the
    /// primary's first.
    pub bases: Vec<Base>,
    /// Operations sorted by path template, each path's methods in
    /// [`crate::METHODS`] order (the document's mappings are read sorted).
    pub operations: Vec<Operation>,
}

/// The handler name of an operation without an `operationId`: the
/// lower-case method, `_`, then the template's words (runs of ASCII
/// letters and digits; parameter names count, braces and every other
/// character separate) joined by `_`, or `root` for `/`.
/// `GET /pets/{petId}` -> `get_pets_petId`, `DELETE /` -> `delete_root`,
/// `POST /v1/pet-store/{id}.json` -> `post_v1_pet_store_id_json`. The
/// result is an identifier in Lua, Python, JavaScript and Java and never
/// one of their keywords (it always holds a `_`).
pub fn default_handler_name(method: &str, template: &str) -> String {
    let mut words = String::new();
    let mut gap = false;
    for c in template.chars() {
        if c.is_ascii_alphanumeric() {
            if gap && !words.is_empty() {
                words.push('_');
            }
            gap = false;
            words.push(c);
        } else {
            gap = true;
        }
    }
    if words.is_empty() {
        words.push_str("root");
    }
    format!("{}_{words}", method.to_ascii_lowercase())
}

/// Is `name` an identifier (`[A-Za-z_][A-Za-z0-9_]*`)?
pub(crate) fn is_identifier(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parse a Swagger 2.0 or OpenAPI 3.0/3.1 document (YAML or JSON text)
/// on its own: `$ref`s to other files are not followed (a path item that
/// is one is an error); [`crate::Bundle::load`] follows them.
pub fn parse_api(path: &std::path::Path, text: &str) -> Result<ApiDoc, BundleError> {
    let doc = crate::parse_doc(path, text)?;
    let sources = Sources::single(path, text);
    crate::refs::check_cycles(&doc, "").map_err(|p| sources.error(p))?;
    api_from_value(&doc, &sources)
}

/// The [`ApiDoc`] of a parsed (and bundled) document.
pub(crate) fn api_from_value(doc: &Value, sources: &Sources) -> Result<ApiDoc, BundleError> {
    walk(doc).map_err(|p| sources.error(p))
}

fn version(doc: &Value) -> Result<SpecVersion, Problem> {
    if let Some(v) = doc.get("openapi") {
        let s = v.as_str().ok_or_else(|| {
            Problem::new("/openapi", "must be a string such as \"3.1.0\" (quote it)")
        })?;
        return if s == "3.0" || s.starts_with("3.0.") {
            Ok(SpecVersion::OpenApi30)
        } else if s == "3.1" || s.starts_with("3.1.") {
            Ok(SpecVersion::OpenApi31)
        } else {
            Err(Problem::new(
                "/openapi",
                format!("version {s:?} is not supported (3.0.x and 3.1.x are, and Swagger 2.0)"),
            ))
        };
    }
    match doc.get("swagger") {
        Some(Value::String(s)) if s == "2.0" => Ok(SpecVersion::Swagger2),
        Some(Value::Number(n)) if n.as_f64() == Some(2.0) => Err(Problem::new(
            "/swagger",
            "must be the string \"2.0\" (quote it in YAML)",
        )),
        Some(v) => Err(Problem::new(
            "/swagger",
            format!("version {v} is not supported (2.0 is, and OpenAPI 3.0.x and 3.1.x)"),
        )),
        None => Err(Problem::new(
            "",
            "neither `swagger: \"2.0\"` nor `openapi: 3.0.x` or `3.1.x` is set",
        )),
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Mapping,
    List,
    Text,
    Flag,
}

impl Kind {
    fn fits(self, v: &Value) -> bool {
        match self {
            Kind::Mapping => v.is_object(),
            Kind::List => v.is_array(),
            Kind::Text => v.is_string(),
            Kind::Flag => v.is_boolean(),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Mapping => "a mapping",
            Kind::List => "a list",
            Kind::Text => "a string",
            Kind::Flag => "true or false",
        }
    }
}

const TOP_FIELDS: &[(&str, Kind)] = &[
    ("info", Kind::Mapping),
    ("paths", Kind::Mapping),
    ("components", Kind::Mapping),
    ("webhooks", Kind::Mapping),
    ("externalDocs", Kind::Mapping),
    ("definitions", Kind::Mapping),
    ("parameters", Kind::Mapping),
    ("responses", Kind::Mapping),
    ("securityDefinitions", Kind::Mapping),
    ("servers", Kind::List),
    ("tags", Kind::List),
    ("security", Kind::List),
    ("consumes", Kind::List),
    ("produces", Kind::List),
    ("jsonSchemaDialect", Kind::Text),
];

const ITEM_FIELDS: &[(&str, Kind)] = &[
    ("summary", Kind::Text),
    ("description", Kind::Text),
    ("servers", Kind::List),
    ("parameters", Kind::List),
];

const OPERATION_FIELDS: &[(&str, Kind)] = &[
    ("operationId", Kind::Text),
    ("servers", Kind::List),
    ("parameters", Kind::List),
    ("responses", Kind::Mapping),
    ("requestBody", Kind::Mapping),
    ("callbacks", Kind::Mapping),
    ("tags", Kind::List),
    ("security", Kind::List),
    ("deprecated", Kind::Flag),
];

/// Known fields of `obj` (at `at`) have their types; `null` counts as absent.
fn check_fields(
    obj: &Map<String, Value>,
    at: &str,
    fields: &[(&str, Kind)],
) -> Result<(), Problem> {
    for (key, kind) in fields {
        match obj.get(*key) {
            None | Some(Value::Null) => {}
            Some(v) if kind.fits(v) => {}
            Some(_) => {
                return Err(Problem::new(
                    format!("{at}/{key}"),
                    format!("`{key}` must be {}", kind.name()),
                ))
            }
        }
    }
    if let Some(Value::Array(params)) = obj.get("parameters") {
        if let Some(i) = params.iter().position(|p| !p.is_object()) {
            return Err(Problem::new(
                format!("{at}/parameters/{i}"),
                "a parameter must be a mapping",
            ));
        }
    }
    Ok(())
}

fn present<'d>(obj: &'d Map<String, Value>, key: &str) -> Option<&'d Value> {
    obj.get(key).filter(|v| !v.is_null())
}

/// A path template compiles: every `{` has its `}` around a name.
pub(crate) fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let close = rest[open..]
            .find('}')
            .ok_or("unclosed `{` in the path template")?
            + open;
        let name = &rest[open + 1..close];
        if name.is_empty() || name.contains('{') {
            return Err(format!("bad parameter name {name:?} in the path template"));
        }
        rest = &rest[close + 1..];
    }
    Ok(())
}

fn walk(doc: &Value) -> Result<ApiDoc, Problem> {
    let top = doc
        .as_object()
        .ok_or_else(|| Problem::new("", "the document is not a mapping"))?;
    let version = version(doc)?;
    check_fields(top, "", TOP_FIELDS)?;
    let (bases, primary) = match version {
        SpecVersion::Swagger2 => {
            let b = servers::swagger2(doc)?;
            (vec![b.clone()], b)
        }
        _ => match present(top, "servers") {
            Some(list) => servers::servers(list, "/servers")?,
            None => None,
        }
        .unwrap_or_else(|| (vec![Base::root()], Base::root())),
    };
    let operations = match present(top, "paths") {
        Some(paths) => operations(doc, paths, version)?,
        None if version == SpecVersion::OpenApi31 => {
            if present(top, "webhooks").is_none() && present(top, "components").is_none() {
                return Err(Problem::new(
                    "",
                    "an OpenAPI 3.1 document needs `paths`, `webhooks` or `components`",
                ));
            }
            Vec::new()
        }
        None => return Err(Problem::new("", "`paths` is missing")),
    };
    let mut all = bases.clone();
    for b in operations.iter().filter_map(|o| o.bases.as_ref()).flatten() {
        if !all.contains(b) {
            all.push(b.clone());
            if all.len() > MAX_BASES {
                return Err(Problem::new(
                    "",
                    format!("more than {MAX_BASES} bases (servers times enum values)"),
                ));
            }
        }
    }
    Ok(ApiDoc {
        version,
        host: primary.host,
        base_path: primary.path,
        bases,
        operations,
    })
}

/// A path item seen through its `$ref`s: each layer's fields, the first
/// layer's winning, with the JSON pointer each came from.
struct Item<'d> {
    layers: Vec<(&'d Map<String, Value>, String)>,
}

/// Follow a `#...` reference within `doc`.
pub(crate) fn resolve_local<'d>(doc: &'d Value, reference: &str) -> Option<&'d Value> {
    let fragment = reference.strip_prefix('#')?;
    doc.pointer(fragment).or_else(|| {
        let decoded = crate::refs::percent_decode(fragment)?;
        doc.pointer(&decoded)
    })
}

impl<'d> Item<'d> {
    fn resolve(doc: &'d Value, item: &'d Value, at: &str) -> Result<Item<'d>, Problem> {
        let mut layers = Vec::new();
        let (mut v, mut at) = (item, at.to_owned());
        loop {
            let obj = v
                .as_object()
                .ok_or_else(|| Problem::new(&at, "a path item must be a mapping"))?;
            layers.push((obj, at.clone()));
            let Some(r) = present(obj, "$ref") else {
                return Ok(Item { layers });
            };
            let ref_at = format!("{at}/$ref");
            let r = r
                .as_str()
                .ok_or_else(|| Problem::new(&ref_at, "`$ref` must be a string"))?;
            if !r.starts_with('#') {
                return Err(Problem::new(
                    &ref_at,
                    format!("`$ref: {r}` is another file: it is followed when the bundle is loaded, not in a document read alone"),
                ));
            }
            if layers.len() > 16 {
                return Err(Problem::new(&ref_at, "path item `$ref`s refer on and on"));
            }
            v = resolve_local(doc, r)
                .ok_or_else(|| Problem::new(&ref_at, format!("`$ref: {r}` does not resolve")))?;
            at = r.trim_start_matches('#').to_owned();
        }
    }

    fn get(&self, key: &str) -> Option<(&'d Value, String)> {
        self.layers
            .iter()
            .find_map(|(m, at)| present(m, key).map(|v| (v, format!("{at}/{}", escape_token(key)))))
    }

    /// The fields of every layer merged (no `$ref`).
    fn merged(&self) -> Map<String, Value> {
        let mut out = Map::new();
        for (m, _) in self.layers.iter().rev() {
            for (k, v) in m.iter() {
                if k != "$ref" {
                    out.insert(k.clone(), v.clone());
                }
            }
        }
        out
    }
}

/// The `servers` at `v` (a path item's or an operation's): `None` when
/// absent or empty (the enclosing ones apply).
fn own_servers(v: Option<(&Value, String)>) -> Result<Option<Vec<Base>>, Problem> {
    match v {
        None => Ok(None),
        Some((list, at)) => Ok(servers::servers(list, &at)?.map(|(b, _)| b)),
    }
}

fn operations(doc: &Value, paths: &Value, version: SpecVersion) -> Result<Vec<Operation>, Problem> {
    let paths = paths
        .as_object()
        .ok_or_else(|| Problem::new("/paths", "`paths` must be a mapping"))?;
    let v3 = version != SpecVersion::Swagger2;
    let mut out = Vec::new();
    for (template, item) in paths {
        if template.starts_with("x-") {
            continue;
        }
        let at = format!("/paths/{}", escape_token(template));
        if !template.starts_with('/') {
            return Err(Problem::new(&at, "a path must start with `/`"));
        }
        check_template(template).map_err(|m| Problem::new(&at, m))?;
        let item = Item::resolve(doc, item, &at)?;
        for (layer, layer_at) in &item.layers {
            check_fields(layer, layer_at, ITEM_FIELDS)?;
        }
        let item_servers = if v3 {
            own_servers(item.get("servers"))?
        } else {
            None
        };
        for m in METHODS {
            let Some((op, op_at)) = item.get(m) else {
                continue;
            };
            let obj = op
                .as_object()
                .ok_or_else(|| Problem::new(&op_at, "an operation must be a mapping"))?;
            check_fields(obj, &op_at, OPERATION_FIELDS)?;
            let id = present(obj, "operationId")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty());
            let op_servers = if v3 {
                own_servers(present(obj, "servers").map(|s| (s, format!("{op_at}/servers"))))?
            } else {
                None
            };
            let direct = match present(obj, DIRECT_EXTENSION) {
                None => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(Problem::new(
                        format!("{op_at}/{DIRECT_EXTENSION}"),
                        "must be true or false",
                    ))
                }
            };
            if let Some(v) = present(obj, FLOW_EXTENSION) {
                let at = format!("{op_at}/{FLOW_EXTENSION}");
                let spec = serde_json::from_value::<funcatron_envelope::flow::FlowSpec>(v.clone())
                    .map_err(|e| Problem::new(&at, e.to_string()))?;
                spec.check().map_err(|e| Problem::new(&at, e))?;
            }
            let operation_id = id
                .map(str::to_owned)
                .unwrap_or_else(|| default_handler_name(m, template));
            let triggers = match present(obj, crate::triggers::TRIGGERS_EXTENSION) {
                None => Vec::new(),
                Some(v) => crate::triggers::parse(v, m, template, &operation_id).map_err(
                    |(below, why)| {
                        let ext = crate::triggers::TRIGGERS_EXTENSION;
                        Problem::new(format!("{op_at}/{ext}{below}"), why)
                    },
                )?,
            };
            out.push(Operation {
                method: m.to_ascii_uppercase(),
                path: template.clone(),
                operation_id,
                has_operation_id: id.is_some(),
                bases: op_servers.or_else(|| item_servers.clone()),
                direct,
                triggers,
            });
        }
    }
    let mut names = std::collections::HashSet::new();
    for op in &out {
        for t in &op.triggers {
            if !names.insert(t.name.as_str()) {
                return Err(Problem::new(
                    format!("/paths/{}", escape_token(&op.path)),
                    format!(
                        "two triggers are named {:?}: names are unique in a bundle",
                        t.name
                    ),
                ));
            }
        }
    }
    Ok(out)
}

/// Replace every path item that is a `$ref` by what it refers to (its
/// siblings winning), so `/paths/<template>/<method>` is each operation's
/// place in the loaded document. The document was walked already.
pub(crate) fn inline_path_items(doc: &mut Value) {
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return;
    };
    let mut inlined = Vec::new();
    for (template, item) in paths {
        if item.get("$ref").is_none() || template.starts_with("x-") {
            continue;
        }
        if let Ok(resolved) = Item::resolve(doc, item, "") {
            inlined.push((template.clone(), Value::Object(resolved.merged())));
        }
    }
    if let Some(paths) = doc.get_mut("paths").and_then(Value::as_object_mut) {
        for (template, item) in inlined {
            paths.insert(template, item);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::path::Path;

    #[test]
    fn default_handler_names_are_identifiers() {
        for (m, t, want) in [
            ("GET", "/pets/{petId}", "get_pets_petId"),
            ("DELETE", "/", "delete_root"),
            (
                "POST",
                "/v1/pet-store/{id}.json",
                "post_v1_pet_store_id_json",
            ),
            ("put", "/a__b/{x}{y}/é", "put_a_b_x_y"),
            ("GET", "/{}", "get_root"),
        ] {
            let name = default_handler_name(m, t);
            assert_eq!(name, want);
            assert!(is_identifier(&name));
        }
    }

    #[test]
    fn versions_are_recognised_or_named() {
        for (doc, needle) in [
            ("openapi: 3.1.0\npaths: {}", ""),
            ("openapi: '3.0'\npaths: {}", ""),
            ("openapi: 3.2.0\npaths: {}", "3.0.x and 3.1.x are"),
            ("openapi: 3.1\npaths: {}", "quote it"),
            ("swagger: 2.0\npaths: {}", "quote it in YAML"),
            ("swagger: '1.2'\npaths: {}", "not supported"),
        ] {
            let r = parse_api(Path::new("v.yaml"), doc);
            match (needle, r) {
                ("", Ok(_)) => {}
                ("", Err(e)) => panic!("{doc}: {e}"),
                (n, Ok(_)) => panic!("{doc}: accepted, expected {n}"),
                (n, Err(e)) => assert!(e.to_string().contains(n), "{doc}: {e}"),
            }
        }
    }

    #[test]
    fn path_item_refs_are_followed_with_their_siblings() {
        let text = "openapi: 3.1.0\npaths:\n  /a:\n    $ref: '#/components/pathItems/A'\n    summary: mine\n    servers: [{url: /own}]\ncomponents:\n  pathItems:\n    A:\n      summary: theirs\n      get: {operationId: a}\n      post: {}\n";
        let api = parse_api(Path::new("p.yaml"), text).unwrap();
        assert_eq!(api.operations.len(), 2);
        assert_eq!(api.operations[1].operation_id, "post_a");
        assert!(!api.operations[1].has_operation_id);
        assert_eq!(
            api.operations[0].bases.as_deref().unwrap()[0].to_string(),
            "*/own"
        );
        let mut doc = crate::parse_doc(Path::new("p.yaml"), text).unwrap();
        inline_path_items(&mut doc);
        assert_eq!(doc.pointer("/paths/~1a/summary").unwrap(), "mine");
        assert_eq!(doc.pointer("/paths/~1a/get/operationId").unwrap(), "a");
        assert!(doc.pointer("/paths/~1a/$ref").is_none());
    }

    #[test]
    fn semantic_errors_name_pointer_line_and_column() {
        for (doc, want) in [
            (
                "openapi: 3.0.3\ninfo: {title: t, version: '1'}\npaths:\n  /pets:\n    get:\n      responses: 7\n",
                "x.yaml:6:18: /paths/~1pets/get/responses: `responses` must be a mapping",
            ),
            (
                "swagger: '2.0'\npaths:\n  pets:\n    get: {}\n",
                "x.yaml:4:5: /paths/pets: a path must start with `/`",
            ),
            (
                "openapi: 3.1.0\npaths:\n  /a:\n    get:\n      operationId: [x]\n",
                "x.yaml:5:20: /paths/~1a/get/operationId: `operationId` must be a string",
            ),
            (
                "openapi: 3.1.0\nservers:\n  - url: https://x.io/{v}\npaths: {}\n",
                "x.yaml:3:10: /servers/0/url: `{v}` is not declared",
            ),
            (
                "{\"openapi\": \"3.0.0\", \"paths\": {\"/a/{b\": {}}}",
                "x.yaml:1:41: /paths/~1a~1{b: unclosed",
            ),
        ] {
            let err = parse_api(Path::new("x.yaml"), doc).unwrap_err().to_string();
            assert!(err.starts_with(want), "{doc}\n got: {err}\nwant: {want}");
        }
    }

    #[test]
    fn openapi31_without_paths_and_with_webhooks() {
        let api = parse_api(
            Path::new("w.yaml"),
            "openapi: 3.1.0\njsonSchemaDialect: https://json-schema.org/draft/2020-12/schema\nwebhooks:\n  newPet:\n    post: {operationId: newPet}\n",
        )
        .unwrap();
        assert!(api.operations.is_empty());
        assert_eq!(api.version, SpecVersion::OpenApi31);
        let err = parse_api(Path::new("w.yaml"), "openapi: 3.1.0\ninfo: {title: t}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs `paths`"), "{err}");
        let err = parse_api(
            Path::new("w.yaml"),
            "openapi: 3.1.0\njsonSchemaDialect: 4\npaths: {}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("w.yaml:2:20: /jsonSchemaDialect"), "{err}");
    }
}
