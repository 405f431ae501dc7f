//! The transport layer: one TCP connection to a peer, the "TL1" and "TL2"
//! of the two sequence diagrams.
//!
//! A connection is split with `try_clone` into a read half and a write half,
//! and each half has its own rules.
//!
//! # The read half and the transport lock
//!
//! The read half ([`ReadHalf`]: the buffered socket, and how many bytes of
//! a file stream are still owed) is a value that **moves** between two
//! actors. Whoever owns it may read; nobody else can, and the compiler
//! checks it.
//!
//! 1. The connection's **read loop** ([`Transport::read_loop`]) owns it and
//!    reads one frame at a time. A frame without file data it delivers and
//!    reads on.
//! 2. A frame that announces file data (metadata: key, version, size,
//!    SHA-1) is followed on the wire by exactly `size` raw bytes, which
//!    belong to the actor the diagram names: the node's handler for a
//!    store, the thread inside `get` for a file it asked for. The read loop
//!    **moves the read half into a [`StreamClaim`]** and delivers it with
//!    the frame. From then on the read loop has nothing to read with.
//! 3. The actor calls [`StreamClaim::lock`] ("Lock transport layer"). The
//!    claim is consumed, so it cannot be locked twice; the read half moves
//!    on into the [`StreamLock`], through which the actor reads exactly
//!    `size` bytes. Dropping the lock ("Unlock transport layer") sends the
//!    read half home and wakes the read loop.
//! 4. The read loop **waits** for the read half to come home
//!    ([`Transport::wait_for_unlock`]), then reads the next frame.
//!
//! ```text
//!   read loop (TL)                       actor (Peer or Server)
//!   read frame with the read half
//!   deliver(frame, claim{read half}) ──> claim.lock()   "Lock transport layer"
//!   wait_for_unlock()                    read `size`    "Stream file data"
//!        ...                             drop(lock)     "Unlock transport layer"
//!   <──────────── read half comes home ──┘
//!   read the next frame ...
//! ```
//!
//! Two ways a stream can end early, each named:
//!
//! - A claim dropped **unlocked** (the change was stale, the `get` had gone)
//!   sends the read half home with the bytes still owed. The read loop
//!   drains them in [`Transport::discard_unclaimed_stream`], with a log
//!   line: that connection's own sender sets the pace, nobody else waits.
//! - A lock dropped with bytes **unread** (the actor gave up: a disk error,
//!   a stream below the floor rate) closes the connection. Draining would
//!   take as long as the sender likes, and the actor's whole point was not
//!   to wait for it.
//!
//! Every path that sees the connection die (the read loop, the writer, a
//! stream, a full or closed queue) calls [`Transport::close`], which also
//! wakes a read loop waiting for its read half: nothing waits on a dead
//! link.
//!
//! # The write half and its thread
//!
//! The write half belongs to one **writer thread** ([`write_loop`]), fed by
//! a bounded queue of [`Outbound`] work. Everyone else only queues.
//! **A reader never writes to a socket.** If it did, two nodes streaming
//! large files to each other would each sit in `write`, both TCP buffers
//! full, each waiting for the other to read: forever. With a separate
//! writer, each side's reader keeps draining its socket while its writer is
//! blocked.
//!
//! The queue is bounded, in items ([`QUEUE_LEN`]) and in bytes (see
//! `limits`; no item holds file content, and only an answer to a go-ahead
//! holds an open file), so a peer that stops reading cannot grow this
//! node's memory: once its queue is full, it is disconnected.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use log::{debug, warn};

use crate::error::{Error, Result, TimeoutsAsTimedOut, lock};
use crate::frame::{Frame, read_frame, write_frame};
use crate::hardening::checked::FileReader;
use crate::hardening::handshake::Hello;
use crate::hardening::limits::{self, Owed, QueueBudget};
use crate::store::Store;
use crate::support::config::{Counters, READ_BUFFER_LEN, STREAM_BUFFER_LEN};
use crate::support::version::{NodeId, Version};

/// How many items a peer's writer queue holds. A peer that reads so little
/// that this many frames wait for it is disconnected.
pub(crate) const QUEUE_LEN: usize = 4096;

/// How long a write may block before the connection is given up: a peer
/// that reads nothing for this long is stuck or gone.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Work for a peer's writer thread.
pub(crate) enum Outbound {
    /// Send this frame (no stream follows it).
    Frame(Frame),
    /// Diagram 1: send our file for `key` as a [`Frame::Store`], then its
    /// bytes. `version` is the store being pushed: if the key has since
    /// changed, nothing is sent (the newer change travels on its own).
    Push { key: String, version: Version },
    /// Diagram 2, phase two: answer a [`Frame::GoAhead`] with a
    /// [`Frame::File`] and the file's bytes, or a [`Frame::NotFound`] if we
    /// do not hold `key` at `version` or newer.
    Reply {
        /// The go-ahead being answered.
        request: u64,
        /// The key asked for.
        key: String,
        /// The oldest version that will do.
        version: Version,
        /// The file the handler opened and held ready when it offered it,
        /// or `None` (a fetch's go-ahead, with no offer before it): then
        /// the writer opens the file when the reply's turn comes, so a
        /// queue of such replies holds keys, not open files.
        held: Option<Box<FileReader>>,
    },
    /// Not a frame: the writer clears this flag when it gets here, that is,
    /// once everything queued before it has been written.
    ClearWhenSent(Arc<AtomicBool>),
    /// Close the connection.
    Close,
}

impl Outbound {
    /// What this item costs in memory while it waits (see `limits`).
    /// Markers cost nothing (and `Close`, which [`Transport::close`] queues
    /// without taking room, must not).
    fn weight(&self) -> usize {
        match self {
            Outbound::Frame(frame) => limits::frame_weight(frame),
            Outbound::Push { key, .. } | Outbound::Reply { key, .. } => limits::key_weight(key),
            Outbound::ClearWhenSent(_) | Outbound::Close => 0,
        }
    }
}

/// The read side of a connection: what the transport lock hands from the
/// read loop to a stream's actor and back.
pub(crate) struct ReadHalf {
    /// The socket's read side, buffered. Its read timeout is the heartbeat
    /// timeout: a sender silent that long, mid-stream too, is taken for dead.
    reader: BufReader<TimeoutsAsTimedOut<TcpStream>>,
    /// Bytes of the last frame's stream not read yet: what its actor may
    /// still read, or what the read loop must drain before the next frame.
    owed: u64,
}

/// One connection to a peer: who it is, the transport lock on its read
/// half, and the queue to its writer thread.
pub(crate) struct Transport {
    /// Unique per connection in this process, so a connection that was
    /// replaced is never mistaken for its replacement.
    pub conn: u64,
    /// What the other side said about itself in the handshake.
    pub peer: Hello,
    /// The socket address at the other end.
    pub addr: SocketAddr,
    /// True if we dialled, false if they did.
    pub outbound: bool,
    /// The peer's [`Frame::PushesFrom`] promise, as a version's time: its
    /// stores newer than this are pushed to us on this connection. 0 until
    /// the promise arrives (no push is counted on till then).
    pushes_from: AtomicU64,
    /// Duplicate connections to the same peer that this one won over, left
    /// open until the promise above arrives (see `PeerMap::register`).
    retiring: Mutex<Vec<Arc<Transport>>>,
    /// Where the read half waits between owners. `Some` only from a stream
    /// actor's unlock until the read loop takes it back (and, at the start,
    /// until the read loop first takes it).
    home: Mutex<Option<ReadHalf>>,
    /// Notified when the read half comes home, and when the connection
    /// closes: the two things a waiting read loop waits for.
    came_home: Condvar,
    /// Set while the read loop waits in [`Transport::wait_for_unlock`]:
    /// says nothing to the protocol, but lets a test (or a person reading a
    /// stack dump) see that the read loop really waits.
    parked: AtomicBool,
    /// Set while the read half is away with a stream's claim or lock: the
    /// connection is busy with a stream.
    away: AtomicBool,
    /// The queue to the writer thread.
    tx: SyncSender<Outbound>,
    /// The bytes waiting in it, bounded (see `limits`).
    budget: QueueBudget,
    /// Set by [`Transport::close`].
    closed: AtomicBool,
    /// A handle on the socket, to shut it down from any thread.
    socket: TcpStream,
    /// Our own node's name: every log line starts with it.
    our_name: String,
    /// The node's counters.
    counters: Arc<Counters>,
    /// Set while an anti-entropy digest for this peer is queued, so a peer
    /// that sends summaries faster than it reads gets one at a time.
    pub digest_in_flight: Arc<AtomicBool>,
}

/// The right to the file bytes that follow one frame, and the read half
/// they arrive on. The read loop hands it over with the frame; see the
/// module doc.
pub(crate) struct StreamClaim {
    /// The connection the bytes arrive on.
    transport: Arc<Transport>,
    /// The read half, moved here by the read loop. `Option` only so that
    /// [`StreamClaim::lock`] and `drop` can move it on.
    half: Option<ReadHalf>,
}

/// The transport lock, held for one stream: it owns the read half, and
/// reads at most the bytes still owed. Dropping it unlocks the transport:
/// the read half goes home and the read loop wakes.
pub(crate) struct StreamLock {
    /// The read half. `Option` only so that `drop` can send it home.
    half: Option<ReadHalf>,
    /// The connection, to send the read half home to.
    transport: Arc<Transport>,
}

/// Numbers connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Transport {
    /// Wraps a connection that has completed its handshake. Returns the
    /// transport, plus the write half and the queue's receiving end, which
    /// the caller hands to a thread running [`write_loop`].
    ///
    /// `idle_timeout` becomes the socket's read timeout: a peer silent for
    /// that long, between frames or in the middle of a stream, is taken for
    /// dead.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned or configured.
    pub fn new(
        our_name: &str,
        stream: TcpStream,
        peer: Hello,
        outbound: bool,
        idle_timeout: Duration,
        counters: Arc<Counters>,
    ) -> Result<(Transport, BufWriter<TcpStream>, Receiver<Outbound>)> {
        stream.set_read_timeout(Some(idle_timeout))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        // Frames are flushed whole; Nagle would only delay small ones.
        stream.set_nodelay(true)?;
        let writer = BufWriter::with_capacity(STREAM_BUFFER_LEN, stream.try_clone()?);
        let reader =
            BufReader::with_capacity(READ_BUFFER_LEN, TimeoutsAsTimedOut(stream.try_clone()?));
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let transport = Transport {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            addr: stream.peer_addr()?,
            peer,
            outbound,
            pushes_from: AtomicU64::new(0),
            retiring: Mutex::new(Vec::new()),
            home: Mutex::new(Some(ReadHalf { reader, owed: 0 })),
            came_home: Condvar::new(),
            parked: AtomicBool::new(false),
            away: AtomicBool::new(false),
            tx,
            budget: QueueBudget::default(),
            closed: AtomicBool::new(false),
            socket: stream,
            our_name: our_name.to_string(),
            counters,
            digest_in_flight: Arc::new(AtomicBool::new(false)),
        };
        Ok((transport, writer, rx))
    }

    /// The peer's node id.
    pub fn id(&self) -> NodeId {
        self.peer.node
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.peer.name
    }

    /// The read loop: the transport layer of the diagrams. Reads one frame
    /// at a time and hands it to `deliver`. A frame that announces file
    /// data goes with a [`StreamClaim`] that carries the read half away;
    /// the loop then waits until the claim's actor unlocks and the read
    /// half comes home.
    ///
    /// Returns `Ok(())` when the peer closes the connection cleanly.
    ///
    /// # Errors
    ///
    /// A broken or closed socket, a bad frame, or whatever `deliver`
    /// returns: each ends the connection.
    pub fn read_loop(
        self: &Arc<Self>,
        mut deliver: impl FnMut(Frame, Option<StreamClaim>) -> Result<()>,
    ) -> Result<()> {
        let mut half = self.wait_for_unlock()?;
        loop {
            if half.owed > 0 {
                self.discard_unclaimed_stream(&mut half)?;
            }
            let Some(frame) = read_frame(&mut half.reader)? else {
                return Ok(());
            };
            // Store and File announce a stream, even an empty one: the
            // actor's lock and unlock are steps of the diagram either way.
            if !matches!(frame, Frame::Store { .. } | Frame::File { .. }) {
                deliver(frame, None)?;
                continue;
            }
            half.owed = frame.stream_len();
            // The read half goes with the claim: until it comes back, this
            // loop has nothing to read with.
            self.away.store(true, Ordering::SeqCst);
            let claim = StreamClaim { transport: Arc::clone(self), half: Some(half) };
            deliver(frame, Some(claim))?;
            half = self.wait_for_unlock()?;
        }
    }

    /// Waits until the read half is home, and takes it. Woken by the
    /// unlock that sends it home, or by [`Transport::close`].
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the connection closed first: its stream's holder
    /// may never unlock.
    fn wait_for_unlock(&self) -> Result<ReadHalf> {
        let mut home = self
            .came_home
            .wait_while(lock(&self.home), |home| {
                // Checked under the lock that `close` notifies under, so the
                // wake-up cannot slip between this check and the wait.
                let wait = home.is_none() && !self.is_closed();
                self.parked.store(wait, Ordering::SeqCst);
                wait
            })
            .unwrap_or_else(PoisonError::into_inner);
        let half = home.take().ok_or(Error::Closed)?;
        self.away.store(false, Ordering::SeqCst);
        Ok(half)
    }

    /// Unlock transport layer: the read half comes home, and a read loop
    /// waiting for it wakes.
    fn send_home(&self, half: ReadHalf) {
        *lock(&self.home) = Some(half);
        self.came_home.notify_all();
    }

    /// The one stream the read loop consumes itself: one whose claim was
    /// dropped unlocked, because the actor it was meant for had gone or did
    /// not want it.
    fn discard_unclaimed_stream(&self, half: &mut ReadHalf) -> Result<()> {
        debug!(
            target: &self.our_name,
            "Discarding an unclaimed stream peer={} bytes={}",
            self.name(),
            half.owed
        );
        let drained = io::copy(&mut (&mut half.reader).take(half.owed), &mut io::sink())?;
        Counters::add(&self.counters.bytes_received, drained);
        if drained < half.owed {
            return Err(Error::Protocol("the connection closed in the middle of a stream".into()));
        }
        half.owed = 0;
        Ok(())
    }

    /// Queues work for the writer thread; never blocks. Returns false if the
    /// work was not queued: the connection is closing, or the peer reads so
    /// little that its queue is full, in which case it is disconnected.
    pub fn queue(&self, work: Outbound) -> bool {
        if self.is_closed() {
            return false;
        }
        let refused = match self.budget.take(work.weight()) {
            Err(why) => why,
            Ok(()) => match self.tx.try_send(work) {
                Ok(()) => return true,
                Err(TrySendError::Full(work)) => {
                    self.budget.give_back(work.weight());
                    format!("{QUEUE_LEN} frames wait for it to read")
                }
                Err(TrySendError::Disconnected(work)) => {
                    // The writer has stopped: the connection is dead.
                    self.budget.give_back(work.weight());
                    self.close();
                    return false;
                }
            },
        };
        warn!(target: &self.our_name, "Closing peer={}: {refused}", self.name());
        self.close();
        false
    }

    /// Marks the connection closed and shuts the socket down both ways: the
    /// read loop's next read ends (or its wait for the read half does), a
    /// stream being read fails, and the writer's next write fails.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(Shutdown::Both);
        let _ = self.tx.try_send(Outbound::Close);
        self.close_retiring();
        // Under the lock, so a read loop between its check of `closed` and
        // its wait cannot miss this.
        let _home = lock(&self.home);
        self.came_home.notify_all();
    }

    /// Records the peer's promise: its stores newer than `version` are
    /// pushed to us on this connection. It also shows that the peer has
    /// registered this connection, so the duplicates it won over may go.
    pub fn promise_pushes_from(&self, version: Version) {
        self.pushes_from.store(version.time.max(1), Ordering::SeqCst);
        self.close_retiring();
    }

    /// Closes `duplicate` once the peer has registered this connection
    /// (its promise is in) or this one has closed; at once if either is
    /// so already.
    pub fn retire_when_promised(&self, duplicate: Arc<Transport>) {
        let mut retiring = lock(&self.retiring);
        // Checked under the lock that `close_retiring` takes after setting
        // either flag, so a duplicate is never left behind.
        if self.pushes_from.load(Ordering::SeqCst) == 0 && !self.is_closed() {
            // Those that ended by themselves go: a peer that dials again and
            // again, and never promises, holds only its open duplicates.
            retiring.retain(|retired| !retired.is_closed());
            retiring.push(duplicate);
            return;
        }
        drop(retiring);
        duplicate.close();
    }

    fn close_retiring(&self) {
        let retiring = std::mem::take(&mut *lock(&self.retiring));
        for duplicate in retiring {
            duplicate.close();
        }
    }

    /// Whether the peer promised to push its store at `version` to us (its
    /// own store, made after it registered this connection).
    pub fn pushes(&self, version: Version) -> bool {
        let from = self.pushes_from.load(Ordering::SeqCst);
        version.node == self.id() && from != 0 && version.time > from
    }

    /// Whether a stream is under way on this connection: its read loop
    /// waits for the read half while an actor streams.
    pub fn is_streaming(&self) -> bool {
        self.away.load(Ordering::SeqCst)
    }

    /// Whether the connection is closed, or closing: work for it is moot.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

impl StreamClaim {
    /// Lock transport layer: consumes the claim, and moves the read half
    /// into the returned lock. The bytes that follow are read through it.
    pub fn lock(mut self) -> StreamLock {
        Counters::add(&self.transport.counters.handoffs, 1);
        StreamLock { half: self.half.take(), transport: Arc::clone(&self.transport) }
    }

    /// The connection the bytes arrive on.
    pub fn peer(&self) -> &Arc<Transport> {
        &self.transport
    }
}

impl Drop for StreamClaim {
    /// A claim dropped unlocked sends the read half home with its bytes
    /// still owed: the read loop drains them
    /// ([`Transport::discard_unclaimed_stream`]).
    fn drop(&mut self) {
        if let Some(half) = self.half.take() {
            self.transport.send_home(half);
        }
    }
}

impl Owed for StreamLock {
    fn owed(&self) -> u64 {
        self.half.as_ref().map_or(0, |half| half.owed)
    }
}

impl Read for StreamLock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(half) = self.half.as_mut() else {
            return Ok(0);
        };
        let want = buf.len().min(usize::try_from(half.owed).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        // A failed read leaves the bytes owed, so dropping the lock then
        // closes the connection (see `drop`).
        let n = half.reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed in the middle of a stream",
            ));
        }
        half.owed -= n as u64;
        Counters::add(&self.transport.counters.bytes_received, n as u64);
        Ok(n)
    }
}

impl Drop for StreamLock {
    /// Unlock transport layer. If bytes are left unread (the actor gave up,
    /// or the socket broke), the connection is closed instead of drained:
    /// a sender that trickles could make a drain last for ever.
    fn drop(&mut self) {
        let Some(half) = self.half.take() else {
            return;
        };
        if half.owed > 0 {
            debug!(
                target: &self.transport.our_name,
                "Closing peer={}: a stream ended with {} bytes unread",
                self.transport.name(),
                half.owed
            );
            // The read half is dropped here: the connection is over, and
            // the read loop's wait ends with `Closed`.
            self.transport.close();
            return;
        }
        self.transport.send_home(half);
    }
}

/// The writer thread of one connection: takes [`Outbound`] work off the
/// queue in order and writes it, flushing once per frame (after its stream,
/// if it has one). Returns when the queue closes, on [`Outbound::Close`], or
/// on the first write error; the connection is closed on the way out, which
/// also ends the read loop.
///
/// The writer is the diagrams' transport layer on the sending side, so it
/// logs the arrows that cross the network.
///
/// # Errors
///
/// The write or disk error that ended the loop.
pub(crate) fn write_loop(
    transport: &Transport,
    writer: BufWriter<TcpStream>,
    rx: Receiver<Outbound>,
    store: &Store,
) -> Result<()> {
    let result = write_all_work(transport, writer, rx, store);
    // However the writer stopped, the connection is done: mark it closed,
    // which also ends the read loop.
    transport.close();
    result
}

fn write_all_work(
    transport: &Transport,
    mut writer: BufWriter<TcpStream>,
    rx: Receiver<Outbound>,
    store: &Store,
) -> Result<()> {
    let (me, to) = (transport.our_name.as_str(), transport.name());
    for work in rx {
        transport.budget.give_back(work.weight());
        // The file to stream after the frame, if any. A local file that
        // cannot be opened is this node's problem, not the connection's:
        // it is logged, and the work skipped or answered "not found".
        let (frame, file) = match work {
            Outbound::Frame(frame) => {
                match &frame {
                    Frame::Get { key, .. } => debug!(target: me, "Get File key={key} to={to}"),
                    Frame::Offer { key, size, .. } => {
                        debug!(target: me, "Send metadata (filename, size) key={key} size={size} to={to}");
                    }
                    _ => {}
                }
                (frame, None)
            }
            Outbound::Push { key, version } => match store.open_file(&key) {
                Ok(Some(file)) if file.version() == version => {
                    let (size, sha1) = (file.size(), file.sha1());
                    debug!(target: me, "Send metadata by TCP key={key} size={size} to={to}");
                    (Frame::Store { key, version, size, sha1 }, Some(file))
                }
                Ok(_) => continue, // changed since: the newer change travels itself
                Err(err) => {
                    warn!(target: me, "Not pushing key={key}: {err}");
                    continue;
                }
            },
            Outbound::Reply { request, key, version: wanted, held } => {
                match held.map_or_else(|| store.open_file(&key), |file| Ok(Some(*file))) {
                    Ok(Some(file)) if file.version() >= wanted => {
                        let (version, size, sha1) = (file.version(), file.size(), file.sha1());
                        debug!(target: me, "Streaming key={key} size={size} version={version} to={to}");
                        (Frame::File { request, key, version, size, sha1 }, Some(file))
                    }
                    Ok(_) => (Frame::NotFound { request, key }, None),
                    Err(err) => {
                        warn!(target: me, "Answering not found for key={key}: {err}");
                        (Frame::NotFound { request, key }, None)
                    }
                }
            }
            Outbound::ClearWhenSent(flag) => {
                flag.store(false, Ordering::SeqCst);
                continue;
            }
            Outbound::Close => return Ok(()),
        };
        write_frame(&mut writer, &frame)?;
        // Then exactly `size` bytes of the file, if the frame announces one:
        // the diagrams' "stream file data", right behind the metadata. The
        // receiver checks the SHA-1 itself, so the raw content is sent
        // unhashed. `io::copy` into a `BufWriter` fills the writer's buffer
        // straight from the file.
        if let Some(file) = file {
            let size = frame.stream_len();
            let copied = io::copy(&mut file.into_content(), &mut writer)?;
            if copied != size {
                // The file shrank under us: damaged on disk. The receiver
                // would wait for bytes that never come, so this connection
                // is done.
                return Err(Error::Protocol(format!(
                    "sent {copied} of {size} announced bytes: the local file is damaged"
                )));
            }
            Counters::add(&transport.counters.bytes_sent, size);
        }
        writer.flush()?;
        Counters::add(&transport.counters.frames_sent, 1);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Role;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::thread::JoinHandle;

    /// Long enough for anything that is going to happen on loopback.
    const PATIENCE: Duration = Duration::from_secs(10);

    type Writer = (BufWriter<TcpStream>, Receiver<Outbound>);

    /// A transport over a fresh loopback connection, the other end, and
    /// the write half and queue a writer thread would take.
    fn pair_with_writer() -> (Arc<Transport>, TcpStream, Writer) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let far = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (near, _) = listener.accept().unwrap();
        let hello = Hello {
            role: Role::Peer,
            node: 2,
            name: "far".into(),
            listen_addr: String::new(),
            dialler_nonce: [0; 16],
        };
        let counters = Arc::new(Counters::default());
        let (transport, writer, rx) =
            Transport::new("near", near, hello, false, PATIENCE, counters).unwrap();
        (Arc::new(transport), far, (writer, rx))
    }

    /// A transport with no writer (its queue's receiving end is dropped),
    /// and the other end.
    fn pair() -> (Arc<Transport>, TcpStream) {
        let (transport, far, _writer) = pair_with_writer();
        (transport, far)
    }

    fn store_frame(len: u64) -> Frame {
        Frame::Store {
            key: "k".into(),
            version: Version { time: 1, node: 2 },
            size: len,
            sha1: [0; 20],
        }
    }

    fn clear_frame() -> Frame {
        Frame::Clear { version: Version { time: 3, node: 2 } }
    }

    type Delivered = mpsc::Receiver<(Frame, Option<StreamClaim>)>;

    /// Runs `transport`'s read loop on its own thread; every delivery comes
    /// out of the returned channel.
    fn spawn_read_loop(transport: &Arc<Transport>) -> (Delivered, JoinHandle<Result<()>>) {
        let (tx, rx) = mpsc::channel();
        let reader = Arc::clone(transport);
        let read_loop = std::thread::spawn(move || {
            reader.read_loop(|frame, claim| {
                tx.send((frame, claim)).map_err(|_| Error::Closed)?;
                Ok(())
            })
        });
        (rx, read_loop)
    }

    /// A duplicate waits for the peer's promise on the connection kept;
    /// one that closes meanwhile is let go at the next retirement, so a
    /// peer that keeps dialling, and never promises, grows nothing.
    #[test]
    fn retired_duplicates_wait_for_the_promise_and_closed_ones_are_let_go() {
        let (kept, _far) = pair();
        let mut fars = Vec::new();
        for _ in 0..20 {
            let (duplicate, far) = pair();
            kept.retire_when_promised(Arc::clone(&duplicate));
            assert!(!duplicate.is_closed(), "closed before the promise");
            duplicate.close(); // it ended by itself: its peer hung up
            fars.push(far);
        }
        assert_eq!(lock(&kept.retiring).len(), 1, "closed duplicates were kept");
        let (open, _far) = pair();
        kept.retire_when_promised(Arc::clone(&open));
        kept.promise_pushes_from(Version { time: 5, node: 2 });
        assert!(open.is_closed(), "the promise closes the duplicate");
        assert!(lock(&kept.retiring).is_empty());
    }

    /// The read loop hands the stream, and the read half with it, to
    /// another thread, and reads the next frame only after that thread's
    /// unlock wakes it. Without the hand-off the read loop would parse the
    /// file bytes as a frame; without the wake-up it would wait for ever.
    #[test]
    fn the_read_loop_hands_each_stream_to_its_claimant_and_waits() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(11)).unwrap();
        far.write_all(b"hello world").unwrap();
        write_frame(&mut far, &clear_frame()).unwrap();
        drop(far);
        let (rx, read_loop) = spawn_read_loop(&transport);

        let (frame, claim) = rx.recv_timeout(PATIENCE).unwrap();
        assert_eq!(frame, store_frame(11));
        let claim = claim.expect("a Store frame comes with a claim on its stream");
        let mut stream = claim.lock();
        let mut bytes = Vec::new();
        stream.read_to_end(&mut bytes).unwrap();
        assert_eq!(bytes, b"hello world");
        // The next frame has long arrived, but the read half is ours.
        assert!(rx.try_recv().is_err(), "no frame is read while the stream's lock is held");
        drop(stream);

        let (frame, claim) =
            rx.recv_timeout(PATIENCE).expect("the unlock wakes the read loop, which reads on");
        assert_eq!(frame, clear_frame());
        assert!(claim.is_none());
        read_loop.join().unwrap().unwrap();
        assert_eq!(transport.counters.handoffs.load(Ordering::Relaxed), 1);
        assert_eq!(transport.counters.bytes_received.load(Ordering::Relaxed), 11);
    }

    /// A stream read in many small pieces, slowly, stays whole: the lock
    /// keeps the read half for the stream's whole length, not per read, so
    /// the waiting read loop never gets a turn in between.
    #[test]
    fn the_lock_holds_the_read_half_for_the_whole_stream() {
        let (transport, mut far) = pair();
        // Bytes that do not parse as frames: a read loop that got hold of
        // the connection mid-stream would fail on them.
        let content: Vec<u8> =
            (0..64 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80).collect();
        write_frame(&mut far, &store_frame(content.len() as u64)).unwrap();
        far.write_all(&content).unwrap();
        write_frame(&mut far, &clear_frame()).unwrap();
        drop(far);
        let (rx, read_loop) = spawn_read_loop(&transport);

        let (_, claim) = rx.recv_timeout(PATIENCE).unwrap();
        let mut stream = claim.unwrap().lock();
        let mut got = Vec::new();
        let mut piece = [0u8; 512];
        loop {
            let n = stream.read(&mut piece).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&piece[..n]);
            // Give a read loop that could read a chance to.
            std::thread::yield_now();
        }
        assert!(got == content, "the stream arrived whole and in order");
        drop(stream);
        assert_eq!(rx.recv_timeout(PATIENCE).unwrap().0, clear_frame());
        read_loop.join().unwrap().unwrap();
    }

    /// A claim dropped without locking sends the read half home with the
    /// bytes owed; the read loop discards them and reads on.
    #[test]
    fn an_unclaimed_stream_is_discarded_and_the_read_loop_goes_on() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(5)).unwrap();
        far.write_all(b"bytes").unwrap();
        write_frame(&mut far, &clear_frame()).unwrap();
        drop(far);
        let mut frames = Vec::new();
        transport
            .read_loop(|frame, claim| {
                frames.push(frame);
                drop(claim);
                Ok(())
            })
            .unwrap();
        assert_eq!(frames, [store_frame(5), clear_frame()]);
    }

    /// An actor that gives up halfway closes the connection rather than
    /// wait for the rest: the read loop ends, it does not drain.
    #[test]
    fn a_stream_left_half_read_closes_the_connection() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(8)).unwrap();
        far.write_all(b"1234").unwrap(); // and the rest never comes
        let (rx, read_loop) = spawn_read_loop(&transport);
        let (_, claim) = rx.recv_timeout(PATIENCE).unwrap();
        let mut stream = claim.unwrap().lock();
        let mut half = [0u8; 4];
        stream.read_exact(&mut half).unwrap();
        assert_eq!(stream.owed(), 4);
        drop(stream);
        assert!(transport.is_closed());
        assert!(matches!(read_loop.join().unwrap(), Err(Error::Closed)));
        drop(far);
    }

    /// A queue whose writer has gone is a dead connection: queueing to it
    /// marks it closed, so nobody waits on it.
    #[test]
    fn a_queue_without_its_writer_marks_the_connection_closed() {
        let (transport, _far) = pair(); // `pair` drops the writer's queue end
        assert!(!transport.is_closed());
        assert!(!transport.queue(Outbound::Frame(Frame::Ping)));
        assert!(transport.is_closed());
    }

    /// A writer that stops, here on a write error, marks the connection
    /// closed on its way out.
    #[test]
    fn a_writer_that_fails_marks_the_connection_closed() {
        let (transport, far, (writer, rx)) = pair_with_writer();
        let root = std::env::temp_dir().join(format!(
            "gossipfs-writer-{}-{}",
            std::process::id(),
            transport.conn
        ));
        let store = Store::open("near", &root, false).unwrap();
        // The far end goes away: the writer's writes fail, soon if not at once.
        drop(far);
        let writing = Arc::clone(&transport);
        let writer = std::thread::spawn(move || write_loop(&writing, writer, rx, &store));
        // Straight into the channel, not through `queue`, which would close
        // the connection itself on finding the writer gone.
        while transport.tx.send(Outbound::Frame(Frame::Ping)).is_ok() {
            std::thread::yield_now();
        }
        assert!(writer.join().unwrap().is_err(), "the writer stopped on a write error");
        assert!(transport.is_closed());
        let _ = std::fs::remove_dir_all(root);
    }

    /// Closing a connection wakes a read loop that waits for a read half
    /// whose holder will never give it back.
    #[test]
    fn closing_wakes_a_read_loop_waiting_for_its_read_half() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(3)).unwrap();
        far.write_all(b"abc").unwrap();
        let (rx, read_loop) = spawn_read_loop(&transport);
        let (_, claim) = rx.recv_timeout(PATIENCE).unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        std::thread::spawn(move || done_tx.send(read_loop.join().unwrap()));
        // Parked for real, past its check of `closed`: only a wake-up ends it.
        let deadline = std::time::Instant::now() + PATIENCE;
        while !transport.parked.load(Ordering::SeqCst) {
            assert!(std::time::Instant::now() < deadline, "the read loop never parked");
            std::thread::yield_now();
        }
        transport.close();
        let ended = done_rx.recv_timeout(PATIENCE).expect("close wakes the waiting read loop");
        assert!(matches!(ended, Err(Error::Closed)));
        drop(claim);
        drop(far);
    }
}
