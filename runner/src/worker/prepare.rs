//! Preparing a worker-process bundle, once per Runner, before its workers
//! start: the shims written out, a Python virtual environment for
//! `requirements.txt`, Java sources compiled. Results are cached under the
//! cache directory by content hash, built in a scratch directory and renamed
//! into place, so Runners sharing a cache never see half a build.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use funcatron_bundle::{Bundle, RuntimeKind};
use sha2::{Digest, Sha256};

use super::WorkerOptions;
use crate::error::WorkerError;

const PY_SHIM: &str = include_str!("../../shims/funcatron_worker.py");
const JS_SHIM: &str = include_str!("../../shims/funcatron_worker.js");
const JAVA_SHIM: &[(&str, &str)] = &[
    (
        "funcatron/Worker.java",
        include_str!("../../shims/java/funcatron/Worker.java"),
    ),
    (
        "funcatron/Request.java",
        include_str!("../../shims/java/funcatron/Request.java"),
    ),
    (
        "funcatron/Response.java",
        include_str!("../../shims/java/funcatron/Response.java"),
    ),
    (
        "funcatron/Json.java",
        include_str!("../../shims/java/funcatron/Json.java"),
    ),
    (
        "funcatron/Store.java",
        include_str!("../../shims/java/funcatron/Store.java"),
    ),
];

/// How to start one worker of a prepared bundle.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The program.
    pub program: PathBuf,
    /// Its arguments.
    pub args: Vec<String>,
    /// Working directory: the bundle.
    pub dir: PathBuf,
    /// Environment on top of `PATH`, `LANG` and `FUNCATRON_SOCKET`.
    pub env: BTreeMap<String, String>,
    /// Prepared files the worker runs from (shims, virtualenv, classes),
    /// mounted read-only in its sandbox.
    pub ro: Vec<PathBuf>,
}

fn hex(digest: impl AsRef<[u8]>) -> String {
    digest
        .as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Build `dest` with `build` (given a scratch directory beside it) unless
/// it is already there.
async fn cached<F, Fut>(dest: &Path, build: F) -> Result<(), WorkerError>
where
    F: FnOnce(PathBuf) -> Fut,
    Fut: std::future::Future<Output = Result<(), WorkerError>>,
{
    if dest.is_dir() {
        return Ok(());
    }
    let parent = dest.parent().ok_or(WorkerError::CacheRoot)?;
    std::fs::create_dir_all(parent).map_err(WorkerError::io(parent))?;
    let scratch = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(parent)
        .map_err(WorkerError::io(parent))?;
    let work = scratch.path().join("out");
    build(work.clone()).await?;
    match std::fs::rename(&work, dest) {
        Ok(()) => Ok(()),
        // Another Runner finished first: theirs is as good as ours.
        Err(_) if dest.is_dir() => Ok(()),
        Err(e) => Err(WorkerError::io(dest)(e)),
    }
}

/// Run a command to completion; on failure the end of its output.
async fn run(cmd: &mut tokio::process::Command, what: &str) -> Result<(), WorkerError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|source| WorkerError::Spawn {
            what: what.to_owned(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stdout));
    let tail: Vec<&str> = text.lines().rev().take(15).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(WorkerError::Build {
        what: what.to_owned(),
        status: out.status,
        tail: tail.join("\n"),
    })
}

/// The shims, written once per content.
async fn shims(options: &WorkerOptions, java: bool) -> Result<PathBuf, WorkerError> {
    let mut h = Sha256::new();
    h.update(PY_SHIM);
    h.update(JS_SHIM);
    for (name, text) in JAVA_SHIM {
        h.update(name);
        h.update(text);
    }
    let dir = options.cache_dir.join("shims").join(hex(h.finalize()));
    cached(&dir, |work| async move {
        let write = |rel: &str, text: &str| {
            let p = work.join(rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent).map_err(WorkerError::Dir)?;
            }
            std::fs::write(&p, text).map_err(WorkerError::io(&p))
        };
        write("funcatron_worker.py", PY_SHIM)?;
        write("funcatron_worker.js", JS_SHIM)?;
        for (name, text) in JAVA_SHIM {
            write(&format!("java-src/{name}"), text)?;
        }
        Ok(())
    })
    .await?;
    if java {
        let classes = dir.join("java");
        let src = dir.join("java-src");
        cached(&classes, |work| async move {
            let files: Vec<PathBuf> = JAVA_SHIM.iter().map(|(n, _)| src.join(n)).collect();
            run(
                tokio::process::Command::new("javac")
                    .arg("-encoding")
                    .arg("UTF-8")
                    .arg("-d")
                    .arg(&work)
                    .args(&files),
                "compiling the Java shim with javac",
            )
            .await
        })
        .await?;
    }
    Ok(dir)
}

fn java_sources(root: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(root)?.filter_map(Result::ok).collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let ft = e.file_type()?;
        let p = e.path();
        if ft.is_dir() {
            java_sources(&p, out)?;
        } else if ft.is_file() && p.extension().is_some_and(|x| x == "java") {
            out.push(p);
        }
    }
    Ok(())
}

/// Prepare `bundle` and say how to start its workers.
pub async fn prepare(bundle: &Bundle, options: &WorkerOptions) -> Result<Launch, WorkerError> {
    let memory = bundle.memory_bytes.unwrap_or(options.memory_bytes);
    let memory_mb = (memory / (1024 * 1024)).max(16);
    let shim_dir = shims(options, bundle.runtime == RuntimeKind::Java).await?;
    let mut env = super::shim_env(bundle);
    let mut ro = vec![shim_dir.clone()];
    let (program, args) = match bundle.runtime {
        RuntimeKind::Python => {
            let python = python_env(bundle, options).await?;
            ro.extend(venv_mounts(&python));
            env.insert("PYTHONDONTWRITEBYTECODE".into(), "1".into());
            env.insert("PYTHONUNBUFFERED".into(), "1".into());
            (
                PathBuf::from("prlimit"),
                vec![
                    format!("--as={memory}"),
                    "--".into(),
                    python,
                    "-u".into(),
                    shim_dir.join("funcatron_worker.py").display().to_string(),
                ],
            )
        }
        RuntimeKind::Node => (
            PathBuf::from("node"),
            vec![
                format!("--max-old-space-size={memory_mb}"),
                shim_dir.join("funcatron_worker.js").display().to_string(),
            ],
        ),
        RuntimeKind::Java => {
            let classes = java_build(bundle, options, &shim_dir.join("java")).await?;
            ro.push(classes.clone());
            (
                PathBuf::from("java"),
                vec![
                    format!("-Xmx{memory_mb}m"),
                    "-XX:+UseSerialGC".into(),
                    "-Xshare:auto".into(),
                    "-cp".into(),
                    format!("{}:{}", shim_dir.join("java").display(), classes.display()),
                    "funcatron.Worker".into(),
                ],
            )
        }
        other => return Err(WorkerError::NotWorker(other.as_str())),
    };
    Ok(Launch {
        program,
        args,
        dir: bundle.dir.clone(),
        env,
        ro,
    })
}

/// What a virtualenv's Python needs mounted: the environment (two levels
/// above `bin/python`) and the installation its `pyvenv.cfg` names as
/// `home` (its parent: `/usr` is mounted anyway, a pyenv or /opt build is
/// not). Nothing for the machine's `python3`.
fn venv_mounts(python: &str) -> Vec<PathBuf> {
    let Some(venv) = Path::new(python).parent().and_then(Path::parent) else {
        return Vec::new();
    };
    let Ok(cfg) = std::fs::read_to_string(venv.join("pyvenv.cfg")) else {
        return Vec::new();
    };
    let mut out = vec![venv.to_owned()];
    let home = cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k.trim() == "home").then(|| PathBuf::from(v.trim()))
    });
    if let Some(prefix) = home.as_deref().and_then(Path::parent) {
        if !prefix.starts_with("/usr") && prefix.is_absolute() && prefix != Path::new("/") {
            out.push(prefix.to_owned());
        }
    }
    out
}

/// The Python to run: the bundle's virtual environment when it has a
/// `requirements.txt`, else the machine's `python3`.
async fn python_env(bundle: &Bundle, options: &WorkerOptions) -> Result<String, WorkerError> {
    let req = bundle.dir.join("requirements.txt");
    let Ok(text) = std::fs::read(&req) else {
        return Ok("python3".into());
    };
    let meaningful = String::from_utf8_lossy(&text)
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
    if !meaningful {
        return Ok("python3".into());
    }
    let venv = options
        .cache_dir
        .join("python")
        .join(hex(Sha256::digest(&text)));
    let started = std::time::Instant::now();
    cached(&venv, |work| {
        let req = req.clone();
        async move {
            run(
                tokio::process::Command::new("python3")
                    .args(["-m", "venv"])
                    .arg(&work),
                "creating a virtual environment",
            )
            .await?;
            run(
                tokio::process::Command::new(work.join("bin/python"))
                    .args([
                        "-m",
                        "pip",
                        "install",
                        "--disable-pip-version-check",
                        "--no-input",
                        "-q",
                        "-r",
                    ])
                    .arg(&req),
                &format!("pip install -r {}", req.display()),
            )
            .await
        }
    })
    .await
    .map_err(|e| WorkerError::Requirements(Box::new(e)))?;
    tracing::info!(func = %bundle.name, venv = %venv.display(), ms = started.elapsed().as_millis() as u64, "Python environment ready");
    Ok(venv.join("bin/python").display().to_string())
}

/// Compile the bundle's Java sources against the shim.
async fn java_build(
    bundle: &Bundle,
    options: &WorkerOptions,
    shim: &Path,
) -> Result<PathBuf, WorkerError> {
    let root = bundle.dir.join(&bundle.handler);
    let mut files = Vec::new();
    java_sources(&root, &mut files).map_err(WorkerError::io(&root))?;
    if files.is_empty() {
        return Err(WorkerError::NoJavaSources(
            bundle.handler.display().to_string(),
        ));
    }
    let mut h = Sha256::new();
    h.update(shim.display().to_string());
    for f in &files {
        h.update(f.strip_prefix(&root).unwrap_or(f).display().to_string());
        h.update(std::fs::read(f).map_err(WorkerError::io(f))?);
    }
    let out = options
        .cache_dir
        .join("java")
        .join(format!("{}-{}", bundle.name, hex(h.finalize())));
    cached(&out, |work| async move {
        run(
            tokio::process::Command::new("javac")
                .current_dir(&root)
                .arg("-encoding")
                .arg("UTF-8")
                .arg("-cp")
                .arg(shim)
                .arg("-d")
                .arg(&work)
                .args(files.iter().map(|f| f.strip_prefix(&root).unwrap_or(f))),
            "javac",
        )
        .await
    })
    .await?;
    Ok(out)
}
