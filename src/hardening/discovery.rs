//! Hardening: staying connected — bootstrap diallers and peer discovery.
//!
//! A node is started with a few bootstrap addresses. For each, a dialler
//! thread keeps a connection open, redialling with backoff while the
//! address is unreachable ([`Redial`]: the wait starts at
//! [`DIAL_RETRY_MIN`] and doubles up to [`crate::Config::dial_retry_max`];
//! the address going down and coming back are logged once each, not every
//! attempt). With discovery on, connected peers also tell each other whom
//! they know (`Peers` frames, at connect time and every anti-entropy
//! interval), and a node dials the ones it lacks, up to
//! [`crate::Config::max_peers`]. A node at its inbound cap declines a
//! dialler with the same kind of list (see `listener`); a discovered
//! address whose dial failed or was declined is not dialled again by
//! discovery for `dial_retry_max`, so declined nodes are not hammered.
//!
//! Hooks into the core at three points: `FileServer::start` calls
//! [`start`], `Node::run_peer` greets each new peer here, and the handler
//! passes `Peers` frames here. Every connection it opens runs through
//! `Host::run_connection`, like an accepted one.

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info};

use crate::error::{Error, Result, lock};
use crate::frame::Frame;
use crate::host::Host;
use crate::transport::{Outbound, Transport};

/// The first wait before redialling an address that did not answer.
pub(crate) const DIAL_RETRY_MIN: Duration = Duration::from_millis(100);

/// A connection that lasts this long was a real one: the next dial of its
/// address may come at once. One that ends sooner (declined by a busy
/// node, refused in the handshake, a duplicate) backs off like a failed
/// dial, never a busy loop.
pub(crate) const SETTLED: Duration = Duration::from_secs(1);

/// How long to wait for a TCP connection to a peer to open.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The most discovered addresses held off at once (see [`Discovery`]): a
/// peer listing bogus addresses cannot grow the table past this.
const MAX_HELD_OFF: usize = 256;

/// Discovery's dials: under way, and held off.
#[derive(Default)]
pub(crate) struct Discovery {
    /// Addresses being dialled, so there is one dial per address at a
    /// time. Leaf lock.
    dialling: Mutex<HashSet<SocketAddr>>,
    /// Addresses whose last discovery dial failed or ended at once (a busy
    /// node declined us, say), and until when discovery leaves them alone.
    /// At most [`MAX_HELD_OFF`]. Leaf lock.
    held_off: Mutex<HashMap<SocketAddr, Instant>>,
}

/// Starts one dialler per bootstrap address, and the discovery timer.
pub(crate) fn start(node: &Arc<dyn Host>) {
    for addr in node.config().bootstrap.clone() {
        let dialler = Arc::clone(node);
        node.threads()
            .spawn(format!("{} TL read", node.name()), move || dial_loop(&dialler, &addr));
    }
    if node.config().discover_peers {
        let timer = Arc::clone(node);
        node.threads().spawn(format!("{} discovery", node.name()), move || {
            while !timer.threads().wait_for_stop(timer.config().anti_entropy_interval) {
                let peers = peers_frame(&*timer);
                for peer in timer.peers().handles() {
                    peer.queue(Outbound::Frame(peers.clone()));
                }
            }
        });
    }
}

/// A new peer hears whom we know.
pub(crate) fn greet(node: &dyn Host, peer: &Transport) {
    if node.config().discover_peers {
        peer.queue(Outbound::Frame(peers_frame(node)));
    }
}

fn peers_frame(node: &dyn Host) -> Frame {
    let peers = node.peers().handles().into_iter();
    let addrs = peers.map(|p| p.peer.listen_addr.clone()).collect();
    Frame::Peers { addrs }
}

/// A bootstrap dialler: keeps this node connected to `addr`, redialling
/// with backoff while it is unreachable or ends our connections at once.
fn dial_loop(node: &Arc<dyn Host>, addr: &str) {
    let mut redial = Redial::default();
    while !node.threads().wait_for_stop(redial.wait(Instant::now())) {
        let target = match resolve(addr) {
            Ok(target) => target,
            Err(err) => {
                redial.record(&**node, addr, Dialled::Unreachable(&err));
                continue;
            }
        };
        // Connected already (it dialled us, and that connection won): look
        // again in a while, without counting it as a failure.
        if node.peers().connected_to(target) {
            redial.next_try = Some(Instant::now() + SETTLED);
            continue;
        }
        dial_and_run(node, target, &mut |dialled| redial.record(&**node, addr, dialled));
    }
}

/// What one dial came to, for [`Redial::record`].
pub(crate) enum Dialled<'a> {
    /// The TCP connection did not open (or the name did not resolve).
    Unreachable(&'a Error),
    /// The TCP connection opened.
    Connected,
    /// The connection ended, after `lasted`.
    Ended { lasted: Duration, result: &'a Result<()> },
}

/// One address's redial state: the backoff, and whether it is down. Each
/// failed dial (unreachable, or a connection that ended within
/// [`SETTLED`]) doubles the wait before the next, from [`DIAL_RETRY_MIN`]
/// up to [`crate::Config::dial_retry_max`]; a connection that lasted
/// resets it. The address going down (the first dial that cannot connect)
/// and coming back (the first that can) are logged at info, once each;
/// the attempts between are logged at debug.
#[derive(Clone, Debug, Default)]
pub(crate) struct Redial {
    /// Failed dials in a row.
    failures: u32,
    /// Since when every dial has failed to connect; `None` while it
    /// answers. Liveness forgets a remembered address down for long.
    down_since: Option<Instant>,
    /// No dial before this (`None`: at once).
    next_try: Option<Instant>,
}

impl Redial {
    /// How long to wait, from `now`, before the next dial.
    pub fn wait(&self, now: Instant) -> Duration {
        self.next_try.map_or(Duration::ZERO, |at| at.saturating_duration_since(now))
    }

    /// How long the address has been down, if it is.
    pub fn down_for(&self, now: Instant) -> Option<Duration> {
        self.down_since.map(|since| now.saturating_duration_since(since))
    }

    /// The address answered (a dial connected, or a peer listening there
    /// registered with us): logs that it is back, if it was down.
    pub fn answered(&mut self, node: &dyn Host, addr: &str) {
        if let Some(since) = self.down_since.take() {
            let down = since.elapsed();
            info!(target: node.name(), "Peer addr={addr} is reachable again after {down:?}");
        }
    }

    /// Records what a dial of `addr` came to, logs it by the rule above,
    /// and sets the next try.
    pub fn record(&mut self, node: &dyn Host, addr: &str, dialled: Dialled<'_>) {
        let now = Instant::now();
        let cap = node.config().dial_retry_max;
        match dialled {
            Dialled::Connected => self.answered(node, addr),
            Dialled::Unreachable(err) => {
                let wait = self.failed(now, cap);
                if self.down_since.is_none() {
                    self.down_since = Some(now);
                    info!(
                        target: node.name(),
                        "Peer addr={addr} is unreachable ({err}); redialling with backoff up to {cap:?}"
                    );
                } else {
                    debug!(target: node.name(), "Peer addr={addr} is still unreachable ({err}); retrying in {wait:?}");
                }
            }
            Dialled::Ended { lasted, result } if lasted >= SETTLED => {
                self.failures = 0;
                self.next_try = Some(now + DIAL_RETRY_MIN);
                if let Err(err) = result {
                    info!(target: node.name(), "Connection to {addr} ended: {err}");
                }
            }
            Dialled::Ended { result, .. } => {
                let wait = self.failed(now, cap);
                let why = result.as_ref().err().map_or("closed".to_string(), Error::to_string);
                debug!(target: node.name(), "Connection to {addr} ended at once ({why}); retrying in {wait:?}");
            }
        }
    }

    /// Counts a failed dial and sets the next try; returns the wait:
    /// [`DIAL_RETRY_MIN`], doubled for each failure in a row after the
    /// first, at most `cap`.
    fn failed(&mut self, now: Instant, cap: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let doublings = (self.failures - 1).min(30);
        let wait = DIAL_RETRY_MIN.saturating_mul(1 << doublings).min(cap);
        self.next_try = Some(now + wait);
        wait
    }
}

/// Dials `target` on the calling thread and runs the connection it opens
/// to its end, telling `report` what happened at each step.
pub(crate) fn dial_and_run(
    node: &Arc<dyn Host>,
    target: SocketAddr,
    report: &mut dyn FnMut(Dialled<'_>),
) {
    match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
        Ok(stream) => {
            report(Dialled::Connected);
            let started = Instant::now();
            let result = Arc::clone(node).run_connection(stream, true);
            report(Dialled::Ended { lasted: started.elapsed(), result: &result });
        }
        Err(err) => report(Dialled::Unreachable(&Error::from(err))),
    }
}

/// A peer's list of its peers (which may name us, or hold empty or bad
/// addresses: those are skipped): dial the ones we lack, up to `max_peers`.
pub(crate) fn on_peers(node: &Arc<dyn Host>, addrs: &[String]) {
    if !node.config().discover_peers {
        return;
    }
    // A hostile frame may list thousands of addresses: consider no more than
    // we could use.
    for addr in addrs.iter().take(node.config().max_peers) {
        if let Ok(target) = addr.parse::<SocketAddr>() {
            Arc::clone(node).dial(target, "discovered");
        }
    }
}

/// Dials `target` once, on a thread of its own, unless it is us, already
/// connected, being dialled or held off, or the node has `max_peers`
/// connections (counting dials under way). `why` is for the log.
pub(crate) fn dial_once(
    node: Arc<dyn Host>,
    discovery: &Arc<Discovery>,
    target: SocketAddr,
    why: &str,
) {
    let dialling = lock(&discovery.dialling).len();
    let config = node.config();
    let full = node.peers().handles().len() + dialling >= config.max_peers;
    let ours = target == node.listen_addr() || config.advertise == Some(target.to_string());
    if full || ours || node.peers().connected_to(target) {
        return;
    }
    if lock(&discovery.held_off).get(&target).is_some_and(|until| Instant::now() < *until) {
        return; // it failed or declined us a moment ago
    }
    if !lock(&discovery.dialling).insert(target) {
        return; // already under way
    }
    debug!(target: node.name(), "Dialling {why} peer addr={target}");
    let (dialler, discovery) = (Arc::clone(&node), Arc::clone(discovery));
    node.threads().spawn(format!("{} TL read", node.name()), move || {
        let mut lasted = false;
        dial_and_run(&dialler, target, &mut |dialled| match dialled {
            // From the handshake on it is a connection like any other: no
            // longer a dial under way.
            Dialled::Connected => drop(lock(&discovery.dialling).remove(&target)),
            Dialled::Unreachable(err) => {
                debug!(target: dialler.name(), "Cannot reach discovered peer addr={target}: {err}");
            }
            Dialled::Ended { lasted: took, result } => {
                lasted = took >= SETTLED;
                match result {
                    Err(err) if lasted => {
                        info!(target: dialler.name(), "Connection to {target} ended: {err}")
                    }
                    Err(err) => {
                        debug!(target: dialler.name(), "Connection to {target} ended at once: {err}")
                    }
                    Ok(()) => {}
                }
            }
        });
        lock(&discovery.dialling).remove(&target);
        if !lasted {
            hold_off(&discovery, target, dialler.config().dial_retry_max);
        }
    });
}

/// Leaves `target` alone for `wait`: discovery will not dial it before.
fn hold_off(discovery: &Discovery, target: SocketAddr, wait: Duration) {
    let now = Instant::now();
    let mut held_off = lock(&discovery.held_off);
    if held_off.len() >= MAX_HELD_OFF {
        held_off.retain(|_, until| now < *until);
    }
    // Still full of live entries: this one goes unrecorded, and may be
    // dialled again sooner; the table stays bounded.
    if held_off.len() < MAX_HELD_OFF {
        held_off.insert(target, now + wait);
    }
}

/// The first address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| Error::Config(format!("{addr} resolves to no address")))
}
