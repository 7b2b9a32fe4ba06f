//! The fault proxy: one TCP listener in front of every node's TLS port,
//! through which all peer (Raft, forwarding, join) traffic flows.
//!
//! Each node advertises its proxy's address to the others and binds its
//! outgoing peer connections to its own loopback address
//! (`peer_source_ip = "127.0.0.<10+id>"`), so the proxy knows the caller of
//! every connection from its source address and the callee from the
//! listener. Every byte flowing from node `a` to node `b` — on a connection
//! either of them opened — obeys the current state of the directed link
//! `a → b`:
//!
//! - **healthy**, optionally with a **delay** (and jitter): bytes are
//!   forwarded `delay` after they were read, in order;
//! - **cut** (a partition, in one direction or both): bytes are read and
//!   held, not forwarded, until the link heals — then delivered in order,
//!   like TCP retransmitting after a partition. A cut link is a blackhole:
//!   the calling side sees its requests time out, never a reset. A new
//!   connection across a cut link (either direction) is accepted by the
//!   proxy's listener but not connected onwards until both directions
//!   heal, which is what a lost SYN looks like to the dialler (its own
//!   dial timeout fires);
//! - **reset** (an instant fault): every open connection between the two
//!   nodes is closed with RST on both sides.
//!
//! What it cannot do: duplicate or reorder messages. Peer traffic is a TLS
//! byte stream; a duplicated or reordered record fails TLS authentication
//! and only kills the connection (which a reset already does). Message
//! duplication and reordering are the deterministic simulation's job.
//!
//! Connections from an address that is no node's (the test process itself)
//! belong to "node 0", whose links are never faulted.
//!
//! Routes: a scenario may also send a client's traffic through the proxy
//! ([`FaultNet::add_route`]): a listener per (client tag, server) whose
//! connections count as coming from the pseudo-node `tag`, so the client
//! can be cut off from the cluster like a node.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

/// Chunks held per connection direction while a link is cut or slow
/// (16 KiB each); beyond that the proxy stops reading and TCP backpressure
/// reaches the sender.
const HELD_CHUNKS: usize = 256;
/// A connection accepted across a cut link is dropped if the link does not
/// heal within this long (the dialler gave up long before).
const PENDING_MAX: Duration = Duration::from_secs(60);

/// The loopback address node `id` binds its outgoing peer connections to.
pub fn source_ip(id: u64) -> IpAddr {
    let last = u8::try_from(10 + id).expect("node ids up to 245");
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

fn node_of(ip: IpAddr) -> u64 {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if o[0] == 127 && o[1] == 0 && o[2] == 0 && o[3] > 10 {
                u64::from(o[3]) - 10
            } else {
                0
            }
        }
        IpAddr::V6(_) => 0,
    }
}

/// The state of one directed link.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Link {
    pub cut: bool,
    pub delay_ms: u64,
    pub jitter_ms: u64,
}

/// Counters.
#[derive(Debug, Default)]
pub struct ProxyStats {
    pub connections: AtomicU64,
    pub resets: AtomicU64,
    pub bytes: AtomicU64,
    /// Connections dropped because their link stayed cut.
    pub abandoned: AtomicU64,
}

struct ConnCtl {
    a: u64,
    b: u64,
    kill: Notify,
}

#[derive(Default)]
struct State {
    links: BTreeMap<(u64, u64), Link>,
    upstream: BTreeMap<u64, SocketAddr>,
    conns: Vec<Weak<ConnCtl>>,
}

struct Shared {
    state: Mutex<State>,
    changed: watch::Sender<u64>,
    stats: ProxyStats,
    rng: Mutex<u64>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn link(&self, from: u64, to: u64) -> Link {
        if from == 0 || to == 0 {
            return Link::default();
        }
        self.lock()
            .links
            .get(&(from, to))
            .copied()
            .unwrap_or_default()
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v += 1);
    }

    fn jitter(&self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut s = self.rng.lock().unwrap_or_else(|p| p.into_inner());
        // xorshift64*
        *s ^= *s >> 12;
        *s ^= *s << 25;
        *s ^= *s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d) % (max + 1)
    }
}

/// The proxies of one cluster and the faults on their links. Dropping it
/// stops every proxy (its runtime shuts down, closing all connections).
pub struct FaultNet {
    shared: Arc<Shared>,
    rt: Option<tokio::runtime::Runtime>,
    listeners: BTreeMap<u64, SocketAddr>,
}

impl FaultNet {
    pub fn new(seed: u64) -> FaultNet {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fault-proxy")
            .enable_all()
            .build()
            .expect("proxy runtime");
        let (changed, _) = watch::channel(0);
        FaultNet {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                changed,
                stats: ProxyStats::default(),
                rng: Mutex::new(seed | 1),
            }),
            rt: Some(rt),
            listeners: BTreeMap::new(),
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime present until drop")
    }

    /// Start the proxy of node `id` (listening on 127.0.0.1, any port);
    /// returns its address. Set where it forwards with
    /// [`FaultNet::set_upstream`].
    pub fn add_node(&mut self, id: u64) -> SocketAddr {
        let listener = self
            .rt()
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind a proxy port");
        let addr = listener.local_addr().expect("proxy address");
        let shared = self.shared.clone();
        self.rt().spawn(accept_loop(listener, id, shared));
        self.listeners.insert(id, addr);
        addr
    }

    /// A listener whose connections count as coming from the pseudo-node
    /// `tag` (a client) and go to node `to`'s upstream.
    pub fn add_route(&mut self, tag: u64, to: u64) -> SocketAddr {
        let listener = self
            .rt()
            .block_on(TcpListener::bind("127.0.0.1:0"))
            .expect("bind a route port");
        let addr = listener.local_addr().expect("route address");
        let shared = self.shared.clone();
        self.rt().spawn(accept_loop_from(listener, tag, to, shared));
        addr
    }

    pub fn proxy_addr(&self, id: u64) -> SocketAddr {
        self.listeners[&id]
    }

    /// Where node `id`'s proxy forwards to (the node's real TLS address).
    pub fn set_upstream(&self, id: u64, addr: SocketAddr) {
        self.shared.lock().upstream.insert(id, addr);
    }

    pub fn stats(&self) -> &ProxyStats {
        &self.shared.stats
    }

    /// Set the directed link `from → to`.
    pub fn set_link(&self, from: u64, to: u64, link: Link) {
        {
            let mut st = self.shared.lock();
            if link == Link::default() {
                st.links.remove(&(from, to));
            } else {
                st.links.insert((from, to), link);
            }
        }
        self.shared.bump();
    }

    /// Cut `from → to` (one direction).
    pub fn cut(&self, from: u64, to: u64) {
        let mut l = self.shared.link(from, to);
        l.cut = true;
        self.set_link(from, to, l);
    }

    /// Cut both directions between `a` and `b`.
    pub fn cut_both(&self, a: u64, b: u64) {
        self.cut(a, b);
        self.cut(b, a);
    }

    /// Cut every link between nodes of different groups, both ways.
    pub fn partition(&self, groups: &[Vec<u64>]) {
        for (i, g) in groups.iter().enumerate() {
            for h in groups.iter().skip(i + 1) {
                for a in g {
                    for b in h {
                        self.cut_both(*a, *b);
                    }
                }
            }
        }
    }

    /// Delay every byte on `from → to`.
    pub fn delay(&self, from: u64, to: u64, delay_ms: u64, jitter_ms: u64) {
        let mut l = self.shared.link(from, to);
        l.delay_ms = delay_ms;
        l.jitter_ms = jitter_ms;
        self.set_link(from, to, l);
    }

    /// Every link healthy again (held bytes flow).
    pub fn heal_all(&self) {
        self.shared.lock().links.clear();
        self.shared.bump();
    }

    /// Close every open connection between `a` and `b` (either direction)
    /// with RST; `b == None`: every connection of `a`. Returns how many.
    pub fn reset(&self, a: u64, b: Option<u64>) -> usize {
        let victims: Vec<Arc<ConnCtl>> = {
            let mut st = self.shared.lock();
            st.conns.retain(|w| w.strong_count() > 0);
            st.conns
                .iter()
                .filter_map(Weak::upgrade)
                .filter(|c| match b {
                    Some(b) => (c.a == a && c.b == b) || (c.a == b && c.b == a),
                    None => c.a == a || c.b == a,
                })
                .collect()
        };
        for v in &victims {
            v.kill.notify_one();
        }
        self.shared
            .stats
            .resets
            .fetch_add(victims.len() as u64, Ordering::Relaxed);
        victims.len()
    }

    /// The faulty links now, for logs.
    pub fn describe(&self) -> String {
        let st = self.shared.lock();
        if st.links.is_empty() {
            return "all links healthy".into();
        }
        st.links
            .iter()
            .map(|((a, b), l)| {
                let mut s = format!("{a}->{b}");
                if l.cut {
                    s.push_str(" cut");
                }
                if l.delay_ms > 0 {
                    s.push_str(&format!(" +{}±{}ms", l.delay_ms, l.jitter_ms));
                }
                s
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

async fn accept_loop_from(listener: TcpListener, from: u64, to: u64, shared: Arc<Shared>) {
    loop {
        let Ok((sock, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(sock, from, to, shared.clone()));
    }
}

async fn accept_loop(listener: TcpListener, to: u64, shared: Arc<Shared>) {
    loop {
        let Ok((sock, peer)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let from = node_of(peer.ip());
        shared.stats.connections.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(serve(sock, from, to, shared.clone()));
    }
}

/// RST instead of FIN when the socket closes.
fn set_zero_linger(fd: i32) {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on a file descriptor we own (the socket is still
    // open: its owner is dropped only after this call), with a pointer to
    // a properly sized, initialised `linger`.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(l).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

async fn serve(sock: TcpStream, from: u64, to: u64, shared: Arc<Shared>) {
    let ctl = Arc::new(ConnCtl {
        a: from,
        b: to,
        kill: Notify::new(),
    });
    shared.lock().conns.push(Arc::downgrade(&ctl));
    let _ = sock.set_nodelay(true);
    // A new connection across a cut link is not carried onwards until both
    // directions heal (a lost SYN or SYN-ACK).
    let mut ch = shared.changed.subscribe();
    let waited = Instant::now();
    loop {
        ch.borrow_and_update();
        if !shared.link(from, to).cut && !shared.link(to, from).cut {
            break;
        }
        let left = PENDING_MAX.saturating_sub(waited.elapsed());
        tokio::select! {
            r = ch.changed() => if r.is_err() { return },
            () = tokio::time::sleep(left) => {
                shared.stats.abandoned.fetch_add(1, Ordering::Relaxed);
                return;
            }
            () = ctl.kill.notified() => {
                set_zero_linger(sock.as_raw_fd());
                return;
            }
        }
    }
    let Some(upstream) = shared.lock().upstream.get(&to).copied() else {
        return;
    };
    let up = match TcpStream::connect(upstream).await {
        Ok(s) => s,
        Err(_) => {
            // The node is down: refuse like it would (RST).
            set_zero_linger(sock.as_raw_fd());
            return;
        }
    };
    let _ = up.set_nodelay(true);
    let fds = (sock.as_raw_fd(), up.as_raw_fd());
    let (down_rd, down_wr) = sock.into_split();
    let (up_rd, up_wr) = up.into_split();
    let a = pump(down_rd, up_wr, from, to, shared.clone());
    let b = pump(up_rd, down_wr, to, from, shared.clone());
    tokio::select! {
        _ = async { tokio::join!(a, b) } => {}
        () = ctl.kill.notified() => {
            set_zero_linger(fds.0);
            set_zero_linger(fds.1);
            // The pumps (and with them both sockets) drop here.
        }
    }
}

/// Carry bytes read from `rd` (sent by node `from`) to `wr` (towards node
/// `to`), obeying the link `from → to`.
async fn pump(
    mut rd: OwnedReadHalf,
    mut wr: OwnedWriteHalf,
    from: u64,
    to: u64,
    shared: Arc<Shared>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Option<Vec<u8>>)>(HELD_CHUNKS);
    let reader = async move {
        let mut buf = vec![0_u8; 16 * 1024];
        loop {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    let _ = tx.send((Instant::now(), None)).await;
                    return;
                }
                Ok(n) => {
                    if tx
                        .send((Instant::now(), Some(buf[..n].to_vec())))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    };
    let sh = shared.clone();
    let writer = async move {
        let mut ch = sh.changed.subscribe();
        while let Some((read_at, data)) = rx.recv().await {
            let extra = {
                let l = sh.link(from, to);
                sh.jitter(l.jitter_ms)
            };
            loop {
                ch.borrow_and_update();
                let l = sh.link(from, to);
                if l.cut {
                    if ch.changed().await.is_err() {
                        return;
                    }
                    continue;
                }
                let due = read_at + Duration::from_millis(l.delay_ms + extra.min(l.jitter_ms));
                if Instant::now() < due {
                    tokio::select! {
                        () = tokio::time::sleep_until(due) => {}
                        r = ch.changed() => if r.is_err() { return },
                    }
                    continue;
                }
                break;
            }
            match data {
                Some(bytes) => {
                    if wr.write_all(&bytes).await.is_err() {
                        return;
                    }
                    sh.stats
                        .bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                }
                None => {
                    let _ = wr.shutdown().await;
                    return;
                }
            }
        }
    };
    tokio::join!(reader, writer);
}
