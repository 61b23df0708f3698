//! The Lua runtime in isolation: sandbox, limits, state reuse, result shapes.

#![allow(clippy::unwrap_used)]

use std::borrow::Cow;
use std::path::Path;
use std::time::Duration;

use funcatron_bundle::Bundle;
use funcatron_envelope::{encode_body, now_ms, Request, Response, VERSION};
use funcatron_runner::invoke::{decode, finish, start, Handled, Job};
use funcatron_runner::lua::{LuaFunc, LuaLimits};

fn bundle(dir: &Path, ops: &[&str], lua: &str) -> Bundle {
    let mut doc =
        String::from("swagger: '2.0'\nx-funcatron: {runtime: lua, timeout_ms: 200}\npaths:\n");
    for op in ops {
        doc.push_str(&format!("  /{op}:\n    post: {{operationId: {op}}}\n"));
    }
    std::fs::write(dir.join("swagger.yaml"), doc).unwrap();
    std::fs::write(dir.join("main.lua"), lua).unwrap();
    Bundle::load(dir).unwrap()
}

fn limits() -> LuaLimits {
    LuaLimits {
        timeout: Duration::from_secs(5),
        memory_bytes: 8 * 1024 * 1024,
    }
}

fn job(op: &str, body: &[u8], content_type: &str) -> Job {
    let (b, b64) = encode_body(body);
    let req = Request {
        version: Cow::Borrowed(VERSION),
        id: Cow::Borrowed("t-1"),
        deadline_ms: (now_ms() + 10_000.0) as u64,
        sent_ms: now_ms(),
        method: Cow::Borrowed("POST"),
        scheme: Cow::Borrowed("http"),
        host: Cow::Borrowed("localhost"),
        path: Cow::Owned(format!("/{op}")),
        query: Cow::Borrowed(""),
        headers: vec![(
            Cow::Borrowed("content-type"),
            Cow::Owned(content_type.to_owned()),
        )],
        remote: None,
        body: b,
        body_base64: b64,
        reply_to: Some(Cow::Borrowed("r")),
        reply_key: None,
    };
    Job {
        payload: req.encode().into(),
        operation: op.into(),
        params: vec![],
        picked_ms: now_ms(),
        dispatched_ms: None,
        checks: None,
        observer: funcatron_runner::observe::Observer::detached(),
    }
}

/// Run one call; return (status, content-type, body bytes).
fn call(f: &LuaFunc, op: &str, body: &[u8], ct: &str) -> (u16, String, Vec<u8>) {
    let job = job(op, body, ct);
    let (req, body) = decode(&job).unwrap();
    let fr = start("t", &req, body, &job, 200).unwrap();
    let started = std::time::Instant::now();
    match finish("t", &job, &req, started, f.call(&fr)) {
        Handled::Reply { response, .. } => {
            let r = Response::decode(&response).unwrap();
            let ct = r
                .headers
                .iter()
                .find(|(k, _)| k == "content-type")
                .map(|(_, v)| v.to_string())
                .unwrap_or_default();
            (r.status, ct, r.body_bytes().unwrap().into_owned())
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn sandbox_has_no_io_os_debug_or_load() {
    let dir = tempfile::tempdir().unwrap();
    let f = LuaFunc::prepare(
        &bundle(
            dir.path(),
            &["probe"],
            "return { probe = function() return { io = type(io), os = type(os), debug = type(debug), load = type(load), \
             loadfile = type(loadfile), dofile = type(dofile), package = type(package), dump = type(string.dump), \
             string = type(string), json = type(json) } end }",
        ),
        limits(),
    )
    .unwrap();
    let (status, ct, body) = call(&f, "probe", b"", "text/plain");
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    for lib in [
        "io", "os", "debug", "load", "loadfile", "dofile", "package", "dump",
    ] {
        assert_eq!(v[lib], "nil", "{lib} must not be reachable");
    }
    assert_eq!(v["string"], "table");
    assert_eq!(v["json"], "table");
}

#[test]
fn require_stays_inside_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("lib")).unwrap();
    std::fs::write(
        dir.path().join("lib/util.lua"),
        "return { twice = function(s) return s .. s end }",
    )
    .unwrap();
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret.lua"), "return 'leaked'").unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(
        outside.path().join("secret.lua"),
        dir.path().join("link.lua"),
    )
    .unwrap();
    let f = LuaFunc::prepare(
        &bundle(
            dir.path(),
            &["ok", "escape", "link"],
            "local u = require('lib.util')\nreturn { ok = function(r) return u.twice(r.body) end,\n\
             escape = function() return require('../secret') end,\n link = function() return require('link') end }",
        ),
        limits(),
    )
    .unwrap();
    assert_eq!(call(&f, "ok", b"ab", "text/plain").2, b"abab");
    let (status, _, body) = call(&f, "escape", b"", "text/plain");
    assert_eq!(status, 500);
    assert!(
        String::from_utf8_lossy(&body).contains("module names"),
        "{}",
        String::from_utf8_lossy(&body)
    );
    let (status, _, body) = call(&f, "link", b"", "text/plain");
    assert_eq!(status, 500);
    assert!(String::from_utf8_lossy(&body).contains("outside the bundle"));
}

#[test]
fn state_is_prepared_once_and_reused() {
    let dir = tempfile::tempdir().unwrap();
    let f = LuaFunc::prepare(
        &bundle(
            dir.path(),
            &["count"],
            "local n = 0\nreturn { count = function() n = n + 1 return tostring(n) end }",
        ),
        limits(),
    )
    .unwrap();
    for expect in ["1", "2", "3"] {
        assert_eq!(call(&f, "count", b"", "text/plain").2, expect.as_bytes());
    }
}

#[test]
fn result_shapes_map_to_responses() {
    let dir = tempfile::tempdir().unwrap();
    let f = LuaFunc::prepare(
        &bundle(
            dir.path(),
            &["nothing", "text", "data", "full", "bytes", "badstatus", "jsonin", "looksalike"],
            "return {\n nothing = function() return nil end,\n text = function() return 'plain' end,\n\
             data = function() return { a = 1, list = {1, 2} } end,\n\
             full = function() return { status = 418, headers = { ['X-A'] = 'b', ['set-cookie'] = {'c=1', 'd=2'} }, body = { ok = true } } end,\n\
             bytes = function() return { status = 200, headers = { ['content-type'] = 'application/octet-stream' }, body = '\\0\\255\\1' } end,\n\
             badstatus = function() return { status = 1000 } end,\n\
             jsonin = function(r) return { got = r.json.x * 2 } end,\n\
             looksalike = function() return { status = 200, extra = 'data' } end }",
        ),
        limits(),
    )
    .unwrap();
    assert_eq!(call(&f, "nothing", b"", "").0, 204);
    assert_eq!(
        call(&f, "text", b"", ""),
        (200, "text/plain; charset=utf-8".into(), b"plain".to_vec())
    );
    let (s, ct, b) = call(&f, "data", b"", "");
    assert_eq!((s, ct.as_str()), (200, "application/json"));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b).unwrap(),
        serde_json::json!({"a": 1, "list": [1, 2]})
    );
    let (s, ct, b) = call(&f, "full", b"", "");
    assert_eq!(
        (s, ct.as_str(), b.as_slice()),
        (418, "application/json", &br#"{"ok":true}"#[..])
    );
    assert_eq!(call(&f, "bytes", b"", "").2, vec![0u8, 255, 1]);
    assert_eq!(call(&f, "badstatus", b"", "").0, 500);
    assert_eq!(
        call(&f, "jsonin", br#"{"x": 21}"#, "application/json").2,
        br#"{"got":42}"#
    );
    // A table with other keys besides status/headers/body is data.
    let (s, _, b) = call(&f, "looksalike", b"", "");
    assert_eq!(s, 200);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&b).unwrap(),
        serde_json::json!({"status": 200, "extra": "data"})
    );
}

#[test]
fn limits_and_errors_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let f = LuaFunc::prepare(
        &bundle(
            dir.path(),
            &["spin", "eat", "boom", "fine"],
            "return { spin = function() while true do end end,\n\
             eat = function() local t = {} while true do t[#t + 1] = string.rep('y', 4096) .. #t end end,\n\
             boom = function() error({code = 7}) end,\n fine = function() return 'ok' end }",
        ),
        limits(),
    )
    .unwrap();
    let started = std::time::Instant::now();
    assert_eq!(call(&f, "spin", b"", "").0, 504);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the time limit stops the loop"
    );
    assert_eq!(call(&f, "eat", b"", "").0, 500);
    assert_eq!(call(&f, "boom", b"", "").0, 500);
    assert_eq!(call(&f, "fine", b"", "").2, b"ok");
}

#[test]
fn broken_bundles_fail_to_prepare_with_reasons() {
    let dir = tempfile::tempdir().unwrap();
    let err = LuaFunc::prepare(&bundle(dir.path(), &["a"], "this is not lua"), limits())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("main.lua"), "{err}");
    let err = LuaFunc::prepare(
        &bundle(dir.path(), &["a", "b"], "return { a = function() end }"),
        limits(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("`b`") && err.contains("POST /b"), "{err}");
    let err = LuaFunc::prepare(
        &bundle(dir.path(), &["a"], "while true do end"),
        LuaLimits {
            timeout: Duration::from_millis(50),
            ..limits()
        },
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("time limit"), "{err}");
}

/// Precompiled chunks never load: neither as the handler nor through
/// `require` (bytecode is not verified by the VM, and malformed bytecode
/// crashes the process that loads it).
#[test]
fn bytecode_is_refused_as_handler_and_module() {
    let real = mlua::Lua::new()
        .load("return { a = function() return 'hi' end }")
        .into_function()
        .unwrap()
        .dump(false);
    let malformed = b"\x1bLua\x54\x00\x19\x93\r\n\x1a\ngarbage".to_vec();
    for chunk in [real.clone(), malformed] {
        let dir = tempfile::tempdir().unwrap();
        let b = bundle(dir.path(), &["a"], "unused");
        std::fs::write(dir.path().join("main.lua"), &chunk).unwrap();
        let err = LuaFunc::prepare(&b, limits()).err().unwrap().to_string();
        assert!(err.contains("binary chunk"), "{err}");
    }
    let dir = tempfile::tempdir().unwrap();
    let f = LuaFunc::prepare(
        &bundle(
            dir.path(),
            &["a"],
            "return { a = function() return require('mod').a() end }",
        ),
        limits(),
    )
    .unwrap();
    std::fs::write(dir.path().join("mod.lua"), &real).unwrap();
    let (status, _, body) = call(&f, "a", b"", "");
    assert_eq!(status, 500);
    assert!(
        String::from_utf8_lossy(&body).contains("binary chunk"),
        "{}",
        String::from_utf8_lossy(&body)
    );
}

/// Run `f` on its own thread (a Lua state is not `Send`) and fail when it
/// has not answered within `limit`: a sandbox escape shows as a failure,
/// not as a hung test run.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .unwrap_or_else(|_| panic!("still running after {limit:?}: the time limit did not stop it"))
}

/// Prepare `lua` (operations `ops`, a 200 ms limit) and call each of
/// `calls` in turn; the statuses and bodies, in order.
fn calls_on(
    lua: &'static str,
    ops: &'static [&'static str],
    calls: &'static [&'static str],
) -> Vec<(u16, String)> {
    within(Duration::from_secs(20), move || {
        let dir = tempfile::tempdir().unwrap();
        let f = LuaFunc::prepare(&bundle(dir.path(), ops, lua), limits()).unwrap();
        calls
            .iter()
            .map(|op| {
                let (s, _, b) = call(&f, op, b"", "");
                (s, String::from_utf8_lossy(&b).into_owned())
            })
            .collect()
    })
}

/// `pcall`, `xpcall` (also with an error handler that loops) and coroutines
/// cannot catch or outrun the time limit: each answers 504, and the state
/// serves the next call.
#[test]
fn the_time_limit_cannot_be_caught_or_escaped() {
    let got = calls_on(
        "local function spin() while true do end end\n\
         return {\n\
         pcall = function() while true do pcall(spin) end end,\n\
         xpcall = function() while true do xpcall(spin, function() while true do end end) end end,\n\
         wrap = function() coroutine.wrap(spin)() end,\n\
         resume = function() while true do coroutine.resume(coroutine.create(spin)) end end,\n\
         nested = function() while true do pcall(coroutine.wrap(function() while true do pcall(spin) end end)) end end,\n\
         closing = function() local stuck = setmetatable({}, {__close = function() while true do end end})\n\
           local co = coroutine.create(function() local x <close> = stuck spin() end)\n\
           coroutine.resume(co) coroutine.close(co) coroutine.wrap(function() local x <close> = stuck spin() end)() end,\n\
         finalizer = function() setmetatable({}, {__gc = function() while true do end end}) end,\n\
         yields = function()\n\
           local co = coroutine.wrap(function() local ok, v = pcall(function() return coroutine.yield(1) + 1 end) coroutine.yield(v) end)\n\
           return tostring(co()) .. tostring(co(41)) end,\n\
         fine = function() return 'ok' end }",
        &["pcall", "xpcall", "wrap", "resume", "nested", "yields", "fine"],
        &["pcall", "fine", "xpcall", "wrap", "resume", "nested", "yields", "fine"],
    );
    let statuses: Vec<u16> = got.iter().map(|g| g.0).collect();
    assert_eq!(
        statuses,
        [504, 200, 504, 504, 504, 504, 200, 200],
        "{got:?}"
    );
    // A coroutine still yields across a (wrapped) pcall.
    assert_eq!(got[6].1, "142");
}
