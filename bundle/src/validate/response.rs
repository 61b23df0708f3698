//! Response checks: does a Func's answer match what its operation
//! documents (status codes, content types, body schema)?
//!
//! Runner, **after the answer is published** (here): for Funcs that ask for
//! it (`check_responses`, on in `funcatron dev`), the answer is compared
//! with the operation's `responses`, and what does not match is reported
//! (the Runner's log, the Func's log, the dev page, a metric). The answer
//! itself is never changed.

use std::sync::Arc;

use jsonschema::Validator;
use serde_json::Value;

use super::body::{base_type, coverage, kind_of, Kind};
use super::params::{child, schema_problems};
use super::schema::{Direction, Schemas};
use super::{resolve, SchemaError};

/// Which statuses a `responses` entry covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Statuses {
    /// `200`.
    Code(u16),
    /// `2XX`: the hundreds digit.
    Range(u16),
    /// `default`: any not listed.
    Default,
}

impl Statuses {
    fn parse(key: &str) -> Option<Statuses> {
        if key == "default" {
            return Some(Statuses::Default);
        }
        let b = key.as_bytes();
        if b.len() == 3 && (b'1'..=b'5').contains(&b[0]) && b[1..].eq_ignore_ascii_case(b"XX") {
            return Some(Statuses::Range(u16::from(b[0] - b'0')));
        }
        key.parse::<u16>()
            .ok()
            .filter(|c| (100..=599).contains(c))
            .map(Statuses::Code)
    }

    /// How well this covers `status`: 3 exactly, 2 by range, 1 as the
    /// default, 0 not.
    fn coverage(self, status: u16) -> u8 {
        match self {
            Statuses::Code(c) if c == status => 3,
            Statuses::Range(h) if status / 100 == h => 2,
            Statuses::Default => 1,
            _ => 0,
        }
    }
}

/// One declared content type of a response.
struct Content {
    range: String,
    schema: Option<Arc<Validator>>,
}

/// One `responses` entry.
struct Documented {
    key: String,
    statuses: Statuses,
    /// `None`: the document does not describe its body.
    content: Option<Vec<Content>>,
}

/// The documented answers of one operation.
pub struct ResponseChecks {
    documented: Vec<Documented>,
}

impl std::fmt::Debug for ResponseChecks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseChecks")
            .field("statuses", &self.documented.len())
            .finish()
    }
}

/// A Func's answer, as checked.
pub struct Answer<'a, H> {
    /// Its status.
    pub status: u16,
    /// Its headers (any case).
    pub headers: &'a [(H, H)],
    /// Its body.
    pub body: &'a [u8],
}

/// What a Swagger 2.0 operation produces: its own `produces`, else the
/// document's, else JSON.
fn produces(doc: &Value, op: &Value) -> Vec<String> {
    let list = op
        .get("produces")
        .or_else(|| doc.get("produces"))
        .and_then(Value::as_array);
    match list {
        Some(l) if !l.is_empty() => l
            .iter()
            .filter_map(Value::as_str)
            .map(|s| base_type(s).into_owned())
            .collect(),
        _ => vec!["application/json".to_owned()],
    }
}

/// The response checks of the operation `op` at `pointer`, or `None` when
/// it documents no responses.
pub(super) fn compile(
    schemas: &Schemas,
    op: &Value,
    pointer: &str,
    where_: &str,
) -> Result<Option<ResponseChecks>, SchemaError> {
    let doc = schemas.doc();
    let Some(responses) = op.get("responses").and_then(Value::as_object) else {
        return Ok(None);
    };
    let swagger2 = doc.get("swagger").is_some();
    let mut documented = Vec::new();
    for (key, r) in responses {
        let Some(statuses) = Statuses::parse(key) else {
            continue;
        };
        let at = |e| SchemaError::at(format!("{where_}: responses.{key}"))(e);
        let mut base = child(&format!("{pointer}/responses"), key);
        if let Some(target) = r.get("$ref").and_then(Value::as_str) {
            base = target.trim_start_matches('#').to_owned();
        }
        let r = resolve(doc, r).map_err(at)?;
        let content = if swagger2 {
            match r.get("schema") {
                None => None,
                Some(_) => {
                    let v = Arc::new(
                        schemas
                            .at(&format!("{base}/schema"), Direction::Response)
                            .map_err(at)?,
                    );
                    Some(
                        produces(doc, op)
                            .into_iter()
                            .map(|range| Content {
                                schema: (kind_of(&range) == Kind::Json || range.contains('*'))
                                    .then(|| Arc::clone(&v)),
                                range,
                            })
                            .collect(),
                    )
                }
            }
        } else {
            match r.get("content").and_then(Value::as_object) {
                None => None,
                Some(c) if c.is_empty() => None,
                Some(c) => {
                    let mut list = Vec::new();
                    for (range, media) in c {
                        let schema = match media.get("schema") {
                            Some(_) => Some(Arc::new(
                                schemas
                                    .at(
                                        &format!(
                                            "{}/schema",
                                            child(&format!("{base}/content"), range)
                                        ),
                                        Direction::Response,
                                    )
                                    .map_err(at)?,
                            )),
                            None => None,
                        };
                        list.push(Content {
                            range: base_type(range).into_owned(),
                            schema,
                        });
                    }
                    Some(list)
                }
            }
        };
        documented.push(Documented {
            key: key.clone(),
            statuses,
            content,
        });
    }
    if documented.is_empty() {
        return Ok(None);
    }
    Ok(Some(ResponseChecks { documented }))
}

impl ResponseChecks {
    /// How `answer` differs from what the document says; empty when it
    /// matches.
    pub fn check<H: AsRef<str>>(&self, answer: &Answer<'_, H>) -> Vec<String> {
        let mut problems = Vec::new();
        let Some(doc) = self
            .documented
            .iter()
            .filter(|d| d.statuses.coverage(answer.status) > 0)
            .max_by_key(|d| d.statuses.coverage(answer.status))
        else {
            let keys: Vec<&str> = self.documented.iter().map(|d| d.key.as_str()).collect();
            problems.push(format!(
                "status {} is not documented (documented: {})",
                answer.status,
                keys.join(", ")
            ));
            return problems;
        };
        if answer.body.is_empty() {
            return problems;
        }
        // A response without `content` (`schema` in Swagger 2.0) leaves
        // the body undescribed: most documents say so for "no schema
        // given", not for "no body".
        let Some(content) = &doc.content else {
            return problems;
        };
        let ct = answer
            .headers
            .iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| base_type(v.as_ref()));
        let accepted = || {
            content
                .iter()
                .map(|c| c.range.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(ct) = ct else {
            problems.push(format!(
                "the answer has a body but no content-type (status {} documents {})",
                doc.key,
                accepted()
            ));
            return problems;
        };
        let Some(c) = content
            .iter()
            .filter(|c| coverage(&c.range, &ct) > 0)
            .max_by_key(|c| coverage(&c.range, &ct))
        else {
            problems.push(format!(
                "content-type {ct:?} is not documented for status {} (documented: {})",
                doc.key,
                accepted()
            ));
            return problems;
        };
        if let (Kind::Json, Some(schema)) = (kind_of(&ct), &c.schema) {
            match serde_json::from_slice::<Value>(answer.body) {
                Err(e) => problems.push(format!("response body: not valid JSON: {e}")),
                Ok(v) => schema_problems(schema, &v, &"response body", &mut problems),
            }
        }
        problems
    }
}
