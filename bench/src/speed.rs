//! The speed rows (h)-(l): what `funcatron up` serves under wrk against
//! nginx answering `return 200`, one Func against 100 distinct Funcs,
//! a 1 GiB body through direct mode with each process's peak RSS,
//! server-sent events' first-chunk latency, and idle RSS.
//!
//! (h) and (i) run `funcatron up` (the release binary beside this one) and
//! drive it with wrk (Debian's `wrk`); (j)-(l) run `funcatron tron`,
//! `runner` and `ingress` as separate processes on RabbitMQ, so each
//! process's memory is its own. Peak RSS is the kernel's `VmHWM`, reset
//! (`/proc/<pid>/clear_refs` = 5) just before the transfer.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::StreamExt;

use crate::switch::{free, funcatron, Kill};

/// How long each wrk run lasts.
const WRK_SECONDS: u32 = 5;

/// `field` of `/proc/<pid>/status` (`VmRSS`, `VmHWM`: kB; `Threads`).
fn status(pid: u32, field: &str) -> Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .with_context(|| format!("no {field} for {pid}"))
}

fn mib(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

/// Requests/s wrk measured against `url` (64 connections, 2 threads),
/// with `script` (a wrk Lua file) when given.
fn wrk(url: &str, script: Option<&Path>) -> Result<f64> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t2", "-c64", &format!("-d{WRK_SECONDS}s")]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    let out = cmd
        .arg(url)
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains("Non-2xx") {
        bail!("wrk saw errors from {url}:\n{text}");
    }
    text.lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no rate in wrk's output:\n{text}"))
}

/// Poll `url` until it answers 200.
async fn ready(http: &reqwest::Client, url: &str) -> Result<()> {
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = http.get(url).send().await {
            if r.status() == 200 {
                return Ok(());
            }
        }
        if Instant::now() > until {
            bail!("{url} never answered 200");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// nginx serving `return 200` on a free port (stopped with its workers on
/// drop).
fn static_nginx() -> Result<(crate::Nginx, String)> {
    let prefix = tempfile::tempdir()?;
    let addr = free()?;
    let p = prefix.path().display();
    let conf = format!(
        "worker_processes auto;\npid {p}/nginx.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n  scgi_temp_path {p}/scgi;\n\
           server {{ listen {addr}; location / {{ default_type text/plain; return 200 \"Hello, world!\"; }} }}\n}}\n"
    );
    let path = prefix.path().join("nginx.conf");
    std::fs::write(&path, conf)?;
    let child = Command::new("nginx")
        .arg("-p")
        .arg(prefix.path())
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting nginx")?;
    let nginx = crate::Nginx {
        child,
        addr: addr.parse()?,
        _prefix: prefix,
    };
    Ok((nginx, addr))
}

/// `funcatron up` serving `bundles` on a free port.
fn up(bin: &Path, bundles: &Path) -> Result<(Kill, String)> {
    let (addr, mgmt) = (free()?, free()?);
    let child = Command::new(bin)
        .args(["up", "--listen", &addr, "--mgmt-listen", &mgmt, "--bundles"])
        .arg(bundles)
        .env("FUNCATRON_TOKEN", "bench-token-123456")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok((Kill(child), addr))
}

/// 100 distinct Lua Funcs, `/f0/` .. `/f99/`, and a wrk script that calls
/// them in turn.
fn hundred_funcs(root: &Path) -> Result<PathBuf> {
    for i in 0..100 {
        let dir = root.join(format!("f{i}"));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(
            dir.join("swagger.yaml"),
            format!("swagger: '2.0'\nbasePath: /f{i}\nx-funcatron: {{name: f{i}, runtime: lua}}\npaths:\n  /:\n    get: {{operationId: hi}}\n"),
        )?;
        std::fs::write(
            dir.join("main.lua"),
            "return { hi = function() return 'Hello, world!' end }\n",
        )?;
    }
    let script = root.join("round-robin.lua");
    std::fs::write(
        &script,
        "local i = 0\nrequest = function()\n  i = (i % 100) + 1\n  return wrk.format(\"GET\", \"/f\" .. (i - 1) .. \"/\")\nend\n",
    )?;
    Ok(script)
}

/// Rows (h) and (i), and `up`'s idle RSS with the example Funcs.
pub(crate) async fn up_rows(bundles: &Path) -> Result<()> {
    let bin = funcatron()?;
    let http = reqwest::Client::new();

    let (up_proc, addr) = up(&bin, bundles)?;
    ready(&http, &format!("http://{addr}/hello/ready")).await?;
    let idle_kb = status(up_proc.0.id(), "VmRSS")?;
    let idle_anon = status(up_proc.0.id(), "RssAnon")?;
    let up_rps = wrk(&format!("http://{addr}/hello/world"), None)?;
    drop(up_proc);
    let (nginx, naddr) = static_nginx()?;
    ready(&http, &format!("http://{naddr}/")).await?;
    let nginx_rps = wrk(&format!("http://{naddr}/"), None)?;
    drop(nginx);
    println!(
        "{:<44} {:>10.0}",
        "(h) funcatron up, hello, wrk c=64", up_rps
    );
    println!(
        "{:<44} {:>10.0}",
        "(h) nginx `return 200`, wrk c=64", nginx_rps
    );

    let dir = tempfile::tempdir()?;
    let script = hundred_funcs(dir.path())?;
    let (up100, addr) = up(&bin, dir.path())?;
    ready(&http, &format!("http://{addr}/f99/")).await?;
    let one = wrk(&format!("http://{addr}/f0/"), None)?;
    let hundred = wrk(&format!("http://{addr}/"), Some(&script))?;
    let threads = status(up100.0.id(), "Threads")?;
    drop(up100);
    println!(
        "{:<44} {:>10.0}",
        "(i) up, 1 of 100 Lua Funcs, wrk c=64", one
    );
    println!(
        "{:<44} {:>10.0}   ({threads} threads)",
        "(i) up, 100 Lua Funcs in turn, wrk c=64", hundred
    );
    println!(
        "idle RSS of `up` with the example Funcs:  {:.1} MiB (target <= 60; anonymous {:.1} MiB)",
        mib(idle_kb),
        mib(idle_anon)
    );
    println!(
        "ratio up/nginx `return 200` throughput:  {:.2} (target >= 0.5)",
        up_rps / nginx_rps
    );
    println!(
        "ratio 100 Funcs/1 Func throughput:       {:.2} (target >= 0.9)",
        hundred / one
    );
    Ok(())
}

/// A role of the cluster, a child process on `amqp`.
fn role(bin: &Path, role: &str, amqp: &str, extra: &[&str]) -> Result<Kill> {
    Ok(Kill(
        Command::new(bin)
            .arg(role)
            .arg("--broker")
            .arg(amqp)
            .args(extra)
            .env("FUNCATRON_TOKEN", "bench-token-123456")
            .env("FUNCATRON_READ_TOKEN", "bench-read-token-123456")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

/// Rows (j)-(l) on RabbitMQ.
pub(crate) async fn direct_rows(amqp: &str, bundles: &Path) -> Result<()> {
    let bin = funcatron()?;
    let bundles = bundles.to_str().context("bundles path")?;
    let (mgmt, listen) = (free()?, free()?);
    let _tron = role(
        &bin,
        "tron",
        amqp,
        &["--bundles", bundles, "--mgmt-listen", &mgmt],
    )?;
    let runner = role(&bin, "runner", amqp, &["--bundles", bundles])?;
    let ingress = role(&bin, "ingress", amqp, &["--listen", &listen])?;
    let http = reqwest::Client::new();
    let base = format!("http://{listen}");
    // Ready when the ingress routes at the edge and the stream Func answers.
    let until = Instant::now() + Duration::from_secs(120);
    loop {
        let table = match http.get(format!("{base}/_funcatron/health")).send().await {
            Ok(r) => r
                .json::<serde_json::Value>()
                .await
                .is_ok_and(|v| v["edge_table_revision"].is_u64()),
            Err(_) => false,
        };
        if table {
            if let Ok(r) = http
                .post(format!("{base}/stream/count"))
                .body("x")
                .send()
                .await
            {
                if r.status() == 200 {
                    break;
                }
            }
        }
        if Instant::now() > until {
            bail!("the RabbitMQ cluster never became ready");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let runner_idle = status(runner.0.id(), "VmRSS")?;
    let runner_anon = status(runner.0.id(), "RssAnon")?;

    // (j) 1 GiB through /stream/echo, each process's peak RSS.
    let total: u64 = 1 << 30;
    let piece = Bytes::from(vec![b'x'; 64 * 1024]);
    let mut before = Vec::new();
    for p in [&ingress, &runner] {
        std::fs::write(format!("/proc/{}/clear_refs", p.0.id()), "5")?;
        before.push(status(p.0.id(), "VmRSS")?);
    }
    let n = total / piece.len() as u64;
    let body =
        futures::stream::iter((0..n).map(move |_| Ok::<Bytes, std::io::Error>(piece.clone())));
    let started = Instant::now();
    let r = http
        .post(format!("{base}/stream/echo"))
        .body(reqwest::Body::wrap_stream(body))
        .timeout(Duration::from_secs(600))
        .send()
        .await?;
    anyhow::ensure!(r.status() == 200, "1 GiB echo: {}", r.status());
    let mut got: u64 = 0;
    let mut stream = r.bytes_stream();
    while let Some(b) = stream.next().await {
        got += b?.len() as u64;
    }
    let took = started.elapsed();
    anyhow::ensure!(got == total, "echoed {got} of {total} bytes");
    let mut growth = Vec::new();
    for (p, b) in [&ingress, &runner].iter().zip(&before) {
        growth.push(status(p.0.id(), "VmHWM")?.saturating_sub(*b));
    }
    println!(
        "(j) 1 GiB echo in direct mode: {:.1} s ({:.0} MiB/s each way); peak RSS growth: ingress {:.1} MiB, Runner {:.1} MiB (target <= 64 each)",
        took.as_secs_f64(),
        1024.0 / took.as_secs_f64(),
        mib(growth[0]),
        mib(growth[1]),
    );

    // (k) Server-sent events: a whole request to its first event, and a
    // piece's round trip through a running Func.
    let mut first = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        let r = http
            .get(format!("{base}/stream/events?n=1"))
            .header("accept", "text/event-stream")
            .send()
            .await?;
        let mut s = r.bytes_stream();
        s.next().await.context("no event")??;
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        while s.next().await.is_some() {}
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|p| (p, rx)) });
    let r = http
        .post(format!("{base}/stream/chat"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    let mut s = r.bytes_stream();
    s.next().await.context("no ready event")??;
    let mut trips = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        tx.send(Ok(b"ping".to_vec())).await?;
        let e = s.next().await.context("no event")??;
        anyhow::ensure!(e.starts_with(b"data: PING"), "{e:?}");
        trips.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(tx);
    let pct = |v: &mut Vec<f64>, q: f64| {
        v.sort_by(f64::total_cmp);
        v[((v.len() as f64 * q) as usize).min(v.len() - 1)]
    };
    println!(
        "(k) SSE, request to first event:         p50 {:.3} ms, p99 {:.3} ms",
        pct(&mut first, 0.5),
        pct(&mut first, 0.99)
    );
    println!(
        "(k) SSE, piece in -> event out (running): p50 {:.3} ms, p99 {:.3} ms (target: first chunk <= 5 ms after the Func yields it; this bounds it from above)",
        pct(&mut trips, 0.5),
        pct(&mut trips, 0.99)
    );
    // (l) idle RSS, measured before the load above.
    println!(
        "(l) idle RSS of a Runner with the example Funcs: {:.1} MiB (target <= 15), of which its own (anonymous) {:.1} MiB; the rest is the binary's code pages, shared by every Funcatron process on the host",
        mib(runner_idle),
        mib(runner_anon)
    );
    Ok(())
}
