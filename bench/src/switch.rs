//! `funcatron-bench --switch`: how fast a new version answers.
//!
//! (a) `bundle push --enable` to a running `funcatron up --store`: time from
//!     the upload call returning to the first request answered by the new
//!     version (target < 1 s);
//! (b) `funcatron dev`: time from a file save to the first request answered
//!     by the saved code (target < 300 ms).
//!
//! Both drive the real `funcatron` binary next to this one (build it first:
//! `cargo build --release`), a Lua Func, ten rounds each.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

pub(crate) struct Kill(pub(crate) Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn funcatron() -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe.parent().context("no directory")?.join("funcatron");
    if !bin.is_file() {
        bail!(
            "{} not found: run `cargo build --release` first",
            bin.display()
        );
    }
    Ok(bin)
}

pub(crate) fn free() -> Result<String> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string())
}

fn hello(dir: &Path, greeting: &str) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let src = Path::new("func-bundles/hello");
    std::fs::copy(src.join("swagger.yaml"), dir.join("swagger.yaml"))?;
    let lua = std::fs::read_to_string(src.join("main.lua"))?;
    std::fs::write(
        dir.join("main.lua"),
        lua.replace("Hello, ", &format!("{greeting}, ")),
    )?;
    Ok(())
}

/// `funcatron up --store` serving `bundles`, with a known token.
fn up(
    bin: &Path,
    addr: &str,
    mgmt: &str,
    bundles: &Path,
    store: &Path,
    token: &str,
) -> Result<Kill> {
    Ok(Kill(
        Command::new(bin)
            .args(["up", "--listen", addr, "--mgmt-listen", mgmt, "--bundles"])
            .arg(bundles)
            .arg("--store")
            .arg(store)
            .env("FUNCATRON_TOKEN", token)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

/// Poll `url` (1 ms apart) until it answers `want`; the time it took.
pub(crate) async fn until(
    http: &reqwest::Client,
    url: &str,
    want: &str,
    from: Instant,
) -> Result<Duration> {
    let deadline = from + Duration::from_secs(30);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.text().await.is_ok_and(|t| t == want) {
                return Ok(from.elapsed());
            }
        }
        if Instant::now() > deadline {
            bail!("{url} never answered {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn summary(name: &str, mut d: Vec<Duration>, target_ms: u64) {
    d.sort();
    let ms = |x: Duration| x.as_secs_f64() * 1000.0;
    println!(
        "{name:<48} p50 {:>7.1} ms  max {:>7.1} ms  (target < {target_ms} ms)",
        ms(d[d.len() / 2]),
        ms(d[d.len() - 1])
    );
}

/// Run both measurements and print them.
pub async fn run() -> Result<()> {
    let bin = funcatron()?;
    let tmp = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let token = "bench-token";

    // (a) push --enable -> first answer of the new version.
    let (addr, mgmt) = (free()?, free()?);
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty)?;
    let _up = up(&bin, &addr, &mgmt, &empty, &tmp.path().join("store"), token)?;
    let mgmt_url = format!("http://{mgmt}");
    until(
        &http,
        &format!("{mgmt_url}/v1/health"),
        "{\"ok\":true}",
        Instant::now(),
    )
    .await?;
    let mut push = Vec::new();
    for i in 0..10 {
        let greeting = format!("Push{i}");
        let dir = tmp.path().join(&greeting);
        hello(&dir, &greeting)?;
        let (_, bytes) = funcatron_bundle::archive::build(&dir)?;
        let r = http
            .post(format!("{mgmt_url}/v1/bundles?enable=true"))
            .bearer_auth(token)
            .body(bytes)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 201, "upload: {}", r.text().await?);
        let returned = Instant::now();
        push.push(
            until(
                &http,
                &format!("http://{addr}/hello/bench"),
                &format!("{greeting}, bench!"),
                returned,
            )
            .await?,
        );
    }

    // (b) dev: save -> first answer of the saved code.
    let dev_dir = tmp.path().join("dev/hello");
    hello(&dev_dir, "Dev")?;
    let dev_addr = free()?;
    let _dev = Kill(
        Command::new(&bin)
            .args(["dev", "--listen", &dev_addr])
            .arg(&dev_dir)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let url = format!("http://{dev_addr}/hello/bench");
    until(&http, &url, "Dev, bench!", Instant::now()).await?;
    let lua = std::fs::read_to_string(dev_dir.join("main.lua"))?;
    let mut save = Vec::new();
    for i in 0..10 {
        let greeting = format!("Save{i}");
        let saved = Instant::now();
        std::fs::write(
            dev_dir.join("main.lua"),
            lua.replace("Dev, ", &format!("{greeting}, ")),
        )?;
        save.push(until(&http, &url, &format!("{greeting}, bench!"), saved).await?);
    }
    println!(
        "machine: {} CPUs; ten rounds each, a Lua Func",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    summary("bundle push --enable -> first new answer", push, 1000);
    summary("funcatron dev: save -> first new answer", save, 300);
    Ok(())
}

/// `--capture`: full-path throughput (embedded, c=64, hello) with capture
/// off and with 100% of hello's traffic captured, in one run.
pub async fn capture(requests: usize) -> Result<()> {
    let bin = funcatron()?;
    let tmp = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    let token = "bench-token";
    let bundles = tmp.path().join("bundles");
    hello(&bundles.join("hello"), "Hello")?;
    let (addr, mgmt) = (free()?, free()?);
    let _up = up(
        &bin,
        &addr,
        &mgmt,
        &bundles,
        &tmp.path().join("store"),
        token,
    )?;
    let url = format!("http://{addr}/hello/bench");
    until(&http, &url, "Hello, bench!", Instant::now()).await?;
    let sock: std::net::SocketAddr = addr.parse()?;
    let expect: &'static [u8] = b"Hello, bench!";
    // Warm up (connections, Lua states, allocator) before measuring.
    crate::http_load_path(sock, "/hello/bench", expect, 64, requests / 2).await?;
    let off = crate::http_load_path(sock, "/hello/bench", expect, 64, requests).await?;
    let r = http
        .post(format!("http://{mgmt}/v1/funcs/hello/capture"))
        .bearer_auth(token)
        .json(&serde_json::json!({"sample": 1.0}))
        .send()
        .await?;
    anyhow::ensure!(
        r.status().is_success(),
        "capture start: {}",
        r.text().await?
    );
    // Ready when a request is captured.
    let metrics = format!("http://{addr}/_funcatron/metrics");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        http.get(&url).send().await?;
        if http
            .get(&metrics)
            .send()
            .await?
            .text()
            .await?
            .contains("runner_captured_total")
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the capture never started");
        }
    }
    let on = crate::http_load_path(sock, "/hello/bench", expect, 64, requests).await?;
    let text = http.get(&metrics).send().await?.text().await?;
    let captured: f64 = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("runner_captured_total{func=\"hello\"}")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0.0);
    println!(
        "machine: {} CPUs; embedded path, hello, c=64, {requests} requests each",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    crate::row("capture off", off);
    crate::row("capture 100% of hello", on);
    println!(
        "pairs captured: {captured:.0}; throughput cost of capture: {:.1}% (target < 15%)",
        (1.0 - on.rps / off.rps) * 100.0
    );
    Ok(())
}
