//! One TCP connection to another gossipfs process: the handshake, the read
//! side behind its lock, and the write side owned by one writer thread.
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
//!
//! # Handshake
//!
//! Both sides send [`Frame::Hello`] at once, without waiting for the other,
//! then read the other's: magic, protocol version, role, node id, name,
//! listen address, a fresh nonce. If both sides have a cluster secret, each
//! then sends [`Frame::Auth`]: HMAC-SHA1 over its side (dialler or acceptor)
//! and both nonces ([`auth_proof`]), and checks the other's proof in
//! constant time. If only one side has a secret, the connection is refused.
//! The whole handshake has one deadline ([`HANDSHAKE_TIMEOUT`]). A failure
//! is answered with [`Frame::Error`] before the connection closes.

use std::io::{self, BufReader, BufWriter, Read, Take, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::time::Duration;
use std::time::Instant;

use log::{debug, warn};
use sha1::{Digest, Sha1};

use crate::error::{Error, Result, lock};
use crate::frame::{
    ErrorCode, Frame, MAGIC, Nonce, PROTOCOL_VERSION, Role, Sha1Digest, read_frame,
    read_frame_within, write_frame,
};
use crate::store::{STREAM_BUFFER_LEN, Store};
use crate::version::{NodeId, Version};

/// How long the other side has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a write may block before the connection is given up: a peer
/// that reads nothing for this long is stuck or gone.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest handshake frame accepted: a Hello carries two short strings,
/// so nothing honest comes near this, and a stranger cannot make the node
/// read a megabyte before it has proved anything.
pub const MAX_HANDSHAKE_FRAME_LEN: u32 = 4096;

/// The longest node name accepted in a Hello, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// What we learned about the other side in the handshake.
#[derive(Clone, Debug)]
pub struct Hello {
    /// Node or client.
    pub role: Role,
    /// Its node id (0 for a client).
    pub node: NodeId,
    /// Its name, for logs.
    pub name: String,
    /// The address it accepts connections on (empty for a client).
    pub listen_addr: String,
    /// The nonce the dialling side sent: random, and known to both ends,
    /// so both can break a tie between two connections the same way.
    pub dialler_nonce: Nonce,
}

/// Who we are, for our side of the handshake.
#[derive(Clone, Debug)]
pub struct Identity {
    /// Node or client.
    pub role: Role,
    /// Our node id (0 for a client).
    pub node: NodeId,
    /// Our name.
    pub name: String,
    /// Our listen address (empty for a client).
    pub listen_addr: String,
    /// The cluster secret, if the cluster has one.
    pub secret: Option<Vec<u8>>,
}

/// Runs the handshake on a fresh connection (see the module doc) and
/// returns what the other side said about itself.
///
/// `outbound` says whether we dialled. The reads share one deadline,
/// [`HANDSHAKE_TIMEOUT`], set as the socket's read timeout before each; the
/// caller sets the timeouts it wants afterwards.
///
/// # Errors
///
/// [`Error::Protocol`] for a bad magic, version or frame;
/// [`Error::Unauthorized`] if either side fails to prove the secret;
/// [`Error::Timeout`] if the other side is too slow. The other side is sent
/// an [`Frame::Error`] saying why, where that makes sense.
pub fn handshake(stream: &TcpStream, me: &Identity, outbound: bool) -> Result<Hello> {
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    // Read the handshake unbuffered: `read_frame` takes exactly the bytes of
    // each frame, so whatever the other side sends right after its last
    // handshake frame stays in the socket for the connection's reader. (A
    // `BufReader` here would swallow those bytes and drop them with itself.)
    // The deadline is for the whole handshake, not each read, so a peer that
    // dribbles a byte at a time cannot hold a connection slot for long.
    let mut reader = Deadline {
        stream,
        until: Instant::now() + HANDSHAKE_TIMEOUT,
    };
    let mut writer = BufWriter::new(stream);

    // Both sides speak first: Hello is small, so neither blocks.
    let my_nonce: Nonce = crate::random_bytes();
    send(
        &mut writer,
        &Frame::Hello {
            magic: MAGIC,
            protocol: PROTOCOL_VERSION,
            role: me.role,
            node: me.node,
            name: me.name.clone(),
            listen_addr: me.listen_addr.clone(),
            nonce: my_nonce,
            auth: me.secret.is_some(),
        },
    )?;
    let Frame::Hello {
        magic,
        protocol,
        role,
        node,
        name,
        listen_addr,
        nonce: their_nonce,
        auth: they_auth,
    } = expect_frame(&mut reader, &mut writer, "Hello")?
    else {
        return refuse(
            &mut writer,
            ErrorCode::Protocol,
            "the first frame must be Hello",
        );
    };
    if magic != MAGIC {
        return refuse(
            &mut writer,
            ErrorCode::Protocol,
            "bad magic: not a gossipfs connection",
        );
    }
    if protocol != PROTOCOL_VERSION {
        let why = format!("protocol version {protocol} is not {PROTOCOL_VERSION}");
        return refuse(&mut writer, ErrorCode::Protocol, &why);
    }
    if name.len() > MAX_NAME_LEN {
        let why = format!("a node name is at most {MAX_NAME_LEN} bytes");
        return refuse(&mut writer, ErrorCode::Protocol, &why);
    }
    if !listen_addr.is_empty() && listen_addr.parse::<SocketAddr>().is_err() {
        let why = format!("the listen address {listen_addr:?} is not ip:port");
        return refuse(&mut writer, ErrorCode::Protocol, &why);
    }
    // Both sides know which nonce the dialler sent and which the acceptor
    // sent; the proofs and the duplicate-connection rule are built on that.
    let (dialler_nonce, acceptor_nonce) = if outbound {
        (my_nonce, their_nonce)
    } else {
        (their_nonce, my_nonce)
    };
    let hello = Hello {
        role,
        node,
        name,
        listen_addr,
        dialler_nonce,
    };

    if me.secret.is_none() && !they_auth {
        return Ok(hello);
    }
    let Some(secret) = &me.secret else {
        return refuse(
            &mut writer,
            ErrorCode::Unauthorized,
            "the other side requires a cluster secret and we have none",
        );
    };
    if !they_auth {
        return refuse(
            &mut writer,
            ErrorCode::Unauthorized,
            "this node requires the cluster secret",
        );
    }
    // Prove we know the secret, then check that they do. Each proof names
    // the side that makes it, so a proof we send can never pass for theirs.
    let mine = auth_proof(secret, outbound, &dialler_nonce, &acceptor_nonce);
    send(&mut writer, &Frame::Auth { proof: mine })?;
    let Frame::Auth { proof } = expect_frame(&mut reader, &mut writer, "Auth")? else {
        return refuse(&mut writer, ErrorCode::Protocol, "expected an Auth frame");
    };
    let theirs = auth_proof(secret, !outbound, &dialler_nonce, &acceptor_nonce);
    if !constant_time_eq(&proof, &theirs) {
        return refuse(&mut writer, ErrorCode::Unauthorized, "wrong cluster secret");
    }
    Ok(hello)
}

/// The proof that one side of a connection knows the cluster secret:
/// HMAC-SHA1(secret, "gossipfs auth" ‖ side ‖ dialler's nonce ‖ acceptor's
/// nonce), where `side` is `D` for the side that dialled and `A` for the
/// side that accepted.
///
/// Why both nonces and the side: if a proof covered only the other side's
/// nonce, a stranger could open two connections, hand the node's own nonce
/// from the first to the second, and replay the node's answer on the first
/// — the node would have proved the secret for it. With the side in the
/// message the node's proofs never match what it expects from the other
/// side, and with both nonces a proof is good for one connection only.
pub fn auth_proof(
    secret: &[u8],
    by_dialler: bool,
    dialler: &Nonce,
    acceptor: &Nonce,
) -> Sha1Digest {
    let mut message = Vec::with_capacity(14 + 1 + 32);
    message.extend_from_slice(b"gossipfs auth ");
    message.push(if by_dialler { b'D' } else { b'A' });
    message.extend_from_slice(dialler);
    message.extend_from_slice(acceptor);
    hmac_sha1(secret, &message)
}

/// A reader over a socket that fails once a deadline has passed, however
/// the reads are spread: before each read it sets the socket's timeout to
/// the time left.
struct Deadline<'a> {
    stream: &'a TcpStream,
    until: Instant,
}

impl Read for Deadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = self.until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the handshake took too long",
            ));
        }
        self.stream.set_read_timeout(Some(left))?;
        let mut stream = self.stream;
        stream.read(buf)
    }
}

/// Writes one frame and flushes it.
fn send(writer: &mut impl Write, frame: &Frame) -> Result<()> {
    write_frame(writer, frame)?;
    writer.flush()?;
    Ok(())
}

/// Reads the next handshake frame; turns the other side's `Error` frame or
/// a closed connection into an error of ours. Bytes that are not a frame
/// (garbage, a length over the limit) are answered with an `Error` frame
/// before the connection closes, so the sender learns what went wrong.
fn expect_frame(reader: &mut impl Read, writer: &mut impl Write, what: &str) -> Result<Frame> {
    let frame = match read_frame_within(reader, MAX_HANDSHAKE_FRAME_LEN) {
        Ok(frame) => frame,
        Err(Error::Protocol(why)) => return refuse(writer, ErrorCode::Protocol, &why),
        Err(err) => return Err(err),
    };
    match frame {
        Some(Frame::Error { code, message }) => {
            let said = format!("the other side said: {message}");
            Err(match code {
                ErrorCode::Unauthorized => Error::Unauthorized(said),
                ErrorCode::Busy => Error::Busy(said),
                _ => Error::Protocol(said),
            })
        }
        Some(frame) => Ok(frame),
        None => Err(Error::Protocol(format!(
            "the connection closed before the {what} frame"
        ))),
    }
}

/// Tells the other side why we are closing, then fails with the same words.
fn refuse<T>(writer: &mut impl Write, code: ErrorCode, why: &str) -> Result<T> {
    // Best effort: the connection is being dropped whatever happens.
    let _ = send(
        writer,
        &Frame::Error {
            code,
            message: why.to_string(),
        },
    );
    Err(match code {
        ErrorCode::Unauthorized => Error::Unauthorized(why.to_string()),
        _ => Error::Protocol(why.to_string()),
    })
}

/// HMAC-SHA1 (RFC 2104) of `message` under `key`, built on the `sha1` crate.
pub fn hmac_sha1(key: &[u8], message: &[u8]) -> Sha1Digest {
    const BLOCK: usize = 64;
    // Keys longer than a block are hashed first; shorter ones zero-padded.
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block_key.map(|k| k ^ byte);
    let inner = Sha1::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha1::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

/// Compares two digests in time that does not depend on where they differ,
/// so an attacker cannot find a valid proof byte by byte.
fn constant_time_eq(a: &Sha1Digest, b: &Sha1Digest) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

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
    send(writer, frame)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 2202 test cases 1 and 2 for HMAC-SHA1.
    #[test]
    fn hmac_sha1_matches_rfc_2202() {
        let hex = |d: Sha1Digest| d.iter().map(|b| format!("{b:02x}")).collect::<String>();
        assert_eq!(
            hex(hmac_sha1(&[0x0b; 20], b"Hi There")),
            "b617318655057264e28bc0b6fb378c8ef146be00"
        );
        assert_eq!(
            hex(hmac_sha1(b"Jefe", b"what do ya want for nothing?")),
            "effcdf6ae5eb2fa2d27416d5f184df9c259a7c79"
        );
        // Test case 6: a key longer than the block size.
        assert_eq!(
            hex(hmac_sha1(
                &[0xaa; 80],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "aa4ae5e15272d00e95705637ce8a3b55ed402112"
        );
    }

    /// Runs our side of a handshake on a fresh loopback connection and
    /// returns the other end for the test to play the stranger on.
    fn node_side(secret: &[u8]) -> (TcpStream, std::thread::JoinHandle<Result<Hello>>) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stranger = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, _) = listener.accept().unwrap();
        let me = Identity {
            role: Role::Peer,
            node: 1,
            name: "node".into(),
            listen_addr: String::new(),
            secret: Some(secret.to_vec()),
        };
        let node = std::thread::spawn(move || handshake(&stream, &me, false));
        (stranger, node)
    }

    fn hello_with(nonce: Nonce) -> Frame {
        Frame::Hello {
            magic: MAGIC,
            protocol: PROTOCOL_VERSION,
            role: Role::Client,
            node: 0,
            name: "stranger".into(),
            listen_addr: String::new(),
            nonce,
            auth: true,
        }
    }

    /// A stranger without the secret opens two connections and hands the
    /// node's nonce from the first to the second, hoping the node's answer
    /// there is the proof the first one wants. It must not be.
    #[test]
    fn a_proof_cannot_be_reflected_from_one_connection_to_another() {
        let secret = b"cluster secret";
        let (mut first, first_node) = node_side(secret);
        let Some(Frame::Hello {
            nonce: node_nonce_1,
            ..
        }) = read_frame(&mut first).unwrap()
        else {
            panic!("the node speaks first with a Hello");
        };
        send(&mut first, &hello_with([1; 16])).unwrap();
        let Some(Frame::Auth { .. }) = read_frame(&mut first).unwrap() else {
            panic!("the node proves itself on the first connection");
        };

        let (mut second, second_node) = node_side(secret);
        read_frame(&mut second).unwrap();
        send(&mut second, &hello_with(node_nonce_1)).unwrap();
        let Some(Frame::Auth { proof: reflected }) = read_frame(&mut second).unwrap() else {
            panic!("the node proves itself on the second connection");
        };
        drop(second);
        let _ = second_node.join();

        send(&mut first, &Frame::Auth { proof: reflected }).unwrap();
        let result = first_node.join().unwrap();
        assert!(matches!(result, Err(Error::Unauthorized(_))), "{result:?}");
    }

    #[test]
    fn both_sides_with_the_secret_agree_and_a_wrong_one_is_refused() {
        for (theirs, ok) in [(&b"cluster secret"[..], true), (&b"guess"[..], false)] {
            let (mut stranger, node) = node_side(b"cluster secret");
            let Some(Frame::Hello { nonce, .. }) = read_frame(&mut stranger).unwrap() else {
                panic!("the node speaks first with a Hello");
            };
            let mine = [7; 16];
            send(&mut stranger, &hello_with(mine)).unwrap();
            read_frame(&mut stranger).unwrap();
            let proof = auth_proof(theirs, true, &mine, &nonce);
            send(&mut stranger, &Frame::Auth { proof }).unwrap();
            assert_eq!(node.join().unwrap().is_ok(), ok);
        }
    }

    #[test]
    fn constant_time_eq_compares_every_byte() {
        let a = [1u8; 20];
        let mut b = a;
        assert!(constant_time_eq(&a, &b));
        b[19] = 2;
        assert!(!constant_time_eq(&a, &b));
    }
}
