//! The CLI side of the management API: `bundle build|push`, `func ...`,
//! `invoke`. Everything but `bundle build` talks only to a Tron's
//! management API.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use funcatron_bundle::archive;
use funcatron_control::state::FuncSettings;
use funcatron_tron::mgmt::api::{
    ApiError, CaptureRequest, CaptureStarted, CaptureStopped, EffectiveRoutes, EnableRequest,
    Enabled, FuncDetail, FuncHistory, FuncList, InvokeRequest, LogLevelRequest, LogLevelSet,
    LogLine, Routes, Status, Uploaded,
};
use serde::de::DeserializeOwned;

/// Where the management API is and how to authenticate.
#[derive(Args, Clone)]
#[command(about = "Per Func: queue depth, arrival rate, service time, Runners")]
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
    /// Read-only token (e.g. <store>/read-token): enough for reads (`func
    /// list|show|history`, `logs`, `capture export`, `status`, `replay`);
    /// the management token is used instead when given.
    #[arg(long, env = "FUNCATRON_READ_TOKEN", hide_env_values = true)]
    read_token: Option<String>,
}

impl Remote {
    /// The URL of an API path.
    pub fn url(&self, path: &str) -> String {
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

    /// A GET with the management token, else the read token, when there
    /// is one (every read but the health check needs one).
    pub fn get(&self, http: &reqwest::Client, path: &str) -> Result<reqwest::RequestBuilder> {
        let mut rb = http.get(self.url(path));
        let token = match self.token()? {
            Some(t) => Some(t),
            None => self.read_token.as_ref().map(|t| t.trim().to_owned()),
        };
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        Ok(rb)
    }

    /// A POST with the token when there is one.
    pub fn post(&self, http: &reqwest::Client, path: &str) -> Result<reqwest::RequestBuilder> {
        let mut rb = http.post(self.url(path));
        if let Some(t) = self.token()? {
            rb = rb.bearer_auth(t);
        }
        Ok(rb)
    }
}

/// The answer's body as `T`, or an error with the API's message.
pub(crate) async fn answer<T: DeserializeOwned>(r: reqwest::Response) -> Result<T> {
    let status = r.status();
    let url = r.url().path().to_owned();
    let text = r.text().await?;
    if !status.is_success() {
        match serde_json::from_str::<ApiError>(&text) {
            Ok(e) => bail!("{status}: {}", e.message),
            Err(_) => bail!("{status}: {text}"),
        }
    }
    serde_json::from_str(&text).with_context(|| format!("reading the answer of {url}: {text}"))
}

/// An error with the API's message, for an answer that was not a 2xx.
async fn failed(r: reqwest::Response) -> anyhow::Error {
    match answer::<serde::de::IgnoredAny>(r).await {
        Ok(_) => anyhow::anyhow!("unexpected answer"),
        Err(e) => e,
    }
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
pub async fn push(remote: &Remote, path: &Path, enable: bool) -> Result<Uploaded> {
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
    Enable(Box<EnableArgs>),
    /// Stop routing to a Func (its routes answer 404).
    Disable(Named),
    /// Enable the version that was enabled before the current one.
    Rollback(Named),
    /// Set a Func's log level on every Runner at once, without a restart.
    LogLevel(LevelArgs),
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
    /// Requests one Runner should handle at once (autoscaler).
    #[arg(long)]
    target_concurrency: Option<f64>,
    /// How long demand must stay lower before Runners are removed, in
    /// milliseconds (autoscaler).
    #[arg(long)]
    scale_down_delay_ms: Option<u64>,
    /// Answer the Func's failures with their full detail (tracebacks, file
    /// paths, stderr) instead of a generic message; for debugging, not for
    /// production. Enabling again without it turns it off.
    #[arg(long)]
    debug: bool,
    /// Check the Func's answers against its document's responses (status
    /// codes, content types, body schemas) and report mismatches in the
    /// logs and a metric; answers are not changed. Enabling again without
    /// it turns it off.
    #[arg(long)]
    check_responses: bool,
    /// What a security scheme of the document is checked against
    /// (repeatable): `SCHEME:secret=NAME` (API keys one per line,
    /// `user:password` lines, or a JWT HS256 key), and for bearer schemes
    /// `jwks=NAME`, `audience=AUD`, `issuer=ISS`, comma-separated; NAMEs
    /// are secrets in the Runners' secrets directory. A scheme without one
    /// refuses every request.
    #[arg(long = "auth", value_name = "SCHEME:KEY=VALUE,...")]
    auth: Vec<String>,
    /// Let web pages from this origin call the Func from a browser (CORS;
    /// repeatable): `https://app.example.com`, `https://*.example.com`, or
    /// `*` for any. Preflights are then answered from the document.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    cors_origins: Vec<String>,
    /// A request header such pages may send (repeatable; `*` for any);
    /// without it, the headers the document declares for each operation.
    #[arg(long = "cors-header", value_name = "NAME", requires = "cors_origins")]
    cors_headers: Vec<String>,
    /// An answer header such pages may read (repeatable).
    #[arg(long = "cors-expose", value_name = "NAME", requires = "cors_origins")]
    cors_expose: Vec<String>,
    /// Let such pages send cookies and HTTP authentication.
    #[arg(long, requires = "cors_origins")]
    cors_credentials: bool,
    /// How long browsers may cache a preflight's answer, in seconds.
    #[arg(long, value_name = "SECONDS", requires = "cors_origins")]
    cors_max_age: Option<u64>,
    #[command(flatten)]
    async_policy: AsyncArgs,
    #[command(flatten)]
    remote: Remote,
}

/// The async policy flags of `func enable` (over the bundle's `async`).
#[derive(Args, Default)]
pub struct AsyncArgs {
    /// Async calls: attempts after the first.
    #[arg(long)]
    retries: Option<u32>,
    /// Async calls: delay before the first retry, ms.
    #[arg(long, value_name = "MS")]
    backoff_initial_ms: Option<u64>,
    /// Async calls: each retry waits this much longer.
    #[arg(long)]
    backoff_factor: Option<f64>,
    /// Async calls: no retry waits longer, ms.
    #[arg(long, value_name = "MS")]
    backoff_max_ms: Option<u64>,
    /// Async calls: not tried again past this age, ms.
    #[arg(long, value_name = "MS")]
    max_age_ms: Option<u64>,
    /// Async calls: the answer statuses that are retried (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "STATUS,...")]
    retry_on: Option<Vec<u16>>,
    /// Async calls one Runner runs at once.
    #[arg(long)]
    async_concurrency: Option<u16>,
    /// Most async calls waiting at once; more get 429.
    #[arg(long)]
    max_queued: Option<u64>,
    /// How long a finished call's record is kept, ms.
    #[arg(long, value_name = "MS")]
    retention_ms: Option<u64>,
    /// Accept only async calls with a callback URL.
    #[arg(long)]
    async_only: bool,
    /// Async calls: deliveries of a callback after a first that failed.
    #[arg(long)]
    callback_retries: Option<u32>,
}

impl AsyncArgs {
    /// The `async` setting (none when no flag is given).
    fn policy(&self) -> Option<funcatron_control::calls::AsyncPolicy> {
        let p = funcatron_control::calls::AsyncPolicy {
            retries: self.retries,
            backoff_initial_ms: self.backoff_initial_ms,
            backoff_factor: self.backoff_factor,
            backoff_max_ms: self.backoff_max_ms,
            max_age_ms: self.max_age_ms,
            retry_on: self.retry_on.clone(),
            concurrency: self.async_concurrency,
            max_queued: self.max_queued,
            retention_ms: self.retention_ms,
            async_only: self.async_only.then_some(true),
            callback_retries: self.callback_retries,
        };
        (p != funcatron_control::calls::AsyncPolicy::default()).then_some(p)
    }
}

impl EnableArgs {
    /// The `cors` setting the flags describe (none without an origin).
    fn cors(&self) -> Option<funcatron_control::state::CorsSettings> {
        (!self.cors_origins.is_empty()).then(|| funcatron_control::state::CorsSettings {
            origins: self.cors_origins.clone(),
            headers: (!self.cors_headers.is_empty()).then(|| self.cors_headers.clone()),
            expose: self.cors_expose.clone(),
            credentials: self.cors_credentials,
            max_age_s: self.cors_max_age,
        })
    }
}

/// `--auth SCHEME:secret=NAME,jwks=NAME,audience=AUD,issuer=ISS`.
fn parse_auth(
    list: &[String],
) -> Result<BTreeMap<String, funcatron_control::state::SchemeCredentials>> {
    let mut out = BTreeMap::new();
    for arg in list {
        let (scheme, rest) = arg
            .split_once(':')
            .with_context(|| format!("--auth {arg}: expected SCHEME:KEY=VALUE,..."))?;
        let mut c = funcatron_control::state::SchemeCredentials::default();
        for kv in rest.split(',') {
            let (k, v) = kv
                .split_once('=')
                .with_context(|| format!("--auth {arg}: {kv:?} is not KEY=VALUE"))?;
            let slot = match k {
                "secret" => &mut c.secret,
                "jwks" => &mut c.jwks_secret,
                "audience" => &mut c.audience,
                "issuer" => &mut c.issuer,
                other => anyhow::bail!(
                    "--auth {arg}: unknown key {other:?} (secret, jwks, audience, issuer)"
                ),
            };
            *slot = Some(v.to_owned());
        }
        out.insert(scheme.to_owned(), c);
    }
    Ok(out)
}

/// Run a `func` command; returns what to print.
pub async fn func(cmd: FuncCmd) -> Result<String> {
    let http = reqwest::Client::new();
    match cmd {
        FuncCmd::List(a) => {
            let v: FuncList = answer(a.remote.get(&http, "/v1/funcs")?.send().await?).await?;
            let mut out = String::from("NAME                 ENABLED       RUNTIME  ROUTES\n");
            for f in &v.funcs {
                let enabled = f
                    .enabled
                    .as_deref()
                    .map(|s| &s[..12.min(s.len())])
                    .unwrap_or("-");
                let (runtime, bases) = match &f.routes {
                    Some(Routes::Effective(r)) => (r.runtime.as_str(), served_on(r)),
                    _ => ("-", String::new()),
                };
                let refused = f
                    .refused
                    .as_deref()
                    .map(|why| format!("  (refused on this Tron: {why})"))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "{:<20} {:<13} {:<8} {bases}{refused}\n",
                    f.name, enabled, runtime,
                ));
            }
            Ok(out)
        }
        FuncCmd::Show(a) => {
            let v: FuncDetail = answer(
                a.remote
                    .get(&http, &format!("/v1/funcs/{}", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            Ok(serde_json::to_string_pretty(&v)?)
        }
        FuncCmd::History(a) => {
            let v: FuncHistory = answer(
                a.remote
                    .get(&http, &format!("/v1/funcs/{}/history", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            let mut out = String::new();
            for e in &v.history {
                out.push_str(&format!(
                    "{} {:<8} {}\n",
                    e.at_ms,
                    e.action,
                    e.sha.as_deref().unwrap_or("-")
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
            let body = EnableRequest {
                sha: a.sha.clone(),
                settings: Some(FuncSettings {
                    env,
                    secrets: a.secrets.clone(),
                    concurrency: a.concurrency,
                    timeout_ms: a.timeout_ms,
                    memory_mb: a.memory_mb,
                    min_runners: a.min_runners,
                    max_runners: a.max_runners,
                    target_concurrency: a.target_concurrency,
                    scale_down_delay_ms: a.scale_down_delay_ms,
                    debug: a.debug.then_some(true),
                    check_responses: a.check_responses.then_some(true),
                    auth: parse_auth(&a.auth)?,
                    cors: a.cors(),
                    async_policy: a.async_policy.policy(),
                }),
            };
            let v: Enabled = answer(
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
                v.enabled.unwrap_or_default()
            ))
        }
        FuncCmd::Disable(a) => {
            answer::<Enabled>(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/disable", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!("disabled {}\n", a.name))
        }
        FuncCmd::LogLevel(a) => log_level(a).await,
        FuncCmd::Rollback(a) => {
            let v: Enabled = answer(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/rollback", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!(
                "rolled back {} to {}\n",
                a.name,
                v.enabled.unwrap_or_default()
            ))
        }
    }
}

/// Where a Func's routes are served, as `func list` prints them: every
/// base (an older Tron that sends none: its host and base path).
fn served_on(r: &EffectiveRoutes) -> String {
    if r.bases.is_empty() {
        return format!("{}{}", r.host, r.base_path);
    }
    r.bases.join(", ")
}

/// `funcatron invoke`.
#[derive(Args)]
pub struct InvokeArgs {
    /// The Func; or a chain of Funcs (`docs/flows.md`), e.g.
    /// `"sed e=s/hate/love/ | to-upper"`, whose first stage reads stdin
    /// (or `-d`) and whose last stage's answer is printed. A name with
    /// a space or `|` is a chain; `--chain` makes any one.
    name: String,
    /// Run NAME as a chain expression even without a `|`.
    #[arg(long)]
    chain: bool,
    /// Path below the base's path.
    #[arg(default_value = "/")]
    path: String,
    /// Which of its bases, as `func show` lists them (`bases`, or an
    /// operation's own), e.g. `eu.api.example.com/v1` or `*/v2`; default
    /// its primary host and basePath.
    #[arg(long)]
    base: Option<String>,
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

/// `-H Name: value` flags as a map (names lower-case).
fn header_map(flags: &[String]) -> Result<BTreeMap<String, String>> {
    let mut headers = BTreeMap::new();
    for h in flags {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("-H {h}: expected `Name: value`"))?;
        headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_owned());
    }
    Ok(headers)
}

/// `-d`: the text, or a file's with `@file`.
fn data(flag: Option<&str>) -> Result<Option<String>> {
    Ok(match flag {
        Some(d) if d.starts_with('@') => {
            Some(std::fs::read_to_string(&d[1..]).with_context(|| format!("reading {}", &d[1..]))?)
        }
        Some(d) => Some(d.to_owned()),
        None => None,
    })
}

/// Call a Func through the Tron; returns the output and whether it was a 2xx.
pub async fn invoke(a: InvokeArgs) -> Result<(Vec<u8>, bool)> {
    if a.chain || a.name.contains('|') || a.name.contains(char::is_whitespace) {
        return invoke_chain(a).await;
    }
    let headers = header_map(&a.headers)?;
    let body = data(a.data.as_deref())?;
    let http = reqwest::Client::new();
    let r = a
        .remote
        .post(&http, &format!("/v1/funcs/{}/invoke", a.name))?
        .json(&InvokeRequest {
            base: a.base.clone(),
            method: Some(a.method.clone()),
            path: Some(a.path.clone()),
            query: a.query.clone(),
            headers,
            body,
        })
        .send()
        .await
        .with_context(|| format!("calling {}", a.remote.tron))?;
    printed(r, a.include).await
}

/// What `invoke` prints of an answer (its status line and headers too
/// with `include`), and whether it was a 2xx.
async fn printed(r: reqwest::Response, include: bool) -> Result<(Vec<u8>, bool)> {
    let ok = r.status().is_success();
    let mut out = Vec::new();
    if include {
        out.extend_from_slice(format!("{:?} {}\n", r.version(), r.status()).as_bytes());
        for (k, v) in r.headers() {
            out.extend_from_slice(format!("{k}: {}\n", v.to_str().unwrap_or("?")).as_bytes());
        }
        out.push(b'\n');
    }
    out.extend_from_slice(&r.bytes().await?);
    Ok((out, ok))
}

/// `funcatron invoke "a | b"`: the chain through the Tron's `/v1/chain`,
/// stdin (unless it is a terminal, or `-d` is given) as the first stage's
/// body.
async fn invoke_chain(a: InvokeArgs) -> Result<(Vec<u8>, bool)> {
    use std::io::{IsTerminal, Read};
    let headers = header_map(&a.headers)?;
    let body = match data(a.data.as_deref())? {
        Some(d) => Some(d),
        None if !std::io::stdin().is_terminal() => {
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading stdin (the chain's input)")?;
            Some(s)
        }
        None => None,
    };
    let http = reqwest::Client::new();
    let r = a
        .remote
        .post(&http, "/v1/chain")?
        .json(&funcatron_tron::mgmt::api::ChainRequest {
            chain: a.name.clone(),
            headers,
            body,
        })
        .send()
        .await
        .with_context(|| format!("calling {}", a.remote.tron))?;
    printed(r, a.include).await
}

/// `funcatron capture ...`.
#[derive(Subcommand)]
pub enum CaptureCmd {
    /// Start recording a Func's request/response pairs.
    Start(CaptureStart),
    /// Stop recording.
    Stop(Named),
    /// Write the recorded pairs as JSON Lines.
    Export(CaptureExport),
}

/// `capture start`.
#[derive(Args)]
pub struct CaptureStart {
    /// The Func.
    name: String,
    /// Fraction of requests recorded (0 < s <= 1).
    #[arg(long, default_value_t = 1.0)]
    sample: f64,
    /// Stop after this many pairs.
    #[arg(long)]
    max: Option<u64>,
    /// Stop after this long (`30s`, `10m`, `2h`).
    #[arg(long = "for", value_parser = parse_duration)]
    for_: Option<std::time::Duration>,
    /// More header names to redact (Authorization, Proxy-Authorization,
    /// Cookie, Set-Cookie and X-Api-Key always are).
    #[arg(long)]
    redact: Vec<String>,
    /// More query parameters to redact (besides the Tron's
    /// --redact-query list).
    #[arg(long, value_delimiter = ',')]
    redact_query: Vec<String>,
    /// More JSON body fields to redact, at any depth (besides the Tron's
    /// --redact-json-field list).
    #[arg(long = "redact-json-field", value_delimiter = ',')]
    redact_json_fields: Vec<String>,
    #[command(flatten)]
    remote: Remote,
}

/// `capture export`.
#[derive(Args)]
pub struct CaptureExport {
    /// The Func.
    name: String,
    /// File to write (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
    #[command(flatten)]
    remote: Remote,
}

fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s}: expected e.g. 30s, 10m, 2h"))?;
    let secs = match unit {
        "ms" => return Ok(std::time::Duration::from_millis(n)),
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s}: unit must be ms, s, m or h")),
    };
    Ok(std::time::Duration::from_secs(secs))
}

/// Run a capture command; returns what to print.
pub async fn capture(cmd: CaptureCmd) -> Result<Vec<u8>> {
    let http = reqwest::Client::new();
    match cmd {
        CaptureCmd::Start(a) => {
            let body = CaptureRequest {
                sample: Some(a.sample),
                max: a.max,
                for_ms: a.for_.map(|d| d.as_millis() as u64),
                redact: a.redact.clone(),
                redact_query: a.redact_query.clone(),
                redact_json_fields: a.redact_json_fields.clone(),
            };
            let v: CaptureStarted = answer(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/capture", a.name))?
                    .json(&body)
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!(
                "capturing {} (capture {}, sample {})\n",
                a.name,
                v.capture.map(|c| c.id).unwrap_or_default(),
                a.sample
            )
            .into_bytes())
        }
        CaptureCmd::Stop(a) => {
            answer::<CaptureStopped>(
                a.remote
                    .post(&http, &format!("/v1/funcs/{}/capture/stop", a.name))?
                    .send()
                    .await?,
            )
            .await?;
            Ok(format!("stopped capturing {}\n", a.name).into_bytes())
        }
        CaptureCmd::Export(a) => {
            let r = a
                .remote
                .get(&http, &format!("/v1/captures/{}", a.name))?
                .send()
                .await?;
            if !r.status().is_success() {
                return Err(failed(r).await);
            }
            let bytes = r.bytes().await?;
            match &a.output {
                Some(p) => {
                    std::fs::write(p, &bytes)
                        .with_context(|| format!("writing {}", p.display()))?;
                    Ok(format!(
                        "{} pairs written to {}\n",
                        bytes.iter().filter(|b| **b == b'\n').count(),
                        p.display()
                    )
                    .into_bytes())
                }
                None => Ok(bytes.to_vec()),
            }
        }
    }
}

/// `funcatron logs`.
#[derive(Args)]
pub struct LogsArgs {
    /// The Func.
    name: String,
    /// Only lines about this request.
    #[arg(long)]
    request_id: Option<String>,
    /// Keep printing new lines.
    #[arg(short, long)]
    follow: bool,
    #[command(flatten)]
    remote: Remote,
}

/// Print a Func's log lines from its Runners (through a Tron).
pub async fn logs(a: LogsArgs) -> Result<()> {
    use futures::StreamExt;
    use std::io::Write;
    let mut url = format!("/v1/funcs/{}/logs?follow={}", a.name, a.follow);
    if let Some(id) = &a.request_id {
        url.push_str(&format!("&request_id={id}"));
    }
    let r = a.remote.get(&reqwest::Client::new(), &url)?.send().await?;
    if !r.status().is_success() {
        return Err(failed(r).await);
    }
    let mut stream = r.bytes_stream();
    let mut pending = Vec::new();
    let mut out = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        pending.extend_from_slice(&chunk?);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            if let Ok(v) = serde_json::from_slice::<LogLine>(&line) {
                writeln!(
                    out,
                    "{} {} {} [{}] {}",
                    v.at_ms.map_or("null".to_owned(), |t| t.to_string()),
                    v.runner.as_deref().unwrap_or("-"),
                    v.request_id.as_deref().unwrap_or("-"),
                    v.stream.as_deref().unwrap_or("-"),
                    v.message
                )?;
                out.flush()?;
            }
        }
    }
    Ok(())
}

/// `func log-level`.
#[derive(Args)]
pub struct LevelArgs {
    /// The Func.
    name: String,
    /// error, warn, info, debug, trace, or default (reset).
    level: String,
    /// Reset after this long (`30s`, `10m`).
    #[arg(long = "for", value_parser = parse_duration)]
    for_: Option<std::time::Duration>,
    #[command(flatten)]
    remote: Remote,
}

/// Set a Func's log level on every Runner.
pub async fn log_level(a: LevelArgs) -> Result<String> {
    let http = reqwest::Client::new();
    let body = LogLevelRequest {
        level: a.level.clone(),
        for_ms: a.for_.map(|d| d.as_millis() as u64),
    };
    answer::<LogLevelSet>(
        a.remote
            .post(&http, &format!("/v1/funcs/{}/log-level", a.name))?
            .json(&body)
            .send()
            .await?,
    )
    .await?;
    Ok(format!("{} logs at {} on every Runner\n", a.name, a.level))
}

/// Per Func: queue depth, arrival rate, service time, in flight, Runners.
pub async fn status(remote: &Remote) -> Result<String> {
    let v: Status = answer(
        remote
            .get(&reqwest::Client::new(), "/v1/status")?
            .send()
            .await?,
    )
    .await?;
    Ok(status_table(&v))
}

/// `funcatron status`'s table (and the last scaling decisions).
fn status_table(v: &Status) -> String {
    fn or_null<T: ToString>(x: Option<T>) -> String {
        x.map_or("null".to_owned(), |x| x.to_string())
    }
    fn or_dash<T: ToString>(x: Option<T>) -> String {
        x.map_or("-".to_owned(), |x| x.to_string())
    }
    let mut out = String::new();
    if let Some(a) = &v.autoscaler {
        out.push_str(&format!(
            "autoscaler: substrate {}, every {} ms\n",
            a.substrate, a.tick_ms
        ));
    }
    out.push_str(
        "FUNC                 READY  UNACKED  CONSUMERS  ARRIVAL/S  SERVICE_MS  IN_FLIGHT  SERVED  RUNNERS  DESIRED  RUNNING\n",
    );
    let mut decisions = String::new();
    for (name, f) in &v.funcs {
        let sc = f.scaling.as_ref();
        out.push_str(&format!(
            "{:<20} {:>5}  {:>7}  {:>9}  {:>9.1}  {:>10}  {:>9}  {:>6}  {:>7}  {:>7}  {:>7}\n",
            name,
            or_null(f.ready),
            or_dash(sc.map(|s| s.unacked)),
            or_null(f.consumers),
            f.arrival_per_s,
            f.service_ms.map_or("-".to_owned(), |s| format!("{s:.2}")),
            f.in_flight,
            f.served,
            f.runners,
            or_dash(sc.map(|s| s.target)),
            or_dash(sc.map(|s| s.running)),
        ));
        for d in sc
            .into_iter()
            .flat_map(|s| s.decisions.iter().rev().take(5))
        {
            decisions.push_str(&format!(
                "  {name}: {} -> {} at {}: {}\n",
                d.from, d.to, d.at_ms, d.reason
            ));
        }
        if let Some(e) = sc.and_then(|s| s.error.as_deref()) {
            decisions.push_str(&format!("  {name}: substrate error: {e}\n"));
        }
    }
    if !decisions.is_empty() {
        out.push_str("last scaling decisions (newest first):\n");
        out.push_str(&decisions);
    }
    out
}
