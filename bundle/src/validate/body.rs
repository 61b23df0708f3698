//! Request bodies: the content types an operation declares (anything else
//! is answered 415), JSON bodies against their schema, and form bodies
//! (`application/x-www-form-urlencoded`, `multipart/form-data`) field by
//! field, each value read by its declared type as parameters are.
//!
//! Part of the request checks ([`super::Checks`]) the Runner runs before
//! a Func is invoked.

use std::borrow::Cow;
use std::sync::Arc;

use jsonschema::Validator;
use serde_json::Value;

use super::params::{schema_problems, FormFields};

/// Most fields a form body may have before it is refused unread.
pub(super) const MAX_FORM_FIELDS: usize = 1000;

/// How a body of a content type is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    Json,
    UrlEncoded,
    Multipart,
    Other,
}

/// The media type of a `Content-Type` value, lower-case, without
/// parameters.
pub(super) fn base_type(content_type: &str) -> Cow<'_, str> {
    let base = content_type.split(';').next().unwrap_or_default().trim();
    if base.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(base.to_ascii_lowercase())
    } else {
        Cow::Borrowed(base)
    }
}

/// How a body of media type `base` (see [`base_type`]) is read.
pub(super) fn kind_of(base: &str) -> Kind {
    match base {
        "application/x-www-form-urlencoded" => Kind::UrlEncoded,
        "multipart/form-data" => Kind::Multipart,
        b if b == "application/json" || b.ends_with("+json") => Kind::Json,
        _ => Kind::Other,
    }
}

/// How well media range `range` (`type/sub`, `type/*`, `*/*`) covers
/// media type `base`: 3 exactly, 2 by its type, 1 as anything, 0 not.
pub(super) fn coverage(range: &str, base: &str) -> u8 {
    if range == base {
        return 3;
    }
    if range == "*/*" || range == "*" {
        return 1;
    }
    match (range.strip_suffix("/*"), base.split_once('/')) {
        (Some(t), Some((bt, _))) if t == bt => 2,
        _ => 0,
    }
}

/// A form body's rule: its fields' shapes and the schema of the object
/// they make.
pub(super) struct Form {
    pub(super) fields: FormFields,
    pub(super) schema: Option<Validator>,
}

/// One declared content type.
pub(super) struct Media {
    /// The media range, lower-case, without parameters.
    pub(super) range: String,
    /// The schema JSON bodies are checked against.
    pub(super) schema: Option<Arc<Validator>>,
    /// The fields form bodies are checked against.
    pub(super) form: Option<Arc<Form>>,
}

/// What an operation accepts as its body.
pub(super) struct BodyRule {
    pub(super) required: bool,
    /// Whether the document lists content types; when it does not, any is
    /// accepted (and a body without one is read as JSON).
    pub(super) declared: bool,
    /// The declared content types in document order (one `*/*` entry when
    /// none are declared).
    pub(super) media: Vec<Media>,
}

impl BodyRule {
    fn best(&self, base: &str) -> Option<(&Media, u8)> {
        self.media
            .iter()
            .map(|m| (m, coverage(&m.range, base)))
            .filter(|(_, c)| *c > 0)
            .max_by_key(|(_, c)| *c)
    }

    fn accepted(&self) -> String {
        self.media
            .iter()
            .map(|m| m.range.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The body's problems; `Err` with the reason when its content type is
    /// not one the operation accepts (answered 415).
    pub(super) fn check(
        &self,
        content_type: Option<&str>,
        body: &[u8],
        problems: &mut Vec<String>,
    ) -> Result<(), String> {
        if body.is_empty() {
            if self.required {
                problems.push("request body: required but empty".to_owned());
            }
            return Ok(());
        }
        let Some(ct) = content_type else {
            // No content type: JSON if the operation takes JSON.
            return match self.best("application/json") {
                Some((m, c)) if c >= 2 || !self.declared => {
                    json(m, body, problems);
                    Ok(())
                }
                Some(_) => Ok(()),
                None => Err(format!(
                    "the request has a body but no content-type; the operation accepts {}",
                    self.accepted()
                )),
            };
        };
        let base = base_type(ct);
        let Some((media, _)) = self.best(&base) else {
            return Err(format!(
                "content-type {base:?} is not accepted; the operation accepts {}",
                self.accepted()
            ));
        };
        match kind_of(&base) {
            Kind::Json => json(media, body, problems),
            Kind::UrlEncoded => {
                if let Some(form) = &media.form {
                    let pairs: Vec<(Cow<'_, str>, Cow<'_, str>)> = form_urlencoded::parse(body)
                        .take(MAX_FORM_FIELDS + 1)
                        .collect();
                    check_form(form, &pairs, problems);
                }
            }
            Kind::Multipart => {
                if let Some(form) = &media.form {
                    match multipart_fields(ct, body) {
                        Ok(pairs) => check_form(form, &pairs, problems),
                        Err(why) => problems.push(format!("request body: {why}")),
                    }
                }
            }
            Kind::Other => {}
        }
        Ok(())
    }
}

fn json(media: &Media, body: &[u8], problems: &mut Vec<String>) {
    let Some(schema) = &media.schema else { return };
    match serde_json::from_slice::<Value>(body) {
        Err(e) => problems.push(format!("request body: not valid JSON: {e}")),
        Ok(v) => schema_problems(schema, &v, &"request body", problems),
    }
}

fn check_form<S: AsRef<str>>(form: &Form, pairs: &[(S, S)], problems: &mut Vec<String>) {
    if pairs.len() > MAX_FORM_FIELDS {
        problems.push(format!(
            "request body: more than {MAX_FORM_FIELDS} form fields"
        ));
        return;
    }
    let before = problems.len();
    let value = form.fields.object(pairs, problems);
    if problems.len() > before {
        return;
    }
    if let Some(schema) = &form.schema {
        schema_problems(schema, &value, &"request body", problems);
    }
}

/// The fields of a `multipart/form-data` body as (name, text) pairs, a
/// part that is not UTF-8 read lossily. Bounded: at most
/// [`MAX_FORM_FIELDS`] parts, and the body is already whole in memory.
fn multipart_fields(content_type: &str, body: &[u8]) -> Result<Vec<(String, String)>, String> {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let boundary = multer::parse_boundary(content_type)
        .map_err(|_| "multipart/form-data without a boundary".to_owned())?;
    // The whole body is here: every poll is ready, none waits.
    let chunk = bytes::Bytes::copy_from_slice(body);
    let stream =
        futures_util::stream::once(std::future::ready(Ok::<_, std::convert::Infallible>(chunk)));
    let constraints = multer::Constraints::new()
        .size_limit(multer::SizeLimit::new().whole_stream(body.len() as u64 + 1));
    let mut parts = multer::Multipart::with_constraints(stream, boundary, constraints);
    let mut cx = Context::from_waker(Waker::noop());
    let bad = |e: multer::Error| format!("not a valid multipart/form-data body: {e}");
    let mut out = Vec::new();
    loop {
        let field = match parts.poll_next_field(&mut cx) {
            Poll::Ready(f) => f.map_err(bad)?,
            Poll::Pending => return Err("an incomplete multipart/form-data body".to_owned()),
        };
        let Some(field) = field else { break };
        if out.len() >= MAX_FORM_FIELDS {
            return Err(format!("more than {MAX_FORM_FIELDS} form fields"));
        }
        let name = field.name().unwrap_or_default().to_owned();
        let mut data = std::pin::pin!(field.bytes());
        let data = match data.as_mut().poll(&mut cx) {
            Poll::Ready(d) => d.map_err(bad)?,
            Poll::Pending => return Err("an incomplete multipart/form-data body".to_owned()),
        };
        out.push((name, String::from_utf8_lossy(&data).into_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn media_ranges_cover_by_specificity() {
        assert_eq!(coverage("application/json", "application/json"), 3);
        assert_eq!(coverage("application/*", "application/json"), 2);
        assert_eq!(coverage("*/*", "image/png"), 1);
        assert_eq!(coverage("image/*", "application/json"), 0);
        assert_eq!(coverage("text/plain", "text/html"), 0);
        assert_eq!(
            base_type("Application/JSON; charset=utf-8"),
            "application/json"
        );
        assert_eq!(kind_of("application/problem+json"), Kind::Json);
    }

    #[test]
    fn multipart_bodies_split_into_named_fields() {
        let body: &[u8] = b"--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--XyZ\r\nContent-Disposition: form-data; name=\"f\"; filename=\"x.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n\xff\x00\r\n--XyZ--\r\n";
        let got = multipart_fields("multipart/form-data; boundary=XyZ", body).unwrap();
        assert_eq!(got[0], ("a".to_owned(), "1".to_owned()));
        assert_eq!(got[1].0, "f");
        assert!(multipart_fields("multipart/form-data", body).is_err());
        let cut = &body[..body.len() - 12];
        assert!(multipart_fields("multipart/form-data; boundary=XyZ", cut).is_err());
    }
}
