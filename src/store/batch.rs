//! Group commit's queue and its committer thread (see the `store` module
//! doc): files written and waiting for their batch, and the thread that
//! takes them, batch after batch, to [`Store::commit_batch`].

use std::collections::VecDeque;

use super::{Store, TempFile};
use crate::error::{Result, lock};
use crate::support::version::Version;

/// The most files one batch commits: enough to spread a sync over many
/// files, few enough that the first file of a burst is not kept long.
pub(super) const BATCH_MAX_FILES: usize = 128;

/// The most content bytes one batch commits: a large file is a batch of
/// its own, and the small files ahead of it do not wait for its sync.
pub(super) const BATCH_MAX_BYTES: u64 = 8 << 20;

/// How many files may wait for a batch. A writer beyond it waits for room,
/// so the queue (each entry an open file) stays bounded.
pub(super) const QUEUE_MAX_FILES: usize = 2 * BATCH_MAX_FILES;

/// What a caller of [`Store::commit_later`] is told, once: whether its file
/// was committed (as [`Store::commit`] returns it). It usually runs on the
/// committer thread, so it must be quick and must not wait on the store.
pub(super) type Done = Box<dyn FnOnce(Result<bool>) + Send>;

impl Store {
    /// Queues `temp` for the committer thread's next batch and returns;
    /// `done` is called once the batch is durable, with what
    /// [`Store::commit`] would have returned. Waits while the queue is full.
    /// With no committer running (not yet started, stopped, or gone), the
    /// file is committed here and now, and `done` runs on this thread.
    pub fn commit_later(&self, temp: TempFile, version: Version, done: Done) {
        let mut queue = lock(&self.queue);
        while queue.files.len() >= QUEUE_MAX_FILES && queue.taking() {
            queue.writers_waiting += 1;
            queue = self.room.wait(queue).unwrap_or_else(|e| e.into_inner());
            queue.writers_waiting -= 1;
        }
        if !queue.taking() {
            drop(queue); // commit outside the queue's lock
            return done(self.commit(temp, version));
        }
        queue.files.push_back((temp, version, done));
        self.queued.notify_one();
    }

    /// The committer thread: commits what is queued, batch after batch,
    /// until [`Store::stop_batches`]; what was queued before the stop is
    /// still committed.
    pub fn run_batches(&self) {
        lock(&self.queue).running = true;
        let _gone = CommitterGone(self);
        loop {
            let mut queue = lock(&self.queue);
            while queue.files.is_empty() && !queue.stopped {
                queue = self.queued.wait(queue).unwrap_or_else(|e| e.into_inner());
            }
            if queue.files.is_empty() {
                return; // stopped, and nothing left
            }
            // Take what is there, up to the bounds (but at least one file, a
            // large one alone); never wait for more.
            let sizes = queue.files.iter().take(BATCH_MAX_FILES).map(|(temp, _, _)| temp.size);
            let totals = sizes.scan(0, |bytes, size| {
                *bytes += size;
                Some(*bytes)
            });
            let take = totals.take_while(|&bytes| bytes <= BATCH_MAX_BYTES).count().max(1);
            let taken =
                queue.files.drain(..take).map(|(temp, version, done)| ((temp, version), done));
            let (files, dones): (Vec<_>, Vec<_>) = taken.unzip();
            self.room.notify_all();
            drop(queue); // the disk work is done with the queue open
            for (done, result) in dones.into_iter().zip(self.commit_batch(files)) {
                done(result);
            }
        }
    }

    /// Stops the committer thread once the queue is empty; later commits
    /// are made by their callers.
    pub fn stop_batches(&self) {
        lock(&self.queue).stopped = true;
        self.queued.notify_all();
        self.room.notify_all();
    }
}

/// Ends the committer however it ends, a panic included: what it had not
/// taken is dropped (each caller hears `Error::Closed` or its channel
/// closing; each temp file removes itself), and later files are committed
/// by their callers, so no caller waits for a committer that is gone.
struct CommitterGone<'a>(&'a Store);

impl Drop for CommitterGone<'_> {
    fn drop(&mut self) {
        let mut queue = lock(&self.0.queue);
        queue.running = false;
        let untaken = std::mem::take(&mut queue.files);
        drop(queue); // the dones run without the lock
        drop(untaken);
        self.0.room.notify_all();
    }
}

/// Files waiting for the committer thread, oldest first.
#[derive(Default)]
pub(super) struct Queue {
    /// Each written temp file, its version, and whom to tell.
    pub(super) files: VecDeque<(TempFile, Version, Done)>,
    /// Set while the committer thread runs.
    pub(super) running: bool,
    /// Set by [`Store::stop_batches`].
    stopped: bool,
    /// Writers waiting for room in a full queue.
    pub(super) writers_waiting: usize,
}

impl Queue {
    /// Whether the committer takes files: it runs and has not been told to
    /// stop. If not, a caller commits its own file.
    fn taking(&self) -> bool {
        self.running && !self.stopped
    }
}
