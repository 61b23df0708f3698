//! The document's schemas as JSON Schema validators.
//!
//! Bundle -> **compiled once per bundle version (here)** -> request checks
//! ([`super::Checks`]) and response checks ([`super::ResponseChecks`]) on
//! the Runner. The whole document is one resource of a
//! [`jsonschema::Registry`] (shared, not copied per schema); each schema is
//! compiled as a `$ref` to its place in it, so every local `$ref`
//! (`#/definitions/..`, `#/components/..`, the loader's
//! `#/x-funcatron-refs/..`, anywhere else) resolves as written.
//!
//! The dialect follows the document: OpenAPI 3.1 is JSON Schema 2020-12
//! (or the draft its `jsonSchemaDialect` names); OpenAPI 3.0 and Swagger
//! 2.0 are draft 4 with OpenAPI's additions, done as keywords rather than
//! by rewriting the document:
//!
//! - `type` honours OpenAPI 3.0 `nullable: true` (and Swagger 2.0's
//!   common `x-nullable: true`), and checks the numeric formats `int32`,
//!   `int64` (ranges), `float` (within f32) and `double`;
//! - `readOnly` values are refused in requests, `writeOnly` values in
//!   responses, and `required` leaves them out in that direction;
//! - `format` checks `date`, `date-time`, `email` ... (the crate's own),
//!   plus `uuid`, `byte` (base64) and `binary` (anything), unless the
//!   bundle says `check_formats: false`.

use std::sync::Arc;

use base64::Engine;
use jsonschema::{Draft, Keyword, Registry, ValidationError, Validator};
use serde_json::{Map, Value};

use super::SchemaError;

/// The URI the document is registered under.
const DOC_URI: &str = "urn:funcatron:document";

/// What a URI fragment may not hold as it is (RFC 3986 `fragment`): a
/// pointer into `paths` has `{` and `}`. The resolver decodes it again.
const FRAGMENT: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b';')
    .remove(b'=')
    .remove(b':')
    .remove(b'@')
    .remove(b'/')
    .remove(b'?');

/// Which way a value travels: what `readOnly` and `writeOnly` mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Sent by the client: `readOnly` values are refused.
    Request,
    /// Answered by the Func: `writeOnly` values are refused.
    Response,
}

/// The document's schemas, ready to compile.
pub(crate) struct Schemas {
    doc: Arc<Value>,
    registry: Registry<'static>,
    draft: Draft,
    /// OpenAPI 3.0 / Swagger 2.0: `nullable` (`x-nullable`) makes `type`
    /// accept null.
    nullable: bool,
    check_formats: bool,
}

/// The JSON Schema draft a document's schemas are written in, and whether
/// `nullable` applies.
fn dialect(doc: &Value) -> Result<(Draft, bool), SchemaError> {
    let version = doc.get("openapi").and_then(Value::as_str).unwrap_or("");
    if !(version.starts_with("3.1") || version.starts_with("3.2")) {
        return Ok((Draft::Draft4, true));
    }
    let Some(d) = doc.get("jsonSchemaDialect").and_then(Value::as_str) else {
        return Ok((Draft::Draft202012, false));
    };
    let draft = match d.trim_end_matches('#') {
        "https://json-schema.org/draft/2020-12/schema"
        | "https://spec.openapis.org/oas/3.1/dialect/base"
        | "https://spec.openapis.org/oas/3.1/dialect/2024-10-25"
        | "https://spec.openapis.org/oas/3.2/dialect/2025-09-17" => Draft::Draft202012,
        "https://json-schema.org/draft/2019-09/schema" => Draft::Draft201909,
        "http://json-schema.org/draft-07/schema" => Draft::Draft7,
        "http://json-schema.org/draft-06/schema" => Draft::Draft6,
        "http://json-schema.org/draft-04/schema" => Draft::Draft4,
        other => return Err(SchemaError::Dialect(other.to_owned())),
    };
    Ok((draft, false))
}

/// `token` escaped for a JSON pointer.
pub(crate) fn escape(token: &str) -> std::borrow::Cow<'_, str> {
    if token.contains(['~', '/']) {
        token.replace('~', "~0").replace('/', "~1").into()
    } else {
        token.into()
    }
}

impl Schemas {
    /// The schemas of `doc`; `check_formats` false makes `format` an
    /// annotation (numeric formats included).
    pub(crate) fn new(doc: Arc<Value>, check_formats: bool) -> Result<Schemas, SchemaError> {
        let (draft, nullable) = dialect(&doc)?;
        let registry = Registry::new()
            .draft(draft)
            .add(DOC_URI, Arc::clone(&doc))
            .and_then(|r| r.prepare())
            .map_err(|e| SchemaError::Compile(e.to_string()))?;
        Ok(Schemas {
            doc,
            registry,
            draft,
            nullable,
            check_formats,
        })
    }

    /// The document.
    pub(crate) fn doc(&self) -> &Value {
        &self.doc
    }

    /// Whether the schemas are JSON Schema 2019-09 or later (OpenAPI 3.1).
    pub(crate) fn modern(&self) -> bool {
        matches!(self.draft, Draft::Draft201909 | Draft::Draft202012)
    }

    /// The validator of the schema at `pointer` (a JSON pointer into the
    /// document, tokens escaped).
    pub(crate) fn at(&self, pointer: &str, dir: Direction) -> Result<Validator, SchemaError> {
        match self.doc.pointer(pointer) {
            Some(Value::Object(_)) | Some(Value::Bool(_)) => {}
            Some(_) => return Err(SchemaError::NotMapping),
            None => return Err(SchemaError::Unresolved(format!("#{pointer}"))),
        }
        let fragment = percent_encoding::utf8_percent_encode(pointer, FRAGMENT);
        self.value(
            &serde_json::json!({ "$ref": format!("{DOC_URI}#{fragment}") }),
            dir,
        )
    }

    /// The validator of `schema`, built here (Swagger 2.0 parameters);
    /// its `$ref`s resolve in the document.
    pub(crate) fn value(&self, schema: &Value, dir: Direction) -> Result<Validator, SchemaError> {
        let doc = Arc::clone(&self.doc);
        let numeric = self.check_formats;
        let nullable = self.nullable;
        let refused = match dir {
            Direction::Request => "readOnly",
            Direction::Response => "writeOnly",
        };
        let mut options = jsonschema::options()
            .with_draft(self.draft)
            .with_registry(&self.registry)
            .should_validate_formats(self.check_formats)
            .with_keyword("type", move |parent, value, _| {
                type_keyword(parent, value, nullable, numeric)
            })
            .with_keyword(refused, move |_, value, _| {
                Ok(Box::new(Refused {
                    on: value.as_bool() == Some(true),
                    dir,
                }))
            })
            .with_keyword("required", move |parent, value, _| {
                Ok(Box::new(Required::new(&doc, parent, value, refused)))
            });
        if self.check_formats {
            options = options
                .with_format("byte", is_base64)
                .with_format("binary", |_: &str| true);
            if !self.modern() {
                // 2019-09 and later have `uuid` built in.
                options = options.with_format("uuid", is_uuid);
            }
        }
        options
            .build(schema)
            .map_err(|e| SchemaError::Compile(e.to_string()))
    }
}

/// `format: byte`: base64 (standard or URL-safe alphabet, padded or not).
fn is_base64(s: &str) -> bool {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let lenient =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    [base64::alphabet::STANDARD, base64::alphabet::URL_SAFE]
        .iter()
        .any(|a| GeneralPurpose::new(a, lenient).decode(s).is_ok())
}

/// `format: uuid` (RFC 4122, the hyphenated form JSON Schema means).
fn is_uuid(s: &str) -> bool {
    s.len() == 36 && uuid::Uuid::try_parse(s).is_ok()
}

/// The JSON types `type` may name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonType {
    Null,
    Boolean,
    Integer,
    Number,
    String,
    Array,
    Object,
}

impl JsonType {
    fn parse(s: &str) -> Option<JsonType> {
        Some(match s {
            "null" => JsonType::Null,
            "boolean" => JsonType::Boolean,
            "integer" => JsonType::Integer,
            "number" => JsonType::Number,
            "string" => JsonType::String,
            "array" => JsonType::Array,
            "object" => JsonType::Object,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            JsonType::Null => "null",
            JsonType::Boolean => "boolean",
            JsonType::Integer => "integer",
            JsonType::Number => "number",
            JsonType::String => "string",
            JsonType::Array => "array",
            JsonType::Object => "object",
        }
    }

    fn admits(self, v: &Value) -> bool {
        match (self, v) {
            (JsonType::Null, Value::Null)
            | (JsonType::Boolean, Value::Bool(_))
            | (JsonType::Number, Value::Number(_))
            | (JsonType::String, Value::String(_))
            | (JsonType::Array, Value::Array(_))
            | (JsonType::Object, Value::Object(_)) => true,
            (JsonType::Integer, Value::Number(n)) => {
                n.is_i64() || n.is_u64() || n.as_f64().is_some_and(|f| f.fract() == 0.0)
            }
            _ => false,
        }
    }
}

/// The numeric formats OpenAPI defines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NumberFormat {
    Int32,
    Int64,
    Float,
    Double,
}

impl NumberFormat {
    fn parse(s: &str) -> Option<NumberFormat> {
        Some(match s {
            "int32" => NumberFormat::Int32,
            "int64" => NumberFormat::Int64,
            "float" => NumberFormat::Float,
            "double" => NumberFormat::Double,
            _ => return None,
        })
    }

    fn name(self) -> &'static str {
        match self {
            NumberFormat::Int32 => "int32",
            NumberFormat::Int64 => "int64",
            NumberFormat::Float => "float",
            NumberFormat::Double => "double",
        }
    }

    fn admits(self, n: &serde_json::Number) -> bool {
        match self {
            NumberFormat::Int32 => match (n.as_i64(), n.as_f64()) {
                (Some(i), _) => i32::try_from(i).is_ok(),
                (None, Some(f)) => f >= f64::from(i32::MIN) && f <= f64::from(i32::MAX),
                _ => false,
            },
            NumberFormat::Int64 => match (n.as_i64(), n.as_u64(), n.as_f64()) {
                (Some(_), _, _) => true,
                (None, Some(_), _) => false,
                // i64::MAX as f64 rounds up to 2^63, which is out of range.
                (None, None, Some(f)) => f >= -(2f64.powi(63)) && f < 2f64.powi(63),
                _ => false,
            },
            NumberFormat::Float => n
                .as_f64()
                .is_some_and(|f| f.is_finite() && f.abs() <= f64::from(f32::MAX)),
            NumberFormat::Double => n.as_f64().is_some_and(f64::is_finite),
        }
    }
}

/// `type`, with OpenAPI 3.0's `nullable` and the numeric formats.
struct TypeCheck {
    types: Vec<JsonType>,
    nullable: bool,
    format: Option<NumberFormat>,
}

fn type_keyword<'a>(
    parent: &'a Map<String, Value>,
    value: &'a Value,
    nullable: bool,
    numeric: bool,
) -> Result<Box<dyn for<'i> Keyword<'i>>, ValidationError<'a>> {
    let names: Vec<&str> = match value {
        Value::String(s) => vec![s.as_str()],
        Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    // Swagger 2.0's `file` (answers, form fields): any content.
    if names.contains(&"file") {
        return Ok(Box::new(TypeCheck {
            types: vec![
                JsonType::Null,
                JsonType::Boolean,
                JsonType::Number,
                JsonType::String,
                JsonType::Array,
                JsonType::Object,
            ],
            nullable: false,
            format: None,
        }));
    }
    let types = names
        .iter()
        .map(|n| JsonType::parse(n))
        .collect::<Option<Vec<_>>>()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ValidationError::custom(format!("`type: {value}` is not a JSON type")))?;
    let is_true = |k: &str| parent.get(k) == Some(&Value::Bool(true));
    Ok(Box::new(TypeCheck {
        types,
        nullable: nullable && (is_true("nullable") || is_true("x-nullable")),
        format: numeric
            .then(|| parent.get("format").and_then(Value::as_str))
            .flatten()
            .and_then(NumberFormat::parse),
    }))
}

impl TypeCheck {
    fn type_ok(&self, v: &Value) -> bool {
        (self.nullable && v.is_null()) || self.types.iter().any(|t| t.admits(v))
    }

    fn format_ok(&self, v: &Value) -> bool {
        match (self.format, v) {
            (Some(f), Value::Number(n)) => f.admits(n),
            _ => true,
        }
    }
}

impl<'i> Keyword<'i> for TypeCheck {
    fn validate(&self, instance: &'i Value) -> Result<(), ValidationError<'i>> {
        if !self.type_ok(instance) {
            let names: Vec<String> = self
                .types
                .iter()
                .map(|t| format!("{:?}", t.name()))
                .chain(self.nullable.then(|| "\"null\"".to_owned()))
                .collect();
            let noun = if names.len() == 1 { "type" } else { "types" };
            return Err(ValidationError::custom(format!(
                "{} is not of {noun} {}",
                short(instance),
                names.join(", ")
            )));
        }
        if !self.format_ok(instance) {
            let f = self.format.map_or("", NumberFormat::name);
            return Err(ValidationError::custom(format!(
                "{instance} is out of range for format {f:?}"
            )));
        }
        Ok(())
    }

    fn is_valid(&self, instance: &'i Value) -> bool {
        self.type_ok(instance) && self.format_ok(instance)
    }
}

/// A value's text, shortened for a problem line.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.len() <= 80 {
        return s;
    }
    let mut end = 77;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

/// `readOnly: true` in a request, `writeOnly: true` in a response: the
/// value must not be there.
struct Refused {
    on: bool,
    dir: Direction,
}

impl<'i> Keyword<'i> for Refused {
    fn validate(&self, _: &'i Value) -> Result<(), ValidationError<'i>> {
        if !self.on {
            return Ok(());
        }
        Err(ValidationError::custom(match self.dir {
            Direction::Request => "is read-only: the server sets it, a request must not send it",
            Direction::Response => "is write-only: an answer must not contain it",
        }))
    }

    fn is_valid(&self, _: &'i Value) -> bool {
        !self.on
    }
}

/// `required`, less the properties this direction refuses (OpenAPI: a
/// required `readOnly` property is required in responses only).
struct Required {
    names: Vec<String>,
}

impl Required {
    fn new(doc: &Value, parent: &Map<String, Value>, value: &Value, refused: &str) -> Required {
        let props = parent.get("properties").and_then(Value::as_object);
        let refused_here = |name: &str| {
            props
                .and_then(|p| p.get(name))
                .map(|s| super::resolve(doc, s).unwrap_or(s))
                .and_then(|s| s.get(refused))
                == Some(&Value::Bool(true))
        };
        Required {
            names: value
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .filter(|n| !refused_here(n))
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    fn missing<'v>(&'v self, instance: &'v Value) -> impl Iterator<Item = &'v str> + 'v {
        let obj = instance.as_object();
        self.names
            .iter()
            .filter(move |n| obj.is_some_and(|o| !o.contains_key(n.as_str())))
            .map(String::as_str)
    }
}

impl<'i> Keyword<'i> for Required {
    fn validate(&self, instance: &'i Value) -> Result<(), ValidationError<'i>> {
        match self.missing(instance).next() {
            None => Ok(()),
            Some(n) => Err(ValidationError::custom(format!(
                "{n:?} is a required property"
            ))),
        }
    }

    fn is_valid(&self, instance: &'i Value) -> bool {
        self.missing(instance).next().is_none()
    }

    fn iter_errors(
        &self,
        instance: &'i Value,
    ) -> Box<dyn Iterator<Item = ValidationError<'i>> + 'i> {
        let missing: Vec<ValidationError<'i>> = self
            .missing(instance)
            .map(|n| ValidationError::custom(format!("{n:?} is a required property")))
            .collect();
        Box::new(missing.into_iter())
    }
}
