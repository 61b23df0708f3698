//! Hostile archives: every limit applies to every entry and every header
//! kind (GNU long names and links, PAX headers) before anything is read
//! into memory or written to disk, and a refused archive leaves nothing
//! behind. Our own archives (long names, executable handlers) still unpack.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use funcatron_bundle::archive::{self, Limits};
use tar::EntryType;

/// A tar stream written by hand, so headers can lie and kinds can be any.
struct Raw {
    gz: flate2::write::GzEncoder<Vec<u8>>,
}

impl Raw {
    fn new() -> Raw {
        Raw {
            gz: flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
        }
    }

    /// One header (name in the 100-byte field) and `size` bytes of `fill`.
    fn entry(&mut self, kind: EntryType, name: &[u8], mode: u32, size: u64, fill: u8) -> &mut Raw {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_cksum();
        self.gz.write_all(h.as_bytes()).unwrap();
        let chunk = vec![fill; 1 << 20];
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            self.gz.write_all(&chunk[..n]).unwrap();
            left -= n as u64;
        }
        let pad = (512 - size % 512) % 512;
        self.gz.write_all(&vec![0; pad as usize]).unwrap();
        self
    }

    fn data(&mut self, kind: EntryType, name: &[u8], data: &[u8]) -> &mut Raw {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.gz.write_all(h.as_bytes()).unwrap();
        self.gz.write_all(data).unwrap();
        let pad = (512 - data.len() % 512) % 512;
        self.gz.write_all(&vec![0; pad]).unwrap();
        self
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Raw {
        self.data(EntryType::Regular, name.as_bytes(), data)
    }

    fn finish(&mut self) -> Vec<u8> {
        self.gz.write_all(&[0; 1024]).unwrap();
        std::mem::replace(
            &mut self.gz,
            flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast()),
        )
        .finish()
        .unwrap()
    }
}

fn refused(bytes: &[u8], limits: Limits) -> (String, tempfile::TempDir) {
    let dest = tempfile::tempdir().unwrap();
    let e = archive::extract(bytes, dest.path(), limits).expect_err("the archive was accepted");
    (e.to_string(), dest)
}

fn is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// One PAX record: `<length> <key>=<value>\n`, the length counting itself.
fn pax_record(key: &str, value: &str) -> String {
    let body = format!(" {key}={value}\n");
    let mut n = body.len();
    loop {
        let total = n.to_string().len() + body.len();
        if total == n {
            return format!("{n}{body}");
        }
        n = total;
    }
}

const BIG: u64 = 64 << 20;

#[test]
fn a_huge_gnu_long_name_is_refused_from_its_header() {
    let bytes = Raw::new()
        .entry(EntryType::GNULongName, b"././@LongLink", 0o644, BIG, b'a')
        .file("x", b"x")
        .finish();
    assert!(bytes.len() < 1 << 20, "small on the wire");
    let (e, dest) = refused(&bytes, Limits::default());
    assert!(
        e.contains("long name") && e.contains(&BIG.to_string()),
        "{e}"
    );
    assert!(is_empty(dest.path()));
}

#[test]
fn a_huge_pax_header_is_refused_from_its_header() {
    for kind in [EntryType::XHeader, EntryType::XGlobalHeader] {
        let bytes = Raw::new()
            .entry(kind, b"PaxHeader/x", 0o644, BIG, b'7')
            .file("x", b"x")
            .finish();
        let (e, dest) = refused(&bytes, Limits::default());
        assert!(
            e.contains("PAX") && e.contains(&BIG.to_string()),
            "{kind:?}: {e}"
        );
        assert!(is_empty(dest.path()));
    }
}

#[test]
fn a_gnu_long_link_is_refused_without_reading_it() {
    let bytes = Raw::new()
        .file("ok.txt", b"ok")
        .entry(EntryType::GNULongLink, b"././@LongLink", 0o644, BIG, b'a')
        .file("x", b"x")
        .finish();
    let (e, dest) = refused(&bytes, Limits::default());
    assert!(e.contains("links are not allowed"), "{e}");
    assert!(is_empty(dest.path()), "nothing written");
}

#[test]
fn a_name_longer_than_the_limit_is_refused() {
    let long = "abcdefghi/".repeat(200) + "f";
    let bytes = Raw::new()
        .data(EntryType::GNULongName, b"././@LongLink", long.as_bytes())
        .file("ignored", b"x")
        .finish();
    let (e, dest) = refused(&bytes, Limits::default());
    assert!(e.contains("name") && e.contains("1024"), "{e}");
    assert!(is_empty(dest.path()));

    let pax = pax_record("path", &long);
    let bytes = Raw::new()
        .data(EntryType::XHeader, b"PaxHeader/x", pax.as_bytes())
        .file("ignored", b"x")
        .finish();
    let (e, _) = refused(&bytes, Limits::default());
    assert!(e.contains("name") && e.contains("1024"), "{e}");
}

#[test]
fn too_many_entries_counting_extension_headers_leave_nothing() {
    let limits = Limits {
        max_entries: 3,
        ..Limits::default()
    };
    let mut raw = Raw::new();
    for n in ["a", "b", "c", "d"] {
        raw.file(n, b"x");
    }
    let (e, dest) = refused(&raw.finish(), limits);
    assert!(e.contains("more than 3 entries"), "{e}");
    assert!(
        is_empty(dest.path()),
        "nothing written before the count failed"
    );

    // Two files behind two GNU long names are four entries.
    let mut raw = Raw::new();
    for n in ["a", "b"] {
        raw.data(EntryType::GNULongName, b"././@LongLink", n.as_bytes())
            .file(n, b"x");
    }
    let (e, _) = refused(&raw.finish(), limits);
    assert!(e.contains("more than 3 entries"), "{e}");
}

#[test]
fn gzip_bombs_stop_at_the_unpacked_limit() {
    let limits = Limits {
        max_unpacked_bytes: 1 << 20,
        ..Limits::default()
    };
    // Data behind a directory header is still data to decompress.
    for kind in [EntryType::Directory, EntryType::Regular] {
        let bytes = Raw::new().entry(kind, b"bomb", 0o755, BIG, 0).finish();
        assert!(bytes.len() < 1 << 20);
        let (e, dest) = refused(&bytes, limits);
        assert!(e.contains("archive too large"), "{kind:?}: {e}");
        assert!(is_empty(dest.path()));
    }
}

#[test]
fn links_and_devices_are_refused_and_nothing_is_written() {
    for kind in [
        EntryType::Symlink,
        EntryType::Link,
        EntryType::Char,
        EntryType::Block,
        EntryType::Fifo,
        EntryType::GNUSparse,
    ] {
        let bytes = Raw::new()
            .file("ok.txt", b"ok")
            .data(kind, b"evil", b"")
            .finish();
        let (e, dest) = refused(&bytes, Limits::default());
        assert!(e.contains("\"evil\""), "{kind:?}: {e}");
        assert!(is_empty(dest.path()), "{kind:?}: ok.txt was written");
    }
}

#[test]
fn setuid_setgid_and_sticky_bits_are_dropped_owner_exec_kept() {
    let bytes = Raw::new()
        .entry(EntryType::Regular, b"suid", 0o4755, 1, b'x')
        .entry(EntryType::Regular, b"sgid", 0o2711, 1, b'x')
        .entry(EntryType::Regular, b"sticky", 0o1644, 1, b'x')
        .entry(EntryType::Regular, b"plain", 0o666, 1, b'x')
        .finish();
    let dest = tempfile::tempdir().unwrap();
    archive::extract(&bytes, dest.path(), Limits::default()).unwrap();
    let mode = |n: &str| {
        std::fs::metadata(dest.path().join(n))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("suid"), 0o755);
    assert_eq!(mode("sgid"), 0o755);
    assert_eq!(mode("sticky"), 0o644);
    assert_eq!(mode("plain"), 0o644);
}

/// What `bundle build` writes still unpacks: paths longer than 100 bytes
/// (GNU long-name entries) and an exec handler keeps its exec bit.
#[test]
fn built_bundles_keep_long_names_and_exec_bits() {
    let src = tempfile::tempdir().unwrap();
    std::fs::write(
        src.path().join("swagger.yaml"),
        "swagger: '2.0'\nbasePath: /e\nx-funcatron: {name: e, runtime: exec, handler: run}\npaths:\n  /:\n    get: {operationId: hi}\n",
    )
    .unwrap();
    let run = src.path().join("run");
    std::fs::write(&run, "#!/bin/sh\necho hi\n").unwrap();
    std::fs::set_permissions(&run, std::fs::Permissions::from_mode(0o755)).unwrap();
    let deep = format!("{}/{}", "d".repeat(60), "n".repeat(60));
    std::fs::create_dir_all(src.path().join(&deep)).unwrap();
    std::fs::write(src.path().join(&deep).join("data.txt"), "deep").unwrap();

    let (_, bytes) = archive::build(src.path()).unwrap();
    let root = tempfile::tempdir().unwrap();
    let (sha, dir) = archive::unpack_into(&bytes, root.path(), "e", Limits::default()).unwrap();
    assert_eq!(sha, archive::sha256_hex(&bytes));
    assert_eq!(
        std::fs::read_to_string(dir.join(&deep).join("data.txt")).unwrap(),
        "deep"
    );
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    assert_eq!(
        mode(&dir.join("run")),
        0o755,
        "the handler stays executable"
    );
    assert_eq!(mode(&dir.join("swagger.yaml")), 0o644);
}

#[test]
fn the_compressed_size_limit_and_pax_records_are_checked() {
    let bytes = Raw::new().file("a", b"x").finish();
    let limits = Limits {
        max_archive_bytes: bytes.len() as u64 - 1,
        ..Limits::default()
    };
    let (e, _) = refused(&bytes, limits);
    assert!(e.contains("compressed"), "{e}");

    // `size` would make the tar library and this check disagree.
    let bytes = Raw::new()
        .data(
            EntryType::XHeader,
            b"PaxHeader/a",
            pax_record("size", "1").as_bytes(),
        )
        .file("a", b"x")
        .finish();
    let (e, _) = refused(&bytes, Limits::default());
    assert!(e.contains("\"size\" is not allowed"), "{e}");

    // `path` is honoured.
    let bytes = Raw::new()
        .data(
            EntryType::XHeader,
            b"PaxHeader/a",
            pax_record("path", "dir/real").as_bytes(),
        )
        .file("a", b"x")
        .finish();
    let dest = tempfile::tempdir().unwrap();
    archive::extract(&bytes, dest.path(), Limits::default()).unwrap();
    assert_eq!(std::fs::read(dest.path().join("dir/real")).unwrap(), b"x");
}
