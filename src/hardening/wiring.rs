//! Hardening: the core's hooks into its hardening, in one place.
//!
//! The node holds one [`Hardening`], the state its hardening modules keep,
//! and calls it at a few named steps of its own life: when it starts
//! ([`Hardening::start`]), when a peer connects ([`Hardening::greet`]),
//! when a peer sends a frame that neither diagram uses
//! ([`Hardening::handle`]), and when it stops ([`Hardening::stop`]). Each
//! hook hands the node, as [`Host`], to the modules that hook in there, so
//! `server` reads as the diagrams and this file as the list of what else
//! runs. Like every hardening module, it never imports `server`.

use std::net::TcpListener;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::frame::Frame;
use crate::hardening::{antientropy, corruption, discovery, listener, liveness, tombstones};
use crate::host::Host;
use crate::transport::Transport;

/// What the hardening modules keep for one node.
#[derive(Default)]
pub(crate) struct Hardening {
    /// The open connections under their cap (see `listener`).
    pub limits: listener::Limits,
    /// Diallers under way (see `discovery`).
    pub discovery: Arc<discovery::Discovery>,
    /// Our files being re-checked (see `corruption`).
    pub checks: Arc<corruption::Checks>,
    /// The peers we have known (see `liveness`).
    pub liveness: Arc<liveness::Liveness>,
}

impl Hardening {
    /// The node has started: the accept loop on `socket`, the diallers, the
    /// heartbeat, the tombstone sweeper and the anti-entropy timer.
    pub fn start(&self, node: &Arc<dyn Host>, socket: TcpListener) {
        let accept = Arc::clone(node);
        let name = node.name();
        node.threads()
            .spawn(format!("{name} accept"), move || listener::accept_loop(&accept, socket));
        discovery::start(node);
        liveness::start(node, &self.liveness);
        tombstones::start(node);
        if node.config().anti_entropy {
            let timer = Arc::clone(node);
            node.threads()
                .spawn(format!("{name} anti-entropy"), move || antientropy::timer_loop(&*timer));
        }
    }

    /// A peer has connected and is registered: remember its address, and
    /// swap peer lists and summaries with it.
    pub fn greet(&self, node: &dyn Host, peer: &Transport) {
        liveness::remember(node, &self.liveness, peer);
        discovery::greet(node, peer);
        antientropy::greet(node, peer);
    }

    /// A frame from `peer` that neither diagram uses: anti-entropy's
    /// summaries and digests, discovery's peer lists, corruption reports.
    ///
    /// # Errors
    ///
    /// [`Error::Protocol`] for a frame a peer may not send (one meant for
    /// the command line, say), or a digest that breaks its rules: the
    /// caller closes the connection.
    pub fn handle(&self, node: &Arc<dyn Host>, peer: &Transport, frame: Frame) -> Result<()> {
        match frame {
            Frame::Summary { hash, count, .. } => {
                antientropy::on_summary(&**node, peer, hash, count)
            }
            Frame::Digest { cleared, entries } => {
                antientropy::on_digest(&**node, peer, cleared, &entries)?;
            }
            Frame::Peers { addrs } => discovery::on_peers(node, &addrs),
            Frame::Corrupt { key, version } => {
                corruption::on_corrupt(node, &self.checks, peer, key, version);
            }
            other => {
                let why = format!("a peer may not send {:?} frames", other.tag());
                return Err(Error::Protocol(why));
            }
        }
        Ok(())
    }

    /// A frame delivered after its connection closed. All are dropped but a
    /// list of peers to try, which a node that declines us sends just
    /// before it closes (see `listener`).
    pub fn after_close(&self, node: &Arc<dyn Host>, frame: Frame) {
        if let Frame::Peers { addrs } = frame {
            discovery::on_peers(node, &addrs);
        }
    }

    /// Whether this node has ever had peers: if so, a `get` with none
    /// connected could not ask them, which is not "nobody has it".
    pub fn expects_peers(&self, node: &dyn Host) -> bool {
        liveness::expects_peers(node, &self.liveness)
    }

    /// The node is stopping: wake the accept loop, close every socket.
    pub fn stop(&self, node: &dyn Host) {
        listener::stop(node, &self.limits);
    }
}
