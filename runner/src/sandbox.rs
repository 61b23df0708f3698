//! Func isolation: every worker process ([`crate::worker`]) and every exec
//! process ([`crate::exec`]) the Runner starts is started here, inside a
//! bubblewrap (`bwrap`) sandbox.
//!
//! Tron -> Func queue -> **Runner -> sandbox -> Func process**. A
//! [`Sandbox`] says what one Func process may see: its bundle and the
//! prepared files it runs from (a Python virtualenv, compiled Java, the
//! shims), read-only; one private writable scratch directory (its `HOME`
//! and `TMPDIR`); the system's read-only runtime files ([`SYSTEM`]); its
//! own `/proc` and `/dev`. Nothing else of the Runner's file system is
//! mounted: not the secrets directory, not other bundles, not the cache
//! of other Funcs. It runs in new user, pid, ipc and uts namespaces as
//! uid/gid 65534 (so neither the Runner nor other Funcs' processes exist
//! for it), in a new session, and dies with its parent. The network is
//! shared: Funcs call out.
//!
//! Its environment is exactly the one the runtime built (declared `env`
//! with secrets resolved, request variables): `bwrap` itself is started
//! with a cleared environment holding only that, so nothing of the
//! Runner's passes and no value appears on a command line.
//!
//! Fail closed: [`SandboxOptions::isolation`] runs `bwrap ... true` once
//! per `bwrap` path; if that fails, worker and exec Funcs are refused
//! (503 `sandbox_unavailable`), unless the operator opted out with
//! `--insecure-no-sandbox`, where Funcs run as plain child processes.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

use crate::observe::poisoned;

/// The uid and gid a sandboxed Func runs as (`nobody`).
pub const FUNC_UID: u32 = 65534;

/// System paths mounted read-only when they exist (symlinks, as on a
/// merged-`/usr` system, are recreated as symlinks).
pub const SYSTEM: &[&str] = &[
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/opt",
    "/etc/alternatives",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/pki",
    "/etc/java-17-openjdk",
    "/etc/java-21-openjdk",
    "/etc/resolv.conf",
    "/etc/hosts",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/gai.conf",
    "/etc/localtime",
    "/etc/mime.types",
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
];

/// How the Runner isolates worker and exec Funcs (its flags).
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// The `bwrap` program.
    pub bwrap: PathBuf,
    /// Run worker and exec Funcs without isolation (they can read the
    /// Runner's environment, other Funcs' secrets and bundles).
    pub insecure_no_sandbox: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            bwrap: PathBuf::from("bwrap"),
            insecure_no_sandbox: false,
        }
    }
}

/// What the Runner does with worker and exec Funcs, decided once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Isolation {
    /// Each process in a `bwrap` sandbox.
    Bwrap(PathBuf),
    /// Plain child processes: the operator opted out.
    Insecure,
    /// Isolation does not work here: such Funcs are refused, and why.
    Unavailable(String),
}

/// Results of the `bwrap ... true` probe, per `bwrap` path (probed once per
/// process).
static PROBED: Mutex<Option<HashMap<PathBuf, Result<(), String>>>> = Mutex::new(None);

impl SandboxOptions {
    /// The isolation these options give on this machine (the probe runs
    /// once per `bwrap` path and process).
    pub async fn isolation(&self) -> Isolation {
        if self.insecure_no_sandbox {
            return Isolation::Insecure;
        }
        let known = PROBED
            .lock()
            .unwrap_or_else(|e| poisoned("sandbox.probed", e))
            .as_ref()
            .and_then(|m| m.get(&self.bwrap).cloned());
        let result = match known {
            Some(r) => r,
            None => {
                let r = probe(&self.bwrap).await;
                PROBED
                    .lock()
                    .unwrap_or_else(|e| poisoned("sandbox.probed", e))
                    .get_or_insert_with(HashMap::new)
                    .insert(self.bwrap.clone(), r.clone());
                r
            }
        };
        match result {
            Ok(()) => Isolation::Bwrap(self.bwrap.clone()),
            Err(why) => Isolation::Unavailable(why),
        }
    }

    /// Decide, and log the decision (once, at Runner start).
    pub async fn decide_and_log(&self) -> Isolation {
        let isolation = self.isolation().await;
        match &isolation {
            Isolation::Bwrap(p) => tracing::info!(
                bwrap = %p.display(),
                "Func isolation: worker and exec Funcs run in bubblewrap sandboxes"
            ),
            Isolation::Insecure => tracing::warn!(
                "Func isolation OFF (--insecure-no-sandbox): worker and exec Funcs run as plain child processes and can read this Runner's environment, secrets and bundles"
            ),
            Isolation::Unavailable(why) => tracing::error!(
                reason = %why,
                "Func isolation unavailable: worker and exec Funcs are refused (503 sandbox_unavailable); install bubblewrap and allow user namespaces, or pass --insecure-no-sandbox"
            ),
        }
        isolation
    }
}

/// Run `bwrap <the sandbox> true`; why it does not work.
async fn probe(bwrap: &Path) -> Result<(), String> {
    let scratch = tempfile::Builder::new()
        .prefix("funcatron-probe")
        .tempdir()
        .map_err(|e| format!("cannot create a scratch directory: {e}"))?;
    let sandbox = Sandbox {
        dir: PathBuf::from("/"),
        scratch: scratch.path().to_owned(),
        ro: Vec::new(),
        env: BTreeMap::new(),
    };
    let mut cmd = sandbox.command(&Isolation::Bwrap(bwrap.to_owned()), "true", &[]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(10), cmd.output())
        .await
        .map_err(|_| format!("{} did not finish within 10 s", bwrap.display()))?
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{} failed ({}): {}",
        bwrap.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    ))
}

/// What one Func process may see.
#[derive(Debug, Clone)]
pub struct Sandbox {
    /// Its working directory (its bundle), mounted read-only.
    pub dir: PathBuf,
    /// Its private writable directory: `HOME` and `TMPDIR`.
    pub scratch: PathBuf,
    /// More read-only paths (prepared files, the worker socket's directory).
    pub ro: Vec<PathBuf>,
    /// Its whole environment but `PATH`, `HOME` and `TMPDIR`.
    pub env: BTreeMap<String, String>,
}

impl Sandbox {
    /// The command that runs `program args` in this sandbox (or, with
    /// [`Isolation::Insecure`], as a plain child with the same environment).
    pub fn command(
        &self,
        isolation: &Isolation,
        program: impl AsRef<std::ffi::OsStr>,
        args: &[String],
    ) -> tokio::process::Command {
        let mut cmd = match isolation {
            Isolation::Bwrap(bwrap) => {
                let mut cmd = tokio::process::Command::new(bwrap);
                cmd.args(self.bwrap_args()).arg("--").arg(program);
                cmd
            }
            Isolation::Insecure | Isolation::Unavailable(_) => {
                tokio::process::Command::new(program)
            }
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin")
            .env("HOME", &self.scratch)
            .env("TMPDIR", &self.scratch)
            .envs(&self.env);
        cmd
    }

    /// `bwrap`'s options for this sandbox, before `--` and the program.
    pub fn bwrap_args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "--unshare-user",
            "--unshare-pid",
            "--unshare-ipc",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--hostname",
            "func",
        ]
        .map(String::from)
        .into();
        a.extend(["--uid".into(), FUNC_UID.to_string()]);
        a.extend(["--gid".into(), FUNC_UID.to_string()]);
        for p in SYSTEM {
            system_mount(Path::new(p), &mut a);
        }
        let mut push = |op: &str, p: &Path| {
            let s = absolute(p).display().to_string();
            a.extend([op.to_owned(), s.clone(), s]);
        };
        for p in &self.ro {
            push("--ro-bind", p);
        }
        push("--ro-bind", &self.dir);
        push("--bind", &self.scratch);
        a.extend(["--proc".into(), "/proc".into()]);
        a.extend(["--dev".into(), "/dev".into()]);
        // Nothing outside the scratch directory is writable.
        a.extend(["--remount-ro".into(), "/".into()]);
        a.extend(["--chdir".into(), absolute(&self.dir).display().to_string()]);
        a
    }
}

/// `p` as bwrap needs it: absolute, links resolved (as is, if it cannot be).
fn absolute(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_owned())
}

/// Mount one system path read-only (a symlink as the same symlink).
fn system_mount(p: &Path, a: &mut Vec<String>) {
    let s = p.display().to_string();
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_symlink() => {
            if let Ok(target) = std::fs::read_link(p) {
                a.extend(["--symlink".into(), target.display().to_string(), s]);
            }
        }
        Ok(_) => a.extend(["--ro-bind".into(), s.clone(), s]),
        Err(_) => {}
    }
}

/// A fresh scratch directory for one Func process.
pub fn scratch_dir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("funcatron-scratch")
        .tempdir()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn no_environment_value_is_on_the_command_line() {
        let mut env = BTreeMap::new();
        env.insert("TOKEN".to_owned(), "s3cret-value".to_owned());
        let s = Sandbox {
            dir: PathBuf::from("/srv/bundle"),
            scratch: PathBuf::from("/tmp/scratch"),
            ro: vec![PathBuf::from("/cache/venv")],
            env,
        };
        let args = s.bwrap_args();
        assert!(!args.iter().any(|a| a.contains("s3cret")), "{args:?}");
        let joined = args.join(" ");
        assert!(
            joined.contains("--ro-bind /srv/bundle /srv/bundle"),
            "{joined}"
        );
        assert!(
            joined.contains("--bind /tmp/scratch /tmp/scratch"),
            "{joined}"
        );
        assert!(
            joined.contains("--ro-bind /cache/venv /cache/venv"),
            "{joined}"
        );
        assert!(joined.contains("--uid 65534 --gid 65534"), "{joined}");
    }
}
