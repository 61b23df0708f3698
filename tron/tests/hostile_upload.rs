//! Hostile archives on the upload path: a small upload whose headers
//! announce gigabytes (a PAX header, a GNU long name) is answered 4xx with a
//! JSON reason naming the limit, and the store keeps nothing of it (no
//! archive, no unpacked files, no state), so no peer ever fetches it. A
//! good exec bundle keeps its handler's exec bit through upload, store and
//! download.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;

use funcatron_bundle::archive::{self, Limits};
use funcatron_tron::mgmt;
use tar::EntryType;

const TOKEN: &str = "test-token";
const SWAGGER: &str = "swagger: '2.0'\nbasePath: /s\nx-funcatron: {name: s, runtime: lua}\npaths:\n  /:\n    get: {operationId: hi}\n";
const LUA: &str = "return { hi = function() return 'hi' end }";

/// A gzip tar of raw entries (kind, name, data); `lie`: entry `at`
/// announces `size` bytes, made of `a`s when its data is empty.
fn raw_archive(entries: &[(EntryType, &str, Vec<u8>)], lie: Option<(usize, u64)>) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    for (i, (kind, name, data)) in entries.iter().enumerate() {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        let size = match lie {
            Some((at, size)) if at == i => size,
            _ => data.len() as u64,
        };
        h.set_size(size);
        h.set_cksum();
        gz.write_all(h.as_bytes()).unwrap();
        let mut left = size;
        while left > 0 {
            let chunk: &[u8] = if data.is_empty() {
                &[b'a'; 65536]
            } else {
                data
            };
            let n = left.min(chunk.len() as u64) as usize;
            gz.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        gz.write_all(&vec![0; ((512 - size % 512) % 512) as usize])
            .unwrap();
    }
    gz.write_all(&[0; 1024]).unwrap();
    gz.finish().unwrap()
}

async fn start(store: &Path) -> (String, Arc<funcatron_tron::registry::Registry>) {
    let registry = common::open_registry(store).await;
    let app = mgmt::router(
        Arc::clone(&registry),
        mgmt::MgmtOptions {
            max_upload: 1 << 20,
            ..mgmt::MgmtOptions::new(TOKEN)
        },
        None,
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, registry)
}

async fn upload(base: &str, body: Vec<u8>) -> (u16, serde_json::Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/v1/bundles?name=s"))
        .bearer_auth(TOKEN)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap())
}

fn files_under(dir: &Path) -> Vec<String> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn hostile_uploads_are_refused_and_nothing_is_stored() {
    let store = tempfile::tempdir().unwrap();
    let (base, registry) = start(store.path()).await;
    let huge = 64u64 << 20;
    let pax_bomb = raw_archive(
        &[
            (EntryType::Regular, "swagger.yaml", SWAGGER.into()),
            (EntryType::XHeader, "PaxHeader/main.lua", Vec::new()),
            (EntryType::Regular, "main.lua", LUA.into()),
        ],
        Some((1, 8 << 20)),
    );
    let long_name_bomb = raw_archive(
        &[
            (EntryType::Regular, "swagger.yaml", SWAGGER.into()),
            (EntryType::GNULongName, "././@LongLink", Vec::new()),
            (EntryType::Regular, "main.lua", LUA.into()),
        ],
        Some((1, huge)),
    );
    for (what, body, reason) in [
        ("PAX header", pax_bomb, "PAX header of 8388608 bytes"),
        (
            "GNU long name",
            long_name_bomb,
            "long name of 67108864 bytes",
        ),
    ] {
        assert!(body.len() < 1 << 20, "{what}: small on the wire");
        let (status, answer) = upload(&base, body).await;
        assert!((400..500).contains(&status), "{what}: {status} {answer}");
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(message.contains(reason), "{what}: {answer}");
        assert_eq!(answer["error"], "invalid_bundle", "{what}: {answer}");
    }
    assert!(files_under(&store.path().join("blobs")).is_empty());
    assert!(files_under(&store.path().join("bundles"))
        .iter()
        .all(|f| f.starts_with(".unpacking-")));
    assert!(registry.state().await.funcs.is_empty());
}

#[tokio::test]
async fn an_exec_handler_keeps_its_exec_bit_through_the_registry() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("swagger.yaml"),
        "swagger: '2.0'\nbasePath: /e\nx-funcatron: {name: e, runtime: exec, handler: run}\npaths:\n  /:\n    get: {operationId: hi}\n",
    )
    .unwrap();
    let run = src.path().join("run");
    std::fs::write(&run, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let (_, bytes) = archive::build(src.path()).unwrap();

    let store = tempfile::tempdir().unwrap();
    let (base, _registry) = start(store.path()).await;
    let (status, answer) = upload(&base, bytes).await;
    assert_eq!(status, 201, "{answer}");
    let sha = answer["sha"].as_str().unwrap().to_owned();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode(&store.path().join("bundles").join(&sha).join("s/run")),
        0o755
    );

    // What a Runner does: fetch by SHA, unpack.
    let policy = funcatron_control::outbound::OutboundPolicy::new(&["127.0.0.1"]).unwrap();
    let fetched = funcatron_control::fetch::Fetcher::new(policy)
        .unwrap()
        .archive(
            &base,
            &sha,
            Limits::default().max_archive_bytes,
            Some(TOKEN),
        )
        .await
        .unwrap();
    let cache = tempfile::tempdir().unwrap();
    let (_, dir) = archive::unpack_into(&fetched, cache.path(), "e", Limits::default()).unwrap();
    assert_eq!(mode(&dir.join("run")), 0o755);
    assert_eq!(mode(&dir.join("swagger.yaml")), 0o644);
}
