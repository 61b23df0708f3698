//! Bundle archives: what `funcatron bundle build` writes, `bundle push`
//! uploads, the Tron stores by SHA-256 and Runners fetch.
//!
//! A gzip-compressed tar of the bundle's regular files, built
//! deterministically (sorted paths, no dot files, fixed owner, mode and
//! time), so the same files always give the same SHA-256. Extraction is
//! defensive: only regular files and directories; no absolute paths, `..`,
//! links or devices; limits on entries and unpacked size (archive bombs).

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use crate::{bundle_files, Bundle, BundleError};

/// Limits on what an archive may hold. Each is checked from a header
/// before the bytes it announces are read, kept or written.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Most bytes all entries together may announce (file data, and the
    /// data of directories and extension headers, which is decompressed
    /// too).
    pub max_unpacked_bytes: u64,
    /// Most entries, extension headers (GNU long names, PAX) included.
    pub max_entries: usize,
    /// Longest path of one entry, in bytes (GNU long names and PAX `path`
    /// records included).
    pub max_name_bytes: usize,
    /// Largest PAX extension header, in bytes.
    pub max_header_bytes: u64,
    /// Largest archive (compressed), in bytes.
    pub max_archive_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_unpacked_bytes: 256 * 1024 * 1024,
            max_entries: 10_000,
            max_name_bytes: 1024,
            max_header_bytes: 64 * 1024,
            max_archive_bytes: 64 * 1024 * 1024,
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
/// archive bytes. Files that are executable (any exec bit) are written
/// 0755, every other file 0644.
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
        header.set_mode(if is_executable(&path)? { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, &rel, data.as_slice())?;
    }
    let gz = tar.into_inner()?;
    Ok((bundle, gz.finish()?))
}

#[cfg(unix)]
fn is_executable(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o111 != 0)
}

#[cfg(not(unix))]
fn is_executable(_: &Path) -> std::io::Result<bool> {
    Ok(false)
}

/// One entry that passed every check, as it is unpacked.
enum Item {
    /// A directory (relative to the destination).
    Dir(PathBuf),
    /// A regular file of `size` bytes; `exec`: its owner-exec bit was set.
    File {
        rel: PathBuf,
        name: String,
        size: u64,
        exec: bool,
    },
}

/// The decompressed stream, cut off after `left` bytes (a gzip bomb stops
/// here even if a header check were missed).
struct Capped<R> {
    inner: R,
    left: u64,
    cap: u64,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.left == 0 {
            return Err(std::io::Error::other(format!(
                "decompresses to more than {} bytes",
                self.cap
            )));
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        self.left -= n as u64;
        Ok(n)
    }
}

/// The state of one pass over an archive's raw entries: the counts so far
/// and the extension headers that name the next entry.
struct Walk {
    limits: Limits,
    entries: usize,
    total: u64,
    /// A GNU long name (`L`) for the next entry.
    long_name: Option<Vec<u8>>,
    /// A PAX (`x`) `path` for the next entry.
    pax_path: Option<Vec<u8>>,
    /// A PAX (`x`) header was read for the next entry.
    pax_seen: bool,
}

fn format_err(e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Format(e.to_string())
}

fn too_large(why: String) -> ArchiveError {
    ArchiveError::TooLarge(why)
}

fn entry_err(entry: &str, why: impl Into<String>) -> ArchiveError {
    ArchiveError::Entry {
        entry: entry.to_owned(),
        why: why.into(),
    }
}

/// Read exactly `size` bytes (already checked against a limit).
fn read_small(entry: &mut impl Read, size: u64) -> Result<Vec<u8>, ArchiveError> {
    let mut data = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
    (&mut *entry).take(size).read_to_end(&mut data)?;
    if data.len() as u64 != size {
        return Err(format_err("cut short"));
    }
    Ok(data)
}

impl Walk {
    fn new(limits: Limits) -> Walk {
        Walk {
            limits,
            entries: 0,
            total: 0,
            long_name: None,
            pax_path: None,
            pax_seen: false,
        }
    }

    /// Check one raw entry; extension headers are consumed here (`None`).
    fn next<R: Read>(&mut self, entry: &mut tar::Entry<R>) -> Result<Option<Item>, ArchiveError> {
        let l = self.limits;
        self.entries += 1;
        if self.entries > l.max_entries {
            return Err(too_large(format!(
                "more than {} entries (extension headers count)",
                l.max_entries
            )));
        }
        let header = entry.header().clone();
        let size = header.entry_size().map_err(format_err)?;
        self.total = self.total.saturating_add(size);
        if self.total > l.max_unpacked_bytes {
            return Err(too_large(format!(
                "unpacks to more than {} bytes",
                l.max_unpacked_bytes
            )));
        }
        let kind = header.entry_type();
        let header_name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
        match kind {
            tar::EntryType::GNULongName => {
                if self.long_name.is_some() {
                    return Err(format_err("two GNU long names for one entry"));
                }
                if size > l.max_name_bytes as u64 + 1 {
                    return Err(too_large(format!(
                        "a GNU long name of {size} bytes (at most {})",
                        l.max_name_bytes
                    )));
                }
                let mut name = read_small(entry, size)?;
                while name.last() == Some(&0) {
                    name.pop();
                }
                self.long_name = Some(name);
                return Ok(None);
            }
            tar::EntryType::GNULongLink => {
                return Err(entry_err(&header_name, "links are not allowed in a bundle"))
            }
            tar::EntryType::XHeader | tar::EntryType::XGlobalHeader => {
                let global = kind == tar::EntryType::XGlobalHeader;
                if !global && self.pax_seen {
                    return Err(format_err("two PAX headers for one entry"));
                }
                if size > l.max_header_bytes {
                    return Err(too_large(format!(
                        "a PAX header of {size} bytes (at most {})",
                        l.max_header_bytes
                    )));
                }
                let data = read_small(entry, size)?;
                let path = pax_path(&data, global).map_err(|why| entry_err(&header_name, why))?;
                if !global {
                    self.pax_seen = true;
                    self.pax_path = path;
                }
                return Ok(None);
            }
            _ => {}
        }
        self.item(&header, kind, size, header_name).map(Some)
    }

    /// The entry itself (not an extension header), named by the extension
    /// headers before it if any.
    fn item(
        &mut self,
        header: &tar::Header,
        kind: tar::EntryType,
        size: u64,
        header_name: String,
    ) -> Result<Item, ArchiveError> {
        let raw = match (self.long_name.take(), self.pax_path.take()) {
            (_, Some(p)) | (Some(p), None) => p,
            (None, None) => header.path_bytes().into_owned(),
        };
        self.pax_seen = false;
        if raw.len() > self.limits.max_name_bytes {
            return Err(entry_err(
                &String::from_utf8_lossy(&raw[..64.min(raw.len())]),
                format!(
                    "a name of {} bytes (at most {})",
                    raw.len(),
                    self.limits.max_name_bytes
                ),
            ));
        }
        let name =
            String::from_utf8(raw).map_err(|_| entry_err(&header_name, "name is not UTF-8"))?;
        let bad = |why: &str| entry_err(&name, why);
        if name.contains('\0') {
            return Err(bad("name holds a NUL byte"));
        }
        let mut rel = PathBuf::new();
        for c in Path::new(&name).components() {
            match c {
                Component::Normal(p) => rel.push(p),
                Component::CurDir => {}
                Component::ParentDir => return Err(bad("`..` leaves the bundle")),
                Component::RootDir | Component::Prefix(_) => {
                    return Err(bad("absolute paths are not allowed"))
                }
            }
        }
        match kind {
            tar::EntryType::Directory if size == 0 => Ok(Item::Dir(rel)),
            tar::EntryType::Directory => Err(bad("a directory that holds data")),
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                if rel.as_os_str().is_empty() {
                    return Err(bad("empty path"));
                }
                let mode = header.mode().map_err(format_err)?;
                Ok(Item::File {
                    rel,
                    name,
                    size,
                    exec: mode & 0o100 != 0,
                })
            }
            tar::EntryType::Symlink | tar::EntryType::Link => {
                Err(bad("links are not allowed in a bundle"))
            }
            other => Err(bad(&format!("entry type {other:?} is not allowed"))),
        }
    }
}

/// The `path` a PAX header gives the next entry. Records that would change
/// how the archive is read (`size`, sparse files) or make a link are
/// refused; a global header may not name paths. Others (times, owners) are
/// ignored.
fn pax_path(data: &[u8], global: bool) -> Result<Option<Vec<u8>>, String> {
    let mut path = None;
    for ext in tar::PaxExtensions::new(data) {
        let ext = ext.map_err(|e| format!("bad PAX record: {e}"))?;
        let key = ext.key_bytes();
        if key == b"size" || key == b"linkpath" || key.starts_with(b"GNU.sparse") {
            return Err(format!(
                "PAX record {:?} is not allowed in a bundle",
                String::from_utf8_lossy(key)
            ));
        }
        if key == b"path" {
            if global {
                return Err("a global PAX header may not name a path".into());
            }
            path = Some(ext.value_bytes().to_vec());
        }
    }
    Ok(path)
}

/// Check every entry of `bytes` against `limits`, handing each regular file
/// or directory that passes to `each` with a reader of its data. The first
/// entry that fails stops the pass.
fn walk(
    bytes: &[u8],
    limits: Limits,
    mut each: impl FnMut(Item, &mut dyn Read) -> Result<(), ArchiveError>,
) -> Result<(), ArchiveError> {
    if bytes.len() as u64 > limits.max_archive_bytes {
        return Err(too_large(format!(
            "{} bytes compressed (at most {})",
            bytes.len(),
            limits.max_archive_bytes
        )));
    }
    // Headers, padding and the end blocks come on top of the data.
    let cap = limits.max_unpacked_bytes.saturating_add(
        (limits.max_entries as u64)
            .saturating_add(2)
            .saturating_mul(1024),
    );
    let mut archive = tar::Archive::new(Capped {
        inner: flate2::read::GzDecoder::new(bytes),
        left: cap,
        cap,
    });
    // Raw: the tar crate would read GNU long names and PAX headers whole
    // into memory, whatever their size; they are handled (and limited) here.
    let entries = archive.entries().map_err(format_err)?.raw(true);
    let mut state = Walk::new(limits);
    for entry in entries {
        let mut entry = entry.map_err(format_err)?;
        if let Some(item) = state.next(&mut entry)? {
            each(item, &mut entry)?;
        }
    }
    if state.long_name.is_some() || state.pax_seen {
        return Err(format_err("an extension header describes no entry"));
    }
    Ok(())
}

/// Check `bytes` against `limits` without writing anything: what
/// [`extract`] refuses, this refuses.
pub fn check(bytes: &[u8], limits: Limits) -> Result<(), ArchiveError> {
    walk(bytes, limits, |_, _| Ok(()))
}

/// Unpack `bytes` into `dest` (an empty directory), refusing anything a
/// bundle should not hold. The whole archive is checked first ([`check`]),
/// so a refused archive writes nothing. Files are written 0644, or 0755
/// when the owner-exec bit was set; never setuid, setgid or sticky.
/// Blocking: async callers run it on a blocking thread.
pub fn extract(bytes: &[u8], dest: &Path, limits: Limits) -> Result<(), ArchiveError> {
    check(bytes, limits)?;
    walk(bytes, limits, |item, data| write_item(dest, item, data))
}

fn write_item(dest: &Path, item: Item, data: &mut dyn Read) -> Result<(), ArchiveError> {
    let (rel, name, size, exec) = match item {
        Item::Dir(rel) => {
            std::fs::create_dir_all(dest.join(rel))?;
            return Ok(());
        }
        Item::File {
            rel,
            name,
            size,
            exec,
        } => (rel, name, size, exec),
    };
    let target = dest.join(&rel);
    if let Some(parent) = target.parent() {
        std::fs::create_dir_all(parent)?;
    }
    // Never follow anything already there (a directory named like a file,
    // a link: none can be made by an entry anyway).
    if std::fs::symlink_metadata(&target).is_ok() {
        return Err(entry_err(&name, "appears twice"));
    }
    let mut out = std::fs::File::create(&target)?;
    // Read at most the declared size: a lying header cannot unpack more.
    let copied = std::io::copy(&mut data.take(size), &mut out)?;
    if copied != size {
        return Err(entry_err(&name, "cut short"));
    }
    set_mode(&out, exec)?;
    Ok(())
}

#[cfg(unix)]
fn set_mode(file: &std::fs::File, exec: bool) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = if exec { 0o755 } else { 0o644 };
    file.set_permissions(std::fs::Permissions::from_mode(mode))
}

#[cfg(not(unix))]
fn set_mode(_: &std::fs::File, _: bool) -> std::io::Result<()> {
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
