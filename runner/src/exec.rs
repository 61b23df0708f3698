//! The exec runtime: any executable as a Func, one process per invocation,
//! as OpenFaaS's classic watchdog and tinyFaaS's `binary` runtime do.
//!
//! The request body goes to the process's stdin and its stdout, byte for
//! byte, is the response body (200; `text/plain` when it is UTF-8, else
//! `application/octet-stream`). The request is described in environment
//! variables, OpenFaaS style: `Http_Method`, `Http_Path`, `Http_Query`, one
//! `Http_<Header_Name>` per header, plus `FUNCATRON_OPERATION`,
//! `FUNCATRON_REQUEST_ID` and `FUNCATRON_PARAM_<name>` per path parameter.
//! The environment is otherwise empty but for `PATH`, `HOME` and `TMPDIR`
//! (a fresh scratch directory per call) and the bundle's declared `env` and
//! `secrets`. Each process runs in its own sandbox ([`crate::sandbox`]): it
//! sees its bundle read-only, its scratch directory and the system's
//! runtime files, nothing else of the Runner's.
//!
//! Limits: the process runs in its own process group, killed as a whole at
//! its time limit (504); its address space is capped with `prlimit --as`
//! and its CPU time with `prlimit --cpu` (time limit + 1 s) (util-linux); a non-zero exit is a 500 with the end of its stderr. Every stderr line goes to the Runner's log with the
//! request id.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use funcatron_bundle::Bundle;
use tokio::io::AsyncWriteExt;

use crate::error::PrepareError;
use crate::invoke::{FuncRequest, FuncResponse, InvokeError};
use crate::observe::Observer;
use crate::runtime::{Called, Runtime};
use crate::sandbox::{Isolation, Sandbox};
use crate::serve::RunnerOptions;

/// Limits for exec Funcs unless a bundle sets its own.
#[derive(Debug, Clone, Copy)]
pub struct ExecLimits {
    /// Longest one invocation may run.
    pub timeout: Duration,
    /// Address-space limit of the process.
    pub memory_bytes: usize,
}

/// An exec bundle version, ready to run.
pub struct ExecFunc {
    name: String,
    /// Where the processes' stderr lines go (with the request id).
    observer: Observer,
    dir: PathBuf,
    argv: Vec<String>,
    timeout: Duration,
    memory_bytes: usize,
    env: std::collections::BTreeMap<String, String>,
    version: String,
    isolation: Isolation,
    /// Most stdout bytes kept: one past the reply limit, so a larger
    /// answer is refused by the skeleton, never held whole.
    max_stdout: usize,
}

/// Most stderr bytes kept per call (its lines go to the log).
const MAX_STDERR: usize = 1024 * 1024;

/// Read `pipe` keeping at most `max` bytes; the rest is drained (so the
/// process never blocks on a full pipe) and counted as cut.
async fn read_bounded(
    pipe: Option<impl tokio::io::AsyncRead + Unpin>,
    max: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    use tokio::io::AsyncReadExt;
    let Some(pipe) = pipe else {
        return Ok((Vec::new(), false));
    };
    let mut kept = Vec::new();
    let mut head = pipe.take(max as u64);
    head.read_to_end(&mut kept).await?;
    let mut rest = head.into_inner();
    let cut = tokio::io::copy(&mut rest, &mut tokio::io::sink()).await? > 0;
    Ok((kept, cut))
}

/// The request variables Funcatron sets itself; a header that would map
/// onto one of them is not passed.
const RESERVED: &[&str] = &["Http_Method", "Http_Path", "Http_Query"];

/// `content-type` -> `Http_Content_Type`, as OpenFaaS's watchdog names them.
fn env_name(header: &str) -> String {
    let mut out = String::from("Http_");
    for (i, part) in header.split('-').enumerate() {
        if i > 0 {
            out.push('_');
        }
        let mut chars = part.chars();
        if let Some(first) = chars.next() {
            out.extend(first.to_uppercase());
            out.extend(chars.map(|c| c.to_ascii_lowercase()));
        }
    }
    out
}

impl ExecFunc {
    async fn run(&self, req: &FuncRequest<'_>) -> Result<FuncResponse, InvokeError> {
        let env = req.envelope;
        let scratch = crate::sandbox::scratch_dir()
            .map_err(|e| InvokeError::Broken(format!("cannot create a scratch directory: {e}")))?;
        let mut vars = self.env.clone();
        for (k, v) in &env.headers {
            let name = env_name(k);
            // A client header must not pose as a request variable
            // (`Method: DELETE` would be `Http_Method`).
            if !RESERVED.contains(&name.as_str()) {
                vars.insert(name, v.to_string());
            }
        }
        for (k, v) in [
            ("Http_Method", env.method.as_ref()),
            ("Http_Path", env.path.as_ref()),
            ("Http_Query", env.query.as_ref()),
            ("FUNCATRON_OPERATION", req.operation),
            ("FUNCATRON_REQUEST_ID", env.id.as_ref()),
        ] {
            vars.insert(k.to_owned(), v.to_owned());
        }
        for (k, v) in req.params {
            vars.insert(format!("FUNCATRON_PARAM_{k}"), v.clone());
        }
        // Query parameters decoded (the first of a repeated name), for
        // programs that would rather not parse `Http_Query`: a chain
        // stage's options arrive so (`sed e=s/a/b/`).
        for (k, v) in form_urlencoded::parse(env.query.as_bytes()) {
            if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
                vars.entry(format!("FUNCATRON_QUERY_{k}"))
                    .or_insert_with(|| v.into_owned());
            }
        }
        let sandbox = Sandbox {
            dir: self.dir.clone(),
            scratch: scratch.path().to_owned(),
            ro: Vec::new(),
            env: vars,
        };
        // CPU seconds as a backstop to the time limit (which kills the
        // process group): a process that escaped it still stops.
        let cpu_s = self.timeout.as_secs() + 1;
        let mut args = vec![
            format!("--as={}", self.memory_bytes),
            format!("--cpu={cpu_s}"),
            "--".to_owned(),
        ];
        args.extend(self.argv.iter().cloned());
        let mut cmd = sandbox.command(&self.isolation, "prlimit", &args);
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group, so a timeout kills what it started too
            // (in a sandbox: bwrap, whose death ends the whole sandbox).
            .process_group(0)
            .kill_on_drop(true);
        let mut child = cmd
            .spawn()
            .map_err(|e| InvokeError::Broken(format!("cannot start {:?}: {e}", self.argv)))?;
        if let Some(mut stdin) = child.stdin.take() {
            let body = req.body.clone();
            // A Func that never reads its stdin must not block us.
            tokio::spawn(async move {
                let _ = stdin.write_all(&body).await;
            });
        }
        let pgid = child.id();
        let left = req.deadline.saturating_duration_since(Instant::now());
        let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
        let outputs = async {
            let (out, err, status) = tokio::join!(
                read_bounded(stdout, self.max_stdout),
                read_bounded(stderr, MAX_STDERR),
                child.wait()
            );
            Ok::<_, std::io::Error>((out?.0, err?.0, status?))
        };
        let (stdout, stderr, status) = match tokio::time::timeout(left, outputs).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => {
                return Err(InvokeError::Handler(format!(
                    "waiting for the process: {e}"
                )))
            }
            Err(_) => {
                // Kill the whole group; dropping the child reaps the leader.
                if let Some(pgid) = pgid {
                    crate::worker::kill_group(pgid).await;
                }
                return Err(InvokeError::Timeout(format!(
                    "the process ran longer than {} ms and was killed",
                    left.as_millis()
                )));
            }
        };
        self.answer(&env.id, stdout, &stderr, status)
    }

    /// The answer of a finished process: its stderr lines logged, a failed
    /// exit as a 500 with the end of its stderr, else its stdout.
    fn answer(
        &self,
        request_id: &str,
        stdout: Vec<u8>,
        stderr: &[u8],
        status: std::process::ExitStatus,
    ) -> Result<FuncResponse, InvokeError> {
        let func = self.name.as_str();
        let stderr = String::from_utf8_lossy(stderr);
        for line in stderr.lines() {
            let line = &*crate::observe::log_line(line);
            tracing::info!(func, request_id, "{line}");
            self.observer
                .func_log(func, &self.version, request_id, "stderr", line);
        }
        if !status.success() {
            let tail: String = stderr
                .chars()
                .rev()
                .take(500)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(InvokeError::Handler(format!(
                "the process exited with {}: {}",
                status,
                tail.trim()
            )));
        }
        let content_type = if std::str::from_utf8(&stdout).is_ok() {
            "text/plain; charset=utf-8"
        } else {
            "application/octet-stream"
        };
        Ok(FuncResponse {
            status: 200,
            headers: vec![("content-type".into(), content_type.into())],
            body: stdout,
        })
    }
}

impl Runtime for ExecFunc {
    async fn prepare(
        b: &Bundle,
        options: &RunnerOptions,
        observer: &Observer,
    ) -> Result<Self, PrepareError> {
        let limits = options.exec_limits;
        Ok(ExecFunc {
            name: b.name.clone(),
            observer: observer.clone(),
            dir: b.dir.clone(),
            argv: b.command.clone(),
            timeout: b
                .timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(limits.timeout),
            memory_bytes: b.memory_bytes.unwrap_or(limits.memory_bytes),
            env: b.env.clone(),
            version: b.version.clone(),
            isolation: options.sandbox.isolation().await,
            max_stdout: options.max_reply_bytes.saturating_add(1),
        })
    }

    fn max_time_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }

    async fn call(&self, req: FuncRequest<'_>) -> Called {
        let started = Instant::now();
        let result = self.run(&req).await;
        Called { started, result }
    }
}

#[cfg(test)]
mod tests {
    use super::env_name;

    #[test]
    fn header_names_become_openfaas_variables() {
        assert_eq!(env_name("content-type"), "Http_Content_Type");
        assert_eq!(env_name("x-forwarded-for"), "Http_X_Forwarded_For");
        assert_eq!(env_name("accept"), "Http_Accept");
    }

    #[tokio::test]
    async fn output_past_the_bound_is_drained_not_kept() {
        let big = vec![b'x'; 100_000];
        let (kept, cut) = super::read_bounded(Some(big.as_slice()), 1000)
            .await
            .unwrap();
        assert_eq!((kept.len(), cut), (1000, true));
        let (kept, cut) = super::read_bounded(Some(&b"small"[..]), 1000)
            .await
            .unwrap();
        assert_eq!((kept.as_slice(), cut), (&b"small"[..], false));
    }
}
