//! The local disk store: one file per key, changed only by atomic renames.
//!
//! This module knows nothing of the network. It keeps what this node holds
//! for every key — a live file or a tombstone, at some [`Version`] — and it
//! moves a key forward to a newer version atomically.
//!
//! # Layout of the root directory
//!
//! ```text
//! ROOT/format                  the root's format, "3" (see `recovery`)
//! ROOT/node-id                 this node's id, 16 hex digits, made on first start
//! ROOT/cleared                 the clear watermark, as `Version` displays it
//!                              (absent: never cleared)
//! ROOT/tmp/                    files being written; swept on every start
//! ROOT/objects/abcd...         one file per key, named by the SHA-1 of the key
//! ROOT/corrupt/                key files found corrupt, kept for a person to see
//! ```
//!
//! Naming files by the key's SHA-1 means any key, `../` or NUL included,
//! becomes a safe name. They all live in one directory: a commit's rename
//! is durable only once its directory is synced, and a batch of files in
//! one directory needs one directory sync, where git's fan-out over 256
//! directories would need about one per file. (Disks index large
//! directories: ext4, XFS and btrfs look a name up in a hashed tree.)
//!
//! # Format of a key's file
//!
//! A header, then the content:
//!
//! 1. magic: 4 bytes, `GFSO`
//! 2. format: `u8`, 2 (1 was written with Lamport versions, before hybrid
//!    logical clocks; such a file is refused, never misread)
//! 3. flags: `u8`, bit 0 set for a tombstone (a deleted key; no content)
//! 4. version: `u64` hybrid logical time, `u64` node id
//! 5. size: `u64`, the content's length in bytes
//! 6. sha1: 20 bytes, SHA-1 of the content
//! 7. key: `u16` length, then the key's UTF-8 bytes
//! 8. content: `size` bytes
//!
//! All integers are big-endian. The header's SHA-1 lets a reader detect a
//! file corrupted on disk ([`FileReader`] checks it as the bytes go by).
//!
//! # How a change is committed
//!
//! New content is streamed into a [`TempFile`] under `ROOT/tmp`, hashed as
//! it goes, with a fixed-size buffer: memory use does not grow with file
//! size. [`Store::commit`] then writes the header, fsyncs the file (unless
//! durability is off), and — under the index lock — checks that the change
//! is newer than what the store holds and renames the file into place. A
//! rename is atomic, so a reader sees the old file or the new one, never a
//! mix; a crash leaves at most a temp file, swept at the next start. A
//! [`TempFile`] dropped without being committed deletes itself, so a broken
//! stream leaves nothing behind.
//!
//! # Group commit
//!
//! Syncing is what a commit waits for: two fsyncs per file (the file, then
//! its directory), one file at a time, keep a disk far below its speed.
//! Files that arrive together therefore commit together:
//! [`Store::commit_later`] queues a written temp file, and the store's
//! committer thread ([`Store::run_batches`], with the queue in `batch`)
//! takes everything queued, up to 128 files or 8 MiB. [`Store::commit_batch`]
//! syncs the files together, renames them into place one by one, syncs
//! `objects/` once, and only then tells each file's caller. A lone file waits
//! for no company: a batch closes as soon as nothing more is queued. The
//! guarantees are those of a single commit: nothing is reported committed
//! before it is durable, a crash leaves each file whole or absent, and a
//! reader sees the old file or the new one. (As with a single commit, a
//! directory sync that fails after the renames is logged, not undone: the
//! files are in place, only less sure to survive a power cut.)
//!
//! The index lock is a leaf: it is held for the version check, the rename
//! and the map update of a commit, for a clear's watermark and unlinks, and
//! for setting a corrupt file aside — disk steps that must be atomic with
//! the index — but never while streaming, and never while taking another
//! lock.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufReader, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::thread;

use byteorder::{BigEndian, ReadBytesExt, WriteBytesExt};
use log::{debug, warn};
use sha1::{Digest, Sha1};

use crate::error::{Error, Result, lock};
use crate::frame::{DigestEntry, MAX_KEY_LEN, Sha1Digest, check_key};
use crate::gossip;
use crate::hardening::checked::{FileReader, Quarantine};
use crate::hardening::hashing::{self, read_full};
use crate::hardening::recovery::{self, write_atomically};
use crate::support::config::STREAM_BUFFER_LEN;
use crate::support::version::{NodeId, Version};

mod batch;
use batch::Queue;

/// The first bytes of every key file.
const FILE_MAGIC: [u8; 4] = *b"GFSO";

/// The version of the key file format.
const FILE_FORMAT: u8 = 2;

/// Flag bit: this key file is a tombstone.
const FLAG_TOMBSTONE: u8 = 1;

/// Header bytes before the key: magic, format, flags, version, size, sha1,
/// key length.
const HEADER_FIXED_LEN: u64 = 4 + 1 + 1 + 16 + 8 + 20 + 2;

/// The first buffer for content of unknown size: most files are small, and
/// zeroing a full stream buffer for each of them costs more than the write.
const SMALL_BUFFER_LEN: usize = 16 * 1024;

/// How many threads sync one batch's files. The disk's journal folds
/// concurrent syncs into one commit, so a few in parallel finish a batch in
/// about the time of one.
const SYNC_THREADS: usize = 16;

/// Bytes of a large file written between background syncs while it is
/// written (with durability on): the disk writes the file while it still
/// arrives, and the commit's own sync has only the tail left to wait for.
const WRITE_BEHIND_BYTES: u64 = 32 << 20;

/// How many of a batch's keys its log line names; it counts the rest.
const BATCH_KEYS_SHOWN: usize = 8;

/// What the store holds for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The version of the change that produced this state.
    pub version: Version,
    /// Content length in bytes (0 for a tombstone).
    pub size: u64,
    /// SHA-1 of the content.
    pub sha1: Sha1Digest,
    /// True if the key was deleted: a tombstone holds no content, only the
    /// version of the delete, so an older store arriving late loses to it.
    pub tombstone: bool,
}

/// The in-memory index, rebuilt from the headers on every start.
#[derive(Default)]
pub(crate) struct Index {
    /// Every key the store holds a file or a tombstone for, sorted.
    pub entries: BTreeMap<String, Entry>,
    /// The newest clear applied: nothing older than it exists any more.
    pub cleared: Version,
}

impl Index {
    /// Whether `version` wins against what the index holds for `key`.
    fn wins(&self, key: &str, version: Version) -> bool {
        gossip::wins(version, self.entries.get(key).map(|e| e.version), self.cleared)
    }

    /// Takes every entry that is `doomed` out of the index; returns their keys.
    fn forget(&mut self, doomed: impl Fn(&Entry) -> bool) -> Vec<String> {
        let doomed = self.entries.iter().filter(|(_, entry)| doomed(entry));
        let keys: Vec<String> = doomed.map(|(key, _)| key.clone()).collect();
        for key in &keys {
            self.entries.remove(key);
        }
        keys
    }
}

/// The local disk store of one node. Shared between threads behind an `Arc`.
pub struct Store {
    /// The node's name, which starts every log line.
    pub(crate) name: String,
    /// The root directory.
    pub(crate) root: PathBuf,
    /// Whether commits are fsynced (file and directory).
    fsync: bool,
    /// This node's id, read from (or first written to) `ROOT/node-id`.
    pub(crate) node: NodeId,
    /// What the store holds. A leaf lock: see the module doc. Shared with
    /// the [`FileReader`]s, which take a file they find corrupt out of it.
    pub(crate) index: Arc<Mutex<Index>>,
    /// Numbers temp files so concurrent writers never collide.
    temp_counter: AtomicU64,
    /// Files written and waiting for the committer thread.
    queue: Mutex<Queue>,
    /// Notified when a file is queued or the queue stops.
    queued: Condvar,
    /// Notified when the committer takes files off the queue.
    room: Condvar,
    /// Syncs done (of files and of directories), for the stats.
    syncs: AtomicU64,
    /// Batches committed (a file committed alone is a batch of one).
    batches: AtomicU64,
    /// `ROOT/lock`, held exclusively while the store is open, so that two
    /// nodes never share a root (see `recovery::lock_root`).
    _root_lock: File,
}

impl Store {
    /// Opens the store in `root`, creating it if needed.
    ///
    /// Reads or creates the node id, then rebuilds the index from the key
    /// files' headers after cleaning up what a crash left (see `recovery`).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the directories cannot be made or read, or the node
    /// id file exists but is not a node id.
    pub fn open(name: &str, root: &Path, fsync: bool) -> Result<Store> {
        fs::create_dir_all(root.join("objects"))?;
        fs::create_dir_all(root.join("tmp"))?;
        let root_lock = recovery::lock_root(root)?;
        recovery::check_format(root)?;
        let store = Store {
            name: name.to_string(),
            root: root.to_path_buf(),
            fsync,
            node: load_node_id(root)?,
            index: Arc::new(Mutex::new(Index::default())),
            temp_counter: AtomicU64::new(0),
            queue: Mutex::new(Queue::default()),
            queued: Condvar::new(),
            room: Condvar::new(),
            syncs: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            _root_lock: root_lock,
        };
        // What a crash may have left (temp files, damaged files, a clear cut
        // short) is dealt with before the index is believed.
        let index = store.rebuild_index(load_cleared(root)?)?;
        *lock(&store.index) = index;
        Ok(store)
    }

    /// Sweeps the temp files and rebuilds the index from the key files'
    /// headers, given the clear watermark `cleared`. A key file that is
    /// damaged, or holds a key that belongs elsewhere, is set aside.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the root's directories cannot be read.
    fn rebuild_index(&self, cleared: Version) -> Result<Index> {
        recovery::sweep_temp_files(&self.name, &self.root)?;
        let mut index = Index { cleared, ..Index::default() };
        for path in recovery::key_files(&self.root)? {
            let why = match read_header_at(&path) {
                // A clear was cut short after it wrote the watermark: finish it.
                Ok((_, entry)) if entry.version < cleared => {
                    if let Err(err) = fs::remove_file(&path) {
                        warn!(target: &self.name, "Cannot remove cleared file {}: {err}", path.display());
                    }
                    continue;
                }
                Ok((key, entry)) if self.path_for(&key) == path => {
                    index.entries.insert(key, entry);
                    continue;
                }
                Ok((key, _)) => format!("it holds key {key:?}, which belongs elsewhere"),
                Err(err) => err.to_string(),
            };
            // A damaged file must not linger where `open_file` would find it.
            recovery::set_aside(&self.name, &self.root, &path, "damaged", &why);
        }
        Ok(index)
    }

    /// The highest version time the store holds (files, tombstones and
    /// the clear watermark): a restarted node's clock starts here, so it
    /// never gives out a version below one it held before, even if its wall
    /// clock went back while it was down.
    pub fn max_time(&self) -> u64 {
        let index = lock(&self.index);
        let entries = index.entries.values().map(|e| e.version.time);
        entries.fold(index.cleared.time, u64::max)
    }

    /// What the store holds for `key`, live or tombstone.
    pub fn entry(&self, key: &str) -> Option<Entry> {
        lock(&self.index).entries.get(key).cloned()
    }

    /// The clear watermark.
    pub fn cleared(&self) -> Version {
        lock(&self.index).cleared
    }

    /// The clear watermark and everything the store holds, tombstones
    /// included, sorted by key: what anti-entropy compares between nodes.
    pub fn digest(&self) -> (Version, Vec<DigestEntry>) {
        let index = lock(&self.index);
        let entries = index.entries.iter().map(|(key, entry)| DigestEntry {
            key: key.clone(),
            version: entry.version,
            tombstone: entry.tombstone,
        });
        (index.cleared, entries.collect())
    }

    /// Removes every tombstone older than `before` (their grace period is
    /// over: see `tombstones`); returns how many.
    pub fn expire_tombstones(&self, before: Version) -> usize {
        // The index is unlocked again before the files go, one per lock hold.
        let expired = lock(&self.index).forget(|entry| entry.tombstone && entry.version < before);
        self.remove_files_of(&expired, "expired tombstone");
        expired.len()
    }

    /// Every live file (no tombstones), sorted by key.
    pub fn live(&self) -> Vec<(String, Entry)> {
        let index = lock(&self.index);
        let live = index.entries.iter().filter(|(_, e)| !e.tombstone);
        live.map(|(k, e)| (k.clone(), e.clone())).collect()
    }

    /// Streams `reader` to the end into a new temp file for `key`.
    ///
    /// # Errors
    ///
    /// [`Error::BadKey`] for a bad key; [`Error::Io`] if reading or writing
    /// fails. The temp file is removed on any error.
    pub fn write_temp(&self, key: &str, reader: &mut dyn Read) -> Result<TempFile> {
        let mut temp = self.create_temp(key, false)?;
        temp.fill(reader, None)?;
        Ok(temp)
    }

    /// Streams exactly `size` bytes of `reader` into a new temp file for
    /// `key` and checks them against `sha1`.
    ///
    /// This is the receiving end of a [`crate::frame::Frame::Store`] or
    /// [`crate::frame::Frame::File`]: it consumes exactly the announced
    /// bytes, so on success the reader is at the next frame.
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] if the stream ends early, [`Error::Corrupt`] if
    /// its bytes do not match `sha1`; [`Error::Io`] for a failed read or write. The temp file is
    /// removed on any error.
    pub fn receive_temp(
        &self,
        key: &str,
        reader: &mut dyn Read,
        size: u64,
        sha1: &Sha1Digest,
    ) -> Result<TempFile> {
        let mut temp = self.create_temp(key, false)?;
        temp.fill(&mut reader.take(size), Some(size))?;
        if temp.size != size {
            return Err(Error::Protocol(format!(
                "the stream of {key:?} ended after {} of {size} bytes",
                temp.size
            )));
        }
        if temp.sha1 != *sha1 {
            return Err(Error::Corrupt(format!(
                "the {size} bytes received for {key:?} do not match their SHA-1"
            )));
        }
        Ok(temp)
    }

    /// Commits `temp` at `version`, if that is newer than what the store
    /// holds for the key and newer than the last clear: a batch of one,
    /// on the caller's thread.
    ///
    /// Returns `Ok(true)` if committed, `Ok(false)` if the store already
    /// held something newer (the temp file is then removed).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the header, the fsync or the rename fails. The store
    /// is then unchanged.
    pub fn commit(&self, temp: TempFile, version: Version) -> Result<bool> {
        let mut results = self.commit_batch(vec![(temp, version)]);
        results.pop().expect("a batch has one result per file")
    }

    /// Syncs done so far, of files and directories, and batches committed.
    pub fn syncs_and_batches(&self) -> (u64, u64) {
        (self.syncs.load(Ordering::Relaxed), self.batches.load(Ordering::Relaxed))
    }

    /// Commits `files` together and returns each one's outcome, in order:
    /// headers written, then every file synced, then each renamed into place
    /// (under the index lock, checked against what is held), and last
    /// `objects/` synced once. Only then is any of them reported committed.
    /// A file that fails or is stale fails alone.
    fn commit_batch(&self, files: Vec<(TempFile, Version)>) -> Vec<Result<bool>> {
        let mut written = Vec::new();
        // A written file's `Ok(false)` stands until its rename below.
        let mut results: Vec<Result<bool>> = (files.into_iter().enumerate())
            .map(|(at, (mut temp, version))| {
                // Cheap early out before the sync: a stale change changes nothing.
                if self.is_newer(&temp.key, version) {
                    let entry = temp.finish(version)?;
                    written.push((at, temp, entry));
                }
                Ok(false)
            })
            .collect();
        if self.fsync {
            let mut synced =
                self.sync_each(&written, |(_, temp, _)| temp.file.sync_all()).into_iter();
            // A file that could not be synced fails alone, and is removed.
            written.retain(|(at, _, _)| match synced.next() {
                Some(Err(err)) => {
                    results[*at] = Err(err.into());
                    false
                }
                _ => true,
            });
        }

        let mut index = lock(&self.index);
        let mut committed = Vec::new();
        for (at, mut temp, entry) in written {
            results[at] = self.rename_locked(&mut index, &mut temp, entry);
            if matches!(results[at], Ok(true)) {
                committed.push(std::mem::take(&mut temp.key));
            }
        }
        // Unlock before the directory syncs: the renames are visible, and
        // other commits need not wait for our disk.
        drop(index);

        // The files are committed and visible from here on: a failed
        // directory fsync only weakens their durability, so it is reported
        // without undoing them.
        if self.fsync && !committed.is_empty() {
            let objects = self.root.join("objects");
            self.syncs.fetch_add(1, Ordering::Relaxed);
            if let Err(err) = File::open(&objects).and_then(|dir| dir.sync_all()) {
                warn!(target: &self.name, "Committed files in {} but could not fsync it: {err}", objects.display());
            }
        }
        if !committed.is_empty() {
            self.batches.fetch_add(1, Ordering::Relaxed);
            let (files, synced) = (committed.len(), if self.fsync { "yes" } else { "no" });
            let keys = committed[..files.min(BATCH_KEYS_SHOWN)].join(",");
            let more = files.saturating_sub(BATCH_KEYS_SHOWN);
            let keys = if more > 0 { format!("{keys},+{more}") } else { keys };
            debug!(target: &self.name, "Commit batch files={files} synced={synced} keys={keys}");
        }
        results
    }

    /// Calls `sync` on each of `items`, on up to [`SYNC_THREADS`] threads
    /// at once (the disk's journal folds concurrent syncs into one commit),
    /// and counts the syncs. Returns each one's outcome, in order.
    fn sync_each<T: Sync>(
        &self,
        items: &[T],
        sync: impl Fn(&T) -> io::Result<()> + Sync,
    ) -> Vec<io::Result<()>> {
        self.syncs.fetch_add(items.len() as u64, Ordering::Relaxed);
        if items.len() <= 1 {
            return items.iter().map(sync).collect();
        }
        let sync_all = |chunk: &[T]| chunk.iter().map(&sync).collect::<Vec<_>>();
        thread::scope(|scope| {
            let chunks = items.chunks(items.len().div_ceil(SYNC_THREADS));
            let spawn = |chunk| thread::Builder::new().spawn_scoped(scope, move || sync_all(chunk));
            let workers: Vec<_> = chunks.map(|chunk| (chunk, spawn(chunk))).collect();
            let panicked = || Err(io::Error::other("a sync thread panicked"));
            let joined = workers.into_iter().flat_map(|(chunk, worker)| match worker {
                Ok(worker) => {
                    worker.join().unwrap_or_else(|_| chunk.iter().map(|_| panicked()).collect())
                }
                // No thread to be had: this one syncs the chunk itself.
                Err(_) => sync_all(chunk),
            });
            joined.collect()
        })
    }

    /// Renames a written (and, if durability is on, synced) temp file into
    /// place if `version` still wins, and records it in the index, which
    /// the caller holds locked. The batch syncs `objects/` afterwards.
    fn rename_locked(&self, index: &mut Index, temp: &mut TempFile, entry: Entry) -> Result<bool> {
        // Check again under the lock: another thread may have committed a
        // newer version of this key since the early check.
        if !index.wins(&temp.key, entry.version) {
            return Ok(false);
        }
        fs::rename(&temp.path, self.path_for(&temp.key))?;
        temp.committed = true;
        index.entries.insert(temp.key.clone(), entry);
        Ok(true)
    }

    /// Deletes `key` at `version`: replaces whatever is held with a
    /// tombstone, if `version` is newer. Returns whether it did.
    ///
    /// # Errors
    ///
    /// As [`Store::commit`].
    pub fn delete(&self, key: &str, version: Version) -> Result<bool> {
        if !self.is_newer(key, version) {
            return Ok(false);
        }
        let temp = self.create_temp(key, true)?;
        self.commit(temp, version)
    }

    /// Applies a clear at `version`: deletes every key whose version is older
    /// (files and tombstones alike) and records `version` as the watermark,
    /// so older changes arriving later are refused. Returns false if the
    /// store had already applied this clear or a newer one.
    ///
    /// Keys changed after the clear (newer versions) are kept.
    ///
    /// The watermark is written first and the keys leave the index before
    /// their files are removed, so a clear cut short by a crash or a disk
    /// error is finished by the next start, which removes every file older
    /// than the watermark. The index lock is held throughout, unlinks
    /// included: released earlier, a newer version of a doomed key could be
    /// committed and then removed by us.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the watermark cannot be written (nothing changes
    /// then). A file that cannot be removed is logged and left for the next
    /// start.
    pub fn clear(&self, version: Version) -> Result<bool> {
        let mut index = lock(&self.index);
        if version <= index.cleared {
            return Ok(false);
        }
        write_atomically(&self.root, "cleared", version.to_string().as_bytes(), self.fsync)?;
        index.cleared = version;
        let doomed = index.forget(|entry| entry.version < version);
        // The files go one at a time, each under the lock only for its own
        // unlink, so a large clear does not stall every other commit.
        drop(index);
        self.remove_files_of(&doomed, "cleared");
        Ok(true)
    }

    /// Unlinks the files of `keys`, which the index no longer lists. Each is
    /// checked again under the index lock: a newer version committed since
    /// (a commit renames under that lock) must not be removed. `why` is for
    /// the log; a file that cannot be removed is left to the next start.
    pub(crate) fn remove_files_of(&self, keys: &[String], why: &str) {
        for key in keys {
            let index = lock(&self.index);
            if index.entries.contains_key(key) {
                continue;
            }
            if let Err(err) = found(fs::remove_file(self.path_for(key))) {
                warn!(target: &self.name, "Cannot remove {why} key {key:?}: {err}");
            }
            drop(index); // one unlink per hold
        }
    }

    /// Opens the live file held for `key`, or `None` if the store holds
    /// nothing or a tombstone.
    ///
    /// The reader reads the file as it was when opened, even if a newer
    /// version is renamed over it meanwhile.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the file cannot be opened, [`Error::Corrupt`] if its
    /// header is damaged.
    pub fn open_file(&self, key: &str) -> Result<Option<FileReader>> {
        // Only what the index holds is served: a file on disk that the index
        // does not know (set aside, or cleared) is not part of the store.
        if self.entry(key).is_none_or(|entry| entry.tombstone) {
            return Ok(None);
        }
        let Some(file) = found(File::open(self.path_for(key)))? else { return Ok(None) };
        let mut file = BufReader::with_capacity(STREAM_BUFFER_LEN, file);
        let (stored_key, entry) = read_header(&mut file)?;
        if stored_key != key {
            return Err(Error::Corrupt(format!("the file for {key:?} holds {stored_key:?}")));
        }
        if entry.tombstone {
            return Ok(None);
        }
        let quarantine = self.quarantine(key, entry.version);
        // A file shorter (or longer) than its header says cannot be sent:
        // a peer would wait for bytes that never come. One `fstat` finds it
        // before anything is sent; the file is set aside like a corrupt one.
        let expected = HEADER_FIXED_LEN + key.len() as u64 + entry.size;
        let actual = file.get_ref().metadata()?.len();
        if actual != expected {
            warn!(target: &self.name, "The file for {key:?} is {actual} bytes, its header says {expected}");
            quarantine();
            return Ok(None);
        }
        let header = (entry.version, entry.size, entry.sha1);
        Ok(Some(FileReader::new(key, header, file, quarantine)))
    }

    /// How a reader of `key` at `version` takes the file out of service if
    /// it finds it corrupt: moved to `ROOT/corrupt/` and forgotten, if the
    /// store still holds that very version (a newer, good one may have been
    /// committed since the reader opened the file).
    fn quarantine(&self, key: &str, version: Version) -> Quarantine {
        let (name, index, key) = (self.name.clone(), Arc::clone(&self.index), key.to_string());
        let (path, dir) = (self.path_for(&key), self.root.join("corrupt"));
        Box::new(move || {
            let mut index = lock(&index);
            if index.entries.get(&key).is_none_or(|entry| entry.version != version) {
                return;
            }
            let _ = fs::create_dir_all(&dir);
            let file = path.file_name().unwrap_or_default().to_string_lossy();
            let aside = dir.join(format!("{file}-{version}"));
            if fs::rename(&path, &aside).is_ok() {
                index.entries.remove(&key);
                warn!(target: &name, "Moved the corrupt file of key {key:?} to {}", aside.display());
            }
        })
    }

    /// Whether `version` would win against what the store holds for `key`.
    fn is_newer(&self, key: &str, version: Version) -> bool {
        lock(&self.index).wins(key, version)
    }

    /// Where the file for `key` lives: `objects/abcd...`, the SHA-1 of the
    /// key in hex.
    pub(crate) fn path_for(&self, key: &str) -> PathBuf {
        let hex: String = Sha1::digest(key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
        self.root.join("objects").join(hex)
    }

    /// A new temp file for `key` with room for its header.
    fn create_temp(&self, key: &str, tombstone: bool) -> Result<TempFile> {
        check_key(key)?;
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let path = self.root.join("tmp").join(format!("{}-{n}.tmp", std::process::id()));
        let file = File::create_new(&path)?;
        Ok(TempFile {
            path,
            file,
            key: key.to_string(),
            tombstone,
            write_behind: self.fsync,
            size: 0,
            sha1: Sha1::digest([]).into(), // of no bytes
            committed: false,
        })
    }
}

/// `Ok(None)` if `result` failed only because the file is not there.
fn found<T>(result: io::Result<T>) -> io::Result<Option<T>> {
    match result {
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
        result => result.map(Some),
    }
}

/// An [`Error::Io`] for a root file that holds something it should not.
fn damaged_root_file(path: &Path, what: &str, text: &str) -> Error {
    let why = format!("{} {what}: {text:?}", path.display());
    Error::Io(io::Error::new(io::ErrorKind::InvalidData, why))
}

/// Reads `ROOT/cleared`, the clear watermark: `Version::ZERO` if there is none.
fn load_cleared(root: &Path) -> Result<Version> {
    let path = root.join("cleared");
    let Some(text) = found(fs::read_to_string(&path))? else { return Ok(Version::ZERO) };
    text.trim().parse().map_err(|()| damaged_root_file(&path, "is damaged", &text))
}

/// Reads `ROOT/node-id`, or makes a random id and writes it there.
fn load_node_id(root: &Path) -> Result<NodeId> {
    let path = root.join("node-id");
    if let Some(text) = found(fs::read_to_string(&path))? {
        let id = u64::from_str_radix(text.trim(), 16);
        return id.map_err(|_| damaged_root_file(&path, "does not hold a node id", &text));
    }
    // Zero is reserved for "no node" (clients, Version::ZERO).
    let id = u64::from_be_bytes(crate::random_bytes()?).max(1);
    write_atomically(root, "node-id", format!("{id:016x}\n").as_bytes(), true)?;
    Ok(id)
}

/// Reads the header of the key file at `path` and checks the file's length
/// against it.
pub(crate) fn read_header_at(path: &Path) -> Result<(String, Entry)> {
    let mut file = BufReader::new(File::open(path)?);
    let (key, entry) = read_header(&mut file)?;
    let expected = HEADER_FIXED_LEN + key.len() as u64 + entry.size;
    let actual = file.get_ref().metadata()?.len();
    if actual != expected {
        return Err(Error::Corrupt(format!(
            "the file is {actual} bytes long but its header says {expected}"
        )));
    }
    Ok((key, entry))
}

/// Reads a key file header (see the module doc for the layout).
fn read_header(reader: &mut impl Read) -> Result<(String, Entry)> {
    let damaged = |what: &str| Error::Corrupt(format!("damaged key file header: {what}"));
    let mut magic = [0u8; 4];
    reader.read_exact(&mut magic)?;
    if magic != FILE_MAGIC {
        return Err(damaged("bad magic"));
    }
    let format = reader.read_u8()?;
    if format != FILE_FORMAT {
        return Err(damaged(&format!("format {format}, where this gossipfs reads {FILE_FORMAT}")));
    }
    let flags = reader.read_u8()?;
    let version =
        Version { time: reader.read_u64::<BigEndian>()?, node: reader.read_u64::<BigEndian>()? };
    let size = reader.read_u64::<BigEndian>()?;
    let mut sha1 = [0u8; 20];
    reader.read_exact(&mut sha1)?;
    let key_len = usize::from(reader.read_u16::<BigEndian>()?);
    if key_len == 0 || key_len > MAX_KEY_LEN {
        return Err(damaged("bad key length"));
    }
    let mut key = vec![0u8; key_len];
    reader.read_exact(&mut key)?;
    let key = String::from_utf8(key).map_err(|_| damaged("key is not UTF-8"))?;
    let tombstone = flags & FLAG_TOMBSTONE != 0;
    Ok((key, Entry { version, size, sha1, tombstone }))
}

/// A file being written under `ROOT/tmp`, not yet part of the store.
///
/// Dropping it without committing removes it: that is how a cut stream, a
/// bad SHA-1 or a stale version leaves nothing behind.
pub struct TempFile {
    /// Where it is.
    path: PathBuf,
    /// The open file, positioned after what has been written.
    file: File,
    /// The key it will become.
    key: String,
    /// Whether it will become a tombstone (then it has no content).
    tombstone: bool,
    /// Whether a large file is synced while it is written (durability on).
    write_behind: bool,
    /// Content bytes written so far.
    size: u64,
    /// SHA-1 of the content, once `fill` has run.
    sha1: Sha1Digest,
    /// Set once renamed into place, so `Drop` leaves it alone.
    committed: bool,
}

impl TempFile {
    /// The content's length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Streams `reader` to its end into the file, hashing as it goes, with
    /// fixed buffers. `size_hint` (the announced size, if known) keeps a
    /// small file from paying for a large buffer.
    ///
    /// SHA-1 runs at about the speed of the disk and the socket together, so
    /// once a file proves larger than one buffer, reading, writing and
    /// hashing become three threads (`hashing::copy_and_hash`), with a few
    /// buffers going round, so memory stays fixed whatever the file size.
    fn fill(&mut self, reader: &mut dyn Read, size_hint: Option<u64>) -> Result<()> {
        // At most STREAM_BUFFER_LEN, so the cast cannot truncate.
        let first_len = size_hint
            .map_or(SMALL_BUFFER_LEN as u64, |size| size.clamp(1, STREAM_BUFFER_LEN as u64));
        let mut buf = vec![0u8; first_len as usize];
        let n = read_full(reader, &mut buf)?;
        self.append(&buf[..n])?;
        // It all fit in one buffer (it ended early, or it is exactly the
        // announced size): hash it here, no thread needed.
        if n < buf.len() || size_hint == Some(n as u64) {
            self.sha1 = Sha1::digest(&buf[..n]).into();
            return Ok(());
        }
        buf.resize(STREAM_BUFFER_LEN, 0);
        // With durability on, a syncer thread flushes what is written so far
        // every WRITE_BEHIND_BYTES, at most one sync at a time; the writer
        // never waits for it, but the file is done only once its last sync
        // is. With no syncer (durability off, or no thread to be had), the
        // signals go unheard and the commit's sync does it all.
        let behind = self.write_behind.then(|| self.file.try_clone()).transpose()?;
        self.sha1 = thread::scope(|scope| {
            let (due_tx, due_rx) = mpsc::sync_channel::<()>(1);
            if let Some(behind) = behind {
                let syncer = move || due_rx.iter().for_each(|()| drop(behind.sync_data()));
                let _ = thread::Builder::new().spawn_scoped(scope, syncer);
            }
            let mut next_sync = WRITE_BEHIND_BYTES;
            hashing::copy_and_hash(reader, buf, n, |bytes| {
                self.append(bytes)?;
                if self.size >= next_sync {
                    next_sync += WRITE_BEHIND_BYTES;
                    let _ = due_tx.try_send(());
                }
                Ok(())
            })
        })?;
        Ok(())
    }

    /// Writes `bytes` after the content written so far. Positioned writes
    /// leave room for the header, which `finish` writes at offset 0 once the
    /// size, hash and version are known.
    fn append(&mut self, bytes: &[u8]) -> Result<()> {
        self.file.write_all_at(bytes, HEADER_FIXED_LEN + self.key.len() as u64 + self.size)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Writes the header at the start of the file.
    fn finish(&mut self, version: Version) -> Result<Entry> {
        let entry = Entry { version, size: self.size, sha1: self.sha1, tombstone: self.tombstone };
        let mut header = Vec::with_capacity(HEADER_FIXED_LEN as usize + self.key.len());
        header.extend_from_slice(&FILE_MAGIC);
        header.write_u8(FILE_FORMAT)?;
        header.write_u8(if entry.tombstone { FLAG_TOMBSTONE } else { 0 })?;
        header.write_u64::<BigEndian>(version.time)?;
        header.write_u64::<BigEndian>(version.node)?;
        header.write_u64::<BigEndian>(entry.size)?;
        header.extend_from_slice(&entry.sha1);
        header.write_u16::<BigEndian>(self.key.len() as u16)?;
        header.extend_from_slice(self.key.as_bytes());
        self.file.write_all_at(&header, 0)?;
        Ok(entry)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.committed {
            // Best effort: if this fails, the next start sweeps it.
            let _ = fs::remove_file(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory under the system temp dir, removed on drop.
    pub struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(name: &str) -> TempDir {
            let n: u64 = u64::from_be_bytes(crate::random_bytes().unwrap());
            let path = std::env::temp_dir().join(format!("gossipfs-{name}-{n:016x}"));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn v(time: u64, node: u64) -> Version {
        Version { time, node }
    }

    fn read_all(store: &Store, key: &str) -> Option<Vec<u8>> {
        let mut reader = store.open_file(key).unwrap()?;
        let mut bytes = Vec::new();
        reader.read_to_end(&mut bytes).unwrap();
        Some(bytes)
    }

    fn put(store: &Store, key: &str, bytes: &[u8], version: Version) -> bool {
        let temp = store.write_temp(key, &mut &bytes[..]).unwrap();
        store.commit(temp, version).unwrap()
    }

    fn temp_files(dir: &TempDir) -> usize {
        fs::read_dir(dir.0.join("tmp")).unwrap().count()
    }

    /// Files queued together commit as one batch: each file synced once,
    /// each directory once for the whole batch (not once per file), and
    /// no caller told before every sync of its batch is done. A stale file
    /// in the batch fails alone.
    #[test]
    fn queued_files_commit_as_one_batch_and_are_reported_only_once_durable() {
        let dir = TempDir::new("store-batch");
        let store = Arc::new(Store::open("test", &dir.0, true).unwrap());
        assert!(put(&store, "old", b"newer", v(9, 1)));
        let before = store.syncs_and_batches().0;
        let keys: Vec<String> = (0..100).map(|i| format!("k{i}")).collect();
        // As if the committer were busy: files queue up for its next batch.
        lock(&store.queue).running = true;
        let (told_tx, told_rx) = std::sync::mpsc::channel();
        for key in keys.iter().map(String::as_str).chain(["old"]) {
            let temp = store.write_temp(key, &mut &key.as_bytes()[..]).unwrap();
            let (counted, told) = (Arc::clone(&store), told_tx.clone());
            let done = move |committed: Result<bool>| {
                told.send((committed.unwrap(), counted.syncs_and_batches().0)).unwrap();
            };
            store.commit_later(temp, v(2, 1), Box::new(done));
        }
        // Everything is queued before the committer starts: one batch.
        store.stop_batches();
        store.run_batches();
        let told: Vec<(bool, u64)> = told_rx.try_iter().collect();
        // Every file, and `objects/` once.
        let synced = (keys.len() + 1) as u64;
        assert_eq!(told.len(), keys.len() + 1);
        assert_eq!(told.last(), Some(&(false, before + synced)), "the stale file fails alone");
        for (committed, syncs) in &told[..keys.len()] {
            assert!(committed);
            assert_eq!(*syncs - before, synced, "told before its batch was durable");
        }
        for key in &keys {
            assert_eq!(read_all(&store, key).unwrap(), key.as_bytes());
        }
        assert_eq!(temp_files(&dir), 0);
    }

    /// With its committer gone (a panic in a `done`, say), nobody waits for
    /// it: what it had not taken is dropped, each caller told, and later
    /// files commit on their callers' threads.
    #[test]
    fn a_committer_that_dies_leaves_no_caller_waiting() {
        let dir = TempDir::new("store-gone");
        let store = Arc::new(Store::open("test", &dir.0, false).unwrap());
        lock(&store.queue).running = true;
        let (told_tx, told_rx) = std::sync::mpsc::channel();
        for key in ["boom", "behind"] {
            let temp = store.write_temp(key, &mut &b"x"[..]).unwrap();
            let told = told_tx.clone();
            let done = move |committed: Result<bool>| {
                assert!(key != "boom", "a done that panics");
                told.send(committed.is_ok()).unwrap();
            };
            store.commit_later(temp, v(1, 1), Box::new(done));
        }
        drop(told_tx);
        let committer_store = Arc::clone(&store);
        let committer = thread::spawn(move || committer_store.run_batches());
        assert!(committer.join().is_err(), "the committer died");
        // "behind" was in the batch that panicked: its done was dropped.
        assert_eq!(told_rx.iter().count(), 0);
        let temp = store.write_temp("later", &mut &b"y"[..]).unwrap();
        let (later_tx, later_rx) = std::sync::mpsc::channel();
        store.commit_later(temp, v(2, 1), Box::new(move |c| later_tx.send(c.unwrap()).unwrap()));
        assert_eq!(later_rx.try_recv(), Ok(true), "committed on the caller's thread");
        assert_eq!(read_all(&store, "later").unwrap(), b"y");
    }

    /// A writer that finds the commit queue full waits for room, so the
    /// queue (each entry an open file) never grows past its bound, and
    /// every file still commits once the committer runs.
    #[test]
    fn the_commit_queue_is_bounded_and_a_full_queue_makes_the_writer_wait() {
        let dir = TempDir::new("store-bound");
        let store = Arc::new(Store::open("test", &dir.0, false).unwrap());
        let files = batch::QUEUE_MAX_FILES + 20;
        // As if the committer were busy: files queue up for its next batch.
        lock(&store.queue).running = true;
        let writer_store = Arc::clone(&store);
        let writer = thread::spawn(move || {
            let mut longest = 0;
            for i in 0..files {
                let key = format!("k{i}");
                let temp = writer_store.write_temp(&key, &mut &b"x"[..]).unwrap();
                writer_store.commit_later(temp, v(1, 1), Box::new(|_| {}));
                longest = longest.max(lock(&writer_store.queue).files.len());
            }
            longest
        });
        // The committer starts only once the writer waits at the bound (or,
        // were there no bound, once it is done).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while lock(&store.queue).writers_waiting == 0 && !writer.is_finished() {
            assert!(std::time::Instant::now() < deadline, "the writer neither waited nor ended");
            thread::yield_now();
        }
        let committer_store = Arc::clone(&store);
        let committer = thread::spawn(move || committer_store.run_batches());
        let longest = writer.join().unwrap();
        store.stop_batches();
        committer.join().unwrap();
        assert_eq!(longest, batch::QUEUE_MAX_FILES, "the queue grew past its bound");
        assert_eq!(store.live().len(), files, "every file committed");
    }

    #[test]
    fn commit_then_read_back() {
        let dir = TempDir::new("store");
        let store = Store::open("test", &dir.0, false).unwrap();
        assert!(put(&store, "a/b.txt", b"hello", v(1, 1)));
        assert_eq!(read_all(&store, "a/b.txt").unwrap(), b"hello");
        let entry = store.entry("a/b.txt").unwrap();
        assert_eq!((entry.size, entry.version, entry.tombstone), (5, v(1, 1), false));
        assert_eq!(temp_files(&dir), 0);
    }

    #[test]
    fn only_newer_versions_win() {
        let dir = TempDir::new("store");
        let store = Store::open("test", &dir.0, false).unwrap();
        assert!(put(&store, "k", b"two", v(2, 1)));
        assert!(!put(&store, "k", b"one", v(1, 9)));
        assert_eq!(read_all(&store, "k").unwrap(), b"two");
        assert!(!store.delete("k", v(2, 0)).unwrap());
        assert!(store.delete("k", v(3, 0)).unwrap());
        assert_eq!(read_all(&store, "k"), None);
        assert!(store.entry("k").unwrap().tombstone);
        // A store older than the tombstone stays dead; a newer one revives.
        assert!(!put(&store, "k", b"late", v(2, 5)));
        assert!(put(&store, "k", b"new", v(4, 0)));
        assert_eq!(read_all(&store, "k").unwrap(), b"new");
        assert_eq!(temp_files(&dir), 0);
    }

    #[test]
    fn clear_removes_older_keys_and_refuses_older_stores() {
        let dir = TempDir::new("store");
        let store = Store::open("test", &dir.0, false).unwrap();
        put(&store, "old", b"x", v(1, 1));
        put(&store, "new", b"y", v(5, 1));
        assert!(store.clear(v(3, 1)).unwrap());
        assert!(!store.clear(v(2, 1)).unwrap());
        assert_eq!(store.entry("old"), None);
        assert_eq!(read_all(&store, "new").unwrap(), b"y");
        assert!(!put(&store, "old", b"x", v(2, 7)));
        assert_eq!(store.cleared(), v(3, 1));
        // The only files left under objects/ are the new key's.
        assert_eq!(crate::hardening::recovery::key_files(&store.root).unwrap().len(), 1);
    }

    #[test]
    fn a_root_of_the_old_format_is_refused_and_left_alone() {
        let dir = TempDir::new("store");
        // What the first gossipfs left: a node id and Lamport versions, no
        // format file.
        fs::create_dir_all(&dir.0).unwrap();
        fs::write(dir.0.join("node-id"), "00000000000000aa\n").unwrap();
        fs::write(dir.0.join("cleared"), "5@00000000000000aa").unwrap();
        let err = Store::open("test", &dir.0, false).err().expect("refused");
        assert!(matches!(err, Error::Config(_)), "{err}");
        assert!(err.to_string().contains("older gossipfs"), "{err}");
        assert_eq!(fs::read_to_string(dir.0.join("cleared")).unwrap(), "5@00000000000000aa");
        // A new root is marked with the format, and opens again.
        let fresh = TempDir::new("store");
        drop(Store::open("test", &fresh.0, false).unwrap());
        assert_eq!(fs::read_to_string(fresh.0.join("format")).unwrap().trim(), "3");
        Store::open("test", &fresh.0, false).unwrap();
    }

    /// Format 2 kept each key file in a fan-out directory named by the
    /// first two hex digits of its name; such a root opens as format 3 with
    /// every file moved up into `objects/`, and nothing lost, also when an
    /// earlier start was cut short after moving some of them.
    #[test]
    fn a_root_of_format_2_moves_its_files_into_one_directory() {
        let dir = TempDir::new("store-format-2");
        let keys = ["a", "b", "c", "gone"];
        let digest = {
            let store = Store::open("test", &dir.0, false).unwrap();
            for (i, key) in keys.iter().enumerate() {
                put(&store, key, key.as_bytes(), v(i as u64 + 1, 1));
            }
            store.delete("gone", v(9, 1)).unwrap();
            store.digest()
        };
        let objects = dir.0.join("objects");
        // All but one: that one was moved by a start that was cut short.
        for file in crate::hardening::recovery::key_files(&dir.0).unwrap().iter().skip(1) {
            let name = file.file_name().unwrap().to_str().unwrap().to_string();
            fs::create_dir_all(objects.join(&name[..2])).unwrap();
            fs::rename(file, objects.join(&name[..2]).join(&name)).unwrap();
        }
        fs::write(dir.0.join("format"), "2\n").unwrap();

        let store = Store::open("test", &dir.0, false).unwrap();
        assert_eq!(store.digest(), digest);
        for key in ["a", "b", "c"] {
            assert_eq!(read_all(&store, key).unwrap(), key.as_bytes());
        }
        assert_eq!(fs::read_to_string(dir.0.join("format")).unwrap(), "3\n");
        let left: Vec<_> = fs::read_dir(&objects).unwrap().map(|e| e.unwrap().path()).collect();
        assert_eq!(left.len(), keys.len());
        assert!(left.iter().all(|path| path.is_file()), "{left:?}");
    }

    #[test]
    fn reopen_rebuilds_the_index_and_keeps_the_node_id() {
        let dir = TempDir::new("store");
        let (node, digest) = {
            let store = Store::open("test", &dir.0, true).unwrap();
            put(&store, "a", b"1", v(1, 1));
            put(&store, "b", b"22", v(7, 1));
            store.delete("a", v(8, 2)).unwrap();
            store.clear(v(2, 3)).unwrap();
            (store.node, store.digest())
        };
        // A leftover temp file, as a crash would leave.
        fs::write(dir.0.join("tmp").join("crash.tmp"), b"partial").unwrap();
        let store = Store::open("test", &dir.0, true).unwrap();
        assert_eq!(store.node, node);
        assert_eq!(store.digest(), digest);
        assert_eq!(store.max_time(), 8);
        assert_eq!(temp_files(&dir), 0);
    }

    #[test]
    fn a_clear_cut_short_is_finished_at_the_next_start() {
        let dir = TempDir::new("store");
        {
            let store = Store::open("test", &dir.0, false).unwrap();
            put(&store, "a", b"1", v(1, 1));
            put(&store, "b", b"2", v(2, 1));
            put(&store, "c", b"3", v(9, 1));
        }
        // A crash right after a clear at 5@7 wrote its watermark.
        fs::write(dir.0.join("cleared"), v(5, 7).to_string()).unwrap();
        let store = Store::open("test", &dir.0, false).unwrap();
        assert_eq!(store.cleared(), v(5, 7));
        let keys: Vec<String> = store.live().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["c"]);
        assert_eq!(crate::hardening::recovery::key_files(&store.root).unwrap().len(), 1);
    }

    #[test]
    fn damaged_files_are_set_aside_at_start_and_never_served() {
        let dir = TempDir::new("store");
        let path = {
            let store = Store::open("test", &dir.0, false).unwrap();
            put(&store, "k", b"a file that will lose its tail", v(1, 1));
            store.path_for("k")
        };
        // A crash with fsync off can leave a file shorter than its header.
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 4]).unwrap();
        let store = Store::open("test", &dir.0, false).unwrap();
        assert_eq!(store.entry("k"), None);
        assert!(store.open_file("k").unwrap().is_none());
        assert!(!path.exists());
        assert_eq!(fs::read_dir(dir.0.join("corrupt")).unwrap().count(), 1);
    }

    #[test]
    fn receive_checks_length_and_sha1_and_leaves_nothing_on_failure() {
        let dir = TempDir::new("store");
        let store = Store::open("test", &dir.0, false).unwrap();
        let good: Sha1Digest = Sha1::digest(b"abcdef").into();
        // Cut short: 3 of 6 bytes.
        let err = store.receive_temp("k", &mut &b"abc"[..], 6, &good).err().unwrap();
        assert!(err.to_string().contains("ended after 3 of 6"), "{err}");
        // Wrong bytes.
        let err = store.receive_temp("k", &mut &b"abcdeX"[..], 6, &good).err().unwrap();
        assert!(err.to_string().contains("SHA-1"), "{err}");
        assert_eq!(temp_files(&dir), 0);
        // Exactly `size` bytes are consumed; the rest stays in the reader.
        let mut wire = &b"abcdefNEXT"[..];
        let temp = store.receive_temp("k", &mut wire, 6, &good).unwrap();
        assert_eq!(wire, b"NEXT");
        assert!(store.commit(temp, v(1, 1)).unwrap());
        assert_eq!(read_all(&store, "k").unwrap(), b"abcdef");
    }

    #[test]
    fn corrupt_content_is_reported_when_read() {
        let dir = TempDir::new("store");
        let store = Store::open("test", &dir.0, false).unwrap();
        put(&store, "k", b"precious bytes", v(1, 1));
        let path = store.path_for("k");
        let mut bytes = fs::read(&path).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&path, bytes).unwrap();
        let mut reader = store.open_file("k").unwrap().unwrap();
        let err = reader.read_to_end(&mut Vec::new()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // The store no longer claims the key, so a peer's copy can replace
        // it, and the bad file is kept aside rather than served again.
        assert_eq!(store.entry("k"), None);
        assert!(store.open_file("k").unwrap().is_none());
        assert_eq!(fs::read_dir(dir.0.join("corrupt")).unwrap().count(), 1);
    }

    #[test]
    fn hostile_keys_stay_inside_the_root() {
        let dir = TempDir::new("store");
        let store = Store::open("test", &dir.0, false).unwrap();
        for key in ["../../escape", "/etc/passwd", "nul\0byte", "new\nline"] {
            assert!(put(&store, key, key.as_bytes(), v(1, 1)));
            assert!(store.path_for(key).starts_with(dir.0.join("objects")));
            assert_eq!(read_all(&store, key).unwrap(), key.as_bytes());
        }
        assert!(store.write_temp("", &mut &b""[..]).is_err());
    }
}
