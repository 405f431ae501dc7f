//! The one error type of the library.
//!
//! Its variants are *kinds*, not call sites: a caller matches on
//! [`Error::NotFound`] to print "no such file", on [`Error::Unauthorized`] to
//! ask for the cluster secret, and treats the rest as "something broke, here
//! is why". The message inside each variant is for people, not for matching.

use std::{fmt, io};

/// A `Result` whose error is the library's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in gossipfs.
#[derive(Debug)]
pub enum Error {
    /// No node holds a live file under this key.
    NotFound(String),
    /// The key is empty, too long, or not a string we accept.
    BadKey(String),
    /// The other side broke the wire protocol: a bad frame, a bad magic, a
    /// stream whose bytes do not match the SHA-1 it announced.
    Protocol(String),
    /// The other side did not prove it knows the cluster secret (or we could
    /// not prove it to them).
    Unauthorized(String),
    /// Nobody answered in time.
    Timeout(String),
    /// The peers that might hold a file could not be asked: none is
    /// connected, or their connections closed before they answered. Unlike
    /// [`Error::NotFound`], this says nothing about whether the file exists.
    Unavailable(String),
    /// The node has as many connections as it accepts; try again later.
    Busy(String),
    /// Bytes that do not match their SHA-1: a file damaged on our disk,
    /// or a stream that arrived whole but wrong.
    Corrupt(String),
    /// The write lost: a newer version of the key (or a newer clear) was
    /// already held, so the write changed nothing.
    Superseded(String),
    /// A [`crate::Config`] the node cannot run with, or a root it cannot
    /// read.
    Config(String),
    /// The node is shutting down, or has shut down.
    Closed,
    /// The operating system said no: disk, socket, permissions.
    Io(io::Error),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotFound(key) => write!(f, "file not found: {key}"),
            Error::BadKey(why) => write!(f, "bad key: {why}"),
            Error::Protocol(why) => write!(f, "protocol error: {why}"),
            Error::Unauthorized(why) => write!(f, "unauthorized: {why}"),
            Error::Timeout(what) => write!(f, "timed out: {what}"),
            Error::Unavailable(why) => write!(f, "unavailable: {why}"),
            Error::Busy(why) => write!(f, "busy: {why}"),
            Error::Corrupt(why) => write!(f, "corrupt: {why}"),
            Error::Superseded(why) => write!(f, "superseded: {why}"),
            Error::Config(why) => write!(f, "bad config: {why}"),
            Error::Closed => write!(f, "the node is shut down"),
            Error::Io(err) => write!(f, "{err}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        if let Error::Io(err) = self { Some(err) } else { None }
    }
}

impl From<io::Error> for Error {
    fn from(err: io::Error) -> Self {
        // Only TimedOut: a socket read that hit its timeout says WouldBlock
        // on some platforms, and the node's sockets turn that into TimedOut
        // themselves (`TimeoutsAsTimedOut`). A WouldBlock from anything else
        // (a caller's own non-blocking reader) is that reader's business,
        // not "the other side went quiet".
        match err.kind() {
            io::ErrorKind::TimedOut => Error::Timeout(format!("the other side went quiet ({err})")),
            _ => Error::Io(err),
        }
    }
}

impl From<Error> for io::Error {
    /// Lets a library error travel through `std::io::Read`, whose methods can
    /// only return `io::Error` (used by a client session's upload reader,
    /// which reads frames).
    fn from(err: Error) -> Self {
        match err {
            Error::Io(err) => err,
            Error::NotFound(_) => io::Error::new(io::ErrorKind::NotFound, err),
            other => io::Error::other(other),
        }
    }
}

/// A socket's read side whose read timeout says `TimedOut`, not the
/// `WouldBlock` some platforms give, so that a peer's silence is never
/// mistaken for a caller's own non-blocking reader running dry (which
/// [`Error::from`] would not call a timeout).
pub(crate) struct TimeoutsAsTimedOut<R>(pub R);

impl<R: io::Read> io::Read for TimeoutsAsTimedOut<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf).map_err(|err| match err.kind() {
            io::ErrorKind::WouldBlock => {
                io::Error::new(io::ErrorKind::TimedOut, "nothing arrived in time")
            }
            _ => err,
        })
    }
}

/// Locks a mutex, ignoring poisoning.
///
/// Poisoning policy, decided once for the whole crate: a thread that panicked
/// while holding one of our locks leaves data that is still consistent,
/// because every critical section either finishes its update or changes
/// nothing (disk changes are atomic renames made before the in-memory
/// update). So the other threads carry on rather than cascade the panic.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_timed_out_socket_is_a_timeout() {
        let kind = |kind| Error::from(io::Error::from(kind));
        assert!(matches!(kind(io::ErrorKind::TimedOut), Error::Timeout(_)));
        // A caller's own non-blocking reader running dry is its business.
        assert!(matches!(kind(io::ErrorKind::WouldBlock), Error::Io(_)));
        // The node's sockets say TimedOut when a peer goes quiet.
        use std::io::Read;
        struct Dry;
        impl Read for Dry {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let err = TimeoutsAsTimedOut(Dry).read(&mut [0; 1]).unwrap_err();
        assert!(matches!(Error::from(err), Error::Timeout(_)));
    }
}
