//! Request validation from a bundle's Swagger/OpenAPI document.
//!
//! Ingress -> Tron -> **Runner (here, before the Func runs)**. The Runner
//! compiles one [`Checks`] per operation when it prepares a bundle and runs
//! it on every request before invoking the Func: required parameters,
//! parameter types and constraints (path, query, header; strings coerced by
//! their declared type), and JSON request bodies against their schema. A
//! failure is a list of problems the Runner answers with 400; the Func is
//! not invoked. Bundles turn it off with `validate: false`.
//!
//! Schemas are checked as JSON Schema draft 4 (what Swagger 2.0 and OpenAPI
//! 3.0 are based on); OpenAPI's `nullable: true` is honoured; `$ref`s into
//! `definitions`, `components` and `parameters` resolve within the document.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::{Bundle, BundleError, METHODS};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Location {
    Path,
    Query,
    Header,
}

impl Location {
    fn as_str(self) -> &'static str {
        match self {
            Location::Path => "path",
            Location::Query => "query",
            Location::Header => "header",
        }
    }
}

/// How an array parameter's values are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Collection {
    Csv,
    Ssv,
    Tsv,
    Pipes,
    /// One value per occurrence (`?a=1&a=2`).
    Multi,
}

struct ParamRule {
    name: String,
    location: Location,
    required: bool,
    /// The declared type, for coercing the string on the wire.
    ty: Option<String>,
    item_ty: Option<String>,
    collection: Collection,
    schema: Option<jsonschema::Validator>,
}

struct BodyRule {
    required: bool,
    /// Only JSON bodies are checked; `None` when no JSON schema is declared.
    schema: Option<jsonschema::Validator>,
    /// The operation accepts nothing but JSON.
    json_only: bool,
}

/// The checks of one operation.
#[derive(Default)]
pub struct Checks {
    params: Vec<ParamRule>,
    body: Option<BodyRule>,
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checks")
            .field("params", &self.params.len())
            .field("body", &self.body.is_some())
            .finish()
    }
}

/// What a request offers to be checked.
pub struct Input<'a, H> {
    /// Path parameters the Tron extracted (percent-decoded).
    pub params: &'a [(String, String)],
    /// The raw query string.
    pub query: &'a str,
    /// Header pairs, names lower-case.
    pub headers: &'a [(H, H)],
    /// The request body.
    pub body: &'a [u8],
}

fn is_json_type(content_type: &str) -> bool {
    let base = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    base == "application/json" || base.ends_with("+json")
}

/// Why a schema in the document cannot be used.
#[derive(Debug, thiserror::Error)]
enum SchemaError {
    /// A `$ref` that points outside the document.
    #[error("`$ref: {0}`: only references within the document are supported")]
    External(String),
    /// A `$ref` to nothing.
    #[error("`$ref: {0}` does not resolve")]
    Unresolved(String),
    /// `$ref`s that refer on and on.
    #[error("`$ref` chain too long")]
    Chain,
    /// A schema that is not a mapping.
    #[error("a schema must be a mapping")]
    NotMapping,
    /// The JSON Schema compiler refused it.
    #[error("{0}")]
    Compile(String),
    /// A parameter without a name.
    #[error("{0}: a parameter has no `name`")]
    NoName(String),
    /// Where in the document a schema failed.
    #[error("{at}: {source}")]
    At {
        /// The operation and part (`GET /pets: body`).
        at: String,
        /// Why.
        source: Box<SchemaError>,
    },
}

impl SchemaError {
    fn at(at: String) -> impl FnOnce(SchemaError) -> SchemaError {
        move |e| SchemaError::At {
            at,
            source: Box::new(e),
        }
    }
}

/// A query, header or path value that is not of its declared type.
#[derive(Debug, thiserror::Error)]
enum CoerceError {
    #[error("{0:?} is not an integer")]
    Integer(String),
    #[error("{0:?} is not a number")]
    Number(String),
    #[error("{0:?} is not a boolean (true or false)")]
    Boolean(String),
}

/// Follow a local `$ref` (`#/a/b`) within `doc`.
fn resolve<'d>(doc: &'d Value, v: &'d Value) -> Result<&'d Value, SchemaError> {
    let mut v = v;
    for _ in 0..16 {
        match v.get("$ref").and_then(Value::as_str) {
            None => return Ok(v),
            Some(r) => {
                let pointer = r
                    .strip_prefix('#')
                    .ok_or_else(|| SchemaError::External(r.to_owned()))?;
                v = doc
                    .pointer(pointer)
                    .ok_or_else(|| SchemaError::Unresolved(r.to_owned()))?;
            }
        }
    }
    Err(SchemaError::Chain)
}

/// OpenAPI 3.0 `nullable: true` as JSON Schema (`type: [T, "null"]`).
fn nullable_to_type(v: &mut Value) {
    match v {
        Value::Object(m) => {
            if m.get("nullable") == Some(&Value::Bool(true)) {
                if let Some(Value::String(t)) = m.get("type").cloned() {
                    m.insert("type".into(), Value::from(vec![t, "null".to_owned()]));
                }
            }
            m.values_mut().for_each(nullable_to_type);
        }
        Value::Array(a) => a.iter_mut().for_each(nullable_to_type),
        _ => {}
    }
}

/// Compile `schema` with the document's definitions beside it, so `$ref`s
/// into them resolve.
fn compile(doc: &Value, schema: &Value) -> Result<jsonschema::Validator, SchemaError> {
    let mut root = match schema {
        Value::Object(m) => m.clone(),
        _ => return Err(SchemaError::NotMapping),
    };
    for key in ["definitions", "components", "parameters"] {
        if let Some(v) = doc.get(key) {
            root.entry(key.to_owned()).or_insert_with(|| v.clone());
        }
    }
    let mut root = Value::Object(root);
    nullable_to_type(&mut root);
    jsonschema::draft4::options()
        .should_validate_formats(false)
        .build(&root)
        .map_err(|e| SchemaError::Compile(e.to_string()))
}

const PARAM_SCHEMA_KEYS: &[&str] = &[
    "type",
    "format",
    "items",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "uniqueItems",
    "multipleOf",
];

fn param_rule(doc: &Value, p: &Value, where_: &str) -> Result<Option<ParamRule>, SchemaError> {
    let p = resolve(doc, p)?;
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| SchemaError::NoName(where_.to_owned()))?;
    let location = match p.get("in").and_then(Value::as_str) {
        Some("path") => Location::Path,
        Some("query") => Location::Query,
        Some("header") => Location::Header,
        // body is a BodyRule; formData and cookie are not checked.
        _ => return Ok(None),
    };
    let required =
        location == Location::Path || p.get("required").and_then(Value::as_bool).unwrap_or(false);
    // OpenAPI 3: `schema`; Swagger 2: the fields on the parameter itself.
    let schema = match p.get("schema") {
        Some(s) => resolve(doc, s)?.clone(),
        None => Value::Object(
            PARAM_SCHEMA_KEYS
                .iter()
                .filter_map(|k| p.get(*k).map(|v| ((*k).to_owned(), v.clone())))
                .collect::<Map<_, _>>(),
        ),
    };
    let ty = schema
        .get("type")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let item_ty = schema
        .get("items")
        .map(|i| resolve(doc, i))
        .transpose()?
        .and_then(|i| i.get("type"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let collection = match p.get("collectionFormat").and_then(Value::as_str) {
        Some("ssv") => Collection::Ssv,
        Some("tsv") => Collection::Tsv,
        Some("pipes") => Collection::Pipes,
        Some("multi") => Collection::Multi,
        Some(_) => Collection::Csv,
        // OpenAPI 3 defaults: query `form` + explode (one per occurrence);
        // path and header `simple` (comma-separated).
        None if p.get("schema").is_some() && location == Location::Query => {
            match (
                p.get("style").and_then(Value::as_str),
                p.get("explode").and_then(Value::as_bool),
            ) {
                (Some("spaceDelimited"), _) => Collection::Ssv,
                (Some("pipeDelimited"), _) => Collection::Pipes,
                (_, Some(false)) => Collection::Csv,
                _ => Collection::Multi,
            }
        }
        None => Collection::Csv,
    };
    let has_constraints = schema.as_object().is_some_and(|m| !m.is_empty());
    let schema = if has_constraints {
        Some(
            compile(doc, &schema)
                .map_err(SchemaError::at(format!("{where_}: parameter `{name}`")))?,
        )
    } else {
        None
    };
    Ok(Some(ParamRule {
        name: name.to_owned(),
        location,
        required,
        ty,
        item_ty,
        collection,
        schema,
    }))
}

fn body_rule(doc: &Value, op: &Value, where_: &str) -> Result<Option<BodyRule>, SchemaError> {
    // Swagger 2: an `in: body` parameter.
    if let Some(params) = op.get("parameters").and_then(Value::as_array) {
        for p in params {
            let p = resolve(doc, p)?;
            if p.get("in").and_then(Value::as_str) == Some("body") {
                let schema = match p.get("schema") {
                    Some(s) => {
                        Some(compile(doc, s).map_err(SchemaError::at(format!("{where_}: body")))?)
                    }
                    None => None,
                };
                return Ok(Some(BodyRule {
                    required: p.get("required").and_then(Value::as_bool).unwrap_or(false),
                    schema,
                    json_only: false,
                }));
            }
        }
    }
    // OpenAPI 3: `requestBody`.
    let Some(rb) = op.get("requestBody") else {
        return Ok(None);
    };
    let rb = resolve(doc, rb)?;
    let content = rb.get("content").and_then(Value::as_object);
    let json = content.and_then(|c| c.iter().find(|(k, _)| is_json_type(k)));
    let schema = match json.and_then(|(_, media)| media.get("schema")) {
        Some(s) => {
            Some(compile(doc, s).map_err(SchemaError::at(format!("{where_}: requestBody")))?)
        }
        None => None,
    };
    Ok(Some(BodyRule {
        required: rb.get("required").and_then(Value::as_bool).unwrap_or(false),
        schema,
        json_only: content.is_some_and(|c| !c.is_empty() && c.keys().all(|k| is_json_type(k))),
    }))
}

/// Compile the checks of every operation in `bundle`, keyed by `operationId`.
/// Empty when the bundle turned validation off or has no document.
pub fn compile_bundle(bundle: &Bundle) -> Result<HashMap<String, Checks>, BundleError> {
    let mut out = HashMap::new();
    let doc = bundle.doc.as_ref();
    if !bundle.validate || !doc.is_object() {
        return Ok(out);
    }
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Ok(out);
    };
    let err = |e: SchemaError| BundleError::invalid(&bundle.spec_file, e.to_string());
    for (template, item) in paths {
        if template.starts_with("x-") {
            continue;
        }
        let item = resolve(doc, item).map_err(err)?;
        let shared: &[Value] = item
            .get("parameters")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or_default();
        for m in METHODS {
            let Some(op) = item.get(*m) else { continue };
            let Some(id) = op.get("operationId").and_then(Value::as_str) else {
                continue;
            };
            let where_ = format!("paths.{template}.{m}");
            let own: &[Value] = op
                .get("parameters")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            let mut checks = Checks::default();
            // Operation parameters override path-item ones of the same name and place.
            for p in own.iter().chain(shared) {
                if let Some(rule) = param_rule(doc, p, &where_).map_err(err)? {
                    if !checks
                        .params
                        .iter()
                        .any(|r| r.name == rule.name && r.location == rule.location)
                    {
                        checks.params.push(rule);
                    }
                }
            }
            checks.body = body_rule(doc, op, &where_).map_err(err)?;
            if checks.params.is_empty() && checks.body.is_none() {
                continue;
            }
            out.insert(id.to_owned(), checks);
        }
    }
    Ok(out)
}

/// A string from the wire as the JSON value its declared type says.
fn coerce(raw: &str, ty: Option<&str>) -> Result<Value, CoerceError> {
    match ty {
        Some("integer") => raw
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| CoerceError::Integer(raw.to_owned())),
        Some("number") => raw
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| CoerceError::Number(raw.to_owned())),
        Some("boolean") => match raw {
            "true" => Ok(Value::Bool(true)),
            "false" => Ok(Value::Bool(false)),
            _ => Err(CoerceError::Boolean(raw.to_owned())),
        },
        _ => Ok(Value::String(raw.to_owned())),
    }
}

fn schema_problems(
    schema: &jsonschema::Validator,
    value: &Value,
    prefix: &str,
    out: &mut Vec<String>,
) {
    for e in schema.iter_errors(value) {
        let at = e.instance_path().to_string();
        out.push(format!("{prefix}{at}: {e}"));
    }
}

impl Checks {
    /// Every problem with the request; empty when it may be invoked.
    pub fn check<H: AsRef<str>>(&self, input: &Input<'_, H>) -> Vec<String> {
        let mut problems = Vec::new();
        for rule in &self.params {
            let values: Vec<std::borrow::Cow<'_, str>> = match rule.location {
                Location::Path => input
                    .params
                    .iter()
                    .filter(|(k, _)| *k == rule.name)
                    .map(|(_, v)| v.as_str().into())
                    .collect(),
                Location::Query => form_urlencoded::parse(input.query.as_bytes())
                    .filter(|(k, _)| *k == rule.name)
                    .map(|(_, v)| v)
                    .collect(),
                Location::Header => input
                    .headers
                    .iter()
                    .filter(|(k, _)| k.as_ref().eq_ignore_ascii_case(&rule.name))
                    .map(|(_, v)| v.as_ref().into())
                    .collect(),
            };
            let label = format!("{} parameter `{}`", rule.location.as_str(), rule.name);
            if values.is_empty() {
                if rule.required {
                    problems.push(format!("{label}: required but missing"));
                }
                continue;
            }
            let value = if rule.ty.as_deref() == Some("array") {
                let items: Vec<&str> = match rule.collection {
                    Collection::Multi => values.iter().map(|v| v.as_ref()).collect(),
                    c => {
                        let sep = match c {
                            Collection::Ssv => ' ',
                            Collection::Tsv => '\t',
                            Collection::Pipes => '|',
                            _ => ',',
                        };
                        values.iter().flat_map(|v| v.split(sep)).collect()
                    }
                };
                items
                    .iter()
                    .map(|i| coerce(i, rule.item_ty.as_deref()))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Value::Array)
            } else {
                coerce(&values[0], rule.ty.as_deref())
            };
            match value {
                Err(why) => problems.push(format!("{label}: {why}")),
                Ok(v) => {
                    if let Some(schema) = &rule.schema {
                        schema_problems(schema, &v, &label, &mut problems);
                    }
                }
            }
        }
        if let Some(body) = &self.body {
            self.check_body(body, input, &mut problems);
        }
        problems
    }

    fn check_body<H: AsRef<str>>(
        &self,
        rule: &BodyRule,
        input: &Input<'_, H>,
        problems: &mut Vec<String>,
    ) {
        if input.body.is_empty() {
            if rule.required {
                problems.push("request body: required but empty".to_owned());
            }
            return;
        }
        let Some(schema) = &rule.schema else { return };
        let content_type = input
            .headers
            .iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.as_ref());
        match content_type {
            Some(ct) if !is_json_type(ct) => {
                if rule.json_only {
                    problems.push(format!(
                        "request body: content-type {ct:?} is not accepted (application/json is)"
                    ));
                }
            }
            _ => match serde_json::from_slice::<Value>(input.body) {
                Err(e) => problems.push(format!("request body: not valid JSON: {e}")),
                Ok(v) => schema_problems(schema, &v, "request body", problems),
            },
        }
    }
}
