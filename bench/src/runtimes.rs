//! `funcatron-bench --runtimes`: warm worker processes against a process
//! started per request, for the same Func code, on the embedded path
//! (HTTP -> ingress -> Tron -> Runner -> worker and back).
//!
//! - Python: `fn.py` (tinyFaaS style) served by warm workers, against the
//!   exec runtime running `python3 fn.py` per call.
//! - Node.js: `index.js` (tinyFaaS style) warm, against `node index.js` per call.
//! - Java: `bench.Hello` warm in a JVM, against `java bench.Hello` per call
//!   (the same class, compiled once here with the shim).
//! - Lua `hello` as the in-process reference.
//!
//! Each at concurrency 1 and 16, printing requests/s, p50, p99 and the
//! warm/fork ratios.

use std::path::Path;

use anyhow::{Context, Result};
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use tokio_util::sync::CancellationToken;

use crate::{http_load_path, row, start_path, Stats};

const PY: &str = r#"import sys


def fn(input, headers):
    return "Hello, bench!"


if __name__ == "__main__":
    sys.stdout.write(fn(sys.stdin.read() or None, {}))
"#;

const JS: &str = r#"const answer = () => 'Hello, bench!';
module.exports = (req, res) => res.send(answer());
if (require.main === module) process.stdout.write(answer());
"#;

const JAVA: &str = r#"package bench;

public class Hello {
    static String answer() { return "Hello, bench!"; }

    public Object hello(funcatron.Request req) { return answer(); }

    public static void main(String[] args) { System.out.print(answer()); }
}
"#;

fn write(dir: &Path, files: &[(&str, &str)]) -> Result<()> {
    for (name, text) in files {
        let p = dir.join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&p, text).with_context(|| p.display().to_string())?;
    }
    Ok(())
}

/// The benchmark's bundles; Java's class is compiled here for the fork runs.
fn bundles(root: &Path) -> Result<()> {
    let hello = Path::new("func-bundles/hello");
    write(
        &root.join("hello"),
        &[
            (
                "swagger.yaml",
                &std::fs::read_to_string(hello.join("swagger.yaml"))?,
            ),
            (
                "main.lua",
                &std::fs::read_to_string(hello.join("main.lua"))?,
            ),
        ],
    )?;
    write(&root.join("bench-py"), &[("fn.py", PY)])?;
    write(
        &root.join("bench-py-fork"),
        &[
            ("fn.py", PY),
            (
                "funcatron.yaml",
                "runtime: exec\nhandler: fn.py\ncommand: [python3, fn.py]\n",
            ),
        ],
    )?;
    write(
        &root.join("bench-node"),
        &[
            ("package.json", r#"{"name": "fn", "main": "index.js"}"#),
            ("index.js", JS),
        ],
    )?;
    write(
        &root.join("bench-node-fork"),
        &[
            ("index.js", JS),
            (
                "funcatron.yaml",
                "runtime: exec\nhandler: index.js\ncommand: [node, index.js]\nmemory_mb: 16384\n",
            ),
        ],
    )?;
    write(
        &root.join("bench-java"),
        &[
            ("src/bench/Hello.java", JAVA),
            (
                "swagger.yaml",
                "swagger: '2.0'\nbasePath: /bench-java\nx-funcatron: {runtime: java}\npaths:\n  /:\n    get: {operationId: 'bench.Hello::hello'}\n",
            ),
        ],
    )?;
    let classes = root.join("bench-java-fork/classes");
    std::fs::create_dir_all(&classes)?;
    let mut javac = std::process::Command::new("javac");
    javac.arg("-d").arg(&classes);
    for e in std::fs::read_dir("runner/shims/java/funcatron")? {
        javac.arg(e?.path());
    }
    let status = javac
        .arg(root.join("bench-java/src/bench/Hello.java"))
        .status()
        .context("javac")?;
    anyhow::ensure!(status.success(), "javac failed");
    write(
        &root.join("bench-java-fork"),
        &[(
            "funcatron.yaml",
            &format!(
                "runtime: exec\nhandler: classes/bench/Hello.class\nmemory_mb: 16384\ncommand: [java, -Xmx64m, -XX:+UseSerialGC, -XX:TieredStopAtLevel=1, -cp, {}, bench.Hello]\n",
                classes.display()
            ),
        )],
    )?;
    Ok(())
}

/// Run the runtime benchmark and print its table and ratios.
pub async fn run() -> Result<()> {
    let root = tempfile::tempdir()?;
    bundles(root.path())?;
    let stop = CancellationToken::new();
    let embedded = AnyBroker::Embedded(EmbeddedBroker::new(10_000));
    let addr = start_path(
        || embedded.clone(),
        root.path(),
        funcatron_ingress::edge::Routing::Edge,
        &stop,
    )
    .await?;
    let expect: &'static [u8] = b"Hello, bench!";
    // Workers start in the background: wait until each Func answers.
    for path in ["/bench-py", "/bench-node", "/bench-java"] {
        let mut ok = false;
        for _ in 0..600 {
            if http_load_path(addr, path, expect, 1, 1).await.is_ok() {
                ok = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        anyhow::ensure!(ok, "{path} never answered");
    }
    println!(
        "machine: {} CPUs; embedded path; warm pools of one worker per CPU",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "{:<44} {:>10} {:>9} {:>9}",
        "measurement", "req/s", "p50 ms", "p99 ms"
    );
    let lua1 = http_load_path(addr, "/hello/bench", expect, 1, 2000).await?;
    row("lua hello (in-process), c=1", lua1);
    let lua16 = http_load_path(addr, "/hello/bench", expect, 16, 8000).await?;
    row("lua hello (in-process), c=16", lua16);
    let mut ratios: Vec<(&str, Stats, Stats, Stats, Stats)> = Vec::new();
    for (name, warm, fork) in [
        ("python", "/bench-py", "/bench-py-fork"),
        ("nodejs", "/bench-node", "/bench-node-fork"),
        ("java", "/bench-java", "/bench-java-fork"),
    ] {
        let w1 = http_load_path(addr, warm, expect, 1, 2000).await?;
        row(&format!("{name} warm worker, c=1"), w1);
        let w16 = http_load_path(addr, warm, expect, 16, 8000).await?;
        row(&format!("{name} warm worker, c=16"), w16);
        let f1 = http_load_path(addr, fork, expect, 1, 40).await?;
        row(&format!("{name} process per request, c=1"), f1);
        let f16 = http_load_path(addr, fork, expect, 16, 160).await?;
        row(&format!("{name} process per request, c=16"), f16);
        ratios.push((name, w1, w16, f1, f16));
    }
    println!();
    for (name, w1, w16, f1, f16) in ratios {
        let target = if name == "python" {
            " (target >= 20x)"
        } else {
            ""
        };
        println!(
            "{name:<7} warm/fork throughput: c=1 {:>6.1}x  c=16 {:>6.1}x{target};  p50 at c=1 {:.2} ms vs {:.2} ms",
            w1.rps / f1.rps,
            w16.rps / f16.rps,
            w1.p50_ms,
            f1.p50_ms
        );
    }
    stop.cancel();
    Ok(())
}
