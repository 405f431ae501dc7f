//! The binary's own modules: the command line's client, the demo and the
//! benchmark. None of this is part of the library; like any other program,
//! it uses only the library's public API.
//!
//! - [`client`]: the command line's side of the protocol (`put`, `get`,
//!   `rm`, `ls`, `clear`, `status`).
//! - [`demo`]: what `make run` runs.
//! - [`bench`]: what `make bench` runs.

use std::io;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

pub mod bench;
pub mod client;
pub mod demo;

/// The buffer for moving file content between a socket and a file: the size
/// a node uses for its own, so the client and the benchmark's baselines
/// read and write in the same steps as a node.
const STREAM_BUFFER_LEN: usize = 256 * 1024;

/// A fresh directory under the system temp directory for one run of the
/// demo or the benchmark, removed when dropped, however the run ends.
struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates `gossipfs-WHAT-PID-NANOS`. The process id keeps two runs at
    /// once apart, the time keeps a run apart from an earlier one's
    /// leftovers; `create_dir` fails rather than share a directory.
    fn new(what: &str) -> io::Result<ScratchDir> {
        let nanos =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |since| since.as_nanos());
        let path =
            std::env::temp_dir().join(format!("gossipfs-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir(&path)?;
        Ok(ScratchDir(path))
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
