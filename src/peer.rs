//! One TCP connection to another gossipfs process, once its handshake
//! (in `handshake`) has said who is at the other end: the read side behind
//! its lock, and the write side owned by one writer thread.
//!
//! # The two halves of a connection
//!
//! A connection is split with `try_clone` into a read half and a write half,
//! and each half has exactly one owner:
//!
//! - The **read half** sits behind the peer's *transport lock*
//!   ([`Peer::read_next`]). Whoever holds it reads one frame and, if the frame
//!   announces file data, exactly that many bytes after it — the sequence
//!   diagrams' "lock transport layer … stream file data … unlock transport
//!   layer". The connection's reader thread (in `server`) is the only caller:
//!   it takes the lock, waits for the next frame, and keeps the lock until
//!   that frame's stream is consumed. No other thread ever takes it, so the
//!   wait costs no one; the lock is there to make the diagram's step a real,
//!   visible step, and to guarantee that no one reads between a frame and its
//!   stream.
//!
//! - The **write half** belongs to the peer's writer thread ([`write_loop`]),
//!   fed by a channel of [`Outbound`] items. Everyone else — the reader
//!   thread answering a `Get`, the API relaying a store, the anti-entropy
//!   timer — only queues work. **A reader thread never writes to a socket.**
//!   If it did, two nodes streaming large files to each other would each sit
//!   in `write` waiting for the other to read, with both TCP buffers full,
//!   forever. With a separate writer, each side's reader keeps draining its
//!   socket while its writer is blocked.

use std::io::{self, BufReader, BufWriter, Read, Take, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;

use log::{debug, warn};

use crate::error::{Error, Result, lock};
use crate::frame::{Frame, read_frame, write_frame};
use crate::handshake::Hello;
use crate::store::{STREAM_BUFFER_LEN, Store};
use crate::version::{NodeId, Version};

/// How long a write may block before the connection is given up: a peer
/// that reads nothing for this long is stuck or gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Work for a peer's writer thread.
#[derive(Debug)]
pub enum Outbound {
    /// Send this frame.
    Frame(Frame),
    /// Gossip the file held for `key`: a [`Frame::Store`] and its bytes.
    /// `version` is the change being relayed; if the store has moved on to a
    /// newer version by the time the writer gets here, the newer one is sent
    /// (it is a change in its own right), and if the key has since been
    /// deleted, nothing is (the delete travels on its own).
    Store {
        /// The key.
        key: String,
        /// The version being relayed.
        version: Version,
    },
    /// Answer a [`Frame::Get`]: a [`Frame::File`] and its bytes, or a
    /// [`Frame::NotFound`] if the store holds no live file for `key`.
    File {
        /// The request being answered.
        request: u64,
        /// The key asked for.
        key: String,
    },
    /// A marker, not a frame: the writer clears this flag when it gets here,
    /// that is, once everything queued before it has been written. Lets the
    /// queue's producers keep at most one of something in flight.
    Written(Arc<AtomicBool>),
    /// Close the connection.
    Close,
}

/// One connected peer (or client): its identity, its transport lock and the
/// queue to its writer thread.
pub struct Peer {
    /// Unique per connection in this process, so a connection that was
    /// replaced is not mistaken for its replacement.
    pub conn: u64,
    /// What the peer said about itself in the handshake.
    pub hello: Hello,
    /// The socket address at the other end.
    pub addr: SocketAddr,
    /// True if we dialled it, false if it dialled us. Decides which of two
    /// simultaneous connections between the same nodes survives.
    pub outbound: bool,
    /// The read half: the "transport layer" that the diagrams lock.
    reader: Mutex<BufReader<TcpStream>>,
    /// The queue to this peer's writer thread.
    tx: Sender<Outbound>,
    /// A handle on the socket, to shut it down from any thread.
    socket: TcpStream,
    /// Set while an anti-entropy digest for this peer waits in the queue or
    /// is being written: one at a time, however many summaries the peer
    /// sends (each digest is a copy of the whole index).
    pub digest_in_flight: Arc<AtomicBool>,
    /// The name of *our* node, which every log line starts with.
    node: String,
}

/// The file bytes that follow a frame, as [`Peer::read_next`] hands them to
/// its handler: the connection's reader, limited to the announced size.
/// `limit()` says how many are still unread.
pub type Stream<'a> = Take<&'a mut BufReader<TcpStream>>;

/// Numbers connections.
static NEXT_CONN: AtomicU64 = AtomicU64::new(1);

impl Peer {
    /// Wraps a connection that has completed its handshake. Returns the
    /// peer, plus the write half and the queue's receiving end, which the
    /// caller hands to a writer thread running [`write_loop`].
    ///
    /// `node` is our node's name, for the logs. `idle_timeout` becomes the socket's read timeout: a peer that sends
    /// nothing for that long — not even the periodic anti-entropy summary —
    /// is taken for dead, and a stream that stalls that long is abandoned.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned or configured.
    pub fn new(
        node: &str,
        stream: TcpStream,
        hello: Hello,
        outbound: bool,
        idle_timeout: Duration,
    ) -> Result<(Peer, BufWriter<TcpStream>, Receiver<Outbound>)> {
        stream.set_read_timeout(Some(idle_timeout))?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
        // Frames are flushed whole; Nagle would only delay small ones.
        stream.set_nodelay(true)?;
        let addr = stream.peer_addr()?;
        let writer = BufWriter::with_capacity(STREAM_BUFFER_LEN, stream.try_clone()?);
        let reader = BufReader::with_capacity(STREAM_BUFFER_LEN, stream.try_clone()?);
        let (tx, rx) = std::sync::mpsc::channel();
        let peer = Peer {
            conn: NEXT_CONN.fetch_add(1, Ordering::Relaxed),
            hello,
            addr,
            outbound,
            reader: Mutex::new(reader),
            tx,
            socket: stream,
            node: node.to_string(),
            digest_in_flight: Arc::new(AtomicBool::new(false)),
        };
        Ok((peer, writer, rx))
    }

    /// The peer's node id.
    pub fn id(&self) -> NodeId {
        self.hello.node
    }

    /// The peer's name.
    pub fn name(&self) -> &str {
        &self.hello.name
    }

    /// Queues work for the writer thread. Never blocks. If the writer has
    /// gone (the connection is closing), the work is dropped: anti-entropy
    /// repairs whatever a dead connection failed to carry.
    pub fn queue(&self, work: Outbound) {
        let _ = self.tx.send(work);
    }

    /// Reads the next frame under the transport lock and hands it to
    /// `handle`, together with a reader limited to the bytes that follow it
    /// ([`Frame::stream_len`], none for most frames).
    ///
    /// This is the diagrams' "lock transport layer … unlock transport
    /// layer": the lock is taken before the frame is read and released only
    /// after every byte of its stream has been consumed. Whatever `handle`
    /// leaves unread of the stream (it failed halfway, or it did not want the
    /// file) is drained here, so the next frame starts where it should.
    ///
    /// Returns `Ok(None)` when the peer closed the connection cleanly.
    ///
    /// # Errors
    ///
    /// Whatever reading the frame or draining the stream returns (the
    /// connection is then unusable), else whatever `handle` returns.
    pub fn read_next<T>(
        &self,
        handle: impl FnOnce(Frame, &mut Stream<'_>) -> Result<T>,
    ) -> Result<Option<T>> {
        let mut transport = lock(&self.reader);
        let Some(frame) = read_frame(&mut *transport)? else {
            return Ok(None);
        };
        let stream_len = frame.stream_len();
        if stream_len > 0 {
            debug!(
                target: &self.node,
                "Locked transport layer peer={} bytes={stream_len}",
                self.name()
            );
        }
        let mut stream = (&mut *transport).take(stream_len);
        let result = handle(frame, &mut stream);
        // A handler that failed with bytes left unread (a broken stream, a
        // frame a peer may not send) ends the connection: nothing to drain.
        if result.is_err() && stream.limit() > 0 {
            return result.map(Some);
        }
        if stream.limit() > 0 {
            io::copy(&mut stream, &mut io::sink())?;
            if stream.limit() > 0 {
                return Err(Error::Protocol(format!(
                    "the connection closed with {} bytes of a stream unread",
                    stream.limit()
                )));
            }
        }
        // Unlock transport layer: the frame and its stream are consumed.
        drop(transport);
        if stream_len > 0 {
            debug!(target: &self.node, "Unlocked transport layer peer={}", self.name());
        }
        result.map(Some)
    }

    /// Shuts the socket down both ways: the reader thread's next read ends
    /// and the writer thread's next write fails, so both threads finish.
    pub fn close(&self) {
        let _ = self.socket.shutdown(Shutdown::Both);
        self.queue(Outbound::Close);
    }
}

/// Counts of frames moved, shared by all of a node's connections.
#[derive(Debug, Default)]
pub struct Traffic {
    /// Frames written to any socket.
    pub frames_sent: AtomicU64,
    /// Content bytes streamed after frames.
    pub bytes_sent: AtomicU64,
}

/// The writer thread of one connection (`node` is our node's name, for the
/// logs): takes [`Outbound`] work off the
/// queue in order and writes it, flushing once per frame (after its stream,
/// if it has one). Returns when the queue closes, on [`Outbound::Close`], or
/// on the first write error; in every case the socket is shut down on the way
/// out, which also ends the connection's reader thread.
///
/// # Errors
///
/// The write or disk error that ended the loop.
pub fn write_loop(
    mut writer: BufWriter<TcpStream>,
    rx: Receiver<Outbound>,
    store: &Store,
    traffic: &Traffic,
    node: &str,
) -> Result<()> {
    let result = write_all_work(&mut writer, rx, store, traffic, node);
    let _ = writer.get_ref().shutdown(Shutdown::Both);
    result
}

fn write_all_work(
    writer: &mut BufWriter<TcpStream>,
    rx: Receiver<Outbound>,
    store: &Store,
    traffic: &Traffic,
    node: &str,
) -> Result<()> {
    for work in rx {
        match work {
            Outbound::Frame(frame) => send_counted(writer, &frame, traffic)?,
            // A local file that cannot be opened is this node's problem, not
            // the connection's: log it and go on with the next work.
            Outbound::Store { key, version } => match store.open_file(&key) {
                Ok(Some(file)) => {
                    let entry = file.entry().clone();
                    let header = Frame::Store {
                        key,
                        version: entry.version,
                        size: entry.size,
                        sha1: entry.sha1,
                    };
                    write_with_stream(writer, &header, file.into_content(), traffic)?;
                }
                Ok(None) => {
                    debug!(target: node, "Not relaying key={key} version={version}: deleted since")
                }
                Err(err) => warn!(target: node, "Not relaying key={key}: {err}"),
            },
            Outbound::File { request, key } => match store.open_file(&key) {
                Ok(Some(file)) => {
                    let entry = file.entry().clone();
                    let header = Frame::File {
                        request,
                        key,
                        version: entry.version,
                        size: entry.size,
                        sha1: entry.sha1,
                    };
                    write_with_stream(writer, &header, file.into_content(), traffic)?;
                }
                Ok(None) => send_counted(writer, &Frame::NotFound { request, key }, traffic)?,
                Err(err) => {
                    warn!(target: node, "Answering not found for key={key}: {err}");
                    send_counted(writer, &Frame::NotFound { request, key }, traffic)?;
                }
            },
            Outbound::Written(flag) => flag.store(false, Ordering::SeqCst),
            Outbound::Close => return Ok(()),
        }
    }
    Ok(())
}

/// Writes and flushes one frame that has no stream.
fn send_counted(writer: &mut impl Write, frame: &Frame, traffic: &Traffic) -> Result<()> {
    write_frame(writer, frame)?;
    writer.flush()?;
    traffic.frames_sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Writes a frame that announces file data, then the data: the diagrams'
/// "send metadata (filename, size)" and "stream file data".
fn write_with_stream(
    writer: &mut BufWriter<TcpStream>,
    header: &Frame,
    mut content: impl Read,
    traffic: &Traffic,
) -> Result<()> {
    let size = header.stream_len();
    write_frame(writer, header)?;
    // `io::copy` into a `BufWriter` reads straight into the writer's 256 KiB
    // buffer, so the file goes out in 256 KiB sends (measured with strace:
    // 4,101 sends for 1 GiB). It is not zero-copy: std does not sendfile
    // from a file into a socket behind `Take`, and the content must stay
    // behind `Take` so a file that grew is never over-sent.
    let copied = io::copy(&mut content, writer)?;
    if copied != size {
        // The file shrank under us: it is damaged on disk. The receiver
        // would wait for bytes that never come, so this connection is done.
        return Err(Error::Protocol(format!(
            "sent {copied} of {size} announced bytes: the local file is damaged"
        )));
    }
    writer.flush()?;
    traffic.frames_sent.fetch_add(1, Ordering::Relaxed);
    traffic.bytes_sent.fetch_add(size, Ordering::Relaxed);
    Ok(())
}
