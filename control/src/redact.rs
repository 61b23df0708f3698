//! Redaction of captured request/response pairs.
//!
//! Runner -> **redaction** -> capture topic -> Tron -> **redaction again**
//! -> `<store>/captures/<func>.jsonl`. A Runner redacts a pair before it
//! broadcasts it; the Tron redacts the record once more before it stores
//! it (a Runner of an older release, or one that missed a change of the
//! lists, cannot leave a credential in a capture file). What is redacted is
//! the running [`Capture`]'s lists: header names, query parameter names and
//! JSON body field names (any case; JSON fields at any depth). Values are
//! replaced by [`REDACTED`]; names stay, so a replay shows what was there.

use serde_json::Value;

use crate::state::Capture;

/// What a redacted value reads.
pub const REDACTED: &str = "[redacted]";

/// Is `name` (raw, percent-encoded) one of `names`, in any case?
fn named(name: &str, names: &[String]) -> bool {
    let decoded = percent_decode(name);
    names.iter().any(|n| n.eq_ignore_ascii_case(&decoded))
}

/// `+` as a space and `%XX` as its byte; a malformed escape stays as is.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `query` (raw, without `?`) with the values of the parameters named in
/// `names` replaced; `None` when none is there.
pub fn query(query: &str, names: &[String]) -> Option<String> {
    if names.is_empty() || query.is_empty() {
        return None;
    }
    let mut changed = false;
    let parts: Vec<String> = query
        .split('&')
        .map(|part| {
            let name = part.split('=').next().unwrap_or(part);
            if named(name, names) {
                changed = true;
                format!("{name}={REDACTED}")
            } else {
                part.to_owned()
            }
        })
        .collect();
    changed.then(|| parts.join("&"))
}

/// Replace, at any depth, the values of fields named in `fields`. Returns
/// whether anything changed.
fn json_value(v: &mut Value, fields: &[String]) -> bool {
    let mut changed = false;
    match v {
        Value::Object(m) => {
            for (k, field) in m.iter_mut() {
                if fields.iter().any(|f| f.eq_ignore_ascii_case(k)) {
                    if *field != Value::String(REDACTED.into()) {
                        *field = Value::String(REDACTED.into());
                        changed = true;
                    }
                } else {
                    changed |= json_value(field, fields);
                }
            }
        }
        Value::Array(a) => {
            for item in a {
                changed |= json_value(item, fields);
            }
        }
        _ => {}
    }
    changed
}

/// `body`, when it is a JSON object or array, with the values of fields
/// named in `fields` (at any depth) replaced; `None` when it is not JSON
/// or none is there.
pub fn json_body(body: &str, fields: &[String]) -> Option<String> {
    let t = body.trim_start();
    if fields.is_empty() || !(t.starts_with('{') || t.starts_with('[')) {
        return None;
    }
    let mut v: Value = serde_json::from_str(body).ok()?;
    if !json_value(&mut v, fields) {
        return None;
    }
    serde_json::to_string(&v).ok()
}

/// Redact one side (`request` or `response`) of a record in place.
fn side(v: &mut Value, capture: &Capture, with_query: bool) -> bool {
    let mut changed = false;
    if let Some(headers) = v.get_mut("headers").and_then(Value::as_array_mut) {
        for h in headers {
            let Some([name, value]) = h.as_array_mut().map(|a| a.as_mut_slice()) else {
                continue;
            };
            let hit = name
                .as_str()
                .is_some_and(|n| capture.redact.iter().any(|r| r.eq_ignore_ascii_case(n)));
            if hit && value.as_str() != Some(REDACTED) {
                *value = Value::String(REDACTED.into());
                changed = true;
            }
        }
    }
    if with_query {
        let redacted = v
            .get("query")
            .and_then(Value::as_str)
            .and_then(|q| query(q, &capture.redact_query));
        if let Some(q) = redacted {
            v["query"] = Value::String(q);
            changed = true;
        }
    }
    let base64 = v.get("body_base64").and_then(Value::as_bool) == Some(true);
    let redacted = v
        .get("body")
        .and_then(Value::as_str)
        .filter(|_| !base64)
        .and_then(|b| json_body(b, &capture.redact_json_fields));
    if let Some(b) = redacted {
        v["body"] = Value::String(b);
        changed = true;
    }
    changed
}

/// A capture record (one JSON line, `{"request": ..., "response": ...}`)
/// redacted per `capture`; `None` when it is not such a record or nothing
/// needed redacting.
pub fn record(record: &[u8], capture: &Capture) -> Option<Vec<u8>> {
    let mut v: Value = serde_json::from_slice(record).ok()?;
    let mut changed = false;
    if let Some(r) = v.get_mut("request") {
        changed |= side(r, capture, true);
    }
    if let Some(r) = v.get_mut("response") {
        changed |= side(r, capture, false);
    }
    if !changed {
        return None;
    }
    serde_json::to_vec(&v).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: &[&str]) -> Vec<String> {
        n.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn query_parameters_are_redacted_by_name_in_any_case_and_encoding() {
        let n = names(&["token", "api_key"]);
        assert_eq!(
            query("a=1&TOKEN=abc&api%5Fkey=k&b", &n).as_deref(),
            Some("a=1&TOKEN=[redacted]&api%5Fkey=[redacted]&b")
        );
        assert_eq!(query("a=1&tokens=x", &n), None);
        assert_eq!(query("a=%", &n), None);
    }

    #[test]
    fn json_fields_are_redacted_at_any_depth() {
        let n = names(&["password"]);
        let out = json_body(
            r#"{"user":"u","nested":[{"Password":"x"}],"password":"y"}"#,
            &n,
        )
        .unwrap();
        assert!(!out.contains("\"x\"") && !out.contains("\"y\""), "{out}");
        assert!(out.contains("\"user\":\"u\""), "{out}");
        assert_eq!(json_body("password=x", &n), None);
        assert_eq!(json_body(r#"{"a":1}"#, &n), None);
    }
}
