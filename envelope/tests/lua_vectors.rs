//! The nginx ingress's pure-Lua envelope codec (`ingress-lua/lib/funcatron/
//! envelope.lua`) checked against the same vectors as the Rust codec, run in
//! Lua 5.4 through mlua (the module is written for LuaJIT and 5.4 alike).
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use base64::Engine as _;
use funcatron_envelope::{Request, Response};
use mlua::{Function, Lua, LuaSerdeExt, Table, Value as LuaValue};
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn load() -> (Lua, Table) {
    let lua = Lua::new();
    let src =
        std::fs::read_to_string(repo().join("ingress-lua/lib/funcatron/envelope.lua")).unwrap();
    let m: Table = lua.load(&src).set_name("@envelope.lua").eval().unwrap();
    let decode = lua
        .create_function(|lua, s: mlua::LuaString| {
            let v: Value = serde_json::from_slice(&s.as_bytes()).map_err(mlua::Error::external)?;
            lua.to_value(&v)
        })
        .unwrap();
    m.set("json_decode", decode).unwrap();
    (lua, m)
}

fn vectors() -> Vec<(String, Value)> {
    let dir = repo().join("envelope/vectors");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| {
            let v = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
            (p.file_name().unwrap().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn lua_encodes_every_canonical_request_vector_identically() {
    let (lua, m) = load();
    let encode: Function = m.get("encode_request").unwrap();
    let mut checked = 0;
    for (name, v) in vectors() {
        if v["kind"] != "request" || v["canonical"] != true {
            continue;
        }
        let env = &v["envelope"];
        let raw = serde_json::to_vec(env).unwrap();
        let decoded = Request::decode(&raw).unwrap();
        let body = decoded.body_bytes().unwrap();
        let t = lua.create_table().unwrap();
        for f in [
            "id",
            "method",
            "scheme",
            "host",
            "path",
            "query",
            "remote",
            "reply_to",
            "reply_key",
            "call_id",
            "callback_url",
        ] {
            if let Some(s) = env.get(f).and_then(Value::as_str) {
                t.set(f, s).unwrap();
            }
        }
        if env.get("async") == Some(&Value::Bool(true)) {
            t.set("async", true).unwrap();
        }
        for f in ["attempt", "max_attempts", "delay_ms", "submitted_ms"] {
            if let Some(n) = env.get(f).and_then(Value::as_u64) {
                t.set(f, n).unwrap();
            }
        }
        t.set("deadline_ms", env["deadline_ms"].as_f64().unwrap())
            .unwrap();
        t.set("sent_ms", env["sent_ms"].as_f64().unwrap()).unwrap();
        t.set("body", lua.create_string(&*body).unwrap()).unwrap();
        let hs = lua.create_table().unwrap();
        for (i, h) in env["headers"].as_array().unwrap().iter().enumerate() {
            let pair = lua
                .create_sequence_from([h[0].as_str().unwrap(), h[1].as_str().unwrap()])
                .unwrap();
            hs.set(i + 1, pair).unwrap();
        }
        t.set("headers", hs).unwrap();
        let text: String = encode.call(t).unwrap();
        let got: Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}: {text}"));
        assert_eq!(&got, env, "{name}: Lua encoding differs");
        assert_eq!(Request::decode(text.as_bytes()).unwrap(), decoded, "{name}");
        checked += 1;
    }
    assert!(checked >= 4);
}

#[test]
fn lua_decodes_every_response_vector() {
    let (lua, m) = load();
    let decode: Function = m.get("decode_response").unwrap();
    let timing: Function = m.get("server_timing").unwrap();
    for (name, v) in vectors() {
        if v["kind"] != "response" {
            continue;
        }
        let text = serde_json::to_string(&v["envelope"]).unwrap();
        let r: Table = decode.call(lua.create_string(&text).unwrap()).unwrap();
        let rust = Response::decode(text.as_bytes()).unwrap();
        assert_eq!(r.get::<u16>("status").unwrap(), rust.status, "{name}");
        assert_eq!(r.get::<String>("id").unwrap(), rust.id, "{name}");
        assert_eq!(
            r.get::<Option<String>>("reply_key").unwrap().as_deref(),
            rust.reply_key.as_deref(),
            "{name}"
        );
        assert_eq!(
            r.get::<Option<String>>("call_id").unwrap().as_deref(),
            rust.call_id.as_deref(),
            "{name}"
        );
        assert_eq!(
            r.get::<Option<u32>>("attempt").unwrap(),
            rust.attempt,
            "{name}"
        );
        let body: mlua::LuaString = r.get("body").unwrap();
        assert_eq!(
            hex(&body.as_bytes()),
            hex(&rust.body_bytes().unwrap()),
            "{name}"
        );
        let headers: Table = r.get("headers").unwrap();
        assert_eq!(headers.raw_len(), rust.headers.len(), "{name}");
        if let Some(st) = v["expect"].get("server_timing").and_then(Value::as_str) {
            let total = v["expect"]["server_timing_total_ms"].as_f64().unwrap();
            let got: String = timing
                .call((r.get::<Table>("timings").unwrap(), total))
                .unwrap();
            assert_eq!(got, st, "{name}");
        }
    }
    // Foreign major versions and garbage are refused with a reason.
    for (text, needle) in [
        (
            r#"{"version":"2.0","id":"x","status":200}"#,
            "unsupported envelope version",
        ),
        ("not json", "malformed"),
        (
            r#"{"version":"1.0","id":"x","status":200,"body":"%%%","body_base64":true}"#,
            "base64",
        ),
    ] {
        let (ok, why): (LuaValue, String) = decode.call(text).unwrap();
        assert!(ok.is_nil());
        assert!(why.contains(needle), "{text}: {why}");
    }
}

/// A small deterministic generator, so failures reproduce.
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u8 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 56) as u8
    }
}

#[test]
fn lua_utf8_and_base64_agree_with_rust_on_random_bytes() {
    let (lua, m) = load();
    let valid: Function = m.get("valid_utf8").unwrap();
    let enc: Function = m.get("b64encode").unwrap();
    let dec: Function = m.get("b64decode").unwrap();
    let mut rng = Lcg(7);
    let samples = ["héllo", "日本語", "\u{10FFFF}", "😀 ok"];
    for i in 0..3000 {
        let len = (rng.next() % 12) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next()).collect();
        if i % 3 == 0 {
            // Mostly-valid strings with one byte flipped find the edge cases.
            bytes = samples[i % samples.len()].as_bytes().to_vec();
            let at = rng.next() as usize % bytes.len();
            bytes[at] = rng.next();
        }
        let s = lua.create_string(&bytes).unwrap();
        let lua_ok: bool = valid.call(s.clone()).unwrap();
        assert_eq!(lua_ok, std::str::from_utf8(&bytes).is_ok(), "{bytes:?}");
        let e: String = enc.call(s).unwrap();
        assert_eq!(e, base64::engine::general_purpose::STANDARD.encode(&bytes));
        let d: mlua::LuaString = dec.call(e).unwrap();
        assert_eq!(d.as_bytes().as_ref(), bytes.as_slice());
    }
    // Surrogates and overlongs are not UTF-8.
    for bad in [
        &b"\xed\xa0\x80"[..],
        b"\xc0\xaf",
        b"\xf4\x90\x80\x80",
        b"\xe0\x80\xaf",
    ] {
        let lua_ok: bool = valid.call(lua.create_string(bad).unwrap()).unwrap();
        assert!(!lua_ok, "{bad:?}");
    }
}

#[test]
fn lua_request_id_rule_matches_rust() {
    let (_lua, m) = load();
    let sane: Function = m.get("sane_request_id").unwrap();
    for id in [
        "abc-123_X.y:z",
        "",
        "has space",
        "new\nline",
        &"a".repeat(128),
        &"a".repeat(129),
        "ünï",
        "a/b",
    ] {
        let got: bool = sane.call(id).unwrap();
        assert_eq!(got, funcatron_envelope::sane_request_id(id), "{id:?}");
    }
}
