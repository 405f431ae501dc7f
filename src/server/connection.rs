//! Connections in and out: the accept loop, the diallers, the handshake's
//! aftermath (a peer is registered, greeted and read from; a client gets a
//! session), and the reader loop that takes one frame at a time under the
//! peer's transport lock and hands it to `replication`.

use super::*;

impl Node {
    /// The accept thread: one connection thread per accepted socket.
    pub(super) fn accept_loop(self: Arc<Self>, listener: TcpListener) {
        for stream in listener.incoming() {
            if self.stopping.load(Ordering::SeqCst) {
                break;
            }
            let stream = match stream {
                Ok(stream) => stream,
                Err(err) => {
                    // Out of file descriptors, say: back off a little rather
                    // than spin, and keep serving the connections we have.
                    warn!(target: self.name(), "Accept failed: {err}");
                    self.wait_for_stop(ACCEPT_RETRY_INTERVAL);
                    continue;
                }
            };
            let socket = match self.track(&stream) {
                Ok(Some(socket)) => socket,
                Ok(None) => {
                    self.refuse_busy(&stream);
                    continue;
                }
                Err(err) => {
                    warn!(target: self.name(), "Dropping a new connection: {err}");
                    continue;
                }
            };
            let node = Arc::clone(&self);
            self.spawn(move || {
                let addr = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                if let Err(err) = node.run_connection(stream, false) {
                    info!(target: node.name(), "Connection from {addr} ended: {err}");
                }
                drop(socket); // the connection is over: free its slot
            });
        }
        debug!(target: self.name(), "Accept loop stopped");
    }

    /// Registers a new connection's socket, so shutdown can close it
    /// whatever state it is in, and counts it against [`MAX_CONNECTIONS`]:
    /// `None` if the node is full. The count and the insert happen under one
    /// lock, so a burst of connections cannot slip past the limit.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be cloned.
    fn track(self: &Arc<Self>, stream: &TcpStream) -> Result<Option<SocketGuard>> {
        let handle = stream.try_clone()?;
        let mut sockets = lock(&self.sockets);
        if sockets.len() >= MAX_CONNECTIONS {
            return Ok(None);
        }
        let id = self.next_socket.fetch_add(1, Ordering::Relaxed);
        sockets.insert(id, handle);
        Ok(Some(SocketGuard {
            node: Arc::clone(self),
            id,
        }))
    }

    /// Turns away a connection over [`MAX_CONNECTIONS`] with a `Busy` error.
    fn refuse_busy(&self, stream: &TcpStream) {
        let addr = stream
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        warn!(target: self.name(), "Refusing connection from {addr}: {MAX_CONNECTIONS} are open");
        let busy = Frame::Error {
            code: ErrorCode::Busy,
            message: format!("the node has {MAX_CONNECTIONS} connections open; try later"),
        };
        // A fresh socket's send buffer takes one small frame without
        // blocking; if the write fails, the close says enough.
        let _ = write_frame(&mut &*stream, &busy);
    }

    /// A bootstrap dialler: keeps this node connected to `addr`, redialling
    /// with exponential backoff while it is unreachable.
    pub(super) fn dial_loop(self: Arc<Self>, addr: String) {
        let mut backoff = DIAL_RETRY_MIN;
        while !self.stopping.load(Ordering::SeqCst) {
            let target = match resolve(&addr) {
                Ok(target) => target,
                Err(err) => {
                    warn!(target: self.name(), "Cannot resolve bootstrap peer {addr}: {err}");
                    self.wait_for_stop(DIAL_RETRY_MAX);
                    continue;
                }
            };
            // Connected already (it dialled us, and that connection won).
            if self.connected_to(target) {
                self.wait_for_stop(DIAL_RETRY_MAX);
                continue;
            }
            match TcpStream::connect_timeout(&target, CONNECT_TIMEOUT) {
                Ok(stream) => {
                    let started = Instant::now();
                    if let Err(err) = self.run_dialled(stream) {
                        info!(target: self.name(), "Connection to {addr} ended: {err}");
                    }
                    // A connection that lasted was a real one: after it, try
                    // again soon. One that ended at once (refused, a wrong
                    // secret, a duplicate) backs off like a failed dial, so
                    // it never turns into a busy loop.
                    if started.elapsed() >= DIAL_RETRY_MAX {
                        backoff = DIAL_RETRY_MIN;
                    }
                }
                Err(err) => {
                    debug!(target: self.name(), "Cannot reach {addr} ({err}); retrying in {backoff:?}");
                }
            }
            self.wait_for_stop(backoff);
            backoff = (backoff * 2).min(DIAL_RETRY_MAX);
        }
    }

    /// Dials a peer we were told about, once.
    pub(super) fn dial_once(self: &Arc<Self>, target: SocketAddr) {
        if !lock(&self.dialling).insert(target) {
            return; // already under way
        }
        let node = Arc::clone(self);
        self.spawn(move || {
            // `run_connection` takes the target out of `dialling` once the
            // handshake is done; this catches every way of failing before.
            let result = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
                .map_err(Error::from)
                .and_then(|stream| node.run_dialled(stream));
            lock(&node.dialling).remove(&target);
            if let Err(err) = result {
                info!(target: node.name(), "Connection to {target} ended: {err}");
            }
        });
    }

    /// A connection we dialled: it takes a slot under [`MAX_CONNECTIONS`]
    /// like an accepted one, then runs until it closes.
    fn run_dialled(self: &Arc<Self>, stream: TcpStream) -> Result<()> {
        let Some(socket) = self.track(&stream)? else {
            return Err(Error::Busy(format!(
                "{MAX_CONNECTIONS} connections are open"
            )));
        };
        let result = self.run_connection(stream, true);
        drop(socket); // the connection is over: free its slot
        result
    }

    /// One connection, from handshake to close. Runs on the connection's own
    /// thread and returns when the connection ends.
    ///
    /// The caller has registered the socket with [`Node::track`] and holds
    /// its guard until this returns.
    fn run_connection(self: &Arc<Self>, stream: TcpStream, outbound: bool) -> Result<()> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(Error::Closed);
        }
        let hello = handshake(&stream, &self.identity(), outbound)?;
        if outbound {
            // A discovery dial stops counting as "under way" once it has a
            // handshake: from here it is a peer, or it is dropped.
            lock(&self.dialling).remove(&stream.peer_addr()?);
        }
        match hello.role {
            Role::Peer => self.run_peer(stream, hello, outbound),
            Role::Client => self.serve_client(stream),
        }
    }

    /// Who we are, for the handshake.
    fn identity(&self) -> Identity {
        Identity {
            role: Role::Peer,
            node: self.id(),
            name: self.config.name.clone(),
            listen_addr: self.listen_addr.to_string(),
            secret: self.config.secret.clone(),
        }
    }

    /// A peer connection after its handshake: start its writer, register
    /// it, greet it, and read from it until it closes.
    fn run_peer(self: &Arc<Self>, stream: TcpStream, hello: Hello, outbound: bool) -> Result<()> {
        if hello.node == self.id() {
            return Err(Error::Protocol("connected to ourselves".into()));
        }
        let idle =
            (self.config.idle_timeout).max(self.config.anti_entropy_interval.saturating_mul(3));
        let (peer, writer, rx) = Peer::new(self.name(), stream, hello, outbound, idle)?;
        let peer = Arc::new(peer);
        let node = Arc::clone(self);
        self.spawn(move || {
            if let Err(err) = peer::write_loop(writer, rx, &node.store, &node.traffic, node.name())
            {
                debug!(target: node.name(), "Writer stopped: {err}");
            }
        });
        if !self.register(&peer) {
            debug!(target: self.name(), "Dropping duplicate connection to peer={}", peer.name());
            peer.close();
            return Ok(());
        }
        info!(
            target: self.name(),
            "Connected to peer={} addr={} id={:016x}",
            peer.name(),
            peer.hello.listen_addr,
            peer.id()
        );
        self.greet(&peer);
        let result = self.read_loop(&peer);
        self.unregister(&peer);
        peer.close();
        self.answer_closed(peer.conn);
        result
    }

    /// A new peer hears who else we know and what we hold.
    fn greet(&self, peer: &Peer) {
        if self.config.discover_peers {
            peer.queue(Outbound::Frame(self.peers_frame()));
        }
        if self.config.anti_entropy {
            peer.queue(Outbound::Frame(self.summary_frame()));
        }
    }

    /// The reader loop of one peer connection: one frame at a time, each
    /// handled under the transport lock; relays and answers happen after the
    /// lock is released.
    fn read_loop(self: &Arc<Self>, peer: &Arc<Peer>) -> Result<()> {
        loop {
            let next = peer.read_next(|frame, stream| self.handle(peer, frame, stream))?;
            let Some(after) = next else {
                return Ok(()); // the peer closed the connection
            };
            self.counters
                .frames_received
                .fetch_add(1, Ordering::Relaxed);
            match after {
                After::Nothing => {}
                After::Relay(change) => self.relay(&change, Some(peer.id())),
                After::Answer(request, answer) => self.answer(request, peer.conn, answer),
            }
        }
    }

    /// Handles one frame from a peer, with that peer's transport lock held.
    /// `stream` holds the frame's file bytes, if it announced any.
    fn handle(self: &Arc<Self>, peer: &Peer, frame: Frame, stream: &mut Stream) -> Result<After> {
        match frame {
            Frame::Store {
                key,
                version,
                size,
                sha1,
            } => self.on_store(peer, key, version, size, sha1, stream),
            Frame::Delete { key, version } => self.on_delete(peer, key, version),
            Frame::Clear { version } => self.on_clear(peer, version),
            Frame::Get { request, key } => {
                // The peer side of the get diagram: "peer receives getfile".
                // The reader never writes: the writer sends the metadata and
                // streams the file (or says not found).
                debug!(target: self.name(), "Peer receives getfile key={key} from={}", peer.name());
                peer.queue(Outbound::File { request, key });
                Ok(After::Nothing)
            }
            Frame::File {
                request,
                key,
                version,
                size,
                sha1,
            } => self.on_file(peer, request, key, version, size, sha1, stream),
            Frame::NotFound { request, key } => {
                debug!(target: self.name(), "Peer has no file key={key} peer={}", peer.name());
                self.pull_answered(&key);
                Ok(After::Answer(request, GetAnswer::NotFound))
            }
            Frame::Summary { hash, count, .. } => {
                self.on_summary(peer, hash, count);
                Ok(After::Nothing)
            }
            Frame::Digest { cleared, entries } => {
                self.on_digest(peer, cleared, &entries)?;
                Ok(After::Nothing)
            }
            Frame::Peers { addrs } => {
                self.on_peers(&addrs);
                Ok(After::Nothing)
            }
            Frame::Corrupt { key, version } => {
                self.on_corrupt(peer, key, version);
                Ok(After::Nothing)
            }
            Frame::Error { code, message } => Err(Error::Protocol(format!(
                "the peer closed the connection ({code:?}): {message}"
            ))),
            other => Err(Error::Protocol(format!(
                "a peer may not send {:?} frames",
                other.tag()
            ))),
        }
    }
}

/// Removes a connection's socket from the node's list when it ends.
struct SocketGuard {
    node: Arc<Node>,
    id: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        lock(&self.node.sockets).remove(&self.id);
    }
}

/// The first address `addr` resolves to.
fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()?
        .next()
        .ok_or_else(|| Error::Protocol(format!("{addr} resolves to no address")))
}
