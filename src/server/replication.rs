//! What a node does with each frame a peer sends: the receiving halves of
//! the two sequence diagrams (a store streamed in under the transport lock;
//! a file sent in answer to our get), deletes and clears, the relay that
//! passes each new change on, and anti-entropy and membership.

use super::*;

impl Node {
    /// A peer's store: the receiving half of the save diagram.
    pub(super) fn on_store(
        &self,
        peer: &Peer,
        key: String,
        version: Version,
        size: u64,
        sha1: Sha1Digest,
        stream: &mut Stream,
    ) -> Result<After> {
        debug!(
            target: self.name(),
            "Received metadata (filename, size) key={key} size={size} version={version} from={}",
            peer.name()
        );
        if !self.accept_change(peer, &key, version) {
            return Ok(After::Nothing); // the unread bytes are drained by read_next
        }
        let committed = match self.receive_file(&key, version, size, &sha1, stream) {
            Ok(committed) => committed,
            Err(err) => {
                // Let another copy of this change (from another peer) in.
                lock(&self.gossip).forget(version);
                return self.discard_stream(peer, &key, version, err, stream);
            }
        };
        if !committed {
            return Ok(After::Nothing);
        }
        self.counters
            .changes_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(
            target: self.name(),
            "Successfully stored file key={key} size={size} version={version} from={}",
            peer.name()
        );
        Ok(After::Relay(Change::Store { key, version }))
    }

    /// Streams a file a peer announced into the store: exactly `size` bytes
    /// into a temp file, checked against `sha1`, committed at `version` if
    /// that still wins. Returns whether it was committed. While the bytes
    /// stream in, anti-entropy knows the key is on its way (`incoming`) and
    /// does not ask for it a second time.
    fn receive_file(
        &self,
        key: &str,
        version: Version,
        size: u64,
        sha1: &Sha1Digest,
        stream: &mut Stream,
    ) -> Result<bool> {
        lock(&self.incoming).insert(key.to_string(), Incoming::Streaming);
        let committed = self
            .store
            .receive_temp(key, stream, size, sha1)
            .and_then(|temp| self.store.commit(temp, version));
        lock(&self.incoming).remove(key);
        committed
    }

    pub(super) fn on_delete(&self, peer: &Peer, key: String, version: Version) -> Result<After> {
        if !self.accept_change(peer, &key, version) || !self.store.delete(&key, version)? {
            return Ok(After::Nothing);
        }
        self.counters
            .changes_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(target: self.name(), "Deleted file key={key} version={version} from={}", peer.name());
        Ok(After::Relay(Change::Delete { key, version }))
    }

    pub(super) fn on_clear(&self, peer: &Peer, version: Version) -> Result<After> {
        // Read the store first: the gossip lock is a leaf, never held while
        // taking the store's index lock.
        let cleared = self.store.cleared();
        let verdict = lock(&self.gossip).receive(version, None, cleared);
        if !self.count_verdict(peer, "clear", verdict, version) || !self.store.clear(version)? {
            return Ok(After::Nothing);
        }
        self.counters
            .changes_applied
            .fetch_add(1, Ordering::Relaxed);
        info!(target: self.name(), "Cleared every file version={version} from={}", peer.name());
        Ok(After::Relay(Change::Clear(version)))
    }

    /// The gossip guard for a store or delete of `key`: true if it is new
    /// and newer than what we hold.
    fn accept_change(&self, peer: &Peer, key: &str, version: Version) -> bool {
        // Read the store first: the gossip lock is a leaf, never held while
        // taking the store's index lock.
        let held = self.store.entry(key).map(|entry| entry.version);
        let cleared = self.store.cleared();
        let verdict = lock(&self.gossip).receive(version, held, cleared);
        self.count_verdict(peer, key, verdict, version)
    }

    /// Counts and logs a gossip verdict; true for [`Verdict::Apply`].
    fn count_verdict(&self, peer: &Peer, what: &str, verdict: Verdict, version: Version) -> bool {
        let counter = match verdict {
            Verdict::Apply => return true,
            Verdict::Duplicate => &self.counters.duplicates_dropped,
            Verdict::Stale | Verdict::Implausible => &self.counters.stale_dropped,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        debug!(
            target: self.name(),
            "Dropping {verdict:?} change {what} version={version} from={}",
            peer.name()
        );
        false
    }

    /// A file a peer sent in answer to our `Get`: the requesting half of the
    /// get diagram (stream it under the lock, store it; the waiting `get`
    /// is told after the unlock).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_file(
        &self,
        peer: &Peer,
        request: u64,
        key: String,
        version: Version,
        size: u64,
        sha1: Sha1Digest,
        stream: &mut Stream,
    ) -> Result<After> {
        debug!(
            target: self.name(),
            "Received metadata (filename, size) key={key} size={size} from={}; stream file data",
            peer.name()
        );
        if !lock(&self.gossip).observe(version) {
            warn!(target: self.name(), "Refusing file key={key} version={version} from={}: the version is implausibly far ahead", peer.name());
            let why = "its version is implausibly far ahead".to_string();
            self.answer(request, peer.conn, GetAnswer::Failed(why));
            return Ok(After::Nothing); // the bytes are drained by read_next
        }
        // Several peers may answer the same get, and a pull may race a
        // relay: if we already hold this version (or newer), the bytes are
        // drained unread instead of written to disk a second time.
        let held = self.store.entry(&key).map(|entry| entry.version);
        let received = if gossip::wins(version, held, self.store.cleared()) {
            self.receive_file(&key, version, size, &sha1, stream)
        } else {
            self.pull_answered(&key);
            Ok(false)
        };
        let committed = match received {
            Ok(committed) => committed,
            Err(err) => {
                // Tell the waiting get now: it goes on with the other peers.
                let why = format!("from {}: {err}", peer.name());
                self.answer(request, peer.conn, GetAnswer::Failed(why));
                return self.discard_stream(peer, &key, version, err, stream);
            }
        };
        if committed {
            debug!(target: self.name(), "Saved file key={key} size={size} version={version} from={}", peer.name());
        }
        // Found if we hold it now, whether this copy or an equal one that
        // arrived first; not found if something newer (a delete) beat it.
        let live = self.store.entry(&key).is_some_and(|entry| !entry.tombstone);
        let answer = if live {
            GetAnswer::Found
        } else {
            GetAnswer::NotFound
        };
        Ok(After::Answer(request, answer))
    }

    /// What a failed file stream costs: if every announced byte was read,
    /// or can still be read (the SHA-1 did not match, or our disk refused
    /// the file), the connection stays in step and stays open — the file is
    /// dropped and anti-entropy or the next `get` tries again. If the stream
    /// broke halfway, the error closes the connection.
    ///
    /// Bytes that arrived whole but failed their SHA-1 (a protocol error,
    /// where a disk error is an I/O one) mean the sender's copy is bad: we
    /// tell it so with a [`Frame::Corrupt`] notice.
    fn discard_stream(
        &self,
        peer: &Peer,
        key: &str,
        version: Version,
        err: Error,
        stream: &mut Stream,
    ) -> Result<After> {
        // A failure of ours (a disk error while writing) leaves the peer's
        // bytes unread: drain them and the connection stays in step. If the
        // socket itself broke, the drain fails too and the error closes it.
        let ours = matches!(err, Error::Io(_));
        if stream.limit() > 0
            && (!ours || std::io::copy(stream, &mut std::io::sink()).is_err() || stream.limit() > 0)
        {
            return Err(err);
        }
        warn!(target: self.name(), "Discarded file key={key} from={}: {err}", peer.name());
        if matches!(err, Error::Protocol(_)) {
            let key = key.to_string();
            peer.queue(Outbound::Frame(Frame::Corrupt { key, version }));
        }
        Ok(After::Nothing)
    }

    /// A peer says the bytes we sent for `key` failed their SHA-1. Check our
    /// copy on a thread of its own (it may be large): reading it through
    /// the checking [`FileReader`] takes it out of service if it is bad.
    /// One check per key at a time, however many notices arrive.
    pub(super) fn on_corrupt(self: &Arc<Self>, peer: &Peer, key: String, version: Version) {
        let ours = self.store.entry(&key).map(|entry| entry.version);
        let mut checking = lock(&self.checking);
        // Not the copy we hold now, already being checked, or enough checks
        // running: a flood of notices must not become a flood of threads.
        if ours != Some(version) || checking.len() >= MAX_CHECKS || !checking.insert(key.clone()) {
            return;
        }
        drop(checking); // a leaf lock: released before logging and spawning
        warn!(target: self.name(), "Checking our copy of key={key} version={version}: peer={} found it corrupt", peer.name());
        let node = Arc::clone(self);
        self.spawn(move || {
            let checked = node
                .store
                .open_file(&key)
                .and_then(|file| match file {
                    Some(mut file) => Ok(std::io::copy(&mut file, &mut std::io::sink())?),
                    None => Ok(0),
                });
            match checked {
                Ok(_) => info!(target: node.name(), "Our copy of key={key} is sound"),
                Err(err) => warn!(target: node.name(), "Our copy of key={key} is bad and was set aside: {err}"),
            }
            lock(&node.checking).remove(&key);
        });
    }

    /// Hands a peer's answer to the `get` waiting for it, if any (request 0,
    /// an anti-entropy pull, has none; a `get` that timed out has gone).
    pub(super) fn answer(&self, request: u64, conn: u64, answer: GetAnswer) {
        let waiter = lock(&self.pending).get(&request).cloned();
        if let Some(waiter) = waiter {
            let _ = waiter.send((conn, answer));
        }
    }

    /// Tells every waiting `get` that connection `conn` closed: whatever it
    /// was asked, it will not answer. For a `get`, a peer that is gone does
    /// not have the file: if no other peer has it either, the key is not
    /// found on any node we can reach.
    pub(super) fn answer_closed(&self, conn: u64) {
        let waiters: Vec<_> = lock(&self.pending).values().cloned().collect();
        for waiter in waiters {
            let _ = waiter.send((conn, GetAnswer::NotFound));
        }
    }

    /// The anti-entropy timer: every interval, each peer gets our summary
    /// (and, with discovery on, our list of peers).
    pub(super) fn anti_entropy_loop(self: Arc<Self>) {
        while !self.wait_for_stop(self.config.anti_entropy_interval) {
            let peers = self.peer_handles();
            if peers.is_empty() {
                continue;
            }
            let summary = self.summary_frame();
            let peers_frame = self.peers_frame();
            for peer in peers {
                peer.queue(Outbound::Frame(summary.clone()));
                if self.config.discover_peers {
                    peer.queue(Outbound::Frame(peers_frame.clone()));
                }
            }
        }
    }

    pub(super) fn summary_frame(&self) -> Frame {
        let (cleared, entries) = self.store.digest();
        Frame::Summary {
            cleared,
            hash: gossip::summary_hash(cleared, &entries),
            count: entries.len() as u64,
        }
    }

    pub(super) fn peers_frame(&self) -> Frame {
        let peers = self.peer_handles().into_iter();
        let addrs = peers.map(|p| p.hello.listen_addr.clone()).collect();
        Frame::Peers { addrs }
    }

    /// A peer's summary: if it differs from ours, send our whole digest so
    /// the peer can pull what it lacks. (The peer does the same for us when
    /// it gets our summary.)
    /// (The hash covers the clear watermark too; `count` is for the log.)
    pub(super) fn on_summary(&self, peer: &Peer, hash: Sha1Digest, count: u64) {
        // One digest in flight per peer: a peer that sends summaries faster
        // than it reads (hostile, or busy with a long file) must not make us
        // queue a copy of the whole index for each.
        if peer.digest_in_flight.load(Ordering::SeqCst) {
            return;
        }
        let (my_cleared, entries) = self.store.digest();
        if gossip::summary_hash(my_cleared, &entries) == hash {
            return;
        }
        peer.digest_in_flight.store(true, Ordering::SeqCst);
        debug!(
            target: self.name(),
            "Anti-entropy: summaries differ (ours keys={}, theirs keys={count}), sending digest to peer={}",
            entries.len(),
            peer.name()
        );
        // Each entry: u16 key length + key + 16-byte version + tombstone byte.
        for chunk in chunks_within_frame(entries, |e| 2 + e.key.len() + 16 + 1) {
            peer.queue(Outbound::Frame(Frame::Digest {
                cleared: my_cleared,
                entries: chunk,
            }));
        }
        peer.queue(Outbound::Written(Arc::clone(&peer.digest_in_flight)));
    }

    /// A peer's digest: apply its newer clear and tombstones, pull its newer
    /// files.
    pub(super) fn on_digest(
        &self,
        peer: &Peer,
        cleared: Version,
        entries: &[DigestEntry],
    ) -> Result<()> {
        let newest = entries
            .iter()
            .map(|e| e.version)
            .fold(cleared, Version::max);
        if !lock(&self.gossip).observe(newest) {
            // One hostile entry spoils the digest: ignore all of it.
            warn!(target: self.name(), "Ignoring a digest from={}: version {newest} is implausibly far ahead", peer.name());
            return Ok(());
        }
        let held = |key: &str| self.store.entry(key).map(|entry| entry.version);
        for repair in gossip::repairs(held, self.store.cleared(), cleared, entries) {
            match repair {
                Repair::Clear(version) => {
                    if self.store.clear(version)? {
                        info!(target: self.name(), "Anti-entropy: applied clear version={version} from={}", peer.name());
                    }
                }
                Repair::Delete { key, version } => {
                    if self.store.delete(&key, version)? {
                        info!(target: self.name(), "Anti-entropy: applied delete key={key} version={version} from={}", peer.name());
                    }
                }
                Repair::Pull(key) => {
                    if !self.start_pull(&key) {
                        continue;
                    }
                    debug!(target: self.name(), "Anti-entropy: pulling key={key} from={}", peer.name());
                    peer.queue(Outbound::Frame(Frame::Get { request: 0, key }));
                }
            }
        }
        Ok(())
    }

    /// A pull of `key` was answered (or will not be): forget it, unless the
    /// key is meanwhile streaming in from a store, whose mark must stay.
    pub(super) fn pull_answered(&self, key: &str) {
        let mut incoming = lock(&self.incoming);
        if matches!(incoming.get(key), Some(Incoming::Pulled(_))) {
            incoming.remove(key);
        }
    }

    /// Records that `key` is being pulled; false if it is streaming in
    /// already, or a pull of it started less than [`PULL_RETRY_INTERVAL`] ago.
    fn start_pull(&self, key: &str) -> bool {
        let mut incoming = lock(&self.incoming);
        let now = Instant::now();
        // Pulls never answered (the peer left, or lied in its digest) are
        // forgotten once they could be retried, so the map stays as small
        // as the pulls actually under way.
        incoming.retain(|_, why| match why {
            Incoming::Pulled(at) => now.duration_since(*at) < PULL_RETRY_INTERVAL,
            Incoming::Streaming => true,
        });
        let coming = match incoming.get(key) {
            Some(Incoming::Streaming) => true,
            Some(Incoming::Pulled(at)) => now.duration_since(*at) < PULL_RETRY_INTERVAL,
            None => false,
        };
        if !coming {
            incoming.insert(key.to_string(), Incoming::Pulled(now));
        }
        !coming
    }

    /// A peer's list of its peers: dial the ones we lack, up to
    /// `max_peers`.
    pub(super) fn on_peers(self: &Arc<Self>, addrs: &[String]) {
        if !self.config.discover_peers {
            return;
        }
        // A hostile frame may list thousands of addresses: consider no more
        // than we could ever use, and count dials under way as peers, so the
        // node never has more than `max_peers` connections it started itself
        // by discovery.
        for addr in addrs.iter().take(self.config.max_peers) {
            let Ok(target) = addr.parse::<SocketAddr>() else {
                continue;
            };
            let dialling = lock(&self.dialling).len();
            let full = lock(&self.peers).len() + dialling >= self.config.max_peers;
            if full || target == self.listen_addr || self.connected_to(target) {
                continue;
            }
            debug!(target: self.name(), "Discovered peer addr={target}; dialling");
            self.dial_once(target);
        }
    }
}

/// Splits a list into lists that each fit in one frame, given each item's
/// encoded length. Always returns at least one (maybe empty) list.
pub(super) fn chunks_within_frame<T>(
    items: Vec<T>,
    encoded_len: impl Fn(&T) -> usize,
) -> Vec<Vec<T>> {
    // Room for the frame's own fields, with a margin.
    let budget = MAX_FRAME_LEN as usize - 256;
    let mut chunks = vec![Vec::new()];
    let mut used = 0;
    for entry in items {
        let len = encoded_len(&entry);
        if used + len > budget {
            chunks.push(Vec::new());
            used = 0;
        }
        used += len;
        chunks
            .last_mut()
            .expect("chunks is never empty")
            .push(entry);
    }
    chunks
}
