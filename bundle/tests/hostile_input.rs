//! Property tests: random and mutated API documents and archives give a
//! bundle or a clear error, never a panic; an archive the check accepts
//! also unpacks.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use funcatron_bundle::archive::{self, Limits};
use funcatron_bundle::parse_api;
use proptest::prelude::*;

const SWAGGER2: &str = include_str!("../../swagger-examples/petstore-swagger2.yaml");
const OPENAPI3: &str = include_str!("../../swagger-examples/petstore-openapi3.yaml");

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

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1500))]

    #[test]
    fn random_documents_never_panic(text in "\\PC{0,300}") {
        let _ = parse_api(Path::new("x.yaml"), &text);
    }

    #[test]
    fn mutated_documents_never_panic(
        which in any::<bool>(),
        edits in proptest::collection::vec((any::<usize>(), 0usize..20, "[ -~\\n{}\\[\\]:$'\"-]{0,12}"), 1..6),
    ) {
        let base = if which { SWAGGER2 } else { OPENAPI3 };
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
