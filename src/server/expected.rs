//! The files on their way to this node: one entry per key, so that a push,
//! a fetch and a `get` of the same version never ask for a second copy.
//!
//! An entry says which version is coming, by which request (0 for a push),
//! since when, whether its bytes are streaming in yet, and which other
//! peers announced the same version: where to ask next if this copy fails.
//! An entry that is not streaming lapses after [`FETCH_RETRY_INTERVAL`]:
//! then the version may be asked for again. Bounded by the caller (see
//! `hardening::limits`), and by [`MAX_SOURCES`] per entry.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::lock;
use crate::hardening::limits::MAX_SOURCES;
use crate::support::version::{NodeId, Version};

/// How long a fetch may wait for its first answer before another
/// announcement or anti-entropy may ask for the same key again.
pub(super) const FETCH_RETRY_INTERVAL: Duration = Duration::from_secs(5);

/// The table. Leaf lock.
#[derive(Default)]
pub(super) struct Expected {
    /// By key.
    files: Mutex<HashMap<String, Incoming>>,
    /// Notified whenever an entry leaves: a `get` waiting for a copy on its
    /// way wakes.
    gone: Condvar,
}

/// A file on its way.
struct Incoming {
    version: Version,
    /// The request of the fetch under way, if it is a fetch (0 for a push).
    request: u64,
    /// When the fetch was asked for, or the push expected.
    asked_at: Instant,
    /// Set once its bytes are streaming in: then it is not asked for again,
    /// however long it takes (a stalled stream fails by the heartbeat
    /// timeout, and the next source is asked then).
    streaming: bool,
    /// Other peers that announced the same version.
    sources: Vec<NodeId>,
}

impl Incoming {
    /// Whether it is still worth waiting for: streaming, or asked for
    /// within [`FETCH_RETRY_INTERVAL`].
    fn is_expected(&self) -> bool {
        self.streaming || self.asked_at.elapsed() < FETCH_RETRY_INTERVAL
    }

    /// Whether it is the copy of `request` at `version`. Fetches have
    /// requests of their own; every push has request 0, so a push is told
    /// apart by its version: a push that ends must not end a newer push's
    /// entry queued behind it.
    fn is(&self, request: u64, version: Version) -> bool {
        self.request == request && (request != 0 || self.version == version)
    }

    /// Keeps `source`, which announced `version`, as a place to ask next:
    /// if that is the version coming, and within the bound.
    fn remember(&mut self, version: Version, source: NodeId) {
        if self.version == version && self.sources.len() < MAX_SOURCES {
            self.sources.push(source);
        }
    }
}

/// What an announcement of a version finds in the table.
pub(super) enum Announced {
    /// That version or a newer one is on its way: the announcer was kept
    /// as a place to ask next.
    Coming,
    /// That version was asked for long ago and has not come: ask again.
    Lapsed,
    /// Nothing of it: judge the announcement afresh.
    New,
}

/// What to do after the copy asked by a request failed.
pub(super) enum Next {
    /// Another request owns the entry now: nothing.
    Replaced,
    /// No other source: the entry is gone; forget the version.
    GiveUp(Version),
    /// Ask this peer for this version.
    Ask(Version, NodeId),
}

impl Expected {
    /// Notes that `key` at `version` is on its way by `request` (0 for a
    /// push), keeping the sources of an entry of the same version. Returns
    /// the request of the entry replaced (0 if none).
    ///
    /// If that version or a newer one is already on its way: with a
    /// `source` (a fetch from it), `source` is kept as a place to ask next
    /// and nothing is noted (`None`), in one step under the lock, so two
    /// handlers that hear of the same version at once fetch it once;
    /// without one, only a newer version is left alone (`Some(0)`).
    pub fn note(
        &self,
        key: &str,
        version: Version,
        request: u64,
        streaming: bool,
        source: Option<NodeId>,
    ) -> Option<u64> {
        let mut files = lock(&self.files);
        if let Some(coming) = files.get_mut(key).filter(|c| c.version >= version && c.is_expected())
        {
            if let Some(source) = source {
                coming.remember(version, source);
                return None;
            }
            if coming.version > version {
                return Some(0); // a newer copy is on its way: it stays
            }
        }
        let replaced = files.remove(key).filter(|c| c.version == version);
        let (sources, old_request) = replaced.map_or((Vec::new(), 0), |c| (c.sources, c.request));
        let asked_at = Instant::now();
        files.insert(key.to_string(), Incoming { version, request, asked_at, streaming, sources });
        Some(old_request)
    }

    /// An announcement of `key` at `version` by `source`: what it finds.
    pub fn announced(&self, key: &str, version: Version, source: NodeId) -> Announced {
        let mut files = lock(&self.files);
        match files.get_mut(key).filter(|c| c.version >= version) {
            Some(coming) if coming.is_expected() => {
                coming.remember(version, source);
                Announced::Coming
            }
            Some(coming) if coming.version == version => Announced::Lapsed,
            _ => Announced::New,
        }
    }

    /// Keeps `source`, which announced `version`, as a place to ask next
    /// for the entry of `key`, if that is the version coming.
    pub fn add_source(&self, key: &str, version: Version, source: NodeId) {
        if let Some(coming) = lock(&self.files).get_mut(key) {
            coming.remember(version, source);
        }
    }

    /// Whether `key` at `version` or newer is on its way.
    pub fn is_coming(&self, key: &str, version: Version) -> bool {
        lock(&self.files).get(key).is_some_and(|c| c.is_expected() && c.version >= version)
    }

    /// The bytes of `request`'s copy of `key` are streaming in.
    pub fn streaming(&self, key: &str, request: u64) {
        if let Some(coming) = lock(&self.files).get_mut(key).filter(|c| c.request == request) {
            coming.streaming = true;
        }
    }

    /// `request`'s copy of `key` at `version` arrived (or need not): its
    /// entry goes, and any `get` waiting for it wakes.
    pub fn done(&self, key: &str, request: u64, version: Version) {
        let mut files = lock(&self.files);
        if files.get(key).is_some_and(|c| c.is(request, version)) {
            files.remove(key);
            self.gone.notify_all();
        }
    }

    /// `request`'s copy of `key` at `version` failed: the next source to
    /// ask, if any.
    pub fn next_source(&self, key: &str, request: u64, version: Version) -> Next {
        let mut files = lock(&self.files);
        let Some(coming) = files.get_mut(key).filter(|c| c.is(request, version)) else {
            return Next::Replaced;
        };
        let version = coming.version;
        match coming.sources.pop() {
            Some(next) => Next::Ask(version, next),
            None => {
                files.remove(key);
                self.gone.notify_all();
                Next::GiveUp(version)
            }
        }
    }

    /// Waits until no copy of `key` is on its way, or `deadline`, calling
    /// `waiting` with the version when it starts to wait. Returns whether
    /// it waited.
    pub fn wait(&self, key: &str, deadline: Instant, waiting: impl FnOnce(Version)) -> bool {
        let mut files = lock(&self.files);
        let mut waiting = Some(waiting);
        while let Some(coming) = files.get(key).filter(|c| c.is_expected()) {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            if let Some(waiting) = waiting.take() {
                waiting(coming.version);
            }
            // Woken when the entry goes; one not streaming yet lapses by
            // itself after FETCH_RETRY_INTERVAL, so wake for that too.
            let lapse = FETCH_RETRY_INTERVAL.saturating_sub(coming.asked_at.elapsed());
            let wait = if coming.streaming { deadline - now } else { lapse.min(deadline - now) };
            let wait = wait.max(Duration::from_millis(1));
            files = self.gone.wait_timeout(files, wait).unwrap_or_else(PoisonError::into_inner).0;
        }
        waiting.is_none()
    }

    /// How many files are on their way, after forgetting the waits for a
    /// push that lapsed (a fetch's entry goes with its fetch).
    pub fn len_swept(&self) -> usize {
        let mut files = lock(&self.files);
        files.retain(|_, coming| coming.request != 0 || coming.is_expected());
        files.len()
    }

    /// The keys and versions whose push from node `id` is awaited and not
    /// streaming.
    pub fn awaited_from(&self, id: NodeId) -> Vec<(String, Version)> {
        let files = lock(&self.files);
        let awaited = files.iter().filter(|(_, c)| c.request == 0 && !c.streaming);
        awaited
            .filter(|(_, c)| c.version.node == id)
            .map(|(key, c)| (key.clone(), c.version))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(time: u64) -> Version {
        Version { time, node: 1 }
    }

    /// Two pushes of one key, the newer queued behind the older for its
    /// batch commit: the older one's end leaves the newer one's entry, so
    /// the newer copy is still known to be on its way.
    #[test]
    fn an_older_push_that_ends_leaves_a_newer_pushs_entry() {
        let expected = Expected::default();
        assert_eq!(expected.note("k", v(1), 0, true, None), Some(0));
        assert_eq!(expected.note("k", v(2), 0, true, None), Some(0));
        expected.done("k", 0, v(1));
        assert!(expected.is_coming("k", v(2)), "the newer push is still on its way");
        assert!(matches!(expected.next_source("k", 0, v(1)), Next::Replaced));
        assert!(expected.is_coming("k", v(2)));
        expected.done("k", 0, v(2));
        assert!(!expected.is_coming("k", v(2)));
    }
}
