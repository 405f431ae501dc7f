//! gossipfs (crate doc written below once the layers exist).

pub mod client;
pub mod demo;
pub mod error;
pub mod frame;
pub mod gossip;
pub mod peer;
pub mod server;
pub mod store;
pub mod version;

pub use error::{Error, Result};
pub use server::{Config, FileInfo, FileServer, PeerInfo, Stats};
pub use store::FileReader;
/// `N` random bytes from the operating system, for node ids and nonces.
///
/// Reads `/dev/urandom`. Where that is missing (not Linux or a BSD), falls
/// back to hashing the time, the process id and a counter: unique enough
/// for ids and temp names, though not for secrets.
pub(crate) fn random_bytes<const N: usize>() -> [u8; N] {
    use std::io::Read;
    let mut bytes = [0u8; N];
    let from_os = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if from_os.is_err() {
        use sha1::Digest;
        use std::sync::atomic::{AtomicU64, Ordering};
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let mut filled = 0;
        while filled < N {
            let mut hasher = sha1::Sha1::new();
            hasher.update(format!("{:?}", std::time::SystemTime::now()).as_bytes());
            hasher.update(std::process::id().to_be_bytes());
            hasher.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_be_bytes());
            let block = hasher.finalize();
            let n = (N - filled).min(block.len());
            bytes[filled..filled + n].copy_from_slice(&block[..n]);
            filled += n;
        }
    }
    bytes
}
