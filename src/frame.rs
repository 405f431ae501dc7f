//! The wire format: every message two gossipfs processes exchange.
//!
//! This module knows nothing of sockets or disks. It turns a [`Frame`] into
//! bytes on any `impl Write` and bytes from any `impl Read` back into a
//! `Frame`, so every rule here is unit-tested on byte slices.
//!
//! # Format
//!
//! Every frame is:
//!
//! 1. length: `u32`, big-endian, 4 bytes — the number of bytes that follow
//!    (the tag plus the body). At least 1, at most [`MAX_FRAME_LEN`].
//! 2. tag: `u8`, 1 byte — which message this is ([`Tag`]).
//! 3. body: the message's fields, in the order its variant lists them.
//!
//! Fields use a handful of encodings, all big-endian:
//!
//! - integers: `u8`, `u16`, `u32`, `u64` of their natural width;
//! - strings: `u16` byte length, then that many bytes of UTF-8;
//! - [`Version`]: `u64` hybrid logical time, then `u64` node id (16 bytes);
//! - SHA-1 digests: 20 raw bytes; nonces: 16 raw bytes;
//! - lists: a `u32` count, then the items one after another.
//!
//! # Streams
//!
//! Two messages announce file data: [`Frame::Store`] and [`Frame::File`].
//! Each carries the content's `size` and SHA-1, and **exactly `size` raw
//! bytes follow the frame on the same connection**, outside any frame. That
//! is the sequence diagrams' "send metadata (filename, size)" followed by
//! "stream file data". Whoever reads such a frame must consume those bytes
//! (store them or drain them) before reading the next frame; [`Frame::stream_len`]
//! tells how many there are (a client's upload chunk announces some too).
//!
//! # The client's messages
//!
//! The command-line client's requests and answers (tags 13 to 21) live in
//! [`client`], so this file reads as the peer protocol. They travel as
//! [`Frame::Client`] under exactly the same framing: length, tag, body.
//!
//! # Limits
//!
//! A length prefix is checked against [`MAX_FRAME_LEN`] *before* anything
//! is allocated, so a hostile or corrupt prefix costs nothing but an error.
//! Keys are checked against [`MAX_KEY_LEN`]. Lists are bounded by the frame
//! length they sit in, and their counts are checked against what is left of
//! the frame before any list is allocated.

use std::io::{self, Read, Write};

use crate::error::{Error, Result};
use crate::support::version::{NodeId, Version};

pub mod client;

/// The largest frame we send or accept: 1 MiB of tag and body. File data is
/// streamed after its frame and is not bound by this.
pub const MAX_FRAME_LEN: u32 = 1 << 20;

/// The longest key, in bytes of UTF-8.
pub const MAX_KEY_LEN: usize = 1024;

/// The longest node name accepted in a Hello, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// The first bytes of every [`Frame::Hello`]: "GSFS". A connection whose
/// first frame does not start with these is not talking to gossipfs.
pub const MAGIC: [u8; 4] = *b"GSFS";

/// The protocol version this build speaks. Nodes refuse a different one
/// rather than guess at what its frames mean.
pub const PROTOCOL_VERSION: u16 = 4;

/// A SHA-1 digest of some file's content, or of a key.
pub type Sha1Digest = [u8; 20];

/// A one-time random challenge sent in [`Frame::Hello`].
pub type Nonce = [u8; 16];

/// Declares a one-byte enum of the protocol: each variant's number is its
/// encoding, and a byte that names no variant is a protocol error ("unknown
/// frame tag 99": the name after `as` says what the byte was meant to be).
macro_rules! byte_enum {
    ($(#[$doc:meta])* pub enum $name:ident as $what:literal {
        $($(#[$variant_doc:meta])* $variant:ident = $byte:literal,)*
    }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$variant_doc])* $variant = $byte,)*
        }

        impl Field for $name {
            fn put(&self, b: &mut Vec<u8>) -> Result<()> {
                (*self as u8).put(b)
            }

            fn take(body: &mut Body<'_>) -> Result<Self> {
                match u8::take(body)? {
                    $($byte => Ok($name::$variant),)*
                    other => Err(Error::Protocol(format!("unknown {} {other}", $what))),
                }
            }
        }
    };
}

byte_enum! {
    /// The message tags: the byte after the length prefix.
    ///
    /// Append only; these numbers are the protocol. A node that reads a tag it
    /// does not know closes the connection with a protocol error.
    pub enum Tag as "frame tag" {
        /// [`Frame::Hello`].
        Hello = 1,
        /// [`Frame::Auth`].
        Auth = 2,
        /// [`Frame::Error`].
        Error = 3,
        /// [`Frame::Store`].
        Store = 4,
        /// [`Frame::Delete`].
        Delete = 5,
        /// [`Frame::Clear`].
        Clear = 6,
        /// [`Frame::Get`].
        Get = 7,
        /// [`Frame::File`].
        File = 8,
        /// [`Frame::NotFound`].
        NotFound = 9,
        /// [`Frame::Summary`].
        Summary = 10,
        /// [`Frame::Digest`].
        Digest = 11,
        /// [`Frame::Peers`].
        Peers = 12,
        // 13 to 21: the command-line client's messages, sent as
        // `Frame::Client`.
        /// [`client::Message::List`].
        List = 13,
        /// [`client::Message::Listing`].
        Listing = 14,
        /// [`client::Message::Status`].
        Status = 15,
        /// [`client::Message::StatusReply`].
        StatusReply = 16,
        /// [`client::Message::Ok`].
        Ok = 17,
        /// [`client::Message::Put`].
        Put = 18,
        /// [`client::Message::Chunk`].
        Chunk = 19,
        /// [`client::Message::Remove`].
        Remove = 20,
        /// [`client::Message::ClearAll`].
        ClearAll = 21,
        /// [`Frame::Corrupt`].
        Corrupt = 22,
        /// [`Frame::Announce`].
        Announce = 23,
        /// [`Frame::Ping`].
        Ping = 24,
        /// [`Frame::Offer`].
        Offer = 25,
        /// [`Frame::GoAhead`].
        GoAhead = 26,
        /// [`Frame::Release`].
        Release = 27,
        /// [`Frame::PushesFrom`].
        PushesFrom = 28,
    }
}

byte_enum! {
    /// Which kind of program opened a connection, announced in [`Frame::Hello`].
    pub enum Role as "role" {
        /// Another node: the connection carries gossip both ways.
        Peer = 1,
        /// The command-line client: it sends requests, the node answers.
        Client = 2,
    }
}

byte_enum! {
    /// Why a node is about to close a connection, sent in [`Frame::Error`].
    ///
    /// Append only; these numbers are the protocol.
    pub enum ErrorCode as "error code" {
        /// The frames made no sense (bad magic, unknown tag, bad length...).
        Protocol = 1,
        /// The handshake did not prove knowledge of the cluster secret.
        Unauthorized = 2,
        /// The node has as many connections as it accepts.
        Busy = 3,
        /// A client asked for a key that no node holds.
        NotFound = 4,
        /// A client sent a key the node refuses (empty, too long).
        BadKey = 5,
        /// Something failed on the node's side (a disk error, say).
        Internal = 6,
        /// A client's put or remove lost to a newer version already held.
        Superseded = 7,
        /// Peers that might hold the key did not answer in time.
        Timeout = 8,
        /// Peers that might hold the key could not be asked: none connected,
        /// or their connections closed before they answered.
        Unavailable = 9,
    }
}

/// One entry of a [`Frame::Digest`]: what a node holds for one key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DigestEntry {
    #[allow(missing_docs)]
    pub key: String,
    /// The version of the change the node holds for it.
    pub version: Version,
    /// True if that change was a delete (the node holds a tombstone).
    pub tombstone: bool,
}

/// Every message of the peer protocol, and the client's in one variant.
///
/// Each variant says who sends it, when, and what the receiver does. The
/// byte layout of a variant is its fields, in order, encoded as the module
/// doc describes; the `layout!` table at the end of this file lists them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The first frame each side sends on a new connection, without waiting
    /// for the other's (it is small, so both fit in the socket buffers).
    ///
    /// The receiver checks the magic and the protocol version and refuses the
    /// connection with an [`Frame::Error`] if either is wrong.
    Hello {
        /// Always [`MAGIC`].
        magic: [u8; 4],
        /// Always [`PROTOCOL_VERSION`] for this build.
        protocol: u16,
        /// Whether the sender is a node or a command-line client.
        role: Role,
        /// The sender's node id; 0 for a client.
        node: NodeId,
        /// The sender's human-readable name, for logs; may be empty.
        name: String,
        /// The address the sender accepts connections on, as `ip:port`, so
        /// the receiver can tell others about it; empty for a client.
        listen_addr: String,
        /// A fresh random challenge: each side's [`Frame::Auth`] proof covers
        /// both sides' nonces, so a proof is good for this connection only.
        nonce: Nonce,
        /// True if the sender has a cluster secret and so will send, and
        /// demand, a [`Frame::Auth`] next.
        auth: bool,
    },

    /// Proof of the cluster secret: HMAC-SHA1 over the side that sends it
    /// and both Hellos' nonces (see `handshake::auth_proof`). Sent
    /// right after [`Frame::Hello`] when both sides have a secret. If only
    /// one side has one, that side refuses the connection with an
    /// `Unauthorized` [`Frame::Error`] instead, and no proof is exchanged.
    Auth {
        /// The HMAC.
        proof: Sha1Digest,
    },

    /// The sender is about to close the connection, and says why. The
    /// receiver logs it and closes too.
    Error {
        /// The kind of failure.
        code: ErrorCode,
        /// A sentence for a person; may be empty.
        message: String,
    },

    /// Diagram 1's push: "I stored a new version of this file; here it is."
    /// Sent only by the node where the store was made, to its direct peers.
    /// Exactly `size` bytes of content follow the frame.
    ///
    /// The receiver's read loop hands the frame to the node's handler and
    /// waits. The handler asks the gossip rules whether the change is new
    /// and newer than what it holds; if not, it gives the stream back and
    /// the read loop discards the bytes. If so, it locks the transport,
    /// streams the bytes to a temporary file, checks them against `sha1`,
    /// unlocks, commits (in a batch), and then tells its other peers with a
    /// [`Frame::Announce`].
    Store {
        /// The file's key.
        key: String,
        /// The version of this store; also the change's id.
        version: Version,
        /// The number of content bytes that follow the frame.
        size: u64,
        /// SHA-1 of those bytes.
        sha1: Sha1Digest,
    },

    /// Relay: "I committed this version of this file; fetch it from me if
    /// you lack it." Sent by every node that commits a store it received,
    /// to its peers but the sender and the store's origin. No bytes follow:
    /// a receiver that lacks this version (and is not already receiving it,
    /// nor promised it by the origin's [`Frame::PushesFrom`]) sends the
    /// announcer a [`Frame::GoAhead`], and the file comes back in a
    /// [`Frame::File`] (diagram 2's second phase, aimed at one peer). So
    /// each store crosses each link at most once.
    Announce {
        /// The file's key.
        key: String,
        #[allow(missing_docs)]
        version: Version,
        /// Its size in bytes.
        size: u64,
        /// SHA-1 of its content.
        sha1: Sha1Digest,
    },

    /// Gossip: "this key was deleted." The receiver keeps a tombstone at
    /// `version` if that is newer than what it holds, and relays the frame
    /// as it is.
    Delete {
        #[allow(missing_docs)]
        key: String,
        /// The version of the delete; also the change's id.
        version: Version,
    },

    /// Gossip: "every file older than this was deleted." The receiver
    /// deletes everything it holds below `version`, refuses older stores from
    /// then on, and relays it.
    Clear {
        /// The version of the clear; also the change's id.
        version: Version,
    },

    /// Diagram 2, phase one: "do you have this file?" Sent by a `get` to
    /// every peer ("Broadcast getfile"). The receiver's handler opens its
    /// file and holds it ready, then answers with a [`Frame::Offer`] (its
    /// metadata, no bytes), or with [`Frame::NotFound`] at once.
    Get {
        /// Matches answers to the question: numbered from 1 by the asking
        /// node, unique among its questions. An answer to a request the
        /// receiver never sent on that connection is dropped (a file's
        /// bytes discarded).
        request: u64,
        #[allow(missing_docs)]
        key: String,
    },

    /// Diagram 2, phase one's answer: "I have it, ready to send." No bytes
    /// follow. The holder keeps the file open for the asker until a
    /// [`Frame::GoAhead`] or a [`Frame::Release`] for the same `request`
    /// arrives, or until it lapses (a holder keeps a few offers per
    /// connection; the oldest is let go when more are asked for). The asker
    /// picks one offer: the newest version, among equals the first to
    /// arrive.
    Offer {
        /// The `request` of the [`Frame::Get`] this answers.
        request: u64,
        /// The file's key.
        key: String,
        /// The version held ready.
        version: Version,
        /// Its size in bytes.
        size: u64,
        /// SHA-1 of its content.
        sha1: Sha1Digest,
    },

    /// Diagram 2, phase two: the asker's "Send metadata" back to the one
    /// holder it picked, the go-ahead to stream. Answered with a
    /// [`Frame::File`] and its bytes, or [`Frame::NotFound`] if the holder
    /// no longer has the key at `version` or newer. A fetch after an
    /// [`Frame::Announce`] or a [`Frame::Digest`] sends this directly, with
    /// no `Get` first: the announcement or the digest entry is the offer.
    GoAhead {
        /// The `request` of the offer picked, or a fresh one for a fetch.
        request: u64,
        #[allow(missing_docs)]
        key: String,
        /// The version wanted: the holder sends this one or a newer one.
        version: Version,
    },

    /// Diagram 2: "I will not take the file you offered." Sent by the asker
    /// for every offer it did not pick; the holder closes the file it held
    /// ready. No answer.
    Release {
        /// The `request` of the offer released.
        request: u64,
    },

    /// The answer to a [`Frame::GoAhead`]: the file. Exactly `size` bytes
    /// of content follow the frame. The asker (the thread inside `get`, or
    /// the handler for a fetch) locks the transport and streams them, as
    /// for [`Frame::Store`]; a fetched file is then announced, a `get`'s is
    /// not (its peers have it already).
    File {
        /// The `request` of the [`Frame::GoAhead`] this answers.
        request: u64,
        /// The file's key.
        key: String,
        /// The version of the content that follows.
        version: Version,
        /// The number of content bytes that follow the frame.
        size: u64,
        /// SHA-1 of those bytes.
        sha1: Sha1Digest,
    },

    /// The answer to a [`Frame::Get`] or a [`Frame::GoAhead`] for a key the
    /// sender holds no live file for (at the version asked, for a
    /// go-ahead). Sent at once, so a `get` of a missing key fails fast.
    NotFound {
        /// The `request` this answers.
        request: u64,
        /// The key that was asked for.
        key: String,
    },

    /// Anti-entropy, step one: a fingerprint of everything the sender holds.
    /// Sent when a connection opens and then periodically. A receiver whose
    /// own fingerprint differs answers with its full [`Frame::Digest`].
    Summary {
        /// The sender's clear watermark: the newest clear it applied.
        cleared: Version,
        /// SHA-1 over the sender's sorted (key, version, tombstone) list.
        hash: Sha1Digest,
        /// How many keys (files and tombstones) the sender holds.
        count: u64,
    },

    /// Anti-entropy, step two: (part of) the list of everything the sender
    /// holds. A long list is split over several frames, each complete in
    /// itself. The receiver fetches (with [`Frame::GoAhead`]) every key for
    /// which the sender holds a newer live file, and applies every newer
    /// tombstone and a newer clear watermark directly.
    Digest {
        /// The sender's clear watermark.
        cleared: Version,
        /// Some of the sender's keys and what it holds for them.
        entries: Vec<DigestEntry>,
    },

    /// Membership: the listen addresses of the sender's peers, so the
    /// receiver can connect to the ones it does not know yet. The list may
    /// name the receiver itself, or hold an empty or unparsable address:
    /// those are skipped.
    Peers {
        /// `ip:port` strings.
        addrs: Vec<String>,
    },

    /// A message of the command-line client's session (see [`client`]):
    /// sent by a client, or by a node answering one, only on a connection
    /// whose [`Frame::Hello`] said [`Role::Client`]. Its tag is the
    /// message's own.
    Client(client::Message),

    /// Peer notice: "the bytes you sent for `key` at `version` did not
    /// match their SHA-1." Sent by a node that received a whole stream that
    /// failed its check; the bytes were dropped. The receiver of the notice
    /// reads its own copy through the checking reader, which takes the file
    /// out of service if it is indeed corrupt, so anti-entropy replaces it
    /// with a good copy instead of offering the bad one forever.
    Corrupt {
        /// The key whose bytes were bad.
        key: String,
        /// The version they claimed to be.
        version: Version,
    },

    /// Diagram 1's promise, sent once right after a connection is
    /// registered: "every store I make with a version newer than this one,
    /// I push to you on this connection." A node that hears an announcement
    /// of the sender's store can so tell, the same way the sender decided,
    /// whether a push is coming or it must fetch. Until this frame arrives,
    /// the receiver assumes no push is coming.
    PushesFrom {
        /// The sender's clock when it registered the connection.
        version: Version,
    },

    /// Liveness: "I am here." Sent to every peer each heartbeat interval;
    /// the receiver does nothing with it. Its bytes, like any others, prove
    /// the link alive: a peer from which nothing at all arrives for the
    /// heartbeat timeout is declared dead.
    Ping,
}

impl Frame {
    /// How many raw bytes of file content follow this frame on the wire:
    /// `size` for [`Frame::Store`], [`Frame::File`] and a client's
    /// [`client::Message::Chunk`], 0 for the others.
    pub fn stream_len(&self) -> u64 {
        match self {
            Frame::Store { size, .. } | Frame::File { size, .. } => *size,
            Frame::Client(client::Message::Chunk { size }) => u64::from(*size),
            _ => 0,
        }
    }
}

/// Checks that `key` is one we accept: 1 to [`MAX_KEY_LEN`] bytes.
///
/// Any UTF-8 is fine otherwise, `../` and NUL included: keys never become
/// paths directly (the store names files by the key's SHA-1).
///
/// # Errors
///
/// [`Error::BadKey`] saying what is wrong with it.
pub fn check_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(Error::BadKey("the key is empty".into()));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::BadKey(format!(
            "the key is {} bytes long; the limit is {MAX_KEY_LEN}",
            key.len()
        )));
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

/// Writes one frame: its length prefix, its tag and its body.
///
/// The whole frame is encoded into memory first and written with a single
/// `write_all`, so a frame never reaches the socket in dribbles. This does
/// not flush: the caller flushes once per frame, after the content stream if
/// the frame announces one.
///
/// # Errors
///
/// [`Error::Protocol`] if the frame would break a limit (a key or string too
/// long, a body over [`MAX_FRAME_LEN`]); [`Error::Io`] if the writer fails.
pub fn write_frame(writer: &mut impl Write, frame: &Frame) -> Result<()> {
    // 1. length: u32 big-endian, counting the tag and the body; a
    //    placeholder until the body is encoded.
    // 2. tag: one byte.
    let mut bytes = vec![0, 0, 0, 0, frame.tag() as u8];
    // 3. body.
    frame.put_body(&mut bytes)?;
    let body_len = bytes.len() - 5;
    let len =
        u32::try_from(body_len + 1).ok().filter(|len| *len <= MAX_FRAME_LEN).ok_or_else(|| {
            Error::Protocol(format!("{:?} frame of {body_len} bytes is too long", frame.tag()))
        })?;
    bytes[..4].copy_from_slice(&len.to_be_bytes());
    writer.write_all(&bytes)?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/// Reads one frame.
///
/// Returns `Ok(None)` if the reader is at a clean end of stream *between*
/// frames: the other side closed the connection politely. An end of stream
/// anywhere inside a frame is an error, since the frame was cut short.
///
/// This reads only the frame. If it announces file content
/// ([`Frame::stream_len`] > 0), those bytes are still waiting in `reader`.
///
/// # Errors
///
/// [`Error::Protocol`] for a length prefix of 0 or over [`MAX_FRAME_LEN`],
/// an unknown tag, a body that is truncated, too long for its fields, or
/// holds bad UTF-8 or a bad key; [`Error::Io`] (or [`Error::Timeout`]) if the
/// reader fails.
pub fn read_frame(reader: &mut impl Read) -> Result<Option<Frame>> {
    read_frame_within(reader, MAX_FRAME_LEN)
}

/// Reads one frame, as [`read_frame`], but refuses a length prefix over
/// `max_len` (used where only small frames make sense, as in a handshake).
///
/// # Errors
///
/// As [`read_frame`].
pub fn read_frame_within(reader: &mut impl Read, max_len: u32) -> Result<Option<Frame>> {
    let max_len = max_len.min(MAX_FRAME_LEN);
    // 1. length: u32 big-endian. Zero bytes here is a clean close.
    let mut len_bytes = [0u8; 4];
    if !read_exact_or_eof(reader, &mut len_bytes)? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(len_bytes);
    // Check the prefix before allocating anything for it.
    if len == 0 || len > max_len {
        return Err(Error::Protocol(format!("frame length {len} is outside 1..={max_len}")));
    }
    let mut bytes = vec![0u8; len as usize];
    if !read_exact_or_eof(reader, &mut bytes)? {
        return Err(Error::Protocol("connection closed inside a frame".into()));
    }
    decode(&bytes).map(Some)
}

/// Decodes a frame from its tag and body (the bytes after the length).
///
/// # Errors
///
/// As [`read_frame`], for everything but the length prefix.
pub fn decode(bytes: &[u8]) -> Result<Frame> {
    if bytes.is_empty() {
        return Err(Error::Protocol("empty frame".into()));
    }
    let mut body = Body { rest: bytes };
    // 2. tag: one byte we must know.
    let tag = Tag::take(&mut body)?;
    // 3. body: the peer table's layout, or else a client message's.
    let frame = match Frame::take_body(tag, &mut body)? {
        Some(frame) => frame,
        None => client::Message::take_body(tag, &mut body)?
            .map(Frame::Client)
            .ok_or_else(|| Error::Protocol(format!("{tag:?} is not a client message")))?,
    };
    // Every byte of the frame belongs to a field; leftovers mean the two
    // sides disagree about the layout, which we refuse to paper over.
    if !body.rest.is_empty() {
        return Err(Error::Protocol(format!(
            "{tag:?} frame has {} unexpected trailing bytes",
            body.rest.len()
        )));
    }
    Ok(frame)
}

/// Fills `buf`, or returns `Ok(false)` if the reader was already at its end.
/// An end of stream after some but not all of `buf` is the other side's
/// protocol error, not an I/O failure of ours.
fn read_exact_or_eof(reader: &mut impl Read, buf: &mut [u8]) -> Result<bool> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => return Err(Error::Protocol("connection closed inside a frame".into())),
            Ok(n) => filled += n,
            Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.into()),
        }
    }
    Ok(true)
}

/// The unread rest of one frame's body. Every take checks that the bytes it
/// needs are there, so a truncated body is an error, never a panic.
struct Body<'a> {
    rest: &'a [u8],
}

impl Body<'_> {
    /// The next `n` bytes.
    fn take_bytes(&mut self, n: usize) -> Result<&[u8]> {
        if self.rest.len() < n {
            return Err(Error::Protocol(format!(
                "frame body ends {} bytes early",
                n - self.rest.len()
            )));
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    /// A key: a string that must also pass [`check_key`].
    fn take_key(&mut self) -> Result<String> {
        let key = String::take(self)?;
        check_key(&key).map_err(|err| Error::Protocol(err.to_string()))?;
        Ok(key)
    }
}

// ---------------------------------------------------------------------------
// Fields and layouts
// ---------------------------------------------------------------------------

/// A field type and its encoding (the module doc's list), both ways side by
/// side so that they cannot drift apart.
///
/// Private to this module, which includes its child `client`: both
/// protocols share one set of field encodings and limits.
trait Field: Sized {
    /// A lower bound on the bytes one encoding takes, against which a list's
    /// count is checked. Every field takes at least one byte, so only list
    /// items say more.
    const MIN_LEN: usize = 1;

    /// Appends the field to a body being encoded.
    fn put(&self, b: &mut Vec<u8>) -> Result<()>;

    /// Takes the field off the front of a body being decoded.
    fn take(body: &mut Body<'_>) -> Result<Self>;
}

// The integers are big-endian arrays of their width, so a body too short for
// one fails in `take_bytes` like any other field.
macro_rules! int_field {
    ($($int:ty),*) => {$(
        impl Field for $int {
            fn put(&self, b: &mut Vec<u8>) -> Result<()> {
                self.to_be_bytes().put(b)
            }

            fn take(body: &mut Body<'_>) -> Result<Self> {
                Ok(<$int>::from_be_bytes(Field::take(body)?))
            }
        }
    )*};
}

int_field!(u8, u16, u32, u64);

/// Raw bytes: digests, nonces, the magic.
impl<const N: usize> Field for [u8; N] {
    fn put(&self, b: &mut Vec<u8>) -> Result<()> {
        b.extend_from_slice(self);
        Ok(())
    }

    fn take(body: &mut Body<'_>) -> Result<Self> {
        let mut bytes = [0; N];
        bytes.copy_from_slice(body.take_bytes(N)?);
        Ok(bytes)
    }
}

/// A boolean: one byte, 0 or 1. Anything else is an error rather than
/// "true", so every frame has exactly one encoding.
impl Field for bool {
    fn put(&self, b: &mut Vec<u8>) -> Result<()> {
        u8::from(*self).put(b)
    }

    fn take(body: &mut Body<'_>) -> Result<Self> {
        match u8::take(body)? {
            0 => Ok(false),
            1 => Ok(true),
            other => Err(Error::Protocol(format!("boolean byte {other} is not 0 or 1"))),
        }
    }
}

/// A string: `u16` byte length, then the UTF-8 bytes.
impl Field for String {
    const MIN_LEN: usize = 2;

    fn put(&self, b: &mut Vec<u8>) -> Result<()> {
        let len = u16::try_from(self.len()).map_err(|_| {
            Error::Protocol(format!("a string of {} bytes is too long", self.len()))
        })?;
        len.put(b)?;
        b.extend_from_slice(self.as_bytes());
        Ok(())
    }

    fn take(body: &mut Body<'_>) -> Result<Self> {
        let len = usize::from(u16::take(body)?);
        String::from_utf8(body.take_bytes(len)?.to_vec())
            .map_err(|_| Error::Protocol("a string is not valid UTF-8".into()))
    }
}

/// A list: a `u32` item count, then the items one after another. The count
/// is refused if even the smallest items ([`Field::MIN_LEN`] bytes) could not
/// fit in what is left of the frame: `Vec::with_capacity` never sees a count
/// that the frame's own length does not back.
impl<T: Field> Field for Vec<T> {
    fn put(&self, b: &mut Vec<u8>) -> Result<()> {
        let count = u32::try_from(self.len())
            .map_err(|_| Error::Protocol(format!("a list of {} items is too long", self.len())))?;
        count.put(b)?;
        self.iter().try_for_each(|item| item.put(b))
    }

    fn take(body: &mut Body<'_>) -> Result<Self> {
        let count = usize::try_from(u32::take(body)?)
            .map_err(|_| Error::Protocol("a list count overflows this machine's usize".into()))?;
        if count.saturating_mul(T::MIN_LEN) > body.rest.len() {
            return Err(Error::Protocol(format!(
                "a list claims {count} items but the frame has room for fewer"
            )));
        }
        let mut items = Vec::with_capacity(count);
        for _ in 0..count {
            items.push(T::take(body)?);
        }
        Ok(items)
    }
}

/// One field of a [`layout!`], either way: a field named `key` is a string
/// that must also pass [`check_key`]; any other is encoded as its type's
/// [`Field`] says. (`put` gets the field's name twice, once to match on and
/// once to use: a name written inside a macro cannot see the caller's.)
macro_rules! field {
    (put $b:ident, key, $key:ident) => {{
        check_key($key)?;
        $key.put($b)?
    }};
    (put $b:ident, $name:ident, $value:ident) => {
        $value.put($b)?
    };
    (take $body:ident, key) => {
        $body.take_key()?
    };
    (take $body:ident, $name:ident) => {
        Field::take($body)?
    };
}

/// Writes the code of an enum of messages from a table of its variants'
/// fields, in wire order: `tag` (each variant's tag is named like it),
/// `put_body` and `take_body`. One table drives all three, so the encoder
/// and the decoder cannot disagree, and the compiler checks that it names
/// every field. `wraps` names a variant that holds another table's message.
///
/// The `struct` form does the same for a struct that is one [`Field`]
/// (a version, a list item); `min_len` is its [`Field::MIN_LEN`].
macro_rules! layout {
    (
        enum $enum:ident { $($variant:ident { $($field:ident),* }),* $(,)? }
        $(wraps $wrap:ident)?
    ) => {
        impl $enum {
            /// The tag this message is sent with.
            pub fn tag(&self) -> Tag {
                match self {
                    $($enum::$variant { .. } => Tag::$variant,)*
                    $($enum::$wrap(message) => message.tag(),)?
                }
            }

            /// Appends the body (everything after the tag) to `b`.
            pub(in crate::frame) fn put_body(&self, b: &mut Vec<u8>) -> Result<()> {
                match self {
                    $($enum::$variant { $($field),* } => { $(field!(put b, $field, $field);)* })*
                    $($enum::$wrap(message) => message.put_body(b)?,)?
                }
                Ok(())
            }

            /// Decodes the body of a message with this tag, or `None` if no
            /// variant of this table has that tag.
            pub(in crate::frame) fn take_body(
                tag: Tag,
                body: &mut Body<'_>,
            ) -> Result<Option<Self>> {
                // A struct expression's fields are evaluated in the order
                // written, which is the order they are on the wire.
                Ok(Some(match tag {
                    $(Tag::$variant => $enum::$variant { $($field: field!(take body, $field)),* },)*
                    _ => return Ok(None),
                }))
            }
        }
    };
    (struct $struct:ident { $($field:ident),* } $(min_len $min_len:literal)?) => {
        impl Field for $struct {
            $(const MIN_LEN: usize = $min_len;)?

            fn put(&self, b: &mut Vec<u8>) -> Result<()> {
                let $struct { $($field),* } = self;
                $(field!(put b, $field, $field);)*
                Ok(())
            }

            fn take(body: &mut Body<'_>) -> Result<Self> {
                Ok($struct { $($field: field!(take body, $field)),* })
            }
        }
    };
}

pub(crate) use {field, layout};

layout! { struct Version { time, node } }

// Smallest entry: 2 (key length) + 1 (key) + 16 + 1 bytes.
layout! { struct DigestEntry { key, version, tombstone } min_len 20 }

layout! {
    enum Frame {
        Hello { magic, protocol, role, node, name, listen_addr, nonce, auth },
        Auth { proof },
        Error { code, message },
        Store { key, version, size, sha1 },
        Delete { key, version },
        Clear { version },
        Get { request, key },
        File { request, key, version, size, sha1 },
        NotFound { request, key },
        Summary { cleared, hash, count },
        Digest { cleared, entries },
        Peers { addrs },
        // 13 to 21: the client's messages, laid out in their own module.
        Corrupt { key, version },
        Announce { key, version, size, sha1 },
        Ping {},
        Offer { request, key, version, size, sha1 },
        GoAhead { request, key, version },
        Release { request },
        PushesFrom { version },
    }
    wraps Client
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(time: u64, node: u64) -> Version {
        Version { time, node }
    }

    /// One of every message, with non-trivial field values, in tag order:
    /// the client's (13 to 21) come from their own module.
    fn every_frame() -> Vec<Frame> {
        let mut frames = vec![
            Frame::Hello {
                magic: MAGIC,
                protocol: PROTOCOL_VERSION,
                role: Role::Peer,
                node: 0xdead_beef,
                name: "s1".into(),
                listen_addr: "127.0.0.1:5000".into(),
                nonce: [7; 16],
                auth: true,
            },
            Frame::Auth { proof: [9; 20] },
            Frame::Error { code: ErrorCode::Unauthorized, message: "wrong secret".into() },
            Frame::Store {
                key: "photos/cat.png".into(),
                version: v(3, 42),
                size: 1 << 33,
                sha1: [1; 20],
            },
            Frame::Delete { key: "k".into(), version: v(4, 1) },
            Frame::Clear { version: v(9, 2) },
            Frame::Get { request: 77, key: "ключ".into() },
            Frame::File {
                request: 77,
                key: "ключ".into(),
                version: v(1, 1),
                size: 0,
                sha1: [2; 20],
            },
            Frame::NotFound { request: 5, key: "missing".into() },
            Frame::Summary { cleared: v(2, 2), hash: [3; 20], count: 12 },
            Frame::Digest {
                cleared: Version::ZERO,
                entries: vec![
                    DigestEntry { key: "a".into(), version: v(1, 1), tombstone: false },
                    DigestEntry { key: "b".into(), version: v(2, 1), tombstone: true },
                ],
            },
            Frame::Peers { addrs: vec!["127.0.0.1:5001".into(), "127.0.0.1:5002".into()] },
        ];
        frames.extend(client::tests::every_message().into_iter().map(Frame::Client));
        frames.extend([
            Frame::Corrupt { key: "rotten".into(), version: v(8, 3) },
            Frame::Announce {
                key: "photos/cat.png".into(),
                version: v(3, 42),
                size: 12,
                sha1: [2; 20],
            },
            Frame::Ping,
            Frame::Offer {
                request: 78,
                key: "photos/cat.png".into(),
                version: v(3, 42),
                size: 12,
                sha1: [4; 20],
            },
            Frame::GoAhead { request: 78, key: "photos/cat.png".into(), version: v(3, 42) },
            Frame::Release { request: 79 },
            Frame::PushesFrom { version: v(11, 42) },
        ]);
        frames
    }

    fn encode(frame: &Frame) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, frame).expect("encoding a valid frame into a Vec cannot fail");
        bytes
    }

    #[test]
    fn every_frame_round_trips() {
        for frame in every_frame() {
            let bytes = encode(&frame);
            let decoded = read_frame(&mut bytes.as_slice()).expect("decodes");
            assert_eq!(decoded, Some(frame));
        }
    }

    #[test]
    fn every_tag_is_covered_by_the_round_trip() {
        let tags: Vec<u8> = every_frame().iter().map(|f| f.tag() as u8).collect();
        assert_eq!(tags, (1..=Tag::PushesFrom as u8).collect::<Vec<_>>());
    }

    #[test]
    fn frames_read_back_to_back_then_clean_eof() {
        let mut bytes = encode(&Frame::Clear { version: v(1, 1) });
        bytes.extend(encode(&Frame::Client(client::Message::Ok)));
        let mut reader = bytes.as_slice();
        assert_eq!(read_frame(&mut reader).unwrap(), Some(Frame::Clear { version: v(1, 1) }));
        assert_eq!(read_frame(&mut reader).unwrap(), Some(Frame::Client(client::Message::Ok)));
        assert_eq!(read_frame(&mut reader).unwrap(), None);
    }

    /// Pins the byte layout: if this test has to change, old and new nodes
    /// can no longer talk to each other, and [`PROTOCOL_VERSION`] must move.
    #[test]
    fn delete_frame_bytes_are_pinned() {
        let bytes = encode(&Frame::Delete { key: "ab".into(), version: v(0x0102, 0x0a0b) });
        #[rustfmt::skip]
        let expected = [
            0, 0, 0, 21,                     // length: tag + 20 body bytes
            5,                               // tag: Delete
            0, 2, b'a', b'b',                // key: u16 length + UTF-8
            0, 0, 0, 0, 0, 0, 0x01, 0x02,    // version.time
            0, 0, 0, 0, 0, 0, 0x0a, 0x0b,    // version.node
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        for frame in every_frame() {
            let bytes = encode(&frame);
            for cut in 1..bytes.len() {
                let result = read_frame(&mut &bytes[..cut]);
                assert!(
                    matches!(result, Err(Error::Protocol(_))),
                    "{frame:?} cut at {cut} gave {result:?}"
                );
            }
        }
    }

    #[test]
    fn oversized_and_zero_lengths_are_refused_before_allocating() {
        for len in [0, MAX_FRAME_LEN + 1, u32::MAX] {
            let mut bytes = len.to_be_bytes().to_vec();
            bytes.push(Tag::Ok as u8);
            let err = read_frame(&mut bytes.as_slice()).unwrap_err();
            assert!(matches!(err, Error::Protocol(_)), "{len}: {err}");
        }
    }

    #[test]
    fn unknown_tag_is_refused() {
        for tag in [0u8, Tag::PushesFrom as u8 + 1, 200, 255] {
            let err = decode(&[tag]).unwrap_err();
            assert!(err.to_string().contains("unknown frame tag"), "{err}");
        }
    }

    #[test]
    fn bad_utf8_is_refused() {
        // NotFound { request: 1, key: [0xff, 0xfe] }
        let mut body = vec![Tag::NotFound as u8];
        body.extend(1u64.to_be_bytes());
        body.extend([0, 2, 0xff, 0xfe]);
        let err = decode(&body).unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut bytes = encode(&Frame::Client(client::Message::Ok));
        bytes[3] += 1; // the length now claims one more byte...
        bytes.push(0); // ...which is there, but belongs to no field
        let err = read_frame(&mut bytes.as_slice()).unwrap_err();
        assert!(err.to_string().contains("trailing"), "{err}");
    }

    #[test]
    fn bad_keys_are_refused_both_ways() {
        let long = "x".repeat(MAX_KEY_LEN + 1);
        for key in ["", long.as_str()] {
            let frame = Frame::Delete { key: key.into(), version: v(1, 1) };
            assert!(write_frame(&mut Vec::new(), &frame).is_err());
            // Hand-encode it anyway: the decoder must refuse it too.
            let mut body = vec![Tag::Delete as u8];
            body.extend((key.len() as u16).to_be_bytes());
            body.extend(key.as_bytes());
            body.extend([0u8; 16]);
            assert!(decode(&body).is_err());
        }
        assert!(check_key(&"x".repeat(MAX_KEY_LEN)).is_ok());
        assert!(check_key("../../etc/passwd\0\n").is_ok());
    }

    #[test]
    fn list_counts_larger_than_the_frame_are_refused() {
        // Peers claiming 4 billion addresses in a 5-byte body.
        let mut body = vec![Tag::Peers as u8];
        body.extend(u32::MAX.to_be_bytes());
        let err = decode(&body).unwrap_err();
        assert!(err.to_string().contains("room"), "{err}");
    }

    #[test]
    fn bad_enum_bytes_are_refused() {
        // A Hello whose role byte is 9.
        let mut bytes = encode(&every_frame()[0]);
        bytes[4 + 1 + 4 + 2] = 9;
        assert!(read_frame(&mut bytes.as_slice()).is_err());
        // An Error frame whose code is 0, and a boolean that is 2.
        assert!(decode(&[Tag::Error as u8, 0, 0, 0]).is_err());
        let mut listing = vec![Tag::Listing as u8, 0, 0, 0, 0, 2];
        assert!(decode(&listing).is_err());
        listing[5] = 1;
        assert!(decode(&listing).is_ok());
    }
}
