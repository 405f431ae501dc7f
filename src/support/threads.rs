//! A node's threads and how they stop. Every thread a node starts is kept
//! here and joined at shutdown, and every timer waits on a `Condvar` that
//! shutdown notifies, so a node stops at once instead of finishing a sleep.

use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crate::error::lock;

/// The threads of one node, and the flag that stops them.
#[derive(Default)]
pub(crate) struct Threads {
    /// Set once shutdown begins. With `stop_signal`, lets timers wait
    /// "this long, or until shutdown".
    stopping: Mutex<bool>,
    /// Notified when shutdown begins.
    stop_signal: Condvar,
    /// Every thread started and not yet joined.
    handles: Mutex<Vec<JoinHandle<()>>>,
}

impl Threads {
    /// Starts a thread named `name` and keeps its handle for
    /// [`Threads::join_all`]. Names say the node and the actor ("s1 TL
    /// read", "s1 Peer s2"), so a stack dump or a log sink can tell which
    /// actor of the diagrams a thread is. If the OS refuses a thread, the
    /// work is not done and the refusal is logged: the node goes on, short
    /// of that one thread.
    pub fn spawn(&self, name: String, work: impl FnOnce() + Send + 'static) {
        let mut handles = lock(&self.handles);
        // Forget threads that are done, so the list stays as long as the
        // number of live threads.
        handles.retain(|handle| !handle.is_finished());
        match thread::Builder::new().name(name).spawn(work) {
            Ok(handle) => handles.push(handle),
            Err(err) => log::error!("Could not start a thread: {err}"),
        }
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        *lock(&self.stopping)
    }

    /// Waits for `timeout` or until shutdown begins; true if it has.
    pub fn wait_for_stop(&self, timeout: Duration) -> bool {
        let (stopping, _) = self
            .stop_signal
            .wait_timeout_while(lock(&self.stopping), timeout, |stopping| !*stopping)
            .unwrap_or_else(PoisonError::into_inner);
        *stopping
    }

    /// Sets the flag and wakes every timer. Returns false if shutdown had
    /// begun already.
    pub fn begin_stop(&self) -> bool {
        // Set under the lock that timers check it under, so none misses it.
        let already = std::mem::replace(&mut *lock(&self.stopping), true);
        self.stop_signal.notify_all();
        !already
    }

    /// Joins every thread. Threads may start others while stopping (a
    /// connection accepted just now), so this joins until none are left.
    pub fn join_all(&self) {
        loop {
            let handles = std::mem::take(&mut *lock(&self.handles));
            if handles.is_empty() {
                return;
            }
            for handle in handles {
                let _ = handle.join();
            }
        }
    }
}
