//! A Runner's Lua Funcs share one pool of threads: serving many Funcs does
//! not add threads (each thread keeps a state per Func it served).

#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use funcatron_broker::{AnyBroker, EmbeddedBroker};
use funcatron_ingress::IngressOptions;

/// This process's threads whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|name| name.trim_end().starts_with(prefix))
        .count()
}

#[tokio::test]
async fn fifty_lua_funcs_share_the_runners_two_lua_threads() {
    let dir = tempfile::tempdir().unwrap();
    copy_examples(dir.path(), &["hello"]);
    for i in 0..50 {
        let doc = format!(
            "swagger: '2.0'\nbasePath: /f{i}\nx-funcatron: {{name: f{i}, runtime: lua}}\npaths:\n  /:\n    get: {{operationId: hi}}\n"
        );
        let lua = format!(
            "local n = 0\nreturn {{ hi = function() n = n + 1 return 'f{i} ' .. n end }}\n"
        );
        write_bundle(
            dir.path(),
            &format!("f{i}"),
            &[("swagger.yaml", &doc), ("main.lua", &lua)],
        );
    }
    let c = start_in_process(
        AnyBroker::Embedded(EmbeddedBroker::new(10_000)),
        load(dir.path()),
        IngressOptions::default(),
    )
    .await;
    let http = reqwest::Client::new();
    for round in 1..=2 {
        for i in 0..50 {
            let r = http.get(format!("{}/f{i}/", c.base)).send().await.unwrap();
            assert_eq!(r.status(), 200);
            let text = r.text().await.unwrap();
            // Each Func's own state: its counter, on whichever thread.
            assert!(text.starts_with(&format!("f{i} ")), "{text}");
            let n: u32 = text[format!("f{i} ").len()..].parse().unwrap();
            assert!(n >= 1 && n <= round, "{text} in round {round}");
        }
    }
    // 51 Lua Funcs, `workers: 2`: two pool threads, not two per Func.
    assert_eq!(
        threads_named("funcatron-lua-") - threads_named("funcatron-lua-d"),
        2
    );
}
