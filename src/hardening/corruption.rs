//! Hardening: corruption reported by a peer.
//!
//! Every stream between nodes is checked against the SHA-1 its metadata
//! announced. When the bytes a node received do not match, it tells the
//! sender with a `Corrupt` frame, since the sender's own copy may be
//! damaged; a node told so re-reads its copy here ([`on_corrupt`]), through
//! the checking reader (`checked`), which takes a bad file out of service.
//!
//! Stands on the node's narrow interface ([`Host`]); the handler passes
//! `Corrupt` frames here.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use log::{info, warn};

use crate::error::lock;
use crate::host::Host;
use crate::support::version::Version;
use crate::transport::Transport;

/// How many of our files may be re-checked at once (each check is a thread
/// reading a whole file).
const MAX_CHECKS: usize = 4;

/// The keys being checked now. Leaf lock.
pub(crate) type Checks = Mutex<HashSet<String>>;

/// A peer says the bytes we sent for `key` failed their SHA-1. Check our
/// copy on a thread of its own, one check per key at a time, however many
/// reports arrive.
pub(crate) fn on_corrupt(
    node: &Arc<dyn Host>,
    checks: &Arc<Checks>,
    peer: &Transport,
    key: String,
    version: Version,
) {
    let ours = node.store().entry(&key).map(|entry| entry.version);
    let mut checking = lock(checks);
    // Not the copy we hold, already being checked, or enough checks running:
    // a flood of reports must not become a flood of threads.
    if ours != Some(version) || checking.len() >= MAX_CHECKS || !checking.insert(key.clone()) {
        return;
    }
    drop(checking); // a leaf lock: released before logging and spawning
    warn!(target: node.name(), "Checking our copy of key={key} version={version}: peer={} found it corrupt", peer.name());
    let (checker, checks) = (Arc::clone(node), Arc::clone(checks));
    node.threads().spawn(format!("{} check", node.name()), move || {
        let checked = checker.store().open_file(&key).and_then(|file| match file {
            Some(mut file) => Ok(std::io::copy(&mut file, &mut std::io::sink())?),
            None => Ok(0),
        });
        match checked {
            Ok(_) => info!(target: checker.name(), "Our copy of key={key} is sound"),
            Err(err) => warn!(target: checker.name(), "Our copy of key={key} is bad and was set aside: {err}"),
        }
        lock(&checks).remove(&key);
    });
}
