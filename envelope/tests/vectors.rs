//! Checks every JSON test vector in `envelope/vectors/` against this crate:
//! decoding, version policy, body bytes, header repeats, re-encoding, and the
//! `Server-Timing` rendering. The Lua ingress is checked against the same files.

#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use funcatron_envelope::{encode_body, sane_request_id, Request, Response, RouteView};
use serde_json::Value;

fn vectors() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("vectors");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("vectors dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("read vector");
            let v: Value = serde_json::from_str(&text).expect("vector is JSON");
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert!(
        out.len() >= 8,
        "expected the vector set, found {}",
        out.len()
    );
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn every_vector_decodes_as_expected() {
    for (name, v) in vectors() {
        let raw = serde_json::to_vec(&v["envelope"]).unwrap();
        let expect = &v["expect"];
        let valid = expect["valid"].as_bool().unwrap();
        match v["kind"].as_str().unwrap() {
            "request" => {
                let decoded = Request::decode(&raw);
                let view = RouteView::decode(&raw);
                if !valid {
                    let err = decoded.expect_err(&name);
                    assert_eq!(err.kind(), expect["error"].as_str().unwrap(), "{name}");
                    assert_eq!(view.expect_err(&name).kind(), err.kind(), "{name}");
                    continue;
                }
                let req = decoded.unwrap_or_else(|e| panic!("{name}: {e}"));
                let view = view.unwrap_or_else(|e| panic!("{name}: {e}"));
                assert_eq!(view.id, req.id, "{name}");
                assert_eq!(view.path, req.path, "{name}");
                assert_eq!(view.reply_to, req.reply_to, "{name}");
                assert_eq!(view.is_async, req.is_async, "{name}");
                if let Some(a) = expect.get("async").and_then(Value::as_bool) {
                    assert_eq!(req.is_async, a, "{name}");
                }
                if let Some(n) = expect.get("attempt").and_then(Value::as_u64) {
                    assert_eq!(req.attempt, Some(n as u32), "{name}");
                }
                assert_eq!(
                    hex(&req.body_bytes().unwrap()),
                    expect["body_hex"].as_str().unwrap(),
                    "{name}"
                );
                if let Some(hv) = expect.get("header_values").and_then(Value::as_object) {
                    for (h, want) in hv {
                        let got: Vec<&str> = req.header_values(h).collect();
                        let want: Vec<&str> = want
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|x| x.as_str().unwrap())
                            .collect();
                        assert_eq!(got, want, "{name}: header {h}");
                    }
                }
                // Encoding what we decoded gives the same envelope back.
                let encoded = req.encode();
                let again = Request::decode(&encoded).unwrap();
                assert_eq!(again, req, "{name}");
                if v["canonical"].as_bool().unwrap() {
                    let reencoded: Value = serde_json::from_slice(&req.encode()).unwrap();
                    assert_eq!(reencoded, v["envelope"], "{name}: canonical form");
                    // The body encoding rule picks the same representation.
                    let bytes = req.body_bytes().unwrap();
                    let (body, b64) = encode_body(&bytes);
                    assert_eq!(
                        (body.as_ref(), b64),
                        (req.body.as_ref(), req.body_base64),
                        "{name}"
                    );
                }
            }
            "response" => {
                let resp = Response::decode(&raw).unwrap_or_else(|e| panic!("{name}: {e}"));
                if let Some(want) = expect["body_hex"].as_str() {
                    assert_eq!(hex(&resp.body_bytes().unwrap()), want, "{name}");
                }
                if let Some(st) = expect.get("server_timing").and_then(Value::as_str) {
                    let total = expect["server_timing_total_ms"].as_f64().unwrap();
                    assert_eq!(resp.timings.server_timing(total), st, "{name}");
                }
                let reencoded: Value = serde_json::from_slice(&resp.encode()).unwrap();
                assert_eq!(reencoded, v["envelope"], "{name}: canonical form");
            }
            other => panic!("{name}: unknown kind {other}"),
        }
    }
}

#[test]
fn error_responses_carry_json_reason_and_id() {
    let r = Response::error("abc", 404, "no_route", "nothing here");
    let body: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(body["error"], "no_route");
    assert_eq!(body["request_id"], "abc");
    assert_eq!(r.status, 404);
    let encoded = r.encode();
    let again = Response::decode(&encoded).unwrap();
    assert_eq!(again, r);
}

#[test]
fn request_id_sanity() {
    assert!(sane_request_id("abc-123_X.y:z"));
    assert!(!sane_request_id(""));
    assert!(!sane_request_id("has space"));
    assert!(!sane_request_id("new\nline"));
    assert!(!sane_request_id(&"a".repeat(129)));
    assert!(sane_request_id(&"a".repeat(128)));
}

#[test]
fn escaped_strings_decode_owned() {
    // A header value with an escape cannot be borrowed; it must still decode.
    let raw = br#"{"version":"1.0","id":"x","deadline_ms":1,"method":"GET","path":"/a\/b","headers":[["x","q\"uote"]]}"#;
    let r = Request::decode(raw).unwrap();
    assert_eq!(r.path, "/a/b");
    assert_eq!(r.headers[0].1, "q\"uote");
}
