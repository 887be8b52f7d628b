//! Route netlink (rtnetlink): the links, addresses, routes and policy
//! rules kvnet sets up on the host, as typed messages on a netlink socket
//! instead of `ip` subprocesses, so callers holding the switch lock never
//! wait on a child process and a failure says which operation and errno.
use std::{
    ffi::CString,
    net::IpAddr,
    sync::atomic::{AtomicU32, Ordering},
};

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS,
    NLM_F_CAPPED, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::{
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    route::{RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType},
    rule::{RuleAction, RuleAttribute, RuleMessage},
    AddressFamily, RouteNetlinkMessage,
};
use netlink_packet_utils::nla::NlasIterator;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use nix::errno::Errno;

use crate::cidr::Cidr;

/// A failed rtnetlink operation; `op` says what was being done, e.g.
/// "adding address 10.0.0.1/24 to kvnet-default".
#[derive(Debug, thiserror::Error)]
pub enum RtnlError {
    /// The kernel refused the request.
    #[error("{op}: {} ({errno:?}){}", errno.desc(), detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Kernel {
        op: String,
        errno: Errno,
        /// The kernel's extended ack message, when it gave one.
        detail: Option<String>,
    },
    #[error("{op}: netlink socket: {source}")]
    Socket {
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: undecodable netlink answer: {detail}")]
    Decode { op: String, detail: String },
    /// A name the kernel would cut or refuse (a NUL in it would create a
    /// link named by its first part, which nothing could delete again).
    #[error("{op}: {why}")]
    BadName { op: String, why: String },
}

impl RtnlError {
    /// The kernel's errno, if the kernel refused.
    pub fn errno(&self) -> Option<Errno> {
        match self {
            RtnlError::Kernel { errno, .. } => Some(*errno),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, RtnlError>;

/// A policy rule as kvnet uses them: IPv4, "[iif IIF] [to DST] pref PREF
/// lookup TABLE".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub pref: u32,
    pub iif: Option<String>,
    pub to: Option<Cidr>,
    pub table: u32,
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(i) = &self.iif {
            write!(f, "iif {i} ")?;
        }
        if let Some(t) = &self.to {
            write!(f, "to {t} ")?;
        }
        write!(f, "pref {} lookup {}", self.pref, self.table)
    }
}

pub const TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// Creates the veth pair `name` <-> `peer`.
pub fn link_add_veth(name: &str, peer: &str) -> Result<()> {
    let op = format!("creating veth pair {name:?} <-> {peer:?}");
    for n in [name, peer] {
        crate::netdev::check_ifname(n).map_err(|e| RtnlError::BadName {
            op: op.clone(),
            why: format!("{e:#}"),
        })?;
    }
    request(
        &op,
        RouteNetlinkMessage::NewLink(veth_msg(name, peer)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
}

fn veth_msg(name: &str, peer: &str) -> LinkMessage {
    let mut p = LinkMessage::default();
    p.attributes.push(LinkAttribute::IfName(peer.into()));
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(p))),
    ]));
    m
}

/// `ip link add NAME type vxlan external dstport PORT local LOCAL [dev
/// LINK] nolearning df set`: a collect_md VXLAN device (the tunnel key
/// comes with each frame) that never lets the outer packet fragment.
pub fn link_add_vxlan_external(
    name: &str,
    local: std::net::Ipv4Addr,
    port: u16,
    link: Option<u32>,
) -> Result<()> {
    use netlink_packet_route::link::InfoVxlan;
    let op = format!("creating VXLAN device {name:?} (local {local})");
    crate::netdev::check_ifname(name).map_err(|e| RtnlError::BadName {
        op: op.clone(),
        why: format!("{e:#}"),
    })?;
    let mut data = vec![
        InfoVxlan::CollectMetadata(true),
        InfoVxlan::Port(port),
        InfoVxlan::Local(local),
        InfoVxlan::Learning(false),
        // IFLA_VXLAN_DF_SET.
        InfoVxlan::Df(1),
    ];
    if let Some(l) = link {
        data.push(InfoVxlan::Link(l));
    }
    let mut m = LinkMessage::default();
    m.attributes.push(LinkAttribute::IfName(name.into()));
    m.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Vxlan),
        LinkInfo::Data(InfoData::Vxlan(data)),
    ]));
    request(
        &op,
        RouteNetlinkMessage::NewLink(m),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
}

/// `ip link set dev NAME up`.
pub fn link_set_up(name: &str) -> Result<()> {
    link_set_flag(&format!("setting {name} up"), name, LinkFlags::Up, true)
}

/// `ip link set dev NAME mtu MTU`.
pub fn link_set_mtu(name: &str, mtu: u16) -> Result<()> {
    let op = format!("setting the MTU of {name} to {mtu}");
    let mut m = LinkMessage::default();
    m.header.index = ifindex(&op, name)?;
    m.attributes.push(LinkAttribute::Mtu(u32::from(mtu)));
    request(&op, RouteNetlinkMessage::SetLink(m), 0).map(drop)
}

/// `ip link set dev NAME promisc on|off`.
pub fn link_set_promisc(name: &str, on: bool) -> Result<()> {
    let op = format!("turning promiscuous mode {} on {name}", on_off(on));
    link_set_flag(&op, name, LinkFlags::Promisc, on)
}

fn on_off(on: bool) -> &'static str {
    if on {
        "on"
    } else {
        "off"
    }
}

fn link_set_flag(op: &str, name: &str, flag: LinkFlags, on: bool) -> Result<()> {
    let m = flag_msg(ifindex(op, name)?, flag, on);
    request(op, RouteNetlinkMessage::SetLink(m), 0).map(drop)
}

/// Changes only `flag` (the change mask), as `ip link set` does.
fn flag_msg(index: u32, flag: LinkFlags, on: bool) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.change_mask = flag;
    m.header.flags = if on { flag } else { LinkFlags::empty() };
    m
}

/// Deletes link `name` (a veth's peer goes with it).
pub fn link_del(name: &str) -> Result<()> {
    let op = format!("deleting interface {name}");
    let mut m = LinkMessage::default();
    m.header.index = ifindex(&op, name)?;
    request(&op, RouteNetlinkMessage::DelLink(m), 0).map(drop)
}

/// Adds `cidr` to `iface`; `replace` makes an existing one fine (`ip addr
/// replace`), otherwise it is EEXIST (`ip addr add`).
pub fn addr_add(iface: &str, cidr: Cidr, replace: bool) -> Result<()> {
    let op = format!("adding address {cidr} to {iface}");
    let m = addr_msg(ifindex(&op, iface)?, cidr);
    let flags = NLM_F_CREATE | if replace { NLM_F_REPLACE } else { NLM_F_EXCL };
    request(&op, RouteNetlinkMessage::NewAddress(m), flags).map(drop)
}

fn addr_msg(index: u32, cidr: Cidr) -> AddressMessage {
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.prefix_len = cidr.prefix;
    m.header.index = index;
    // As `ip addr add A/P` (no `brd`): local and peer address both A.
    m.attributes
        .push(AddressAttribute::Local(IpAddr::V4(cidr.addr)));
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V4(cidr.addr)));
    m
}

/// `ip -6 addr replace A/P dev IFACE nodad`: a gateway's IPv6 address,
/// usable at once (no duplicate address detection: it is kvnet's own).
pub fn addr6_add(iface: &str, addr: std::net::Ipv6Addr, prefix: u8) -> Result<()> {
    use netlink_packet_route::address::AddressFlags;
    let op = format!("adding address {addr}/{prefix} to {iface}");
    let mut m = AddressMessage::default();
    m.header.family = AddressFamily::Inet6;
    m.header.prefix_len = prefix;
    m.header.index = ifindex(&op, iface)?;
    m.attributes
        .push(AddressAttribute::Address(IpAddr::V6(addr)));
    m.attributes
        .push(AddressAttribute::Flags(AddressFlags::Nodad));
    request(
        &op,
        RouteNetlinkMessage::NewAddress(m),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
}

/// `ip route replace unreachable default table TABLE`.
pub fn route_replace_unreachable_default(table: u32) -> Result<()> {
    let op = format!("adding route unreachable default to table {table}");
    request(
        &op,
        RouteNetlinkMessage::NewRoute(unreachable_default_msg(table)),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map(drop)
}

fn unreachable_default_msg(table: u32) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::Inet;
    m.header.destination_prefix_length = 0;
    m.header.protocol = RouteProtocol::Boot;
    m.header.scope = RouteScope::Universe;
    m.header.kind = RouteType::Unreachable;
    set_route_table(&mut m, table);
    m
}

/// Tables above 255 only fit the RTA_TABLE attribute.
fn set_route_table(m: &mut RouteMessage, table: u32) {
    m.header.table = u8::try_from(table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.attributes.push(RouteAttribute::Table(table));
}

fn route_table(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(m.header.table as u32)
}

/// `ip route flush table TABLE` (IPv4): deletes every route of the table.
pub fn route_flush_table(table: u32) -> Result<()> {
    let op = format!("flushing routing table {table}");
    let mut q = RouteMessage::default();
    q.header.address_family = AddressFamily::Inet;
    let routes = dump(&op, RouteNetlinkMessage::GetRoute(q))?;
    for r in routes {
        if let RouteNetlinkMessage::NewRoute(r) = r {
            if route_table(&r) == table {
                match request(&op, RouteNetlinkMessage::DelRoute(r), 0) {
                    // Gone meanwhile is as good as deleted.
                    Err(e) if e.errno() == Some(Errno::ESRCH) => {}
                    other => other.map(drop)?,
                }
            }
        }
    }
    Ok(())
}

/// `ip rule add RULE` (IPv4).
pub fn rule_add(rule: &Rule) -> Result<()> {
    let op = format!("adding rule {rule}");
    request(
        &op,
        RouteNetlinkMessage::NewRule(rule_msg(rule)),
        NLM_F_CREATE | NLM_F_EXCL,
    )
    .map(drop)
}

fn rule_msg(rule: &Rule) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.action = RuleAction::ToTable;
    m.header.table = u8::try_from(rule.table).unwrap_or(RouteHeader::RT_TABLE_UNSPEC);
    m.attributes.push(RuleAttribute::Priority(rule.pref));
    m.attributes.push(RuleAttribute::Table(rule.table));
    if let Some(i) = &rule.iif {
        m.attributes.push(RuleAttribute::Iifname(i.clone()));
    }
    if let Some(to) = rule.to {
        m.header.dst_len = to.prefix;
        m.attributes
            .push(RuleAttribute::Destination(IpAddr::V4(to.network())));
    }
    m
}

/// `ip rule del pref PREF` (IPv4): the first rule of that preference.
pub fn rule_del(pref: u32) -> Result<()> {
    let op = format!("deleting rule pref {pref}");
    request(&op, RouteNetlinkMessage::DelRule(pref_msg(pref)), 0).map(drop)
}

fn pref_msg(pref: u32) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = AddressFamily::Inet;
    m.attributes.push(RuleAttribute::Priority(pref));
    m
}

/// Whether an IPv4 rule of preference `pref` exists (`ip rule list pref`).
pub fn rule_exists(pref: u32) -> Result<bool> {
    let op = format!("listing rules of pref {pref}");
    let mut q = RuleMessage::default();
    q.header.family = AddressFamily::Inet;
    let rules = dump(&op, RouteNetlinkMessage::GetRule(q))?;
    Ok(rules.iter().any(|r| match r {
        RouteNetlinkMessage::NewRule(r) => rule_pref(r) == Some(pref),
        _ => false,
    }))
}

fn rule_pref(r: &RuleMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RuleAttribute::Priority(p) => Some(*p),
        _ => None,
    })
}

/// The ifindex of `name`; a missing interface is the kernel's ENODEV.
fn ifindex(op: &str, name: &str) -> Result<u32> {
    let nodev = || RtnlError::Kernel {
        op: op.to_string(),
        errno: Errno::ENODEV,
        detail: None,
    };
    let c = CString::new(name).map_err(|_| nodev())?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => Err(nodev()),
        i => Ok(i),
    }
}

static SEQ: AtomicU32 = AtomicU32::new(1);

fn socket(op: &str) -> Result<Socket> {
    let io = |source| RtnlError::Socket {
        op: op.to_string(),
        source,
    };
    let mut s = Socket::new(NETLINK_ROUTE).map_err(io)?;
    s.bind_auto().map_err(io)?;
    s.connect(&SocketAddr::new(0, 0)).map_err(io)?;
    // The kernel's reason in words, and errors without the echoed request;
    // kernels without these options just give less detail.
    let _ = s.set_ext_ack(true);
    let _ = s.set_cap_ack(true);
    Ok(s)
}

fn send(op: &str, sock: &Socket, msg: RouteNetlinkMessage, flags: u16) -> Result<u32> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let mut nl = NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
    nl.header.flags = NLM_F_REQUEST | flags;
    nl.header.sequence_number = seq;
    nl.finalize();
    let mut tx = vec![0u8; nl.buffer_len()];
    nl.serialize(&mut tx);
    sock.send(&tx, 0).map_err(|source| RtnlError::Socket {
        op: op.to_string(),
        source,
    })?;
    Ok(seq)
}

/// One datagram from `sock` (at most 32 KiB each, as the kernel sizes dumps).
fn recv(op: &str, sock: &Socket, buf: &mut [u8]) -> Result<usize> {
    let n = sock
        .recv(&mut &mut buf[..], libc::MSG_TRUNC)
        .map_err(|source| RtnlError::Socket {
            op: op.to_string(),
            source,
        })?;
    if n > buf.len() {
        return Err(RtnlError::Decode {
            op: op.to_string(),
            detail: format!("a datagram of {n} bytes, more than {}", buf.len()),
        });
    }
    Ok(n)
}

/// Sends `msg` with NLM_F_ACK and waits for the kernel's answer.
fn request(op: &str, msg: RouteNetlinkMessage, flags: u16) -> Result<()> {
    exchange(
        op,
        msg,
        NLM_F_ACK | flags,
        |header, payload| match payload {
            NetlinkPayload::Error(e) => Some(match e.code {
                None => Ok(()),
                Some(_) => Err(kernel_error(op, header, e.raw_code(), &e.header)),
            }),
            _ => None,
        },
    )
}

/// Sends dump request `msg` and collects the answers.
fn dump(op: &str, msg: RouteNetlinkMessage) -> Result<Vec<RouteNetlinkMessage>> {
    let mut out = Vec::new();
    exchange(op, msg, NLM_F_DUMP, |header, payload| match payload {
        NetlinkPayload::InnerMessage(i) => {
            out.push(i);
            None
        }
        NetlinkPayload::Done(d) if d.code < 0 => Some(Err(kernel_error(op, header, d.code, &[]))),
        NetlinkPayload::Done(_) => Some(Ok(())),
        NetlinkPayload::Error(e) if e.code.is_some() => {
            Some(Err(kernel_error(op, header, e.raw_code(), &e.header)))
        }
        _ => None,
    })?;
    Ok(out)
}

/// Sends `msg` and hands each answer to it to `each`, until `each` ends
/// the exchange with a result.
fn exchange<T>(
    op: &str,
    msg: RouteNetlinkMessage,
    flags: u16,
    mut each: impl FnMut(&NetlinkHeader, NetlinkPayload<RouteNetlinkMessage>) -> Option<Result<T>>,
) -> Result<T> {
    let sock = socket(op)?;
    let seq = send(op, &sock, msg, flags)?;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(op, &sock, &mut buf)?;
        for m in messages(&buf[..n]) {
            let m = m.map_err(|detail| RtnlError::Decode {
                op: op.to_string(),
                detail,
            })?;
            if m.header.sequence_number != seq {
                continue;
            }
            if let Some(r) = each(&m.header, m.payload) {
                return r;
            }
        }
    }
}

/// The netlink messages of one datagram, parsed; an undecodable one is an
/// error (stated, not fatal to the others).
pub(crate) fn messages(
    buf: &[u8],
) -> impl Iterator<Item = std::result::Result<NetlinkMessage<RouteNetlinkMessage>, String>> + '_ {
    frames(buf).map(|f| decode(f?))
}

/// One message of [`frames`], decoded.
pub(crate) fn decode(
    frame: &[u8],
) -> std::result::Result<NetlinkMessage<RouteNetlinkMessage>, String> {
    NetlinkMessage::<RouteNetlinkMessage>::deserialize(frame).map_err(|e| e.to_string())
}

/// The messages of a datagram, undecoded.
pub(crate) fn frames(
    mut buf: &[u8],
) -> impl Iterator<Item = std::result::Result<&[u8], String>> + '_ {
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let len = match NetlinkBuffer::new_checked(buf) {
            Ok(b) => b.length() as usize,
            Err(e) => {
                buf = &[];
                return Some(Err(e.to_string()));
            }
        };
        let (this, rest) = buf.split_at(len.min(buf.len()));
        // Messages are 4-byte aligned within a datagram.
        buf = rest
            .get((len.next_multiple_of(4) - len).min(rest.len())..)
            .unwrap_or(&[]);
        Some(Ok(this))
    })
}

const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const IFLA_IFNAME: u16 = 3;
/// nlmsghdr, then ifinfomsg (family, pad, type, index, flags, change).
const IFINFO_END: usize = 16 + 16;

/// The link event of a message the crate could not decode, read from the
/// fixed header and the name attribute alone: kernel 6.18's RTM_DELLINK of
/// a veth is such a message, and a port must not wait for the reaper.
pub(crate) fn raw_link_event(frame: &[u8]) -> Option<LinkEvent> {
    let u16_at = |o: usize| Some(u16::from_ne_bytes(frame.get(o..o + 2)?.try_into().ok()?));
    let added = match u16_at(4)? {
        RTM_NEWLINK => true,
        RTM_DELLINK => false,
        _ => return None,
    };
    let index = i32::from_ne_bytes(frame.get(20..24)?.try_into().ok()?);
    let mut at = IFINFO_END;
    while let (Some(len), Some(kind)) = (u16_at(at), u16_at(at + 2)) {
        let len = usize::from(len);
        if len < 4 {
            return None;
        }
        if kind & 0x3fff == IFLA_IFNAME {
            let name = frame.get(at + 4..at + len)?;
            let name = name.split(|b| *b == 0).next()?;
            return Some(LinkEvent {
                added,
                name: String::from_utf8_lossy(name).into_owned(),
                index: u32::try_from(index).ok()?,
            });
        }
        at += len.next_multiple_of(4);
    }
    None
}

/// NLMSGERR_ATTR_MSG: the extended ack's message.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// A NACK as a typed error, with the kernel's extended ack message if the
/// answer carries one (after the echoed request header, NLM_F_ACK_TLVS).
fn kernel_error(op: &str, header: &NetlinkHeader, code: i32, rest: &[u8]) -> RtnlError {
    let detail = if header.flags & NLM_F_ACK_TLVS != 0 {
        ext_ack_message(header.flags & NLM_F_CAPPED != 0, rest)
    } else {
        None
    };
    RtnlError::Kernel {
        op: op.to_string(),
        errno: Errno::from_raw(-code),
        detail,
    }
}

/// The NLMSGERR_ATTR_MSG of an error message's payload after the code:
/// the echoed request (only its 16-byte header when capped), then TLVs.
fn ext_ack_message(capped: bool, rest: &[u8]) -> Option<String> {
    let echoed = if capped {
        16
    } else {
        let len = u32::from_ne_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        len.next_multiple_of(4)
    };
    NlasIterator::new(rest.get(echoed..)?)
        .filter_map(|n| n.ok())
        .find(|n| n.kind() == NLMSGERR_ATTR_MSG)
        .map(|n| {
            let v = n.value();
            let v = v.split(|c| *c == 0).next().unwrap_or_default();
            String::from_utf8_lossy(v).trim().to_string()
        })
        .filter(|s| !s.is_empty())
}

/// A link event of the watcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LinkEvent {
    /// Appeared or changed (false: gone).
    pub added: bool,
    pub name: String,
    /// The index survives a rename, so a port's interface is found by it
    /// under whatever name the event carries.
    pub index: u32,
}

/// The link event in `m`, None for other messages.
pub(crate) fn link_event(m: &RouteNetlinkMessage) -> Option<LinkEvent> {
    let (added, l) = match m {
        RouteNetlinkMessage::NewLink(l) => (true, l),
        RouteNetlinkMessage::DelLink(l) => (false, l),
        _ => return None,
    };
    l.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(LinkEvent {
            added,
            name: n.clone(),
            index: l.header.index,
        }),
        _ => None,
    })
}

/// The interface index of an IPv4 address added or removed, else None.
pub(crate) fn ipv4_address_event(m: &RouteNetlinkMessage) -> Option<u32> {
    match m {
        RouteNetlinkMessage::NewAddress(a) | RouteNetlinkMessage::DelAddress(a)
            if a.header.family == AddressFamily::Inet =>
        {
            Some(a.header.index)
        }
        _ => None,
    }
}

/// A socket subscribed to link and IPv4 address events.
pub(crate) fn event_socket() -> std::io::Result<Socket> {
    let mut s = Socket::new(NETLINK_ROUTE)?;
    s.bind(&SocketAddr::new(
        0,
        (libc::RTMGRP_LINK | libc::RTMGRP_IPV4_IFADDR) as u32,
    ))?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use netlink_packet_core::ErrorMessage;

    fn wire(msg: RouteNetlinkMessage, flags: u16) -> Vec<u8> {
        let mut nl =
            NetlinkMessage::new(NetlinkHeader::default(), NetlinkPayload::InnerMessage(msg));
        nl.header.flags = flags;
        nl.finalize();
        let mut b = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut b);
        b
    }

    fn round_trip(msg: RouteNetlinkMessage) -> RouteNetlinkMessage {
        let b = wire(msg, NLM_F_REQUEST);
        let mut all: Vec<_> = messages(&b).collect();
        assert_eq!(all.len(), 1);
        match all.remove(0).unwrap().payload {
            NetlinkPayload::InnerMessage(m) => m,
            other => panic!("{other:?}"),
        }
    }

    fn cidr(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn addresses_rules_and_routes_round_trip() {
        let a = addr_msg(7, cidr("10.0.0.1/24"));
        assert_eq!(
            round_trip(RouteNetlinkMessage::NewAddress(a.clone())),
            RouteNetlinkMessage::NewAddress(a)
        );
        let r = unreachable_default_msg(27003);
        assert_eq!(r.header.table, RouteHeader::RT_TABLE_UNSPEC);
        assert_eq!(route_table(&r), 27003);
        assert_eq!(
            round_trip(RouteNetlinkMessage::NewRoute(r.clone())),
            RouteNetlinkMessage::NewRoute(r)
        );
        let rule = Rule {
            pref: 14003,
            iif: Some("kvnet-a".into()),
            to: Some(cidr("10.1.2.1/24")),
            table: TABLE_MAIN,
        };
        let m = rule_msg(&rule);
        assert_eq!(m.header.table, 254);
        assert_eq!(m.header.dst_len, 24);
        assert!(m
            .attributes
            .contains(&RuleAttribute::Destination("10.1.2.0".parse().unwrap())));
        assert_eq!(rule_pref(&m), Some(14003));
        assert_eq!(
            round_trip(RouteNetlinkMessage::NewRule(m.clone())),
            RouteNetlinkMessage::NewRule(m)
        );
        assert_eq!(
            rule.to_string(),
            "iif kvnet-a to 10.1.2.1/24 pref 14003 lookup 254"
        );
        // A del by preference only matches any action and table.
        let d = pref_msg(27001);
        assert_eq!(d.header.action, RuleAction::Unspec);
        assert_eq!(d.header.table, 0);
    }

    #[test]
    fn links_round_trip_and_events() {
        let m = flag_msg(3, LinkFlags::Promisc, false);
        assert_eq!(m.header.change_mask, LinkFlags::Promisc);
        assert!(m.header.flags.is_empty());
        let v = veth_msg("kvnet-a", "kvgw1");
        let b = wire(RouteNetlinkMessage::NewLink(v.clone()), NLM_F_REQUEST);
        // The peer nests inside IFLA_LINKINFO/INFO_DATA/VETH_INFO_PEER.
        assert!(b.windows(5).any(|w| w == b"kvgw1"));
        assert!(b.windows(4).any(|w| w == b"veth"));
        // Two messages in one datagram, as the kernel sends events.
        let mut two = b.clone();
        two.extend(wire(RouteNetlinkMessage::DelLink(v), 0));
        let ev: Vec<_> = messages(&two)
            .map(|m| match m.unwrap().payload {
                NetlinkPayload::InnerMessage(i) => link_event(&i),
                _ => None,
            })
            .collect();
        let event = |added| LinkEvent {
            added,
            name: "kvnet-a".to_string(),
            index: 0,
        };
        assert_eq!(ev, vec![Some(event(true)), Some(event(false))]);
        // The same events read raw, as for messages the crate refuses.
        let raw: Vec<_> = frames(&two).map(|f| raw_link_event(f.unwrap())).collect();
        assert_eq!(raw, ev);
        let mut indexed = veth_msg("p3", "eth0");
        indexed.header.index = 42;
        let del = wire(RouteNetlinkMessage::DelLink(indexed), 0);
        assert_eq!(
            raw_link_event(&del),
            Some(LinkEvent {
                added: false,
                name: "p3".into(),
                index: 42
            })
        );
        assert_eq!(raw_link_event(&del[..20]), None);
        let a = RouteNetlinkMessage::DelAddress(addr_msg(9, cidr("10.0.0.1/24")));
        assert_eq!(ipv4_address_event(&round_trip(a)), Some(9));
        // Garbage is an error, not a panic.
        assert!(messages(&[1, 2, 3]).next().unwrap().is_err());
    }

    #[test]
    fn nacks_become_typed_errors() {
        // An NLMSG_ERROR with -EEXIST, capped, with an extended ack message.
        let mut payload = vec![0u8; 16];
        let msg = b"Address already assigned\0";
        let nla_len = 4 + msg.len();
        payload.extend_from_slice(&(nla_len as u16).to_ne_bytes());
        payload.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        payload.extend_from_slice(msg);
        payload.resize(payload.len().next_multiple_of(4), 0);
        let mut e = ErrorMessage::default();
        e.code = std::num::NonZeroI32::new(-libc::EEXIST);
        e.header = payload;
        let mut nl = NetlinkMessage::<RouteNetlinkMessage>::new(
            NetlinkHeader::default(),
            NetlinkPayload::Error(e),
        );
        nl.header.flags = NLM_F_ACK_TLVS | NLM_F_CAPPED;
        nl.finalize();
        let mut b = vec![0u8; nl.buffer_len()];
        nl.serialize(&mut b);
        let m = messages(&b).next().unwrap().unwrap();
        let NetlinkPayload::Error(e) = &m.payload else {
            panic!("{m:?}")
        };
        let err = kernel_error(
            "adding address 10.0.0.1/24 to kvnet-default",
            &m.header,
            e.raw_code(),
            &e.header,
        );
        assert_eq!(err.errno(), Some(Errno::EEXIST));
        assert_eq!(
            err.to_string(),
            "adding address 10.0.0.1/24 to kvnet-default: File exists (EEXIST): Address already assigned"
        );
        let plain = kernel_error("deleting rule pref 5", &NetlinkHeader::default(), -2, &[]);
        assert_eq!(
            plain.to_string(),
            "deleting rule pref 5: No such file or directory (ENOENT)"
        );
    }

    /// The real kernel, in a private network namespace: a veth pair, its
    /// address, a rule and a table, and the errors of doing them twice.
    #[test]
    fn against_the_kernel() {
        crate::genl::in_private_netns(|sh| {
            link_add_veth("kvt-a", "kvt-b").unwrap();
            let e = link_add_veth("kvt-a", "kvt-b").unwrap_err();
            assert_eq!(e.errno(), Some(Errno::EEXIST), "{e}");
            link_set_up("kvt-b").unwrap();
            link_set_up("kvt-a").unwrap();
            link_set_promisc("kvt-a", true).unwrap();
            assert!(sh("ip link show kvt-a").contains("PROMISC"));
            link_set_promisc("kvt-a", false).unwrap();
            assert!(!sh("ip link show kvt-a").contains("PROMISC"));
            let c = cidr("10.9.0.1/24");
            addr_add("kvt-a", c, false).unwrap();
            let e = addr_add("kvt-a", c, false).unwrap_err();
            assert_eq!(e.errno(), Some(Errno::EEXIST), "{e}");
            assert!(
                e.to_string()
                    .starts_with("adding address 10.9.0.1/24 to kvt-a: File exists (EEXIST)"),
                "{e}"
            );
            addr_add("kvt-a", c, true).unwrap();
            assert!(sh("ip -4 addr show kvt-a").contains("inet 10.9.0.1/24"));
            let e = addr_add("kvt-none", c, true).unwrap_err();
            assert_eq!(e.errno(), Some(Errno::ENODEV), "{e}");

            route_replace_unreachable_default(27099).unwrap();
            route_replace_unreachable_default(27099).unwrap();
            assert!(sh("ip route show table 27099").contains("unreachable default"));
            assert!(!rule_exists(14099).unwrap());
            let rule = Rule {
                pref: 14099,
                iif: Some("kvt-a".into()),
                to: Some(c),
                table: 27099,
            };
            rule_add(&rule).unwrap();
            assert!(rule_exists(14099).unwrap());
            let shown = sh("ip rule list pref 14099");
            assert!(
                shown.contains("from all to 10.9.0.0/24 iif kvt-a lookup 27099"),
                "{shown}"
            );
            let e = rule_add(&rule).unwrap_err();
            assert_eq!(e.errno(), Some(Errno::EEXIST), "{e}");
            rule_add(&Rule {
                pref: 14098,
                iif: Some("lo".into()),
                to: None,
                table: TABLE_MAIN,
            })
            .unwrap();
            assert!(sh("ip rule list pref 14098").contains("iif lo lookup main"));
            rule_del(14099).unwrap();
            rule_del(14098).unwrap();
            assert!(!rule_exists(14099).unwrap());
            assert!(rule_del(14099).is_err());
            route_flush_table(27099).unwrap();
            assert!(sh("ip route show table 27099").trim().is_empty());

            link_del("kvt-a").unwrap();
            assert!(sh("ip link show").find("kvt-b").is_none());
            let e = link_del("kvt-a").unwrap_err();
            assert_eq!(e.errno(), Some(Errno::ENODEV), "{e}");
        });
    }
}
