//! DHCPv6 on a network's gateway interface (RFC 8415), as dnsmasq serves
//! it for libvirt: addresses from `--dhcp6-range` (IA_NA; static hosts by
//! the MAC in their DUID), and the resolver and domain for everyone
//! (Information-request, stateless). Leases are kept in a file in the
//! daemon's state folder ([`LeaseStore6`]), so a restarted daemon gives a
//! client (DUID, IAID) the address it had.
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv6Addr, SocketAddr, SocketAddrV6};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use dhcproto::v6::{
    DhcpOption, DhcpOptions, IAAddr, Message, MessageType, OptionCode, Status, StatusCode, IANA,
};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use tokio::net::UdpSocket;
use tokio::sync::watch;

use super::{savi::LeaseBinder, Host6, V6Plan};
use crate::tasks::{stopped, supervise};

const SERVER_PORT: u16 = 547;
const ALL_SERVERS: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 1, 2);
/// How far the pool is searched for a free address.
const MAX_SCAN: u128 = 1 << 16;

fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A client's binding: (DUID, IAID) -> address.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Lease {
    ip: Ipv6Addr,
    expires_unix: u64,
    hostname: Option<String>,
}

pub use crate::control::Lease6Info;

#[derive(Default, Debug, serde::Serialize)]
pub struct Dhcp6Counters {
    pub received: u64,
    pub replies: u64,
    pub malformed: u64,
    pub no_addrs: u64,
    pub restarts: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    replies: AtomicU64,
    malformed: AtomicU64,
    no_addrs: AtomicU64,
    restarts: Arc<AtomicU64>,
}

/// The server's state: settings and bindings.
pub struct Core {
    range: Option<(Ipv6Addr, Ipv6Addr)>,
    hosts: Vec<Host6>,
    resolver: Option<Ipv6Addr>,
    domain: Option<String>,
    lease_time: Duration,
    server_id: Vec<u8>,
    leases: BTreeMap<(Vec<u8>, u32), Lease>,
}

/// The MAC inside a DUID-LLT (1) or DUID-LL (3) of Ethernet (hw type 1).
pub fn duid_mac(duid: &[u8]) -> Option<[u8; 6]> {
    let mac = match duid {
        [0, 1, 0, 1, _, _, _, _, rest @ ..] | [0, 3, 0, 1, rest @ ..] => rest,
        _ => return None,
    };
    mac.try_into().ok()
}

/// The first label of a Client FQDN option (RFC 4704: flags, then a
/// wire-format name).
fn fqdn_host(data: &[u8]) -> Option<String> {
    let len = usize::from(*data.get(1)?);
    let label = data.get(2..2 + len)?;
    let h = std::str::from_utf8(label).ok()?.to_ascii_lowercase();
    crate::dnsname::valid_hostname(&h).then_some(h)
}

impl Core {
    pub fn new(plan: &V6Plan, mac: [u8; 6]) -> Core {
        let mut server_id = vec![0, 3, 0, 1];
        server_id.extend_from_slice(&mac);
        Core {
            range: plan.range,
            hosts: plan.hosts.clone(),
            resolver: plan.resolver(),
            domain: plan.domain.clone().filter(|_| plan.dns),
            lease_time: plan.lease_time,
            server_id,
            leases: BTreeMap::new(),
        }
    }

    fn taken(&self, ip: Ipv6Addr, key: &(Vec<u8>, u32), now: u64) -> bool {
        self.hosts.iter().any(|h| h.ip == ip)
            || self
                .leases
                .iter()
                .any(|(k, l)| k != key && l.ip == ip && l.expires_unix > now)
    }

    /// The address for (DUID, IAID): its static host's, its binding's, the
    /// one it asks for if free, or the first free one of the range.
    fn address(&self, key: &(Vec<u8>, u32), asked: Option<Ipv6Addr>, now: u64) -> Option<Ipv6Addr> {
        let mac = duid_mac(&key.0);
        if let Some(h) = self.hosts.iter().find(|h| Some(h.mac.0) == mac) {
            return Some(h.ip);
        }
        let (first, last) = self.range?;
        let in_range = |a: Ipv6Addr| (u128::from(first)..=u128::from(last)).contains(&a.into());
        if let Some(l) = self.leases.get(key) {
            if in_range(l.ip) && !self.taken(l.ip, key, now) {
                return Some(l.ip);
            }
        }
        if let Some(a) = asked.filter(|a| in_range(*a) && !self.taken(*a, key, now)) {
            return Some(a);
        }
        let (f, l) = (u128::from(first), u128::from(last));
        (f..=l.min(f + MAX_SCAN))
            .map(Ipv6Addr::from)
            .find(|a| !self.taken(*a, key, now))
    }

    /// The reply to `req` (None: not ours to answer).
    pub fn handle(&mut self, req: &Message, now: u64) -> Option<Message> {
        let opts = req.opts();
        let client_id = match opts.get(OptionCode::ClientId) {
            Some(DhcpOption::ClientId(c)) => c.clone(),
            _ => return None,
        };
        let to_us = match opts.get(OptionCode::ServerId) {
            Some(DhcpOption::ServerId(s)) => *s == self.server_id,
            _ => true,
        };
        let kind = req.msg_type();
        let needs_server_id = matches!(
            kind,
            MessageType::Request | MessageType::Renew | MessageType::Release | MessageType::Decline
        );
        if !to_us || (needs_server_id && opts.get(OptionCode::ServerId).is_none()) {
            return None;
        }
        let rapid = kind == MessageType::Solicit && opts.get(OptionCode::RapidCommit).is_some();
        let reply_type = match kind {
            MessageType::Solicit if rapid => MessageType::Reply,
            MessageType::Solicit => MessageType::Advertise,
            MessageType::Request
            | MessageType::Renew
            | MessageType::Rebind
            | MessageType::Release
            | MessageType::Decline
            | MessageType::Confirm
            | MessageType::InformationRequest => MessageType::Reply,
            _ => return None,
        };
        // Stateless: only information requests are ours.
        if self.range.is_none() && self.hosts.is_empty() && kind != MessageType::InformationRequest
        {
            return None;
        }
        let mut resp = Message::new_with_id(reply_type, req.xid());
        let ro = resp.opts_mut();
        ro.insert(DhcpOption::ServerId(self.server_id.clone()));
        ro.insert(DhcpOption::ClientId(client_id.clone()));
        if rapid {
            ro.insert(DhcpOption::RapidCommit);
        }
        let hostname = match opts.get(OptionCode::ClientFqdn) {
            Some(DhcpOption::Unknown(u)) => fqdn_host(u.data()),
            _ => None,
        };
        let commit = matches!(
            kind,
            MessageType::Request | MessageType::Renew | MessageType::Rebind
        ) || rapid;
        let valid = self.lease_time.as_secs() as u32;
        for ia in opts.iter().filter_map(|o| match o {
            DhcpOption::IANA(ia) => Some(ia),
            _ => None,
        }) {
            let key = (client_id.clone(), ia.id);
            let asked = ia.opts.iter().find_map(|o| match o {
                DhcpOption::IAAddr(a) => Some(a.addr),
                _ => None,
            });
            let mut out = IANA {
                id: ia.id,
                t1: valid / 2,
                t2: valid / 8 * 7,
                opts: DhcpOptions::new(),
            };
            match kind {
                MessageType::Release | MessageType::Decline => {
                    self.leases.remove(&key);
                    continue;
                }
                MessageType::Confirm => continue,
                _ => {}
            }
            match self.address(&key, asked, now) {
                Some(ip) => {
                    out.opts.insert(DhcpOption::IAAddr(IAAddr {
                        addr: ip,
                        preferred_life: valid,
                        valid_life: valid,
                        opts: DhcpOptions::new(),
                    }));
                    if commit {
                        let host = self.hosts.iter().find(|h| h.ip == ip);
                        let name = host.and_then(|h| h.name.clone()).or(hostname.clone());
                        self.leases.insert(
                            key,
                            Lease {
                                ip,
                                expires_unix: now + u64::from(valid),
                                hostname: name,
                            },
                        );
                    }
                }
                None => {
                    out.opts.insert(DhcpOption::StatusCode(StatusCode {
                        status: Status::NoAddrsAvail,
                        msg: "no addresses left".into(),
                    }));
                }
            }
            ro.insert(DhcpOption::IANA(out));
        }
        if let Some(r) = self.resolver {
            ro.insert(DhcpOption::DomainNameServers(vec![r]));
        }
        if let Some(d) = &self.domain {
            if let Ok(n) = dhcproto::Name::from_ascii(format!("{}.", d.trim_end_matches('.'))) {
                ro.insert(DhcpOption::DomainSearchList(vec![n]));
            }
        }
        if matches!(
            kind,
            MessageType::Release | MessageType::Decline | MessageType::Confirm
        ) {
            ro.insert(DhcpOption::StatusCode(StatusCode {
                status: Status::Success,
                msg: String::new(),
            }));
        }
        Some(resp)
    }

    fn names(&self, now: u64) -> Vec<(String, IpAddr)> {
        let mut v: Vec<(String, IpAddr)> = self
            .hosts
            .iter()
            .filter_map(|h| Some((h.name.clone()?, IpAddr::V6(h.ip))))
            .collect();
        for l in self.leases.values().filter(|l| l.expires_unix > now) {
            if let Some(h) = &l.hostname {
                v.push((h.clone(), IpAddr::V6(l.ip)));
            }
        }
        v
    }

    /// The bindings as the lease file holds them (JSON).
    fn snapshot(&self) -> Vec<u8> {
        let rows: Vec<(String, u32, &Lease)> = self
            .leases
            .iter()
            .map(|((duid, iaid), l)| (hex(duid), *iaid, l))
            .collect();
        serde_json::to_vec_pretty(&rows).unwrap_or_default()
    }

    /// Takes the unexpired bindings of a lease file back.
    fn restore(&mut self, data: &[u8], now: u64) -> Result<usize> {
        let rows: Vec<(String, u32, Lease)> =
            serde_json::from_slice(data).context("parsing the DHCPv6 lease file")?;
        let mut n = 0;
        for (duid, iaid, l) in rows.into_iter().filter(|r| r.2.expires_unix > now) {
            let Some(duid) = unhex(&duid) else { continue };
            self.leases.insert((duid, iaid), l);
            n += 1;
        }
        Ok(n)
    }

    fn leases(&self, now: u64) -> Vec<Lease6Info> {
        self.leases
            .iter()
            .filter(|(_, l)| l.expires_unix > now)
            .map(|((duid, iaid), l)| Lease6Info {
                duid: hex(duid),
                iaid: *iaid,
                ip: l.ip,
                hostname: l.hostname.clone(),
                expires_unix: l.expires_unix,
            })
            .collect()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Where a network's DHCPv6 leases are kept, and how a file is written
/// (atomically: the IPv4 lease database's writer).
#[derive(Clone)]
pub struct LeaseStore6 {
    pub path: std::path::PathBuf,
    pub write: fn(&std::path::Path, &[u8]) -> Result<()>,
}

impl LeaseStore6 {
    fn load(&self, core: &mut Core) {
        match std::fs::read(&self.path) {
            Ok(data) => match core.restore(&data, now_unix()) {
                Ok(n) => log::info!("dhcpv6: {n} leases from {}", self.path.display()),
                Err(e) => log::warn!("dhcpv6: {}: {e:#}", self.path.display()),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::warn!("dhcpv6: reading {}: {e}", self.path.display()),
        }
    }

    fn save(&self, core: &Core) {
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = (self.write)(&self.path, &core.snapshot()) {
            log::warn!("dhcpv6: {e:#}");
        }
    }
}

fn lock(c: &Mutex<Core>) -> std::sync::MutexGuard<'_, Core> {
    c.lock().unwrap_or_else(|e| e.into_inner())
}

pub struct Dhcp6Server;

pub struct Dhcp6Handle {
    core: Arc<Mutex<Core>>,
    counters: Arc<Counters>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

fn server_socket(iface: &str, ifindex: u32) -> Result<UdpSocket> {
    let any = SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, SERVER_PORT, 0, 0));
    let s = crate::netdev::bound_udp_socket(iface, any)
        .with_context(|| format!("DHCPv6 server on {iface}"))?;
    s.join_multicast_v6(&ALL_SERVERS, ifindex)
        .context("joining ff02::1:2")?;
    Ok(s)
}

impl Dhcp6Server {
    /// Serves DHCPv6 on the plan's gateway interface (on the calling tokio
    /// runtime), in a supervised task.
    pub async fn start(
        plan: &V6Plan,
        binder: Option<LeaseBinder>,
        store: Option<LeaseStore6>,
    ) -> Result<Dhcp6Handle> {
        let binder = binder.map(|b| Arc::new(Mutex::new(b)));
        let iface = plan.iface.clone();
        let ifindex = crate::netdev::ifindex(&iface)?;
        let mut core = Core::new(plan, crate::netdev::mac(&iface)?.0);
        if let Some(s) = &store {
            s.load(&mut core);
        }
        let core = Arc::new(Mutex::new(core));
        let counters = Arc::new(Counters::default());
        let mut first = Some(server_socket(&iface, ifindex)?);
        let (stop, stop_rx) = watch::channel(false);
        let (c, k, s, b) = (core.clone(), counters.clone(), stop_rx.clone(), binder);
        let st = store;
        let task = tokio::spawn(supervise(
            format!("dhcpv6 of network {} ({iface})", plan.net),
            "dhcp6",
            counters.restarts.clone(),
            stop_rx,
            move |_| {
                let sock = first.take();
                let (iface, core, counters, stop, binder, store) = (
                    iface.clone(),
                    c.clone(),
                    k.clone(),
                    s.clone(),
                    b.clone(),
                    st.clone(),
                );
                async move {
                    let sock = match sock {
                        Some(s) => s,
                        None => server_socket(&iface, ifindex)?,
                    };
                    serve(sock, core, counters, stop, binder, store).await
                }
            },
        ));
        Ok(Dhcp6Handle {
            core,
            counters,
            stop,
            task,
        })
    }
}

async fn serve(
    sock: UdpSocket,
    core: Arc<Mutex<Core>>,
    c: Arc<Counters>,
    mut stop: watch::Receiver<bool>,
    binder: Option<Arc<Mutex<LeaseBinder>>>,
    store: Option<LeaseStore6>,
) -> Result<()> {
    let mut buf = vec![0u8; 1500];
    loop {
        let (n, from) = tokio::select! {
            _ = stopped(&mut stop) => return Ok(()),
            r = sock.recv_from(&mut buf) => r.context("receiving DHCPv6")?,
        };
        c.received.fetch_add(1, Ordering::Relaxed);
        let req = match Message::decode(&mut Decoder::new(&buf[..n])) {
            Ok(m) => m,
            Err(e) => {
                c.malformed.fetch_add(1, Ordering::Relaxed);
                log::debug!("dhcpv6: {n} bytes from {from}: {e}");
                continue;
            }
        };
        let resp = {
            let mut core = lock(&core);
            let before = core.snapshot();
            let resp = core.handle(&req, now_unix());
            // Kept before the client hears of it.
            if let Some(s) = store.as_ref().filter(|_| core.snapshot() != before) {
                s.save(&core);
            }
            resp
        };
        let Some(resp) = resp else {
            continue;
        };
        let no_addrs = resp.opts().iter().any(
            |o| matches!(o, DhcpOption::IANA(ia) if ia.opts.get(OptionCode::StatusCode).is_some()),
        );
        if no_addrs {
            c.no_addrs.fetch_add(1, Ordering::Relaxed);
        }
        if let (Some(b), SocketAddr::V6(from)) = (&binder, from) {
            let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
            bind_leases(&mut b, *from.ip(), &req, &resp);
        }
        let mut out = Vec::new();
        if let Err(e) = resp.encode(&mut Encoder::new(&mut out)) {
            log::warn!("dhcpv6: encoding a reply: {e}");
            continue;
        }
        // A client that cannot be answered is its problem, not the socket's.
        match sock.send_to(&out, from).await {
            Ok(_) => {
                c.replies.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => log::debug!("dhcpv6: reply to {from}: {e}"),
        }
    }
}

/// The addresses of a message's IA_NAs.
fn ia_addrs(m: &Message) -> Vec<Ipv6Addr> {
    let mut v = Vec::new();
    for o in m.opts().iter() {
        if let DhcpOption::IANA(ia) = o {
            for a in ia.opts.iter() {
                if let DhcpOption::IAAddr(a) = a {
                    v.push(a.addr);
                }
            }
        }
    }
    v
}

/// Source address validation follows the server: an address it commits
/// (a Reply to Request, Renew, Rebind or a rapid Solicit) is bound to the
/// client's port at once, usable by it and by nobody else; one released
/// or declined is let go.
fn bind_leases(b: &mut LeaseBinder, from: Ipv6Addr, req: &Message, resp: &Message) {
    let mac = match req.opts().get(OptionCode::ClientId) {
        Some(DhcpOption::ClientId(id)) => duid_mac(id),
        _ => None,
    };
    match req.msg_type() {
        MessageType::Release | MessageType::Decline => {
            for ip in ia_addrs(req) {
                b.unbind(from, mac, ip);
            }
        }
        _ if resp.msg_type() == MessageType::Reply => {
            for ip in ia_addrs(resp) {
                if b.bind(from, mac, ip).is_none() {
                    log::debug!("dhcpv6: no port known for client {from}; {ip} left unbound");
                }
            }
        }
        _ => {}
    }
}

impl Dhcp6Handle {
    pub fn names(&self) -> crate::dns::Names {
        let core = self.core.clone();
        Arc::new(move || lock(&core).names(now_unix()))
    }

    pub fn leases(&self) -> Vec<Lease6Info> {
        lock(&self.core).leases(now_unix())
    }

    pub fn counters(&self) -> Dhcp6Counters {
        let c = &self.counters;
        Dhcp6Counters {
            received: c.received.load(Ordering::Relaxed),
            replies: c.replies.load(Ordering::Relaxed),
            malformed: c.malformed.load(Ordering::Relaxed),
            no_addrs: c.no_addrs.load(Ordering::Relaxed),
            restarts: c.restarts.load(Ordering::Relaxed),
        }
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{Mode, NetOpts};

    fn core(range: Option<&str>) -> Core {
        let o = NetOpts {
            gateway6: vec!["2001:db8:1::1/64".into()],
            dhcp6_range: range.map(Into::into),
            dhcp6_hosts: vec!["52:54:00:00:00:05,2001:db8:1::5,web".into()],
            domain: Some("lab.test".into()),
            ..Default::default()
        };
        let p = super::super::plan("n", &o, Mode::Routed, Some("k"))
            .unwrap()
            .unwrap();
        Core::new(&p, [2, 0, 0, 0, 0, 1])
    }

    fn msg(t: MessageType, duid: &[u8], iaid: Option<u32>) -> Message {
        let mut m = Message::new_with_id(t, [1, 2, 3]);
        m.opts_mut().insert(DhcpOption::ClientId(duid.to_vec()));
        if let Some(id) = iaid {
            m.opts_mut().insert(DhcpOption::IANA(IANA {
                id,
                t1: 0,
                t2: 0,
                opts: DhcpOptions::new(),
            }));
        }
        m
    }

    fn addr(m: &Message) -> Option<Ipv6Addr> {
        m.opts().iter().find_map(|o| match o {
            DhcpOption::IANA(ia) => ia.opts.iter().find_map(|o| match o {
                DhcpOption::IAAddr(a) => Some(a.addr),
                _ => None,
            }),
            _ => None,
        })
    }

    #[test]
    fn dhcp6_solicit_request_static_host_and_information() {
        let mut c = core(Some("2001:db8:1::100-2001:db8:1::101"));
        let a = [0, 3, 0, 1, 2, 0, 0, 0, 0, 0xaa];
        let adv = c
            .handle(&msg(MessageType::Solicit, &a, Some(7)), 0)
            .unwrap();
        assert_eq!(adv.msg_type(), MessageType::Advertise);
        assert_eq!(addr(&adv), Some("2001:db8:1::100".parse().unwrap()));
        assert!(c.leases.is_empty(), "an Advertise commits nothing");
        let mut req = msg(MessageType::Request, &a, Some(7));
        req.opts_mut()
            .insert(DhcpOption::ServerId(c.server_id.clone()));
        let r = c.handle(&req, 0).unwrap();
        assert_eq!(r.msg_type(), MessageType::Reply);
        assert_eq!(addr(&r), Some("2001:db8:1::100".parse().unwrap()));
        assert!(matches!(
            r.opts().get(OptionCode::DomainNameServers),
            Some(DhcpOption::DomainNameServers(v)) if v == &["2001:db8:1::1".parse::<Ipv6Addr>().unwrap()]
        ));
        // A Request for another server is not ours.
        let mut other = msg(MessageType::Request, &a, Some(7));
        other
            .opts_mut()
            .insert(DhcpOption::ServerId(vec![0, 3, 0, 1, 9, 9, 9, 9, 9, 9]));
        assert!(c.handle(&other, 0).is_none());
        // The static host by the MAC in its DUID-LLT.
        let web = [0, 1, 0, 1, 1, 2, 3, 4, 0x52, 0x54, 0, 0, 0, 5];
        let r = c
            .handle(&msg(MessageType::Solicit, &web, Some(1)), 0)
            .unwrap();
        assert_eq!(addr(&r), Some("2001:db8:1::5".parse().unwrap()));
        // Rapid commit, then the pool runs dry.
        let mut b = msg(
            MessageType::Solicit,
            &[0, 3, 0, 1, 2, 0, 0, 0, 0, 0xbb],
            Some(1),
        );
        b.opts_mut().insert(DhcpOption::RapidCommit);
        let r = c.handle(&b, 0).unwrap();
        assert_eq!(r.msg_type(), MessageType::Reply);
        assert_eq!(addr(&r), Some("2001:db8:1::101".parse().unwrap()));
        let third = msg(
            MessageType::Solicit,
            &[0, 3, 0, 1, 2, 0, 0, 0, 0, 0xcc],
            Some(1),
        );
        assert_eq!(addr(&c.handle(&third, 0).unwrap()), None);
        // Expired leases free their address.
        assert!(addr(&c.handle(&third, 10 * 3600).unwrap()).is_some());
        assert_eq!(
            c.names(0),
            [(
                "web".to_string(),
                IpAddr::V6("2001:db8:1::5".parse().unwrap())
            )]
        );

        // Stateless: information requests only.
        let mut s = core(None);
        s.hosts.clear();
        assert!(s
            .handle(&msg(MessageType::Solicit, &a, Some(1)), 0)
            .is_none());
        let r = s
            .handle(&msg(MessageType::InformationRequest, &a, None), 0)
            .unwrap();
        assert!(r.opts().get(OptionCode::DomainSearchList).is_some());
    }

    #[test]
    fn dhcp6_leases_survive_a_restart_through_their_file() {
        let request = |c: &Core, duid: &[u8], iaid| {
            let mut m = msg(MessageType::Request, duid, Some(iaid));
            m.opts_mut()
                .insert(DhcpOption::ServerId(c.server_id.clone()));
            m
        };
        let mut c = core(Some("2001:db8:1::100-2001:db8:1::1ff"));
        let duid = [0, 3, 0, 1, 0x52, 0x54, 0, 0, 0, 0x77];
        let r = c.handle(&request(&c, &duid, 9), 1000);
        let mine = addr(&r.unwrap()).unwrap();
        let other = [0, 3, 0, 1, 0x52, 0x54, 0, 0, 0, 0x78];
        c.handle(&request(&c, &other, 1), 1000);
        let file = c.snapshot();
        // A new server (the restarted daemon) with the file: the same
        // address for the same (DUID, IAID), even asked in another order.
        let mut d = core(Some("2001:db8:1::100-2001:db8:1::1ff"));
        assert_eq!(d.restore(&file, 1001).unwrap(), 2);
        let r = d.handle(&request(&d, &other, 1), 1002);
        assert_ne!(addr(&r.unwrap()), Some(mine));
        let r = d.handle(&msg(MessageType::Solicit, &duid, Some(9)), 1002);
        assert_eq!(addr(&r.unwrap()), Some(mine));
        // Expired bindings are not taken back; a torn file is an error.
        let mut e = core(Some("2001:db8:1::100-2001:db8:1::1ff"));
        assert_eq!(e.restore(&file, u64::MAX).unwrap(), 0);
        assert!(e.restore(b"[{", 0).is_err());
    }

    #[test]
    fn dhcp6_duid_macs_and_fqdn() {
        assert_eq!(
            duid_mac(&[0, 3, 0, 1, 1, 2, 3, 4, 5, 6]),
            Some([1, 2, 3, 4, 5, 6])
        );
        assert_eq!(duid_mac(&[0, 2, 0, 1, 1, 2, 3, 4, 5, 6]), None);
        assert_eq!(
            fqdn_host(b"\x01\x04host\x03lab\x00").as_deref(),
            Some("host")
        );
        assert_eq!(fqdn_host(b"\x01\x09ho"), None);
    }
}
