//! Property tests: random and mutated API documents and archives give a
//! bundle or a clear error, never a panic; an archive the check accepts
//! also unpacks; random `$ref` paths never bring in a file from outside
//! the bundle.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use funcatron_bundle::archive::{self, Limits};
use funcatron_bundle::{parse_api, Bundle};
use proptest::prelude::*;

const SWAGGER2: &str = include_str!("../../swagger-examples/petstore-swagger2.yaml");
const OPENAPI3: &str = include_str!("../../swagger-examples/petstore-openapi3.yaml");
const OPENAPI31: &str = include_str!("../../swagger-examples/openapi31-webhooks.yaml");
const SERVERS: &str = include_str!("../../swagger-examples/servers.yaml");

fn mutate(text: &str, edits: &[(usize, usize, String)]) -> String {
    let mut s: Vec<char> = text.chars().collect();
    for (at, del, ins) in edits {
        if s.is_empty() {
            break;
        }
        let at = at % s.len();
        let end = (at + del).min(s.len());
        s.splice(at..end, ins.chars());
    }
    s.into_iter().collect()
}

fn small_archive() -> Vec<u8> {
    static ARCHIVE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    ARCHIVE.get_or_init(build_small).clone()
}

fn build_small() -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("main.lua"),
        "return { hi = function() return 'x' end }",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("swagger.yaml"),
        "swagger: '2.0'\nx-funcatron: {runtime: lua}\npaths:\n  /hi:\n    get: {operationId: hi}\n",
    )
    .unwrap();
    archive::build(dir.path()).unwrap().1
}

/// A bundle in `<tmp>/b` whose schema `$ref`s are `refs`, with files
/// inside it and a file outside it (`<tmp>/outside.yaml`) that must never
/// be read.
fn ref_bundle(refs: &[String]) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("b");
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(tmp.path().join("outside.yaml"), "description: OUTSIDE\n").unwrap();
    std::fs::write(
        dir.join("a.yaml"),
        "type: string\nx: {$ref: 'sub/c.yaml'}\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("sub/c.yaml"),
        "type: integer\ny: {$ref: '../a.yaml#/x'}\n",
    )
    .unwrap();
    std::fs::write(dir.join("main.lua"), "return {}").unwrap();
    let mut doc = String::from("openapi: 3.0.3\ninfo: {title: t, version: '1'}\nx-funcatron: {runtime: lua}\npaths:\n  /x:\n    get: {operationId: x}\ncomponents:\n  schemas:\n");
    for (i, r) in refs.iter().enumerate() {
        doc.push_str(&format!(
            "    S{i}: {{$ref: {}}}\n",
            serde_json::Value::String(r.clone())
        ));
    }
    std::fs::write(dir.join("openapi.yaml"), doc).unwrap();
    tmp
}

#[test]
fn the_ref_bundle_loads_inside_and_refuses_outside() {
    for (r, ok) in [
        ("a.yaml", true),
        ("sub/c.yaml#/y", true),
        ("./sub/../a.yaml#/x", true),
        ("openapi.yaml#/paths", true),
        ("../outside.yaml", false),
        ("%2e%2e/outside.yaml", false),
        ("sub/%2E%2E/%2e%2e/outside.yaml", false),
        ("sub/..%2F..%2Foutside.yaml", false),
    ] {
        let tmp = ref_bundle(&[r.to_owned()]);
        let got = Bundle::load(&tmp.path().join("b"));
        assert_eq!(got.is_ok(), ok, "{r}: {got:?}");
    }
}

fn ref_path() -> impl Strategy<Value = String> {
    let piece = proptest::sample::select(vec![
        "..",
        ".",
        "a.yaml",
        "sub",
        "c.yaml",
        "%2e%2e",
        "%2E%2E",
        "outside.yaml",
        "",
        "b",
        "openapi.yaml",
        "%2F",
        "\\",
        "~",
    ]);
    (
        proptest::collection::vec(piece, 1..6),
        proptest::option::of(proptest::sample::select(vec![
            "#", "#/x", "#/type", "#/", "#x",
        ])),
    )
        .prop_map(|(p, f)| format!("{}{}", p.join("/"), f.unwrap_or_default()))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_ref_paths_never_leave_the_bundle(refs in proptest::collection::vec(ref_path(), 1..4)) {
        let tmp = ref_bundle(&refs);
        if let Ok(b) = Bundle::load(&tmp.path().join("b")) {
            let text = b.doc.to_string();
            prop_assert!(!text.contains("OUTSIDE"), "{refs:?}: {text}");
            if let Some(files) = b.doc.pointer("/components/x-funcatron-refs").and_then(|f| f.as_object()) {
                for key in files.keys() {
                    prop_assert!(["a.yaml", "sub/c.yaml"].contains(&key.as_str()), "{refs:?}: {key}");
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn random_documents_never_panic(text in "\\PC{0,300}") {
        let _ = parse_api(Path::new("x.yaml"), &text);
    }

    #[test]
    fn mutated_documents_never_panic(
        which in 0usize..4,
        edits in proptest::collection::vec((any::<usize>(), 0usize..20, "[ -~\\n{}\\[\\]:$'\"-]{0,12}"), 1..6),
    ) {
        let base = [SWAGGER2, OPENAPI3, OPENAPI31, SERVERS][which];
        let _ = parse_api(Path::new("x.yaml"), &mutate(base, &edits));
    }

    #[test]
    fn random_and_mutated_archives_never_panic(
        random in proptest::collection::vec(any::<u8>(), 0..1024),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..10),
    ) {
        let limits = Limits::default();
        let _ = archive::check(&random, limits);
        // Mutate the tar inside, so the reader (not only gzip's checksum)
        // meets the garbage.
        let mut tar = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(small_archive().as_slice()), &mut tar).unwrap();
        for (at, b) in flips {
            let n = tar.len();
            tar[at % n] = b;
        }
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &tar).unwrap();
        let bytes = gz.finish().unwrap();
        if archive::check(&bytes, limits).is_ok() {
            let dest = tempfile::tempdir().unwrap();
            prop_assert!(archive::extract(&bytes, dest.path(), limits).is_ok());
        }
    }
}
