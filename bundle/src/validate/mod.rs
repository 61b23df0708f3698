//! Request and response validation from a bundle's Swagger/OpenAPI document.
//!
//! Ingress -> Tron -> **Runner (here: requests before the Func runs,
//! answers after it answered)**. The Runner compiles the rules once per
//! bundle version and keys them by route, `METHOD /template` ([`route_key`],
//! what the Tron sends in `funcatron_control::headers::ROUTE`), so two
//! operations sharing an `operationId` each keep their own rules.
//!
//! Requests ([`Checks`], [`compile_bundle`]): required parameters, their
//! types and constraints (path, query, header; strings coerced by their
//! declared type), the body's content type against the ones the operation
//! declares (anything else is [`Refusal::UnsupportedMediaType`], answered
//! 415), JSON bodies against their schema and form bodies
//! (`application/x-www-form-urlencoded`, `multipart/form-data`) field by
//! field. A failure is a list of problems answered 400; the Func is not
//! invoked. Bundles turn it off with `validate: false`.
//!
//! Answers ([`ResponseChecks`], [`compile_responses`]): status, content
//! type and body against the operation's `responses`, reported, never
//! enforced.
//!
//! Schemas are JSON Schema: draft 4 with OpenAPI's additions for Swagger
//! 2.0 and OpenAPI 3.0, 2020-12 (or the document's `jsonSchemaDialect`)
//! for OpenAPI 3.1; formats are checked unless `check_formats: false`. The
//! `schema` submodule has the details.

use std::borrow::Cow;
use std::collections::HashMap;

use serde_json::Value;

use crate::{Bundle, BundleError, METHODS};

mod body;
mod params;
mod response;
mod schema;

pub use response::{Answer, ResponseChecks};

use body::{base_type, kind_of, BodyRule, Form, Kind, Media};
use params::{child, collection_of, param_rule, swagger2_schema, FormFields, ParamRule, Shape};
use schema::{Direction, Schemas};

/// The key rules are filed under: the upper-case method and the path
/// template as written under `paths` (`POST /pets/{id}`).
pub fn route_key(method: &str, template: &str) -> String {
    let mut key = String::with_capacity(method.len() + 1 + template.len());
    key.extend(method.chars().map(|c| c.to_ascii_uppercase()));
    key.push(' ');
    key.push_str(template);
    key
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
    /// A `jsonSchemaDialect` this validator does not know.
    #[error("`jsonSchemaDialect: {0}` is not supported (JSON Schema 2020-12, 2019-09, draft 7, 6 and 4 are)")]
    Dialect(String),
    /// The JSON Schema compiler refused it.
    #[error("{0}")]
    Compile(String),
    /// A parameter without a name.
    #[error("{0}: a parameter has no `name`")]
    NoName(String),
    /// Where in the document a schema failed.
    #[error("{at}: {source}")]
    At {
        /// The operation and part (`paths./pets.post: requestBody`).
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

/// Where `v` really is: the target of its `$ref`, else `pointer`.
fn located(v: &Value, pointer: String) -> String {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) if r.starts_with('#') => r[1..].to_owned(),
        _ => pointer,
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

/// Why a request is refused before the Func runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The body's content type is not one the operation declares (415).
    UnsupportedMediaType(String),
    /// The request's problems against the document (400).
    Invalid(Vec<String>),
}

/// The checks of one operation.
#[derive(Default)]
pub struct Checks {
    params: Vec<ParamRule>,
    body: Option<BodyRule>,
    /// Some parameter is in the query (it is parsed once, only then).
    query: bool,
}

impl std::fmt::Debug for Checks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checks")
            .field("params", &self.params.len())
            .field("body", &self.body.is_some())
            .finish()
    }
}

impl Checks {
    /// The header parameters the operation declares (lower-case).
    pub fn header_names(&self) -> impl Iterator<Item = String> + '_ {
        self.params
            .iter()
            .filter(|p| p.location == params::Location::Header)
            .map(|p| p.name.to_ascii_lowercase())
    }

    /// Check a request; `Ok` when the Func may be invoked.
    pub fn check<H: AsRef<str>>(&self, input: &Input<'_, H>) -> Result<(), Refusal> {
        self.check_parts(false, input)
    }

    /// [`Checks::check`], without the body when `skip_body` (a direct
    /// request's body, streamed to the Func, is not there to check).
    pub fn check_parts<H: AsRef<str>>(
        &self,
        skip_body: bool,
        input: &Input<'_, H>,
    ) -> Result<(), Refusal> {
        let mut problems = Vec::new();
        if let Some(body) = self.body.as_ref().filter(|_| !skip_body) {
            let ct = input
                .headers
                .iter()
                .find(|(k, _)| k.as_ref().eq_ignore_ascii_case("content-type"))
                .map(|(_, v)| v.as_ref());
            body.check(ct, input.body, &mut problems)
                .map_err(Refusal::UnsupportedMediaType)?;
        }
        let query: Vec<(Cow<'_, str>, Cow<'_, str>)> = if self.query {
            form_urlencoded::parse(input.query.as_bytes()).collect()
        } else {
            Vec::new()
        };
        let values = params::Values {
            params: input.params,
            query: &query,
            headers: input.headers,
        };
        for rule in &self.params {
            rule.check(&values, &mut problems);
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Refusal::Invalid(problems))
        }
    }
}

/// One operation in the document.
struct Op<'d> {
    template: &'d str,
    method: &'static str,
    /// Its path item, `$ref` followed, and where that is.
    item: &'d Value,
    item_ptr: String,
    op: &'d Value,
    op_ptr: String,
}

/// Every operation under `paths`, in document order.
fn operations(doc: &Value) -> Result<Vec<Op<'_>>, SchemaError> {
    let mut out = Vec::new();
    let Some(paths) = doc.get("paths").and_then(Value::as_object) else {
        return Ok(out);
    };
    for (template, item) in paths {
        if template.starts_with("x-") {
            continue;
        }
        let item_ptr = located(item, child("/paths", template));
        let item = resolve(doc, item)?;
        for m in METHODS {
            let Some(op) = item.get(*m).filter(|o| o.is_object()) else {
                continue;
            };
            out.push(Op {
                template,
                method: m,
                item,
                op_ptr: child(&item_ptr, m),
                item_ptr: item_ptr.clone(),
                op,
            });
        }
    }
    Ok(out)
}

impl Op<'_> {
    fn key(&self) -> String {
        route_key(self.method, self.template)
    }

    fn where_(&self) -> String {
        format!("paths.{}.{}", self.template, self.method)
    }

    /// The operation's parameters then its path item's, with where each is.
    fn parameters(&self) -> Vec<(&Value, String)> {
        fn list<'v>(v: &'v Value, base: &str) -> Vec<(&'v Value, String)> {
            v.get("parameters")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .map(|(i, p)| (p, format!("{base}/parameters/{i}")))
                        .collect()
                })
                .unwrap_or_default()
        }
        let mut all = list(self.op, &self.op_ptr);
        all.extend(list(self.item, &self.item_ptr));
        all
    }
}

/// Compile the request checks of every operation in `bundle`, keyed by
/// route ([`route_key`]). Empty when the bundle turned validation off or
/// has no document; operations with nothing to check are left out.
pub fn compile_bundle(bundle: &Bundle) -> Result<HashMap<String, Checks>, BundleError> {
    let mut out = HashMap::new();
    if !bundle.validate || !bundle.doc.is_object() {
        return Ok(out);
    }
    let err = |e: SchemaError| BundleError::invalid(&bundle.spec_file, e.to_string());
    let schemas =
        Schemas::new(std::sync::Arc::clone(&bundle.doc), bundle.check_formats).map_err(err)?;
    for op in operations(&bundle.doc).map_err(err)? {
        let checks = operation_checks(&schemas, &op).map_err(err)?;
        if !checks.params.is_empty() || checks.body.is_some() {
            out.insert(op.key(), checks);
        }
    }
    Ok(out)
}

/// Compile the response checks of every operation in `bundle` that
/// documents responses, keyed by route ([`route_key`]).
pub fn compile_responses(bundle: &Bundle) -> Result<HashMap<String, ResponseChecks>, BundleError> {
    let mut out = HashMap::new();
    if !bundle.doc.is_object() {
        return Ok(out);
    }
    let err = |e: SchemaError| BundleError::invalid(&bundle.spec_file, e.to_string());
    let schemas =
        Schemas::new(std::sync::Arc::clone(&bundle.doc), bundle.check_formats).map_err(err)?;
    for op in operations(&bundle.doc).map_err(err)? {
        if let Some(r) =
            response::compile(&schemas, op.op, &op.op_ptr, &op.where_()).map_err(err)?
        {
            out.insert(op.key(), r);
        }
    }
    Ok(out)
}

fn operation_checks(schemas: &Schemas, op: &Op<'_>) -> Result<Checks, SchemaError> {
    let where_ = op.where_();
    let mut checks = Checks::default();
    // Operation parameters override path-item ones of the same name and place.
    for (p, pointer) in op.parameters() {
        if let Some(rule) = param_rule(schemas, p, &pointer, &where_)? {
            if !checks
                .params
                .iter()
                .any(|r| r.name == rule.name && r.location == rule.location)
            {
                checks.params.push(rule);
            }
        }
    }
    checks.query = checks
        .params
        .iter()
        .any(|r| r.location == params::Location::Query);
    checks.body = if schemas.doc().get("swagger").is_some() {
        swagger2_body(schemas, op, &where_)?
    } else {
        openapi3_body(schemas, op, &where_)?
    };
    Ok(checks)
}

/// The media types listed under `key` (`consumes`), lower-case, without
/// parameters.
fn media_list(v: Option<&Value>) -> Option<Vec<String>> {
    v.and_then(Value::as_array).map(|a| {
        a.iter()
            .filter_map(Value::as_str)
            .map(|s| base_type(s).into_owned())
            .collect()
    })
}

/// Swagger 2.0: an `in: body` parameter or `in: formData` ones, and the
/// operation's (else the document's) `consumes`.
fn swagger2_body(
    schemas: &Schemas,
    op: &Op<'_>,
    where_: &str,
) -> Result<Option<BodyRule>, SchemaError> {
    let doc = schemas.doc();
    let mut body = None;
    let mut form = Vec::new();
    let mut seen = Vec::new();
    for (p, pointer) in op.parameters() {
        let pointer = located(p, pointer);
        let p = resolve(doc, p)?;
        let (name, place) = (
            p.get("name").and_then(Value::as_str).unwrap_or_default(),
            p.get("in").and_then(Value::as_str).unwrap_or_default(),
        );
        if seen.contains(&(name, place)) {
            continue;
        }
        seen.push((name, place));
        match place {
            "body" if body.is_none() => body = Some((p, pointer)),
            "formData" => form.push(p),
            _ => {}
        }
    }
    let own = media_list(op.op.get("consumes"));
    if body.is_none() && form.is_empty() && own.is_none() {
        return Ok(None);
    }
    let consumes = own
        .or_else(|| media_list(doc.get("consumes")))
        .unwrap_or_default();
    let at = |part: &str| SchemaError::at(format!("{where_}: {part}"));
    let schema = match &body {
        Some((p, pointer)) if p.get("schema").is_some() => Some(std::sync::Arc::new(
            schemas
                .at(&format!("{pointer}/schema"), Direction::Request)
                .map_err(at("body"))?,
        )),
        _ => None,
    };
    let form = if form.is_empty() {
        None
    } else {
        Some(std::sync::Arc::new(
            swagger2_form(schemas, &form).map_err(at("formData"))?,
        ))
    };
    let required = body.is_some_and(|(p, _)| p.get("required") == Some(&Value::Bool(true)));
    Ok(Some(rule(required, consumes, |range| Media {
        schema: schema
            .as_ref()
            .filter(|_| kind_of(range) == Kind::Json || range.contains('*'))
            .cloned(),
        form: form
            .as_ref()
            .filter(|_| {
                matches!(kind_of(range), Kind::UrlEncoded | Kind::Multipart) || range.contains('*')
            })
            .cloned(),
        range: range.to_owned(),
    })))
}

/// A body rule over `declared` media types (none declared: anything).
fn rule(required: bool, declared: Vec<String>, media: impl Fn(&str) -> Media) -> BodyRule {
    let is_declared = !declared.is_empty();
    let ranges = if is_declared {
        declared
    } else {
        vec!["*/*".to_owned()]
    };
    BodyRule {
        required,
        declared: is_declared,
        media: ranges.iter().map(|r| media(r)).collect(),
    }
}

/// Swagger 2.0 `formData` parameters as a form: each field's shape, and an
/// object schema of them.
fn swagger2_form(schemas: &Schemas, params: &[&Value]) -> Result<Form, SchemaError> {
    let mut fields = Vec::new();
    let mut properties = serde_json::Map::new();
    let mut required = Vec::new();
    for p in params {
        let Some(name) = p.get("name").and_then(Value::as_str) else {
            continue;
        };
        let s = swagger2_schema(p);
        fields.push((
            name.to_owned(),
            Shape::of(schemas.doc(), &s, collection_of(p, false))?,
        ));
        properties.insert(name.to_owned(), s);
        if p.get("required") == Some(&Value::Bool(true)) {
            required.push(Value::from(name));
        }
    }
    let mut schema = serde_json::json!({
        "type": "object",
        "properties": properties,
    });
    if !required.is_empty() {
        schema["required"] = Value::Array(required);
    }
    Ok(Form {
        fields: FormFields { fields },
        schema: Some(schemas.value(&schema, Direction::Request)?),
    })
}

/// OpenAPI 3: `requestBody` and its `content`.
fn openapi3_body(
    schemas: &Schemas,
    op: &Op<'_>,
    where_: &str,
) -> Result<Option<BodyRule>, SchemaError> {
    let doc = schemas.doc();
    let Some(rb) = op.op.get("requestBody") else {
        return Ok(None);
    };
    let rb_ptr = located(rb, format!("{}/requestBody", op.op_ptr));
    let at = || SchemaError::at(format!("{where_}: requestBody"));
    let rb = resolve(doc, rb).map_err(at())?;
    let content = rb.get("content").and_then(Value::as_object);
    let mut media = Vec::new();
    for (range, m) in content.into_iter().flatten() {
        let base = base_type(range).into_owned();
        let pointer = format!("{}/schema", child(&format!("{rb_ptr}/content"), range));
        let kind = kind_of(&base);
        let (mut schema, mut form) = (None, None);
        if let Some(s) = m.get("schema") {
            let v = schemas.at(&pointer, Direction::Request).map_err(at())?;
            if matches!(kind, Kind::UrlEncoded | Kind::Multipart) {
                let mut fields = FormFields::of_schema(doc, s).map_err(at())?;
                encoding_styles(m, &mut fields);
                form = Some(std::sync::Arc::new(Form {
                    fields,
                    schema: Some(v),
                }));
            } else if kind == Kind::Json || base.contains('*') {
                schema = Some(std::sync::Arc::new(v));
            }
        }
        media.push(Media {
            range: base,
            schema,
            form,
        });
    }
    let required = rb.get("required") == Some(&Value::Bool(true));
    if media.is_empty() {
        return Ok(Some(rule(required, vec![], |r| Media {
            range: r.to_owned(),
            schema: None,
            form: None,
        })));
    }
    Ok(Some(BodyRule {
        required,
        declared: true,
        media,
    }))
}

/// A form's `encoding` entries: how its array fields are written.
fn encoding_styles(media: &Value, fields: &mut FormFields) {
    let Some(enc) = media.get("encoding").and_then(Value::as_object) else {
        return;
    };
    for (name, shape) in &mut fields.fields {
        if let Some(e) = enc.get(name.as_str()) {
            shape.collection = collection_of(e, true);
        }
    }
}
