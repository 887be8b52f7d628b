//! Router advertisements on a network's gateway interface (RFC 4861, as
//! radvd or dnsmasq's enable-ra send them): the gateway's prefixes with the
//! SLAAC flags, the MTU, the resolver and domain (RFC 8106), a default
//! route for routed networks. Sent a few times at start, then now and
//! then, and in answer to router solicitations; a supervised task.
use std::io::ErrorKind;
use std::mem::MaybeUninit;
use std::net::{Ipv6Addr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

use super::V6Plan;
use crate::tasks::{stopped, supervise};

const ND_ROUTER_SOLICIT: u8 = 133;
const ND_ROUTER_ADVERT: u8 = 134;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
const ALL_ROUTERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 2);
/// The first advertisements come quickly (a guest booting with the
/// network), then every [`RA_INTERVAL`].
const INITIAL_RAS: u32 = 3;
const INITIAL_INTERVAL: Duration = Duration::from_secs(4);
pub const RA_INTERVAL: Duration = Duration::from_secs(200);
/// Solicited RAs are sent at most this often (RFC 4861 asks 3 s; a
/// solicitation is answered after the gap rather than dropped).
const MIN_GAP: Duration = Duration::from_millis(300);
/// Lifetimes: default route 3 intervals, prefixes a day valid, four hours
/// preferred, resolver and domain 3 intervals (RFC 8106's advice).
const ROUTER_LIFETIME: u16 = 1800;
const PREFIX_VALID: u32 = 86400;
const PREFIX_PREFERRED: u32 = 14400;
const DNS_LIFETIME: u32 = 3 * RA_INTERVAL.as_secs() as u32;

/// What an advertisement says.
#[derive(Debug, Clone)]
pub struct RaConfig {
    pub mac: [u8; 6],
    pub prefixes: Vec<super::Prefix6>,
    pub router: bool,
    pub mtu: u32,
    pub resolver: Option<Ipv6Addr>,
    pub domain: Option<String>,
    /// M: addresses from DHCPv6; O: other settings (DNS) from DHCPv6.
    pub managed: bool,
    pub other: bool,
}

/// The ICMPv6 message (the kernel fills in the checksum).
pub fn build(c: &RaConfig) -> Vec<u8> {
    let mut m = vec![ND_ROUTER_ADVERT, 0, 0, 0, 64];
    m.push(if c.managed { 0x80 } else { 0 } | if c.other { 0x40 } else { 0 });
    let life = if c.router { ROUTER_LIFETIME } else { 0 };
    m.extend_from_slice(&life.to_be_bytes());
    m.extend_from_slice(&[0; 8]); // reachable time, retrans timer: unspecified
    m.extend_from_slice(&[1, 1]); // source link-layer address
    m.extend_from_slice(&c.mac);
    m.extend_from_slice(&[5, 1, 0, 0]);
    m.extend_from_slice(&c.mtu.to_be_bytes());
    for p in &c.prefixes {
        // On-link always; autonomous (SLAAC) where it can work.
        let flags = 0x80 | if p.slaac() { 0x40 } else { 0 };
        m.extend_from_slice(&[3, 4, p.len, flags]);
        m.extend_from_slice(&PREFIX_VALID.to_be_bytes());
        m.extend_from_slice(&PREFIX_PREFERRED.to_be_bytes());
        m.extend_from_slice(&[0; 4]);
        m.extend_from_slice(&p.network().octets());
    }
    if let Some(r) = c.resolver {
        m.extend_from_slice(&[25, 3, 0, 0]);
        m.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
        m.extend_from_slice(&r.octets());
        if let Some(d) = &c.domain {
            let mut names = Vec::new();
            for label in d.trim_end_matches('.').split('.') {
                names.push(label.len() as u8);
                names.extend_from_slice(label.as_bytes());
            }
            names.push(0);
            while (names.len() + 8) % 8 != 0 {
                names.push(0);
            }
            m.extend_from_slice(&[31, ((names.len() + 8) / 8) as u8, 0, 0]);
            m.extend_from_slice(&DNS_LIFETIME.to_be_bytes());
            m.extend_from_slice(&names);
        }
    }
    m
}

/// The interface's usable (not tentative) link-local address: an RA must
/// come from one.
fn link_local(iface: &str) -> Option<Ipv6Addr> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (addr, scope, flags, name) = (f.first()?, f.get(3)?, f.get(4)?, f.get(5)?);
        let flags = u32::from_str_radix(flags, 16).ok()?;
        // scope 0x20: link; flag 0x40: tentative (IFA_F_TENTATIVE).
        (*name == iface && *scope == "20" && flags & 0x40 == 0)
            .then(|| u128::from_str_radix(addr, 16).ok().map(Ipv6Addr::from))
            .flatten()
    })
}

/// A raw ICMPv6 socket on `iface` that sends from its link-local address
/// with hop limit 255 and hears router solicitations only.
fn ra_socket(iface: &str, ifindex: u32) -> Result<AsyncFd<Socket>> {
    let ll = link_local(iface).with_context(|| format!("{iface} has no link-local address yet"))?;
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))
        .context("raw ICMPv6 socket")?;
    s.bind_device(Some(iface.as_bytes()))
        .with_context(|| format!("bind to {iface}"))?;
    s.bind(&SocketAddrV6::new(ll, 0, 0, ifindex).into())
        .with_context(|| format!("bind to {ll}%{iface}"))?;
    s.set_multicast_if_v6(ifindex)
        .context("IPV6_MULTICAST_IF")?;
    s.set_multicast_hops_v6(255)
        .context("IPV6_MULTICAST_HOPS")?;
    s.set_unicast_hops_v6(255).context("IPV6_UNICAST_HOPS")?;
    s.set_multicast_loop_v6(false)
        .context("IPV6_MULTICAST_LOOP")?;
    s.join_multicast_v6(&ALL_ROUTERS, ifindex)
        .context("joining ff02::2")?;
    // ICMP6_FILTER: every type blocked but router solicitations.
    let mut filter = [u32::MAX; 8];
    filter[usize::from(ND_ROUTER_SOLICIT >> 5)] &= !(1 << (ND_ROUTER_SOLICIT & 31));
    let r = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&s),
            libc::IPPROTO_ICMPV6,
            1, // ICMP6_FILTER
            filter.as_ptr().cast(),
            std::mem::size_of_val(&filter) as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("ICMP6_FILTER");
    }
    s.set_nonblocking(true).context("O_NONBLOCK")?;
    // SAFETY: the AsyncFd owns the socket: its fd stays open and the same
    // for the AsyncFd's whole life.
    unsafe { AsyncFd::register(s) }
        .map_err(|e| anyhow::anyhow!("register the RA socket with tokio: {e}"))
}

#[derive(Default, Debug, serde::Serialize)]
pub struct RaCounters {
    pub sent: u64,
    pub solicitations: u64,
    pub restarts: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    solicitations: AtomicU64,
    restarts: Arc<AtomicU64>,
}

pub struct RaHandle {
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    counters: Arc<Counters>,
}

impl RaHandle {
    /// Starts advertising on the plan's gateway interface (on the calling
    /// tokio runtime).
    pub fn start(plan: &V6Plan) -> Result<RaHandle> {
        let iface = plan.iface.clone();
        let ifindex = crate::netdev::ifindex(&iface)?;
        let mtu = match plan.mtu {
            Some(m) => u32::from(m),
            None => crate::host::read_sysctl(&format!("/sys/class/net/{iface}/mtu"))
                .ok()
                .and_then(|m| m.parse().ok())
                .unwrap_or(1500),
        };
        let cfg = RaConfig {
            mac: crate::netdev::mac(&iface)?.0,
            prefixes: plan.gateways.clone(),
            router: plan.router,
            mtu,
            resolver: plan.resolver(),
            domain: plan.domain.clone().filter(|_| plan.dns),
            managed: plan.range.is_some() || !plan.hosts.is_empty(),
            other: plan.dns,
        };
        let msg = Arc::new(build(&cfg));
        let counters = Arc::new(Counters::default());
        let (stop, stop_rx) = watch::channel(false);
        let (c, s) = (counters.clone(), stop_rx.clone());
        let task = tokio::spawn(supervise(
            format!("router advertisements of network {} ({iface})", plan.net),
            "ra",
            counters.restarts.clone(),
            stop_rx,
            move |_| {
                let (iface, msg, c, s) = (iface.clone(), msg.clone(), c.clone(), s.clone());
                async move { serve(&iface, ifindex, &msg, &c, s).await }
            },
        ));
        Ok(RaHandle {
            stop,
            task,
            counters,
        })
    }

    pub fn counters(&self) -> RaCounters {
        RaCounters {
            sent: self.counters.sent.load(Ordering::Relaxed),
            solicitations: self.counters.solicitations.load(Ordering::Relaxed),
            restarts: self.counters.restarts.load(Ordering::Relaxed),
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// One run of the advertiser: until stopped, or an error the supervisor
/// answers with a fresh socket (the first runs wait for the link-local
/// address a new interface gets a moment after it comes up).
async fn serve(
    iface: &str,
    ifindex: u32,
    msg: &[u8],
    c: &Counters,
    mut stop: watch::Receiver<bool>,
) -> Result<()> {
    let sock = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match ra_socket(iface, ifindex) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    _ = stopped(&mut stop) => return Ok(()),
                },
            }
        }
    };
    let dst = SocketAddrV6::new(ALL_NODES, 0, 0, ifindex).into();
    let mut initial = 0;
    let mut next = Instant::now();
    let mut last: Option<Instant> = None;
    let mut buf = [MaybeUninit::<u8>::uninit(); 1500];
    loop {
        if Instant::now() >= next {
            if last.is_none_or(|t| t.elapsed() >= MIN_GAP) {
                send(&sock, msg, &dst).await?;
                c.sent.fetch_add(1, Ordering::Relaxed);
                last = Some(Instant::now());
                initial += 1;
                next = Instant::now()
                    + if initial < INITIAL_RAS {
                        INITIAL_INTERVAL
                    } else {
                        RA_INTERVAL
                    };
            } else {
                next = last.map_or_else(Instant::now, |t| t + MIN_GAP);
            }
        }
        tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            _ = tokio::time::sleep_until(next.into()) => {}
            r = sock.readable() => {
                let mut guard = r.context("waiting on the RA socket")?;
                match guard.try_io(|s| s.get_ref().recv_from(&mut buf)) {
                    Ok(Ok((n, _from))) => {
                        // SAFETY: recv_from initialised the first n bytes.
                        let first = (n > 0).then(|| unsafe { buf[0].assume_init() });
                        if first == Some(ND_ROUTER_SOLICIT) {
                            c.solicitations.fetch_add(1, Ordering::Relaxed);
                            // Answered to all nodes at once, or after the gap.
                            next = next.min(last.map_or_else(Instant::now, |t| t + MIN_GAP));
                        }
                    }
                    Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
                    Ok(Err(e)) => return Err(e).context("receiving router solicitations"),
                    Err(_would_block) => {}
                }
            }
        }
    }
}

async fn send(sock: &AsyncFd<Socket>, msg: &[u8], dst: &socket2::SockAddr) -> Result<()> {
    loop {
        let mut guard = sock.writable().await.context("waiting on the RA socket")?;
        match guard.try_io(|s| s.get_ref().send_to(msg, dst)) {
            Ok(Ok(n)) if n == msg.len() => return Ok(()),
            Ok(Ok(n)) => bail!("sent {n} of {} bytes of a router advertisement", msg.len()),
            Ok(Err(e)) if e.kind() == ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e).context("sending a router advertisement"),
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ra_carries_prefixes_mtu_resolver_and_domain() {
        let c = RaConfig {
            mac: [2, 0, 0, 0, 0, 1],
            prefixes: vec![
                "2001:db8:1::1/64".parse().unwrap(),
                "2001:db8:2::1/56".parse().unwrap(),
            ],
            router: true,
            mtu: 1400,
            resolver: Some("2001:db8:1::1".parse().unwrap()),
            domain: Some("lab.test".into()),
            managed: true,
            other: true,
        };
        let m = build(&c);
        assert_eq!(&m[..8], &[134, 0, 0, 0, 64, 0xc0, 0x07, 0x08]);
        // Header 16, SLL 8, MTU 8, two prefixes 32 each, RDNSS 24, DNSSL.
        let mut o = 16;
        let mut seen = Vec::new();
        while o < m.len() {
            let (t, len) = (m[o], m[o + 1] as usize * 8);
            assert!(len > 0);
            seen.push(t);
            match t {
                5 => assert_eq!(&m[o + 4..o + 8], &1400u32.to_be_bytes()),
                3 => {
                    let slaac = m[o + 2] == 64;
                    assert_eq!(m[o + 3], if slaac { 0xc0 } else { 0x80 });
                }
                25 => assert_eq!(&m[o + 8..o + 24], &c.resolver.unwrap().octets()),
                31 => assert_eq!(&m[o + 8..o + 18], b"\x03lab\x04test\x00"),
                _ => {}
            }
            o += len;
        }
        assert_eq!(o, m.len());
        assert_eq!(seen, [1, 5, 3, 3, 25, 31]);
        let host_only = build(&RaConfig {
            router: false,
            resolver: None,
            managed: false,
            other: false,
            ..c
        });
        assert_eq!(&host_only[5..8], &[0, 0, 0]);
    }
}
