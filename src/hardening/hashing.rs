//! Hardening: hashing a large file while it is written.
//!
//! Every file is hashed with SHA-1 as it streams to disk (the store's
//! commit step records the hash, and a received stream is checked against
//! the hash its sender announced). Hashing and writing on one thread makes
//! each wait for the other; here a helper thread hashes each chunk while
//! the caller reads and writes the next, with a few buffers passed back
//! and forth so memory stays fixed whatever the file's size.
//!
//! Hooks into the core at `TempFile::fill`, once a file is larger than one
//! buffer; smaller files are hashed in place.

use std::io::{self, Read};
use std::sync::mpsc;
use std::thread;

use sha1::{Digest, Sha1};

use crate::error::{Error, Result};
use crate::frame::Sha1Digest;
use crate::support::config::STREAM_BUFFER_LEN;

/// How many buffers of [`STREAM_BUFFER_LEN`] bytes one large file may use.
const HASH_BUFFERS: usize = 4;

/// How many full buffers may wait for the hasher.
const HASH_QUEUE_LEN: usize = HASH_BUFFERS - 1;

/// Copies the rest of `reader` through `write`, and returns the SHA-1 of
/// everything: the `first_len` bytes already in `first` (written already),
/// then the rest.
///
/// # Errors
///
/// Whatever reading or `write` returns; the hasher is then stopped.
pub(crate) fn copy_and_hash(
    reader: &mut dyn Read,
    first: Vec<u8>,
    first_len: usize,
    mut write: impl FnMut(&[u8]) -> Result<()>,
) -> Result<Sha1Digest> {
    thread::scope(|scope| {
        // Chunks go to the hasher full and come back empty for reuse: the
        // first, plus HASH_BUFFERS - 1 more, are all there ever are.
        let (full_tx, full_rx) = mpsc::sync_channel::<(Vec<u8>, usize)>(HASH_QUEUE_LEN);
        let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
        for _ in 1..HASH_BUFFERS {
            // Zeroed pages cost nothing until a read fills them.
            let _ = empty_tx.send(vec![0u8; STREAM_BUFFER_LEN]);
        }
        let hasher = scope.spawn(move || {
            let mut hasher = Sha1::new();
            for (chunk, len) in full_rx {
                hasher.update(&chunk[..len]);
                // The filler may have stopped early; then no one wants it.
                let _ = empty_tx.send(chunk);
            }
            <Sha1Digest>::from(hasher.finalize())
        });
        let stopped = || Error::Io(io::Error::other("the hashing thread stopped"));
        let filled: Result<()> = (|| {
            let mut chunk = (first, first_len);
            loop {
                // Leaving this loop early (an error) drops `full_tx`, which
                // ends the hasher.
                full_tx.send(chunk).map_err(|_| stopped())?;
                let mut buf = empty_rx.recv().map_err(|_| stopped())?;
                let n = read_full(reader, &mut buf)?;
                if n == 0 {
                    return Ok(());
                }
                write(&buf[..n])?;
                chunk = (buf, n);
            }
        })();
        drop(full_tx);
        // The hasher only updates a digest and sends on a channel whose
        // failure it ignores: it cannot panic.
        let sha1 = hasher.join().expect("the hashing thread does not panic");
        filled?;
        Ok(sha1)
    })
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
/// Full buffers make for fewer, larger writes and hash updates.
pub(crate) fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(filled)
}
