//! The client side of the protocol: what the `gossipfs` command uses to talk
//! to a running node.
//!
//! A client connects to a node's ordinary port and runs the same handshake
//! as a peer, announcing [`Role::Client`]. It then sends one request at a
//! time and reads the answer: the diagrams' "Client" lane. File content
//! travels as in the peer protocol — a frame that announces `size` bytes,
//! then the bytes — except that a client's upload is a run of
//! [`Message::Chunk`]s, so it can stream a pipe whose length it cannot know.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use gossipfs::frame::client::{ListingEntry, Message};
use gossipfs::frame::{ErrorCode, Frame, Role, check_key, read_frame, write_frame};
use gossipfs::handshake::{HANDSHAKE_TIMEOUT, Identity, handshake};
use gossipfs::{Error, NodeId, Result};
use sha1::{Digest, Sha1};

use super::STREAM_BUFFER_LEN;

/// How long the client waits to connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the client waits for any single read or write. A `get` that
/// makes the node ask its peers waits up to the node's get timeout first.
const IO_TIMEOUT: Duration = Duration::from_secs(60);

/// What `status` reports about a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The node's name.
    pub name: String,
    /// The node's id.
    pub node: NodeId,
    /// The address it listens on.
    pub listen_addr: String,
    /// Its peers, as `name (ip:port)`.
    pub peers: Vec<String>,
    /// How many live files it holds.
    pub files: u64,
    /// Their total size in bytes.
    pub bytes: u64,
}

/// A connection from a client to one node.
pub struct Client {
    /// The address we connected to, for error messages.
    addr: String,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
    /// The buffer content moves through, made once per connection: a
    /// folder put is a thousand small files on one connection, and a fresh
    /// 256 KiB buffer for each would cost more than the 4 KiB it carries.
    buf: Vec<u8>,
}

impl Client {
    /// Connects to the node at `addr` and runs the client handshake.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] saying "nothing listens at ADDR" if the connection is
    /// refused; [`Error::Unauthorized`] if the node wants a secret we do not
    /// have (or a different one); [`Error::Protocol`] saying "this is not a
    /// gossipfs node" if what answers does not speak gossipfs;
    /// [`Error::Timeout`] if it does not answer the handshake in time.
    pub fn connect(addr: &str, secret: Option<Vec<u8>>) -> Result<Client> {
        let target = addr
            .to_socket_addrs()
            .map_err(|err| {
                Error::Io(io::Error::new(err.kind(), format!("bad address {addr}: {err}")))
            })?
            .next()
            .ok_or_else(|| Error::Protocol(format!("{addr} resolves to no address")))?;
        let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT).map_err(|err| {
            let why = match err.kind() {
                io::ErrorKind::ConnectionRefused => format!("nothing listens at {addr}"),
                _ => format!("cannot connect to {addr}: {err}"),
            };
            Error::Io(io::Error::new(err.kind(), why))
        })?;
        let me = Identity {
            role: Role::Client,
            node: 0,
            name: "client".to_string(),
            listen_addr: String::new(),
            secret,
        };
        handshake(&stream, &me, true).map_err(|err| not_gossipfs(addr, err))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(Client {
            addr: addr.to_string(),
            reader: BufReader::with_capacity(STREAM_BUFFER_LEN, stream.try_clone()?),
            writer: BufWriter::with_capacity(STREAM_BUFFER_LEN, stream),
            buf: vec![0u8; STREAM_BUFFER_LEN],
        })
    }

    /// Stores everything `content` yields under `key`, streaming it in
    /// chunks; `progress` is called with the bytes sent so far. Returns the
    /// number of bytes stored.
    ///
    /// # Errors
    ///
    /// [`Error::BadKey`], an error reading `content`, or whatever the node
    /// reports.
    pub fn put(
        &mut self,
        key: &str,
        content: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        let sent = self.send_put(key, content, progress)?;
        self.put_answered(key)?;
        Ok(sent)
    }

    /// The sending half of [`Client::put`]: returns once the content is
    /// sent, without waiting for the node's answer, so that the next put
    /// can follow at once and the node commit them together. Each put sent
    /// this way must be followed, in order, by [`Client::put_answered`].
    ///
    /// # Errors
    ///
    /// As [`Client::put`], for the sending.
    pub fn send_put(
        &mut self,
        key: &str,
        content: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        check_key(key)?;
        write_frame(&mut self.writer, &Frame::Client(Message::Put { key: key.to_string() }))?;
        let mut sent = 0u64;
        loop {
            let n = match content.read(&mut self.buf) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                // The node sees the connection close without the final
                // empty chunk and discards what it has: nothing half-stored.
                Err(err) => return Err(err.into()),
            };
            // A chunk frame, then its bytes; the empty chunk ends the file.
            let size = u32::try_from(n).expect("the buffer is smaller than 4 GiB");
            write_frame(&mut self.writer, &Frame::Client(Message::Chunk { size }))?;
            if n == 0 {
                break;
            }
            self.writer.write_all(&self.buf[..n])?;
            sent += n as u64;
            progress(sent);
        }
        self.writer.flush()?;
        Ok(sent)
    }

    /// The node's answer to the oldest put sent and not yet answered: Ok
    /// once that file is durable on the node.
    ///
    /// # Errors
    ///
    /// Whatever the node reports for that put.
    pub fn put_answered(&mut self, key: &str) -> Result<()> {
        self.expect_ok(key)
    }

    /// Writes the file stored under `key` to `out`, checking it against its
    /// SHA-1; `progress` is called with the bytes received so far. Returns
    /// the number of bytes written.
    ///
    /// If the check fails, `out` has received bad bytes and the call fails:
    /// callers that write to a file write to a temp file first.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if no node has the file; [`Error::Protocol`] if
    /// the bytes do not match their SHA-1; whatever the node reports.
    pub fn get(
        &mut self,
        key: &str,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64> {
        check_key(key)?;
        self.send(&Frame::Get { request: 1, key: key.to_string() })?;
        let (size, sha1) = match self.receive(key)? {
            Frame::File { size, sha1, .. } => (size, sha1),
            Frame::NotFound { .. } => return Err(Error::NotFound(key.to_string())),
            other => return Err(self.unexpected(&other)),
        };
        let mut hasher = Sha1::new();
        let mut received = 0u64;
        while received < size {
            let want = self.buf.len().min((size - received) as usize);
            let n =
                self.reader.read(&mut self.buf[..want]).map_err(|err| self.quiet(err.into()))?;
            if n == 0 {
                return Err(Error::Protocol(format!(
                    "{} closed the connection after {received} of {size} bytes",
                    self.addr
                )));
            }
            hasher.update(&self.buf[..n]);
            out.write_all(&self.buf[..n])?;
            received += n as u64;
            progress(received);
        }
        if <[u8; 20]>::from(hasher.finalize()) != sha1 {
            return Err(Error::Protocol(format!("the bytes of {key:?} do not match their SHA-1")));
        }
        out.flush()?;
        Ok(received)
    }

    /// Deletes `key` everywhere.
    ///
    /// # Errors
    ///
    /// [`Error::NotFound`] if the node holds no such file.
    pub fn remove(&mut self, key: &str) -> Result<()> {
        check_key(key)?;
        self.send(&Frame::Client(Message::Remove { key: key.to_string() }))?;
        self.expect_ok(key)
    }

    /// Deletes every file everywhere.
    ///
    /// # Errors
    ///
    /// Whatever the node reports.
    pub fn clear(&mut self) -> Result<()> {
        self.send(&Frame::Client(Message::ClearAll))?;
        self.expect_ok("")
    }

    /// The node's live files, sorted by key.
    ///
    /// # Errors
    ///
    /// Whatever the node reports.
    pub fn list(&mut self) -> Result<Vec<ListingEntry>> {
        self.send(&Frame::Client(Message::List))?;
        let mut all = Vec::new();
        loop {
            match self.receive("")? {
                Frame::Client(Message::Listing { entries, done }) => {
                    all.extend(entries);
                    if done {
                        return Ok(all);
                    }
                }
                other => return Err(self.unexpected(&other)),
            }
        }
    }

    /// Describes the node.
    ///
    /// # Errors
    ///
    /// Whatever the node reports.
    pub fn status(&mut self) -> Result<Status> {
        self.send(&Frame::Client(Message::Status))?;
        match self.receive("")? {
            Frame::Client(Message::StatusReply {
                name,
                node,
                listen_addr,
                peers,
                files,
                bytes,
            }) => Ok(Status { name, node, listen_addr, peers, files, bytes }),
            other => Err(self.unexpected(&other)),
        }
    }

    fn send(&mut self, frame: &Frame) -> Result<()> {
        write_frame(&mut self.writer, frame)?;
        self.writer.flush()?;
        Ok(())
    }

    /// Reads the answer to a request about `key`; an `Error` frame becomes
    /// the matching error.
    fn receive(&mut self, key: &str) -> Result<Frame> {
        match read_frame(&mut self.reader).map_err(|err| self.quiet(err))? {
            Some(Frame::Error { code, message }) => {
                // The node sends its error as it prints it, "kind: why"; the
                // error made here prints its own kind, so keep the why.
                let why = match message.split_once(": ") {
                    Some((_, why)) if code != ErrorCode::Internal => why.to_string(),
                    _ => message,
                };
                Err(error_for(code, why, key, &self.addr))
            }
            Some(frame) => Ok(frame),
            None => Err(Error::Protocol(format!(
                "{} closed the connection without answering",
                self.addr
            ))),
        }
    }
}

/// Says what a failed handshake means to someone who typed `--node ADDR`.
///
/// A gossipfs node answers a client's Hello with its own Hello at once. A
/// protocol error that is not the node's own word (an `Error` frame, "the
/// other side said: ...") or a version mismatch means the bytes that came
/// back are not gossipfs at all: a web server's `HTTP/1.1 400`, read as a
/// frame length, is 1213486160. Silence means the same, or a node too busy
/// to answer.
fn not_gossipfs(addr: &str, err: Error) -> Error {
    match err {
        Error::Protocol(why)
            if !why.starts_with("the other side said") && !why.starts_with("protocol version") =>
        {
            Error::Protocol(format!("{addr}: this is not a gossipfs node ({why})"))
        }
        Error::Timeout(_) => Error::Timeout(format!(
            "{addr} did not answer the handshake within {} s: is it a gossipfs node?",
            HANDSHAKE_TIMEOUT.as_secs()
        )),
        other => other,
    }
}

/// The error for an `Error` frame's code: `why` is the node's reason, `key`
/// the key asked about, `addr` the node.
fn error_for(code: ErrorCode, message: String, key: &str, addr: &str) -> Error {
    match code {
        ErrorCode::NotFound => Error::NotFound(key.to_string()),
        ErrorCode::BadKey => Error::BadKey(message),
        ErrorCode::Unauthorized => Error::Unauthorized(message),
        ErrorCode::Busy => Error::Busy(message),
        ErrorCode::Superseded => Error::Superseded(message),
        ErrorCode::Timeout => Error::Timeout(message),
        ErrorCode::Unavailable => Error::Unavailable(message),
        _ => Error::Protocol(format!("{addr} says: {message}")),
    }
}

impl Client {
    fn expect_ok(&mut self, key: &str) -> Result<()> {
        match self.receive(key)? {
            Frame::Client(Message::Ok) => Ok(()),
            other => Err(self.unexpected(&other)),
        }
    }

    /// A read that hit [`IO_TIMEOUT`] is a node that stopped answering:
    /// [`Error::Timeout`] (exit 4, "what happened is not known"), not a
    /// bare "Resource temporarily unavailable". A socket's read timeout
    /// says `WouldBlock` on Unix.
    fn quiet(&self, err: Error) -> Error {
        match err {
            Error::Io(io) if io.kind() == io::ErrorKind::WouldBlock => Error::Timeout(format!(
                "{} did not answer for {} s",
                self.addr,
                IO_TIMEOUT.as_secs()
            )),
            other => other,
        }
    }

    fn unexpected(&self, frame: &Frame) -> Error {
        Error::Protocol(format!(
            "{} answered with an unexpected {:?} frame",
            self.addr,
            frame.tag()
        ))
    }
}
