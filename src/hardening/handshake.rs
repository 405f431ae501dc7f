//! The handshake: who may connect. It hardens the connection step, and the
//! core can be read without it.
//!
//! # What it hardens
//!
//! Before a connection carries a single change or file, each side checks
//! that the other speaks gossipfs — the [`MAGIC`] bytes and the
//! [`PROTOCOL_VERSION`] — and, if the cluster has a secret, that the other
//! side knows it. A port scanner, a node of another protocol version or a
//! stranger without the secret is refused with a [`Frame::Error`] saying
//! why, and never reaches the gossip rules or the disk. Every read has
//! limits a stranger cannot stretch: one deadline for the whole handshake
//! ([`HANDSHAKE_TIMEOUT`]), a small frame limit
//! ([`MAX_HANDSHAKE_FRAME_LEN`]) and a name limit ([`MAX_NAME_LEN`]).
//!
//! # Where it hooks in
//!
//! [`handshake`] runs on a fresh connection, dialled or accepted, before the
//! connection's read loop and writer thread start: the node hands the
//! socket to those only once the handshake has returned a [`Hello`], which
//! says who is at the other end. A client runs the same handshake,
//! announcing [`Role::Client`].
//!
//! # Steps
//!
//! Both sides send [`Frame::Hello`] at once, without waiting for the other,
//! then read the other's: magic, protocol version, role, node id, name,
//! listen address, a fresh nonce. If both sides have a cluster secret, each
//! then sends [`Frame::Auth`]: HMAC-SHA1 over its side (dialler or acceptor)
//! and both nonces ([`auth_proof`]), and checks the other's proof in
//! constant time. If only one side has a secret, the connection is refused.
//! A failure is answered with [`Frame::Error`] before the connection closes.
//!
//! The secret authenticates; it does not encrypt. Everything after the
//! handshake, file content included, crosses the network in the clear.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha1::{Digest, Sha1};

use crate::error::{Error, Result, TimeoutsAsTimedOut};
use crate::frame::{
    ErrorCode, Frame, MAGIC, Nonce, PROTOCOL_VERSION, Role, Sha1Digest, read_frame_within,
    write_frame,
};
use crate::support::version::NodeId;

/// How long the other side has to complete the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The largest handshake frame accepted: a Hello carries two short strings,
/// so nothing honest comes near this, and a stranger cannot make the node
/// read a megabyte before it has proved anything.
pub const MAX_HANDSHAKE_FRAME_LEN: u32 = 4096;

pub use crate::frame::MAX_NAME_LEN;

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
    let mut reader = Deadline { stream, until: Instant::now() + HANDSHAKE_TIMEOUT };
    // Unbuffered too: `write_frame` writes each frame whole, in one write.
    let mut writer = stream;

    // Both sides speak first: Hello is small, so neither blocks.
    let my_nonce: Nonce = crate::random_bytes()?;
    write_frame(
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
    // Theirs: `nonce` is the other side's, `auth` says whether it has a secret.
    let Frame::Hello { magic, protocol, role, node, name, listen_addr, nonce, auth } =
        expect_frame(&mut reader, &mut writer, "Hello")?
    else {
        return refuse(&mut writer, ErrorCode::Protocol, "the first frame must be Hello");
    };
    if magic != MAGIC {
        return refuse(&mut writer, ErrorCode::Protocol, "bad magic: not a gossipfs connection");
    }
    if protocol != PROTOCOL_VERSION {
        let why = format!("protocol version {protocol} is not {PROTOCOL_VERSION}");
        return refuse(&mut writer, ErrorCode::Protocol, &why);
    }
    // A name goes into log lines and thread names: no control characters
    // (a NUL cannot be in a thread name, a newline would forge log lines).
    if name.len() > MAX_NAME_LEN || name.chars().any(char::is_control) {
        let why =
            format!("a node name is at most {MAX_NAME_LEN} bytes, without control characters");
        return refuse(&mut writer, ErrorCode::Protocol, &why);
    }
    if !listen_addr.is_empty() && listen_addr.parse::<SocketAddr>().is_err() {
        let why = format!("the listen address {listen_addr:?} is not ip:port");
        return refuse(&mut writer, ErrorCode::Protocol, &why);
    }
    // Both sides know which nonce the dialler sent and which the acceptor
    // sent; the proofs and the duplicate-connection rule are built on that.
    let (dialler_nonce, acceptor_nonce) =
        if outbound { (my_nonce, nonce) } else { (nonce, my_nonce) };
    let hello = Hello { role, node, name, listen_addr, dialler_nonce };

    let secret = match (&me.secret, auth) {
        (None, false) => return Ok(hello),
        (Some(secret), true) => secret,
        (None, true) => {
            let why = "the other side has a cluster secret and this side has none";
            return refuse(&mut writer, ErrorCode::Unauthorized, why);
        }
        (Some(_), false) => {
            let why = "this side has a cluster secret and the other side has none";
            return refuse(&mut writer, ErrorCode::Unauthorized, why);
        }
    };
    // Prove we know the secret, then check that they do. Each proof names
    // the side that makes it, so a proof we send can never pass for theirs.
    let mine = auth_proof(secret, outbound, &dialler_nonce, &acceptor_nonce);
    write_frame(&mut writer, &Frame::Auth { proof: mine })?;
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
    let side: &[u8] = if by_dialler { b"D" } else { b"A" };
    hmac_sha1(secret, &[b"gossipfs auth ", side, dialler, acceptor].concat())
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
            return Err(io::Error::new(io::ErrorKind::TimedOut, "the handshake took too long"));
        }
        self.stream.set_read_timeout(Some(left))?;
        TimeoutsAsTimedOut(self.stream).read(buf)
    }
}

/// Reads the next handshake frame; turns the other side's `Error` frame or
/// a closed connection into an error of ours. Bytes that are not a frame
/// (garbage, a length over the limit) are answered with an `Error` frame
/// before the connection closes, so the sender learns what went wrong.
fn expect_frame(reader: &mut impl Read, writer: &mut impl Write, what: &str) -> Result<Frame> {
    match read_frame_within(reader, MAX_HANDSHAKE_FRAME_LEN) {
        Err(Error::Protocol(why)) => refuse(writer, ErrorCode::Protocol, &why),
        Err(err) => Err(err),
        Ok(Some(Frame::Error { code, message })) => {
            Err(error_for(code, format!("the other side said: {message}")))
        }
        Ok(Some(frame)) => Ok(frame),
        Ok(None) => Err(Error::Protocol(format!("the connection closed before the {what} frame"))),
    }
}

/// Tells the other side why we are closing, then fails with the same words.
fn refuse<T>(writer: &mut impl Write, code: ErrorCode, why: &str) -> Result<T> {
    // Best effort: the connection is being dropped whatever happens.
    let _ = write_frame(writer, &Frame::Error { code, message: why.to_string() });
    Err(error_for(code, why.to_string()))
}

/// The error of ours for an `Error` frame's code, sent or received.
fn error_for(code: ErrorCode, why: String) -> Error {
    match code {
        ErrorCode::Unauthorized => Error::Unauthorized(why),
        ErrorCode::Busy => Error::Busy(why),
        _ => Error::Protocol(why),
    }
}

/// HMAC-SHA1 (RFC 2104) of `message` under `key`, built on the `sha1` crate.
fn hmac_sha1(key: &[u8], message: &[u8]) -> Sha1Digest {
    const BLOCK: usize = 64;
    // Keys longer than a block are hashed first; shorter ones zero-padded.
    let mut block_key = [0u8; BLOCK];
    if key.len() > BLOCK {
        block_key[..20].copy_from_slice(&Sha1::digest(key));
    } else {
        block_key[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block_key.map(|k| k ^ byte);
    let inner = Sha1::new().chain_update(pad(0x36)).chain_update(message).finalize();
    Sha1::new().chain_update(pad(0x5c)).chain_update(inner).finalize().into()
}

/// Compares two digests in time that does not depend on where they differ,
/// so an attacker cannot find a valid proof byte by byte.
fn constant_time_eq(a: &Sha1Digest, b: &Sha1Digest) -> bool {
    a.iter().zip(b).fold(0u8, |diff, (x, y)| diff | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::read_frame;

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
            hex(hmac_sha1(&[0xaa; 80], b"Test Using Larger Than Block-Size Key - Hash Key First")),
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
        let Some(Frame::Hello { nonce: node_nonce_1, .. }) = read_frame(&mut first).unwrap() else {
            panic!("the node speaks first with a Hello");
        };
        write_frame(&mut first, &hello_with([1; 16])).unwrap();
        let Some(Frame::Auth { .. }) = read_frame(&mut first).unwrap() else {
            panic!("the node proves itself on the first connection");
        };

        let (mut second, second_node) = node_side(secret);
        read_frame(&mut second).unwrap();
        write_frame(&mut second, &hello_with(node_nonce_1)).unwrap();
        let Some(Frame::Auth { proof: reflected }) = read_frame(&mut second).unwrap() else {
            panic!("the node proves itself on the second connection");
        };
        drop(second);
        let _ = second_node.join();

        write_frame(&mut first, &Frame::Auth { proof: reflected }).unwrap();
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
            write_frame(&mut stranger, &hello_with(mine)).unwrap();
            read_frame(&mut stranger).unwrap();
            let proof = auth_proof(theirs, true, &mine, &nonce);
            write_frame(&mut stranger, &Frame::Auth { proof }).unwrap();
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
