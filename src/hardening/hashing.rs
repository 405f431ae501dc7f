//! Hardening: hashing a large file while it is written.
//!
//! Every file is hashed with SHA-1 as it streams to disk (the store's
//! commit step records the hash, and a received stream is checked against
//! the hash its sender announced). Reading, writing and hashing one chunk
//! after another on one thread makes each wait for the other two. Here they
//! are three stages, each on its own thread: the caller reads chunk *n + 2*
//! while a writer thread writes chunk *n + 1* and a hasher thread hashes
//! chunk *n*. A few buffers go round the three, so memory stays fixed
//! whatever the file's size.
//!
//! Hooks into the core at `TempFile::fill`, once a file is larger than one
//! buffer; smaller files are hashed in place.

use std::io::{self, Read};
use std::sync::mpsc;
use std::thread;

use sha1::{Digest, Sha1};

use crate::error::{Error, Result};
use crate::frame::Sha1Digest;
use crate::support::config::{READ_BUFFER_LEN, STREAM_BUFFER_LEN};

/// How many buffers of [`STREAM_BUFFER_LEN`] bytes one large file may use
/// (2 MiB). With four, the stages waited on each other: a 512 MiB put took
/// 6% longer.
const STAGE_BUFFERS: usize = 8;

/// A buffer and how many of its bytes are content.
type Chunk = (Vec<u8>, usize);

/// Copies the rest of `reader` through `write`, and returns the SHA-1 of
/// everything: the `first_len` bytes already in `first` (written already),
/// then the rest.
///
/// Each chunk is read straight into its buffer: reads of at least
/// [`READ_BUFFER_LEN`] skip a connection's `BufReader`, so the bytes are
/// copied once, from the socket into the buffer.
///
/// # Errors
///
/// Whatever reading or `write` returns; the other stages then stop.
pub(crate) fn copy_and_hash(
    reader: &mut dyn Read,
    first: Vec<u8>,
    first_len: usize,
    mut write: impl FnMut(&[u8]) -> Result<()> + Send,
) -> Result<Sha1Digest> {
    // Each buffer goes round: read here, then written, then hashed, then
    // back here empty. A stage that stops drops its channels, and the
    // stages next to it see them close and stop too.
    let (to_write, writes) = mpsc::sync_channel::<Chunk>(STAGE_BUFFERS);
    let (to_hash, hashes) = mpsc::sync_channel::<Chunk>(STAGE_BUFFERS);
    let (to_fill, empties) = mpsc::channel::<Vec<u8>>();
    for _ in 1..STAGE_BUFFERS {
        // Zeroed pages cost nothing until a read fills them.
        let _ = to_fill.send(vec![0u8; STREAM_BUFFER_LEN]);
    }
    // The first chunk is written already; the queue has room for it.
    let _ = to_hash.send((first, first_len));
    let stopped = || Error::Io(io::Error::other("a stage of the copy stopped"));
    let no_thread = |err: io::Error| {
        Error::Io(io::Error::new(err.kind(), format!("no thread to copy the file with: {err}")))
    };
    thread::scope(|scope| {
        // Unnamed, the two threads show under the caller's name in `top`.
        let hasher = thread::Builder::new()
            .spawn_scoped(scope, move || {
                let mut hasher = Sha1::new();
                for (chunk, len) in hashes {
                    hasher.update(&chunk[..len]);
                    // The reader may have stopped early; then no one wants it.
                    let _ = to_fill.send(chunk);
                }
                <Sha1Digest>::from(hasher.finalize())
            })
            .map_err(no_thread)?;
        let writer = thread::Builder::new()
            .spawn_scoped(scope, move || -> Result<()> {
                for (chunk, len) in writes {
                    write(&chunk[..len])?;
                    to_hash.send((chunk, len)).map_err(|_| stopped())?;
                }
                Ok(())
            })
            .map_err(no_thread)?;
        let read: Result<()> = (|| loop {
            let mut buf = empties.recv().map_err(|_| stopped())?;
            let len = read_most(reader, &mut buf)?;
            if len == 0 {
                return Ok(());
            }
            to_write.send((buf, len)).map_err(|_| stopped())?;
        })();
        drop(to_write);
        // A failed write is why the reader stopped, if it did: report that.
        let written = writer.join().unwrap_or_else(|_| Err(stopped()));
        // The hasher only updates a digest and sends on a channel whose
        // failure it ignores: it cannot panic.
        let sha1 = hasher.join().expect("the hashing thread does not panic");
        written.and(read).map(|()| sha1)
    })
}

/// Reads into `buf` until less than [`READ_BUFFER_LEN`] of it is left or
/// the reader ends; returns the bytes read. Every read is big enough to
/// skip a `BufReader`, and a slow sender's trickle still makes big chunks.
fn read_most(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    read_until_left(reader, buf, READ_BUFFER_LEN)
}

/// Reads until `buf` is full or the reader ends; returns the bytes read.
/// Full buffers make for fewer, larger writes and hash updates.
pub(crate) fn read_full(reader: &mut dyn Read, buf: &mut [u8]) -> Result<usize> {
    read_until_left(reader, buf, 1)
}

/// Reads into `buf` until less than `left` bytes of it are left or the
/// reader ends, retrying interrupted reads; returns the bytes read.
fn read_until_left(reader: &mut dyn Read, buf: &mut [u8], left: usize) -> Result<usize> {
    let mut filled = 0;
    while buf.len() - filled >= left {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads `content` in odd-sized pieces, with an interruption first,
    /// and counts what it has handed out; fails at `fail_at` bytes if set.
    struct Trickle<'a> {
        content: &'a [u8],
        at: usize,
        interrupted: bool,
        fail_at: Option<usize>,
    }

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if !self.interrupted {
                self.interrupted = true;
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.fail_at.is_some_and(|at| self.at >= at) {
                return Err(io::Error::other("the test's reader fails"));
            }
            let n = buf.len().min(100_003).min(self.content.len() - self.at);
            buf[..n].copy_from_slice(&self.content[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    /// `buffers` stream buffers' worth of bytes, and a few more.
    fn content(buffers: usize) -> Vec<u8> {
        (0..buffers * STREAM_BUFFER_LEN + 17).map(|i| (i * 7 + i / 1000) as u8).collect()
    }

    fn trickle(content: &[u8], fail_at: Option<usize>) -> Trickle<'_> {
        Trickle { content, at: 0, interrupted: false, fail_at }
    }

    #[test]
    fn every_byte_is_written_in_order_and_hashed_with_the_first_chunk() {
        let content = content(3);
        let first = content[..1000].to_vec();
        let mut written = Vec::new();
        let mut reader = trickle(&content[1000..], None);
        let sha1 = copy_and_hash(&mut reader, first, 1000, |bytes| {
            written.extend_from_slice(bytes);
            Ok(())
        })
        .unwrap();
        assert_eq!(written, &content[1000..]);
        assert_eq!(sha1, <Sha1Digest>::from(Sha1::digest(&content)));
    }

    #[test]
    fn a_failed_write_is_the_error_and_reading_stops_soon_after() {
        let content = content(4 * STAGE_BUFFERS);
        let mut reader = trickle(&content, None);
        let mut writes = 0;
        let err = copy_and_hash(&mut reader, vec![0; 1], 1, |_| {
            writes += 1;
            if writes == 2 {
                return Err(Error::Io(io::Error::other("the test's disk is full")));
            }
            Ok(())
        })
        .unwrap_err();
        assert!(err.to_string().contains("the test's disk is full"), "{err}");
        // Not read to the end: at most the buffers' worth past the failure.
        let most = (STAGE_BUFFERS + 1) * STREAM_BUFFER_LEN;
        assert!(reader.at <= most, "read {} bytes after the failure", reader.at);
    }

    #[test]
    fn a_failed_read_is_the_error() {
        let content = content(3);
        let mut reader = trickle(&content, Some(STREAM_BUFFER_LEN));
        let err = copy_and_hash(&mut reader, vec![0; 1], 1, |_| Ok(())).unwrap_err();
        assert!(err.to_string().contains("the test's reader fails"), "{err}");
    }
}
