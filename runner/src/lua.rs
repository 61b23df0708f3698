//! The Lua runtime: Funcs written in Lua 5.4, run in-process. It sits at the
//! end of the pipeline (ingress -> broker -> Tron -> Runner): the serve loop
//! ([`crate::serve`]) hands a delivery to a version's [`LuaPool`], one of
//! whose threads runs the skeleton ([`crate::invoke::run_sync`]) around the
//! call; [`crate::serve::check`] (uploads, `funcatron dev`) prepares a
//! [`LuaFunc`] the same way, on a blocking thread, under the same limits.
//!
//! A Runner has one pool of OS threads for all its Lua Funcs
//! ([`LuaThreads`], the `workers` setting), so threads do not grow with
//! the number of Funcs. Each thread keeps one prepared Lua state per Func
//! version it has served (at most [`STATES_PER_THREAD`], least recently
//! used dropped first): the handler file is loaded once and its functions
//! are looked up by `operationId`, then reused for every request. Requests
//! reach a free thread through a bounded channel; the serve loop awaits
//! the answer. A direct request ([`crate::direct`]) runs on a thread of
//! its own with a fresh state, since it may wait on its client.
//!
//! # Sandbox
//!
//! - Libraries: `table`, `string`, `math`, `utf8`, `coroutine` only; no
//!   `io`, `os`, `debug`, `package`, `load`, `loadfile`, `dofile`,
//!   `collectgarbage` or `string.dump`. `require` loads only `.lua` files
//!   inside the bundle. Every chunk (handler, `require`, checks) loads as
//!   text: bytecode is refused.
//! - `print` goes to the Runner's log with the request id; a `json` table
//!   (`json.encode`, `json.decode`) is provided; `env` holds the bundle's
//!   declared environment variables and secrets; `store` reaches the
//!   document store collections the bundle declares, through the Runner
//!   ([`crate::store`]: `store.get`, `list`, `create`, `put`, `merge`,
//!   `delete`; the call blocks the Lua thread within the deadline).
//!
//! # Limits
//!
//! - Time: every call runs under its deadline (the Func's `timeout_ms`, or
//!   the request's own deadline when sooner), and everything the state runs
//!   for the call (request table, handler, response) is under it; top-level
//!   code gets the limit and at least 5 s. A global instruction hook (every
//!   [`HOOK_EVERY`] instructions, on every coroutine: Lua-created threads
//!   inherit it) raises "time limit exceeded" past the deadline, and that
//!   error cannot be caught: `pcall`, `xpcall`, `coroutine.resume` and
//!   `coroutine.close` re-raise it, an `xpcall` message handler is not
//!   called past the deadline, and a coroutine stopped by it is never
//!   closed (Lua runs hooks neither in message handlers called from a hook
//!   nor in such a coroutine's `__close` handlers). `setmetatable` refuses
//!   metatables with `__gc` (finalizers run with hooks off).
//! - Work in C, where the hook never fires: string patterns are bounded
//!   ([`pattern`]: `find`, `match`, `gmatch`, `gsub`, also as methods,
//!   refuse a search estimated past 10^9 steps); `table.move`, and
//!   `table.insert`/`table.remove` at a position on a table with a
//!   metatable, refuse to shift more than [`MAX_SHIFT`] elements.
//! - A call past its limit answers 504 and its state is spent: the thread
//!   answers, discards the state (pending finalizers cut short) and
//!   prepares the Func anew before taking the next request. The state's
//!   memory limit answers 500.
//!
//! # What one request leaves for the next
//!
//! After every call the shared tables are put back as they were once the
//! Func had loaded: the globals (bindings added, changed or removed) and
//! their metatable, `env`, and the libraries `string`, `table`, `math`,
//! `utf8`, `coroutine` and `json`. The libraries are empty proxies of a
//! hidden copy (their metatables protected; `pairs` lists the functions,
//! raw `next` sees nothing), so a request's writes land in the proxy and
//! are cleared; the string metatable is protected (`getmetatable("")` is
//! `false`). This costs a few microseconds a call. What persists is the
//! Func's own state: module-level locals (caches), the contents of tables
//! the Func created, and `require`d modules (so a module that sets globals
//! must be required at load time, not first inside a request).
//!
//! See `sandbox.lua` beside this file for the Lua side of all this.

use std::cell::Cell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use funcatron_bundle::Bundle;
use mlua::{Function, HookTriggers, Lua, LuaOptions, LuaSerdeExt, StdLib, Table, Value, VmState};

use std::sync::Arc;

mod pattern;

use crate::error::PrepareError;
use crate::invoke::{self, Handled, Job};
use crate::invoke::{FuncRequest, FuncResponse, InvokeError};
use crate::observe::Observer;
use crate::runtime::Called;
use crate::serve::RunnerOptions;

/// Limits applied to every Lua Func unless its bundle sets its own.
#[derive(Debug, Clone, Copy)]
pub struct LuaLimits {
    /// Longest one invocation may run.
    pub timeout: Duration,
    /// Most memory one Func's Lua state may hold.
    pub memory_bytes: usize,
}

/// Instructions between two clock checks: frequent enough to stop a runaway
/// loop within a millisecond or so, rare enough to cost nothing measurable.
const HOOK_EVERY: u32 = 10_000;

/// Most elements `table.move`, `table.insert` and `table.remove` shift in
/// one call (a C loop the hook cannot interrupt; a table `__len` can claim
/// any length).
const MAX_SHIFT: i64 = 1 << 24;

/// Longest the restore after a call may take before the state is rebuilt
/// instead.
const RESTORE_LIMIT: Duration = Duration::from_millis(500);

/// The sandbox's Lua-side wrappers and the restore snapshot.
const SANDBOX_LUA: &str = include_str!("lua/sandbox.lua");

/// One piece of work for a thread of the Runner's Lua pool.
enum Task {
    /// Prepare a version's state on this thread and say whether it loaded.
    Prepare {
        version: Arc<LuaVersion>,
        done: tokio::sync::oneshot::Sender<Result<(), PrepareError>>,
    },
    /// One request (the state is not `Send`, so the request crosses to
    /// its thread, undecoded; the thread runs the serve loop's skeleton
    /// around the call and answers with the encoded response).
    Call {
        version: Arc<LuaVersion>,
        func: Arc<str>,
        job: Box<Job>,
        done: tokio::sync::oneshot::Sender<Handled>,
    },
    /// Drop the states of versions no longer served.
    Sweep,
}

/// Most Lua states one pool thread keeps (one per Func version it has
/// served, least recently used dropped first).
const STATES_PER_THREAD: usize = 256;

/// Most Lua calls of direct requests running at once (each on its own
/// thread: a call streaming a body or an answer waits on its client).
const DIRECT_CALLS: usize = 256;

/// The Runner's Lua threads, shared by every Lua Func it serves: threads
/// do not grow with the number of Funcs. Each thread keeps a prepared
/// state per version it has served ([`STATES_PER_THREAD`] at most).
pub struct LuaThreads {
    tx: async_channel::Sender<Task>,
    threads: usize,
    /// Direct calls run on threads of their own, at most [`DIRECT_CALLS`].
    direct: Arc<tokio::sync::Semaphore>,
    /// Numbers the versions prepared on the pool.
    next: std::sync::atomic::AtomicU64,
}

impl LuaThreads {
    /// Start `workers` threads (at least one). They end when the last
    /// handle (and every [`LuaPool`] of it) is dropped.
    pub fn start(workers: usize) -> Arc<LuaThreads> {
        let workers = workers.max(1);
        let (tx, rx) = async_channel::bounded::<Task>(workers * 256);
        for i in 0..workers {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("funcatron-lua-{i}"))
                .spawn(move || worker(&rx));
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a Lua worker thread");
            }
        }
        Arc::new(LuaThreads {
            tx,
            threads: workers,
            direct: Arc::new(tokio::sync::Semaphore::new(DIRECT_CALLS)),
            next: std::sync::atomic::AtomicU64::new(1),
        })
    }
}

/// What a pool thread needs to prepare a version.
struct LuaVersion {
    id: u64,
    bundle: Bundle,
    limits: LuaLimits,
    observer: Observer,
}

/// A Lua bundle version served by the Runner's [`LuaThreads`]: calls reach
/// a free thread through a bounded channel.
pub struct LuaPool {
    threads: Arc<LuaThreads>,
    version: Arc<LuaVersion>,
}

impl Drop for LuaPool {
    fn drop(&mut self) {
        // Let the threads drop this version's states soon (a thread that
        // gets no sweep drops them on its next call).
        for _ in 0..self.threads.threads {
            let _ = self.threads.tx.try_send(Task::Sweep);
        }
    }
}

impl LuaPool {
    /// Prepare `bundle` on one of the Runner's Lua threads; when it cannot
    /// be prepared, the reason is returned. Other threads prepare it when
    /// they first serve it.
    pub async fn prepare(
        bundle: &Bundle,
        options: &RunnerOptions,
        observer: &Observer,
        threads: &Arc<LuaThreads>,
    ) -> Result<Self, PrepareError> {
        let version = Arc::new(LuaVersion {
            id: threads
                .next
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            bundle: bundle.clone(),
            limits: options.lua_limits,
            observer: observer.clone(),
        });
        let (done, report) = tokio::sync::oneshot::channel();
        let task = Task::Prepare {
            version: Arc::clone(&version),
            done,
        };
        if threads.tx.send(task).await.is_err() {
            return Err(PrepareError::Lua("the Lua threads have stopped".into()));
        }
        match report.await {
            Ok(Ok(())) => Ok(LuaPool {
                threads: Arc::clone(threads),
                version,
            }),
            Ok(Err(why)) => Err(why),
            Err(_) => Err(PrepareError::Lua("a Lua worker thread ended".into())),
        }
    }

    /// Handle one request on a free thread of the pool: the serve loop's
    /// skeleton ([`crate::invoke::run_sync`]) runs there around the call,
    /// so the Func's time limit and the expiry check start when a thread
    /// takes it. A direct request runs on a thread of its own (it may wait
    /// on its client for as long as its time limit).
    pub async fn run(&self, func: &Arc<str>, job: Job) -> Handled {
        let (done, rx) = tokio::sync::oneshot::channel();
        if job.direct.is_some() {
            let Ok(permit) = Arc::clone(&self.threads.direct).acquire_owned().await else {
                return Handled::Requeue("the Lua runtime has stopped".into());
            };
            let (version, func) = (Arc::clone(&self.version), Arc::clone(func));
            let spawned = std::thread::Builder::new()
                .name("funcatron-lua-direct".into())
                .spawn(move || {
                    let f = LuaFunc::prepare_observed(
                        &version.bundle,
                        version.limits,
                        &version.observer,
                    );
                    let _ = done.send(call_on(&version.bundle.name, &f, &func, &job));
                    drop(permit);
                });
            if let Err(e) = spawned {
                return Handled::Requeue(format!("cannot start a Lua thread: {e}"));
            }
        } else {
            let task = Task::Call {
                version: Arc::clone(&self.version),
                func: Arc::clone(func),
                job: Box::new(job),
                done,
            };
            if self.threads.tx.send(task).await.is_err() {
                return Handled::Requeue("the Lua runtime has stopped".into());
            }
        }
        // A thread answers even when the Func panics (see `run_task`); no
        // answer means its thread is gone, and the request goes back.
        rx.await
            .unwrap_or_else(|_| Handled::Requeue("a Lua worker thread ended".into()))
    }
}

/// One request through the skeleton on this thread, with `f` (or its
/// preparation's failure).
fn call_on(name: &str, f: &Result<LuaFunc, PrepareError>, func: &str, job: &Job) -> Handled {
    invoke::run_sync(func, job, u64::MAX, |req| match f {
        Ok(f) => run_task(name, f, req),
        Err(e) => Called::now(Err(InvokeError::Broken(format!(
            "bundle failed to load: {e}"
        )))),
    })
}

/// A prepared state on a pool thread.
struct State {
    /// Gone once the version is no longer served.
    version: std::sync::Weak<LuaVersion>,
    func: Result<LuaFunc, PrepareError>,
    /// When it last served (a count of this thread's calls).
    used: u64,
}

/// A pool thread: take tasks until the pool is dropped, keeping a state
/// per version served.
fn worker(rx: &async_channel::Receiver<Task>) {
    let mut states: HashMap<u64, State> = HashMap::new();
    let mut calls: u64 = 0;
    while let Ok(task) = rx.recv_blocking() {
        calls += 1;
        if calls.is_multiple_of(16) {
            states.retain(|_, s| s.version.strong_count() > 0);
        }
        match task {
            Task::Sweep => states.retain(|_, s| s.version.strong_count() > 0),
            Task::Prepare { version, done } => {
                let state = state_for(&mut states, &version, calls);
                let _ = done.send(
                    state
                        .func
                        .as_ref()
                        .map(drop)
                        .map_err(|e| PrepareError::Lua(e.to_string())),
                );
            }
            Task::Call {
                version,
                func,
                job,
                done,
            } => {
                let state = state_for(&mut states, &version, calls);
                let answer = call_on(&version.bundle.name, &state.func, &func, &job);
                // The caller may have gone (its delivery dropped at shutdown).
                let _ = done.send(answer);
                if state.func.as_ref().is_ok_and(LuaFunc::spent) {
                    // A call ran past its limit: nothing of that state is
                    // trusted (it may hold half-done work, a coroutine
                    // mid-loop). It goes now; the next call prepares anew.
                    states.remove(&version.id);
                }
            }
        }
    }
}

/// This thread's state of `version`, prepared now if it has none (the
/// least recently used state dropped first when the thread holds
/// [`STATES_PER_THREAD`]).
fn state_for<'s>(
    states: &'s mut HashMap<u64, State>,
    version: &Arc<LuaVersion>,
    now: u64,
) -> &'s mut State {
    if !states.contains_key(&version.id) && states.len() >= STATES_PER_THREAD {
        if let Some(oldest) = states.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k) {
            states.remove(&oldest);
        }
    }
    let state = states.entry(version.id).or_insert_with(|| State {
        version: Arc::downgrade(version),
        func: LuaFunc::prepare_observed(&version.bundle, version.limits, &version.observer),
        used: now,
    });
    state.used = now;
    state
}

/// One call on this thread, within the Func's own time limit; a panic in
/// the runtime answers 500.
fn run_task(func: &str, f: &LuaFunc, mut req: FuncRequest<'_>) -> Called {
    req.deadline = req.deadline.min(Instant::now() + f.timeout);
    let started = Instant::now();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f.call(&req)))
        .unwrap_or_else(|_| {
            tracing::error!(func, "Lua runtime panicked; answering 500");
            Err(InvokeError::Handler(
                "the Lua runtime failed while handling the request".into(),
            ))
        });
    Called { started, result }
}

/// One prepared Func: a sandboxed Lua state with its handlers resolved.
pub struct LuaFunc {
    lua: Lua,
    name: String,
    handlers: HashMap<String, Function>,
    /// When the running call must stop; read by the instruction hook.
    deadline: Rc<Cell<Option<Instant>>>,
    /// Set by the hook when it stopped a call, so the error maps to 504.
    timed_out: Rc<Cell<bool>>,
    /// A call ran past its limit (or the restore after it failed): the
    /// state must be discarded and the Func prepared again.
    spent: Cell<bool>,
    restore: Restore,
    timeout: Duration,
    /// The running call's body and answer streams (`req.read`,
    /// `req.start`, `req.write`).
    io: Rc<std::cell::RefCell<CallIo>>,
    /// `req.read`, `req.start` and `req.write`, made once.
    io_fns: [Function; 3],
}

/// What `req.read`, `req.start` and `req.write` work on during one call.
#[derive(Default)]
struct CallIo {
    /// When the call must end (waits for the client end there).
    deadline: Option<Instant>,
    /// The body `req.read` has yet to return, when it is here whole.
    unread: Option<bytes::Bytes>,
    /// A direct request's streams.
    direct: Option<Arc<crate::direct::DirectIo>>,
    /// The head given by `req.start` (or the default on the first write).
    head: Option<(u16, Vec<(String, String)>)>,
    /// The head went to the client (a direct request): the answer is
    /// streamed.
    sent: bool,
    /// What was written, when the answer is not streamed.
    written: Option<Vec<u8>>,
    /// Most bytes collected in `written`.
    max_bytes: usize,
}

/// The content type of an answer written in pieces without `req.start`.
const STREAM_CONTENT_TYPE: &str = "application/octet-stream";

/// What the pieces-API raised: the time limit (uncatchable, as the hook's)
/// or a broken client.
fn io_error(timed_out: &Cell<bool>, e: crate::direct::IoError) -> mlua::Error {
    if matches!(e, crate::direct::IoError::Timeout) {
        timed_out.set(true);
        return mlua::Error::runtime("time limit exceeded");
    }
    mlua::Error::runtime(e.to_string())
}

/// Make `req.read`, `req.start` and `req.write` (see `docs/runtimes.md`).
fn io_functions(
    lua: &Lua,
    io: &Rc<std::cell::RefCell<CallIo>>,
    timed_out: &Rc<Cell<bool>>,
) -> mlua::Result<[Function; 3]> {
    let (io_r, t_r) = (Rc::clone(io), Rc::clone(timed_out));
    let read = lua.create_function(move |lua, ()| {
        let (direct, deadline) = {
            let mut c = io_r.borrow_mut();
            if let Some(b) = c.unread.take() {
                return if b.is_empty() {
                    Ok(Value::Nil)
                } else {
                    Ok(Value::String(lua.create_string(&b)?))
                };
            }
            (c.direct.clone(), c.deadline)
        };
        let Some(d) = direct.filter(|d| d.streams_body()) else {
            return Ok(Value::Nil);
        };
        let deadline = deadline.unwrap_or_else(Instant::now);
        match d.read_blocking(deadline) {
            Ok(Some(b)) => Ok(Value::String(lua.create_string(&b)?)),
            Ok(None) => Ok(Value::Nil),
            Err(e) => Err(io_error(&t_r, e)),
        }
    })?;
    let (io_s, t_s) = (Rc::clone(io), Rc::clone(timed_out));
    let start = lua.create_function(move |lua, (status, headers): (i64, Value)| {
        if !(200..=599).contains(&status) {
            return Err(mlua::Error::runtime(format!(
                "invalid HTTP status {status}"
            )));
        }
        let mut headers = headers_of(lua, headers)?;
        if !headers.iter().any(|(k, _)| k == "content-type") {
            headers.push(("content-type".into(), STREAM_CONTENT_TYPE.into()));
        }
        let mut c = io_s.borrow_mut();
        if c.head.is_some() {
            return Err(mlua::Error::runtime(
                "req.start: the answer has started already",
            ));
        }
        c.head = Some((status as u16, headers));
        send_head(&mut c).map_err(|e| io_error(&t_s, e))
    })?;
    let (io_w, t_w) = (Rc::clone(io), Rc::clone(timed_out));
    let write = lua.create_function(move |lua, chunk: Value| {
        let Some(chunk) = lua.coerce_string(chunk)? else {
            return Err(mlua::Error::runtime("req.write: expected a string"));
        };
        let mut c = io_w.borrow_mut();
        if c.head.is_none() {
            c.head = Some((
                200,
                vec![("content-type".into(), STREAM_CONTENT_TYPE.into())],
            ));
            send_head(&mut c).map_err(|e| io_error(&t_w, e))?;
        }
        let bytes = chunk.as_bytes();
        if c.sent {
            let (d, deadline) = match (&c.direct, c.deadline) {
                (Some(d), Some(t)) => (Arc::clone(d), t),
                _ => return Ok(()),
            };
            drop(c);
            let piece = bytes::Bytes::copy_from_slice(&bytes);
            return d
                .send_blocking(crate::direct::Part::Chunk(piece), deadline)
                .map_err(|e| io_error(&t_w, e));
        }
        let max = c.max_bytes;
        let written = c.written.get_or_insert_with(Vec::new);
        if written.len() + bytes.len() > max {
            return Err(mlua::Error::runtime(format!(
                "req.write: the answer exceeds the limit of {max} bytes"
            )));
        }
        written.extend_from_slice(&bytes);
        Ok(())
    })?;
    Ok([read, start, write])
}

/// On a direct request whose client can take a stream, send the head now.
fn send_head(c: &mut CallIo) -> Result<(), crate::direct::IoError> {
    let (Some(d), Some((status, headers)), Some(deadline)) = (&c.direct, &c.head, c.deadline)
    else {
        return Ok(());
    };
    d.send_blocking(
        crate::direct::Part::Head(*status, headers.clone()),
        deadline,
    )?;
    c.sent = true;
    Ok(())
}

/// A Lua headers table (`{name = value or {values}}`) as pairs, names
/// lower-cased.
fn headers_of(lua: &Lua, v: Value) -> mlua::Result<Vec<(String, String)>> {
    let mut headers = Vec::new();
    if let Value::Table(h) = v {
        for pair in h.pairs::<mlua::LuaString, Value>() {
            let (k, v) = pair?;
            let k = k.to_string_lossy().to_ascii_lowercase();
            match v {
                Value::Table(list) => {
                    for item in list.sequence_values::<mlua::LuaString>() {
                        headers.push((k.clone(), item?.to_string_lossy()));
                    }
                }
                other => {
                    let s = lua
                        .coerce_string(other)?
                        .map(|s| s.to_string_lossy())
                        .unwrap_or_default();
                    headers.push((k, s));
                }
            }
        }
    }
    Ok(headers)
}

/// What puts the shared tables back after a call: the Lua-side restore of
/// their entries (`sandbox.lua`) and their metatables as they were after
/// the Func loaded.
struct Restore {
    entries: Function,
    metatables: Vec<(Table, Option<Table>)>,
}

impl Restore {
    fn run(&self) -> mlua::Result<()> {
        for (t, mt) in &self.metatables {
            // Raw: a `__metatable` field does not protect it from us.
            t.set_metatable(mt.clone())?;
        }
        self.entries.call::<()>(())
    }
}

impl Drop for LuaFunc {
    fn drop(&mut self) {
        // Closing the state runs pending `__gc` finalizers: each is stopped
        // by the hook at once instead of looping on this thread forever.
        self.deadline.set(Some(Instant::now()));
    }
}

fn lua_err(e: mlua::Error) -> String {
    match e {
        mlua::Error::CallbackError { cause, .. } => lua_err((*cause).clone()),
        mlua::Error::RuntimeError(m) | mlua::Error::SyntaxError { message: m, .. } => m,
        other => other.to_string(),
    }
}

fn lua_prep(e: mlua::Error) -> PrepareError {
    PrepareError::Lua(lua_err(e))
}

fn is_memory_error(e: &mlua::Error) -> bool {
    match e {
        mlua::Error::MemoryError(_) => true,
        mlua::Error::CallbackError { cause, .. } => is_memory_error(cause),
        _ => false,
    }
}

impl LuaFunc {
    /// Build the sandboxed state, load the handler file and resolve one
    /// function per `operationId`.
    pub fn prepare(bundle: &Bundle, limits: LuaLimits) -> Result<LuaFunc, PrepareError> {
        Self::prepare_observed(bundle, limits, &Observer::detached())
    }

    /// [`LuaFunc::prepare`], with `print` reported through `observer`.
    pub fn prepare_observed(
        bundle: &Bundle,
        limits: LuaLimits,
        observer: &Observer,
    ) -> Result<LuaFunc, PrepareError> {
        let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
        let lua = Lua::new_with(libs, LuaOptions::default()).map_err(lua_prep)?;
        let timeout = Self::timeout_for(bundle, limits);
        let memory = bundle.memory_bytes.unwrap_or(limits.memory_bytes);
        let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
        let timed_out = Rc::new(Cell::new(false));
        set_time_hook(&lua, &deadline, &timed_out).map_err(lua_prep)?;
        install_sandbox(&lua, bundle, observer.clone()).map_err(lua_prep)?;
        let env = lua
            .create_table_from(bundle.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .map_err(lua_prep)?;
        lua.globals().raw_set("env", env).map_err(lua_prep)?;
        let snapshot = install_wrappers(&lua, &deadline, &timed_out).map_err(lua_prep)?;
        let io = Rc::new(std::cell::RefCell::new(CallIo::default()));
        let io_fns = io_functions(&lua, &io, &timed_out).map_err(lua_prep)?;
        lua.set_memory_limit(memory).map_err(lua_prep)?;

        // Top-level code gets the Func's limit, and at least 5 s.
        deadline.set(Some(Instant::now() + timeout.max(Duration::from_secs(5))));
        let loaded = load_func(&lua, bundle, &snapshot);
        deadline.set(None);
        let (handlers, restore) = loaded?;
        Ok(LuaFunc {
            lua,
            name: bundle.name.clone(),
            handlers,
            deadline,
            timed_out,
            spent: Cell::new(false),
            restore,
            timeout,
            io,
            io_fns,
        })
    }

    fn timeout_for(bundle: &Bundle, limits: LuaLimits) -> Duration {
        bundle
            .timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(limits.timeout)
    }

    fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    /// Whether this state is spent: a call ran past its time limit (or the
    /// restore after one failed). It must not serve again; the pool
    /// prepares the Func anew on that thread.
    pub fn spent(&self) -> bool {
        self.spent.get()
    }

    /// Invoke the handler for one request, then restore the shared tables
    /// for the next (see the module docs). Everything the state runs for
    /// the call, request table and response included, is under its
    /// deadline.
    pub fn call(&self, req: &FuncRequest<'_>) -> Result<FuncResponse, InvokeError> {
        self.timed_out.set(false);
        self.deadline.set(Some(req.deadline));
        let out = self.invoke(req);
        self.settle(out.is_err());
        out
    }

    fn invoke(&self, req: &FuncRequest<'_>) -> Result<FuncResponse, InvokeError> {
        let handler = self.handlers.get(req.operation).ok_or_else(|| {
            InvokeError::Broken(format!("no handler for operationId `{}`", req.operation))
        })?;
        let table = self.request_table(req).map_err(|e| match e {
            BuildError::BadRequest(m) => InvokeError::BadRequest(m),
            BuildError::Lua(e) => self.classify(e),
        })?;
        self.lua
            .set_app_data(RequestId(req.envelope.id.to_string()));
        self.lua
            .set_app_data(CallStore(req.store.clone(), req.deadline));
        let streams_body = req.direct.as_ref().is_some_and(|d| d.streams_body());
        *self.io.borrow_mut() = CallIo {
            deadline: Some(req.deadline),
            unread: (!streams_body).then(|| req.body.clone()),
            direct: req.direct.clone(),
            head: None,
            sent: false,
            written: None,
            max_bytes: req.max_reply_bytes,
        };
        let called = handler.call::<Value>(table);
        self.lua.remove_app_data::<CallStore>();
        let io = std::mem::take(&mut *self.io.borrow_mut());
        match (called, io.head) {
            (Err(e), _) => Err(self.classify(e)),
            // Written in pieces: what was returned is not the answer.
            (Ok(_), Some((status, headers))) => Ok(FuncResponse {
                status,
                headers,
                body: io.written.unwrap_or_default(),
            }),
            (Ok(v), None) => to_response(&self.lua, v).map_err(|e| self.classify(e)),
        }
    }

    /// After a call: a timed-out state is spent (not restored: it is
    /// discarded); otherwise the shared tables are restored, and what a
    /// failed call left behind is collected.
    fn settle(&self, failed: bool) {
        if !self.timed_out.get() {
            self.deadline.set(Some(Instant::now() + RESTORE_LIMIT));
            let restored = self.restore.run();
            if failed {
                let _ = self.lua.gc_collect();
            }
            if let Err(e) = restored {
                tracing::warn!(func = %self.name, error = %lua_err(e), "Lua globals not restored; rebuilding the state");
                self.spent.set(true);
            }
        }
        if self.timed_out.get() {
            self.spent.set(true);
        }
        self.deadline.set(None);
    }

    fn classify(&self, e: mlua::Error) -> InvokeError {
        if self.timed_out.get() {
            InvokeError::Timeout(format!("the Func ran longer than {} ms", self.timeout_ms()))
        } else if is_memory_error(&e) {
            InvokeError::Memory(format!("Func `{}` exceeded its memory limit", self.name))
        } else {
            InvokeError::Handler(lua_err(e))
        }
    }

    fn request_table(&self, req: &FuncRequest<'_>) -> Result<Table, BuildError> {
        let lua = &self.lua;
        let env = req.envelope;
        let t = lua.create_table_with_capacity(0, 17)?;
        t.raw_set("id", env.id.as_ref())?;
        t.raw_set("method", env.method.as_ref())?;
        t.raw_set("scheme", env.scheme.as_ref())?;
        t.raw_set("host", env.host.as_ref())?;
        t.raw_set("path", env.path.as_ref())?;
        t.raw_set("operation", req.operation)?;
        t.raw_set("query_string", env.query.as_ref())?;
        if let Some(r) = &env.remote {
            t.raw_set("remote", r.as_ref())?;
        }
        let params = lua.create_table_with_capacity(0, req.params.len())?;
        for (k, v) in req.params {
            params.raw_set(k.as_str(), v.as_str())?;
        }
        t.raw_set("params", params)?;
        let query = lua.create_table()?;
        for (k, v) in form_urlencoded::parse(env.query.as_bytes()) {
            match query.raw_get::<Value>(k.as_ref())? {
                Value::Nil => query.raw_set(k.as_ref(), v.as_ref())?,
                Value::Table(list) => list.raw_push(v.as_ref())?,
                first => {
                    let list = lua.create_sequence_from([
                        first,
                        Value::String(lua.create_string(v.as_ref())?),
                    ])?;
                    query.raw_set(k.as_ref(), list)?;
                }
            }
        }
        t.raw_set("query", query)?;
        let headers = lua.create_table_with_capacity(0, env.headers.len())?;
        let mut content_type = "";
        for (k, v) in &env.headers {
            if k == "content-type" {
                content_type = v;
            }
            match headers.raw_get::<Option<mlua::LuaString>>(k.as_ref())? {
                None => headers.raw_set(k.as_ref(), v.as_ref())?,
                Some(prev) => {
                    let joined = format!("{}, {v}", prev.to_string_lossy());
                    headers.raw_set(k.as_ref(), joined)?;
                }
            }
        }
        t.raw_set("headers", headers)?;
        let [read, start, write] = &self.io_fns;
        t.raw_set("read", read)?;
        t.raw_set("start", start)?;
        t.raw_set("write", write)?;
        if req.direct.as_ref().is_some_and(|d| d.streams_body()) {
            // Streamed: `req.read()` has it, in pieces.
            return Ok(t);
        }
        t.raw_set("body", lua.create_string(&req.body)?)?;
        if content_type.contains("json") && !req.body.is_empty() {
            let v: serde_json::Value = serde_json::from_slice(&req.body).map_err(|e| {
                BuildError::BadRequest(format!("request body is not valid JSON: {e}"))
            })?;
            t.raw_set("json", lua.to_value(&v)?)?;
        }
        Ok(t)
    }
}

enum BuildError {
    BadRequest(String),
    Lua(mlua::Error),
}

impl From<mlua::Error> for BuildError {
    fn from(e: mlua::Error) -> Self {
        BuildError::Lua(e)
    }
}

/// The request id of the call in progress, for `print`.
struct RequestId(String);

/// The running call's way to the document store (`store.*`) and its
/// deadline, as app data while it runs.
struct CallStore(Option<Arc<crate::store::StoreScope>>, Instant);

/// Run one `store.*` operation for the call in flight: the answer's body
/// (a table), or `nil` and the error (its body with `status`).
fn store_call(lua: &Lua, op: serde_json::Value) -> mlua::Result<(Value, Value)> {
    let (scope, deadline) = match lua.app_data_ref::<CallStore>() {
        Some(c) => (c.0.clone(), c.1),
        None => (None, Instant::now()),
    };
    let (status, body) = match scope {
        Some(s) => {
            let op = serde_json::to_vec(&op).map_err(mlua::Error::external)?;
            s.call_blocking(op, deadline)
        }
        None => funcatron_documents::rpc::refusal(
            403,
            "forbidden",
            "this Func declares no collections: add `store: {collection: [read, write]}` to its bundle",
        ),
    };
    let body = lua.to_value(&body)?;
    if status < 400 {
        return Ok((body, Value::Nil));
    }
    if let Value::Table(t) = &body {
        t.raw_set("status", status)?;
    }
    Ok((Value::Nil, body))
}

/// The `store` table: `get`, `list`, `create`, `put`, `merge`, `delete`
/// on the collections the bundle declares (`docs/runtimes.md`).
fn store_table(lua: &Lua) -> mlua::Result<Table> {
    use serde_json::{json, Value as J};
    /// Field `key` of an options table, as JSON (`null` without one).
    fn opt(v: &Value, key: &str) -> mlua::Result<J> {
        match v {
            Value::Table(t) => {
                let v: Value = t.raw_get(key)?;
                serde_json::to_value(&v).map_err(mlua::Error::external)
            }
            _ => Ok(J::Null),
        }
    }
    let to_json = |v: &Value| serde_json::to_value(v).map_err(mlua::Error::external);
    let t = lua.create_table()?;
    t.raw_set(
        "get",
        lua.create_function(|lua, (c, id): (String, String)| {
            store_call(lua, json!({"op": "get", "collection": c, "id": id}))
        })?,
    )?;
    t.raw_set(
        "list",
        lua.create_function(|lua, (c, o): (String, Value)| {
            let filter = match opt(&o, "filter")? {
                J::Null => json!({}),
                f => f,
            };
            let mut op = json!({"op": "list", "collection": c, "filter": filter});
            for k in ["after", "limit"] {
                let v = opt(&o, k)?;
                if !v.is_null() {
                    op[k] = v;
                }
            }
            store_call(lua, op)
        })?,
    )?;
    t.raw_set(
        "create",
        lua.create_function(move |lua, (c, doc, id): (String, Value, Option<String>)| {
            let mut op = json!({"op": "create", "collection": c, "doc": to_json(&doc)?});
            if let Some(id) = id {
                op["id"] = J::String(id);
            }
            store_call(lua, op)
        })?,
    )?;
    // put(c, id, doc, opts), merge(c, id, patch, opts), delete(c, id, opts).
    for (name, field) in [
        ("put", Some("doc")),
        ("merge", Some("patch")),
        ("delete", None),
    ] {
        t.raw_set(
            name,
            lua.create_function(move |lua, args: mlua::MultiValue| {
                let mut args = args.into_iter();
                let mut next = || args.next().unwrap_or(Value::Nil);
                let (c, id) = (next(), next());
                let (Some(c), Some(id)) = (lua.coerce_string(c)?, lua.coerce_string(id)?) else {
                    return Err(mlua::Error::runtime(format!("store.{name}: a collection and an id")));
                };
                let mut op = json!({"op": name, "collection": c.to_str()?.to_owned(), "id": id.to_str()?.to_owned()});
                if let Some(field) = field {
                    op[field] = to_json(&next())?;
                }
                let version = opt(&next(), "if_version")?;
                if !version.is_null() {
                    op["if_version"] = version;
                }
                store_call(lua, op)
            })?,
        )?;
    }
    Ok(t)
}

fn json_body(v: &Value) -> Result<Vec<u8>, mlua::Error> {
    serde_json::to_vec(v).map_err(mlua::Error::external)
}

/// Map what a handler returned to a response (see the module docs of the
/// README's "Writing a Lua Func" for the rules).
fn to_response(lua: &Lua, v: Value) -> Result<FuncResponse, mlua::Error> {
    let text = |body: Vec<u8>| FuncResponse {
        status: 200,
        headers: vec![("content-type".into(), "text/plain; charset=utf-8".into())],
        body,
    };
    let json = |body: Vec<u8>| FuncResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body,
    };
    match v {
        Value::Nil => Ok(FuncResponse {
            status: 204,
            ..FuncResponse::default()
        }),
        Value::String(s) => Ok(text(s.as_bytes().to_vec())),
        Value::Table(t) if is_response_table(&t)? => {
            let status: i64 = t.raw_get("status")?;
            if !(100..=599).contains(&status) {
                return Err(mlua::Error::runtime(format!(
                    "invalid HTTP status {status}"
                )));
            }
            let mut headers = headers_of(lua, t.raw_get::<Value>("headers")?)?;
            let has_ct = headers.iter().any(|(k, _)| k == "content-type");
            let body = match t.raw_get::<Value>("body")? {
                Value::Nil => Vec::new(),
                Value::String(s) => {
                    if !has_ct {
                        headers.push(("content-type".into(), "text/plain; charset=utf-8".into()));
                    }
                    s.as_bytes().to_vec()
                }
                other => {
                    if !has_ct {
                        headers.push(("content-type".into(), "application/json".into()));
                    }
                    json_body(&other)?
                }
            };
            Ok(FuncResponse {
                status: status as u16,
                headers,
                body,
            })
        }
        other => Ok(json(json_body(&other)?)),
    }
}

/// A table is a response (not data to encode as JSON) when it has an integer
/// `status` and no keys besides `status`, `headers` and `body`.
fn is_response_table(t: &Table) -> Result<bool, mlua::Error> {
    if !matches!(t.raw_get::<Value>("status")?, Value::Integer(_)) {
        return Ok(false);
    }
    for pair in t.pairs::<Value, Value>() {
        let (k, _) = pair?;
        let ok = matches!(&k, Value::String(s) if matches!(s.as_bytes().as_ref(), b"status" | b"headers" | b"body"));
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// The time limit: every [`HOOK_EVERY`] instructions, on every Lua thread
/// of the state (a global hook: coroutines created by Lua code inherit it;
/// a per-thread hook would be dropped in them), past the deadline the
/// running code gets an error.
fn set_time_hook(
    lua: &Lua,
    deadline: &Rc<Cell<Option<Instant>>>,
    timed_out: &Rc<Cell<bool>>,
) -> mlua::Result<()> {
    let deadline = Rc::clone(deadline);
    let timed_out = Rc::clone(timed_out);
    lua.set_global_hook(
        HookTriggers::new().every_nth_instruction(HOOK_EVERY),
        move |_, _| match deadline.get() {
            Some(d) if Instant::now() >= d => {
                timed_out.set(true);
                Err(mlua::Error::runtime("time limit exceeded"))
            }
            _ => Ok(VmState::Continue),
        },
    )
}

/// Run `sandbox.lua` (the wrappers of `pcall`, patterns and table shifts);
/// it returns the snapshot function, called once the Func has loaded.
fn install_wrappers(
    lua: &Lua,
    deadline: &Rc<Cell<Option<Instant>>>,
    timed_out: &Rc<Cell<bool>>,
) -> mlua::Result<Function> {
    let (deadline, timed_out) = (Rc::clone(deadline), Rc::clone(timed_out));
    let expired = lua.create_function(move |_, ()| {
        if deadline.get().is_some_and(|d| Instant::now() >= d) {
            timed_out.set(true);
        }
        Ok(timed_out.get())
    })?;
    // The runs measured in the last subject, kept with it (so its identity
    // cannot be reused by another string meanwhile).
    let measured: std::cell::RefCell<Option<(mlua::LuaString, pattern::Runs)>> =
        std::cell::RefCell::new(None);
    let pattern_check = lua.create_function(move |lua, (s, p, kind): (Value, Value, u8)| {
        let (Some(s), Some(p)) = (lua.coerce_string(s)?, lua.coerce_string(p)?) else {
            return Ok(None);
        };
        let mut measured = measured.borrow_mut();
        let runs = match &mut *measured {
            Some((subject, runs)) if subject.to_pointer() == s.to_pointer() => runs,
            slot => &mut slot.insert((s.clone(), pattern::Runs::default())).1,
        };
        let search = match kind {
            0 => pattern::Search::Find,
            2 => pattern::Search::Unanchored,
            3 => pattern::Search::Plain,
            _ => pattern::Search::Anchorable,
        };
        Ok(pattern::refusal(&s.as_bytes(), &p.as_bytes(), search, runs))
    })?;
    lua.load(SANDBOX_LUA)
        .set_name("@funcatron/sandbox.lua")
        .set_mode(mlua::chunk::ChunkMode::Text)
        .call((expired, pattern_check, MAX_SHIFT))
}

/// Copy the shared tables as the Func left them after loading.
fn take_snapshot(snapshot: &Function) -> mlua::Result<Restore> {
    let (entries, targets): (Function, Table) = snapshot.call(())?;
    let metatables = targets
        .sequence_values::<Table>()
        .map(|t| {
            t.map(|t| {
                let mt = t.metatable();
                (t, mt)
            })
        })
        .collect::<mlua::Result<_>>()?;
    Ok(Restore {
        entries,
        metatables,
    })
}

/// Load and run the handler file (Lua source only).
fn load_handler(lua: &Lua, bundle: &Bundle) -> Result<Value, PrepareError> {
    let path = bundle.dir.join(&bundle.handler);
    let source =
        std::fs::read(&path).map_err(|e| PrepareError::Lua(format!("{}: {e}", path.display())))?;
    lua.load(&source)
        .set_name(format!("@{}", bundle.handler.display()))
        // Text only: precompiled bytecode is unchecked by the VM, and a
        // malformed chunk crashes the process that loads it.
        .set_mode(mlua::chunk::ChunkMode::Text)
        .call(())
        .map_err(|e| PrepareError::Lua(format!("{}: {}", bundle.handler.display(), lua_err(e))))
}

/// Run the handler file, resolve its handlers (a returned table's
/// `__index` is Lua code too: this runs under the top-level deadline) and
/// take the snapshot the restore puts back after each call.
fn load_func(
    lua: &Lua,
    bundle: &Bundle,
    snapshot: &Function,
) -> Result<(HashMap<String, Function>, Restore), PrepareError> {
    let scope = match load_handler(lua, bundle)? {
        Value::Table(t) => t,
        _ => lua.globals(),
    };
    let handlers = resolve_handlers(bundle, &scope)?;
    Ok((handlers, take_snapshot(snapshot).map_err(lua_prep)?))
}

/// One function per `operationId`, from what the handler file returned.
fn resolve_handlers(
    bundle: &Bundle,
    scope: &Table,
) -> Result<HashMap<String, Function>, PrepareError> {
    let mut handlers = HashMap::new();
    let mut missing = Vec::new();
    for op in &bundle.operations {
        // A pipeline's operation runs its steps, not a function.
        if funcatron_bundle::openapi::flow_of(&bundle.doc, &op.method, &op.path).is_some() {
            continue;
        }
        match scope.get::<Value>(op.operation_id.as_str()) {
            Ok(Value::Function(f)) => {
                handlers.insert(op.operation_id.clone(), f);
            }
            _ => missing.push(format!("`{}` ({} {})", op.operation_id, op.method, op.path)),
        }
    }
    if !missing.is_empty() {
        return Err(PrepareError::Lua(format!(
            "{}: no function for operationId {}",
            bundle.handler.display(),
            missing.join(", ")
        )));
    }
    Ok(handlers)
}

fn install_sandbox(lua: &Lua, bundle: &Bundle, observer: Observer) -> mlua::Result<()> {
    install_sandbox_for(
        lua,
        Some(&bundle.dir),
        &bundle.name,
        &bundle.version,
        observer,
    )
}

/// [`install_sandbox`] for Func `func` at `version`: `require` loads from
/// `dir` (none without one).
fn install_sandbox_for(
    lua: &Lua,
    dir: Option<&Path>,
    func: &str,
    version: &str,
    observer: Observer,
) -> mlua::Result<()> {
    let g = lua.globals();
    for name in ["load", "loadfile", "dofile", "require", "collectgarbage"] {
        g.raw_set(name, Value::Nil)?;
    }
    // string.dump exposes bytecode; nothing here can load it, but keep the
    // surface small.
    if let Value::Table(s) = g.raw_get::<Value>("string")? {
        s.raw_set("dump", Value::Nil)?;
    }
    let func_name = func.to_owned();
    let version = version.to_owned();
    g.raw_set(
        "print",
        lua.create_function(move |lua, args: mlua::Variadic<Value>| {
            let mut line = String::new();
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    line.push('\t');
                }
                match lua.coerce_string(a.clone())? {
                    Some(s) => line.push_str(&s.to_string_lossy()),
                    None => line.push_str(&format!("{a:?}")),
                }
            }
            let id = lua
                .app_data_ref::<RequestId>()
                .map(|r| r.0.clone())
                .unwrap_or_default();
            let line = crate::observe::log_line(&line);
            tracing::info!(func = %func_name, version = %version, request_id = %id, "{line}");
            observer.func_log(&func_name, &version, &id, "print", &line);
            Ok(())
        })?,
    )?;
    let json = lua.create_table()?;
    json.raw_set(
        "encode",
        lua.create_function(|_, v: Value| {
            serde_json::to_string(&v).map_err(mlua::Error::external)
        })?,
    )?;
    json.raw_set(
        "decode",
        lua.create_function(|lua, s: mlua::LuaString| {
            let v: serde_json::Value =
                serde_json::from_slice(&s.as_bytes()).map_err(mlua::Error::external)?;
            lua.to_value(&v)
        })?,
    )?;
    g.raw_set("json", json)?;
    g.raw_set("store", store_table(lua)?)?;
    let Some(dir) = dir else {
        return Ok(());
    };
    let root = dir.canonicalize().map_err(mlua::Error::external)?;
    let loaded = lua.create_table()?;
    g.raw_set(
        "require",
        lua.create_function(move |lua, name: String| {
            if let Some(v) = loaded.raw_get::<Option<Value>>(name.as_str())? {
                return Ok(v);
            }
            let path = module_path(&root, &name)?;
            let src = std::fs::read(&path)
                .map_err(|e| mlua::Error::runtime(format!("require {name:?}: {e}")))?;
            let v: Value = lua
                .load(&src)
                .set_name(format!("@{name}.lua"))
                .set_mode(mlua::chunk::ChunkMode::Text)
                .call(())?;
            let v = if v.is_nil() { Value::Boolean(true) } else { v };
            loaded.raw_set(name.as_str(), v.clone())?;
            Ok(v)
        })?,
    )?;
    Ok(())
}

/// What a flow's `modify` step made of its data.
#[derive(Debug, PartialEq)]
pub struct Transformed {
    /// The new data.
    pub body: Vec<u8>,
    /// Its content type (JSON when the chunk returned a table).
    pub content_type: Option<String>,
}

/// Run a flow's `modify` step ([`funcatron_envelope::flow::Step::Modify`]):
/// the chunk `source` in a fresh state with the Lua Funcs' sandbox (no
/// `require`), under `limits` (time and memory), seeing `data`,
/// `content_type`, `get(k)`, `set(k, v)` over `vars`, and `json`. It
/// returns the new data: a string as is, a table as JSON, `nil` the data
/// unchanged. `flow` names the flow in its `print` lines. Blocking: run it
/// off the async threads.
pub fn transform(
    flow: &str,
    source: &str,
    data: &[u8],
    content_type: Option<&str>,
    vars: &mut std::collections::BTreeMap<String, serde_json::Value>,
    limits: LuaLimits,
) -> Result<Transformed, String> {
    let libs = StdLib::TABLE | StdLib::STRING | StdLib::MATH | StdLib::UTF8 | StdLib::COROUTINE;
    let lua = Lua::new_with(libs, LuaOptions::default()).map_err(lua_err)?;
    let deadline: Rc<Cell<Option<Instant>>> = Rc::new(Cell::new(None));
    let timed_out = Rc::new(Cell::new(false));
    set_time_hook(&lua, &deadline, &timed_out).map_err(lua_err)?;
    install_sandbox_for(&lua, None, flow, "flow", Observer::detached()).map_err(lua_err)?;
    install_wrappers(&lua, &deadline, &timed_out).map_err(lua_err)?;
    let shared = Rc::new(std::cell::RefCell::new(std::mem::take(vars)));
    let result = (|| -> mlua::Result<Transformed> {
        let g = lua.globals();
        g.raw_set("data", lua.create_string(data)?)?;
        g.raw_set("content_type", content_type)?;
        let set = Rc::clone(&shared);
        g.raw_set(
            "set",
            lua.create_function(move |lua, (k, v): (String, Value)| {
                let v: serde_json::Value = lua.from_value(v)?;
                set.borrow_mut().insert(k, v);
                Ok(())
            })?,
        )?;
        let get = Rc::clone(&shared);
        g.raw_set(
            "get",
            lua.create_function(move |lua, k: String| match get.borrow().get(&k) {
                Some(v) => lua.to_value(v),
                None => Ok(Value::Nil),
            })?,
        )?;
        lua.set_memory_limit(limits.memory_bytes)?;
        deadline.set(Some(Instant::now() + limits.timeout));
        let out: Value = lua
            .load(source)
            .set_name("@modify")
            .set_mode(mlua::chunk::ChunkMode::Text)
            .call(())?;
        deadline.set(None);
        match out {
            Value::Nil => Ok(Transformed {
                body: data.to_vec(),
                content_type: content_type.map(str::to_owned),
            }),
            Value::String(s) => Ok(Transformed {
                body: s.as_bytes().to_vec(),
                content_type: content_type.map(str::to_owned),
            }),
            v @ (Value::Table(_) | Value::Integer(_) | Value::Number(_) | Value::Boolean(_)) => {
                Ok(Transformed {
                    body: serde_json::to_vec(&v).map_err(mlua::Error::external)?,
                    content_type: Some("application/json".into()),
                })
            }
            other => Err(mlua::Error::runtime(format!(
                "modify returned a {}, not a string, table or nil",
                other.type_name()
            ))),
        }
    })();
    *vars = std::mem::take(&mut *shared.borrow_mut());
    result.map_err(|e| {
        if timed_out.get() {
            format!(
                "modify ran past its limit of {} ms",
                limits.timeout.as_millis()
            )
        } else {
            lua_err(e)
        }
    })
}

/// `a.b` -> `<bundle>/a/b.lua`, refusing names and links that leave the bundle.
fn module_path(root: &Path, name: &str) -> mlua::Result<PathBuf> {
    let valid = !name.is_empty()
        && name
            .split('.')
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'));
    if !valid {
        return Err(mlua::Error::runtime(format!(
            "require {name:?}: module names are dot-separated words"
        )));
    }
    let path = root.join(format!("{}.lua", name.replace('.', "/")));
    let real = path.canonicalize().map_err(|_| {
        mlua::Error::runtime(format!(
            "require {name:?}: no module {name}.lua in the bundle"
        ))
    })?;
    if !real.starts_with(root) {
        return Err(mlua::Error::runtime(format!(
            "require {name:?}: module is outside the bundle"
        )));
    }
    Ok(real)
}
