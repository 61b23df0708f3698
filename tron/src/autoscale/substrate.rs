//! Where Runners run: the [`Substrate`] trait the autoscaler drives, and the
//! `process` substrate (Runners as child processes of the Tron).
//!
//! A substrate knows one thing per Func: how many Runners it has been asked
//! to run, and how many run. `scale` is idempotent: asking twice for the
//! same count changes nothing. Scaling in always asks a Runner to stop
//! (SIGTERM, a container stop, a Deployment's graceful termination): the
//! Runner cancels its consumer, finishes and acknowledges what it holds,
//! then exits, so scale-in makes the broker redeliver nothing.

use funcatron_control::sync::poisoned;
use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Mutex;

/// A boxed future (substrates are used behind `dyn`).
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A substrate call failed.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// The substrate's API refused or could not be reached.
    #[error("{substrate}: {message}")]
    Substrate {
        /// Which substrate.
        substrate: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl ScaleError {
    /// An error of `substrate`.
    pub fn new(substrate: &'static str, message: impl std::fmt::Display) -> Self {
        ScaleError::Substrate {
            substrate,
            message: message.to_string(),
        }
    }
}

/// One Func's Runners as the substrate sees them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Observed {
    /// Runners the substrate has been asked to run (a Deployment's
    /// `spec.replicas`, a Marathon app's `instances`, live children).
    pub requested: u32,
    /// Runners running now.
    pub running: u32,
}

/// Somewhere Runners run, scaled per Func.
pub trait Substrate: Send + Sync + 'static {
    /// Its name (`process`, `docker`, ...).
    fn kind(&self) -> &'static str;
    /// `func`'s Runners now.
    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>>;
    /// Make `func` have `runners` Runners (idempotent).
    fn scale<'a>(&'a self, func: &'a str, runners: u32) -> BoxFut<'a, Result<(), ScaleError>>;
    /// The Tron is stopping: stop what this substrate started itself
    /// (child processes); orchestrated Runners are left to their
    /// orchestrator.
    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async {})
    }
}

/// How to start a Runner process for one Func.
#[derive(Debug, Clone)]
pub struct RunnerCommand {
    /// The `funcatron` executable.
    pub program: PathBuf,
    /// Arguments after `runner` (bundles, limits); `--func NAME` is added.
    pub args: Vec<String>,
    /// Environment variables the Runner gets: the broker URL goes here,
    /// never in the arguments, which every local user can read.
    pub env: Vec<(String, String)>,
}

impl RunnerCommand {
    /// The full argument list for `func`'s Runner.
    pub fn argv(&self, func: &str) -> Vec<String> {
        let mut v = Vec::with_capacity(self.args.len() + 3);
        v.push("runner".to_owned());
        v.extend(self.args.iter().cloned());
        v.push("--func".to_owned());
        v.push(func.to_owned());
        v
    }
}

/// Runners as child processes of the Tron (`funcatron runner --func F`).
pub struct ProcessSubstrate {
    command: RunnerCommand,
    children: Mutex<HashMap<String, Vec<tokio::process::Child>>>,
    stopping: tokio_util::task::TaskTracker,
}

impl ProcessSubstrate {
    /// Start Runners with `command`.
    pub fn new(command: RunnerCommand) -> Self {
        ProcessSubstrate {
            command,
            children: Mutex::default(),
            stopping: tokio_util::task::TaskTracker::new(),
        }
    }

    /// Process ids of `func`'s live Runners (for tests and `status`).
    pub fn pids(&self, func: &str) -> Vec<u32> {
        self.children
            .lock()
            .map(|c| {
                c.get(func)
                    .map(|v| v.iter().filter_map(|c| c.id()).collect())
                    .unwrap_or_default()
            })
            .unwrap_or_default()
    }

    /// Ask a child to stop (SIGTERM) and reap it in the background; it is
    /// killed if it has not exited after `grace`.
    fn stop(&self, mut child: tokio::process::Child, grace: std::time::Duration) {
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        self.stopping.spawn(async move {
            if tokio::time::timeout(grace, child.wait()).await.is_err() {
                tracing::warn!("a Runner did not stop within its grace period; killing it");
                let _ = child.kill().await;
            }
        });
    }
}

/// How long a stopping Runner may take to finish its in-flight work.
const GRACE: std::time::Duration = std::time::Duration::from_secs(60);

impl Substrate for ProcessSubstrate {
    fn kind(&self) -> &'static str {
        "process"
    }

    fn observe<'a>(&'a self, func: &'a str) -> BoxFut<'a, Result<Observed, ScaleError>> {
        Box::pin(async move {
            let mut children = self
                .children
                .lock()
                .unwrap_or_else(|e| poisoned("process.runners", e));
            let list = children.entry(func.to_owned()).or_default();
            // Reap Runners that exited (crashed, killed): they no longer count.
            list.retain_mut(|c| match c.try_wait() {
                Ok(Some(status)) => {
                    tracing::warn!(func, %status, "a Runner exited");
                    false
                }
                Ok(None) => true,
                Err(_) => false,
            });
            let n = list.len() as u32;
            Ok(Observed {
                requested: n,
                running: n,
            })
        })
    }

    fn scale<'a>(&'a self, func: &'a str, runners: u32) -> BoxFut<'a, Result<(), ScaleError>> {
        Box::pin(async move {
            let mut stop = Vec::new();
            {
                let mut children = self
                    .children
                    .lock()
                    .unwrap_or_else(|e| poisoned("process.runners", e));
                let list = children.entry(func.to_owned()).or_default();
                while (list.len() as u32) < runners {
                    let child = tokio::process::Command::new(&self.command.program)
                        .args(self.command.argv(func))
                        .envs(self.command.env.iter().map(|(k, v)| (k, v)))
                        .stdin(std::process::Stdio::null())
                        .env("FUNCATRON_PARENT_PID", std::process::id().to_string())
                        .kill_on_drop(true)
                        .spawn()
                        .map_err(|e| {
                            ScaleError::new(
                                "process",
                                format!("starting {}: {e}", self.command.program.display()),
                            )
                        })?;
                    tracing::info!(func, pid = child.id(), "started a Runner");
                    list.push(child);
                }
                while (list.len() as u32) > runners {
                    // The newest first: the oldest are warmest.
                    if let Some(c) = list.pop() {
                        stop.push(c);
                    }
                }
            }
            for c in stop {
                tracing::info!(func, pid = c.id(), "stopping a Runner");
                self.stop(c, GRACE);
            }
            Ok(())
        })
    }

    fn shutdown(&self) -> BoxFut<'_, ()> {
        Box::pin(async move {
            let all: Vec<tokio::process::Child> = self
                .children
                .lock()
                .map(|mut c| c.drain().flat_map(|(_, v)| v).collect())
                .unwrap_or_default();
            for c in all {
                self.stop(c, GRACE);
            }
            self.stopping.close();
            self.stopping.wait().await;
        })
    }
}
