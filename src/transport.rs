//! The transport layer: one TCP connection to a peer, the "TL1" and "TL2"
//! of the two sequence diagrams.
//!
//! A connection is split with `try_clone` into a read half and a write half,
//! and each half has its own rules.
//!
//! # The read half and its lock
//!
//! The read half sits behind a `Mutex`: the **transport lock** the diagrams
//! draw. Two actors take turns holding it.
//!
//! 1. The connection's **read loop** ([`Transport::read_loop`]) holds it to
//!    read one frame, then lets go and delivers the frame to the actor the
//!    diagram names (the node's handler for a store, the thread that called
//!    `get` for a file it asked for).
//! 2. If the frame announces file data (metadata: key, version, size,
//!    SHA-1), exactly `size` raw bytes follow it on the wire. They belong to
//!    that actor, not to the read loop. The frame travels with a
//!    [`StreamClaim`]; the actor calls [`StreamClaim::lock`] ("lock
//!    transport layer"), streams exactly `size` bytes, and drops the
//!    [`StreamLock`] ("unlock transport layer").
//! 3. Meanwhile the read loop **waits** on a `Condvar` until the stream is
//!    consumed, then reads the next frame: a pause while another actor
//!    owns the connection's bytes, resumed by that actor's unlock.
//!
//! The read loop never consumes a stream itself, with one named exception:
//! a claim dropped without being locked (a `get` that timed out, a node
//! shutting down) is **unclaimed**, and the read loop drains those bytes in
//! [`Transport::discard_unclaimed_stream`], with a log line, so that a stream nobody
//! wants never wedges the connection.
//!
//! ```text
//!   read loop (TL)                 actor (Peer or Server)
//!   lock; read frame; unlock
//!   deliver(frame, claim) ───────> claim.lock()       "Lock transport layer"
//!   wait until stream consumed     read `size` bytes  "Stream file data"
//!        ...                       drop(lock)         "Unlock transport layer"
//!   <──────────────── notify ──────┘
//!   lock; read next frame ...
//! ```
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
//! `limits`; no item holds file content or an open file), so a peer that
//! stops reading cannot grow this node's memory: once its queue is full, it
//! is disconnected.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use log::{debug, warn};

use crate::config::Counters;
use crate::corruption::FileReader;
use crate::error::{Error, Result, lock};
use crate::frame::{Frame, read_frame, write_frame};
use crate::handshake::Hello;
use crate::limits::QueueBudget;
use crate::liveness::Silence;
use crate::store::{STREAM_BUFFER_LEN, Store};
use crate::version::{NodeId, Version, wall_millis};

/// How many items a peer's writer queue holds. A peer that reads so little
/// that this many frames wait for it is disconnected.
pub(crate) const QUEUE_LEN: usize = 4096;

/// How often a read loop waiting for a stream's holder looks whether the
/// connection was closed meanwhile.
const CLOSED_POLL_INTERVAL: Duration = Duration::from_millis(100);

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
    Push {
        /// The key.
        key: String,
        /// The version being pushed.
        version: Version,
    },
    /// Diagram 2: answer a [`Frame::Get`] with a [`Frame::File`] and the
    /// bytes of our file for `key`, or a [`Frame::NotFound`] if it is gone
    /// by the time the reply's turn comes. The file is opened here, by the
    /// writer, so a queue of replies holds keys, not open files.
    Reply {
        /// The request being answered.
        request: u64,
        /// The key asked for.
        key: String,
    },
    /// Not a frame: the writer clears this flag when it gets here, that is,
    /// once everything queued before it has been written.
    Written(Arc<AtomicBool>),
    /// Close the connection.
    Close,
}

/// The read half and the state of its hand-off. Guarded by the transport
/// lock.
struct ReadHalf {
    /// The socket's read side, buffered.
    reader: BufReader<Silence<TcpStream>>,
    /// Bytes of the last frame's stream still unread.
    owed: u64,
    /// Set while a [`StreamClaim`] is out: the stream belongs to the actor
    /// it went to, and the read loop waits. Cleared by the claim's unlock,
    /// or by dropping the claim unlocked.
    claim_out: bool,
    /// Set while the read loop is parked waiting for a hand-off (for tests).
    waiting: bool,
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
    /// When the connection opened, in wall-clock milliseconds: a store made
    /// before then was not pushed on it.
    pub opened_millis: u64,
    /// The transport lock: the read half, held by the read loop for one
    /// frame and by a stream's consumer for that stream.
    read_half: Mutex<ReadHalf>,
    /// Signalled when a stream's consumer unlocks, or gives up its claim.
    handed_back: Condvar,
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

/// The right to stream the file bytes that follow one frame. The read loop
/// hands it over with the frame; see the module doc.
pub(crate) struct StreamClaim {
    /// The connection the bytes arrive on.
    transport: Arc<Transport>,
    /// Set once [`StreamClaim::lock`] was called.
    locked: bool,
}

/// The transport lock, held for one stream: reads at most the bytes still
/// owed. Dropping it unlocks the transport and wakes the read loop.
pub(crate) struct StreamLock<'a> {
    /// The read half.
    half: MutexGuard<'a, ReadHalf>,
    /// Set when a read failed (the socket broke, or the sender went silent
    /// past the heartbeat timeout): nothing more is worth reading.
    broken: bool,
    /// The connection, to signal the unlock.
    transport: &'a Transport,
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
        let reader = BufReader::with_capacity(STREAM_BUFFER_LEN, Silence(stream.try_clone()?));
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE_LEN);
        let transport = Transport {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            addr: stream.peer_addr()?,
            peer,
            outbound,
            opened_millis: wall_millis(),
            read_half: Mutex::new(ReadHalf { reader, owed: 0, claim_out: false, waiting: false }),
            handed_back: Condvar::new(),
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
    /// at a time and hands it to `deliver`, with a [`StreamClaim`] if the
    /// frame announces file data. Before reading the next frame it waits
    /// until that stream has been consumed by whoever holds the claim.
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
        loop {
            let mut half = lock(&self.read_half);
            if half.claim_out {
                // The stream of the last frame belongs to its claim's
                // holder: wait for its unlock.
                half.waiting = true;
                while half.claim_out {
                    // A connection closed meanwhile (shutdown, a dead peer)
                    // ends the wait: its stream's holder may never unlock.
                    if self.is_closed() {
                        return Err(Error::Closed);
                    }
                    let waited = self.handed_back.wait_timeout(half, CLOSED_POLL_INTERVAL);
                    half = waited.unwrap_or_else(std::sync::PoisonError::into_inner).0;
                }
                half.waiting = false;
            }
            if half.owed > 0 {
                self.discard_unclaimed_stream(&mut half)?;
            }
            let Some(frame) = read_frame(&mut half.reader)? else {
                return Ok(());
            };
            // A file's metadata hands its stream on, even an empty one: the
            // actor's lock and unlock are steps of the diagram either way.
            let has_stream = matches!(frame, Frame::Store { .. } | Frame::File { .. });
            half.owed = frame.stream_len();
            half.claim_out = has_stream;
            // Let go of the read half before delivering: its next holder
            // may be the actor the frame goes to.
            drop(half);
            let claim =
                has_stream.then(|| StreamClaim { transport: Arc::clone(self), locked: false });
            deliver(frame, claim)?;
        }
    }

    /// The one stream the read loop consumes itself: one whose claim was
    /// dropped unlocked, because the actor it was meant for had gone.
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
        let refused = match self.budget.take(&work) {
            Err(why) => why,
            Ok(()) => match self.tx.try_send(work) {
                Ok(()) => return true,
                Err(TrySendError::Full(work)) => {
                    self.budget.give_back(&work);
                    format!("{QUEUE_LEN} frames wait for it to read")
                }
                Err(TrySendError::Disconnected(work)) => {
                    self.budget.give_back(&work);
                    return false;
                }
            },
        };
        warn!(target: &self.our_name, "Closing peer={}: {refused}", self.name());
        self.close();
        false
    }

    /// Shuts the socket down both ways: the read loop's next read ends, a
    /// stream being read fails, and the writer's next write fails.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        let _ = self.socket.shutdown(Shutdown::Both);
        let _ = self.tx.try_send(Outbound::Close);
    }

    /// Whether the connection is closed, or closing: work for it is moot.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }
}

impl StreamClaim {
    /// Lock transport layer: takes the connection's read half for this
    /// stream. The bytes that follow are read through the returned lock.
    pub fn lock(&mut self) -> StreamLock<'_> {
        self.locked = true;
        Counters::add(&self.transport.counters.handoffs, 1);
        let half = lock(&self.transport.read_half);
        StreamLock { half, broken: false, transport: &self.transport }
    }

    /// The connection the bytes arrive on.
    pub fn peer(&self) -> Arc<Transport> {
        Arc::clone(&self.transport)
    }
}

impl Drop for StreamClaim {
    /// A claim dropped unlocked gives the stream back: the read loop drains
    /// it ([`Transport::discard_unclaimed_stream`]).
    fn drop(&mut self) {
        if !self.locked {
            lock(&self.transport.read_half).claim_out = false;
            self.transport.handed_back.notify_all();
        }
    }
}

impl Read for StreamLock<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf.len().min(usize::try_from(self.half.owed).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let n = self.half.reader.read(&mut buf[..want]).inspect_err(|_| self.broken = true)?;
        if n == 0 {
            self.broken = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the connection closed in the middle of a stream",
            ));
        }
        self.half.owed -= n as u64;
        Counters::add(&self.transport.counters.bytes_received, n as u64);
        Ok(n)
    }
}

impl Drop for StreamLock<'_> {
    /// Unlock transport layer. Bytes the consumer left unread (it failed
    /// halfway, on its disk say) are drained first, so the next frame starts
    /// where it should. If the connection itself failed, or the drain does,
    /// the connection is closed instead: a silent sender is not waited for
    /// twice.
    fn drop(&mut self) {
        if self.half.owed > 0 && (self.broken || io::copy(self, &mut io::sink()).is_err()) {
            let _ = self.transport.socket.shutdown(Shutdown::Both);
            self.half.owed = 0;
        }
        self.half.claim_out = false;
        self.transport.handed_back.notify_all();
    }
}

/// The writer thread of one connection: takes [`Outbound`] work off the
/// queue in order and writes it, flushing once per frame (after its stream,
/// if it has one). Returns when the queue closes, on [`Outbound::Close`], or
/// on the first write error; the socket is shut down on the way out, which
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
    mut writer: BufWriter<TcpStream>,
    rx: Receiver<Outbound>,
    store: &Store,
) -> Result<()> {
    let result = write_all_work(transport, &mut writer, rx, store);
    let _ = writer.get_ref().shutdown(Shutdown::Both);
    result
}

fn write_all_work(
    transport: &Transport,
    writer: &mut BufWriter<TcpStream>,
    rx: Receiver<Outbound>,
    store: &Store,
) -> Result<()> {
    let (me, to) = (transport.our_name.as_str(), transport.name());
    for work in rx {
        transport.budget.give_back(&work);
        // The file to stream after the frame, if any. A local file that
        // cannot be opened is this node's problem, not the connection's:
        // it is logged, and the work skipped or answered "not found".
        let (frame, file) = match work {
            Outbound::Frame(frame) => {
                if let Frame::Get { key, .. } = &frame {
                    debug!(target: me, "Get File key={key} to={to}");
                }
                (frame, None)
            }
            Outbound::Push { key, version } => match store.open_file(&key) {
                Ok(Some(file)) if file.entry().version == version => {
                    let (size, sha1) = (file.size(), file.entry().sha1);
                    debug!(target: me, "Send metadata by TCP key={key} size={size} to={to}");
                    (Frame::Store { key, version, size, sha1 }, Some(file))
                }
                Ok(_) => continue, // changed since: the newer change travels itself
                Err(err) => {
                    warn!(target: me, "Not pushing key={key}: {err}");
                    continue;
                }
            },
            Outbound::Reply { request, key } => match store.open_file(&key) {
                Ok(Some(file)) => {
                    let entry = file.entry().clone();
                    debug!(target: me, "Send metadata (filename, size) key={key} size={} to={to}", entry.size);
                    let (version, size, sha1) = (entry.version, entry.size, entry.sha1);
                    (Frame::File { request, key, version, size, sha1 }, Some(file))
                }
                Ok(None) => (Frame::NotFound { request, key }, None),
                Err(err) => {
                    warn!(target: me, "Answering not found for key={key}: {err}");
                    (Frame::NotFound { request, key }, None)
                }
            },
            Outbound::Written(flag) => {
                flag.store(false, Ordering::SeqCst);
                continue;
            }
            Outbound::Close => return Ok(()),
        };
        write_frame(writer, &frame)?;
        if let Some(file) = file {
            stream_file(writer, frame.stream_len(), file, &transport.counters)?;
        }
        writer.flush()?;
        Counters::add(&transport.counters.frames_sent, 1);
    }
    Ok(())
}

/// Writes exactly `size` bytes of `file` after its frame: the diagrams'
/// "stream file data", leaving the sender right behind the metadata.
fn stream_file(
    writer: &mut BufWriter<TcpStream>,
    size: u64,
    file: FileReader,
    counters: &Counters,
) -> Result<()> {
    // The receiver checks the SHA-1 itself, so the raw content is sent
    // unhashed. `io::copy` into a `BufWriter` fills the writer's buffer
    // straight from the file.
    let copied = io::copy(&mut file.into_content(), writer)?;
    if copied != size {
        // The file shrank under us: damaged on disk. The receiver would wait
        // for bytes that never come, so this connection is done.
        return Err(Error::Protocol(format!(
            "sent {copied} of {size} announced bytes: the local file is damaged"
        )));
    }
    Counters::add(&counters.bytes_sent, size);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Role;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::time::Instant;

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A transport over a fresh loopback connection, and the other end.
    fn pair() -> (Arc<Transport>, TcpStream) {
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
        let (transport, _writer, _rx) =
            Transport::new("near", near, hello, false, Duration::from_secs(10), counters).unwrap();
        (Arc::new(transport), far)
    }

    fn store_frame(len: u64) -> Frame {
        Frame::Store {
            key: "k".into(),
            version: Version { time: 1, node: 2 },
            size: len,
            sha1: [0; 20],
        }
    }

    /// The read loop hands the stream to another thread and waits for its
    /// unlock before it reads the next frame. Without the hand-off the read
    /// loop would parse the file bytes as a frame; without the lock the
    /// other thread could not read them at all.
    #[test]
    fn the_read_loop_hands_each_stream_to_its_claimant_and_waits() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(11)).unwrap();
        far.write_all(b"hello world").unwrap();
        write_frame(&mut far, &Frame::Clear { version: Version { time: 3, node: 2 } }).unwrap();
        drop(far);

        let (tx, rx) = mpsc::channel();
        let reader = Arc::clone(&transport);
        let read_loop = std::thread::spawn(move || {
            reader.read_loop(|frame, claim| {
                tx.send((frame, claim)).unwrap();
                Ok(())
            })
        });

        let (frame, claim) = rx.recv().unwrap();
        assert_eq!(frame, store_frame(11));
        let mut claim = claim.expect("a Store frame comes with a claim on its stream");
        wait_until("the read loop to wait for the hand-off", || lock(&transport.read_half).waiting);
        assert!(rx.try_recv().is_err(), "no frame is read while the stream is owed");

        let mut bytes = Vec::new();
        let mut stream = claim.lock();
        stream.read_to_end(&mut bytes).unwrap();
        drop(stream);
        assert_eq!(bytes, b"hello world");

        let (frame, claim) = rx.recv().unwrap();
        assert_eq!(frame, Frame::Clear { version: Version { time: 3, node: 2 } });
        assert!(claim.is_none());
        read_loop.join().unwrap().unwrap();
        assert_eq!(transport.counters.handoffs.load(Ordering::Relaxed), 1);
        assert_eq!(transport.counters.bytes_received.load(Ordering::Relaxed), 11);
    }

    /// A claim dropped without locking gives the stream back to the read
    /// loop, which discards it and reads on: nobody's absence wedges it.
    #[test]
    fn an_unclaimed_stream_is_discarded_and_the_read_loop_goes_on() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(5)).unwrap();
        far.write_all(b"bytes").unwrap();
        write_frame(&mut far, &Frame::Clear { version: Version { time: 3, node: 2 } }).unwrap();
        drop(far);
        let mut frames = Vec::new();
        transport
            .read_loop(|frame, claim| {
                frames.push(frame);
                drop(claim);
                Ok(())
            })
            .unwrap();
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[1], Frame::Clear { version: Version { time: 3, node: 2 } });
    }

    /// A consumer that reads half the stream and gives up leaves the rest
    /// to be drained at unlock: the next frame is still read whole.
    #[test]
    fn a_half_read_stream_is_drained_at_unlock() {
        let (transport, mut far) = pair();
        write_frame(&mut far, &store_frame(8)).unwrap();
        far.write_all(b"12345678").unwrap();
        write_frame(&mut far, &Frame::Clear { version: Version { time: 3, node: 2 } }).unwrap();
        drop(far);
        let mut frames = Vec::new();
        transport
            .read_loop(|frame, claim| {
                if let Some(mut claim) = claim {
                    let mut stream = claim.lock();
                    let mut half = [0u8; 4];
                    stream.read_exact(&mut half).unwrap();
                    assert_eq!(stream.half.owed, 4);
                }
                frames.push(frame);
                Ok(())
            })
            .unwrap();
        assert_eq!(frames[1], Frame::Clear { version: Version { time: 3, node: 2 } });
    }
}
