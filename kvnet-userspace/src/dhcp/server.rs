//! The DHCPv4 message flow (RFC 2131) over a UDP socket bound to the gateway
//! interface.
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use dhcproto::v4::{
    self, Decodable, Decoder, DhcpOption, Encodable, Encoder, Flags, HType, Message, MessageType,
    Opcode, OptionCode, UnknownOption,
};
use serde::Serialize;

use super::config::{broadcast, netmask, valid_hostname, DhcpConfig};
use super::leases::LeaseDb;
use crate::mac::Mac;

/// What the server did, for logs, tests and `kvnet dhcp` output.
#[derive(Default, Debug)]
pub struct Counters {
    pub received: AtomicU64,
    /// Undecodable or not a DHCP request from an Ethernet client: dropped.
    pub malformed: AtomicU64,
    pub offers: AtomicU64,
    pub acks: AtomicU64,
    pub naks: AtomicU64,
    pub releases: AtomicU64,
    pub declines: AtomicU64,
    pub informs: AtomicU64,
    /// DISCOVERs left unanswered because the pool was empty.
    pub exhausted: AtomicU64,
    /// Valid messages that needed no answer (another server chosen, a
    /// relay named: kvnet serves its own links only, ...).
    pub ignored: AtomicU64,
    /// Messages beyond a client's rate ([`CLIENT_RATE`] a second).
    pub rate_limited: AtomicU64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct CountersSnapshot {
    pub received: u64,
    pub malformed: u64,
    pub offers: u64,
    pub acks: u64,
    pub naks: u64,
    pub releases: u64,
    pub declines: u64,
    pub informs: u64,
    pub exhausted: u64,
    pub ignored: u64,
    pub rate_limited: u64,
    /// Writes of the lease file (one fsync each, however many leases
    /// changed: they share a write).
    pub lease_writes: u64,
    pub lease_write_failures: u64,
    /// Times the serving task ended on an error and was started again.
    pub restarts: u64,
}

impl Counters {
    pub fn snapshot(&self) -> CountersSnapshot {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        CountersSnapshot {
            received: g(&self.received),
            malformed: g(&self.malformed),
            offers: g(&self.offers),
            acks: g(&self.acks),
            naks: g(&self.naks),
            releases: g(&self.releases),
            declines: g(&self.declines),
            informs: g(&self.informs),
            exhausted: g(&self.exhausted),
            ignored: g(&self.ignored),
            rate_limited: g(&self.rate_limited),
            // Kept by the lease writer and the supervisor (DhcpHandle).
            lease_writes: 0,
            lease_write_failures: 0,
            restarts: 0,
        }
    }
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a reply goes (RFC 2131 4.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// 255.255.255.255:68.
    Broadcast,
    /// ciaddr:68, the client has a working address.
    Unicast(Ipv4Addr),
    /// yiaddr:68 to a client without an address yet: needs a neighbour
    /// entry for its MAC (else falls back to broadcast).
    Hardware(Ipv4Addr, Mac),
}

/// A server's state: config and leases.
pub struct Core {
    pub cfg: DhcpConfig,
    pub db: LeaseDb,
    pub limiter: ClientLimiter,
}

/// Messages one client (by MAC) may send a second: a real client sends a
/// handful; a guest spamming REQUESTs would make the server write its
/// lease file for each, and stall DHCP and DNS for every network.
pub const CLIENT_RATE: u32 = 10;
/// Clients followed at once; past it, only this second's stay.
const CLIENTS_FOLLOWED: usize = 4096;

/// A fixed one-second window of messages per client.
#[derive(Default)]
pub struct ClientLimiter {
    seen: std::collections::HashMap<Mac, (u64, u32)>,
}

impl ClientLimiter {
    /// Whether `mac` may send one more message in second `now`.
    pub fn allow(&mut self, mac: Mac, now: u64) -> bool {
        if self.seen.len() >= CLIENTS_FOLLOWED && !self.seen.contains_key(&mac) {
            self.seen.retain(|_, (sec, _)| *sec == now);
        }
        let (sec, n) = self.seen.entry(mac).or_insert((now, 0));
        if *sec != now {
            (*sec, *n) = (now, 0);
        }
        if *n >= CLIENT_RATE {
            return false;
        }
        *n += 1;
        true
    }
}

/// The client's hostname (option 12), reduced to a valid DNS label.
fn client_hostname(req: &Message) -> Option<String> {
    match req.opts().get(OptionCode::Hostname) {
        Some(DhcpOption::Hostname(h)) => {
            let first = h.split('.').next().unwrap_or_default().to_ascii_lowercase();
            valid_hostname(&first).then_some(first)
        }
        _ => None,
    }
}

fn requested_ip(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::RequestedIpAddress) {
        Some(DhcpOption::RequestedIpAddress(ip)) => Some(*ip),
        _ => None,
    }
}

fn server_id(req: &Message) -> Option<Ipv4Addr> {
    match req.opts().get(OptionCode::ServerIdentifier) {
        Some(DhcpOption::ServerIdentifier(ip)) => Some(*ip),
        _ => None,
    }
}

impl Core {
    fn lease_secs(&self) -> u32 {
        u32::try_from(self.cfg.lease_time.as_secs()).unwrap_or(u32::MAX - 1)
    }

    /// The name a client goes by: its static name, else what it sent.
    fn hostname_for(&self, mac: &Mac, req: &Message) -> Option<String> {
        self.cfg
            .hosts
            .iter()
            .find(|h| h.mac == *mac)
            .and_then(|h| h.name.clone())
            .or_else(|| client_hostname(req))
    }

    /// A reply skeleton of type `mt` to `req`.
    fn reply(&self, req: &Message, mt: MessageType) -> Message {
        let mut m = Message::default();
        m.set_opcode(Opcode::BootReply)
            .set_htype(HType::Eth)
            .set_xid(req.xid())
            .set_flags(req.flags())
            .set_chaddr(req.chaddr());
        m.opts_mut().insert(DhcpOption::MessageType(mt));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(self.cfg.server_ip));
        if let Some(id @ DhcpOption::ClientIdentifier(_)) =
            req.opts().get(OptionCode::ClientIdentifier)
        {
            // RFC 6842.
            m.opts_mut().insert(id.clone());
        }
        m
    }

    /// Network options for OFFER/ACK (and INFORM's ACK, without lease times).
    fn add_config_options(&self, m: &mut Message, lease: bool, hostname: Option<&str>) {
        let c = &self.cfg;
        let o = m.opts_mut();
        if lease {
            let secs = self.lease_secs();
            o.insert(DhcpOption::AddressLeaseTime(secs));
            o.insert(DhcpOption::Renewal(secs / 2));
            o.insert(DhcpOption::Rebinding((u64::from(secs) * 7 / 8) as u32));
        }
        o.insert(DhcpOption::SubnetMask(netmask(c.prefix)));
        o.insert(DhcpOption::BroadcastAddr(broadcast(c.server_ip, c.prefix)));
        o.insert(DhcpOption::Router(vec![c.server_ip]));
        if c.dns {
            o.insert(DhcpOption::DomainNameServer(vec![c.server_ip]));
        }
        if let Some(d) = &c.domain {
            o.insert(DhcpOption::DomainName(d.clone()));
        }
        if let Some(h) = hostname {
            o.insert(DhcpOption::Hostname(h.to_string()));
        }
        if let Some(mtu) = c.mtu {
            o.insert(DhcpOption::InterfaceMtu(mtu));
        }
        for (code, data) in &c.extra_options {
            o.insert(DhcpOption::Unknown(UnknownOption::new(
                OptionCode::from(*code),
                data.clone(),
            )));
        }
    }

    /// Where an OFFER/ACK goes.
    fn dest(req: &Message, yiaddr: Ipv4Addr, mac: Mac) -> Dest {
        if !req.ciaddr().is_unspecified() {
            Dest::Unicast(req.ciaddr())
        } else if req.flags().broadcast() {
            Dest::Broadcast
        } else {
            Dest::Hardware(yiaddr, mac)
        }
    }

    fn nak(&self, req: &Message, why: &str, counters: &Counters) -> Option<(Message, Dest)> {
        bump(&counters.naks);
        log::info!("dhcp {}: NAK to {}: {why}", self.cfg.iface, mac_of(req));
        let mut m = self.reply(req, MessageType::Nak);
        m.opts_mut().insert(DhcpOption::Message(why.to_string()));
        // RFC 2131 4.3.2: a NAK without relay is broadcast.
        m.set_flags(Flags::default().set_broadcast());
        Some((m, Dest::Broadcast))
    }

    fn ack(
        &mut self,
        req: &Message,
        mac: Mac,
        ip: Ipv4Addr,
        now: u64,
        counters: &Counters,
    ) -> Option<(Message, Dest)> {
        let hostname = self.hostname_for(&mac, req);
        let expires = now + u64::from(self.lease_secs());
        if let Err(e) = self.db.bind(mac, ip, hostname.clone(), expires) {
            // The client still gets its address; the next change may be
            // saved.
            log::error!(
                "dhcp {}: persisting lease {ip} for {mac}: {e:#}",
                self.cfg.iface
            );
        }
        bump(&counters.acks);
        log::info!(
            "dhcp {}: ACK {ip} to {mac} ({})",
            self.cfg.iface,
            hostname.as_deref().unwrap_or("-")
        );
        let mut m = self.reply(req, MessageType::Ack);
        m.set_yiaddr(ip).set_ciaddr(req.ciaddr());
        self.add_config_options(&mut m, true, hostname.as_deref());
        Some((m, Self::dest(req, ip, mac)))
    }

    /// [`Core::handle`], and for an ACK of a lease what to wait on before
    /// sending it: the lease on disk.
    pub fn handle_durable(
        &mut self,
        req: &Message,
        now: u64,
        counters: &Counters,
    ) -> Option<(Message, Dest, Option<super::leases::Ticket>)> {
        let (m, dest) = self.handle(req, now, counters)?;
        let lease = m.opts().msg_type() == Some(MessageType::Ack)
            && m.opts().get(OptionCode::AddressLeaseTime).is_some();
        let ticket = lease.then(|| self.db.ticket());
        Some((m, dest, ticket))
    }

    /// One request in, at most one reply out.
    pub fn handle(
        &mut self,
        req: &Message,
        now: u64,
        counters: &Counters,
    ) -> Option<(Message, Dest)> {
        let mac = mac_of(req);
        let Some(mt) = req.opts().msg_type() else {
            bump(&counters.malformed);
            return None;
        };
        if !self.limiter.allow(mac, now) {
            bump(&counters.rate_limited);
            return None;
        }
        // kvnet serves the guests on its own links, never through a relay:
        // a guest that sets giaddr would have the answer sent wherever it
        // names (a reflection at the host or the outside).
        if !req.giaddr().is_unspecified() {
            bump(&counters.ignored);
            log::info!(
                "dhcp {}: ignored a request from {mac} naming relay {}",
                self.cfg.iface,
                req.giaddr()
            );
            return None;
        }
        match mt {
            MessageType::Discover => {
                let Some(ip) = self.db.choose(&mac, requested_ip(req), now) else {
                    bump(&counters.exhausted);
                    log::warn!("dhcp {}: no free address for {mac}", self.cfg.iface);
                    return None;
                };
                self.db.offer(mac, ip, now);
                bump(&counters.offers);
                log::info!("dhcp {}: OFFER {ip} to {mac}", self.cfg.iface);
                let hostname = self.hostname_for(&mac, req);
                let mut m = self.reply(req, MessageType::Offer);
                m.set_yiaddr(ip);
                self.add_config_options(&mut m, true, hostname.as_deref());
                Some((m, Self::dest(req, ip, mac)))
            }
            MessageType::Request => {
                match (server_id(req), requested_ip(req)) {
                    // SELECTING: the client picked a server.
                    (Some(sid), _) if sid != self.cfg.server_ip => {
                        bump(&counters.ignored);
                        None
                    }
                    (Some(_), None) => self.nak(req, "no requested address", counters),
                    (Some(_), Some(ip)) | (None, Some(ip)) => {
                        // SELECTING or INIT-REBOOT: we are authoritative for
                        // this network.
                        if self.db.can_serve(&mac, ip, now) {
                            self.ack(req, mac, ip, now, counters)
                        } else {
                            self.nak(req, &format!("address {ip} is not available"), counters)
                        }
                    }
                    (None, None) => {
                        // RENEWING / REBINDING.
                        let ip = req.ciaddr();
                        if ip.is_unspecified() {
                            return self.nak(req, "no address to renew", counters);
                        }
                        if self.db.can_serve(&mac, ip, now) {
                            self.ack(req, mac, ip, now, counters)
                        } else {
                            self.nak(req, &format!("address {ip} is not yours"), counters)
                        }
                    }
                }
            }
            MessageType::Release => {
                if server_id(req).is_some_and(|s| s != self.cfg.server_ip) {
                    bump(&counters.ignored);
                    return None;
                }
                match self.db.release(&mac, req.ciaddr()) {
                    Ok(true) => {
                        bump(&counters.releases);
                        log::info!("dhcp {}: RELEASE {} by {mac}", self.cfg.iface, req.ciaddr());
                    }
                    Ok(false) => bump(&counters.ignored),
                    Err(e) => log::error!("dhcp {}: persisting release: {e:#}", self.cfg.iface),
                }
                None
            }
            MessageType::Decline => {
                if server_id(req).is_some_and(|s| s != self.cfg.server_ip) {
                    bump(&counters.ignored);
                    return None;
                }
                let Some(ip) = requested_ip(req) else {
                    bump(&counters.malformed);
                    return None;
                };
                match self.db.decline(&mac, ip, now) {
                    Ok(true) => {
                        bump(&counters.declines);
                        log::warn!(
                            "dhcp {}: DECLINE {ip} by {mac}: quarantined",
                            self.cfg.iface
                        );
                    }
                    Ok(false) => bump(&counters.ignored),
                    Err(e) => log::error!("dhcp {}: persisting decline: {e:#}", self.cfg.iface),
                }
                None
            }
            MessageType::Inform => {
                let ci = req.ciaddr();
                if ci.is_unspecified() {
                    bump(&counters.malformed);
                    return None;
                }
                bump(&counters.informs);
                let mut m = self.reply(req, MessageType::Ack);
                m.set_ciaddr(ci);
                self.add_config_options(&mut m, false, None);
                Some((m, Dest::Unicast(ci)))
            }
            _ => {
                bump(&counters.ignored);
                None
            }
        }
    }
}

fn mac_of(req: &Message) -> Mac {
    let mut m = [0u8; 6];
    let c = req.chaddr();
    let n = c.len().min(6);
    m[..n].copy_from_slice(&c[..n]);
    Mac(m)
}

/// Decode a request, rejecting what is not a DHCP request from an Ethernet
/// client.
pub fn decode_request(buf: &[u8]) -> Result<Message, String> {
    check_options(buf)?;
    let m = Message::decode(&mut Decoder::new(buf)).map_err(|e| format!("undecodable: {e}"))?;
    if m.opcode() != Opcode::BootRequest {
        return Err("not a BOOTREQUEST".into());
    }
    if m.htype() != HType::Eth || m.hlen() != 6 {
        return Err(format!(
            "hardware type {:?}/len {} is not Ethernet",
            m.htype(),
            m.hlen()
        ));
    }
    if m.opts().msg_type().is_none() {
        return Err("no DHCP message type".into());
    }
    let mac = mac_of(&m);
    if mac.is_zero() || mac.is_multicast() {
        return Err(format!(
            "client hardware address {mac} is not a unicast MAC"
        ));
    }
    Ok(m)
}

/// Fixed BOOTP header + magic cookie.
const OPTIONS_AT: usize = 240;

/// Walk the options area: dhcproto stops quietly at a bad option and keeps
/// the ones before it; a message with an option running past the end is
/// malformed and dropped whole.
fn check_options(buf: &[u8]) -> Result<(), String> {
    if buf.len() < OPTIONS_AT {
        return Err(format!("{} bytes is shorter than a DHCP header", buf.len()));
    }
    if buf[236..OPTIONS_AT] != v4::MAGIC {
        return Err("no DHCP magic cookie".into());
    }
    let mut i = OPTIONS_AT;
    while i < buf.len() {
        match buf[i] {
            0 => i += 1,
            255 => return Ok(()),
            code => {
                let Some(&len) = buf.get(i + 1) else {
                    return Err(format!("option {code} at offset {i} has no length"));
                };
                let end = i + 2 + usize::from(len);
                if end > buf.len() {
                    return Err(format!(
                        "option {code} at offset {i}: length {len} runs past the end"
                    ));
                }
                i = end;
            }
        }
    }
    Ok(())
}

/// Encode a reply, padded to the 300-byte BOOTP minimum.
pub fn encode_reply(m: &Message) -> Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(576);
    m.encode(&mut Encoder::new(&mut buf))
        .context("encode DHCP reply")?;
    if buf.len() < v4::MIN_PACKET_SIZE {
        buf.resize(v4::MIN_PACKET_SIZE, 0);
    }
    Ok(buf)
}

/// Teach the kernel `ip` is at `mac` on `iface` so a unicast reply reaches
/// a client that cannot answer ARP yet (what dnsmasq does).
pub fn set_neighbour(
    sock: &tokio::net::UdpSocket,
    iface: &str,
    ip: Ipv4Addr,
    mac: Mac,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: arpreq is plain old data; all-zero is a valid value.
    let mut req: libc::arpreq = unsafe { std::mem::zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in fits in the sockaddr arp_pa (both 16 bytes).
    unsafe {
        std::ptr::copy_nonoverlapping(
            &sin as *const libc::sockaddr_in as *const u8,
            &mut req.arp_pa as *mut libc::sockaddr as *mut u8,
            std::mem::size_of::<libc::sockaddr_in>(),
        );
    }
    req.arp_ha.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in req.arp_ha.sa_data.iter_mut().zip(mac.0) {
        *d = s as libc::c_char;
    }
    req.arp_flags = libc::ATF_COM;
    for (d, s) in req.arp_dev.iter_mut().zip(iface.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCSARP reads a valid arpreq.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSARP, &req) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Send `reply` where `dest` says.
pub async fn send_reply(
    sock: &tokio::net::UdpSocket,
    iface: &str,
    reply: &Message,
    dest: Dest,
) -> Result<()> {
    let buf = encode_reply(reply)?;
    let to = match dest {
        Dest::Broadcast => SocketAddrV4::new(Ipv4Addr::BROADCAST, v4::CLIENT_PORT),
        Dest::Unicast(ip) => SocketAddrV4::new(ip, v4::CLIENT_PORT),
        Dest::Hardware(ip, mac) => match set_neighbour(sock, iface, ip, mac) {
            Ok(()) => SocketAddrV4::new(ip, v4::CLIENT_PORT),
            Err(e) => {
                log::debug!("dhcp {iface}: neighbour entry {ip} -> {mac}: {e}; broadcasting");
                SocketAddrV4::new(Ipv4Addr::BROADCAST, v4::CLIENT_PORT)
            }
        },
    };
    sock.send_to(&buf, to)
        .await
        .with_context(|| format!("send DHCP reply to {to} on {iface}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::config::parse_host;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    const MAC1: [u8; 6] = [0x52, 0x54, 0, 0, 0, 1];
    const MAC2: [u8; 6] = [0x52, 0x54, 0, 0, 0, 2];

    fn core(tag: &str) -> (Core, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("kvnet-dhcp-srv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = DhcpConfig::new(
            "br0",
            ip("10.6.0.1"),
            24,
            (ip("10.6.0.10"), ip("10.6.0.11")),
        );
        cfg.domain = Some("lab.test".into());
        cfg.mtu = Some(1400);
        cfg.extra_options.push((42, vec![10, 6, 0, 1]));
        cfg.hosts
            .push(parse_host("52:54:00:00:00:09,10.6.0.9,fixed").unwrap());
        let db = LeaseDb::open(&cfg, &dir, 1000).unwrap();
        (
            Core {
                cfg,
                db,
                limiter: Default::default(),
            },
            dir,
        )
    }

    fn msg(mac: [u8; 6], mt: MessageType, opts: Vec<DhcpOption>) -> Message {
        let mut m = Message::default();
        m.set_chaddr(&mac).set_xid(7);
        m.opts_mut().insert(DhcpOption::MessageType(mt));
        for o in opts {
            m.opts_mut().insert(o);
        }
        // Round trip through the wire format, as the server sees it.
        let mut buf = Vec::new();
        m.encode(&mut Encoder::new(&mut buf)).unwrap();
        decode_request(&buf).unwrap()
    }

    /// Issue 15: one client's flood is cut at its rate, others are served.
    #[test]
    fn a_client_beyond_its_rate_is_not_answered_and_others_are() {
        let (mut c, dir) = core("rate");
        let n = Counters::default();
        let discover = |mac| msg(mac, MessageType::Discover, vec![]);
        for i in 0..CLIENT_RATE {
            assert!(c.handle(&discover(MAC1), 1000, &n).is_some(), "message {i}");
        }
        assert!(
            c.handle(&discover(MAC1), 1000, &n).is_none(),
            "over the rate"
        );
        assert_eq!(n.rate_limited.load(Ordering::Relaxed), 1);
        // Another client in the same second, and the first in the next.
        assert!(c.handle(&discover(MAC2), 1000, &n).is_some());
        assert!(c.handle(&discover(MAC1), 1001, &n).is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Issue 15: a guest naming a relay (giaddr) would have the answer sent
    /// wherever it names; kvnet has no relays and ignores such requests.
    #[test]
    fn a_request_naming_a_relay_is_ignored() {
        let (mut c, dir) = core("giaddr");
        let n = Counters::default();
        let mut relayed = msg(MAC1, MessageType::Discover, vec![]);
        relayed.set_giaddr(ip("198.51.100.1"));
        assert!(c.handle(&relayed, 1000, &n).is_none());
        assert_eq!(n.ignored.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Control: the same request without it is answered.
        let direct = msg(MAC1, MessageType::Discover, vec![]);
        let (_, dest) = c.handle(&direct, 1000, &n).unwrap();
        assert_eq!(dest, Dest::Hardware(ip("10.6.0.10"), Mac(MAC1)));
        let _ = std::fs::remove_dir_all(dir);
    }

    /// libvirt's `<dns enable='no'/>`: no DNS server is named (option 6);
    /// the rest stays (router, MTU).
    #[test]
    fn without_dns_no_name_server_is_handed_out() {
        let (mut c, dir) = core("nodns");
        c.cfg.dns = false;
        let n = Counters::default();
        let (offer, _) = c
            .handle(&msg(MAC1, MessageType::Discover, vec![]), 1000, &n)
            .unwrap();
        let o = offer.opts();
        assert_eq!(o.get(OptionCode::DomainNameServer), None);
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1400))
        );
        assert!(o.get(OptionCode::Router).is_some());
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn dhcp_flow_discover_request_renew_release() {
        let (mut c, dir) = core("flow");
        let n = Counters::default();
        let (offer, dest) = c
            .handle(&msg(MAC1, MessageType::Discover, vec![]), 1000, &n)
            .unwrap();
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), ip("10.6.0.10"));
        assert_eq!(dest, Dest::Hardware(ip("10.6.0.10"), Mac(MAC1)));
        let o = offer.opts();
        assert_eq!(
            o.get(OptionCode::SubnetMask),
            Some(&DhcpOption::SubnetMask(ip("255.255.255.0")))
        );
        assert_eq!(
            o.get(OptionCode::Router),
            Some(&DhcpOption::Router(vec![ip("10.6.0.1")]))
        );
        assert_eq!(
            o.get(OptionCode::DomainNameServer),
            Some(&DhcpOption::DomainNameServer(vec![ip("10.6.0.1")]))
        );
        assert_eq!(
            o.get(OptionCode::DomainName),
            Some(&DhcpOption::DomainName("lab.test".into()))
        );
        assert_eq!(
            o.get(OptionCode::InterfaceMtu),
            Some(&DhcpOption::InterfaceMtu(1400))
        );
        assert_eq!(
            o.get(OptionCode::AddressLeaseTime),
            Some(&DhcpOption::AddressLeaseTime(3600))
        );
        // The extra option survives the wire.
        let wire = encode_reply(&offer).unwrap();
        assert!(wire.len() >= 300);
        let back = Message::decode(&mut Decoder::new(&wire)).unwrap();
        assert_eq!(
            back.opts().get(OptionCode::from(42)),
            Some(&DhcpOption::NtpServers(vec![ip("10.6.0.1")]))
        );

        let req = msg(
            MAC1,
            MessageType::Request,
            vec![
                DhcpOption::ServerIdentifier(ip("10.6.0.1")),
                DhcpOption::RequestedIpAddress(ip("10.6.0.10")),
                DhcpOption::Hostname("Guest1.example".into()),
            ],
        );
        let (ack, _) = c.handle(&req, 1001, &n).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(ack.yiaddr(), ip("10.6.0.10"));
        let l = c.db.leases();
        assert_eq!(l[0].hostname.as_deref(), Some("guest1"));
        assert_eq!(l[0].expires_unix, 1001 + 3600);

        // Another server chosen: silence.
        let other = msg(
            MAC1,
            MessageType::Request,
            vec![
                DhcpOption::ServerIdentifier(ip("10.6.0.2")),
                DhcpOption::RequestedIpAddress(ip("10.6.0.10")),
            ],
        );
        assert!(c.handle(&other, 1002, &n).is_none());

        // Renewal: unicast to ciaddr.
        let mut renew = msg(MAC1, MessageType::Request, vec![]);
        renew.set_ciaddr(ip("10.6.0.10"));
        let (ack, dest) = c.handle(&renew, 2000, &n).unwrap();
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(dest, Dest::Unicast(ip("10.6.0.10")));
        assert_eq!(c.db.leases()[0].expires_unix, 2000 + 3600);

        // Someone else renewing that address: NAK, broadcast.
        let mut steal = msg([0x52, 0x54, 0, 0, 0, 2], MessageType::Request, vec![]);
        steal.set_ciaddr(ip("10.6.0.10"));
        let (nak, dest) = c.handle(&steal, 2000, &n).unwrap();
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
        assert_eq!(dest, Dest::Broadcast);
        // INIT-REBOOT for an address outside the network: NAK.
        let reboot = msg(
            MAC1,
            MessageType::Request,
            vec![DhcpOption::RequestedIpAddress(ip("192.168.1.5"))],
        );
        assert_eq!(
            c.handle(&reboot, 2000, &n).unwrap().0.opts().msg_type(),
            Some(MessageType::Nak)
        );

        // INFORM: ACK without lease time, unicast.
        let mut inform = msg([0x52, 0x54, 0, 0, 0, 3], MessageType::Inform, vec![]);
        inform.set_ciaddr(ip("10.6.0.50"));
        let (ack, dest) = c.handle(&inform, 2000, &n).unwrap();
        assert_eq!(dest, Dest::Unicast(ip("10.6.0.50")));
        assert!(ack.opts().get(OptionCode::AddressLeaseTime).is_none());
        assert!(ack.opts().get(OptionCode::Router).is_some());

        // RELEASE frees it.
        let mut rel = msg(
            MAC1,
            MessageType::Release,
            vec![DhcpOption::ServerIdentifier(ip("10.6.0.1"))],
        );
        rel.set_ciaddr(ip("10.6.0.10"));
        assert!(c.handle(&rel, 2001, &n).is_none());
        assert!(c.db.leases().is_empty());
        let s = n.counters_check();
        assert_eq!(
            (s.offers, s.acks, s.naks, s.releases, s.informs, s.ignored),
            (1, 2, 2, 1, 1, 1)
        );
        // (The lease writer may still be finishing a write there.)
        let _ = std::fs::remove_dir_all(dir);
    }

    impl Counters {
        fn counters_check(&self) -> CountersSnapshot {
            self.snapshot()
        }
    }

    #[test]
    fn dhcp_flow_static_exhaustion_decline() {
        let (mut c, dir) = core("static");
        let n = Counters::default();
        let (offer, _) = c
            .handle(
                &msg([0x52, 0x54, 0, 0, 0, 9], MessageType::Discover, vec![]),
                1000,
                &n,
            )
            .unwrap();
        assert_eq!(offer.yiaddr(), ip("10.6.0.9"));
        assert_eq!(
            offer.opts().get(OptionCode::Hostname),
            Some(&DhcpOption::Hostname("fixed".into()))
        );
        // Two pool addresses, three dynamic clients: the third gets nothing.
        for i in 1..=2u8 {
            let mac = [0x52, 0x54, 0, 0, 1, i];
            let (o, _) = c
                .handle(&msg(mac, MessageType::Discover, vec![]), 1000, &n)
                .unwrap();
            let r = msg(
                mac,
                MessageType::Request,
                vec![
                    DhcpOption::ServerIdentifier(ip("10.6.0.1")),
                    DhcpOption::RequestedIpAddress(o.yiaddr()),
                ],
            );
            assert_eq!(
                c.handle(&r, 1000, &n).unwrap().0.opts().msg_type(),
                Some(MessageType::Ack)
            );
        }
        let third = [0x52, 0x54, 0, 0, 1, 3];
        assert!(c
            .handle(&msg(third, MessageType::Discover, vec![]), 1000, &n)
            .is_none());
        assert_eq!(n.snapshot().exhausted, 1);
        // A DECLINE quarantines: still nothing for the third client.
        let d = msg(
            [0x52, 0x54, 0, 0, 1, 1],
            MessageType::Decline,
            vec![
                DhcpOption::ServerIdentifier(ip("10.6.0.1")),
                DhcpOption::RequestedIpAddress(ip("10.6.0.10")),
            ],
        );
        assert!(c.handle(&d, 1001, &n).is_none());
        assert_eq!(n.snapshot().declines, 1);
        assert!(c
            .handle(&msg(third, MessageType::Discover, vec![]), 1001, &n)
            .is_none());
        // (The lease writer may still be finishing a write there.)
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn dhcp_malformed_requests_rejected() {
        let good = {
            let mut m = Message::default();
            m.set_chaddr(&MAC1);
            m.opts_mut()
                .insert(DhcpOption::MessageType(MessageType::Discover));
            let mut b = Vec::new();
            m.encode(&mut Encoder::new(&mut b)).unwrap();
            b
        };
        assert!(decode_request(&good).is_ok());
        // Truncated anywhere.
        for n in [0, 1, 20, 235, 239, 241] {
            assert!(decode_request(&good[..n]).is_err(), "len {n}");
        }
        // An option whose length runs past the end.
        let mut bad = good.clone();
        let end = bad.len() - 1;
        bad[end] = 12; // hostname
        bad.push(200);
        bad.extend_from_slice(b"abc");
        assert!(decode_request(&bad).is_err());
        // A reply, not a request.
        let mut reply = good.clone();
        reply[0] = 2;
        assert!(decode_request(&reply).is_err());
        // Garbage.
        assert!(decode_request(&[0xffu8; 600]).is_err());
        // What the e2e test sends.
        let mut hdr = vec![1u8, 1, 6, 0];
        hdr.extend_from_slice(&[0; 232]);
        hdr.extend_from_slice(&v4::MAGIC);
        let mut b = hdr.clone();
        b.extend_from_slice(&[53, 1, 1, 12, 200, 97]);
        assert!(decode_request(&b).unwrap_err().contains("runs past"));
        let mut b = hdr.clone();
        b.extend_from_slice(&[53, 1, 1, 255]);
        assert!(decode_request(&b)
            .unwrap_err()
            .contains("not a unicast MAC"));
        b[0] = 2;
        assert!(decode_request(&b).unwrap_err().contains("BOOTREQUEST"));
    }
}
