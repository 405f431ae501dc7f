//! Hardening: serving the command line.
//!
//! A connection whose handshake says "client" is not a peer: it gets a
//! session, one request at a time, each answered in order (puts may come
//! ahead of their answers: see `serve_client`), through the same `Node`
//! calls the library's `FileServer` makes (so a
//! `put` from the shell walks diagram 1 like `FileServer::store`). The
//! messages are in `frame::client`.
//!
//! Hooks into the core at `listener::run_connection`, right after the
//! handshake.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::thread::{self, JoinHandle};

use log::debug;

use crate::error::{Error, Result, TimeoutsAsTimedOut};
use crate::frame::client::{ListingEntry, Message};
use crate::frame::{ErrorCode, Frame, read_frame, write_frame};
use crate::hardening::antientropy;
use crate::host::Host;
use crate::support::config::{READ_BUFFER_LEN, STREAM_BUFFER_LEN};
use crate::transport::WRITE_TIMEOUT;

/// A command-line client's session (see `client`): one request at a
/// time, each answered in order. The session runs on the connection's own
/// thread and writes its answers itself: a client never streams to us
/// while we stream to it, so the deadlock that peers' writer threads
/// prevent cannot happen here.
///
/// Puts are the exception that makes a folder fast: a client may send the
/// next put before the last one's answer. Each put's file is written and
/// queued for the next batch commit (`store::Store::commit_later`), and its
/// answer is written by an ack thread, in order, once its batch is durable.
/// The writer moves into that thread for as long as puts are waiting, and
/// comes back before any other request is answered.
pub(crate) fn serve_client(node: Arc<dyn Host>, stream: TcpStream) -> Result<()> {
    let idle = (node.config().idle_timeout).max(node.config().get_timeout.saturating_mul(2));
    stream.set_read_timeout(Some(idle))?;
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let addr = stream.peer_addr()?;
    debug!(target: node.name(), "Client connected addr={addr}");
    let mut reader =
        BufReader::with_capacity(READ_BUFFER_LEN, TimeoutsAsTimedOut(stream.try_clone()?));
    let mut replies = Replies::Here(BufWriter::with_capacity(STREAM_BUFFER_LEN, stream));
    loop {
        let request = match read_frame(&mut reader) {
            Ok(Some(request)) => request,
            Ok(None) => break,
            Err(err) => {
                // Say why before closing: a bad key or a bad frame.
                let _ = send_error(replies.writer()?, &err);
                return Err(err);
            }
        };
        if let Frame::Client(Message::Put { key }) = request {
            let (stored_tx, stored_rx) = mpsc::sync_channel(1);
            let then = Box::new(move |stored| drop(stored_tx.send(stored)));
            let content = &mut ChunkReader { conn: &mut reader, left: 0, ended: false };
            // A put that fails before its commit ends the session: the
            // client may be inside its content.
            if let Err(err) = Arc::clone(&node).store_file_then(&key, content, then) {
                send_error(replies.writer()?, &err)?;
                return Err(err);
            }
            replies.answer_later(node.name(), stored_rx)?;
            continue;
        }
        let writer = replies.writer()?;
        match client_request(&*node, request, writer) {
            Ok(Answer::Sent) => writer.flush()?,
            Ok(Answer::Ends(err)) => return Err(err),
            // A failed query (a missing key) leaves the session open.
            Err(err) => {
                send_error(writer, &err)?;
                if matches!(err, Error::Io(_)) {
                    return Err(err);
                }
            }
        }
    }
    replies.writer()?.flush()?;
    debug!(target: node.name(), "Client disconnected addr={addr}");
    Ok(())
}

/// The session's writer.
type Writer = BufWriter<TcpStream>;

/// Where a session's answers are written from.
enum Replies {
    /// By the session's thread.
    Here(Writer),
    /// By the ack thread, while puts wait for their batch: the channel
    /// takes each put's outcome, in order, and the thread hands the writer
    /// back when the channel closes.
    Acking(SyncSender<Receiver<Result<()>>>, JoinHandle<Result<Writer>>),
    /// The ack thread failed (the client stopped reading); the session ends.
    Gone,
}

impl Replies {
    /// The writer, here, once every put before has been answered.
    fn writer(&mut self) -> Result<&mut Writer> {
        *self = match std::mem::replace(self, Replies::Gone) {
            Replies::Acking(outcomes, acks) => {
                drop(outcomes); // the ack thread ends once it has answered all
                Replies::Here(acks.join().unwrap_or(Err(Error::Closed))?)
            }
            other => other,
        };
        match self {
            Replies::Here(writer) => Ok(writer),
            _ => Err(Error::Closed),
        }
    }

    /// Has `outcome`'s put answered by the ack thread, started if needed.
    fn answer_later(&mut self, name: &str, outcome: Receiver<Result<()>>) -> Result<()> {
        *self = match std::mem::replace(self, Replies::Gone) {
            Replies::Here(writer) => {
                let (outcomes_tx, outcomes_rx) = mpsc::sync_channel(PUTS_IN_FLIGHT);
                let acks = thread::Builder::new()
                    .name(format!("{name} client acks"))
                    .spawn(move || write_acks(writer, outcomes_rx))?;
                Replies::Acking(outcomes_tx, acks)
            }
            other => other,
        };
        // Waits while PUTS_IN_FLIGHT puts are unanswered.
        if let Replies::Acking(outcomes, _) = self
            && outcomes.send(outcome).is_ok()
        {
            return Ok(());
        }
        // The ack thread has ended: its error says why.
        Err(self.writer().err().unwrap_or(Error::Closed))
    }
}

/// How many puts a session holds unanswered before it reads no more.
const PUTS_IN_FLIGHT: usize = 256;

/// The ack thread: answers each put, in order, once its outcome is known.
/// Returns the writer once the session closes the channel.
fn write_acks(mut writer: Writer, outcomes: Receiver<Receiver<Result<()>>>) -> Result<Writer> {
    while let Some(outcome) = flushed_recv(&mut writer, &outcomes)? {
        let reply = match flushed_recv(&mut writer, &outcome)?.unwrap_or(Err(Error::Closed)) {
            Ok(()) => Frame::Client(Message::Ok),
            Err(err) => error_frame(&err),
        };
        write_frame(&mut writer, &reply)?;
    }
    Ok(writer)
}

/// The next message of `rx`, or `None` once it is closed; what `writer`
/// holds is flushed before waiting, so no answer is kept from a client
/// that waits for it.
fn flushed_recv<T>(writer: &mut Writer, rx: &Receiver<T>) -> Result<Option<T>> {
    if let Ok(message) = rx.try_recv() {
        return Ok(Some(message));
    }
    writer.flush()?;
    Ok(rx.recv().ok())
}

/// Answers one client request. An `Err` means nothing of the answer was
/// written, so the caller can still send an `Error` frame.
fn client_request(node: &dyn Host, request: Frame, writer: &mut impl Write) -> Result<Answer> {
    let reply = match request {
        Frame::Get { request, key } => match node.get(&key) {
            Err(Error::NotFound(_)) => Frame::NotFound { request, key },
            file => {
                let mut file = file?;
                let (version, size, sha1) = (file.version(), file.size(), file.sha1());
                write_frame(writer, &Frame::File { request, key, version, size, sha1 })?;
                // Read through the checking reader: a file found corrupt here
                // is taken out of service (and the client, which checks the
                // SHA-1 too, rejects the bytes).
                let cut_short = match io::copy(&mut file, writer) {
                    Ok(sent) if sent == size => return Ok(Answer::Sent),
                    Ok(_) => io::Error::other("the local file is shorter than its header says"),
                    Err(err) => err,
                };
                return Ok(Answer::Ends(cut_short.into()));
            }
        },
        Frame::Client(Message::Remove { key }) => {
            node.delete(&key)?;
            Frame::Client(Message::Ok)
        }
        Frame::Client(Message::ClearAll) => {
            node.clear()?;
            Frame::Client(Message::Ok)
        }
        Frame::Client(Message::List) => {
            let entries: Vec<ListingEntry> = node
                .list()
                .into_iter()
                .map(|file| ListingEntry { key: file.key, size: file.size, version: file.version })
                .collect();
            let chunks = antientropy::chunks_within_frame(entries, |e| 2 + e.key.len() + 8 + 16);
            let last = chunks.len() - 1;
            for (i, chunk) in chunks.into_iter().enumerate() {
                let frame = Frame::Client(Message::Listing { entries: chunk, done: i == last });
                write_frame(writer, &frame)?;
            }
            return Ok(Answer::Sent);
        }
        Frame::Client(Message::Status) => {
            let files = node.list();
            let peers = node.peers().infos().into_iter();
            Frame::Client(Message::StatusReply {
                name: node.config().name.clone(),
                node: node.id(),
                listen_addr: node.listen_addr().to_string(),
                peers: peers.map(|p| format!("{} ({})", p.name, p.addr)).collect(),
                files: files.len() as u64,
                bytes: files.iter().map(|f| f.size).sum(),
            })
        }
        // A frame no client may send ends the session, once it is told why.
        other => {
            let err = Error::Protocol(format!("a client may not send {:?} frames", other.tag()));
            send_error(writer, &err)?;
            return Ok(Answer::Ends(err));
        }
    };
    write_frame(writer, &reply)?;
    Ok(Answer::Sent)
}

/// How the answer to a client's request went.
enum Answer {
    /// Written whole; the session goes on.
    Sent,
    /// The session ends: a file's header went out but its bytes did not all
    /// follow (the client is inside a stream, so no frame may follow), or
    /// the client sent a frame no client may send (and was told so).
    Ends(Error),
}

/// The content of a client's [`Message::Put`], read as a plain `Read`: the
/// bytes of each [`Message::Chunk`] in turn, ending at the empty chunk.
struct ChunkReader<'a, R: Read> {
    /// The client connection, positioned inside or between chunks.
    conn: &'a mut R,
    /// Bytes left in the current chunk.
    left: u64,
    /// Set once the empty chunk was read.
    ended: bool,
}

impl<R: Read> Read for ChunkReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.left == 0 {
            if self.ended {
                return Ok(0);
            }
            match read_frame(self.conn)? {
                Some(Frame::Client(Message::Chunk { size: 0 })) => self.ended = true,
                Some(Frame::Client(Message::Chunk { size })) => self.left = u64::from(size),
                // A client that stops mid-file (closed, or sent something
                // else) must not leave half a file: fail the store.
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "the client's upload ended without its final empty chunk",
                    ));
                }
            }
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.conn.read(&mut buf[..want])?;
        if n == 0 && want > 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the client closed the connection inside a chunk",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Writes the `Error` frame that tells the client `err`, and flushes it.
fn send_error(writer: &mut impl Write, err: &Error) -> Result<()> {
    write_frame(writer, &error_frame(err))?;
    Ok(writer.flush()?)
}

/// The `Error` frame that tells the client `err`.
fn error_frame(err: &Error) -> Frame {
    Frame::Error { code: error_code(err), message: err.to_string() }
}

/// Turns an error into the code sent to the other side in an `Error` frame.
fn error_code(err: &Error) -> ErrorCode {
    match err {
        Error::NotFound(_) => ErrorCode::NotFound,
        Error::BadKey(_) => ErrorCode::BadKey,
        Error::Protocol(_) => ErrorCode::Protocol,
        Error::Unauthorized(_) => ErrorCode::Unauthorized,
        Error::Busy(_) => ErrorCode::Busy,
        Error::Superseded(_) => ErrorCode::Superseded,
        Error::Timeout(_) => ErrorCode::Timeout,
        Error::Unavailable(_) => ErrorCode::Unavailable,
        _ => ErrorCode::Internal,
    }
}
