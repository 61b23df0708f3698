//! The CLI side of the management API: `bundle build|push`, `func ...`,
//! `invoke`. Everything but `bundle build` talks only to a Tron's
//! management API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use funcatron_bundle::archive;
use serde_json::{json, Value};

/// Where the management API is and how to authenticate.
#[derive(Args, Clone)]
pub struct Remote {
    /// The Tron's management API.
    #[arg(
        long,
        env = "FUNCATRON_TRON_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    tron: String,
    /// Management token.
    #[arg(long, env = "FUNCATRON_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// File holding the management token (e.g. <store>/token).
    #[arg(long, env = "FUNCATRON_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

impl Remote {
    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.tron.trim_end_matches('/'))
    }

    fn token(&self) -> Result<Option<String>> {
        if let Some(t) = &self.token {
            return Ok(Some(t.trim().to_owned()));
        }
        match &self.token_file {
            Some(f) => Ok(Some(
                std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?
                    .trim()
                    .to_owned(),
            )),
            None => Ok(None),
        }
    }

    fn post(&self, http: &reqwest::Client, path: &str) -> Result<reqwest::RequestBuilder> {
        let mut rb = http.post(self.url(path));
        if let Some(t) = self.token()? {
            rb = rb.bearer_auth(t);
        }
        Ok(rb)
    }
}

/// Answer JSON, or an error with the API's message.
async fn answer(r: reqwest::Response) -> Result<Value> {
    let status = r.status();
    let text = r.text().await?;
    let v: Value = serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
    if !status.is_success() {
        let msg = v["message"].as_str().unwrap_or(&text);
        bail!("{status}: {msg}");
    }
    Ok(v)
}

/// Build an archive of `dir`; returns (sha, path written).
pub fn build(dir: &Path, out: Option<&Path>) -> Result<(String, PathBuf, String)> {
    let (bundle, bytes) = archive::build(dir)?;
    let sha = archive::sha256_hex(&bytes);
    let path = match out {
        Some(p) => p.to_owned(),
        None => PathBuf::from(format!("{}-{}.tar.gz", bundle.name, &sha[..12])),
    };
    std::fs::write(&path, &bytes).with_context(|| format!("writing {}", path.display()))?;
    Ok((sha, path, bundle.name))
}

/// Upload an archive (or a directory, built first) with a progress bar.
pub async fn push(remote: &Remote, path: &Path, enable: bool) -> Result<Value> {
    let (bytes, name) = if path.is_dir() {
        let (bundle, bytes) = archive::build(path)?;
        (bytes, bundle.name)
    } else {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = name
            .strip_suffix(".tar.gz")
            .map(|n| n.rsplit_once('-').map(|(a, _)| a).unwrap_or(n))
            .unwrap_or(&name)
            .to_owned();
        (bytes, name)
    };
    let total = bytes.len() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "uploading {bytes}/{total_bytes} [{bar:30}] {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let chunks: Vec<Vec<u8>> = bytes.chunks(64 * 1024).map(<[u8]>::to_vec).collect();
    let progress = bar.clone();
    let stream = futures::stream::iter(chunks.into_iter().map(move |c| {
        progress.inc(c.len() as u64);
        Ok::<_, std::io::Error>(c)
    }));
    let http = reqwest::Client::new();
    let r = remote
        .post(&http, "/v1/bundles")?
        .query(&[
            ("name", name.as_str()),
            ("enable", if enable { "true" } else { "false" }),
        ])
        .header("content-type", "application/gzip")
        .header("content-length", total)
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .with_context(|| format!("uploading to {}", remote.tron))?;
    bar.finish_and_clear();
    answer(r).await
}

/// `funcatron func ...`.
#[derive(Subcommand)]
pub enum FuncCmd {
    /// Every Func, its enabled version and routes.
    List(Plain),
    /// One Func: settings, uploads, effective routes.
    Show(Named),
    /// Uploads and enable/disable/rollback events.
    History(Named),
    /// Route to a version (default: the latest upload), with settings.
    Enable(EnableArgs),
    /// Stop routing to a Func (its routes answer 404).
    Disable(Named),
    /// Enable the version that was enabled before the current one.
    Rollback(Named),
}

/// No arguments but the remote.
#[derive(Args)]
pub struct Plain {
    #[command(flatten)]
    remote: Remote,
}

/// A Func name.
#[derive(Args)]
pub struct Named {
    /// The Func.
    name: String,
    #[command(flatten)]
    remote: Remote,
}

/// `func enable`.
#[derive(Args)]
pub struct EnableArgs {
    /// The Func.
    name: String,
    /// The version (archive SHA-256; default the latest upload).
    #[arg(long)]
    sha: Option<String>,
    /// Environment variable for the Func, KEY=VALUE (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    env: Vec<String>,
    /// Secret the Func needs (repeatable); values come from the Runners.
    #[arg(long = "secret")]
    secrets: Vec<String>,
    /// Worker processes per Runner.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Per-invocation time limit.
    #[arg(long)]
    timeout_ms: Option<u64>,
    /// Memory limit.
    #[arg(long)]
    memory_mb: Option<usize>,
    /// Fewest Runners (autoscaler).
    #[arg(long)]
    min_runners: Option<u32>,
    /// Most Runners (autoscaler).
    #[arg(long)]
    max_runners: Option<u32>,
    #[command(flatten)]
    remote: Remote,
}

/// Run a `func` command; returns what to print.
pub async fn func(cmd: FuncCmd) -> Result<String> {
    let http = reqwest::Client::new();
    let pretty = |v: &Value| serde_json::to_string_pretty(v).unwrap_or_default();
    match cmd {
        FuncCmd::List(a) => {
            let v = answer(http.get(a.remote.url("/v1/funcs")).send().await?).await?;
            let mut out = String::from("NAME                 ENABLED       RUNTIME  ROUTES\n");
            for f in v["funcs"].as_array().into_iter().flatten() {
                let enabled = f["enabled"]
                    .as_str()
                    .map(|s| &s[..12.min(s.len())])
                    .unwrap_or("-");
                let routes = &f["routes"];
                out.push_str(&format!(
                    "{:<20} {:<13} {:<8} {}{}\n",
                    f["name"].as_str().unwrap_or_default(),
                    enabled,
                    routes["runtime"].as_str().unwrap_or("-"),
                    routes["host"].as_str().unwrap_or(""),
                    routes["basePath"].as_str().unwrap_or(""),
                ));
            }
            Ok(out)
        }
        FuncCmd::Show(a) => {
            let v = answer(
                http.get(a.remote.url(&format!("/v1/funcs/{}", a.name)))
                    .send()
                    .await?,
            )
            .await?;
            Ok(pretty(&v))
        }
        FuncCmd::History(a) => {
            let v = answer(
                http.get(a.remote.url(&format!("/v1/funcs/{}/history", a.name)))
                    .send()
                    .await?,
            )
            .await?;
            let mut out = String::new();
            for e in v["history"].as_array().into_iter().flatten() {
                out.push_str(&format!(
                    "{} {:<8} {}\n",
                    e["at_ms"],
                    e["action"].as_str().unwrap_or_default(),
                    e["sha"].as_str().unwrap_or("-")
                ));
            }
            Ok(out)
        }
        FuncCmd::Enable(a) => {
            let mut env = BTreeMap::new();
            for kv in &a.env {
                let (k, v) = kv
                    .split_once('=')
                    .with_context(|| format!("--env {kv}: expected KEY=VALUE"))?;
                env.insert(k.to_owned(), v.to_owned());
            }
            let mut settings = json!({});
            if !env.is_empty() {
                settings["env"] = json!(env);
            }
            if !a.secrets.is_empty() {
                settings["secrets"] = json!(a.secrets);
            }
            for (k, v) in [
                ("concurrency", a.concurrency.map(|n| n as u64)),
                ("timeout_ms", a.timeout_ms),
                ("memory_mb", a.memory_mb.map(|n| n as u64)),
                ("min_runners", a.min_runners.map(u64::from)),
                ("max_runners", a.max_runners.map(u64::from)),
            ] {
                if let Some(v) = v {
                    settings[k] = json!(v);
                }
            }
            let mut body = json!({"settings": settings});
            if let Some(sha) = &a.sha {
                body["sha"] = json!(sha);
            }
            let v = answer(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/enable", a.name))?
                    .json(&body)
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!(
                "enabled {} {}\n",
                a.name,
                v["enabled"].as_str().unwrap_or_default()
            ))
        }
        FuncCmd::Disable(a) => {
            answer(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/disable", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!("disabled {}\n", a.name))
        }
        FuncCmd::Rollback(a) => {
            let v = answer(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/rollback", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!(
                "rolled back {} to {}\n",
                a.name,
                v["enabled"].as_str().unwrap_or_default()
            ))
        }
    }
}

/// `funcatron invoke`.
#[derive(Args)]
pub struct InvokeArgs {
    /// The Func.
    name: String,
    /// Path below its basePath.
    #[arg(default_value = "/")]
    path: String,
    /// HTTP method.
    #[arg(short = 'X', long, default_value = "GET")]
    method: String,
    /// Query string, without `?`.
    #[arg(short, long)]
    query: Option<String>,
    /// Header, `Name: value` (repeatable).
    #[arg(short = 'H', long = "header")]
    headers: Vec<String>,
    /// Request body (`@file` reads a file).
    #[arg(short, long)]
    data: Option<String>,
    /// Print the status and headers too.
    #[arg(short, long)]
    include: bool,
    #[command(flatten)]
    remote: Remote,
}

/// Call a Func through the Tron; returns the output and whether it was a 2xx.
pub async fn invoke(a: InvokeArgs) -> Result<(Vec<u8>, bool)> {
    let mut headers = BTreeMap::new();
    for h in &a.headers {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("-H {h}: expected `Name: value`"))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    let body = match &a.data {
        Some(d) if d.starts_with('@') => {
            Some(std::fs::read_to_string(&d[1..]).with_context(|| format!("reading {}", &d[1..]))?)
        }
        Some(d) => Some(d.clone()),
        None => None,
    };
    let http = reqwest::Client::new();
    let r = a
        .remote
        .post(&http, &format!("/v1/funcs/{}/invoke", a.name))?
        .json(&json!({
            "method": a.method,
            "path": a.path,
            "query": a.query,
            "headers": headers,
            "body": body,
        }))
        .send()
        .await
        .with_context(|| format!("calling {}", a.remote.tron))?;
    let ok = r.status().is_success();
    let mut out = Vec::new();
    if a.include {
        out.extend_from_slice(format!("{:?} {}\n", r.version(), r.status()).as_bytes());
        for (k, v) in r.headers() {
            out.extend_from_slice(format!("{k}: {}\n", v.to_str().unwrap_or("?")).as_bytes());
        }
        out.push(b'\n');
    }
    out.extend_from_slice(&r.bytes().await?);
    Ok((out, ok))
}
