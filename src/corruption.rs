//! Hardening: corruption checks.
//!
//! A disk can return other bytes than were written. So every read of a
//! stored file goes through [`FileReader`], which hashes the content as it
//! is read and fails at the end if the SHA-1 in the file's header does not
//! match; the bad file is then taken out of service ([`Quarantine`]: moved
//! to `ROOT/corrupt/`, dropped from the index), and anti-entropy fetches a
//! good copy from a peer.
//!
//! Every stream between nodes is checked too, against the SHA-1 its
//! metadata announced. When the bytes we received do not match, we tell the
//! sender with a `Corrupt` frame, since its own copy may be damaged; a node
//! told so re-reads its copy here ([`on_corrupt`]).
//!
//! Hooks into the core at `Store::open_file`, which returns a
//! [`FileReader`], and where the handler passes `Corrupt` frames here.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Take};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use log::{info, warn};
use sha1::{Digest, Sha1};

use crate::error::lock;
use crate::frame::Sha1Digest;
use crate::server::Node;
use crate::store::{Entry, Index};
use crate::transport::Transport;
use crate::version::Version;

/// How many of our files may be re-checked at once (each check is a thread
/// reading a whole file).
const MAX_CHECKS: usize = 4;

/// The keys being checked now. Leaf lock.
#[derive(Default)]
pub(crate) struct Checks {
    keys: Mutex<HashSet<String>>,
}

/// A peer says the bytes we sent for `key` failed their SHA-1. Check our
/// copy on a thread of its own, one check per key at a time, however many
/// reports arrive.
pub(crate) fn on_corrupt(node: &Arc<Node>, peer: &Transport, key: String, version: Version) {
    let ours = node.store.entry(&key).map(|entry| entry.version);
    let mut checking = lock(&node.checks.keys);
    // Not the copy we hold, already being checked, or enough checks running:
    // a flood of reports must not become a flood of threads.
    if ours != Some(version) || checking.len() >= MAX_CHECKS || !checking.insert(key.clone()) {
        return;
    }
    drop(checking); // a leaf lock: released before logging and spawning
    warn!(target: node.name(), "Checking our copy of key={key} version={version}: peer={} found it corrupt", peer.name());
    let checker = Arc::clone(node);
    node.threads.spawn(format!("{} check", node.name()), move || {
        let checked = checker.store.open_file(&key).and_then(|file| match file {
            Some(mut file) => Ok(std::io::copy(&mut file, &mut std::io::sink())?),
            None => Ok(0),
        });
        match checked {
            Ok(_) => info!(target: checker.name(), "Our copy of key={key} is sound"),
            Err(err) => warn!(target: checker.name(), "Our copy of key={key} is bad and was set aside: {err}"),
        }
        lock(&checker.checks.keys).remove(&key);
    });
}

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
    /// The key.
    key: String,
    /// What the header says.
    entry: Entry,
    /// The content: exactly `entry.size` bytes.
    content: Take<BufReader<File>>,
    /// SHA-1 of what has been read so far.
    hasher: Sha1,
    /// Set once the hash was checked at the end.
    checked: bool,
    /// How to take the file out of service if it turns out corrupt.
    quarantine: Quarantine,
}

/// What a [`FileReader`] needs to take a corrupt file out of service.
pub(crate) struct Quarantine {
    /// The node's name, for the log.
    pub name: String,
    /// The store's index.
    pub index: Arc<Mutex<Index>>,
    /// The key file.
    pub path: PathBuf,
    /// `ROOT/corrupt`, where corrupt files are kept for a person to look at.
    pub dir: PathBuf,
}

impl Quarantine {
    /// Moves the file for `key` aside and forgets it, if the store still
    /// holds the very version that was found corrupt (a newer, good version
    /// may have been committed since the reader opened the file).
    pub fn apply(&self, key: &str, version: Version) {
        let mut index = lock(&self.index);
        if index.entries.get(key).is_none_or(|entry| entry.version != version) {
            return;
        }
        let _ = fs::create_dir_all(&self.dir);
        let name = self.path.file_name().unwrap_or_default();
        let aside = self.dir.join(format!("{}-{version}", name.to_string_lossy()));
        if fs::rename(&self.path, &aside).is_ok() {
            index.entries.remove(key);
            warn!(
                target: &self.name,
                "Moved the corrupt file of key {key:?} to {}",
                aside.display()
            );
        }
    }
}

impl FileReader {
    /// A checking reader over `file`, positioned at the content.
    pub(crate) fn new(
        key: &str,
        entry: Entry,
        file: BufReader<File>,
        quarantine: Quarantine,
    ) -> FileReader {
        let content = file.take(entry.size);
        let key = key.to_string();
        FileReader { key, entry, content, hasher: Sha1::new(), checked: false, quarantine }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// What the file's header says: version, size, SHA-1.
    pub fn entry(&self) -> &Entry {
        &self.entry
    }

    /// The content length in bytes.
    pub fn size(&self) -> u64 {
        self.entry.size
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
        if at_end && !self.checked {
            self.checked = true;
            let actual: Sha1Digest = self.hasher.clone().finalize().into();
            if self.content.limit() > 0 {
                // Shrunk since it was opened: out of service, as if corrupt.
                self.quarantine.apply(&self.key, self.entry.version);
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("the file for {:?} is shorter than its header says", self.key),
                ));
            }
            if actual != self.entry.sha1 {
                self.quarantine.apply(&self.key, self.entry.version);
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the file for {:?} is corrupt: its SHA-1 does not match", self.key),
                ));
            }
        }
        Ok(n)
    }
}
