//! Worker-process runtimes: Python, Node.js and Java Funcs in long-lived
//! processes.
//!
//! Tron -> Func queue -> **Runner -> worker process** -> reply. For each such
//! Func a Runner keeps a pool of worker processes (the bundle's
//! `concurrency`, else the Runner's `--worker-processes`). Each worker is a
//! small shim (`runner/shims/`) that loads the bundle once, says `ready`,
//! and then serves one request at a time over a Unix socket in the framed
//! protocol of [`frame`]. The worker's stdout and stderr are free for the
//! Func: every line goes to the Runner's log with the request id in flight,
//! and nothing printed can corrupt the protocol.
//!
//! Streamed answers: a Python or Node.js Func that returns a generator
//! answers in pieces (`head`, `chunk`s, `end`; see [`frame`]). On a direct
//! request ([`crate::direct`]) each piece is passed to the client as it
//! arrives, the socket's backpressure holding the Func to the client's
//! pace; otherwise the pieces are collected into one answer, at most
//! [`FuncRequest::max_reply_bytes`]. A client that leaves, or a collected
//! answer that outgrows its limit, has the Runner send `cancel`: the shim
//! closes the generator at its next piece and the worker serves on (or is
//! replaced if it does not end the stream within a second).
//!
//! Preparing a bundle happens once, off the request path, before its
//! workers start: Python bundles with a `requirements.txt` get a virtual
//! environment (cached by the file's SHA-256), Java sources are compiled
//! with `javac` (cached by the sources' SHA-256). A failure there is a
//! bundle error: requests are answered 500 with its reason.
//!
//! Faults: a call that outlives its time limit (a stream's included)
//! kills the worker's process group (504); a worker that dies or breaks
//! the protocol mid-call answers 500 `func_crashed`; either way a
//! replacement starts at once. A streamed answer that fails after its head
//! went to the client is cut off there (the direct listener compares the
//! final status with the head's). A worker
//! that cannot start (exits on import, say) is retried with backoff, and
//! while none is alive requests get 500 `func_broken` with its stderr.
//!
//! Isolation: each worker runs in its own sandbox ([`crate::sandbox`]): its
//! bundle, its prepared files (shims, virtualenv, classes) and its socket's
//! directory read-only, a private scratch directory (`HOME`, `TMPDIR`)
//! writable, nothing else of the Runner's.
//!
//! Memory limits: Python runs under `prlimit --as` (address space); Node.js
//! under `--max-old-space-size` (the V8 heap: V8 reserves more address space
//! than any sane `RLIMIT_AS`); Java under `-Xmx` (the JVM reserves address
//! space the same way).

pub mod frame;
mod prepare;

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use funcatron_bundle::{Bundle, Style};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, BufStream};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;

use crate::direct::{DirectIo, IoError, Part};
use crate::error::{PrepareError, WorkerError};
use crate::invoke::{FuncRequest, FuncResponse, InvokeError};
use crate::observe::{poisoned, Observer};
use crate::runtime::{Called, Runtime};
use crate::sandbox::{Isolation, Sandbox};
use crate::serve::RunnerOptions;

pub use prepare::Launch;

/// Settings for worker-process Funcs unless a bundle sets its own.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// Longest one invocation may run.
    pub timeout: Duration,
    /// Memory limit per worker process.
    pub memory_bytes: usize,
    /// Worker processes per Func.
    pub concurrency: usize,
    /// Where virtual environments, compiled Java and the shims are kept.
    pub cache_dir: PathBuf,
    /// Longest a worker may take from start to `ready`.
    pub start_timeout: Duration,
}

/// Kill a whole process group (the Func and anything it started).
pub(crate) async fn kill_group(pgid: u32) {
    let _ = tokio::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
}

/// The request id a worker is serving, for its log lines.
type Current = Arc<Mutex<String>>;

/// The last lines a worker wrote on stderr.
type Tail = Arc<Mutex<VecDeque<String>>>;

struct Worker {
    child: tokio::process::Child,
    stream: BufStream<UnixStream>,
    current: Current,
    /// Its `HOME` and `TMPDIR`, removed with it.
    _scratch: tempfile::TempDir,
}

impl Worker {
    fn pgid(&self) -> Option<u32> {
        self.child.id()
    }

    async fn kill(mut self) {
        if let Some(pgid) = self.pgid() {
            kill_group(pgid).await;
        }
        let _ = self.child.wait().await;
    }
}

/// Why a call failed, and whether its worker goes back to the pool.
#[derive(Debug)]
enum CallError {
    /// The worker is fine: the Func raised, or its streamed answer was
    /// refused and the worker stopped it when told.
    Kept(InvokeError),
    /// The worker must be replaced.
    Lost(InvokeError),
}

struct Pool {
    func: String,
    timeout: Duration,
    idle_tx: async_channel::Sender<Worker>,
    idle_rx: async_channel::Receiver<Worker>,
    /// Ask the supervisor for one more worker.
    respawn: tokio::sync::mpsc::UnboundedSender<()>,
    /// Why no worker can start, while that is so.
    broken: watch::Receiver<Option<String>>,
    live: Arc<AtomicUsize>,
}

/// A Python, Node.js or Java bundle version: its pool of workers, kept by
/// a supervisor task.
pub struct WorkerPool {
    pool: Arc<Pool>,
    /// Holds the sockets' directory for as long as the pool lives.
    _sockets: tempfile::TempDir,
}

impl Runtime for WorkerPool {
    /// Start the pool. Preparing and starting happen in the background;
    /// requests wait for the first worker (within their deadline).
    async fn prepare(
        b: &Bundle,
        options: &RunnerOptions,
        observer: &Observer,
    ) -> Result<Self, PrepareError> {
        let isolation = options.sandbox.isolation().await;
        let options = &options.worker;
        let sockets = tempfile::Builder::new()
            .prefix("funcatron-w")
            .tempdir()
            .map_err(|source| {
                tracing::error!(error = %source, "cannot create a directory for worker sockets");
                WorkerError::Io {
                    path: std::env::temp_dir(),
                    source,
                }
            })?;
        let (idle_tx, idle_rx) = async_channel::unbounded();
        let (respawn, respawn_rx) = tokio::sync::mpsc::unbounded_channel();
        let (broken_tx, broken) = watch::channel(None);
        let pool = Arc::new(Pool {
            func: b.name.clone(),
            timeout: b
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(options.timeout),
            idle_tx,
            idle_rx,
            respawn,
            broken,
            live: Arc::new(AtomicUsize::new(0)),
        });
        let size = b.concurrency.unwrap_or(options.concurrency).max(1);
        tokio::spawn(supervise(
            Supervised {
                bundle: b.clone(),
                options: options.clone(),
                observer: observer.clone(),
                sockets: sockets.path().to_owned(),
                size,
                isolation,
            },
            Arc::downgrade(&pool),
            respawn_rx,
            broken_tx,
        ));
        Ok(WorkerPool {
            pool,
            _sockets: sockets,
        })
    }

    fn max_time_ms(&self) -> u64 {
        // The pool starts the Func's time limit when a worker takes the call.
        u64::MAX
    }

    async fn call(&self, req: FuncRequest<'_>) -> Called {
        let started = Instant::now();
        let result = self.pool.invoke(&req).await;
        Called { started, result }
    }
}

/// Prepare `bundle` and start one worker to see that it loads (then stop
/// it): what `funcatron dev` does before it switches to a new version.
pub async fn check(
    bundle: &Bundle,
    options: &WorkerOptions,
    isolation: &Isolation,
) -> Result<(), PrepareError> {
    let launch = prepare::prepare(bundle, options).await?;
    let dir = tempfile::Builder::new()
        .prefix("funcatron-check")
        .tempdir()
        .map_err(|source| WorkerError::Io {
            path: std::env::temp_dir(),
            source,
        })?;
    let w = start_worker(
        &bundle.name,
        &Observer::detached(),
        &launch,
        isolation,
        &dir.path().join("w.sock"),
        options.start_timeout,
    )
    .await?;
    w.kill().await;
    Ok(())
}

/// What a supervisor keeps running.
struct Supervised {
    bundle: Bundle,
    options: WorkerOptions,
    observer: Observer,
    /// Where the workers' sockets go.
    sockets: PathBuf,
    /// Workers to keep.
    size: usize,
    /// How each worker is isolated.
    isolation: Isolation,
}

/// Prepare the bundle, then keep its pool at `size` workers until the pool
/// is dropped.
async fn supervise(
    s: Supervised,
    pool: std::sync::Weak<Pool>,
    mut respawn: tokio::sync::mpsc::UnboundedReceiver<()>,
    broken: watch::Sender<Option<String>>,
) {
    let Supervised {
        bundle,
        options,
        observer,
        sockets,
        size,
        isolation,
    } = s;
    let func = bundle.name.clone();
    let counter = AtomicU64::new(0);
    let launch = match prepare::prepare(&bundle, &options).await {
        Ok(l) => Arc::new(l),
        Err(why) => {
            tracing::error!(func, error = %why, "bundle failed to prepare; its requests get 500 with this reason");
            let _ = broken.send(Some(why.to_string()));
            return;
        }
    };
    let mut wanted = size;
    let mut backoff = Duration::from_millis(100);
    loop {
        while wanted > 0 {
            let Some(p) = pool.upgrade() else { return };
            let n = counter.fetch_add(1, Ordering::Relaxed);
            let socket = sockets.join(format!("w{n}.sock"));
            let started = start_worker(
                &func,
                &observer,
                &launch,
                &isolation,
                &socket,
                options.start_timeout,
            )
            .await;
            match started {
                Ok(w) => {
                    p.live.fetch_add(1, Ordering::SeqCst);
                    let _ = broken.send(None);
                    let _ = p.idle_tx.send(w).await;
                    wanted -= 1;
                    backoff = Duration::from_millis(100);
                }
                Err(why) => {
                    tracing::error!(func, error = %why, "worker failed to start; retrying");
                    metrics::counter!("runner_worker_start_failures_total", "func" => func.clone())
                        .increment(1);
                    if p.live.load(Ordering::SeqCst) == 0 {
                        let _ = broken.send(Some(why.to_string()));
                    }
                    drop(p);
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(10));
                }
            }
        }
        match respawn.recv().await {
            Some(()) => wanted += 1,
            None => return,
        }
    }
}

/// Start one worker and wait for its `ready`.
async fn start_worker(
    func: &str,
    observer: &Observer,
    launch: &Launch,
    isolation: &Isolation,
    socket: &std::path::Path,
    start_timeout: Duration,
) -> Result<Worker, WorkerError> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).map_err(|source| WorkerError::Listen {
        path: socket.to_owned(),
        source,
    })?;
    let scratch = crate::sandbox::scratch_dir().map_err(WorkerError::io(&std::env::temp_dir()))?;
    let mut env = launch.env.clone();
    env.insert("LANG".into(), "C.UTF-8".into());
    env.insert("FUNCATRON_SOCKET".into(), socket.display().to_string());
    let mut ro = launch.ro.clone();
    ro.extend(socket.parent().map(std::path::Path::to_owned));
    let sandbox = Sandbox {
        dir: launch.dir.clone(),
        scratch: scratch.path().to_owned(),
        ro,
        env,
    };
    let mut cmd = sandbox.command(isolation, &launch.program, &launch.args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| WorkerError::Start {
        program: launch.program.clone(),
        source,
    })?;
    let current: Current = Arc::new(Mutex::new(String::new()));
    let tail: Tail = Arc::new(Mutex::new(VecDeque::new()));
    let mut forwarders = spawn_forwarders(&mut child, func, observer, launch, &current, &tail);
    let accepted = tokio::select! {
        // A worker that could not load connects, says why and exits: take
        // its connection (and its reason) before noticing the exit.
        biased;
        a = listener.accept() => a.map(|(s, _)| s).map_err(WorkerError::Accept),
        status = child.wait() => {
            // Let the forwarders drain what it printed before it died.
            for f in forwarders.drain(..) {
                let _ = tokio::time::timeout(Duration::from_secs(1), f).await;
            }
            Err(WorkerError::Exited {
                status: status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                stderr: stderr_tail(&tail),
            })
        }
        _ = tokio::time::sleep(start_timeout) => Err(WorkerError::NoConnect(start_timeout.as_millis())),
    };
    let _ = std::fs::remove_file(socket);
    let worker = match accepted {
        Ok(stream) => Worker {
            child,
            stream: BufStream::new(stream),
            current,
            _scratch: scratch,
        },
        Err(e) => {
            if let Some(pgid) = child.id() {
                kill_group(pgid).await;
            }
            return Err(e);
        }
    };
    await_ready(worker, start_timeout, &tail).await
}

/// The end of what a worker printed on stderr.
fn stderr_tail(tail: &Tail) -> String {
    let t = tail.lock().unwrap_or_else(|e| poisoned("worker.tail", e));
    t.iter().cloned().collect::<Vec<_>>().join("\n")
}

/// Forward the worker's stdout and stderr to the log (stderr's end kept in
/// `tail` for start failures).
fn spawn_forwarders(
    child: &mut tokio::process::Child,
    func: &str,
    observer: &Observer,
    launch: &Launch,
    current: &Current,
    tail: &Tail,
) -> Vec<tokio::task::JoinHandle<()>> {
    let version = launch
        .env
        .get("FUNCATRON_VERSION")
        .cloned()
        .unwrap_or_default();
    let mut forwarders = Vec::new();
    if let Some(out) = child.stdout.take() {
        forwarders.push(tokio::spawn(forward(
            out,
            observer.clone(),
            func.to_owned(),
            version.clone(),
            "stdout",
            Arc::clone(current),
            None,
        )));
    }
    if let Some(err) = child.stderr.take() {
        forwarders.push(tokio::spawn(forward(
            err,
            observer.clone(),
            func.to_owned(),
            version,
            "stderr",
            Arc::clone(current),
            Some(Arc::clone(tail)),
        )));
    }
    forwarders
}

/// Wait for a connected worker's first frame: `ready`, or why not.
async fn await_ready(
    mut worker: Worker,
    start_timeout: Duration,
    tail: &Tail,
) -> Result<Worker, WorkerError> {
    let first = tokio::time::timeout(start_timeout, frame::read(&mut worker.stream)).await;
    let outcome = match first {
        Ok(Ok(items)) if items.first().map(Vec::as_slice) == Some(b"ready") => return Ok(worker),
        Ok(Ok(items)) if items.first().map(Vec::as_slice) == Some(b"error") => {
            Err(WorkerError::Load(
                items
                    .get(1)
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default(),
            ))
        }
        Ok(Ok(_)) => Err(WorkerError::NotReady),
        Ok(Err(source)) => Err(WorkerError::Frame {
            source,
            stderr: stderr_tail(tail),
        }),
        Err(_) => Err(WorkerError::LoadTimeout(start_timeout.as_millis())),
    };
    worker.kill().await;
    outcome
}

/// Read one line (without its newline) into `line`, keeping at most `max`
/// bytes of it and skipping the rest: a worker printing without newlines
/// cannot make the Runner hold more. `false` at the end of the pipe.
async fn bounded_line(
    pipe: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<bool> {
    line.clear();
    let mut cut = 0usize;
    loop {
        let buf = pipe.fill_buf().await?;
        if buf.is_empty() {
            return Ok(!line.is_empty() || cut > 0);
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = max.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut += chunk.len().saturating_sub(room);
        let used = done.unwrap_or(buf.len());
        pipe.consume(used);
        if done.is_some() {
            if cut > 0 {
                line.extend_from_slice(format!(" [{cut} more bytes cut]").as_bytes());
            }
            return Ok(true);
        }
    }
}

/// Every line a worker prints goes to the log with the request in flight.
async fn forward(
    pipe: impl tokio::io::AsyncRead + Unpin,
    observer: Observer,
    func: String,
    version: String,
    stream: &'static str,
    current: Current,
    tail: Option<Tail>,
) {
    let mut pipe = tokio::io::BufReader::new(pipe);
    let mut raw = Vec::new();
    while let Ok(true) =
        bounded_line(&mut pipe, &mut raw, crate::observe::MAX_LOG_LINE_BYTES - 64).await
    {
        let line = crate::observe::log_line(&String::from_utf8_lossy(&raw)).into_owned();
        let id = current
            .lock()
            .unwrap_or_else(|e| poisoned("worker.current", e))
            .clone();
        tracing::info!(func, version, request_id = %id, stream, "{line}");
        observer.func_log(&func, &version, &id, stream, &line);
        if let Some(tail) = &tail {
            let mut t = tail.lock().unwrap_or_else(|e| poisoned("worker.tail", e));
            if t.len() == 30 {
                t.pop_front();
            }
            t.push_back(line);
        }
    }
}

fn request_frame(req: &FuncRequest<'_>, deadline: Instant) -> Vec<u8> {
    let env = req.envelope;
    let budget = deadline
        .saturating_duration_since(Instant::now())
        .as_millis()
        .to_string();
    let n_headers = env.headers.len().to_string();
    let mut items: Vec<&[u8]> = Vec::with_capacity(11 + 2 * (env.headers.len() + req.params.len()));
    items.extend([
        b"invoke".as_slice(),
        env.id.as_bytes(),
        req.operation.as_bytes(),
        env.method.as_bytes(),
        env.scheme.as_bytes(),
        env.host.as_bytes(),
        env.path.as_bytes(),
        env.query.as_bytes(),
        &req.body,
        budget.as_bytes(),
        n_headers.as_bytes(),
    ]);
    for (k, v) in &env.headers {
        items.push(k.as_bytes());
        items.push(v.as_bytes());
    }
    for (k, v) in req.params {
        items.push(k.as_bytes());
        items.push(v.as_bytes());
    }
    frame::encode(items)
}

/// A worker's reply: the Func's answer, the error it raised, or (a broken
/// protocol) a worker to replace.
fn parse_reply(items: Vec<Vec<u8>>) -> Result<FuncResponse, CallError> {
    let mut it = items.into_iter();
    let answer = match it.next().as_deref() {
        Some(b"ok") => parse_ok(it),
        Some(b"error") => return Err(CallError::Kept(handler_error(it.next()))),
        _ => Err("a reply that is neither `ok`, `head` nor `error`"),
    };
    answer.map_err(broke)
}

/// The worker broke the protocol: it is replaced.
fn broke(why: &str) -> CallError {
    CallError::Lost(InvokeError::Crashed(format!(
        "the worker broke the protocol ({why}); it was killed and replaced"
    )))
}

/// What an `error` frame says the Func raised.
fn handler_error(message: Option<Vec<u8>>) -> InvokeError {
    InvokeError::Handler(
        message
            .map(|m| String::from_utf8_lossy(&m).into_owned())
            .unwrap_or_default(),
    )
}

/// A status item: a number in `range`.
fn parse_status(
    item: Option<Vec<u8>>,
    range: std::ops::RangeInclusive<u16>,
) -> Result<u16, &'static str> {
    item.and_then(|s| String::from_utf8(s).ok())
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|s| range.contains(s))
        .ok_or("a frame without a valid status")
}

/// The `(name, value)` pairs that end `ok` and `head` frames.
fn parse_headers(
    mut it: impl Iterator<Item = Vec<u8>>,
) -> Result<Vec<(String, String)>, &'static str> {
    let mut headers = Vec::new();
    while let Some(k) = it.next() {
        let v = it.next().ok_or("a header without a value")?;
        let k = String::from_utf8(k).map_err(|_| "a header name that is not UTF-8")?;
        headers.push((k, String::from_utf8_lossy(&v).into_owned()));
    }
    Ok(headers)
}

/// The fields of an `ok` reply, or what is wrong with them.
fn parse_ok(mut it: impl Iterator<Item = Vec<u8>>) -> Result<FuncResponse, &'static str> {
    let status = parse_status(it.next(), 100..=599)?;
    let body = it.next().ok_or("`ok` without a body")?;
    Ok(FuncResponse {
        status,
        headers: parse_headers(it)?,
        body,
    })
}

/// Where the pieces of a streamed answer go.
#[derive(Clone, Copy)]
enum Out<'a> {
    /// To the client, each as it arrives (a direct request).
    Direct(&'a Arc<DirectIo>),
    /// Into one answer body of at most this many bytes (a queued
    /// request: its answer travels as one message).
    Collect(usize),
}

/// What went wrong in one exchange with a worker.
#[derive(Debug)]
enum Failed {
    /// A frame could not be read or written.
    Frame(frame::FrameError),
    /// The worker answered: with an error, or nonsense.
    Call(CallError),
}

impl From<frame::FrameError> for Failed {
    fn from(e: frame::FrameError) -> Self {
        Failed::Frame(e)
    }
}

impl From<CallError> for Failed {
    fn from(e: CallError) -> Self {
        Failed::Call(e)
    }
}

/// Longest a worker may take, once told to `cancel` a stream, to end it
/// (the Func's generator is closed at its next piece); past it the
/// worker is replaced.
const CANCEL_GRACE: Duration = Duration::from_secs(1);

/// One call's frames: the request out, then the answer, whole (`ok`,
/// `error`) or streamed (`head`, then pieces to `out`). Each wait is for
/// the worker or the client; the caller bounds it all by the deadline.
async fn exchange<S>(
    stream: &mut S,
    request: &[u8],
    out: Out<'_>,
    store: Option<&Arc<crate::store::StoreScope>>,
    deadline: Instant,
) -> Result<FuncResponse, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    frame::write(stream, request).await?;
    let first = loop {
        let f = frame::read(stream).await?;
        if f.first().map(Vec::as_slice) != Some(b"store") {
            break f;
        }
        let answer = store_call(store, f, deadline).await?;
        frame::write(stream, &answer).await?;
    };
    if first.first().map(Vec::as_slice) != Some(b"head") {
        return Ok(parse_reply(first)?);
    }
    let mut it = first.into_iter().skip(1);
    let status = parse_status(it.next(), 200..=599).map_err(broke)?;
    let headers = parse_headers(it).map_err(broke)?;
    relay(stream, status, headers, out, deadline).await
}

/// The answer frame to a Func's `store` frame (`["store", op]`, the
/// operation as JSON): `["store", status, body]`.
async fn store_call(
    store: Option<&Arc<crate::store::StoreScope>>,
    items: Vec<Vec<u8>>,
    deadline: Instant,
) -> Result<Vec<u8>, Failed> {
    let [_, op] = <[Vec<u8>; 2]>::try_from(items)
        .map_err(|_| broke("a `store` frame that is not one operation"))?;
    let (status, body) = match store {
        Some(s) => s.call(&op, deadline).await,
        None => funcatron_documents::rpc::refusal(
            403,
            "forbidden",
            "this Func declares no collections: add `store: {collection: [read, write]}` to its bundle",
        ),
    };
    let status = status.to_string();
    let body = serde_json::to_vec(&body).unwrap_or_default();
    Ok(frame::encode([
        b"store".as_slice(),
        status.as_bytes(),
        &body,
    ]))
}

/// A streamed answer after its `head`: each piece to `out`, up to `end`
/// (the answer: for a direct request its status and headers with no
/// body, the pieces having gone to the client) or `error`.
async fn relay<S>(
    stream: &mut S,
    status: u16,
    headers: Vec<(String, String)>,
    out: Out<'_>,
    deadline: Instant,
) -> Result<FuncResponse, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut body = Vec::new();
    if let Out::Direct(io) = out {
        let head = Part::Head(status, headers.clone());
        if let Err(e) = send_part(io, head, deadline).await {
            return client_gone(stream, status, headers, e, deadline).await;
        }
    }
    loop {
        let mut it = frame::read(stream).await?.into_iter();
        match it.next().as_deref() {
            Some(b"chunk") => {
                let piece = match (it.next(), it.next()) {
                    (Some(p), None) if p.len() <= frame::MAX_CHUNK_BYTES => p,
                    (Some(_), None) => {
                        return Err(broke("a `chunk` larger than the largest piece").into())
                    }
                    _ => return Err(broke("a `chunk` without exactly one piece").into()),
                };
                match out {
                    Out::Direct(io) => {
                        if let Err(e) = send_part(io, Part::Chunk(piece.into()), deadline).await {
                            return client_gone(stream, status, headers, e, deadline).await;
                        }
                    }
                    Out::Collect(max) if body.len() + piece.len() > max => {
                        metrics::counter!("runner_replies_too_large_total").increment(1);
                        let e = InvokeError::ReplyTooLarge(format!(
                            "the Func's streamed answer exceeds the limit of {max} bytes for an answer sent whole (ask for text/event-stream, or make its route direct, to stream it)"
                        ));
                        return Err(if cancel(stream, deadline).await {
                            CallError::Kept(e)
                        } else {
                            CallError::Lost(e)
                        }
                        .into());
                    }
                    Out::Collect(_) => body.extend_from_slice(&piece),
                }
            }
            Some(b"end") => {
                return Ok(FuncResponse {
                    status,
                    headers,
                    body,
                })
            }
            Some(b"error") => return Err(CallError::Kept(handler_error(it.next())).into()),
            _ => {
                return Err(
                    broke("a frame inside a stream that is not `chunk`, `end` or `error`").into(),
                )
            }
        }
    }
}

/// The client stopped taking a streamed answer (`why`): the Func is told
/// to stop. Its answer stands (nobody reads it); the worker is kept if it
/// stops in time.
async fn client_gone<S>(
    stream: &mut S,
    status: u16,
    headers: Vec<(String, String)>,
    why: IoError,
    deadline: Instant,
) -> Result<FuncResponse, Failed>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    if matches!(why, IoError::Timeout) {
        return Err(CallError::Lost(InvokeError::Timeout(
            "the client did not take the streamed answer before the Func's time limit; its worker was killed and replaced".into(),
        ))
        .into());
    }
    tracing::debug!(error = %why, "the client left a streamed answer; stopping the Func");
    metrics::counter!("runner_worker_streams_cancelled_total").increment(1);
    if cancel(stream, deadline).await {
        return Ok(FuncResponse {
            status,
            headers,
            body: Vec::new(),
        });
    }
    Err(CallError::Lost(InvokeError::Crashed(format!(
        "the client left a streamed answer and the Func did not stop within {} ms; its worker was killed and replaced",
        CANCEL_GRACE.as_millis()
    )))
    .into())
}

/// Tell the worker to stop its stream, and read what it still sends up
/// to its end (within [`CANCEL_GRACE`] and the deadline): `true` once it
/// is back in step (its next frame is the next call's), `false` if it
/// must be replaced.
async fn cancel<S>(stream: &mut S, deadline: Instant) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let drain = async {
        frame::write(stream, &frame::encode([b"cancel".as_slice()])).await?;
        loop {
            match frame::read(stream).await?.first().map(Vec::as_slice) {
                Some(b"chunk") => continue,
                Some(b"end") | Some(b"error") => return Ok(true),
                _ => return Ok::<_, frame::FrameError>(false),
            }
        }
    };
    let until = deadline.min(Instant::now() + CANCEL_GRACE);
    matches!(
        tokio::time::timeout_at(until.into(), drain).await,
        Ok(Ok(true))
    )
}

/// Hand one part of a streamed answer to the direct listener, waiting (at
/// most until `deadline`) for the client to take the parts before it.
async fn send_part(io: &Arc<DirectIo>, part: Part, deadline: Instant) -> Result<(), IoError> {
    io.send(part, deadline).await
}

impl Pool {
    /// Wait for a free worker, or say why there will be none in time.
    async fn take(&self, deadline: Instant) -> Result<Worker, InvokeError> {
        let mut broken = self.broken.clone();
        loop {
            if let Ok(w) = self.idle_rx.try_recv() {
                return Ok(w);
            }
            if self.live.load(Ordering::SeqCst) == 0 {
                if let Some(why) = broken.borrow_and_update().clone() {
                    return Err(InvokeError::Broken(format!(
                        "no worker of this Func can start: {why}"
                    )));
                }
            }
            tokio::select! {
                w = self.idle_rx.recv() => {
                    return w.map_err(|_| InvokeError::Broken("the worker pool has stopped".into()));
                }
                _ = broken.changed() => continue,
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let why = if self.live.load(Ordering::SeqCst) == 0 {
                        "no worker of this Func was ready before the request's deadline (still preparing or starting)"
                    } else {
                        "no worker of this Func became free before the request's deadline"
                    };
                    return Err(InvokeError::Timeout(why.into()));
                }
            }
        }
    }

    /// One call on `w`, its answer streamed or not, all of it within
    /// `deadline`.
    async fn call(
        &self,
        w: &mut Worker,
        req: &FuncRequest<'_>,
        deadline: Instant,
    ) -> Result<FuncResponse, CallError> {
        {
            let mut c = w
                .current
                .lock()
                .unwrap_or_else(|e| poisoned("worker.current", e));
            c.clear();
            c.push_str(&req.envelope.id);
        }
        let frame = request_frame(req, deadline);
        let out = match &req.direct {
            Some(io) => Out::Direct(io),
            None => Out::Collect(req.max_reply_bytes),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        let exchange = exchange(&mut w.stream, &frame, out, req.store.as_ref(), deadline);
        match tokio::time::timeout(left, exchange).await {
            Err(_) => Err(CallError::Lost(InvokeError::Timeout(format!(
                "the Func ran longer than {} ms; its worker was killed and replaced",
                left.as_millis()
            )))),
            Ok(Ok(r)) => Ok(r),
            Ok(Err(Failed::Call(e))) => Err(e),
            Ok(Err(Failed::Frame(frame::FrameError::Garbage(why)))) => Err(broke(&why)),
            Ok(Err(Failed::Frame(e))) => {
                let status = tokio::time::timeout(Duration::from_millis(500), w.child.wait())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| e.to_string());
                Err(CallError::Lost(InvokeError::Crashed(format!(
                    "the worker process died while handling the request ({status}); it was replaced"
                ))))
            }
        }
    }

    /// `req.deadline` is the request's own: waiting for a worker (while the
    /// bundle prepares, say) may use all of it; the Func's time limit
    /// starts when a worker takes the call.
    async fn invoke(&self, req: &FuncRequest<'_>) -> Result<FuncResponse, InvokeError> {
        let mut w = self.take(req.deadline).await?;
        let deadline = req.deadline.min(Instant::now() + self.timeout);
        // `current` keeps this id after the call: lines the Func printed
        // just before answering may reach the log after the answer.
        let result = self.call(&mut w, req, deadline).await;
        match result {
            Ok(r) => {
                let _ = self.idle_tx.send(w).await;
                Ok(r)
            }
            Err(CallError::Kept(e)) => {
                let _ = self.idle_tx.send(w).await;
                Err(e)
            }
            Err(CallError::Lost(e)) => {
                self.live.fetch_sub(1, Ordering::SeqCst);
                metrics::counter!("runner_worker_restarts_total", "func" => self.func.clone())
                    .increment(1);
                tracing::warn!(func = %self.func, request_id = %req.envelope.id, error = %e, "replacing a worker");
                tokio::spawn(w.kill());
                let _ = self.respawn.send(());
                Err(e)
            }
        }
    }
}

/// The environment a worker gets from its bundle: declared variables (with
/// secrets already resolved into them) plus what the shim needs.
fn shim_env(bundle: &Bundle) -> BTreeMap<String, String> {
    let mut env = bundle.env.clone();
    env.insert("FUNCATRON_FUNC".into(), bundle.name.clone());
    env.insert("FUNCATRON_VERSION".into(), bundle.version.clone());
    env.insert(
        "FUNCATRON_BUNDLE".into(),
        bundle
            .dir
            .canonicalize()
            .unwrap_or(bundle.dir.clone())
            .display()
            .to_string(),
    );
    env.insert(
        "FUNCATRON_HANDLER".into(),
        bundle.handler.display().to_string(),
    );
    env.insert(
        "FUNCATRON_STYLE".into(),
        match bundle.style {
            Style::Native => "native",
            Style::TinyFaas => "tinyfaas",
        }
        .into(),
    );
    let mut ops: Vec<&str> = bundle
        .operations
        .iter()
        .map(|o| o.operation_id.as_str())
        .collect();
    ops.sort_unstable();
    ops.dedup();
    env.insert("FUNCATRON_OPERATIONS".into(), ops.join(","));
    env
}

#[cfg(test)]
mod line_tests {
    #![allow(clippy::unwrap_used)]

    #[tokio::test]
    async fn a_worker_line_without_end_is_held_to_the_bound() {
        let mut text = vec![b'a'; 100_000];
        text.extend_from_slice(b"\nb\nlast");
        let mut pipe = tokio::io::BufReader::with_capacity(1024, text.as_slice());
        let mut line = Vec::new();
        let mut got = Vec::new();
        while super::bounded_line(&mut pipe, &mut line, 10).await.unwrap() {
            got.push(String::from_utf8(line.clone()).unwrap());
        }
        assert_eq!(got, ["aaaaaaaaaa [99990 more bytes cut]", "b", "last"]);
    }
}

#[cfg(test)]
mod stream_tests {
    //! The Runner's side of streamed answers against a scripted worker on
    //! an in-memory pipe.
    #![allow(clippy::unwrap_used)]

    use super::*;

    type Pipe = tokio::io::DuplexStream;

    fn pipes() -> (Pipe, Pipe) {
        tokio::io::duplex(8 * 1024 * 1024)
    }

    async fn say(w: &mut Pipe, items: &[&[u8]]) {
        frame::write(w, &frame::encode(items.iter().copied()))
            .await
            .unwrap();
    }

    /// Run one exchange collecting at most `max` bytes, the worker's side
    /// scripted by `worker` (given the pipe once the request is read; what
    /// it wrote stays readable after it drops the pipe).
    async fn collect<F, Fut>(max: usize, worker: F) -> (Result<FuncResponse, Failed>, Pipe)
    where
        F: FnOnce(Pipe) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let (mut runner, mut shim) = pipes();
        let script = tokio::spawn(async move {
            let request = frame::read(&mut shim).await.unwrap();
            assert_eq!(request, vec![b"invoke".to_vec()]);
            worker(shim).await
        });
        let request = frame::encode([b"invoke".as_slice()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let got = exchange(&mut runner, &request, Out::Collect(max), None, deadline).await;
        script.await.unwrap();
        (got, runner)
    }

    #[tokio::test]
    async fn a_streamed_answer_is_collected_into_one() {
        let (got, _) = collect(100, |mut w| async move {
            say(&mut w, &[b"head", b"201", b"content-type", b"text/x"]).await;
            say(&mut w, &[b"chunk", b"ab"]).await;
            say(&mut w, &[b"chunk", b"cd"]).await;
            say(&mut w, &[b"end"]).await;
        })
        .await;
        let r = got.unwrap();
        assert_eq!(r.status, 201);
        assert_eq!(r.headers, [("content-type".into(), "text/x".into())]);
        assert_eq!(r.body, b"abcd");
    }

    #[tokio::test]
    async fn store_frames_are_answered_before_the_answer() {
        let (got, _) = collect(100, |mut w| async move {
            // A Func without a `store` declaration asks anyway: refused,
            // and the worker stays in step for its answer.
            say(
                &mut w,
                &[b"store", br#"{"op":"get","collection":"c","id":"x"}"#],
            )
            .await;
            let reply = frame::read(&mut w).await.unwrap();
            assert_eq!(reply[..2], [b"store".to_vec(), b"403".to_vec()]);
            let body: serde_json::Value = serde_json::from_slice(&reply[2]).unwrap();
            assert_eq!(body["error"], "forbidden");
            say(&mut w, &[b"ok", b"200", b"after"]).await;
        })
        .await;
        assert_eq!(got.unwrap().body, b"after");
        // A store frame with no operation breaks the protocol.
        let (got, _) = collect(100, |mut w| async move {
            say(&mut w, &[b"store"]).await;
        })
        .await;
        assert!(
            matches!(got, Err(Failed::Call(CallError::Lost(_)))),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn past_its_limit_a_stream_is_cancelled_and_the_worker_kept_in_step() {
        let (got, mut runner) = collect(10, |mut w| async move {
            say(&mut w, &[b"head", b"200"]).await;
            say(&mut w, &[b"chunk", b"12345678"]).await;
            say(&mut w, &[b"chunk", b"12345678"]).await;
            // Sent before it saw the cancel.
            say(&mut w, &[b"chunk", b"12345678"]).await;
            assert_eq!(frame::read(&mut w).await.unwrap(), [b"cancel".to_vec()]);
            say(&mut w, &[b"end"]).await;
            // The next call's answer.
            say(&mut w, &[b"ok", b"200", b"next"]).await;
        })
        .await;
        assert!(
            matches!(
                got,
                Err(Failed::Call(CallError::Kept(InvokeError::ReplyTooLarge(_))))
            ),
            "{got:?}"
        );
        let next = parse_reply(frame::read(&mut runner).await.unwrap()).unwrap();
        assert_eq!(next.body, b"next", "in step");
    }

    #[tokio::test]
    async fn a_worker_that_does_not_stop_when_told_is_replaced() {
        let (mut runner, mut w) = pipes();
        let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
        let script = tokio::spawn(async move {
            frame::read(&mut w).await.unwrap();
            say(&mut w, &[b"head", b"200"]).await;
            say(&mut w, &[b"chunk", b"12345678"]).await;
            assert_eq!(frame::read(&mut w).await.unwrap(), [b"cancel".to_vec()]);
            // Holds the pipe open and says nothing until the Runner gave up.
            let _ = done.await;
        });
        let request = frame::encode([b"invoke".as_slice()]);
        let deadline = Instant::now() + Duration::from_secs(30);
        let started = Instant::now();
        let got = exchange(&mut runner, &request, Out::Collect(4), None, deadline).await;
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "within the grace"
        );
        let _ = done_tx.send(());
        script.await.unwrap();
        assert!(
            matches!(
                got,
                Err(Failed::Call(CallError::Lost(InvokeError::ReplyTooLarge(_))))
            ),
            "{got:?}"
        );
    }

    #[tokio::test]
    async fn a_func_raising_mid_stream_keeps_its_worker() {
        let (got, _) = collect(100, |mut w| async move {
            say(&mut w, &[b"head", b"200"]).await;
            say(&mut w, &[b"chunk", b"ab"]).await;
            say(&mut w, &[b"error", b"ValueError: no"]).await;
        })
        .await;
        match got {
            Err(Failed::Call(CallError::Kept(InvokeError::Handler(m)))) => {
                assert_eq!(m, "ValueError: no")
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_stream_breaking_the_protocol_replaces_the_worker() {
        let big = vec![b'x'; frame::MAX_CHUNK_BYTES + 1];
        let scripts: Vec<Vec<Vec<u8>>> = vec![
            vec![b"head".to_vec(), b"99".to_vec()],
            vec![b"head".to_vec(), b"200".to_vec(), b"lonely-name".to_vec()],
            vec![b"chunk".to_vec(), big],
            vec![b"chunk".to_vec(), b"a".to_vec(), b"b".to_vec()],
            vec![b"chunk".to_vec()],
            vec![b"ok".to_vec(), b"200".to_vec(), b"".to_vec()],
        ];
        for frame_items in scripts {
            let shown = String::from_utf8_lossy(&frame_items[0]).into_owned();
            let (got, _) = collect(usize::MAX, move |mut w| async move {
                if frame_items[0] != b"head" {
                    say(&mut w, &[b"head", b"200"]).await;
                }
                let items: Vec<&[u8]> = frame_items.iter().map(Vec::as_slice).collect();
                say(&mut w, &items).await;
            })
            .await;
            assert!(
                matches!(
                    got,
                    Err(Failed::Call(CallError::Lost(InvokeError::Crashed(_))))
                ),
                "{shown}: {got:?}"
            );
        }
        // A worker gone mid-stream: a frame error, handled as a crash.
        let (got, _) = collect(100, |mut w| async move {
            say(&mut w, &[b"head", b"200"]).await;
            say(&mut w, &[b"chunk", b"ab"]).await;
        })
        .await;
        assert!(
            matches!(got, Err(Failed::Frame(frame::FrameError::Closed))),
            "{got:?}"
        );
    }
}
