//! DNS on a network's gateway address, as libvirt's dnsmasq answers it: A
//! and PTR for guest hostnames (DHCP leases and static hosts) in the
//! network's domain, everything else forwarded to the host's upstream
//! resolvers (followed when resolv.conf changes) with a TTL-bound cache
//! bounded in entries and bytes; UDP and TCP, each serving task
//! supervised (restarted with a fresh socket when it fails).
use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

use crate::tasks::supervise;

/// TTL of the answers made from leases (dnsmasq's local-ttl is 0: leases
/// change).
pub const LOCAL_TTL: u32 = 0;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_IDLE: Duration = Duration::from_secs(10);
const MAX_CACHE: usize = 4096;
/// The most the cached answers may hold, counted as their names and wire
/// size (records' names and data) plus [`ENTRY_OVERHEAD`] each: large
/// answers cannot grow the cache past it.
pub const MAX_CACHE_BYTES: usize = 4 << 20;
/// What an entry costs besides its answer (key, map slots, bookkeeping).
const ENTRY_OVERHEAD: usize = 128;
/// How often a resolv.conf is looked at for changes (one stat).
const RESOLV_CHECK_EVERY: Duration = Duration::from_secs(2);
const MAX_CACHE_TTL: u32 = 3600;
/// Negative answers without an SOA are kept this long.
const NEG_TTL: u32 = 60;
const MAX_INFLIGHT: usize = 256;
const MAX_TCP_CONNS: usize = 64;

/// Local names and their addresses (IPv4: A, IPv6: AAAA; both PTR).
pub type Names = Arc<dyn Fn() -> Vec<(String, IpAddr)> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The network, for logs.
    pub net: String,
    /// The gateway address to listen on (port 53): IPv4, or IPv6 for the
    /// resolver router advertisements name.
    pub listen: IpAddr,
    /// The gateway interface (SO_BINDTODEVICE).
    pub iface: String,
    /// The network's domain: `NAME.DOMAIN` answered from `names`.
    pub domain: Option<String>,
    /// Where other names go (the host's resolvers).
    pub upstream: Upstream,
}

/// Where the forwarder's resolvers come from.
#[derive(Debug, Clone)]
pub enum Upstream {
    /// These, always.
    Fixed(Vec<SocketAddr>),
    /// The `nameserver` lines of this resolv.conf, read again when it
    /// changes.
    ResolvConf(PathBuf),
}

#[derive(Default, Debug)]
pub struct Counters {
    pub udp_queries: AtomicU64,
    pub tcp_queries: AtomicU64,
    /// Undecodable or not a single-question query: dropped or FORMERR.
    pub malformed: AtomicU64,
    pub local_answers: AtomicU64,
    pub cache_hits: AtomicU64,
    pub forwarded: AtomicU64,
    /// Queries no upstream answered (SERVFAIL).
    pub upstream_failures: AtomicU64,
    /// Dropped because too many queries were in flight.
    pub overload: AtomicU64,
    /// Cached answers dropped to make room (not expiry).
    pub cache_evictions: AtomicU64,
    /// Times a serving task (UDP or TCP) failed and was started again.
    pub restarts: Arc<AtomicU64>,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub udp_queries: u64,
    pub tcp_queries: u64,
    pub malformed: u64,
    pub local_answers: u64,
    pub cache_hits: u64,
    pub forwarded: u64,
    pub upstream_failures: u64,
    pub overload: u64,
    pub cache_evictions: u64,
    /// Answers in the cache and their bytes (as [`MAX_CACHE_BYTES`] counts).
    pub cache_entries: u64,
    pub cache_bytes: u64,
    pub restarts: u64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// `nameserver` lines of a resolv.conf, port 53 (IPv4 and IPv6).
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver"))
                .then(|| w.next())
                .flatten()
                .and_then(|a| a.split('%').next())
                .and_then(|a| a.parse::<std::net::IpAddr>().ok())
                .map(|ip| SocketAddr::new(ip, 53))
        })
        .collect()
}

/// The state of a followed resolv.conf.
struct Followed {
    path: PathBuf,
    /// (device, inode, mtime s, mtime ns, size) when last read; a change
    /// of any means the file was replaced or written.
    stamp: Option<(u64, u64, i64, i64, u64)>,
    checked: Option<Instant>,
    /// Whether it was read before.
    read: bool,
}

/// The forwarder's upstream resolvers, fixed or followed from a
/// resolv.conf (looked at, with one stat, at most every
/// [`RESOLV_CHECK_EVERY`] when a query is forwarded).
struct Resolvers {
    /// Where they are logged from.
    who: String,
    /// Never forward to ourselves.
    me: SocketAddr,
    /// The resolvers' port (53; another in tests).
    port: u16,
    check_every: Duration,
    state: Mutex<(Arc<Vec<SocketAddr>>, Option<Followed>)>,
}

impl Resolvers {
    fn new(who: String, me: SocketAddr, up: Upstream) -> Resolvers {
        let (list, followed) = match up {
            Upstream::Fixed(mut v) => {
                v.retain(|u| *u != me);
                (v, None)
            }
            Upstream::ResolvConf(path) => (
                Vec::new(),
                Some(Followed {
                    path,
                    stamp: None,
                    checked: None,
                    read: false,
                }),
            ),
        };
        Resolvers {
            who,
            me,
            port: 53,
            check_every: RESOLV_CHECK_EVERY,
            state: Mutex::new((Arc::new(list), followed)),
        }
    }

    /// The resolvers now, re-read if the followed file changed.
    fn current(&self) -> Arc<Vec<SocketAddr>> {
        let mut st = lock(&self.state);
        let (list, followed) = &mut *st;
        let Some(f) = followed else {
            return list.clone();
        };
        if f.checked.is_some_and(|t| t.elapsed() < self.check_every) {
            return list.clone();
        }
        f.checked = Some(Instant::now());
        use std::os::unix::fs::MetadataExt;
        let meta = match std::fs::metadata(&f.path) {
            Ok(m) => m,
            Err(e) => {
                // Being replaced, or gone: keep what we have.
                if f.stamp.take().is_some() {
                    log::warn!(
                        "{}: {}: {e}; keeping resolvers {:?}",
                        self.who,
                        f.path.display(),
                        list
                    );
                }
                return list.clone();
            }
        };
        let stamp = (
            meta.dev(),
            meta.ino(),
            meta.mtime(),
            meta.mtime_nsec(),
            meta.size(),
        );
        if f.stamp == Some(stamp) {
            return list.clone();
        }
        let text = match std::fs::read_to_string(&f.path) {
            Ok(t) => t,
            Err(e) => {
                log::warn!("{}: read {}: {e}", self.who, f.path.display());
                return list.clone();
            }
        };
        f.stamp = Some(stamp);
        let first_read = !std::mem::replace(&mut f.read, true);
        let new: Vec<SocketAddr> = parse_resolv_conf(&text)
            .into_iter()
            .map(|a| SocketAddr::new(a.ip(), self.port))
            .filter(|u| u.ip() != self.me.ip())
            .collect();
        if new != **list {
            // The first read is routine; a change later is worth seeing
            // in the daemon's default log.
            let level = if first_read {
                log::Level::Info
            } else {
                log::Level::Warn
            };
            log::log!(
                level,
                "{}: upstream resolvers from {}: {:?} (were {:?})",
                self.who,
                f.path.display(),
                new,
                list
            );
            *list = Arc::new(new);
        }
        list.clone()
    }
}

type CacheKey = (String, u16, u16);

struct CacheEntry {
    msg: Message,
    at: Instant,
    ttl: u32,
    /// What it counts against [`MAX_CACHE_BYTES`].
    bytes: usize,
    /// Its place in the use order (higher: used later).
    used: u64,
}

impl CacheEntry {
    fn expired(&self) -> bool {
        self.at.elapsed().as_secs() >= u64::from(self.ttl)
    }
}

/// Cached answers, bounded in entries and bytes; the least recently used
/// go first (after the expired ones) when one more does not fit.
struct Cache {
    map: HashMap<CacheKey, CacheEntry>,
    /// `used` -> key, oldest first.
    order: BTreeMap<u64, CacheKey>,
    next_use: u64,
    bytes: usize,
    max_bytes: usize,
    max_entries: usize,
    /// When the expired were last swept out (at most once a second).
    swept: Option<Instant>,
}

impl Cache {
    fn new(max_entries: usize, max_bytes: usize) -> Cache {
        Cache {
            map: HashMap::new(),
            order: BTreeMap::new(),
            next_use: 0,
            bytes: 0,
            max_bytes,
            max_entries,
            swept: None,
        }
    }

    fn remove(&mut self, key: &CacheKey) -> Option<CacheEntry> {
        let e = self.map.remove(key)?;
        self.order.remove(&e.used);
        self.bytes -= e.bytes;
        Some(e)
    }

    /// The live entry of `key`, now the most recently used.
    fn get(&mut self, key: &CacheKey) -> Option<&CacheEntry> {
        if self.map.get(key)?.expired() {
            self.remove(key);
            return None;
        }
        self.next_use += 1;
        let used = self.next_use;
        let e = self.map.get_mut(key)?;
        self.order.remove(&e.used);
        e.used = used;
        self.order.insert(used, key.clone());
        Some(e)
    }

    /// Caches `msg`; returns how many entries were evicted for room.
    fn insert(&mut self, key: CacheKey, msg: Message, wire_len: usize, ttl: u32) -> u64 {
        let bytes = key.0.len() + wire_len + ENTRY_OVERHEAD;
        self.remove(&key);
        if bytes > self.max_bytes {
            return 0;
        }
        let fits = |c: &Cache| c.map.len() < c.max_entries && c.bytes + bytes <= c.max_bytes;
        if !fits(self)
            && self
                .swept
                .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            self.swept = Some(Instant::now());
            let dead: Vec<CacheKey> = self
                .map
                .iter()
                .filter(|(_, e)| e.expired())
                .map(|(k, _)| k.clone())
                .collect();
            for k in dead {
                self.remove(&k);
            }
        }
        let mut evicted = 0;
        while !fits(self) {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(e) = self.map.remove(&oldest) {
                self.bytes -= e.bytes;
                evicted += 1;
            }
        }
        self.next_use += 1;
        self.order.insert(self.next_use, key.clone());
        self.bytes += bytes;
        self.map.insert(
            key,
            CacheEntry {
                msg,
                at: Instant::now(),
                ttl,
                bytes,
                used: self.next_use,
            },
        );
        evicted
    }
}

struct Inner {
    cfg: DnsConfig,
    /// Lowercase domain without the trailing dot.
    domain: Option<String>,
    names: Names,
    upstream: Resolvers,
    cache: Mutex<Cache>,
    counters: Counters,
    inflight: Arc<Semaphore>,
}

pub struct DnsServer;

pub struct DnsHandle {
    inner: Arc<Inner>,
    stop: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn random_u16() -> u16 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

impl DnsServer {
    /// Listen on `cfg.listen:53` (UDP and TCP) on `cfg.iface` only, each
    /// in a supervised task.
    pub async fn start(cfg: DnsConfig, names: Names) -> Result<DnsHandle> {
        let addr = SocketAddr::new(cfg.listen, 53);
        let udp = crate::netdev::bound_udp_socket(&cfg.iface, addr)
            .with_context(|| format!("DNS server on {}", cfg.iface))?;
        let tcp = bound_tcp_listener(&cfg.iface, addr)
            .with_context(|| format!("DNS server on {}", cfg.iface))?;
        let who = format!("dns of network {} ({})", cfg.net, cfg.iface);
        let upstream = Resolvers::new(who.clone(), addr, cfg.upstream.clone());
        if upstream.current().is_empty() {
            log::warn!("{who}: no upstream resolvers: only local names resolve");
        }
        let domain = cfg
            .domain
            .as_ref()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        let inner = Arc::new(Inner {
            cfg,
            domain,
            names,
            upstream,
            cache: Mutex::new(Cache::new(MAX_CACHE, MAX_CACHE_BYTES)),
            counters: Counters::default(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        });
        let (stop, stopped) = watch::channel(false);
        let restarts = inner.counters.restarts.clone();
        let mut first_udp = Some(udp);
        let (i, s) = (inner.clone(), stopped.clone());
        let udp_task = supervise(
            who.clone(),
            "dns-udp",
            restarts.clone(),
            stopped.clone(),
            move |_| {
                let sock = first_udp.take();
                let (inner, stopped) = (i.clone(), s.clone());
                async move {
                    let sock = match sock {
                        Some(s) => s,
                        None => crate::netdev::bound_udp_socket(&inner.cfg.iface, addr)
                            .with_context(|| format!("DNS server on {}", inner.cfg.iface))?,
                    };
                    serve_udp(Arc::new(sock), inner, stopped).await
                }
            },
        );
        let mut first_tcp = Some(tcp);
        let (i, s) = (inner.clone(), stopped.clone());
        let tcp_task = supervise(who, "dns-tcp", restarts, stopped, move |_| {
            let listener = first_tcp.take();
            let (inner, stopped) = (i.clone(), s.clone());
            async move {
                let listener = match listener {
                    Some(l) => l,
                    None => bound_tcp_listener(&inner.cfg.iface, addr)
                        .with_context(|| format!("DNS server on {}", inner.cfg.iface))?,
                };
                serve_tcp(listener, inner, stopped).await
            }
        });
        let tasks = vec![tokio::spawn(udp_task), tokio::spawn(tcp_task)];
        Ok(DnsHandle { inner, stop, tasks })
    }
}

impl DnsHandle {
    pub fn counters(&self) -> CountersSnapshot {
        self.inner.counters()
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn bound_tcp_listener(iface: &str, addr: SocketAddr) -> Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .context("create TCP socket")?;
    s.set_reuse_address(true).context("SO_REUSEADDR")?;
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("bind to interface {iface} (SO_BINDTODEVICE)"))?;
    s.set_nonblocking(true).context("O_NONBLOCK")?;
    if addr.is_ipv6() {
        s.set_only_v6(true).context("IPV6_V6ONLY")?;
    }
    s.bind(&addr.into())
        .with_context(|| format!("bind TCP {addr} on {iface}"))?;
    s.listen(128).context("listen")?;
    TcpListener::from_std(s.into()).context("register TCP listener with tokio")
}

/// Serves UDP queries until `stopped`; an error when the socket fails.
async fn serve_udp(
    sock: Arc<UdpSocket>,
    inner: Arc<Inner>,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            _ = crate::tasks::stopped(&mut stopped) => return Ok(()),
            r = sock.recv_from(&mut buf) => {
                // A bound UDP socket fails only when something is wrong
                // with it: the supervisor binds a new one.
                let (n, from) = r.with_context(|| format!("receive on {}", inner.cfg.iface))?;
                if crate::tasks::fail_once("dns-udp") {
                    bail!("KVNET_FAIL_ON=dns-udp: failing as asked");
                }
                bump(&inner.counters.udp_queries);
                let Ok(permit) = inner.inflight.clone().try_acquire_owned() else {
                    bump(&inner.counters.overload);
                    continue;
                };
                let q = buf[..n].to_vec();
                let (sock, inner) = (sock.clone(), inner.clone());
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Some(resp) = inner.answer(&q, false).await {
                        if let Err(e) = sock.send_to(&resp, from).await {
                            log::debug!("dns {}: reply to {from}: {e}", inner.cfg.iface);
                        }
                    }
                });
            }
        }
    }
}

/// Whether an accept error concerns one connection or a passing shortage
/// (go on) rather than the listener (restart it).
fn accept_error_passes(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO | libc::EPERM
        )
    )
}

/// Serves TCP connections until `stopped`; an error when the listener
/// fails.
async fn serve_tcp(
    listener: TcpListener,
    inner: Arc<Inner>,
    mut stopped: watch::Receiver<bool>,
) -> Result<()> {
    let conns = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    loop {
        tokio::select! {
            _ = crate::tasks::stopped(&mut stopped) => return Ok(()),
            r = listener.accept() => {
                let (stream, from) = match r {
                    Ok(x) => x,
                    Err(e) if accept_error_passes(&e) => {
                        log::warn!("dns {}: accept: {e}", inner.cfg.iface);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Err(e) => {
                        return Err(e).with_context(|| format!("accept on {}", inner.cfg.iface))
                    }
                };
                if crate::tasks::fail_once("dns-tcp") {
                    bail!("KVNET_FAIL_ON=dns-tcp: failing as asked");
                }
                let Ok(permit) = conns.clone().try_acquire_owned() else {
                    bump(&inner.counters.overload);
                    continue;
                };
                let inner = inner.clone();
                tokio::spawn(async move {
                    let _permit = permit;
                    if let Err(e) = tcp_conn(stream, &inner).await {
                        log::debug!("dns {}: TCP {from}: {e:#}", inner.cfg.iface);
                    }
                });
            }
        }
    }
}

async fn tcp_conn(mut s: TcpStream, inner: &Inner) -> Result<()> {
    loop {
        let mut len = [0u8; 2];
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut len)).await {
            Err(_) => return Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(r) => r.context("read length")?,
        };
        let n = usize::from(u16::from_be_bytes(len));
        let mut q = vec![0u8; n];
        tokio::time::timeout(TCP_IDLE, s.read_exact(&mut q))
            .await
            .context("read query: timeout")?
            .context("read query")?;
        bump(&inner.counters.tcp_queries);
        let Some(resp) = inner.answer(&q, true).await else {
            // Malformed: close, as servers do.
            return Ok(());
        };
        let Ok(rlen) = u16::try_from(resp.len()) else {
            return Ok(());
        };
        let mut out = rlen.to_be_bytes().to_vec();
        out.extend_from_slice(&resp);
        s.write_all(&out).await.context("write answer")?;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// `d.c.b.a.in-addr.arpa` -> a.b.c.d; the 32 nibbles of an
/// `ip6.arpa` name (least significant first) -> the IPv6 address.
fn parse_reverse(name: &str) -> Option<IpAddr> {
    if let Some(rest) = name.strip_suffix(".ip6.arpa") {
        let mut v: u128 = 0;
        let mut n = 0;
        for (i, nib) in rest.split('.').enumerate() {
            if nib.len() != 1 || i >= 32 {
                return None;
            }
            v |= u128::from_str_radix(nib, 16).ok()? << (4 * i);
            n += 1;
        }
        return (n == 32).then(|| IpAddr::V6(Ipv6Addr::from(v)));
    }
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let parts: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts[..] {
        [d, c, b, a] => Some(IpAddr::V4(Ipv4Addr::new(a, b, c, d))),
        _ => None,
    }
}

fn cache_ttl(m: &Message) -> u32 {
    let ttl = if !m.answers.is_empty() {
        m.answers.iter().map(|r| r.ttl).min()
    } else {
        m.authorities
            .iter()
            .filter(|r| r.record_type() == RecordType::SOA)
            .map(|r| match &r.data {
                RData::SOA(soa) => r.ttl.min(soa.minimum),
                _ => r.ttl,
            })
            .min()
            .or(Some(NEG_TTL))
    };
    ttl.unwrap_or(0).min(MAX_CACHE_TTL)
}

impl Inner {
    /// The response to a query, or None to drop it.
    async fn answer(&self, q: &[u8], via_tcp: bool) -> Option<Vec<u8>> {
        let req = match Message::from_vec(q) {
            Ok(m) => m,
            Err(e) => {
                bump(&self.counters.malformed);
                log::debug!("dns {}: dropped {} bytes: {e}", self.cfg.iface, q.len());
                return None;
            }
        };
        let id = req.metadata.id;
        if req.metadata.message_type != MessageType::Query {
            bump(&self.counters.malformed);
            return None;
        }
        if req.metadata.op_code != OpCode::Query {
            return encode(&Message::error_msg(
                id,
                req.metadata.op_code,
                ResponseCode::NotImp,
            ));
        }
        if req.queries.len() != 1 {
            bump(&self.counters.malformed);
            return encode(&Message::error_msg(
                id,
                OpCode::Query,
                ResponseCode::FormErr,
            ));
        }
        let max = if via_tcp {
            usize::from(u16::MAX)
        } else {
            usize::from(req.max_payload())
        };
        let resp = if let Some(m) = self.local(&req) {
            bump(&self.counters.local_answers);
            m
        } else if let Some(m) = self.cached(&req) {
            bump(&self.counters.cache_hits);
            m
        } else {
            bump(&self.counters.forwarded);
            match self.forward(&req, via_tcp).await {
                Some(m) => m,
                None => {
                    bump(&self.counters.upstream_failures);
                    let mut m = Message::error_msg(id, OpCode::Query, ResponseCode::ServFail);
                    m.queries = req.queries.clone();
                    m.metadata.recursion_desired = req.metadata.recursion_desired;
                    m.metadata.recursion_available = true;
                    m
                }
            }
        };
        let bytes = encode(&resp)?;
        if bytes.len() > max {
            let mut t = resp.truncate();
            t.metadata.truncation = true;
            return encode(&t);
        }
        Some(bytes)
    }

    /// A local name as a PTR target: a host name in the network's domain,
    /// a full name (a static DNS host's) as it is.
    fn fqdn(&self, host: &str) -> String {
        match &self.domain {
            Some(d) if !host.contains('.') => format!("{host}.{d}."),
            _ => format!("{host}."),
        }
    }

    /// Answers from leases and static hosts, or None to go upstream.
    fn local(&self, req: &Message) -> Option<Message> {
        let q = req.queries.first()?;
        if q.query_class() != DNSClass::IN && q.query_class() != DNSClass::ANY {
            return None;
        }
        let qname = q.name().to_lowercase().to_ascii();
        let qname = qname.trim_end_matches('.');
        let mut resp = Message::response(req.metadata.id, OpCode::Query);
        resp.metadata.recursion_desired = req.metadata.recursion_desired;
        resp.metadata.recursion_available = true;
        resp.queries = req.queries.clone();
        let qtype = q.query_type();

        if let Some(ip) = parse_reverse(qname) {
            let names = (self.names)();
            let (host, _) = names.iter().find(|(_, a)| *a == ip)?;
            resp.metadata.authoritative = true;
            if matches!(qtype, RecordType::PTR | RecordType::ANY) {
                let target = Name::from_ascii(self.fqdn(host)).ok()?;
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    LOCAL_TTL,
                    RData::PTR(PTR(target)),
                ));
            }
            return Some(resp);
        }

        // A full name of a static host, as given.
        let names = (self.names)();
        if qname.contains('.') && names.iter().any(|(n, _)| n == qname) {
            return Some(self.local_a(resp, q, &names, qname));
        }
        // NAME.DOMAIN, or a bare NAME known locally.
        let (host, in_domain) = match &self.domain {
            Some(d) if qname == d => return None,
            Some(d) => match qname
                .strip_suffix(d.as_str())
                .and_then(|h| h.strip_suffix('.'))
            {
                Some(h) => (h, true),
                None => (qname, false),
            },
            None => (qname, false),
        };
        if host.contains('.') {
            if in_domain {
                resp.metadata.authoritative = true;
                resp.metadata.response_code = ResponseCode::NXDomain;
                return Some(resp);
            }
            return None;
        }
        if !names.iter().any(|(n, _)| n == host) {
            if in_domain {
                resp.metadata.authoritative = true;
                resp.metadata.response_code = ResponseCode::NXDomain;
                return Some(resp);
            }
            return None;
        }
        Some(self.local_a(resp, q, &names, host))
    }

    /// The authoritative answer for a local name: its addresses (for A or
    /// ANY; no data for other types).
    fn local_a(
        &self,
        mut resp: Message,
        q: &hickory_proto::op::Query,
        names: &[(String, IpAddr)],
        host: &str,
    ) -> Message {
        resp.metadata.authoritative = true;
        let t = q.query_type();
        let mut seen = Vec::new();
        for (_, ip) in names.iter().filter(|(n, _)| n == host) {
            let data = match ip {
                IpAddr::V4(a) if matches!(t, RecordType::A | RecordType::ANY) => RData::A(A(*a)),
                IpAddr::V6(a) if matches!(t, RecordType::AAAA | RecordType::ANY) => {
                    RData::AAAA(AAAA(*a))
                }
                _ => continue,
            };
            if !seen.contains(ip) {
                seen.push(*ip);
                resp.add_answer(Record::from_rdata(q.name().clone(), LOCAL_TTL, data));
            }
        }
        resp
    }

    fn key(req: &Message) -> Option<(String, u16, u16)> {
        let q = req.queries.first()?;
        Some((
            q.name().to_lowercase().to_ascii(),
            u16::from(q.query_type()),
            u16::from(q.query_class()),
        ))
    }

    fn cached(&self, req: &Message) -> Option<Message> {
        let key = Self::key(req)?;
        let mut cache = lock(&self.cache);
        let e = cache.get(&key)?;
        let age = u32::try_from(e.at.elapsed().as_secs()).unwrap_or(u32::MAX);
        let mut m = e.msg.clone();
        drop(cache);
        m.metadata.id = req.metadata.id;
        m.metadata.recursion_desired = req.metadata.recursion_desired;
        m.queries = req.queries.clone();
        for r in m
            .answers
            .iter_mut()
            .chain(m.authorities.iter_mut())
            .chain(m.additionals.iter_mut())
        {
            r.decrement_ttl(age);
        }
        Some(m)
    }

    fn store(&self, req: &Message, resp: &Message) {
        if resp.metadata.truncation
            || !matches!(
                resp.metadata.response_code,
                ResponseCode::NoError | ResponseCode::NXDomain
            )
        {
            return;
        }
        let ttl = cache_ttl(resp);
        let Some(key) = Self::key(req) else { return };
        if ttl == 0 {
            return;
        }
        let Some(wire) = encode(resp) else { return };
        let evicted = lock(&self.cache).insert(key, resp.clone(), wire.len(), ttl);
        self.counters
            .cache_evictions
            .fetch_add(evicted, Ordering::Relaxed);
    }

    fn counters(&self) -> CountersSnapshot {
        let c = &self.counters;
        let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
        let (entries, bytes) = {
            let cache = lock(&self.cache);
            (cache.map.len() as u64, cache.bytes as u64)
        };
        CountersSnapshot {
            udp_queries: g(&c.udp_queries),
            tcp_queries: g(&c.tcp_queries),
            malformed: g(&c.malformed),
            local_answers: g(&c.local_answers),
            cache_hits: g(&c.cache_hits),
            forwarded: g(&c.forwarded),
            upstream_failures: g(&c.upstream_failures),
            overload: g(&c.overload),
            cache_evictions: g(&c.cache_evictions),
            cache_entries: entries,
            cache_bytes: bytes,
            restarts: g(&c.restarts),
        }
    }

    /// Ask the upstreams in turn; the first valid answer wins.
    async fn forward(&self, req: &Message, via_tcp: bool) -> Option<Message> {
        let mut out = req.clone();
        out.metadata.id = random_u16();
        let bytes = out.to_vec().ok()?;
        for up in self.upstream.current().iter() {
            let r = match forward_udp(*up, &bytes).await {
                Ok(r) if r.metadata.truncation && via_tcp => forward_tcp(*up, &bytes).await,
                r => r,
            };
            match r {
                Ok(mut m) if m.metadata.id == out.metadata.id && m.queries == req.queries => {
                    self.store(req, &m);
                    m.metadata.id = req.metadata.id;
                    return Some(m);
                }
                Ok(_) => log::debug!(
                    "dns {}: {up}: answer does not match the query",
                    self.cfg.iface
                ),
                Err(e) => log::debug!("dns {}: {up}: {e:#}", self.cfg.iface),
            }
        }
        None
    }
}

fn encode(m: &Message) -> Option<Vec<u8>> {
    m.to_vec().ok()
}

async fn forward_udp(up: SocketAddr, q: &[u8]) -> Result<Message> {
    let local: SocketAddr = if up.is_ipv4() {
        SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let s = UdpSocket::bind(local)
        .await
        .context("bind upstream socket")?;
    s.connect(up).await.context("connect upstream")?;
    s.send(q).await.context("send upstream")?;
    let mut buf = vec![0u8; 65535];
    let n = tokio::time::timeout(UPSTREAM_TIMEOUT, s.recv(&mut buf))
        .await
        .context("upstream timed out")?
        .context("receive from upstream")?;
    Message::from_vec(&buf[..n]).context("undecodable upstream answer")
}

async fn forward_tcp(up: SocketAddr, q: &[u8]) -> Result<Message> {
    let work = async {
        let mut s = TcpStream::connect(up)
            .await
            .context("connect upstream (TCP)")?;
        let len = u16::try_from(q.len()).context("query too long")?;
        let mut out = len.to_be_bytes().to_vec();
        out.extend_from_slice(q);
        s.write_all(&out).await.context("send upstream (TCP)")?;
        let mut l = [0u8; 2];
        s.read_exact(&mut l).await.context("read upstream length")?;
        let mut buf = vec![0u8; usize::from(u16::from_be_bytes(l))];
        s.read_exact(&mut buf)
            .await
            .context("read upstream answer")?;
        Message::from_vec(&buf).context("undecodable upstream answer")
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, work)
        .await
        .context("upstream (TCP) timed out")?
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;

    fn inner(domain: Option<&str>) -> Inner {
        let names: Names = Arc::new(|| {
            vec![
                ("guest1".to_string(), Ipv4Addr::new(10, 7, 0, 10).into()),
                ("web".to_string(), Ipv4Addr::new(10, 7, 0, 5).into()),
            ]
        });
        inner_with(domain, names, Upstream::Fixed(vec![]))
    }

    fn inner_with(domain: Option<&str>, names: Names, upstream: Upstream) -> Inner {
        let me: SocketAddr = "10.7.0.1:53".parse().unwrap();
        Inner {
            cfg: DnsConfig {
                net: "n".into(),
                listen: Ipv4Addr::new(10, 7, 0, 1).into(),
                iface: "br0".into(),
                domain: domain.map(String::from),
                upstream: upstream.clone(),
            },
            domain: domain.map(String::from),
            names,
            upstream: Resolvers::new("dns test".into(), me, upstream),
            cache: Mutex::new(Cache::new(MAX_CACHE, MAX_CACHE_BYTES)),
            counters: Counters::default(),
            inflight: Arc::new(Semaphore::new(1)),
        }
    }

    fn query(name: &str, t: RecordType) -> Message {
        let mut m = Message::query();
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), t));
        m.metadata.recursion_desired = true;
        m
    }

    #[test]
    fn dns_local_a_ptr_nxdomain() {
        let i = inner(Some("lab.test"));
        let r = i.local(&query("Guest1.LAB.test.", RecordType::A)).unwrap();
        assert!(r.metadata.authoritative);
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::A(A(Ipv4Addr::new(10, 7, 0, 10))));
        let r = i
            .local(&query("10.0.7.10.in-addr.arpa.", RecordType::PTR))
            .unwrap();
        assert_eq!(
            r.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("guest1.lab.test.").unwrap()))
        );
        let r = i.local(&query("nobody.lab.test.", RecordType::A)).unwrap();
        assert_eq!(r.metadata.response_code, ResponseCode::NXDomain);
        // AAAA of a known name: NOERROR, no data.
        let r = i.local(&query("web.lab.test.", RecordType::AAAA)).unwrap();
        assert_eq!(
            (r.metadata.response_code, r.answers.len()),
            (ResponseCode::NoError, 0)
        );
        // Bare names answer; other names and unknown reverse go upstream.
        assert_eq!(
            i.local(&query("web.", RecordType::A))
                .unwrap()
                .answers
                .len(),
            1
        );
        assert!(i.local(&query("example.com.", RecordType::A)).is_none());
        assert!(i
            .local(&query("9.9.9.9.in-addr.arpa.", RecordType::PTR))
            .is_none());
        // Without a domain, PTR gives the bare name.
        let r = inner(None)
            .local(&query("5.0.7.10.in-addr.arpa.", RecordType::PTR))
            .unwrap();
        assert_eq!(
            r.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("web.").unwrap()))
        );
    }

    /// IPv6 names: AAAA for them, A only for IPv4 ones, ip6.arpa PTR.
    #[test]
    fn dns_aaaa_and_ip6_arpa() {
        let v6: Ipv6Addr = "2001:db8:1::5".parse().unwrap();
        let names: Names = Arc::new(move || {
            vec![
                ("web".to_string(), Ipv4Addr::new(10, 7, 0, 5).into()),
                ("web".to_string(), v6.into()),
            ]
        });
        let i = inner_with(Some("lab.test"), names, Upstream::Fixed(vec![]));
        let r = i.local(&query("web.lab.test.", RecordType::AAAA)).unwrap();
        assert_eq!(r.answers.len(), 1);
        assert_eq!(r.answers[0].data, RData::AAAA(AAAA(v6)));
        let r = i.local(&query("web.lab.test.", RecordType::A)).unwrap();
        assert_eq!(r.answers.len(), 1);
        assert_eq!(
            i.local(&query("web.lab.test.", RecordType::ANY))
                .unwrap()
                .answers
                .len(),
            2
        );
        let rev = "5.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa.";
        let r = i.local(&query(rev, RecordType::PTR)).unwrap();
        assert_eq!(
            r.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("web.lab.test.").unwrap()))
        );
        assert!(i.local(&query("1.0.ip6.arpa.", RecordType::PTR)).is_none());
    }

    /// Static DNS hosts (libvirt's `<dns><host>`): a full name answers as
    /// itself, a host name in the domain; the first name wins the PTR.
    #[test]
    fn static_names_full_and_short() {
        let names: Names = Arc::new(|| {
            vec![
                ("db".to_string(), Ipv4Addr::new(10, 7, 0, 77).into()),
                (
                    "db.static.example".to_string(),
                    Ipv4Addr::new(10, 7, 0, 77).into(),
                ),
                (
                    "db.other.example".to_string(),
                    Ipv4Addr::new(10, 7, 0, 78).into(),
                ),
            ]
        });
        let i = inner_with(Some("lab.test"), names, Upstream::Fixed(vec![]));
        for q in ["db.lab.test.", "DB.static.example.", "db."] {
            let r = i.local(&query(q, RecordType::A)).unwrap();
            assert!(r.metadata.authoritative, "{q}");
            assert_eq!(r.answers.len(), 1, "{q}");
            assert_eq!(
                r.answers[0].data,
                RData::A(A(Ipv4Addr::new(10, 7, 0, 77))),
                "{q}"
            );
        }
        let r = i
            .local(&query("77.0.7.10.in-addr.arpa.", RecordType::PTR))
            .unwrap();
        assert_eq!(
            r.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("db.lab.test.").unwrap()))
        );
        let r = i
            .local(&query("78.0.7.10.in-addr.arpa.", RecordType::PTR))
            .unwrap();
        assert_eq!(
            r.answers[0].data,
            RData::PTR(PTR(Name::from_ascii("db.other.example.").unwrap()))
        );
        // Another name under a static one's domain still goes upstream.
        assert!(i
            .local(&query("www.static.example.", RecordType::A))
            .is_none());
    }

    #[test]
    fn dns_cache_ttl_and_id() {
        let i = inner(Some("lab.test"));
        let q = query("example.com.", RecordType::A);
        let mut resp = Message::response(q.metadata.id, OpCode::Query);
        resp.queries = q.queries.clone();
        resp.add_answer(Record::from_rdata(
            Name::from_ascii("example.com.").unwrap(),
            300,
            RData::A(A(Ipv4Addr::new(1, 2, 3, 4))),
        ));
        resp.add_answer(Record::from_rdata(
            Name::from_ascii("example.com.").unwrap(),
            30,
            RData::A(A(Ipv4Addr::new(1, 2, 3, 5))),
        ));
        assert_eq!(cache_ttl(&resp), 30);
        i.store(&q, &resp);
        let mut q2 = query("EXAMPLE.com.", RecordType::A);
        q2.metadata.id = 4242;
        let hit = i.cached(&q2).unwrap();
        assert_eq!(hit.metadata.id, 4242);
        assert_eq!(hit.answers.len(), 2);
        assert!(i.cached(&query("example.com.", RecordType::AAAA)).is_none());
        // Expired entries are not served.
        lock(&i.cache)
            .map
            .values_mut()
            .for_each(|e| e.at -= Duration::from_secs(31));
        assert!(i.cached(&q2).is_none());
        // SERVFAIL is never cached.
        let mut bad = resp.clone();
        bad.metadata.response_code = ResponseCode::ServFail;
        i.store(&q, &bad);
        assert!(i.cached(&q).is_none());
    }

    #[tokio::test]
    async fn dns_malformed_dropped_and_counted() {
        let i = inner(Some("lab.test"));
        let good = query("web.lab.test.", RecordType::A).to_vec().unwrap();
        assert!(i.answer(&good, false).await.is_some());
        for n in [0, 5, 11, 13, good.len() - 1] {
            assert!(i.answer(&good[..n], false).await.is_none(), "len {n}");
        }
        // Huge counts.
        let mut huge = good.clone();
        huge[4] = 0xff;
        huge[5] = 0xff;
        huge[6] = 0xff;
        huge[7] = 0xff;
        assert!(i.answer(&huge, false).await.is_none());
        // A label length running past the end.
        let mut lab = good.clone();
        lab[12] = 63;
        assert!(i.answer(&lab, false).await.is_none());
        assert_eq!(i.counters.malformed.load(Ordering::Relaxed), 7);
        // No upstream: SERVFAIL, counted.
        let r = i
            .answer(
                &query("example.com.", RecordType::A).to_vec().unwrap(),
                false,
            )
            .await
            .unwrap();
        assert_eq!(
            Message::from_vec(&r).unwrap().metadata.response_code,
            ResponseCode::ServFail
        );
        assert_eq!(i.counters.upstream_failures.load(Ordering::Relaxed), 1);
    }

    /// A response to `name` with `n` TXT records of 255 bytes.
    fn big_answer(name: &str, n: usize) -> (Message, Message) {
        use hickory_proto::rr::rdata::TXT;
        let q = query(name, RecordType::TXT);
        let mut resp = Message::response(q.metadata.id, OpCode::Query);
        resp.queries = q.queries.clone();
        for i in 0..n {
            resp.add_answer(Record::from_rdata(
                Name::from_ascii(name).unwrap(),
                300,
                RData::TXT(TXT::new(vec![format!("{i:0>255}")])),
            ));
        }
        (q, resp)
    }

    #[test]
    fn dns_cache_is_bounded_in_bytes_and_evicts_least_recently_used() {
        let i = inner(None);
        let (q0, r0) = big_answer("n0.example.", 20);
        let one = r0.to_vec().unwrap().len();
        assert!(one > 5000, "{one}");
        i.store(&q0, &r0);
        // Four times the budget in large answers; n0 used all along.
        let n = 4 * MAX_CACHE_BYTES / one;
        for k in 1..n {
            let (q, r) = big_answer(&format!("n{k}.example."), 20);
            i.store(&q, &r);
            assert!(i.cached(&q0).is_some(), "n0 evicted at {k}");
            let c = i.counters();
            assert!(c.cache_bytes as usize <= MAX_CACHE_BYTES, "{c:?}");
        }
        let c = i.counters();
        assert!(c.cache_entries < n as u64 / 3, "{c:?}");
        assert!(c.cache_bytes as usize > MAX_CACHE_BYTES - 2 * one, "{c:?}");
        assert_eq!(c.cache_evictions + c.cache_entries, n as u64, "{c:?}");
        // The oldest unused went, the newest stayed.
        assert!(i.cached(&big_answer("n1.example.", 1).0).is_none());
        let last = format!("n{}.example.", n - 1);
        assert!(i.cached(&big_answer(&last, 1).0).is_some());
        // The entry count still bounds many small answers.
        let mut c = Cache::new(3, MAX_CACHE_BYTES);
        for k in 0..5u16 {
            c.insert((format!("s{k}."), 1, 1), Message::query(), 40, 60);
        }
        assert_eq!(c.map.len(), 3);
        // An answer larger than the whole budget is not cached at all.
        let mut c = Cache::new(10, 1000);
        assert_eq!(c.insert(("x.".into(), 1, 1), Message::query(), 2000, 60), 0);
        assert_eq!((c.map.len(), c.bytes), (0, 0));
    }

    /// A fake upstream on `addr` answering every A query with `answer`.
    async fn fake_upstream(addr: SocketAddr, answer: Ipv4Addr) -> tokio::task::JoinHandle<()> {
        let s = UdpSocket::bind(addr).await.unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok((n, from)) = s.recv_from(&mut buf).await {
                let q = Message::from_vec(&buf[..n]).unwrap();
                let mut r = Message::response(q.metadata.id, OpCode::Query);
                r.queries = q.queries.clone();
                r.add_answer(Record::from_rdata(
                    q.queries[0].name().clone(),
                    0,
                    RData::A(A(answer)),
                ));
                s.send_to(&r.to_vec().unwrap(), from).await.unwrap();
            }
        })
    }

    /// The first answer's data of `name`'s A query.
    async fn ask(i: &Inner, name: &str) -> RData {
        let q = query(name, RecordType::A).to_vec().unwrap();
        let r = i.answer(&q, false).await.unwrap();
        Message::from_vec(&r).unwrap().answers[0].data.clone()
    }

    #[tokio::test]
    async fn dns_upstreams_follow_resolv_conf_changes() {
        let dir = std::env::temp_dir().join(format!("kvnet-dns-resolv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("resolv.conf");
        // Two fake resolvers on one port of two loopback addresses.
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = a.local_addr().unwrap().port();
        drop(a);
        let up1 = SocketAddr::from(([127, 0, 0, 1], port));
        let up2 = SocketAddr::from(([127, 0, 0, 2], port));
        let _f1 = fake_upstream(up1, Ipv4Addr::new(1, 1, 1, 1)).await;
        let _f2 = fake_upstream(up2, Ipv4Addr::new(2, 2, 2, 2)).await;
        std::fs::write(&path, "nameserver 127.0.0.1\n").unwrap();
        let mut i = inner_with(None, Arc::new(Vec::new), Upstream::ResolvConf(path.clone()));
        i.upstream.port = port;
        i.upstream.check_every = Duration::ZERO;
        assert_eq!(
            ask(&i, "a.example.").await,
            RData::A(A(Ipv4Addr::new(1, 1, 1, 1)))
        );
        // Replaced (a new file renamed over it, as resolvconf does); the
        // gateway itself is never used.
        let tmp = dir.join("resolv.conf.new");
        std::fs::write(&tmp, "nameserver 10.7.0.1\nnameserver 127.0.0.2\n").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        assert_eq!(*i.upstream.current(), vec![up2]);
        assert_eq!(
            ask(&i, "b.example.").await,
            RData::A(A(Ipv4Addr::new(2, 2, 2, 2)))
        );
        // Written in place: followed too.
        std::fs::write(&path, "nameserver 127.0.0.1\n# longer now\n").unwrap();
        assert_eq!(
            ask(&i, "c.example.").await,
            RData::A(A(Ipv4Addr::new(1, 1, 1, 1)))
        );
        // Gone: the last list stays.
        std::fs::remove_file(&path).unwrap();
        assert_eq!(*i.upstream.current(), vec![up1]);
        // Between checks the file is not looked at.
        i.upstream.check_every = Duration::from_secs(3600);
        std::fs::write(&path, "nameserver 127.0.0.2\n").unwrap();
        assert_eq!(*i.upstream.current(), vec![up1]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dns_resolv_conf() {
        let v = parse_resolv_conf(
            "# x\nnameserver 10.0.0.53\nsearch lan\nnameserver fe80::1%eth0\nnameserver bogus\n",
        );
        assert_eq!(
            v,
            vec![
                "10.0.0.53:53".parse::<SocketAddr>().unwrap(),
                "[fe80::1]:53".parse::<SocketAddr>().unwrap()
            ]
        );
    }
}
