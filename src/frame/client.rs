//! The command-line client's messages: what a `gossipfs` command (`put`,
//! `get`, `ls`, `rm`, `clear`, `status`) and the node it connects to say to
//! each other.
//!
//! A client runs the same handshake as a peer, announcing
//! [`Role::Client`], and the node then serves it a session rather than
//! gossip: the client sends one request and reads the whole answer before it
//! sends the next. Nothing here is unsolicited and nothing is relayed; a
//! node refuses these messages from a peer, and peer gossip from a client.
//!
//! # Framing
//!
//! Each message travels as a [`Frame::Client`] under the parent module's
//! framing: a `u32` length, the message's tag, its fields in the order its
//! variant lists them. The tags live in the one [`Tag`] enum, so a client
//! tag can never collide with a peer tag. Each request and its answer:
//!
//! - [`Message::List`] (13): one or more [`Message::Listing`] (14);
//! - [`Message::Status`] (15): [`Message::StatusReply`] (16);
//! - [`Message::Put`] (18) and its [`Message::Chunk`]s (19): [`Message::Ok`] (17);
//! - [`Message::Remove`] (20): [`Message::Ok`];
//! - [`Message::ClearAll`] (21): [`Message::Ok`].
//!
//! A client reads a file with the peers' own [`Frame::Get`], answered by
//! [`Frame::File`] or [`Frame::NotFound`]. Any request may instead be
//! answered by a [`Frame::Error`].
//!
//! # Uploads
//!
//! A [`Message::Put`] carries only the key. The content follows as
//! [`Message::Chunk`] frames, each followed by exactly its `size` raw bytes
//! outside any frame, and a chunk of size 0 ends it. Chunks, rather than one
//! size up front as in a peer's [`Frame::Store`], let a client stream a pipe
//! whose length it cannot know. A connection that ends before the empty
//! chunk stores nothing: the node drops the partial file.
//!
//! [`Role::Client`]: super::Role::Client
//! [`Frame::Client`]: super::Frame::Client
//! [`Frame::Get`]: super::Frame::Get
//! [`Frame::File`]: super::Frame::File
//! [`Frame::NotFound`]: super::Frame::NotFound
//! [`Frame::Error`]: super::Frame::Error
//! [`Frame::Store`]: super::Frame::Store

use super::{Body, Field, Tag, check_key, field, layout};
use crate::error::Result;
use crate::support::version::{NodeId, Version};

/// One line of a [`Message::Listing`]: a live file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListingEntry {
    /// The file's key.
    pub key: String,
    /// Its size in bytes.
    pub size: u64,
    /// The version of the store that wrote it.
    pub version: Version,
}

/// Every message of the client protocol but the shared ones (see the
/// module doc). Each variant says who sends it, when, and what the receiver
/// does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Client request: list the live files. Answered by [`Message::Listing`].
    List,

    /// The answer to [`Message::List`]: every live file, sorted by key, split
    /// over as many frames as needed; the last frame has `done` set.
    Listing {
        /// Some of the files.
        entries: Vec<ListingEntry>,
        /// True on the last frame of the answer.
        done: bool,
    },

    /// Client request: describe the node. Answered by
    /// [`Message::StatusReply`].
    Status,

    /// The answer to [`Message::Status`].
    StatusReply {
        /// The node's name.
        name: String,
        /// The node's id.
        node: NodeId,
        /// The address it listens on.
        listen_addr: String,
        /// Its connected peers, as `name (ip:port)` strings.
        peers: Vec<String>,
        /// How many live files it holds.
        files: u64,
        /// Their total size in bytes.
        bytes: u64,
    },

    /// The generic "done" answer to a client's change request.
    Ok,

    /// Client request: store what follows under `key`, as
    /// [`FileServer::store`](crate::FileServer::store) would. The content
    /// follows as [`Message::Chunk`]s, ended by an empty one, so a client can
    /// stream input whose length it does not know (a pipe). Answered by
    /// [`Message::Ok`] once the node has committed the file, or
    /// [`Frame::Error`](super::Frame::Error).
    Put {
        /// The key to store under.
        key: String,
    },

    /// A piece of a [`Message::Put`]'s content: exactly `size` raw bytes
    /// follow the frame. `size` 0 ends the content.
    Chunk {
        /// The number of content bytes that follow the frame.
        size: u32,
    },

    /// Client request: delete `key` everywhere. Answered by [`Message::Ok`],
    /// or [`Frame::Error`](super::Frame::Error) with
    /// [`ErrorCode::NotFound`](super::ErrorCode::NotFound).
    Remove {
        /// The key to delete.
        key: String,
    },

    /// Client request: delete every file everywhere. Answered by
    /// [`Message::Ok`].
    ClearAll,
}

// Smallest entry: 2 + 1 (key) + 8 (size) + 16 (version) bytes.
layout! { struct ListingEntry { key, size, version } min_len 27 }

// The layout of each message's body, as the parent's table lays out the
// peer frames'.
layout! {
    enum Message {
        List {},
        Listing { entries, done },
        Status {},
        StatusReply { name, node, listen_addr, peers, files, bytes },
        Ok {},
        Put { key },
        Chunk { size },
        Remove { key },
        ClearAll {},
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::frame::{Frame, read_frame, write_frame};

    /// One of every client message, with non-trivial field values, in tag
    /// order. The parent's round-trip tests splice these in among the peer
    /// frames, so every tag is covered in one place.
    pub(in crate::frame) fn every_message() -> Vec<Message> {
        vec![
            Message::List,
            Message::Listing {
                entries: vec![ListingEntry {
                    key: "a".into(),
                    size: 10,
                    version: Version { time: 1, node: 2 },
                }],
                done: true,
            },
            Message::Status,
            Message::StatusReply {
                name: "s1".into(),
                node: 1,
                listen_addr: "127.0.0.1:5000".into(),
                peers: vec!["s2 (127.0.0.1:5001)".into()],
                files: 3,
                bytes: 300,
            },
            Message::Ok,
            Message::Put { key: "from/stdin".into() },
            Message::Chunk { size: 65536 },
            Message::Remove { key: "k".into() },
            Message::ClearAll,
        ]
    }

    fn encode(message: Message) -> Vec<u8> {
        let mut bytes = Vec::new();
        write_frame(&mut bytes, &Frame::Client(message))
            .expect("encoding a valid frame into a Vec cannot fail");
        bytes
    }

    #[test]
    fn every_message_round_trips_as_a_client_frame() {
        for message in every_message() {
            let bytes = encode(message.clone());
            let decoded = read_frame(&mut bytes.as_slice()).expect("decodes");
            assert_eq!(decoded, Some(Frame::Client(message)));
        }
    }

    /// Pins the upload's framing: a chunk's size is a `u32` and its bytes
    /// follow outside the frame, so only the header is counted in the length.
    #[test]
    fn put_and_chunk_bytes_are_pinned() {
        let mut bytes = encode(Message::Put { key: "ab".into() });
        bytes.extend(encode(Message::Chunk { size: 0x0102 }));
        #[rustfmt::skip]
        let expected = [
            0, 0, 0, 5,                      // length: tag + 4 body bytes
            18,                              // tag: Put
            0, 2, b'a', b'b',                // key: u16 length + UTF-8
            0, 0, 0, 5,                      // length: tag + 4 body bytes
            19,                              // tag: Chunk
            0, 0, 0x01, 0x02,                // size: u32, the raw bytes' count
        ];
        assert_eq!(bytes, expected);
    }

    #[test]
    fn a_chunk_announces_its_stream() {
        assert_eq!(Frame::Client(Message::Chunk { size: 7 }).stream_len(), 7);
        assert_eq!(Frame::Client(Message::Put { key: "k".into() }).stream_len(), 0);
    }
}
