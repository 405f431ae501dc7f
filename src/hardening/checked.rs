//! Hardening: checked reads.
//!
//! A disk can return other bytes than were written. So every read of a
//! stored file goes through a [`FileReader`], which hashes the content as
//! it is read and fails at the end if the SHA-1 in the file's header does
//! not match; the bad file is then taken out of service (by the store: moved
//! to `ROOT/corrupt/`, dropped from the index), and anti-entropy fetches a
//! good copy from a peer.
//!
//! Hooks into the core at `Store::open_file`, which returns a
//! [`FileReader`]. Knows nothing of the store: the store hands it a
//! [`Quarantine`] to call.

use std::fs::File;
use std::io::{self, BufReader, Read, Take};

use sha1::{Digest, Sha1};

use crate::frame::Sha1Digest;
use crate::support::version::Version;

/// A live file's content, read from disk and checked against the SHA-1 in
/// its header as it goes.
///
/// The final `read` (the one that finds the end) fails with
/// `InvalidData` if the bytes did not match: a file corrupted on disk is
/// reported, never passed off as good. The reader also takes the file out
/// of service — moved to `ROOT/corrupt/`, dropped from the index — so the
/// node no longer claims the key, and anti-entropy fetches a good copy from
/// a peer.
pub struct FileReader {
    key: String,
    /// The version the header names.
    version: Version,
    /// The content length the header names, in bytes.
    size: u64,
    /// The SHA-1 the header names.
    sha1: Sha1Digest,
    /// The content: exactly `size` bytes.
    content: Take<BufReader<File>>,
    /// SHA-1 of what has been read so far.
    hasher: Sha1,
    /// Taken, and called, if the file turns out corrupt: the store's way of
    /// taking it out of service (it owns the index and `ROOT/corrupt/`).
    quarantine: Option<Quarantine>,
}

/// Takes one file out of service: given by the store.
pub(crate) type Quarantine = Box<dyn FnOnce() + Send>;

impl FileReader {
    /// A checking reader over `file`, positioned at the content.
    pub(crate) fn new(
        key: &str,
        (version, size, sha1): (Version, u64, Sha1Digest),
        file: BufReader<File>,
        quarantine: Quarantine,
    ) -> FileReader {
        let content = file.take(size);
        let (key, quarantine) = (key.to_string(), Some(quarantine));
        FileReader { key, version, size, sha1, content, hasher: Sha1::new(), quarantine }
    }

    /// The version of the content.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The content length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The content's SHA-1, as its header names it.
    pub fn sha1(&self) -> Sha1Digest {
        self.sha1
    }

    /// The unchecked content, for sending to a peer: the receiver checks
    /// the SHA-1 itself (and says so with a `Corrupt` notice if it fails),
    /// so the sender need not hash the file a second time.
    pub fn into_content(self) -> Take<BufReader<File>> {
        self.content
    }
}

impl Read for FileReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.content.read(buf)?;
        self.hasher.update(&buf[..n]);
        let at_end = n == 0 && !buf.is_empty();
        if at_end && let Some(quarantine) = self.quarantine.take() {
            let actual: Sha1Digest = self.hasher.clone().finalize().into();
            // A file shrunk since it was opened is taken out of service too.
            let (kind, what) = if self.content.limit() > 0 {
                (io::ErrorKind::UnexpectedEof, "is shorter than its header says")
            } else if actual != self.sha1 {
                (io::ErrorKind::InvalidData, "is corrupt: its SHA-1 does not match")
            } else {
                return Ok(n);
            };
            quarantine();
            return Err(io::Error::new(kind, format!("the file for {:?} {what}", self.key)));
        }
        Ok(n)
    }
}
