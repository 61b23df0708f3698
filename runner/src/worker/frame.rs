//! The framed protocol between a Runner and its worker processes.
//!
//! A frame is a list of byte strings: a big-endian `u32` count, then per item
//! a big-endian `u32` length and the bytes. No JSON, no base64: bodies cross
//! as they are, and each shim (Python, Node.js, Java) reads it in a few
//! lines. The conversation, one request at a time per worker:
//!
//! - worker -> Runner, once: `["ready"]`, or `["error", why]` and exit.
//! - Runner -> worker: `["invoke", id, operation, method, scheme, host, path,
//!   query, body, budget_ms, n_headers, (name, value) x n_headers, (param,
//!   value)...]`.
//! - worker -> Runner: `["ok", status, body, (name, value)...]` or
//!   `["error", why]` (the Func raised; the worker lives on).
//! - or, for an answer the Func streams (a Python or Node.js generator):
//!   `["head", status, (name, value)...]` once, then `["chunk", bytes]`
//!   per piece (a piece larger than [`MAX_CHUNK_BYTES`] split by the
//!   shim), then `["end"]`, or `["error", why]` if the Func raised
//!   midway. The Runner passes each piece on as it arrives (a direct
//!   request, [`crate::direct`]) or collects them into one answer.
//! - worker -> Runner, any number of times before its answer (not while
//!   a stream is open): `["store", operation]`, a document-store operation
//!   as JSON (`funcatron_documents::rpc::Op`); the Runner answers
//!   `["store", status, body]` (the body as JSON) and waits again for the
//!   answer ([`crate::store`]).
//! - Runner -> worker, only while a stream is open: `["cancel"]` (the
//!   client went away, or a collected answer outgrew its limit). The shim
//!   closes the Func's generator at its next piece and ends with
//!   `["end"]`; a `cancel` that arrives after the end is ignored.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Most items in one frame.
pub const MAX_ITEMS: u32 = 100_000;
/// Largest frame accepted from a worker.
pub const MAX_FRAME_BYTES: usize = 64 * 1024 * 1024;
/// Largest piece in one `chunk` frame: the shims split larger ones, the
/// Runner refuses them (a broken protocol). It bounds what one streamed
/// answer holds in the Runner: a few pieces between the worker and the
/// client.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;

/// A frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The other side closed the connection.
    #[error("the worker closed its connection")]
    Closed,
    /// Reading or writing failed.
    #[error("worker connection: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a frame.
    #[error("the worker broke the protocol: {0}")]
    Garbage(String),
}

/// Encode `items` as one frame.
pub fn encode<I, T>(items: I) -> Vec<u8>
where
    I: IntoIterator<Item = T>,
    I::IntoIter: ExactSizeIterator,
    T: AsRef<[u8]>,
{
    let items = items.into_iter();
    let mut out = Vec::with_capacity(256);
    out.extend_from_slice(&(items.len() as u32).to_be_bytes());
    for item in items {
        let item = item.as_ref();
        out.extend_from_slice(&(item.len() as u32).to_be_bytes());
        out.extend_from_slice(item);
    }
    out
}

/// Write one frame.
pub async fn write<W: AsyncWriteExt + Unpin>(w: &mut W, frame: &[u8]) -> Result<(), FrameError> {
    w.write_all(frame).await?;
    w.flush().await?;
    Ok(())
}

/// Read one frame.
pub async fn read<R: AsyncReadExt + Unpin>(r: &mut R) -> Result<Vec<Vec<u8>>, FrameError> {
    let count = match r.read_u32().await {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(FrameError::Closed),
        Err(e) => return Err(e.into()),
    };
    if count == 0 || count > MAX_ITEMS {
        return Err(FrameError::Garbage(format!(
            "a frame of {count} items (expected 1 to {MAX_ITEMS})"
        )));
    }
    let mut items = Vec::with_capacity(count.min(64) as usize);
    let mut total = 0usize;
    for _ in 0..count {
        let len = r.read_u32().await.map_err(eof_is_garbage)? as usize;
        total += len;
        if total > MAX_FRAME_BYTES {
            return Err(FrameError::Garbage(format!(
                "a frame larger than {MAX_FRAME_BYTES} bytes"
            )));
        }
        let mut item = vec![0; len];
        r.read_exact(&mut item).await.map_err(eof_is_garbage)?;
        items.push(item);
    }
    Ok(items)
}

fn eof_is_garbage(e: std::io::Error) -> FrameError {
    if e.kind() == std::io::ErrorKind::UnexpectedEof {
        FrameError::Garbage("the connection ended inside a frame".into())
    } else {
        FrameError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_and_garbage_is_refused() {
        let f = encode([b"ok".as_slice(), b"200", b"", &[0u8, 255, 10]]);
        let items = read(&mut f.as_slice()).await.unwrap();
        assert_eq!(
            items,
            vec![b"ok".to_vec(), b"200".to_vec(), vec![], vec![0, 255, 10]]
        );
        assert!(matches!(read(&mut &b""[..]).await, Err(FrameError::Closed)));
        let garbage = b"Traceback (most recent call last):\n";
        assert!(matches!(
            read(&mut &garbage[..]).await,
            Err(FrameError::Garbage(_))
        ));
        assert!(matches!(
            read(&mut &f[..f.len() - 1]).await,
            Err(FrameError::Garbage(_))
        ));
    }
}
