//! Bundle archives: what `funcatron bundle build` writes, `bundle push`
//! uploads, the Tron stores by SHA-256 and Runners fetch.
//!
//! A gzip-compressed tar of the bundle's regular files, built
//! deterministically (sorted paths, no dot files, fixed owner, mode and
//! time), so the same files always give the same SHA-256. Extraction is
//! defensive: only regular files and directories; no absolute paths, `..`,
//! links or devices; limits on entries and unpacked size (archive bombs).

use std::io::Read;
use std::path::{Component, Path};

use crate::{bundle_files, Bundle, BundleError};

/// Limits on what an archive may unpack to.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes all files together may hold.
    pub max_unpacked_bytes: u64,
    /// Most entries.
    pub max_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 256 * 1024 * 1024,
            max_entries: 10_000,
        }
    }
}

/// Why an archive was refused.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Not a gzip-compressed tar, or cut short.
    #[error("not a bundle archive (gzip-compressed tar): {0}")]
    Format(String),
    /// An entry that may not be in a bundle.
    #[error("archive entry {entry:?}: {why}")]
    Entry {
        /// The entry's path as written in the archive.
        entry: String,
        /// What is wrong with it.
        why: String,
    },
    /// More than the limits allow.
    #[error("archive too large: {0}")]
    TooLarge(String),
    /// Writing the files failed.
    #[error("extracting: {0}")]
    Io(#[from] std::io::Error),
    /// The bundle inside is not valid.
    #[error(transparent)]
    Bundle(#[from] BundleError),
}

/// Hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    funcatron_control::fetch::sha256_hex(bytes)
}

/// Validate the bundle in `dir` and pack it; returns the bundle and the
/// archive bytes.
pub fn build(dir: &Path) -> Result<(Bundle, Vec<u8>), ArchiveError> {
    let bundle = Bundle::load(dir)?;
    let mut files = Vec::new();
    bundle_files(dir, dir, &mut files)?;
    let gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    for (rel, path) in files {
        let data = std::fs::read(&path)?;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &rel, data.as_slice())?;
    }
    let gz = tar.into_inner()?;
    Ok((bundle, gz.finish()?))
}

/// Unpack `bytes` into `dest` (an empty directory), refusing anything a
/// bundle should not hold.
pub fn extract(bytes: &[u8], dest: &Path, limits: Limits) -> Result<(), ArchiveError> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let entries = archive
        .entries()
        .map_err(|e| ArchiveError::Format(e.to_string()))?;
    let mut total = 0u64;
    let mut count = 0usize;
    for entry in entries {
        let mut entry = entry.map_err(|e| ArchiveError::Format(e.to_string()))?;
        count += 1;
        if count > limits.max_entries {
            return Err(ArchiveError::TooLarge(format!(
                "more than {} entries",
                limits.max_entries
            )));
        }
        let raw = entry
            .path()
            .map_err(|e| ArchiveError::Format(e.to_string()))?
            .into_owned();
        let name = raw.display().to_string();
        let bad = |why: &str| ArchiveError::Entry {
            entry: name.clone(),
            why: why.to_owned(),
        };
        let mut rel = std::path::PathBuf::new();
        for c in raw.components() {
            match c {
                Component::Normal(p) => rel.push(p),
                Component::CurDir => {}
                Component::ParentDir => return Err(bad("`..` leaves the bundle")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(bad("absolute paths are not allowed"))
                }
            }
        }
        match entry.header().entry_type() {
            tar::EntryType::Directory => {
                std::fs::create_dir_all(dest.join(&rel))?;
                continue;
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {}
            tar::EntryType::Symlink | tar::EntryType::Link => {
                return Err(bad("links are not allowed in a bundle"))
            }
            other => return Err(bad(&format!("entry type {other:?} is not allowed"))),
        }
        if rel.as_os_str().is_empty() {
            return Err(bad("empty path"));
        }
        let size = entry
            .header()
            .size()
            .map_err(|e| ArchiveError::Format(e.to_string()))?;
        total = total.saturating_add(size);
        if total > limits.max_unpacked_bytes {
            return Err(ArchiveError::TooLarge(format!(
                "unpacks to more than {} bytes",
                limits.max_unpacked_bytes
            )));
        }
        let target = dest.join(&rel);
        if let Some(parent) = target.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // Never follow anything already there (a directory named like a
        // file, a link made by an earlier entry: refused above anyway).
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(bad("appears twice"));
        }
        let mut out = std::fs::File::create(&target)?;
        // Read at most the declared size: a lying header cannot unpack more.
        let copied = std::io::copy(&mut (&mut entry).take(size), &mut out)?;
        if copied != size {
            return Err(bad("cut short"));
        }
    }
    Ok(())
}

/// Unpack a verified archive into the content-addressed `root`: the bundle
/// ends up in `root/<sha>/<name>/` (the name directory gives bundles without
/// an explicit `name` theirs). Idempotent; atomic (unpacked beside, then
/// renamed). Returns the bundle directory.
pub fn unpack_into(
    bytes: &[u8],
    root: &Path,
    name: &str,
    limits: Limits,
) -> Result<(String, std::path::PathBuf), ArchiveError> {
    let sha = sha256_hex(bytes);
    let final_dir = root.join(&sha);
    if let Some(existing) = only_subdir(&final_dir) {
        return Ok((sha, existing));
    }
    if !crate::valid_name(name) {
        return Err(ArchiveError::Entry {
            entry: name.to_owned(),
            why: "not a valid Func name".into(),
        });
    }
    std::fs::create_dir_all(root)?;
    let scratch = tempfile::Builder::new()
        .prefix(".unpacking-")
        .tempdir_in(root)?;
    let work = scratch.path().join("out");
    let bundle_dir = work.join(name);
    std::fs::create_dir_all(&bundle_dir)?;
    extract(bytes, &bundle_dir, limits)?;
    match std::fs::rename(&work, &final_dir) {
        Ok(()) => {}
        Err(_) if final_dir.is_dir() => {}
        Err(e) => return Err(e.into()),
    }
    only_subdir(&final_dir)
        .map(|d| (sha, d))
        .ok_or_else(|| ArchiveError::Format("unpacked bundle is missing".into()))
}

fn only_subdir(dir: &Path) -> Option<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.is_dir())
}
