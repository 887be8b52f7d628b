//! DNS on a network's gateway address, as libvirt's dnsmasq answers it: A
//! and PTR for guest hostnames (DHCP leases and static hosts) in the
//! network's domain, everything else forwarded to the host's upstream
//! resolvers with a TTL-bound cache; UDP and TCP.
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, PTR};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{watch, Semaphore};

/// TTL of the answers made from leases (dnsmasq's local-ttl is 0: leases
/// change).
pub const LOCAL_TTL: u32 = 0;
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);
const TCP_IDLE: Duration = Duration::from_secs(10);
const MAX_CACHE: usize = 4096;
const MAX_CACHE_TTL: u32 = 3600;
/// Negative answers without an SOA are kept this long.
const NEG_TTL: u32 = 60;
const MAX_INFLIGHT: usize = 256;
const MAX_TCP_CONNS: usize = 64;

pub type Names = Arc<dyn Fn() -> Vec<(String, Ipv4Addr)> + Send + Sync>;

#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The gateway address to listen on (port 53).
    pub listen: Ipv4Addr,
    /// The gateway interface (SO_BINDTODEVICE).
    pub iface: String,
    /// The network's domain: `NAME.DOMAIN` answered from `names`.
    pub domain: Option<String>,
    /// Where other names go (the host's resolvers).
    pub upstream: Vec<SocketAddr>,
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
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// `nameserver` lines of a resolv.conf, port 53 (IPv4 and IPv6).
pub fn upstream_from_resolv_conf(path: &Path) -> Vec<SocketAddr> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Vec::new();
    };
    parse_resolv_conf(&text)
}

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

struct CacheEntry {
    msg: Message,
    at: Instant,
    ttl: u32,
}

struct Inner {
    cfg: DnsConfig,
    /// Lowercase domain without the trailing dot.
    domain: Option<String>,
    names: Names,
    cache: Mutex<HashMap<(String, u16, u16), CacheEntry>>,
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
    /// Listen on `cfg.listen:53` (UDP and TCP) on `cfg.iface` only.
    pub async fn start(cfg: DnsConfig, names: Names) -> Result<DnsHandle> {
        let addr = SocketAddrV4::new(cfg.listen, 53);
        let udp = crate::netdev::bound_udp_socket(&cfg.iface, addr)
            .with_context(|| format!("DNS server on {}", cfg.iface))?;
        let tcp = bound_tcp_listener(&cfg.iface, addr)
            .with_context(|| format!("DNS server on {}", cfg.iface))?;
        let mut cfg = cfg;
        // Never forward to ourselves.
        let me = SocketAddr::V4(addr);
        cfg.upstream.retain(|u| *u != me);
        if cfg.upstream.is_empty() {
            log::warn!(
                "dns {}: no upstream resolvers: only local names resolve",
                cfg.iface
            );
        }
        let domain = cfg
            .domain
            .as_ref()
            .map(|d| d.trim_end_matches('.').to_ascii_lowercase());
        let inner = Arc::new(Inner {
            cfg,
            domain,
            names,
            cache: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            inflight: Arc::new(Semaphore::new(MAX_INFLIGHT)),
        });
        let (stop, stopped) = watch::channel(false);
        let tasks = vec![
            tokio::spawn(serve_udp(Arc::new(udp), inner.clone(), stopped.clone())),
            tokio::spawn(serve_tcp(tcp, inner.clone(), stopped)),
        ];
        Ok(DnsHandle { inner, stop, tasks })
    }
}

impl DnsHandle {
    pub fn counters(&self) -> CountersSnapshot {
        let c = &self.inner.counters;
        let g = |x: &AtomicU64| x.load(Ordering::Relaxed);
        CountersSnapshot {
            udp_queries: g(&c.udp_queries),
            tcp_queries: g(&c.tcp_queries),
            malformed: g(&c.malformed),
            local_answers: g(&c.local_answers),
            cache_hits: g(&c.cache_hits),
            forwarded: g(&c.forwarded),
            upstream_failures: g(&c.upstream_failures),
            overload: g(&c.overload),
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn bound_tcp_listener(iface: &str, addr: SocketAddrV4) -> Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))
        .context("create TCP socket")?;
    s.set_reuse_address(true).context("SO_REUSEADDR")?;
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("bind to interface {iface} (SO_BINDTODEVICE)"))?;
    s.set_nonblocking(true).context("O_NONBLOCK")?;
    s.bind(&SocketAddr::V4(addr).into())
        .with_context(|| format!("bind TCP {addr} on {iface}"))?;
    s.listen(128).context("listen")?;
    TcpListener::from_std(s.into()).context("register TCP listener with tokio")
}

async fn serve_udp(sock: Arc<UdpSocket>, inner: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            r = sock.recv_from(&mut buf) => {
                let (n, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("dns {}: receive: {e}", inner.cfg.iface);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
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

async fn serve_tcp(listener: TcpListener, inner: Arc<Inner>, mut stopped: watch::Receiver<bool>) {
    let conns = Arc::new(Semaphore::new(MAX_TCP_CONNS));
    loop {
        tokio::select! {
            _ = stopped.changed() => break,
            r = listener.accept() => {
                let (stream, from) = match r {
                    Ok(x) => x,
                    Err(e) => {
                        log::warn!("dns {}: accept: {e}", inner.cfg.iface);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
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

/// `d.c.b.a.in-addr.arpa` -> a.b.c.d.
fn parse_reverse(name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_suffix(".in-addr.arpa")?;
    let o: Vec<u8> = rest
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match o[..] {
        [d, c, b, a] => Some(Ipv4Addr::new(a, b, c, d)),
        _ => None,
    }
}

/// The smallest TTL in the answer (or authority for negative answers).
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

    fn fqdn(&self, host: &str) -> String {
        match &self.domain {
            Some(d) => format!("{host}.{d}."),
            None => format!("{host}."),
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
        let names = (self.names)();
        let found: Vec<Ipv4Addr> = names
            .iter()
            .filter(|(n, _)| n == host)
            .map(|(_, a)| *a)
            .collect();
        if found.is_empty() {
            if in_domain {
                resp.metadata.authoritative = true;
                resp.metadata.response_code = ResponseCode::NXDomain;
                return Some(resp);
            }
            return None;
        }
        resp.metadata.authoritative = true;
        if matches!(qtype, RecordType::A | RecordType::ANY) {
            for ip in found {
                resp.add_answer(Record::from_rdata(
                    q.name().clone(),
                    LOCAL_TTL,
                    RData::A(A(ip)),
                ));
            }
        }
        Some(resp)
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
        if age >= e.ttl {
            cache.remove(&key);
            return None;
        }
        let mut m = e.msg.clone();
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
        let mut cache = lock(&self.cache);
        if cache.len() >= MAX_CACHE {
            cache.retain(|_, e| e.at.elapsed().as_secs() < u64::from(e.ttl));
            if cache.len() >= MAX_CACHE {
                cache.clear();
            }
        }
        cache.insert(
            key,
            CacheEntry {
                msg: resp.clone(),
                at: Instant::now(),
                ttl,
            },
        );
    }

    /// Ask the upstreams in turn; the first valid answer wins.
    async fn forward(&self, req: &Message, via_tcp: bool) -> Option<Message> {
        let mut out = req.clone();
        out.metadata.id = random_u16();
        let bytes = out.to_vec().ok()?;
        for up in &self.cfg.upstream {
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
                ("guest1".to_string(), Ipv4Addr::new(10, 7, 0, 10)),
                ("web".to_string(), Ipv4Addr::new(10, 7, 0, 5)),
            ]
        });
        Inner {
            cfg: DnsConfig {
                listen: Ipv4Addr::new(10, 7, 0, 1),
                iface: "br0".into(),
                domain: domain.map(String::from),
                upstream: vec![],
            },
            domain: domain.map(String::from),
            names,
            cache: Mutex::new(HashMap::new()),
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
