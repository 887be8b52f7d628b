//! NAT networks (libvirt's default): masquerade behind the uplink's
//! address, port forwards, and the conntrack table the datapath fills:
//! listing, flushing, timeouts and garbage collection live here.
use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{bail, Context, Result};
use kvnet_common::{
    CtEntry, CtKey, ForwardKey, ForwardTarget, NatMapKey, NatMapping, NetConfig, CT_F_DNAT,
    CT_F_FIN, CT_F_ORIGINAL, CT_F_RST, DEFAULT_CT_QUOTA_SHARE, DEFAULT_FORWARD_RATE, IPPROTO_TCP,
    IPPROTO_UDP, MAP_SIDE_UPLINK, NET_F_NAT, NET_F_NAT_UDP_EIM, PORT_F_UPLINK_NAT,
};

use crate::{
    control::{
        ConntrackRow, Endpoint, FlowTuple, ForwardRow, Mode, NatInfo, NatStatsRow, NetOpts,
        PortRange,
    },
    gateway::Cidr,
    netdev,
    switch::Switch,
};

pub use crate::control::DEFAULT_NAT_PORTS as DEFAULT_PORTS;

#[derive(Debug, Clone)]
pub struct NatState {
    pub ports: (u16, u16),
    pub nat_ip: Ipv4Addr,
    pub udp: crate::control::NatUdp,
    /// (proto, port on the uplink address) -> guest address and port.
    pub forwards: BTreeMap<(u8, u16), (Ipv4Addr, u16)>,
    /// NAT66 (`--nat6`): the guests' IPv6 too.
    pub nat6: Option<crate::switch::nat6::Nat6State>,
}

impl NatState {
    /// As `kvnet net list/show` report it.
    pub fn info(&self) -> NatInfo {
        NatInfo {
            ports: PortRange {
                first: self.ports.0,
                last: self.ports.1,
            },
            udp: self.udp,
            address: self.nat_ip,
        }
    }
}

/// `1024-65535`: both ends 1-65535, start <= end.
pub fn parse_port_range(s: &str) -> Result<(u16, u16)> {
    let (a, b) = s
        .split_once('-')
        .with_context(|| format!("port range '{s}': expected FIRST-LAST, like 1024-65535"))?;
    let parse = |x: &str| -> Result<u16> {
        let v: u32 = x
            .trim()
            .parse()
            .with_context(|| format!("port range '{s}': '{x}' is not a number"))?;
        if v == 0 || v > 65535 {
            bail!("port range '{s}': {v} is beyond the port numbers 1-65535");
        }
        Ok(v as u16)
    };
    let (lo, hi) = (parse(a)?, parse(b)?);
    if lo > hi {
        bail!("port range '{s}': {lo} is above {hi}");
    }
    Ok((lo, hi))
}

/// Map `forwards`' (and `forwards6`') key: a port of the uplink's address.
pub(crate) fn forward_key(ifindex: u32, proto: u8, port: u16) -> ForwardKey {
    ForwardKey {
        ifindex,
        port,
        proto,
        _pad: 0,
    }
}

pub fn parse_proto(s: &str) -> Result<u8> {
    match s {
        "tcp" => Ok(IPPROTO_TCP),
        "udp" => Ok(IPPROTO_UDP),
        _ => bail!("protocol '{s}': port forwards take tcp or udp"),
    }
}

use crate::control::proto_name;

/// The host's ephemeral port range: never handed out, so host sockets are
/// never hijacked by a guest flow's translation.
pub fn host_ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().filter_map(|x| x.parse::<u16>().ok());
            Some((it.next()?, it.next()?))
        })
        .unwrap_or((32768, 60999))
}

/// The port range after removing the host's ephemeral one: what is left
/// must still be worth having.
pub fn effective_ports(
    (lo, hi): (u16, u16),
    (elo, ehi): (u16, u16),
) -> Result<(u16, u16, u16, u16)> {
    let total = (hi - lo) as u32 + 1;
    let overlap = if ehi < lo || elo > hi {
        0
    } else {
        (ehi.min(hi) - elo.max(lo)) as u32 + 1
    };
    if total - overlap < 64 {
        bail!("NAT ports {lo}-{hi} leave fewer than 64 ports outside the host's ephemeral range {elo}-{ehi}");
    }
    Ok((lo, hi, elo, ehi))
}

/// Timeouts (seconds) close to the kernel's nf_conntrack defaults.
mod timeout {
    pub const TCP_SYN_SENT: f64 = 120.0;
    pub const TCP_ESTABLISHED: f64 = 432_000.0;
    pub const TCP_FIN_WAIT: f64 = 120.0;
    pub const TCP_CLOSE_WAIT: f64 = 60.0;
    pub const TCP_CLOSE: f64 = 10.0;
    pub const UDP_UNREPLIED: f64 = 30.0;
    pub const UDP_ASSURED: f64 = 120.0;
    pub const ICMP: f64 = 30.0;
}

/// A guest's quota is never below this many flows (small tables).
const MIN_CT_QUOTA: u32 = 64;

/// Tests shrink every timeout by this factor (KVNET_CT_TIME_SCALE).
fn time_scale() -> f64 {
    std::env::var("KVNET_CT_TIME_SCALE")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|v: &f64| *v > 0.0)
        .unwrap_or(1.0)
}

/// A conntrack entry of either table (`ct`, `ct6`): what states,
/// timeouts and listings read.
pub(crate) trait Tracked {
    fn flags(&self) -> u32;
    fn packets(&self) -> u64;
    fn bytes(&self) -> u64;
    fn last_seen_ns(&self) -> u64;
    fn created_ns(&self) -> u64;
    fn proto(&self) -> u8;
    fn dnat(&self) -> bool;
}

/// Both tables' entries have the same fields.
macro_rules! tracked {
    ($entry:ty) => {
        impl Tracked for $entry {
            fn flags(&self) -> u32 {
                self.flags
            }
            fn packets(&self) -> u64 {
                self.packets
            }
            fn bytes(&self) -> u64 {
                self.bytes
            }
            fn last_seen_ns(&self) -> u64 {
                self.last_seen_ns
            }
            fn created_ns(&self) -> u64 {
                self.created_ns
            }
            fn proto(&self) -> u8 {
                self.rewrite.proto
            }
            fn dnat(&self) -> bool {
                self.flags & CT_F_DNAT != 0
            }
        }
    };
}
tracked!(CtEntry);
tracked!(kvnet_common::Ct6Entry);

/// When a flow (its original entry and the reply's) was last seen.
fn last_seen<E: Tracked>(e: &E, reply: Option<&E>) -> u64 {
    reply.map_or(e.last_seen_ns(), |r| r.last_seen_ns().max(e.last_seen_ns()))
}

/// Whether a flow (its original entry and the reply's) has been idle past
/// its state's timeout at `now`.
pub(crate) fn idle_past_timeout<E: Tracked>(e: &E, reply: Option<&E>, now: u64) -> bool {
    let (_, limit) = state(e, reply);
    now.saturating_sub(last_seen(e, reply)) as f64 / 1e9 > limit / time_scale()
}

/// The flows of a conntrack snapshot idle past their timeout: (original
/// key, reply key), `reply_of` an entry giving its reply's key.
pub(crate) fn gc_candidates<K, E>(
    all: &std::collections::HashMap<K, E>,
    now: u64,
    reply_of: impl Fn(&E) -> K,
) -> Vec<(K, K)>
where
    K: Copy + Eq + std::hash::Hash,
    E: Tracked,
{
    all.iter()
        .filter(|(_, e)| e.flags() & CT_F_ORIGINAL != 0)
        .filter(|(_, e)| idle_past_timeout(*e, all.get(&reply_of(e)), now))
        .map(|(k, e)| (*k, reply_of(e)))
        .collect()
}

/// The IPv4 table's [`gc_candidates`].
pub(crate) fn conntrack_gc_candidates(
    all: &std::collections::HashMap<CtKey, CtEntry>,
    now: u64,
) -> Vec<(CtKey, CtKey)> {
    gc_candidates(all, now, |e| e.rewrite.reply())
}

/// One flow as `conntrack list` shows it, from its two entries.
pub(crate) fn conntrack_row<E: Tracked>(
    proto: String,
    orig: FlowTuple,
    translated: FlowTuple,
    e: &E,
    reply: Option<&E>,
    now: u64,
) -> ConntrackRow {
    ConntrackRow {
        proto,
        orig,
        translated,
        state: state(e, reply).0.into(),
        dnat: e.dnat(),
        age_secs: now.saturating_sub(e.created_ns()) as f64 / 1e9,
        idle_secs: now.saturating_sub(last_seen(e, reply)) as f64 / 1e9,
        packets: e.packets(),
        bytes: e.bytes(),
        reply_packets: reply.map_or(0, |r| r.packets()),
        reply_bytes: reply.map_or(0, |r| r.bytes()),
    }
}

/// (state name, timeout) of a flow from its two entries.
fn state<E: Tracked>(orig: &E, reply: Option<&E>) -> (&'static str, f64) {
    let rflags = reply.map_or(0, |r| r.flags());
    let replied = reply.is_some_and(|r| r.packets() > 0);
    let (oflags, flags) = (orig.flags(), orig.flags() | rflags);
    match orig.proto() {
        IPPROTO_TCP => {
            if flags & CT_F_RST != 0 {
                ("close", timeout::TCP_CLOSE)
            } else if oflags & CT_F_FIN != 0 && rflags & CT_F_FIN != 0 {
                ("time_wait", timeout::TCP_FIN_WAIT)
            } else if flags & CT_F_FIN != 0 {
                ("fin_wait", timeout::TCP_CLOSE_WAIT)
            } else if replied {
                ("established", timeout::TCP_ESTABLISHED)
            } else {
                ("syn_sent", timeout::TCP_SYN_SENT)
            }
        }
        IPPROTO_UDP if replied => ("assured", timeout::UDP_ASSURED),
        IPPROTO_UDP => ("unreplied", timeout::UDP_UNREPLIED),
        _ => ("icmp", timeout::ICMP),
    }
}

use crate::host::monotonic_ns;

/// How long a new UDP mapping is kept before its flow must be seen.
const MAPPING_GRACE_NS: u64 = 5_000_000_000;

/// One side of an endpoint-independent mapping, seen from the uplink.
pub(crate) struct MappingView {
    pub net_id: u32,
    pub uplink_addr: u32,
    pub uplink_port: u16,
    pub created_ns: u64,
}

impl MappingView {
    fn of(k: &NatMapKey, m: &NatMapping) -> MappingView {
        let (uplink_addr, uplink_port) = if k.side == MAP_SIDE_UPLINK {
            (k.addr, k.port)
        } else {
            (m.addr, m.port)
        };
        MappingView {
            net_id: m.net_id,
            uplink_addr,
            uplink_port,
            created_ns: m.created_ns,
        }
    }
}

impl Switch {
    /// Validates a NAT network's options before anything is built.
    pub(crate) fn nat_plan(
        &self,
        opts: &NetOpts,
        uplink: Option<&str>,
    ) -> Result<Option<NatState>> {
        if opts.mode != Mode::Nat {
            if opts.nat_ports.is_some() {
                bail!("--nat-ports is for --mode nat");
            }
            if opts.nat_udp.is_some() {
                bail!("--nat-udp is for --mode nat");
            }
            return Ok(None);
        }
        let ports = opts
            .nat_ports
            .as_deref()
            .map(parse_port_range)
            .transpose()?
            .unwrap_or(DEFAULT_PORTS);
        effective_ports(ports, host_ephemeral_range())?;
        let uplink =
            uplink.context("--mode nat needs --uplink IFACE (the NIC to masquerade behind)")?;
        let nat_ip = netdev::ipv4(uplink)?.with_context(|| {
            format!("uplink '{uplink}' has no IPv4 address to masquerade behind")
        })?;
        // Networks on one uplink share its address's port space, ranges
        // overlapping or not: a port is reserved by the conntrack entry of
        // its reply direction, whichever network takes it.
        Ok(Some(NatState {
            ports,
            nat_ip,
            udp: opts.nat_udp.unwrap_or_default(),
            forwards: BTreeMap::new(),
            nat6: None,
        }))
    }

    /// Turns the network's datapath entry into a NAT one and marks its
    /// uplink so replies are looked up in conntrack.
    pub(crate) fn build_nat(&mut self, name: &str, id: u32, state: NatState) -> Result<()> {
        let net = self.net(name)?;
        let gw = net
            .gateway
            .as_ref()
            .context("a NAT network has a gateway")?;
        let uplink = net.uplink.clone().context("a NAT network has an uplink")?;
        let cidr: Cidr = gw.cidr;
        let (lo, hi, elo, ehi) = effective_ports(state.ports, host_ephemeral_range())?;
        let mut cfg = self
            .dp
            .nets()?
            .get(&id, 0)
            .context("the network's datapath entry")?;
        cfg.flags |= NET_F_NAT;
        if state.udp == crate::control::NatUdp::Eim {
            cfg.flags |= NET_F_NAT_UDP_EIM;
        } else {
            cfg.flags &= !NET_F_NAT_UDP_EIM;
        }
        // No guest may hold more than its share of the table.
        cfg.ct_quota = (self.dp.ct_capacity / 2 / DEFAULT_CT_QUOTA_SHARE).max(MIN_CT_QUOTA);
        cfg.nat_ip = u32::from(state.nat_ip).to_be();
        cfg.subnet = u32::from(cidr.network()).to_be();
        cfg.mask = cidr.mask().to_be();
        (cfg.port_lo, cfg.port_hi, cfg.skip_lo, cfg.skip_hi) = (lo, hi, elo, ehi);
        self.dp.reset_nat_stats(id)?;
        self.dp
            .nat_subnets()?
            .insert(&Self::subnet_key(&cidr), id, 0)
            .context("writing the NAT subnet map")?;
        self.dp
            .nets()?
            .insert(id, cfg, 0)
            .context("writing the network map")?;
        if let Some(n) = self.nets.get_mut(name) {
            n.nat = Some(state);
        }
        self.set_uplink_nat_flag(&uplink)
    }

    /// `kvnet net set --nat-ports/--nat-udp`, and `apply` of those: changed
    /// live. Flows keep the ports they have (their conntrack entries stay);
    /// new flows take ports from the new range. Leaving endpoint-independent
    /// UDP drops the network's mappings, so no flow keeps a filtering the
    /// network no longer has.
    pub fn net_set_nat(
        &mut self,
        name: &str,
        ports: Option<&str>,
        udp: Option<crate::control::NatUdp>,
    ) -> Result<()> {
        let net = self.net(name)?;
        let id = net.id;
        let state = net
            .nat
            .as_ref()
            .with_context(|| format!("network '{name}' is not a NAT network"))?;
        let range = match ports {
            Some(r) => parse_port_range(r).with_context(|| format!("network '{name}'"))?,
            None => state.ports,
        };
        let udp = udp.unwrap_or(state.udp);
        let (lo, hi, elo, ehi) = effective_ports(range, host_ephemeral_range())
            .with_context(|| format!("network '{name}': nat ports"))?;
        let left_eim = state.udp == crate::control::NatUdp::Eim && udp != state.udp;
        let mut cfg = self
            .dp
            .nets()?
            .get(&id, 0)
            .context("the network's datapath entry")?;
        (cfg.port_lo, cfg.port_hi, cfg.skip_lo, cfg.skip_hi) = (lo, hi, elo, ehi);
        if udp == crate::control::NatUdp::Eim {
            cfg.flags |= NET_F_NAT_UDP_EIM;
        } else {
            cfg.flags &= !NET_F_NAT_UDP_EIM;
        }
        self.dp
            .nets()?
            .insert(id, cfg, 0)
            .context("writing the network map")?;
        if left_eim {
            self.nat_mappings_drop(|m| m.net_id == id)?;
        }
        let nat_ports = format!("{}-{}", range.0, range.1);
        if let Some(n) = self.nets.get_mut(name) {
            if let Some(s) = n.nat.as_mut() {
                s.ports = range;
                s.udp = udp;
            }
            n.opts.nat_ports = Some(nat_ports);
            n.opts.nat_udp = Some(udp);
        }
        Ok(())
    }

    /// PORT_F_UPLINK_NAT on a routed uplink iff one of its networks NATs.
    fn set_uplink_nat_flag(&mut self, uplink: &str) -> Result<()> {
        let Some(u) = self.routed_uplinks.get(uplink) else {
            return Ok(());
        };
        let ifindex = u.ifindex;
        let any_nat = u
            .users
            .iter()
            .any(|n| self.nets.get(n).is_some_and(|n| n.nat.is_some()));
        let mut ports = self.dp.ports()?;
        if let Ok(mut p) = ports.get(&ifindex, 0) {
            if any_nat {
                p.flags |= PORT_F_UPLINK_NAT;
            } else {
                p.flags &= !PORT_F_UPLINK_NAT;
            }
            ports.insert(ifindex, p, 0)?;
        }
        // The egress guard stops guest packets that escaped translation.
        if any_nat && !self.dp.has_egress(ifindex) {
            if !self.dp.adopting {
                crate::switch::journal::record(crate::switch::journal::Undo::Programs {
                    iface: uplink.to_string(),
                    ifindex,
                })?;
            }
            self.dp.attach_egress(uplink, ifindex)?;
        } else if !any_nat && self.dp.has_egress(ifindex) {
            self.dp.detach_egress(ifindex);
        }
        Ok(())
    }

    fn subnet_key(cidr: &Cidr) -> aya::maps::lpm_trie::Key<u32> {
        aya::maps::lpm_trie::Key::new(cidr.prefix as u32, u32::from(cidr.network()).to_be())
    }

    /// Removes a NAT network's forwards, flows and counters.
    pub(crate) fn teardown_nat(&mut self, name: &str, id: u32) {
        let uplink6 = self.nets.get(name).and_then(|n| n.uplink.clone());
        self.teardown_nat6(name, id, uplink6.as_deref());
        let Some(state) = self.nets.get_mut(name).and_then(|n| n.nat.take()) else {
            return;
        };
        let uplink = self.nets.get(name).and_then(|n| n.uplink.clone());
        if let Some(ifindex) = uplink.as_deref().and_then(|u| netdev::ifindex(u).ok()) {
            if let Ok(mut f) = self.dp.forwards() {
                for (proto, port) in state.forwards.keys() {
                    let _ = f.remove(&forward_key(ifindex, *proto, *port));
                }
            }
        }
        let _ = self.ct_flush_id(id);
        let _ = self.nat_mappings_drop(|m| m.net_id == id);
        self.dp.remove_nat_stats(id);
        if let Some(cidr) = self
            .nets
            .get(name)
            .and_then(|n| n.gateway.as_ref())
            .map(|g| g.cidr)
        {
            let _ = self
                .dp
                .nat_subnets()
                .map(|mut m| m.remove(&Self::subnet_key(&cidr)));
        }
        if let Some(u) = uplink {
            let _ = self.set_uplink_nat_flag(&u);
        }
    }

    fn nat_net(&self, net: &str) -> Result<(u32, &NatState, Cidr, String)> {
        let n = self.net(net)?;
        let s = n
            .nat
            .as_ref()
            .with_context(|| format!("network '{net}' is not a NAT network (--mode nat)"))?;
        let gw = n.gateway.as_ref().context("a NAT network has a gateway")?;
        Ok((n.id, s, gw.cidr, n.uplink.clone().unwrap_or_default()))
    }

    pub fn forward_add(&mut self, net: &str, proto: &str, port: u16, to: &str) -> Result<()> {
        let proto = parse_proto(proto)?;
        if port == 0 {
            bail!("port 0 cannot be forwarded");
        }
        let (id, state, cidr, uplink) = self.nat_net(net)?;
        // One forward a (proto, port) per network, IPv4 or IPv6.
        let taken6 = state
            .nat6
            .as_ref()
            .and_then(|s| s.forwards.get(&(proto, port)));
        if let Some((a, p)) = taken6 {
            bail!(
                "{} port {port} is already forwarded to [{a}]:{p}",
                proto_name(proto)
            );
        }
        if to.starts_with('[') {
            let to6: std::net::SocketAddrV6 = to
                .parse()
                .with_context(|| format!("forward target '{to}': expected [GUEST-IPV6]:PORT"))?;
            if let Some((a, p)) = state.forwards.get(&(proto, port)) {
                bail!(
                    "{} port {port} is already forwarded to {a}:{p}",
                    proto_name(proto)
                );
            }
            return self.forward6_add(net, proto, port, to6);
        }
        let (addr, to_port) = to
            .rsplit_once(':')
            .with_context(|| format!("forward target '{to}': expected GUEST-IP:PORT"))?;
        let addr: Ipv4Addr = addr
            .parse()
            .with_context(|| format!("forward target '{to}': '{addr}' is not an IPv4 address"))?;
        let to_port: u32 = to_port
            .parse()
            .with_context(|| format!("forward target '{to}': '{to_port}' is not a port"))?;
        if to_port == 0 || to_port > 65535 {
            bail!("forward target '{to}': port {to_port} is beyond 1-65535");
        }
        if !cidr.contains(addr)
            || addr == cidr.addr
            || addr == cidr.network()
            || addr == cidr.broadcast()
        {
            bail!(
                "forward target {addr} is not a guest address of network '{net}' ({})",
                Cidr {
                    addr: cidr.network(),
                    prefix: cidr.prefix
                }
            );
        }
        if let Some((a, p)) = state.forwards.get(&(proto, port)) {
            bail!(
                "{} port {port} is already forwarded to {a}:{p}",
                proto_name(proto)
            );
        }
        for (other, n) in &self.nets {
            if other != net
                && n.uplink.as_deref() == Some(uplink.as_str())
                && n.nat
                    .as_ref()
                    .is_some_and(|s| s.forwards.contains_key(&(proto, port)))
            {
                bail!(
                    "{} port {port} on uplink '{uplink}' is already forwarded by network '{other}'",
                    proto_name(proto)
                );
            }
        }
        let ifindex = netdev::ifindex(&uplink)?;
        let target = ForwardTarget {
            addr: u32::from(addr).to_be(),
            port: to_port as u16,
            net_id: id,
            rate: DEFAULT_FORWARD_RATE,
            tokens: DEFAULT_FORWARD_RATE,
            ..Default::default()
        };
        self.dp
            .forwards()?
            .insert(
                ForwardKey {
                    ifindex,
                    port,
                    proto,
                    _pad: 0,
                },
                target,
                0,
            )
            .context("writing the forward map")?;
        if let Some(s) = self.nets.get_mut(net).and_then(|n| n.nat.as_mut()) {
            s.forwards.insert((proto, port), (addr, to_port as u16));
        }
        Ok(())
    }

    pub fn forward_del(&mut self, net: &str, proto: &str, port: u16) -> Result<()> {
        let proto = parse_proto(proto)?;
        self.nat_net(net)?;
        if self.forward6_del(net, proto, port)? {
            return Ok(());
        }
        let (_, state, _, uplink) = self.nat_net(net)?;
        if !state.forwards.contains_key(&(proto, port)) {
            bail!(
                "no {} forward of port {port} in network '{net}'",
                proto_name(proto)
            );
        }
        let ifindex = netdev::ifindex(&uplink)?;
        let _ = self.dp.forwards()?.remove(&ForwardKey {
            ifindex,
            port,
            proto,
            _pad: 0,
        });
        if let Some(s) = self.nets.get_mut(net).and_then(|n| n.nat.as_mut()) {
            s.forwards.remove(&(proto, port));
        }
        Ok(())
    }

    pub fn forward_list(&self, net: &str) -> Result<Vec<ForwardRow>> {
        let (_, state, _, _) = self.nat_net(net)?;
        Ok(state
            .forwards
            .iter()
            .map(|((proto, port), (a, p))| ForwardRow {
                net: net.into(),
                proto: proto_name(*proto).into(),
                port: *port,
                to: Endpoint {
                    addr: (*a).into(),
                    port: *p,
                },
            })
            .chain(self.forward6_rows(net))
            .collect())
    }

    fn ct_entries(&mut self) -> Result<Vec<(CtKey, CtEntry)>> {
        Ok(self.dp.ct()?.iter().filter_map(|r| r.ok()).collect())
    }

    pub fn conntrack_list(&mut self, net: &str) -> Result<Vec<ConntrackRow>> {
        let (id, ..) = self.nat_net(net)?;
        let all: std::collections::HashMap<CtKey, CtEntry> =
            self.ct_entries()?.into_iter().collect();
        let now = monotonic_ns();
        let mut rows: Vec<ConntrackRow> = all
            .iter()
            .filter(|(_, e)| e.net_id == id && e.flags & CT_F_ORIGINAL != 0)
            .map(|(k, e)| {
                let r = &e.rewrite;
                conntrack_row(
                    proto_name(k.proto),
                    FlowTuple::from_be(k.saddr, k.sport, k.daddr, k.dport),
                    FlowTuple::from_be(r.saddr, r.sport, r.daddr, r.dport),
                    e,
                    all.get(&e.rewrite.reply()),
                    now,
                )
            })
            .collect();
        rows.extend(self.conntrack6_rows(id)?);
        Ok(rows)
    }

    fn ct_flush_id(&mut self, id: u32) -> Result<usize> {
        let doomed: Vec<CtKey> = self
            .ct_entries()?
            .into_iter()
            .filter(|(_, e)| e.net_id == id)
            .map(|(k, _)| k)
            .collect();
        let mut ct = self.dp.ct()?;
        for k in &doomed {
            let _ = ct.remove(k);
        }
        let flushed6 = self.ct6_flush_id(id)?;
        let before = self.ct_quota_counts()?;
        let left: Vec<(CtKey, CtEntry)> = self.ct_entries()?;
        self.recount_ct_quota(left.iter().map(|(k, e)| (k, e)), &before)?;
        Ok(doomed.len() + flushed6)
    }

    pub fn conntrack_flush(&mut self, net: &str) -> Result<usize> {
        let (id, ..) = self.nat_net(net)?;
        self.ct_flush_id(id)
    }

    /// The candidates still idle now, read again from the map: the walk
    /// that found them can take seconds on a large table, and a flow that
    /// came back to life meanwhile stays. Returns the keys to delete.
    pub(crate) fn conntrack_gc_still_idle(
        &mut self,
        candidates: Vec<(CtKey, CtKey)>,
    ) -> Result<Vec<CtKey>> {
        let ct = self.dp.ct()?;
        let mut doomed = Vec::new();
        for (k, rkey) in candidates {
            let Ok(e) = ct.get(&k, 0) else {
                continue;
            };
            let reply = ct.get(&rkey, 0).ok();
            if idle_past_timeout(&e, reply.as_ref(), monotonic_ns()) {
                doomed.push(k);
                doomed.push(rkey);
            }
        }
        Ok(doomed)
    }

    /// Each guest port's open flows as the datapath counts them (map
    /// `ct_quota`).
    pub(crate) fn ct_quota_counts(&mut self) -> Result<std::collections::HashMap<u32, u32>> {
        Ok(self.dp.ct_quota()?.iter().filter_map(|r| r.ok()).collect())
    }

    /// Deletes the flows of `candidates` still idle, and replies whose
    /// original is gone, from a snapshot `all` read since `walk_started`
    /// (a paced walk takes seconds: daemon/ct_gc.rs); recounts the ports'
    /// open flows and drops UDP mappings no flow uses. `quota_before` is
    /// `ct_quota` as it was when the walk started. Returns how many
    /// entries went.
    pub(crate) fn conntrack_gc_apply(
        &mut self,
        all: &std::collections::HashMap<CtKey, CtEntry>,
        candidates: Vec<(CtKey, CtKey)>,
        walk_started: u64,
        quota_before: &std::collections::HashMap<u32, u32>,
    ) -> Result<usize> {
        // NAT66's table (usually small) is read whole.
        let gone6 = self.conntrack6_gc()?;
        let mut doomed = self.conntrack_gc_still_idle(candidates)?;
        // Reply entries whose original vanished (a half-created flow). Only
        // those older than the walk: an entry made during it may have its
        // original in a part of the table already read.
        for (k, e) in all.iter().filter(|(_, e)| e.flags & CT_F_ORIGINAL == 0) {
            if !all.contains_key(&e.rewrite.reply())
                && walk_started.saturating_sub(e.created_ns) > 5_000_000_000
            {
                doomed.push(*k);
            }
        }
        let mut ct = self.dp.ct()?;
        for k in &doomed {
            let _ = ct.remove(k);
        }
        let gone: std::collections::HashSet<&CtKey> = doomed.iter().collect();
        self.recount_ct_quota(all.iter().filter(|(k, _)| !gone.contains(k)), quota_before)?;
        // A UDP mapping lives as long as a flow uses its uplink port.
        let used: std::collections::HashSet<(u32, u16)> = all
            .iter()
            .filter(|(k, _)| k.proto == IPPROTO_UDP && !gone.contains(k))
            .map(|(_, e)| (e.rewrite.saddr, e.rewrite.sport))
            .collect();
        // One made since the walk began may have its first flow in a part
        // of the table already read.
        let made_before = walk_started.saturating_sub(MAPPING_GRACE_NS);
        self.nat_mappings_drop(|m| {
            m.created_ns < made_before && !used.contains(&(m.uplink_addr, m.uplink_port))
        })?;
        Ok(doomed.len() + gone6)
    }

    /// Deletes the endpoint-independent mappings (both sides) `doomed`
    /// says so of. Returns how many mappings went.
    fn nat_mappings_drop(&mut self, doomed: impl Fn(&MappingView) -> bool) -> Result<usize> {
        let mut maps = self.dp.nat_mappings()?;
        let all: Vec<(NatMapKey, NatMapping)> = maps.iter().filter_map(|r| r.ok()).collect();
        let mut n = 0;
        for (k, m) in &all {
            let view = MappingView::of(k, m);
            if doomed(&view) {
                let _ = maps.remove(k);
                n += (k.side == MAP_SIDE_UPLINK) as usize;
            }
        }
        Ok(n)
    }

    /// Each guest port's open flows, recounted from the entries left: the
    /// datapath only counts up, so what expired comes off here. Flows the
    /// datapath counted since the walk began (`quota_before`) are added
    /// back, as some of them lie in a part of the table already read: a
    /// guest never gets more than its quota out of a slow walk.
    fn recount_ct_quota<'a>(
        &mut self,
        left: impl Iterator<Item = (&'a CtKey, &'a CtEntry)>,
        quota_before: &std::collections::HashMap<u32, u32>,
    ) -> Result<()> {
        // IPv6 flows (NAT66) count too.
        let mut open = self.ct6_open_per_port()?;
        for (_, e) in left {
            if e.flags & CT_F_ORIGINAL != 0 && e.port != 0 {
                *open.entry(e.port).or_default() += 1;
            }
        }
        let mut quota = self.dp.ct_quota()?;
        let now: Vec<(u32, u32)> = quota.iter().filter_map(|r| r.ok()).collect();
        for (port, counted) in &now {
            let since = counted.saturating_sub(quota_before.get(port).copied().unwrap_or(0));
            let n = open.remove(port).unwrap_or(0).saturating_add(since);
            if n == 0 {
                let _ = quota.remove(port);
            } else if n != *counted {
                let _ = quota.insert(port, n, 0);
            }
        }
        // Open flows of ports the datapath has no count for (a restart).
        for (port, n) in open {
            let _ = quota.insert(port, n, 0);
        }
        Ok(())
    }

    /// Follows the uplink's address (DHCP on the host): new flows use the
    /// new one at once. The netlink watcher calls it on every IPv4 address
    /// event (daemon/links.rs).
    pub fn nat_follow_uplinks(&mut self) -> Result<()> {
        let nats: Vec<(String, u32, String, Ipv4Addr)> = self
            .nets
            .iter()
            .filter_map(|(name, n)| {
                Some((
                    name.clone(),
                    n.id,
                    n.uplink.clone()?,
                    n.nat.as_ref()?.nat_ip,
                ))
            })
            .collect();
        for (name, id, uplink, old) in nats {
            let Ok(Some(ip)) = netdev::ipv4(&uplink) else {
                continue;
            };
            if ip == old {
                continue;
            }
            let mut cfg: NetConfig = self.dp.nets()?.get(&id, 0)?;
            cfg.nat_ip = u32::from(ip).to_be();
            self.dp.nets()?.insert(id, cfg, 0)?;
            if let Some(s) = self.nets.get_mut(&name).and_then(|n| n.nat.as_mut()) {
                s.nat_ip = ip;
            }
            log::info!("network {name}: uplink {uplink} address changed {old} -> {ip}");
        }
        self.nat6_follow_uplinks()
    }

    pub fn nat_stats(&mut self) -> Result<Vec<NatStatsRow>> {
        let nats: Vec<(String, u32)> = self
            .nets
            .iter()
            .filter(|(_, n)| n.nat.is_some())
            .map(|(k, n)| (k.clone(), n.id))
            .collect();
        if nats.is_empty() {
            return Ok(Vec::new());
        }
        let all = self.ct_entries()?;
        let mut mappings: std::collections::HashMap<u32, u64> = Default::default();
        for (k, m) in self.dp.nat_mappings()?.iter().filter_map(|r| r.ok()) {
            if k.side == MAP_SIDE_UPLINK {
                *mappings.entry(m.net_id).or_default() += 1;
            }
        }
        let mut rows = Vec::new();
        for (net, id) in nats {
            let s = self.dp.nat_stats(id)?;
            let mine = all.iter().filter(|(_, e)| e.net_id == id);
            let entries = mine.clone().count() as u64;
            let ports: std::collections::BTreeSet<(u8, u16)> = mine
                .filter(|(_, e)| e.flags & CT_F_ORIGINAL != 0 && e.flags & CT_F_DNAT == 0)
                .map(|(_, e)| (e.rewrite.proto, e.rewrite.sport))
                .collect();
            rows.push(NatStatsRow {
                net,
                translated: s.translated,
                new_flows: s.new_flows,
                icmp_errors: s.icmp_errors,
                fragments: s.fragments,
                frag_needed_sent: s.frag_needed_sent,
                out_of_window: s.out_of_window,
                eif_flows: s.eif_flows,
                udp_mappings: *mappings.get(&id).unwrap_or(&0),
                drops: BTreeMap::from([
                    ("table_full".to_string(), s.drop_table_full),
                    ("no_port".to_string(), s.drop_no_port),
                    ("unsupported".to_string(), s.drop_unsupported),
                    ("untranslated".to_string(), s.drop_untranslated),
                    ("forward_rate".to_string(), s.drop_forward_rate),
                    ("ct_quota".to_string(), s.drop_ct_quota),
                    ("frag_unknown".to_string(), s.drop_frag_unknown),
                    ("frag_needed_limited".to_string(), s.frag_needed_limited),
                ]),
                table_entries: entries,
                table_capacity: self.dp.ct_capacity as u64,
                ports_in_use: ports.len() as u64,
            });
        }
        Ok(rows)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges() {
        assert_eq!(parse_port_range("1024-65535").unwrap(), (1024, 65535));
        for (bad, why) in [
            ("1024-70000", "beyond"),
            ("0-10", "beyond"),
            ("2000-1000", "above"),
            ("1024", "FIRST-LAST"),
            ("a-b", "not a number"),
        ] {
            let e = parse_port_range(bad).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ephemeral_ports_are_carved_out() {
        assert_eq!(
            effective_ports((1024, 65535), (32768, 60999)).unwrap(),
            (1024, 65535, 32768, 60999)
        );
        assert!(effective_ports((40000, 40100), (32768, 60999)).is_err());
        assert!(effective_ports((1024, 2047), (32768, 60999)).is_ok());
    }

    #[test]
    fn tcp_states_follow_flags() {
        let mut o = CtEntry {
            flags: CT_F_ORIGINAL,
            ..Default::default()
        };
        o.rewrite.proto = IPPROTO_TCP;
        let mut r = CtEntry {
            packets: 1,
            ..Default::default()
        };
        assert_eq!(state(&o, None).0, "syn_sent");
        assert_eq!(state(&o, Some(&r)).0, "established");
        o.flags |= CT_F_FIN;
        assert_eq!(state(&o, Some(&r)).0, "fin_wait");
        r.flags |= CT_F_FIN;
        assert_eq!(state(&o, Some(&r)).0, "time_wait");
        r.flags |= CT_F_RST;
        assert_eq!(state(&o, Some(&r)).0, "close");
        let mut u = CtEntry::default();
        u.rewrite.proto = IPPROTO_UDP;
        assert_eq!(state(&u, None).0, "unreplied");
    }
}
