//! Parameters (path, query, header) and form fields: strings on the wire,
//! coerced by their declared type, then checked against their schema.
//!
//! Part of the request checks ([`super::Checks`]) the Runner runs before
//! a Func is invoked.

use std::borrow::Cow;

use jsonschema::Validator;
use serde_json::{Map, Value};

use super::schema::{escape, Direction, Schemas};
use super::{resolve, SchemaError};

/// Where a parameter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Location {
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
pub(super) enum Collection {
    Csv,
    Ssv,
    Tsv,
    Pipes,
    /// One value per occurrence (`?a=1&a=2`).
    Multi,
}

/// A wire type a string can be read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Prim {
    Integer,
    Number,
    Boolean,
    String,
    /// `type: object`: a JSON object (a multipart part's default); not
    /// read from parameters (their object styles are not rebuilt).
    Object,
}

/// How a string value becomes the JSON value its schema checks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Shape {
    /// The declared types in order (`null` left out); empty: a string.
    types: Vec<Prim>,
    /// `type: array` (or an array among the types).
    array: bool,
    /// The items' types.
    items: Vec<Prim>,
    pub(super) collection: Collection,
}

fn prims(schema: &Value) -> (Vec<Prim>, bool) {
    let names: Vec<&str> = match schema.get("type") {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let mut array = false;
    let types = names
        .into_iter()
        .filter_map(|n| match n {
            "integer" => Some(Prim::Integer),
            "number" => Some(Prim::Number),
            "boolean" => Some(Prim::Boolean),
            "string" | "file" => Some(Prim::String),
            "object" => Some(Prim::Object),
            "array" => {
                array = true;
                None
            }
            _ => None,
        })
        .collect();
    (types, array)
}

impl Shape {
    /// The shape `schema` declares (its `$ref`s resolved in `doc`).
    pub(super) fn of(
        doc: &Value,
        schema: &Value,
        collection: Collection,
    ) -> Result<Shape, SchemaError> {
        let schema = resolve(doc, schema)?;
        let (types, array) = prims(schema);
        let items = match schema.get("items") {
            Some(i) => prims(resolve(doc, i)?).0,
            None => vec![],
        };
        Ok(Shape {
            types,
            array,
            items,
            collection,
        })
    }

    /// Whether the value is not read from strings at all (objects).
    pub(super) fn unread(&self) -> bool {
        !self.array && self.types.contains(&Prim::Object)
    }

    /// The JSON value of the occurrences `raw` of one parameter or field.
    pub(super) fn read<S: AsRef<str>>(&self, raw: &[S]) -> Result<Value, CoerceError> {
        if !self.array {
            return coerce(raw.first().map_or("", AsRef::as_ref), &self.types);
        }
        let sep = match self.collection {
            Collection::Multi => None,
            Collection::Ssv => Some(' '),
            Collection::Tsv => Some('\t'),
            Collection::Pipes => Some('|'),
            Collection::Csv => Some(','),
        };
        let mut out = Vec::new();
        for r in raw {
            let r = r.as_ref();
            match sep {
                None => out.push(coerce(r, &self.items)?),
                Some(_) if r.is_empty() => {}
                Some(c) => {
                    for part in r.split(c) {
                        out.push(coerce(part, &self.items)?);
                    }
                }
            }
        }
        Ok(Value::Array(out))
    }
}

/// A value that is not of its declared type.
#[derive(Debug, thiserror::Error)]
pub(super) enum CoerceError {
    #[error("{0:?} is not an integer")]
    Integer(String),
    #[error("{0:?} is not a number")]
    Number(String),
    #[error("{0:?} is not a boolean (true or false)")]
    Boolean(String),
    #[error("{0:?} is not a JSON object")]
    Object(String),
}

/// A string from the wire as the first of `types` it reads as.
fn coerce(raw: &str, types: &[Prim]) -> Result<Value, CoerceError> {
    let mut first_err = None;
    for t in types {
        let got = match t {
            Prim::Integer => {
                let s = raw.trim();
                s.parse::<i64>()
                    .map(Value::from)
                    .or_else(|_| s.parse::<u64>().map(Value::from))
                    .map_err(|_| CoerceError::Integer(raw.to_owned()))
            }
            Prim::Number => raw
                .trim()
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number)
                .ok_or_else(|| CoerceError::Number(raw.to_owned())),
            Prim::Boolean => match raw {
                "true" => Ok(Value::Bool(true)),
                "false" => Ok(Value::Bool(false)),
                _ => Err(CoerceError::Boolean(raw.to_owned())),
            },
            Prim::Object => serde_json::from_str::<Value>(raw)
                .ok()
                .filter(Value::is_object)
                .ok_or_else(|| CoerceError::Object(raw.chars().take(40).collect())),
            Prim::String => return Ok(Value::String(raw.to_owned())),
        };
        match got {
            Ok(v) => return Ok(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(Value::String(raw.to_owned())),
    }
}

/// One parameter's rule.
pub(super) struct ParamRule {
    pub(super) name: String,
    pub(super) location: Location,
    required: bool,
    shape: Shape,
    schema: Option<Validator>,
}

/// Swagger 2.0 keeps a parameter's schema on the parameter itself.
pub(super) const PARAM_SCHEMA_KEYS: &[&str] = &[
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
    "x-nullable",
];

/// A Swagger 2.0 parameter's own schema fields as a schema.
pub(super) fn swagger2_schema(p: &Value) -> Value {
    let mut m: Map<String, Value> = PARAM_SCHEMA_KEYS
        .iter()
        .filter_map(|k| p.get(*k).map(|v| ((*k).to_owned(), v.clone())))
        .collect();
    // `file` is not a JSON type: any content will do.
    if m.get("type").and_then(Value::as_str) == Some("file") {
        m.clear();
    }
    Value::Object(m)
}

/// The collection format a parameter declares (Swagger 2.0
/// `collectionFormat`, OpenAPI 3 `style` + `explode`).
pub(super) fn collection_of(p: &Value, openapi3_query: bool) -> Collection {
    match p.get("collectionFormat").and_then(Value::as_str) {
        Some("ssv") => Collection::Ssv,
        Some("tsv") => Collection::Tsv,
        Some("pipes") => Collection::Pipes,
        Some("multi") => Collection::Multi,
        Some(_) => Collection::Csv,
        // OpenAPI 3 defaults: query (and form fields) `form` + explode
        // (one per occurrence); path and header `simple` (comma-separated).
        None if openapi3_query => match (
            p.get("style").and_then(Value::as_str),
            p.get("explode").and_then(Value::as_bool),
        ) {
            (Some("spaceDelimited"), _) => Collection::Ssv,
            (Some("pipeDelimited"), _) => Collection::Pipes,
            (_, Some(false)) => Collection::Csv,
            _ => Collection::Multi,
        },
        None => Collection::Csv,
    }
}

/// The rule of parameter `p` (at `pointer` in the document), or `None` for
/// one checked elsewhere (`body`, `formData`) or not at all (`cookie`).
pub(super) fn param_rule(
    schemas: &Schemas,
    p: &Value,
    pointer: &str,
    where_: &str,
) -> Result<Option<ParamRule>, SchemaError> {
    let doc = schemas.doc();
    // A `$ref`'d parameter: its schema is where the reference points.
    let (p, pointer) = match p.get("$ref").and_then(Value::as_str) {
        Some(r) => (resolve(doc, p)?, r.trim_start_matches('#').to_owned()),
        None => (p, pointer.to_owned()),
    };
    let name = p
        .get("name")
        .and_then(Value::as_str)
        .ok_or_else(|| SchemaError::NoName(where_.to_owned()))?;
    let location = match p.get("in").and_then(Value::as_str) {
        Some("path") => Location::Path,
        Some("query") => Location::Query,
        Some("header") => Location::Header,
        _ => return Ok(None),
    };
    let required =
        location == Location::Path || p.get("required").and_then(Value::as_bool).unwrap_or(false);
    let at = |e| SchemaError::at(format!("{where_}: parameter `{name}`"))(e);
    let openapi3 = p.get("schema").is_some() || p.get("content").is_some();
    let collection = collection_of(p, openapi3 && location == Location::Query);
    let (shape, schema) = if let Some(s) = p.get("schema") {
        let shape = Shape::of(doc, s, collection).map_err(at)?;
        let v = schemas
            .at(&format!("{pointer}/schema"), Direction::Request)
            .map_err(at)?;
        (shape, Some(v))
    } else if p.get("content").is_some() {
        // A parameter with `content` (JSON in a query string): present or not.
        let shape = Shape {
            types: vec![Prim::Object],
            array: false,
            items: vec![],
            collection,
        };
        (shape, None)
    } else {
        let s = swagger2_schema(p);
        let shape = Shape::of(doc, &s, collection).map_err(at)?;
        let has_constraints = s.as_object().is_some_and(|m| !m.is_empty());
        let v = if has_constraints {
            Some(schemas.value(&s, Direction::Request).map_err(at)?)
        } else {
            None
        };
        (shape, v)
    };
    Ok(Some(ParamRule {
        name: name.to_owned(),
        location,
        required,
        shape,
        schema,
    }))
}

/// Problems with `value` against `schema`, each prefixed with `label`.
pub(super) fn schema_problems(
    schema: &Validator,
    value: &Value,
    label: &dyn std::fmt::Display,
    out: &mut Vec<String>,
) {
    if schema.is_valid(value) {
        return;
    }
    for e in schema.iter_errors(value) {
        let at = e.instance_path().to_string();
        out.push(format!("{label}{at}: {e}"));
    }
}

struct Label<'a>(Location, &'a str);

impl std::fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} parameter `{}`", self.0.as_str(), self.1)
    }
}

/// What a request offers to parameter rules.
pub(super) struct Values<'a, H> {
    pub(super) params: &'a [(String, String)],
    pub(super) query: &'a [(Cow<'a, str>, Cow<'a, str>)],
    pub(super) headers: &'a [(H, H)],
}

impl ParamRule {
    /// The occurrences of this parameter in the request.
    fn raw<'v, H: AsRef<str>>(&self, v: &'v Values<'v, H>) -> Vec<&'v str> {
        match self.location {
            Location::Path => v
                .params
                .iter()
                .filter(|(k, _)| *k == self.name)
                .map(|(_, v)| v.as_str())
                .collect(),
            Location::Query => v
                .query
                .iter()
                .filter(|(k, _)| *k == self.name)
                .map(|(_, v)| v.as_ref())
                .collect(),
            Location::Header => v
                .headers
                .iter()
                .filter(|(k, _)| k.as_ref().eq_ignore_ascii_case(&self.name))
                .map(|(_, v)| v.as_ref())
                .collect(),
        }
    }

    /// The first occurrence of this parameter in the request.
    fn first<'v, H: AsRef<str>>(&self, v: &'v Values<'v, H>) -> Option<&'v str> {
        match self.location {
            Location::Path => v
                .params
                .iter()
                .find(|(k, _)| *k == self.name)
                .map(|(_, v)| v.as_str()),
            Location::Query => v
                .query
                .iter()
                .find(|(k, _)| *k == self.name)
                .map(|(_, v)| v.as_ref()),
            Location::Header => v
                .headers
                .iter()
                .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(&self.name))
                .map(|(_, v)| v.as_ref()),
        }
    }

    /// This parameter's problems in the request.
    pub(super) fn check<H: AsRef<str>>(&self, v: &Values<'_, H>, problems: &mut Vec<String>) {
        // A single value needs no list of them.
        let one;
        let many;
        let raw: &[&str] = if self.shape.array {
            many = self.raw(v);
            &many
        } else {
            one = self.first(v);
            one.as_slice()
        };
        let label = Label(self.location, &self.name);
        if raw.is_empty() {
            if self.required {
                problems.push(format!("{label}: required but missing"));
            }
            return;
        }
        if self.shape.unread() {
            return;
        }
        match self.shape.read(raw) {
            Err(why) => problems.push(format!("{label}: {why}")),
            Ok(value) => {
                if let Some(schema) = &self.schema {
                    schema_problems(schema, &value, &label, problems);
                }
            }
        }
    }
}

/// The form fields a form body declares: their shapes by name.
pub(super) struct FormFields {
    pub(super) fields: Vec<(String, Shape)>,
}

impl FormFields {
    /// The fields of an OpenAPI 3 form schema (its `properties`).
    pub(super) fn of_schema(doc: &Value, schema: &Value) -> Result<FormFields, SchemaError> {
        let schema = resolve(doc, schema)?;
        let mut fields = Vec::new();
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (name, s) in props {
                fields.push((name.clone(), Shape::of(doc, s, Collection::Multi)?));
            }
        }
        Ok(FormFields { fields })
    }

    /// The object of `pairs` (name, value in order), each value read by
    /// its field's shape; undeclared fields as strings.
    pub(super) fn object<S: AsRef<str>>(
        &self,
        pairs: &[(S, S)],
        problems: &mut Vec<String>,
    ) -> Value {
        let mut out = Map::new();
        for (name, shape) in &self.fields {
            let raw: Vec<&str> = pairs
                .iter()
                .filter(|(k, _)| k.as_ref() == name)
                .map(|(_, v)| v.as_ref())
                .collect();
            if raw.is_empty() {
                continue;
            }
            match shape.read(&raw) {
                Ok(v) => {
                    out.insert(name.clone(), v);
                }
                Err(why) => problems.push(format!("request body: field `{name}`: {why}")),
            }
        }
        for (k, v) in pairs {
            let k = k.as_ref();
            if !out.contains_key(k) && !self.fields.iter().any(|(n, _)| n == k) {
                out.insert(k.to_owned(), Value::String(v.as_ref().to_owned()));
            }
        }
        Value::Object(out)
    }
}

/// The JSON pointer of `token` under `base`.
pub(super) fn child(base: &str, token: &str) -> String {
    format!("{base}/{}", escape(token))
}
