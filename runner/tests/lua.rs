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

/// A request for `op`. Its failures are answered in full (`debug`): these
/// tests read the Lua error in the answer, which a client by default does
/// not get (see `a_func_error_reaches_the_client_without_its_detail_unless_debug_is_on`).
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
        ..Request::default()
    };
    Job {
        payload: req.encode().into(),
        operation: op.into(),
        params: vec![],
        picked_ms: now_ms(),
        dispatched_ms: None,
        checks: None,
        auth: None,
        responses: None,
        observer: funcatron_runner::observe::Observer::detached(),
        max_reply_bytes: 1 << 20,
        debug: true,
        cors: None,
        preflight: None,
        async_only: false,
        direct_body: None,
        direct: None,
        store: None,
    }
}

/// Run one call; return (status, content-type, body bytes).
fn call(f: &LuaFunc, op: &str, body: &[u8], ct: &str) -> (u16, String, Vec<u8>) {
    call_job(f, job(op, body, ct))
}

/// Run one call of `job`; return (status, content-type, body bytes).
fn call_job(f: &LuaFunc, job: Job) -> (u16, String, Vec<u8>) {
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

/// Pattern matching runs in C, out of the hook's reach: pathological
/// patterns are refused with a clear error (also as string methods), plain
/// and common patterns on 100 KB subjects keep working.
#[test]
fn costly_patterns_are_refused_common_ones_work() {
    let got = calls_on(
        "local big = string.rep('a', 300000)\n\
         local text = string.rep('key=value with  some   spaces\\t', 3500)\n\
         local function try(f) local ok, e = pcall(f) return ok and 'ran' or tostring(e) end\n\
         return {\n\
         find = function() return try(function() return big:find('.-.-.-.-b') end) end,\n\
         fn = function() return try(function() return string.find(big, '.-.-.-.-b') end) end,\n\
         match = function() return try(function() return big:match('(.-)(.-)(.-)b') end) end,\n\
         gmatch = function() return try(function() for _ in big:gmatch('a-a-a-b') do end end) end,\n\
         gsub = function() return try(function() return big:gsub('a*a*a*b', '') end) end,\n\
         optional = function() local s = string.rep('a', 40) return try(function() return s:match(string.rep('a?', 40) .. s) end) end,\n\
         common = function()\n\
           local squeezed = text:gsub('%s+', ' ')\n\
           local k, v = text:match('^(.-)=(.*)$')\n\
           local trimmed = ('  ' .. text .. '  '):match('^%s*(.-)%s*$')\n\
           local words = 0 for _ in text:gmatch('%a+') do words = words + 1 end\n\
           return table.concat({#text, #squeezed, k, #v, #trimmed, words, big:find('b', 1, true) or 'none', big:find('aab') or 'none'}, ' ') end,\n\
         move = function() return try(function() table.move({}, 1, 1 << 40, 2) end) end,\n\
         insert = function() local t = setmetatable({}, {__len = function() return 1 << 40 end})\n\
           return try(function() table.insert(t, 1, 'x') end) .. ' / ' .. try(function() table.remove(t, 1) end) end,\n\
         tokens = function() local s = string.rep('key = value; ', 80000) local n = 0\n\
           for i = 1, 2000 do if s:find('(%w+)%s*=', i) then n = n + 1 end end return tostring(n) end,\n\
         shift = function() local t = {1, 2, 3} table.insert(t, 1, 0) table.remove(t, 2) table.move(t, 1, 3, 2) return table.concat(t, ',') end }",
        &["find", "fn", "match", "gmatch", "gsub", "optional", "common", "move", "insert", "shift", "tokens"],
        &["find", "fn", "match", "gmatch", "gsub", "optional", "common", "move", "insert", "shift", "tokens"],
    );
    for (op, (status, body)) in ["find", "fn", "match", "gmatch", "gsub", "optional"]
        .iter()
        .zip(&got)
    {
        assert_eq!(*status, 200, "{op}: {body}");
        assert!(body.contains("pattern too costly"), "{op}: {body}");
    }
    assert_eq!(got[6].0, 200, "{:?}", got[6]);
    let text_len = 3500 * 30;
    assert_eq!(
        got[6].1,
        format!(
            "{text_len} {} key {} {} {} none none",
            3500 * 27,
            text_len - 4,
            text_len - 1,
            3500 * 5
        )
    );
    assert!(
        got[7].1.contains("table.move:") && got[7].1.contains("the sandbox allows"),
        "{:?}",
        got[7]
    );
    assert_eq!(
        got[8].1.matches("the sandbox allows").count(),
        2,
        "{:?}",
        got[8]
    );
    assert_eq!(got[9].1, "0,0,2,3");
    // A tokenizer's loop of finds on one 1 MB subject measures it once.
    assert_eq!(got[10], (200, "2000".into()));
}

/// What one request changes in the shared tables (globals and their
/// metatable, the libraries, the string metatable, `json`, `env`) the next
/// request does not see; the Func's own module-level locals persist.
#[test]
fn one_request_cannot_change_what_the_next_sees() {
    let got = within(Duration::from_secs(20), || {
        let dir = tempfile::tempdir().unwrap();
        let mut b = bundle(
            dir.path(),
            &["taint", "probe"],
            "local calls = 0\n\
             greeting = 'hello'\n\
             return {\n\
             taint = function()\n\
               calls = calls + 1\n\
               string.upper = function() return 'hacked' end\n\
               pcall(function() getmetatable('').__index = { len = function() return -1 end } end)\n\
               rawset(string, 'len', function() return -2 end)\n\
               setmetatable(_G, { __index = function(_, k) return 'ghost:' .. k end })\n\
               table.insert, math.pi, json.encode, utf8.char, coroutine.wrap = nil, 3, nil, nil, nil\n\
               env.GREETING, greeting, leaked = 'changed', 'bye', 'yes'\n\
               pcall(setmetatable, string, { __metatable = false })\n\
               pcall = function() return true end\n\
               local _, hidden = pairs(string) if type(hidden) == 'table' then rawset(hidden, 'rep', nil) end\n\
             end,\n\
             probe = function()\n\
               calls = calls + 1\n\
               return { upper = ('a'):upper(), len = ('abc'):len(), ghost = tostring(nothing), insert = type(table.insert),\n\
                 pi = math.pi > 3.14, encode = type(json.encode), char = type(utf8.char), wrap = type(coroutine.wrap),\n\
                 env = env.GREETING, greeting = greeting, leaked = tostring(leaked), strmt = tostring(getmetatable(string)),\n\
                 pairs = (function() local n = 0 for _ in pairs(math) do n = n + 1 end return n end)() > 20,\n\
                 pcall = select('#', pcall(error, 'x')), rep = type(string.rep), calls = calls }\n\
             end }",
        );
        b.env.insert("GREETING".into(), "hi".into());
        let f = LuaFunc::prepare(&b, limits()).unwrap();
        let before = call(&f, "probe", b"", "").2;
        assert_eq!(call(&f, "taint", b"", "").0, 204);
        let after = call(&f, "probe", b"", "").2;
        (before, after)
    });
    let before: serde_json::Value = serde_json::from_slice(&got.0).unwrap();
    let mut after: serde_json::Value = serde_json::from_slice(&got.1).unwrap();
    assert_eq!(
        before,
        serde_json::json!({"upper": "A", "len": 3, "ghost": "nil", "insert": "function", "pi": true,
            "encode": "function", "char": "function", "wrap": "function", "env": "hi",
            "greeting": "hello", "leaked": "nil", "strmt": "false", "pairs": true, "pcall": 2, "rep": "function", "calls": 1})
    );
    // Module-level locals are the Func's own state: they persist.
    assert_eq!(after["calls"], 3);
    after["calls"] = before["calls"].clone();
    assert_eq!(after, before);
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn status_and_body(h: funcatron_runner::invoke::Handled) -> (u16, String) {
    match h {
        Handled::Reply { response, .. } => {
            let r = Response::decode(&response).unwrap();
            (
                r.status,
                String::from_utf8_lossy(&r.body_bytes().unwrap()).into_owned(),
            )
        }
        other => panic!("{other:?}"),
    }
}

/// A call past its limit is answered 504, its Lua state is discarded and
/// rebuilt, and its thread serves the next request; stuck calls on every
/// thread of a pool hold the next request only for about their limit.
#[test]
fn a_stuck_call_is_killed_and_its_thread_serves_on() {
    use funcatron_runner::lua::LuaPool;
    within(Duration::from_secs(30), || {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let b = bundle(
                dir.path(),
                &["count", "stuck"],
                "local n = 0\nreturn { count = function() n = n + 1 return tostring(n) end,\n\
                 stuck = function() n = 100 while true do pcall(function() while true do end end) end end }",
            );
            let observer = funcatron_runner::observe::Observer::detached();
            let func: std::sync::Arc<str> = "t".into();
            let mut options = funcatron_runner::RunnerOptions {
                workers: 1,
                lua_limits: limits(),
                ..Default::default()
            };
            let threads = funcatron_runner::lua::LuaThreads::start(options.workers);
            let one = LuaPool::prepare(&b, &options, &observer, &threads).await.unwrap();
            assert_eq!(status_and_body(one.run(&func, job("count", b"", "")).await), (200, "1".into()));
            assert_eq!(status_and_body(one.run(&func, job("stuck", b"", "")).await).0, 504);
            // A fresh state: the stuck call's `n = 100` is gone with it.
            assert_eq!(status_and_body(one.run(&func, job("count", b"", "")).await), (200, "1".into()));

            options.workers = 2;
            let threads = funcatron_runner::lua::LuaThreads::start(options.workers);
            let two = LuaPool::prepare(&b, &options, &observer, &threads).await.unwrap();
            let started = std::time::Instant::now();
            let (a, b, c) = tokio::join!(
                two.run(&func, job("stuck", b"", "")),
                two.run(&func, job("stuck", b"", "")),
                two.run(&func, job("count", b"", "")),
            );
            assert_eq!((status_and_body(a).0, status_and_body(b).0), (504, 504));
            assert_eq!(status_and_body(c), (200, "1".into()));
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{:?} for a 200 ms limit",
                started.elapsed()
            );
        })
    });
}

/// The upload / dev check runs the Func's top-level code under the time
/// limit too, off the async runtime: code that never ends is a prepare
/// error, not a hung check.
#[test]
fn the_upload_check_stops_top_level_code_that_never_ends() {
    let err = within(Duration::from_secs(30), || {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let b = bundle(
                dir.path(),
                &["a"],
                "while true do pcall(function() while true do end end) end\nreturn { a = function() end }",
            );
            let options = funcatron_runner::RunnerOptions {
                lua_limits: limits(),
                ..Default::default()
            };
            funcatron_runner::check(&b, &options).await.unwrap_err().to_string()
        })
    });
    assert!(err.contains("time limit"), "{err}");
}

/// SIGTERM with a stuck Lua call in flight: the Runner finishes what it
/// holds (the stuck call, answered 504 at its limit) and stops within the
/// limit plus a grace.
#[test]
fn shutdown_is_not_held_by_a_stuck_func() {
    use funcatron_broker::{AnyBroker, Broker, Message, QueueKind};
    let stopped_in = within(Duration::from_secs(30), || {
        runtime().block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let b = bundle(
                dir.path(),
                &["stuck"],
                "return { stuck = function() while true do pcall(function() while true do end end) end end }",
            );
            let broker = AnyBroker::from_url("embedded", 1024).unwrap();
            let queue = funcatron_control::names::func_queue(&b.name, &b.version);
            broker.declare(&queue, QueueKind::Work).await.unwrap();
            let options = funcatron_runner::RunnerOptions {
                workers: 1,
                lua_limits: limits(),
                ..Default::default()
            };
            let shutdown = tokio_util::sync::CancellationToken::new();
            let node = funcatron_runner::RunnerNode::new(broker.clone())
                .options(options)
                .bundles(vec![b]);
            let running = tokio::spawn(node.run(shutdown.clone()));
            let mut message = Message::new(job("stuck", b"", "").payload);
            message.headers.push((
                funcatron_control::headers::OPERATION.into(),
                "stuck".into(),
            ));
            broker.publish(&queue, message).await.unwrap();
            // Delivered to the Runner (and so finished before it stops).
            while broker.depth(&queue).await.unwrap().unacked != Some(1) {
                tokio::task::yield_now().await;
            }
            let signalled = std::time::Instant::now();
            shutdown.cancel();
            running.await.unwrap();
            assert_eq!(broker.depth(&queue).await.unwrap().unacked, Some(0));
            signalled.elapsed()
        })
    });
    assert!(stopped_in < Duration::from_secs(3), "{stopped_in:?}");
}

/// A Func's error reaches its client as `func_error` with a generic message
/// and the request id; its text (here a path, and the Lua error's file and
/// line) only with `debug`: the Func's setting or the Runner's
/// `debug_errors`, through the whole Runner.
#[test]
fn a_func_error_reaches_the_client_without_its_detail_unless_debug_is_on() {
    use funcatron_broker::{AnyBroker, Broker, ConsumeOptions, Message, QueueKind};
    use funcatron_control::state::FuncSettings;
    use funcatron_runner::invoke::hidden;
    const LUA: &str = "return { boom = function() error('boom at /secret/path') end }";
    let dir = tempfile::tempdir().unwrap();
    let b = bundle(dir.path(), &["boom"], LUA);
    let f = LuaFunc::prepare(&b, limits()).unwrap();
    let hidden_body = |body: &[u8]| {
        let text = String::from_utf8_lossy(body).into_owned();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["error"], "func_error", "{v}");
        assert_eq!(v["message"], hidden::HANDLER, "{v}");
        assert_eq!(v["request_id"], "t-1", "{v}");
        for secret in ["/secret/path", "boom", "main.lua"] {
            assert!(
                !text.contains(secret),
                "{secret:?} reached the client: {text}"
            );
        }
    };
    let full_body = |body: &[u8]| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"], "func_error", "{v}");
        let m = v["message"].as_str().unwrap();
        assert!(
            m.contains("boom at /secret/path") && m.contains("main.lua:1"),
            "{v}"
        );
    };

    let mut quiet = job("boom", b"", "");
    quiet.debug = false;
    let (status, _, body) = call_job(&f, quiet);
    assert_eq!(status, 500);
    hidden_body(&body);
    let (status, _, body) = call(&f, "boom", b"", "");
    assert_eq!(status, 500);
    full_body(&body);

    // Through a Runner: by default, with the Func's `debug` setting, and
    // with the Runner's `debug_errors`.
    let answer = |b: Bundle, debug_errors: bool| {
        within(Duration::from_secs(30), move || {
            runtime().block_on(async move {
                let broker = AnyBroker::from_url("embedded", 1024).unwrap();
                let queue = funcatron_control::names::func_queue(&b.name, &b.version);
                broker.declare(&queue, QueueKind::Work).await.unwrap();
                broker.declare("r", QueueKind::Work).await.unwrap();
                let mut replies = broker
                    .consume(
                        "r",
                        QueueKind::Work,
                        ConsumeOptions {
                            prefetch: 1,
                            auto_ack: true,
                        },
                    )
                    .await
                    .unwrap();
                let options = funcatron_runner::RunnerOptions {
                    workers: 1,
                    lua_limits: limits(),
                    debug_errors,
                    ..Default::default()
                };
                let shutdown = tokio_util::sync::CancellationToken::new();
                let node = funcatron_runner::RunnerNode::new(broker.clone())
                    .options(options)
                    .bundles(vec![b]);
                let running = tokio::spawn(node.run(shutdown.clone()));
                let mut message = Message::new(job("boom", b"", "").payload);
                message
                    .headers
                    .push((funcatron_control::headers::OPERATION.into(), "boom".into()));
                broker.publish(&queue, message).await.unwrap();
                let reply = replies.next().await.unwrap();
                let r = Response::decode(&reply.message.payload).unwrap();
                let answer = (r.status, r.body_bytes().unwrap().into_owned());
                shutdown.cancel();
                running.await.unwrap();
                answer
            })
        })
    };
    let (status, body) = answer(b.clone(), false);
    assert_eq!(status, 500);
    hidden_body(&body);
    let debug = FuncSettings {
        debug: Some(true),
        ..FuncSettings::default()
    };
    let (status, body) = answer(b.with_settings(&debug), false);
    assert_eq!(status, 500);
    full_body(&body);
    let (status, body) = answer(b, true);
    assert_eq!(status, 500);
    full_body(&body);
}
