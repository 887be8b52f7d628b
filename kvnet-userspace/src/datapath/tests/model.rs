//! A reference model of the datapath's forwarding decision (issue 14,
//! point 1), in plain Rust over the same kvnet-common map types: given the
//! map contents, a frame, its ingress port and the hook, what the datapath
//! should do with it (verdict, output bytes, egress ports) and how the maps
//! change (learned and claimed MACs, snooped bindings, conntrack, counters).
//!
//! It is written from what the datapath is meant to do (the README, the
//! comments of `kvnet-common` and `kvnet-ebpf`), stage by stage as
//! `pipeline.rs` reads, but without its verifier-shaped code: no pointer
//! arithmetic, masks or scratch maps. Where the datapath is known to do
//! otherwise (a bug reported, not fixed yet), `Quirks` says what it does
//! instead; `fuzz.rs` runs the real datapath through BPF_PROG_RUN next to
//! the model and reports every difference.
//!
//! Covered: L2 on both hooks (ports, VLAN modes, priority tags, QinQ and
//! double tags, port security, learning, unicast, floods, hairpin, bridged
//! uplinks and the host's MAC, the XDP-to-tc hand-offs) and what routing
//! and NAT do in a namespace whose FIB routes nothing (every
//! `bpf_fib_lookup` fails): on a guest's side NAT's refusals and its
//! hand-over to the gateway port; on a NAT uplink replies of established
//! flows, new flows to port forwards and ICMP errors about flows, each
//! translated (bytes and checksums), tracked (TCP flags and sequence
//! window) and counted, then dropped for want of a route.
//! Not covered: successful FIB lookups (routing, NAT's sends, MACs and
//! VLAN of a routed frame), new masquerade flows (their port is random),
//! rate-limited port forwards (their tokens depend on time), GSO, tc
//! egress, and what BPF_PROG_RUN cannot show: tags tc pushes (skb
//! metadata), offloaded checksums, non-linear skbs.
use std::collections::{BTreeMap, HashMap};

use kvnet_common::*;

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_REDIRECT: u32 = 4;
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

/// In the model, `FdbEntry::last_seen_ns` is an age class, not a time: the
/// datapath only ever compares ages with its two thresholds (refresh after
/// 1 s, claimable after 30 s quiet), and the fuzzer writes and reads the
/// real times so that the class holds for a whole episode.
/// Seen long ago (more than 30 s): due for a refresh, claimable.
pub const AGE_ANCIENT: u64 = 0;
/// Seen a few seconds ago: due for a refresh, not yet claimable.
pub const AGE_RECENT: u64 = 1;
/// Written by the datapath during this episode: no refresh needed (one
/// would not change what the entry says), not claimable.
pub const AGE_FRESH: u64 = 2;

/// skb->mark of frames kvnet hands to a host stack.
const HOST_MARK: u32 = KVNET_HOST_MARK;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    Xdp,
    Tc,
}

/// The world outside the maps that a verdict depends on.
#[derive(Clone, Debug, Default)]
pub struct Env {
    /// The namespace's devices (all up, MTU large enough for any test
    /// frame) by ifindex, with their MAC: a frame to a device's own MAC is
    /// PACKET_HOST there; a clone-redirect to a device succeeds, to any
    /// other ifindex it fails.
    pub devices: BTreeMap<u32, [u8; 6]>,
}

/// The pinned maps' contents the datapath reads or writes, as the same
/// kvnet-common types. Per-CPU counters are held summed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MapState {
    pub ports: BTreeMap<u32, PortConfig>,
    /// `last_seen_ns` holds an `AGE_*` class.
    pub fdb: HashMap<FdbKey, FdbEntry>,
    pub mac_owners: HashMap<FdbKey, u32>,
    pub vlan_members: HashMap<VlanMemberKey, VlanMember>,
    pub flood: HashMap<FloodKey, FloodSet>,
    pub nets: BTreeMap<u32, NetConfig>,
    pub gw_hosts: BTreeMap<u32, u32>,
    pub fdb_count: BTreeMap<u32, u32>,
    pub stats: BTreeMap<u32, PortStats>,
    /// (prefix length, address in network order, net id): map `nat_subnets`.
    pub nat_subnets: Vec<(u32, u32, u32)>,
    /// Conntrack; `created_ns`/`last_seen_ns` are not modelled (0).
    pub ct: HashMap<CtKey, CtEntry>,
    pub forwards: HashMap<ForwardKey, ForwardTarget>,
    pub nat_stats: BTreeMap<u32, NatStats>,
    pub ct_quota: BTreeMap<u32, u32>,
    /// ARP suppression's owners (map `neigh`).
    pub neigh: HashMap<NeighKey, NeighEntry>,
    /// FCFS SAVI: (network, IPv6 address) -> owning port (map `v6_owners`;
    /// flags and times not modelled).
    pub v6_owners: HashMap<V6OwnerKey, u32>,
    pub v6_claims: BTreeMap<u32, u32>,
}

/// Datapath behaviours known to differ from the intended ones (fuzz.rs
/// `KNOWN`, each a bug reported and not fixed yet): off, the model says
/// what kvnet should do; on, what the datapath does today.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Quirks {}

/// One frame offered to one hook.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub hook: Hook,
    pub ingress: u32,
    /// skb->mark on arrival (tc only).
    pub mark: u32,
    pub frame: Vec<u8>,
}

/// What a hook returns for a frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// XDP_* or TC_ACT_*.
    pub verdict: u32,
    /// The packet bytes as the program leaves them (a tag tc pushes rides
    /// in skb metadata: it is in `tag_out`, not here).
    pub frame: Vec<u8>,
    /// skb->mark afterwards (tc; XDP: 0).
    pub mark: u32,
    /// The tag in skb metadata afterwards (tc), not observable through
    /// BPF_PROG_RUN: for the reader of a report.
    pub tag_out: Option<u16>,
    /// Where copies went (unicast, flood clones): for the reader; the
    /// fuzzer compares the tx counters, which say the same.
    pub egress: Vec<u32>,
    /// The stages the frame went through, for the reader.
    pub path: String,
    /// The switching decision in a word (`flood`, `drop:mac_spoof`, ...):
    /// what the fuzzer counts to show what it covered.
    pub decision: String,
}

// ---------------------------------------------------------------- parsing

fn be16(f: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*f.get(off)?, *f.get(off + 1)?]))
}

fn arr<const N: usize>(f: &[u8], off: usize) -> Option<[u8; N]> {
    f.get(off..off.checked_add(N)?)?.try_into().ok()
}

fn mac_at(f: &[u8], off: usize) -> Option<[u8; 6]> {
    arr::<6>(f, off)
}

/// An IPv4 address as the maps hold it (network order in a u32).
fn ip_at(f: &[u8], off: usize) -> Option<u32> {
    arr::<4>(f, off).map(u32::from_ne_bytes)
}

fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

fn is_zero(mac: &[u8; 6]) -> bool {
    *mac == [0; 6]
}

/// The TPIDs kvnet reads as a VLAN tag.
fn is_tag(ethertype: u16) -> bool {
    matches!(ethertype, ETH_P_8021Q | ETH_P_8021AD | ETH_P_QINQ_9100)
}

/// The outer tag, in the packet right after the MACs.
#[derive(Clone, Copy, Debug)]
struct Tag {
    tpid: u16,
    tci: u16,
}

fn outer_tag(f: &[u8]) -> Option<Tag> {
    let tpid = be16(f, 12)?;
    let tci = be16(f, 14)?;
    is_tag(tpid).then_some(Tag { tpid, tci })
}

/// The fixed IPv4 header, if `f[off..]` holds one (version 4, IHL >= 5).
#[derive(Clone, Copy, Debug)]
struct Ipv4 {
    hlen: usize,
    tot_len: u16,
    frag: u16,
    ttl: u8,
    proto: u8,
    saddr: u32,
    daddr: u32,
}

fn ipv4_at(f: &[u8], off: usize) -> Option<Ipv4> {
    let h = arr::<20>(f, off)?;
    if h[0] >> 4 != 4 || h[0] & 0xf < 5 {
        return None;
    }
    Some(Ipv4 {
        hlen: (h[0] & 0xf) as usize * 4,
        tot_len: u16::from_be_bytes([h[2], h[3]]),
        frag: u16::from_be_bytes([h[6], h[7]]),
        ttl: h[8],
        proto: h[9],
        saddr: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
        daddr: u32::from_ne_bytes([h[16], h[17], h[18], h[19]]),
    })
}

pub use super::frames::{fold, sum16};

// ---------------------------------------------------------------- the maps

fn stat(st: &mut MapState, ifindex: u32, f: impl FnOnce(&mut PortStats)) {
    // The daemon creates a port's counters; no entry, nothing counted.
    if let Some(s) = st.stats.get_mut(&ifindex) {
        f(s);
    }
}

fn drop_stat(st: &mut MapState, ifindex: u32, r: DropReason) {
    stat(st, ifindex, |s| s.drops[r as usize] += 1);
}

fn member(st: &MapState, ifindex: u32, vid: u16) -> Option<u32> {
    st.vlan_members
        .get(&VlanMemberKey {
            ifindex,
            vid,
            _pad: 0,
        })
        .map(|m| m.flags)
}

fn owner(st: &MapState, net_id: u32, mac: [u8; 6]) -> Option<u32> {
    st.mac_owners.get(&owner_key(net_id, mac)).copied()
}

/// Longest-prefix match in `nat_subnets`.
fn nat_subnet(st: &MapState, addr: u32) -> Option<u32> {
    let a = u32::from_be_bytes(addr.to_ne_bytes());
    st.nat_subnets
        .iter()
        .filter(|(len, net, _)| {
            let mask = if *len == 0 {
                0
            } else {
                u32::MAX << (32 - (*len).min(32))
            };
            a & mask == u32::from_be_bytes(net.to_ne_bytes()) & mask
        })
        .max_by_key(|(len, _, _)| *len)
        .map(|(_, _, id)| *id)
}

// ---------------------------------------------------------------- verdicts

/// What the switching core decides (pipeline.rs's `Verdict`).
#[derive(Clone, Debug)]
enum Verdict {
    Pass,
    Drop(DropReason),
    Unicast {
        egress: u32,
        egress_flags: u32,
        out_tci: Option<u16>,
    },
    Flood {
        net_id: u32,
        vid: u16,
        out_tci: u16,
    },
    ToHost {
        uplink: u32,
    },
    NatOut {
        net_id: u32,
    },
    NatIn,
    /// An ARP request answered from `neigh`: the owner's MAC, the asked
    /// address (network order) and where the ARP header starts.
    ArpReply {
        mac: [u8; 6],
        ip: u32,
        off: usize,
    },
}

struct Admitted {
    dst: [u8; 6],
    src: [u8; 6],
    /// The outermost ethertype (a tag's TPID when the frame is tagged).
    ethertype: u16,
    vid: u16,
    out_tci: u16,
    /// The network header past the classified tag: its type and offset.
    l3_ethertype: u16,
    l3: usize,
}

/// Runs `inp` through the model: its outcome, with `st` changed as the
/// datapath changes its maps.
pub fn run(st: &mut MapState, env: &Env, inp: &Input) -> Outcome {
    run_with(st, env, inp, &Quirks::default())
}

/// `run`, with the datapath's known quirks.
/// No quirk is modelled today (`KNOWN` is empty): every one found was
/// fixed. A new one gets a field in [`Quirks`], read where it applies.
pub fn run_with(st: &mut MapState, env: &Env, inp: &Input, _quirks: &Quirks) -> Outcome {
    match inp.hook {
        Hook::Xdp => xdp(st, env, inp),
        Hook::Tc => tc(st, env, inp),
    }
}

fn outcome(verdict: u32, frame: &[u8], path: String) -> Outcome {
    Outcome {
        verdict,
        frame: frame.to_vec(),
        mark: 0,
        tag_out: None,
        egress: Vec::new(),
        path,
        decision: String::new(),
    }
}

impl Verdict {
    fn name(&self) -> String {
        match self {
            Verdict::Pass => "pass".into(),
            Verdict::Drop(r) => format!("drop:{}", DROP_REASON_NAMES[*r as usize]),
            Verdict::Unicast { .. } => "unicast".into(),
            Verdict::Flood { .. } => "flood".into(),
            Verdict::ToHost { .. } => "to_host".into(),
            Verdict::NatOut { .. } => "nat_out".into(),
            Verdict::NatIn => "nat_in".into(),
            Verdict::ArpReply { .. } => "arp_reply".into(),
        }
    }
}

/// The frame's fate from its ingress port (pipeline.rs `decide`); `tc`:
/// routing and NAT may follow (XDP hands those on).
fn decide(
    st: &mut MapState,
    env: &Env,
    inp: &Input,
    port: &PortConfig,
    tc: bool,
    path: &mut String,
) -> Verdict {
    let f = &inp.frame;
    let tag = outer_tag(f);
    if port.flags & PORT_F_UPLINK_ROUTED != 0 {
        // A routed network's uplink: NAT replies and forwards (tc, frames
        // to this host's MAC), else routed to a guest or the host's.
        let to_us = env
            .devices
            .get(&inp.ingress)
            .is_some_and(|m| f[..6] == m[..]);
        if port.flags & PORT_F_UPLINK_NAT != 0 && tag.is_none() && tc && to_us {
            path.push_str("uplink:nat_in ");
            return Verdict::NatIn;
        }
        path.push_str("uplink:host ");
        return Verdict::Pass;
    }
    let a = match admit(st, inp, port, tag, tc, path) {
        Ok(a) => a,
        Err(r) => return Verdict::Drop(r),
    };
    learn(
        st,
        port.net_id,
        a.vid,
        a.src,
        inp.ingress,
        port.flags & PORT_F_GUARDED == 0,
    );
    forward(st, inp, port, &a, tc, path)
}

/// Headers, source MAC, VLAN, double tags, port security.
fn admit(
    st: &mut MapState,
    inp: &Input,
    port: &PortConfig,
    tag: Option<Tag>,
    tc: bool,
    path: &mut String,
) -> Result<Admitted, DropReason> {
    let f = &inp.frame;
    let (Some(dst), Some(src), Some(ethertype)) = (mac_at(f, 0), mac_at(f, 6), be16(f, 12)) else {
        return Err(DropReason::Malformed);
    };
    if is_multicast(&src) || is_zero(&src) {
        return Err(DropReason::BadSrcMac);
    }
    let vid = classify(st, inp.ingress, port, tag)?;
    path.push_str(&format!("vid:{vid} "));
    // Where the network header is, past the classified tag: a second tag
    // there is a VLAN hop.
    let (inner, l3off) = match tag {
        Some(_) => (be16(f, 16).unwrap_or(0), 18),
        None => (ethertype, 14),
    };
    if is_tag(inner) {
        return Err(DropReason::DoubleTag);
    }
    if let Some(r) = guard(st, inp, port, &src, inner, l3off, vid, tc, path) {
        return Err(r);
    }
    // A guarded guest gets no say in the priority (PCP, DEI) of the tags
    // kvnet puts on its frames; trusted or unguarded ports keep theirs.
    let keep = port.flags & PORT_F_TRUSTED != 0 || port.flags & PORT_F_GUARDED == 0;
    let prio = tag.map_or(0, |t| t.tci & !VLAN_VID_MASK);
    Ok(Admitted {
        dst,
        src,
        ethertype,
        vid,
        out_tci: if keep { prio } else { 0 } | vid,
        l3_ethertype: inner,
        l3: l3off,
    })
}

/// The VLAN a frame belongs to on ingress.
fn classify(
    st: &MapState,
    ingress: u32,
    port: &PortConfig,
    tag: Option<Tag>,
) -> Result<u16, DropReason> {
    let Some(t) = tag else {
        return untagged(port);
    };
    if t.tpid != ETH_P_8021Q {
        // 802.1ad / QinQ outer tags: no port carries them.
        return Err(DropReason::Qinq);
    }
    let vid = t.tci & VLAN_VID_MASK;
    if vid == 0 {
        // Priority-tagged: untagged as far as VLANs go.
        return untagged(port);
    }
    if port.vlan_mode != VLAN_MODE_TRUNK {
        return Err(DropReason::VlanNotAllowed);
    }
    // A trunk takes the VLANs it is a member of, its native one included.
    match member(st, ingress, vid) {
        Some(_) => Ok(vid),
        None => Err(DropReason::VlanNotAllowed),
    }
}

fn untagged(port: &PortConfig) -> Result<u16, DropReason> {
    if port.vlan_mode == VLAN_MODE_TRUNK && port.native_vid == 0 {
        return Err(DropReason::VlanUntagged);
    }
    Ok(port.pvid)
}

// ---------------------------------------------------------------- port security

/// Why a frame from `port` must not be switched (guard.rs `check`).
#[allow(clippy::too_many_arguments)]
fn guard(
    st: &mut MapState,
    inp: &Input,
    port: &PortConfig,
    src: &[u8; 6],
    ethertype: u16,
    l3: usize,
    vid: u16,
    tc: bool,
    path: &mut String,
) -> Option<DropReason> {
    let f = &inp.frame;
    if port.flags & (PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED) != 0 {
        // Trusted ports carry the real DHCP servers: learn from their replies.
        if ethertype == ETH_P_IPV4 {
            snoop_dhcp(st, port.net_id, vid, f, l3, tc);
        }
        return None;
    }
    let guarded = port.flags & PORT_F_GUARDED != 0;
    if guarded && !port.owned_macs().contains(src) {
        if let Some(r) = claim_mac(st, inp.ingress, port, vid, *src) {
            return Some(r);
        }
        path.push_str("claimed ");
    }
    let ip_guard = guarded && (port.flags & PORT_F_IP_GUARD != 0 || port.ip_count != 0);
    match ethertype {
        ETH_P_IPV4 => guard_ipv4(port, f, l3, guarded, ip_guard, src),
        ETH_P_ARP if guarded => guard_arp(st, port, f, l3, src, ip_guard),
        ETH_P_IPV6 => {
            // IPv6 sources are held to link-local only where kvnet knows
            // every address (its DHCP, `--ip`), not for snooped bindings;
            // where guests pick SLAAC addresses (`--gateway6`) each is the
            // first port's to use it.
            // (Their sources and ND targets: `savi`, before the pipeline.)
            let slaac = guarded && port.flags & PORT_F_V6_SLAAC != 0;
            let v6_guard = guarded && !slaac && port.flags & PORT_F_IP_GUARD != 0;
            guard_ipv6(f, l3, guarded, v6_guard, src)
        }
        _ => None,
    }
}

/// Makes `mac` the port's (sticky) if it may own one more, nobody owns it
/// in the network, and no other port sent from it lately (or holds it
/// statically) in any VLAN of the network: ownership is network-wide, and
/// so is the device behind another port that uses the MAC (a router on a
/// trunk has one MAC in all its VLANs).
fn claim_mac(
    st: &mut MapState,
    ingress: u32,
    port: &PortConfig,
    vid: u16,
    mac: [u8; 6],
) -> Option<DropReason> {
    let owner_now = owner(st, port.net_id, mac);
    if port.mac_count >= port.max_macs || port.mac_count as usize >= PORT_MACS {
        return match owner_now {
            Some(o) if o == ingress => None,
            Some(_) => Some(DropReason::MacSpoof),
            None => Some(DropReason::FdbLimit),
        };
    }
    // In this VLAN, or (the network-wide entry learning keeps) in any.
    let used_elsewhere = [vid, FDB_VID_ANY].iter().any(|&v| {
        st.fdb
            .get(&FdbKey {
                net_id: port.net_id,
                vid: v,
                mac,
            })
            .is_some_and(|e| {
                e.ifindex != ingress
                    && (e.flags & FDB_F_STATIC != 0 || e.last_seen_ns != AGE_ANCIENT)
            })
    });
    if used_elsewhere {
        return Some(DropReason::MacSpoof);
    }
    match owner_now {
        Some(o) if o != ingress => return Some(DropReason::MacSpoof),
        Some(_) => {}
        None => {
            st.mac_owners.insert(owner_key(port.net_id, mac), ingress);
        }
    }
    if let Some(p) = st.ports.get_mut(&ingress) {
        let i = p.mac_count as usize;
        if i < PORT_MACS {
            p.macs[i] = mac;
            p.mac_count += 1;
        }
    }
    None
}

const DHCP_SERVER_PORT: u16 = 67;
const DHCP_CLIENT_PORT: u16 = 68;
const BOOTREPLY: u8 = 2;

/// IPv4 from an untrusted port: DHCP server messages, a guarded port's
/// DHCP requests name its own MAC, and (`ip_guard`) bound sources only.
fn guard_ipv4(
    port: &PortConfig,
    f: &[u8],
    off: usize,
    guarded: bool,
    ip_guard: bool,
    src: &[u8; 6],
) -> Option<DropReason> {
    let Some(ip) = ipv4_at(f, off) else {
        // Not an IPv4 header: only the IP guard has to read it.
        return ip_guard.then_some(DropReason::Malformed);
    };
    if ip.proto == IPPROTO_UDP && ip.frag & 0x1fff == 0 {
        let l4 = off + ip.hlen;
        // An untrusted port's UDP header must be readable.
        let (Some(sport), Some(dport)) = (be16(f, l4), be16(f, l4 + 2)) else {
            return Some(DropReason::Malformed);
        };
        if f.len() < l4 + 8 {
            return Some(DropReason::Malformed);
        }
        if sport == DHCP_SERVER_PORT || dport == DHCP_CLIENT_PORT {
            return Some(DropReason::RogueDhcp);
        }
        if dport == DHCP_SERVER_PORT {
            // BOOTP: op at 0, chaddr at 28, behind the UDP header.
            let Some(op) = f.get(l4 + 8).copied() else {
                return Some(DropReason::Malformed);
            };
            let Some(chaddr) = mac_at(f, l4 + 8 + 28) else {
                return Some(DropReason::Malformed);
            };
            if op == BOOTREPLY {
                return Some(DropReason::RogueDhcp);
            }
            if guarded && chaddr != *src {
                return Some(DropReason::MacSpoof);
            }
            if ip.saddr == 0 {
                // A client without an address yet.
                return None;
            }
        }
    }
    if ip_guard && !port.bound_ips().contains(&ip.saddr) {
        return Some(DropReason::IpSpoof);
    }
    None
}

/// ARP from a guarded port: IPv4 over Ethernet, the frame's own MAC as
/// sender, a bound sender address (or a probe), never the gateway's.
fn guard_arp(
    st: &MapState,
    port: &PortConfig,
    f: &[u8],
    off: usize,
    src: &[u8; 6],
    ip_guard: bool,
) -> Option<DropReason> {
    let Some(a) = arr::<28>(f, off) else {
        return Some(DropReason::Malformed);
    };
    if a[..6] != [0, 1, 8, 0, 6, 4] {
        return Some(DropReason::ArpSpoof);
    }
    if a[8..14] != src[..] {
        return Some(DropReason::ArpSpoof);
    }
    let spa = u32::from_ne_bytes([a[14], a[15], a[16], a[17]]);
    if spa == 0 {
        // Address probe (RFC 5227).
        return None;
    }
    if ip_guard && !port.bound_ips().contains(&spa) {
        return Some(DropReason::ArpSpoof);
    }
    if st
        .nets
        .get(&port.net_id)
        .is_some_and(|n| n.gw_ip != 0 && n.gw_ip == spa)
    {
        return Some(DropReason::ArpSpoof);
    }
    None
}

const ND_ROUTER_ADVERT: u8 = 134;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
const ND_REDIRECT: u8 = 137;
const ND_OPT_SOURCE_LL: u8 = 1;
const ND_OPT_TARGET_LL: u8 = 2;

fn is_ext_header(nh: u8) -> bool {
    matches!(nh, 0 | 43 | 44 | 60)
}

fn link_local(a: &[u8]) -> bool {
    a[0] == 0xfe && a[1] & 0xc0 == 0x80
}

/// IPv6 from an untrusted port: router advertisements, redirects and
/// DHCPv6 server messages (behind up to three extension headers), and from
/// a guarded port ND naming its own MAC; `ip_guard`: link-local sources
/// and advertised targets only.
fn guard_ipv6(
    f: &[u8],
    off: usize,
    guarded: bool,
    ip_guard: bool,
    src: &[u8; 6],
) -> Option<DropReason> {
    let Some(h) = arr::<40>(f, off) else {
        return Some(DropReason::Malformed);
    };
    let unspecified = h[8..24].iter().all(|b| *b == 0);
    if ip_guard && !unspecified && !link_local(&h[8..]) {
        return Some(DropReason::IpSpoof);
    }
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..3 {
        if !is_ext_header(next) {
            break;
        }
        let Some(e) = arr::<4>(f, l4) else {
            return Some(DropReason::Malformed);
        };
        if next == 44 {
            if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                // Not the first fragment: no upper-layer header here.
                return None;
            }
            l4 += 8;
        } else {
            l4 += (e[1] as usize + 1) * 8;
        }
        next = e[0];
    }
    match next {
        IPPROTO_ICMPV6 => {
            let Some(t) = arr::<4>(f, l4).map(|t| t[0]) else {
                return Some(DropReason::Malformed);
            };
            if t == ND_ROUTER_ADVERT || t == ND_REDIRECT {
                return Some(DropReason::RogueRa);
            }
            if !guarded || (t != ND_NEIGHBOR_SOLICIT && t != ND_NEIGHBOR_ADVERT) {
                return None;
            }
            let Some(nd) = arr::<24>(f, l4) else {
                return Some(DropReason::Malformed);
            };
            if t == ND_NEIGHBOR_ADVERT && ip_guard && !link_local(&nd[8..]) {
                return Some(DropReason::ArpSpoof);
            }
            let end = off + 40 + u16::from_be_bytes([h[4], h[5]]) as usize;
            nd_options(f, l4 + 24, end, src)
        }
        IPPROTO_UDP => {
            let (Some(sport), Some(dport)) = (be16(f, l4), be16(f, l4 + 2)) else {
                return Some(DropReason::Malformed);
            };
            (sport == 547 || dport == 546).then_some(DropReason::RogueDhcp)
        }
        // Extension headers deeper than the guard looks: refused.
        n if is_ext_header(n) => Some(DropReason::RogueRa),
        _ => None,
    }
}

/// The IPv6 source guard (savi.rs), run in tc before the pipeline for
/// IPv6 (untagged or behind one 802.1Q tag) from a guarded port of a
/// SLAAC network: sources the port owns or may claim, and NAs and DAD
/// probes for targets likewise. What it cannot read is the guard's.
fn savi(st: &mut MapState, ingress: u32, port: &PortConfig, f: &[u8]) -> Option<DropReason> {
    let watched = PORT_F_GUARDED | PORT_F_V6_SLAAC;
    let exempt = PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED;
    if port.flags & (watched | exempt) != watched {
        return None;
    }
    let t = arr::<6>(f, 12)?;
    let off = match (
        u16::from_be_bytes([t[0], t[1]]),
        u16::from_be_bytes([t[4], t[5]]),
    ) {
        (ETH_P_IPV6, _) => 14,
        (ETH_P_8021Q, ETH_P_IPV6) => 18,
        _ => return None,
    };
    let net_id = port.net_id;
    let mac: [u8; 6] = f.get(6..12)?.try_into().ok()?;
    // Only a MAC the port owns claims.
    let claims = port.owned_macs().contains(&mac);
    let h = arr::<40>(f, off)?;
    let unspecified = h[8..24].iter().all(|b| *b == 0);
    if !eui64_of(st, ingress, net_id, &h[16..24], &mac)
        || (!unspecified && (h[8] == 0xff || !v6_bind(st, ingress, net_id, &h[8..24], claims)))
    {
        return Some(DropReason::IpSpoof);
    }
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..3 {
        if !is_ext_header(next) {
            break;
        }
        let e = arr::<4>(f, l4)?;
        if next == 44 {
            if u16::from_be_bytes([e[2], e[3]]) & 0xfff8 != 0 {
                return None;
            }
            l4 += 8;
        } else {
            l4 += (e[1] as usize + 1) * 8;
        }
        next = e[0];
    }
    if next != IPPROTO_ICMPV6 {
        return None;
    }
    let nd = arr::<24>(f, l4)?;
    let probe = nd[0] == ND_NEIGHBOR_SOLICIT && unspecified;
    if nd[0] == ND_NEIGHBOR_ADVERT || probe {
        let target = &nd[8..24];
        if !eui64_of(st, ingress, net_id, &target[8..], &mac)
            || target.iter().all(|b| *b == 0)
            || target[0] == 0xff
            || !v6_bind(st, ingress, net_id, target, claims)
        {
            return Some(DropReason::ArpSpoof);
        }
    }
    None
}

/// An interface identifier with ff:fe in its middle is the modified
/// EUI-64 of `mac`, of an unowned MAC or of one `ingress` owns; another
/// port's MAC's is nobody else's to use.
fn eui64_of(st: &MapState, ingress: u32, net_id: u32, iid: &[u8], mac: &[u8; 6]) -> bool {
    if iid[3] != 0xff || iid[4] != 0xfe {
        return true;
    }
    let formed_from = [iid[0] ^ 2, iid[1], iid[2], iid[5], iid[6], iid[7]];
    formed_from == *mac
        || st
            .mac_owners
            .get(&owner_key(net_id, formed_from))
            .is_none_or(|o| *o == ingress)
}

/// FCFS SAVI (savi.rs `bind`): whether `addr` is, or now becomes,
/// `ingress`'s in `net_id` (up to `V6_CLAIMS_PER_PORT` claims).
fn v6_bind(st: &mut MapState, ingress: u32, net_id: u32, addr: &[u8], claim: bool) -> bool {
    let key = V6OwnerKey {
        net_id,
        addr: addr.try_into().expect("16 bytes"),
    };
    if let Some(o) = st.v6_owners.get(&key) {
        return *o == ingress;
    }
    if !claim {
        return true;
    }
    let used = st.v6_claims.get(&ingress).copied().unwrap_or(0);
    if used >= V6_CLAIMS_PER_PORT {
        return false;
    }
    st.v6_owners.insert(key, ingress);
    st.v6_claims.insert(ingress, used + 1);
    true
}

/// ND options from `o` to `end` (where the IPv6 payload length says the
/// message ends): every link-layer address option names the frame's own
/// MAC (a guest must not poison a neighbour cache, wherever in the list it
/// puts the option). A message ending past the first 256 bytes of the
/// frame, an option of length 0, or a frame shorter than the message are
/// malformed; a tail shorter than an option ends the list.
fn nd_options(f: &[u8], mut o: usize, end: usize, src: &[u8; 6]) -> Option<DropReason> {
    if end > 256 {
        return Some(DropReason::Malformed);
    }
    while o + 8 <= end {
        let Some(opt) = arr::<8>(f, o) else {
            return Some(DropReason::Malformed);
        };
        if opt[1] == 0 {
            return Some(DropReason::Malformed);
        }
        let ll = opt[0] == ND_OPT_SOURCE_LL || opt[0] == ND_OPT_TARGET_LL;
        if ll && opt[2..8] != src[..] {
            return Some(DropReason::ArpSpoof);
        }
        o += opt[1] as usize * 8;
    }
    None
}

/// DHCP snooping on a trusted port: a server's reply binds the address it
/// hands out to the guarded port that owns the client's MAC.
fn snoop_dhcp(st: &mut MapState, net_id: u32, vid: u16, f: &[u8], l3: usize, tc: bool) {
    let Some(ip) = ipv4_at(f, l3) else { return };
    if ip.hlen != 20 || ip.proto != IPPROTO_UDP {
        return;
    }
    let u = l3 + 20;
    // UDP (8) then BOOTP up to chaddr (34).
    if f.len() < u + 42 {
        return;
    }
    let (sport, dport) = (be16(f, u), be16(f, u + 2));
    if sport != Some(DHCP_SERVER_PORT) || dport != Some(DHCP_CLIENT_PORT) || f[u + 8] != BOOTREPLY {
        return;
    }
    let Some(yiaddr) = ip_at(f, u + 8 + 16) else {
        return;
    };
    if yiaddr == 0 {
        return;
    }
    let Some(chaddr) = mac_at(f, u + 8 + 28) else {
        return;
    };
    let Some(o) = owner(st, net_id, chaddr) else {
        return;
    };
    // ARP suppression answers for the address from now on (tc only).
    if tc {
        st.neigh.insert(
            NeighKey {
                net_id,
                vid,
                _pad: 0,
                ip: yiaddr,
            },
            NeighEntry {
                mac: chaddr,
                _pad: 0,
                ifindex: o,
            },
        );
    }
    let Some(p) = st.ports.get_mut(&o) else {
        return;
    };
    if p.flags & PORT_F_GUARDED == 0 || p.bound_ips().contains(&yiaddr) {
        return;
    }
    // Round-robin over the slots the daemon's own bindings leave.
    let fixed = p.ip_fixed as usize;
    if fixed >= PORT_IPS {
        return;
    }
    let mut i = p.ip_next as usize;
    if i < fixed || i >= PORT_IPS {
        i = fixed;
    }
    p.ips[i] = yiaddr;
    p.ip_next = (i + 1) as u8;
    if (p.ip_count as usize) < PORT_IPS {
        p.ip_count += 1;
    }
}

// ---------------------------------------------------------------- learning

/// Learns `mac` on `ingress` (fdb.rs): static entries stay, a MAC a guest
/// owns never moves to another port, a new entry counts against the
/// network's bound for ports without port security (`bounded`).
fn learn(st: &mut MapState, net_id: u32, vid: u16, mac: [u8; 6], ingress: u32, bounded: bool) {
    let key = FdbKey { net_id, vid, mac };
    let found = st.fdb.get(&key).copied();
    match found {
        Some(e) if e.flags & FDB_F_STATIC != 0 => return,
        Some(e) if e.ifindex == ingress && e.last_seen_ns == AGE_FRESH => return,
        // Same port, due for a refresh: rewritten below.
        Some(e) if e.ifindex == ingress => {}
        _ => {
            if owner(st, net_id, mac).is_some_and(|o| o != ingress) {
                return;
            }
            if found.is_none() {
                let held = st.fdb_count.get(&net_id).copied().unwrap_or(0);
                if bounded && held >= MAX_LEARNED_PER_NET {
                    stat(st, ingress, |s| s.learn_refused += 1);
                    return;
                }
                st.fdb_count.insert(net_id, held + 1);
                stat(st, ingress, |s| s.learned += 1);
            }
        }
    }
    let entry = FdbEntry {
        ifindex: ingress,
        flags: 0,
        last_seen_ns: AGE_FRESH,
    };
    st.fdb.insert(key, entry);
    // The network-wide entry beside it (the MAC guard's "busy anywhere").
    st.fdb.insert(
        FdbKey {
            vid: FDB_VID_ANY,
            ..key
        },
        entry,
    );
}

// ---------------------------------------------------------------- forwarding

/// ARP suppression (neigh.rs `answer`): an Ethernet/IPv4 request, not
/// gratuitous, for an address with an owner in the same network and VLAN
/// that is neither the asking port nor the asking MAC (nor, for an isolated
/// asker, an isolated port).
fn arp_answer(st: &MapState, inp: &Input, port: &PortConfig, a: &Admitted) -> Option<Verdict> {
    let arp = inp.frame.get(a.l3..a.l3 + 28)?;
    if arp[..8] != [0, 1, 8, 0, 6, 4, 0, 1] || arp[14..18] == arp[24..28] {
        return None;
    }
    let ip = u32::from_ne_bytes(arp[24..28].try_into().ok()?);
    let e = st.neigh.get(&NeighKey {
        net_id: port.net_id,
        vid: a.vid,
        _pad: 0,
        ip,
    })?;
    if e.ifindex == inp.ingress || e.mac[..] == arp[8..14] {
        return None;
    }
    if port.flags & PORT_F_ISOLATED != 0
        && st
            .ports
            .get(&e.ifindex)
            .is_some_and(|p| p.flags & PORT_F_ISOLATED != 0)
    {
        return None;
    }
    Some(Verdict::ArpReply {
        mac: e.mac,
        ip,
        off: a.l3,
    })
}

/// Where an admitted frame goes (pipeline.rs `forward`).
fn forward(
    st: &mut MapState,
    inp: &Input,
    port: &PortConfig,
    a: &Admitted,
    tc: bool,
    path: &mut String,
) -> Verdict {
    let net_id = port.net_id;
    let flood = Verdict::Flood {
        net_id,
        vid: a.vid,
        out_tci: a.out_tci,
    };
    if is_multicast(&a.dst) {
        if tc && a.l3_ethertype == ETH_P_ARP {
            if let Some(v) = arp_answer(st, inp, port, a) {
                path.push_str("arp-answered ");
                return v;
            }
        }
        return flood;
    }
    // IPv4 to a routed network's gateway MAC (its VLAN, untagged in the
    // packet): NAT networks translate; routing needs the FIB, which routes
    // nothing here, so the frame is switched to the gateway as it is.
    if tc && port.flags & PORT_F_ROUTED_NET != 0 && a.ethertype == ETH_P_IPV4 {
        if let Some(n) = st.nets.get(&net_id) {
            if n.gw_vid == a.vid && a.dst == n.gw_mac && n.flags & NET_F_NAT != 0 {
                path.push_str("nat_out ");
                return Verdict::NatOut { net_id };
            }
        }
    }
    let Some(e) = st
        .fdb
        .get(&FdbKey {
            net_id,
            vid: a.vid,
            mac: a.dst,
        })
        .copied()
    else {
        return flood;
    };
    if e.flags & FDB_F_HOST != 0 {
        // The host's own MAC on a bridged uplink.
        return if e.ifindex == inp.ingress {
            Verdict::Pass
        } else {
            Verdict::ToHost { uplink: e.ifindex }
        };
    }
    to_port(st, inp.ingress, port, e.ifindex, a, tc)
}

/// The FDB's port, if the frame may go there: not back where it came from
/// (unless hairpin), never into another network or VLAN.
fn to_port(
    st: &MapState,
    ingress: u32,
    port: &PortConfig,
    egress: u32,
    a: &Admitted,
    tc: bool,
) -> Verdict {
    if egress == ingress && port.flags & PORT_F_HAIRPIN == 0 {
        return Verdict::Drop(DropReason::Hairpin);
    }
    let Some(p) = st.ports.get(&egress) else {
        // No port: possibly the VXLAN VTEP, which only tc sends to (the
        // model has no VXLAN networks, so tc finds a stale port).
        return if tc {
            Verdict::Drop(DropReason::StalePort)
        } else {
            Verdict::Pass
        };
    };
    if p.net_id != port.net_id {
        return Verdict::Drop(DropReason::StalePort);
    }
    let unicast = |out_tci| Verdict::Unicast {
        egress,
        egress_flags: p.flags,
        out_tci,
    };
    if p.vlan_mode == VLAN_MODE_NONE {
        // Untagged members of VLAN 0 only.
        return if a.vid == 0 {
            unicast(None)
        } else {
            Verdict::Drop(DropReason::StalePort)
        };
    }
    match member(st, egress, a.vid) {
        Some(m) if m & VLAN_M_TAGGED != 0 => unicast(Some(a.out_tci)),
        Some(_) => unicast(None),
        None => Verdict::Drop(DropReason::StalePort),
    }
}

// ---------------------------------------------------------------- XDP

fn xdp(st: &mut MapState, env: &Env, inp: &Input) -> Outcome {
    let f = &inp.frame;
    let mut path = String::from("xdp ");
    let Some(port) = st.ports.get(&inp.ingress).copied() else {
        path.push_str("not-a-port");
        let mut o = outcome(XDP_PASS, f, path);
        o.decision = "not-a-port".into();
        return o;
    };
    stat(st, inp.ingress, |s| s.xdp_seen += 1);
    let tag = outer_tag(f);
    // A NIC may have stripped a tag XDP cannot see: tc tells, on a trunk
    // and on a device the daemon found stripping.
    if tag.is_none()
        && (port.vlan_mode == VLAN_MODE_TRUNK || port.flags & PORT_F_RX_VLAN_STRIPPED != 0)
    {
        path.push_str("untagged-maybe-stripped:to-tc");
        let mut o = outcome(XDP_PASS, f, path);
        o.decision = "untagged-maybe-stripped".into();
        return o;
    }
    let v = decide(st, env, inp, &port, false, &mut path);
    path.push_str(&format!("{v:?}"));
    let name = v.name();
    let mut o = xdp_act(st, inp, v, tag, path);
    o.decision = name;
    o
}

fn xdp_act(st: &mut MapState, inp: &Input, v: Verdict, tag: Option<Tag>, path: String) -> Outcome {
    let f = &inp.frame;
    let len = f.len() as u64;
    match v {
        Verdict::Drop(r) => {
            stat(st, inp.ingress, |s| s.rx_packets += 1);
            stat(st, inp.ingress, |s| s.rx_bytes += len);
            drop_stat(st, inp.ingress, r);
            outcome(XDP_DROP, f, path)
        }
        Verdict::Unicast {
            egress,
            egress_flags,
            out_tci,
        } => {
            // Only to ports that take XDP redirects, only frames whose L4
            // checksum XDP can vouch for, only if the tag can be changed
            // here: the rest is tc's.
            if egress_flags & PORT_F_XDP_TX == 0 || !l4_checksum_complete(f) {
                return outcome(XDP_PASS, f, path);
            }
            let Some(out) = xdp_retag(f, tag, out_tci) else {
                return outcome(XDP_PASS, f, path);
            };
            let n = out.len() as u64;
            // Received: the frame as it came.
            let rx = len;
            stat(st, inp.ingress, |s| {
                s.rx_packets += 1;
                s.rx_bytes += rx;
            });
            stat(st, egress, |s| {
                s.tx_packets += 1;
                s.tx_bytes += n;
            });
            let mut o = outcome(XDP_REDIRECT, &out, path);
            o.egress.push(egress);
            o
        }
        _ => outcome(XDP_PASS, f, path),
    }
}

/// The frame carrying `want` (a TCI) or no tag, or None if XDP cannot
/// make it so (no room to drop a tag from a runt).
fn xdp_retag(f: &[u8], tag: Option<Tag>, want: Option<u16>) -> Option<Vec<u8>> {
    let mut out = f.to_vec();
    match (tag, want) {
        (None, None) => {}
        (Some(_), Some(tci)) => out[14..16].copy_from_slice(&tci.to_be_bytes()),
        (Some(_), None) => {
            // bpf_xdp_adjust_head leaves at least an Ethernet header.
            if f.len() < 18 {
                return None;
            }
            out.drain(12..16);
        }
        (None, Some(tci)) => {
            let mut t = ETH_P_8021Q.to_be_bytes().to_vec();
            t.extend_from_slice(&tci.to_be_bytes());
            out.splice(12..12, t);
        }
    }
    Some(out)
}

/// Whether XDP may redirect the frame itself: a TCP/UDP checksum it can
/// check and that verifies (a checksum-offloaded frame holds only the
/// pseudo-header sum, and only tc's skb knows), or no L4 checksum at all.
/// IPv6 TCP/UDP, IPv4 with options, fragments and segments longer than a
/// 1500-byte MTU are left to tc.
pub fn l4_checksum_complete(f: &[u8]) -> bool {
    let len = f.len();
    // A frame too short for a tagged IPv4 header but long enough for an
    // untagged one is left to tc; shorter ones carry no L4 header.
    if len < 14 + 4 + 20 {
        return len < 14 + 20;
    }
    let (mut ethertype, mut l3) = (be16(f, 12).unwrap_or(0), 14);
    if ethertype == ETH_P_8021Q {
        ethertype = be16(f, 16).unwrap_or(0);
        l3 = 18;
    }
    if ethertype == ETH_P_IPV6 {
        return false;
    }
    if ethertype != ETH_P_IPV4 || len < l3 + 20 {
        return true;
    }
    // Not a readable IPv4 header: nothing XDP can vouch for.
    let Some(ip) = ipv4_at(f, l3) else {
        return false;
    };
    let proto = ip.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return true;
    }
    if ip.hlen != 20 || ip.frag & 0x3fff != 0 {
        return false;
    }
    let total = ip.tot_len as usize;
    if total < 20 || total - 20 > 1480 {
        return false;
    }
    let l4 = l3 + 20;
    let l4_len = total - 20;
    if proto == IPPROTO_UDP && len >= l4 + 8 && f[l4 + 6..l4 + 8] == [0, 0] {
        // UDP checksum 0: none.
        return true;
    }
    if len < l4 + l4_len {
        return false;
    }
    let mut pseudo = f[l3 + 12..l3 + 20].to_vec();
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4_len as u16).to_be_bytes());
    fold(sum16(&f[l4..l4 + l4_len], sum16(&pseudo, 0))) == 0xffff
}

// ---------------------------------------------------------------- tc

/// The skb as tc changes it: the bytes and the tag in metadata.
struct Skb {
    bytes: Vec<u8>,
    hw: Option<u16>,
    mark: u32,
}

impl Skb {
    /// Makes the skb carry `want` or no tag; `cur` is what it carries now.
    /// False if the tag could not be removed (a runt too short for it).
    fn retag(&mut self, cur: &mut Option<u16>, want: Option<u16>) -> bool {
        if *cur == want {
            return true;
        }
        if cur.is_some() {
            if self.hw.is_some() {
                self.hw = None;
            } else {
                if self.bytes.len() < 18 {
                    return false;
                }
                self.bytes.drain(12..16);
            }
            *cur = None;
        }
        if let Some(tci) = want {
            // Pushed into skb metadata: the packet bytes do not change.
            self.hw = Some(tci);
            *cur = Some(tci);
        }
        true
    }
}

fn tc(st: &mut MapState, env: &Env, inp: &Input) -> Outcome {
    let f = &inp.frame;
    let len = f.len() as u64;
    let mut path = String::from("tc ");
    let Some(port) = st.ports.get(&inp.ingress).copied() else {
        path.push_str("not-a-port");
        let mut o = outcome(TC_ACT_OK, f, path);
        o.mark = inp.mark;
        o.decision = "not-a-port".into();
        return o;
    };
    if inp.mark == HOST_MARK {
        // Handed to this uplink's host stack by kvnet itself.
        path.push_str("host-mark");
        let mut o = outcome(TC_ACT_OK, f, path);
        o.decision = "host-mark".into();
        return o;
    }
    if let Some(r) = savi(st, inp.ingress, &port, f) {
        path.push_str(&format!("savi {r:?}"));
        stat(st, inp.ingress, |s| {
            s.rx_packets += 1;
            s.rx_bytes += len;
        });
        drop_stat(st, inp.ingress, r);
        let mut o = outcome(TC_ACT_SHOT, f, path);
        o.mark = inp.mark;
        o.decision = "savi".into();
        return o;
    }
    let v = decide(st, env, inp, &port, true, &mut path);
    path.push_str(&format!("{v:?}"));
    let name = v.name();
    stat(st, inp.ingress, |s| {
        s.tc_seen += 1;
        if !matches!(v, Verdict::Pass) {
            s.rx_packets += 1;
            s.rx_bytes += len;
        }
    });
    let mut skb = Skb {
        bytes: f.clone(),
        hw: None,
        mark: inp.mark,
    };
    let mut cur = outer_tag(f).map(|t| t.tci);
    let mut egress = Vec::new();
    let verdict = match v {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(r) => {
            drop_stat(st, inp.ingress, r);
            TC_ACT_SHOT
        }
        Verdict::Unicast {
            egress: e, out_tci, ..
        } => {
            if skb.retag(&mut cur, out_tci) {
                stat(st, e, |s| {
                    s.tx_packets += 1;
                    s.tx_bytes += len;
                });
                egress.push(e);
                TC_ACT_REDIRECT
            } else {
                drop_stat(st, inp.ingress, DropReason::RedirectFailed);
                TC_ACT_SHOT
            }
        }
        Verdict::ToHost { uplink } => {
            stat(st, inp.ingress, |s| s.to_host += 1);
            skb.mark = HOST_MARK;
            egress.push(uplink);
            TC_ACT_REDIRECT
        }
        Verdict::Flood {
            net_id,
            vid,
            out_tci,
        } => {
            stat(st, inp.ingress, |s| s.flooded += 1);
            // From the LAN: the host's stack gets a clone as it came (not
            // a flood member: no tx counted), taken before the flood.
            flood(
                st,
                env,
                inp.ingress,
                &port,
                &mut skb,
                &mut cur,
                net_id,
                vid,
                out_tci,
                len,
                &mut egress,
            )
        }
        Verdict::NatOut { net_id } => {
            nat_out(st, inp, net_id, len, &mut skb, &mut egress, &mut path)
        }
        Verdict::NatIn => nat_in(st, inp, &mut skb, &mut path),
        Verdict::ArpReply { mac, ip, off } => {
            // The request becomes the reply in place, back out of the
            // ingress (the frame's VLAN, if any, in metadata goes with it).
            let b = &mut skb.bytes;
            let asker_mac: [u8; 6] = b[off + 8..off + 14].try_into().unwrap();
            let asker_ip: [u8; 4] = b[off + 14..off + 18].try_into().unwrap();
            b[..6].copy_from_slice(&asker_mac);
            b[6..12].copy_from_slice(&mac);
            b[off + 7] = 2;
            b[off + 8..off + 14].copy_from_slice(&mac);
            b[off + 14..off + 18].copy_from_slice(&ip.to_ne_bytes());
            b[off + 18..off + 24].copy_from_slice(&asker_mac);
            b[off + 24..off + 28].copy_from_slice(&asker_ip);
            stat(st, inp.ingress, |s| {
                s.arp_answered += 1;
                s.tx_packets += 1;
                s.tx_bytes += len;
            });
            egress.push(inp.ingress);
            TC_ACT_REDIRECT
        }
    };
    Outcome {
        verdict,
        frame: skb.bytes,
        mark: skb.mark,
        tag_out: skb.hw,
        decision: if name.starts_with("nat") {
            // NAT's own ending: the last stage noted.
            format!("{name}:{}", path.rsplit(' ').next().unwrap_or(""))
        } else {
            name
        },
        egress,
        path,
    }
}

/// A copy to every member of the flood domain but the ingress (unless
/// hairpin): untagged members first, then the `tagged` last ones with the
/// tag, or the other way round when the frame arrived tagged, so the tag
/// changes at most once. The original goes nowhere.
#[allow(clippy::too_many_arguments)]
fn flood(
    st: &mut MapState,
    env: &Env,
    ingress: u32,
    port: &PortConfig,
    skb: &mut Skb,
    cur: &mut Option<u16>,
    net_id: u32,
    vid: u16,
    out_tci: u16,
    len: u64,
    egress: &mut Vec<u32>,
) -> u32 {
    if port.flags & PORT_F_BRIDGED_NET != 0 && vid == 0 && cur.is_none() {
        // A bridged network's broadcast also goes up the uplink's stack
        // (a clone through its ingress: counted nowhere).
        if let Some(n) = st.nets.get(&net_id) {
            egress.push(n.uplink);
        }
    }
    let key = FloodKey {
        net_id,
        vid,
        _pad: 0,
    };
    let Some(set) = st.flood.get(&key).copied() else {
        return TC_ACT_SHOT;
    };
    let count = (set.count as usize).min(MAX_FLOOD_PORTS);
    let split = count - (set.tagged as usize).min(count);
    let untagged: Vec<u32> = set.members[..split].to_vec();
    let tagged: Vec<u32> = set.members[split..count].to_vec();
    let tagged_first = cur.is_some();
    let groups = if tagged_first {
        [(tagged, Some(out_tci)), (untagged, None)]
    } else {
        [(untagged, None), (tagged, Some(out_tci))]
    };
    for (members, want) in groups {
        if members.is_empty() {
            continue;
        }
        if !skb.retag(cur, want) {
            return TC_ACT_SHOT;
        }
        for e in members {
            if e == ingress && port.flags & PORT_F_HAIRPIN == 0 {
                continue;
            }
            if env.devices.contains_key(&e) {
                stat(st, e, |s| {
                    s.tx_packets += 1;
                    s.tx_bytes += len;
                });
                egress.push(e);
            }
        }
    }
    TC_ACT_SHOT
}

// ---------------------------------------------------------------- NAT (no FIB)

/// What a NAT stage did (nat.rs `Nat`), without the FIB's successes.
enum Nat {
    Skip,
    ToHost,
    Refused(DropReason),
    /// A later fragment with no translated first fragment (none is, here).
    FragUnknown,
}

/// IPv4 TCP/UDP/ICMP at offset 14 (a whole packet or a first fragment): the tuple as
/// conntrack keys it, the L4 offset, TTL, total length, ICMP type; TCP's
/// flags, sequence number and the one after the segment.
struct Pkt {
    key: CtKey,
    l4: usize,
    ttl: u8,
    tot_len: u16,
    icmp_type: u8,
    tcp_flags: u8,
    seq: u32,
    seq_next: u32,
}

fn packet(f: &[u8]) -> Option<Pkt> {
    let ip = ipv4_at(f, 14)?;
    if ip.frag & 0x1fff != 0 {
        return None;
    }
    let l4 = 14 + ip.hlen;
    let mut key = CtKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto: ip.proto,
        ..Default::default()
    };
    let (mut icmp_type, mut tcp_flags, mut seq, mut seq_next) = (0, 0, 0, 0);
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            key.sport = be16(f, l4)?;
            key.dport = be16(f, l4 + 2)?;
            if ip.proto == IPPROTO_TCP {
                // Sequence number, data offset and flags: all of them.
                let h = arr::<10>(f, l4 + 4)?;
                tcp_flags = h[9];
                seq = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let headers = (ip.hlen + (h[8] >> 4) as usize * 4) as u32;
                // SYN and FIN take a sequence number each.
                let control = (tcp_flags & 0x01 != 0) as u32 + (tcp_flags & 0x02 != 0) as u32;
                seq_next = seq
                    .wrapping_add((ip.tot_len as u32).saturating_sub(headers))
                    .wrapping_add(control);
            }
        }
        IPPROTO_ICMP => {
            icmp_type = *f.get(l4)?;
            let id = be16(f, l4 + 4)?;
            match icmp_type {
                8 => key.sport = id,
                0 => key.dport = id,
                _ => {}
            }
        }
        _ => return None,
    }
    Some(Pkt {
        key,
        l4,
        ttl: ip.ttl,
        tot_len: ip.tot_len,
        icmp_type,
        tcp_flags,
        seq,
        seq_next,
    })
}

fn in_subnet(n: &NetConfig, addr: u32) -> bool {
    addr & n.mask == n.subnet
}

fn nat_count(st: &mut MapState, net_id: u32, f: impl FnOnce(&mut NatStats)) {
    if let Some(s) = st.nat_stats.get_mut(&net_id) {
        f(s);
    }
}

/// tc's NatOut: a guest's IPv4 to its NAT gateway. With no route anywhere,
/// nothing is translated: refused by policy, or handed to the gateway
/// port (the host stack answers or drops).
fn nat_out(
    st: &mut MapState,
    inp: &Input,
    net_id: u32,
    len: u64,
    _skb: &mut Skb,
    egress: &mut Vec<u32>,
    path: &mut String,
) -> u32 {
    let Some(n) = st.nets.get(&net_id).copied() else {
        return TC_ACT_SHOT;
    };
    let r = from_guest(st, &inp.frame, net_id, &n);
    match r {
        Nat::Refused(reason) => {
            path.push_str(" refused");
            drop_stat(st, inp.ingress, reason);
            TC_ACT_SHOT
        }
        Nat::FragUnknown => {
            path.push_str(" fragment-unknown");
            nat_count(st, net_id, |s| s.drop_frag_unknown += 1);
            TC_ACT_SHOT
        }
        Nat::Skip | Nat::ToHost => {
            path.push_str(" to-gateway");
            stat(st, n.gw_port, |s| {
                s.tx_packets += 1;
                s.tx_bytes += len;
            });
            egress.push(n.gw_port);
            TC_ACT_REDIRECT
        }
    }
}

/// nat.rs `from_guest` up to its FIB lookup, which fails here.
fn from_guest(st: &MapState, f: &[u8], net_id: u32, n: &NetConfig) -> Nat {
    let Some(p) = packet(f) else {
        // nat.rs `fragment_from_guest`: a later fragment leaving the
        // network follows its first fragment's flow, and no first
        // fragment was translated here (the FIB sends nothing).
        let Some(ip) = ipv4_at(f, 14) else {
            return Nat::Skip;
        };
        let d = ip.daddr;
        let multicast = d.to_ne_bytes()[0] >= 224 || d == u32::MAX;
        if ip.frag & 0x1fff == 0 || in_subnet(n, d) || multicast || !in_subnet(n, ip.saddr) {
            return Nat::Skip;
        }
        return Nat::FragUnknown;
    };
    if p.key.proto == IPPROTO_ICMP && p.icmp_type != 8 && p.icmp_type != 0 {
        return Nat::Skip;
    }
    // Only this network's guests' side of a flow.
    let existing = st
        .ct
        .get(&p.key)
        .filter(|e| e.net_id == net_id && in_subnet(n, p.key.saddr))
        .map(|e| e.rewrite);
    let (to, new_flow, fwd) = match existing {
        Some(r) => (r, false, false),
        None => {
            let d = p.key.daddr;
            let multicast = d.to_ne_bytes()[0] >= 224 || d == u32::MAX;
            if in_subnet(n, d) || multicast || !in_subnet(n, p.key.saddr) {
                return Nat::Skip;
            }
            let mut to = CtKey {
                saddr: n.nat_ip,
                ..p.key
            };
            let mut fwd = false;
            if d == n.nat_ip && p.key.proto != IPPROTO_ICMP {
                // A guest reaching a port forward through the uplink address.
                let fk = ForwardKey {
                    ifindex: n.uplink,
                    port: p.key.dport,
                    proto: p.key.proto,
                    _pad: 0,
                };
                match st.forwards.get(&fk) {
                    Some(t) => {
                        to.daddr = t.addr;
                        to.dport = t.port;
                        fwd = true;
                    }
                    None => return Nat::Skip,
                }
            }
            (to, true, fwd)
        }
    };
    if p.ttl <= 1 {
        return Nat::ToHost;
    }
    if new_flow && !fwd && nat_subnet(st, to.daddr).is_some_and(|other| other != net_id) {
        return Nat::Refused(DropReason::ForeignNet);
    }
    // The FIB routes nothing: unroutable, the host answers.
    Nat::ToHost
}

/// tc's NatIn: a frame to the host's MAC on a NAT uplink. Replies of
/// established flows are translated (bytes and checksums), counted, and
/// then, the FIB knowing no way to the guest, dropped; anything else is
/// the host's.
fn nat_in(st: &mut MapState, inp: &Input, skb: &mut Skb, path: &mut String) -> u32 {
    let f = &inp.frame;
    let Some(p) = packet(f) else {
        path.push_str(" not-nat");
        return TC_ACT_OK;
    };
    if p.key.proto == IPPROTO_ICMP && matches!(p.icmp_type, 3 | 11 | 12) {
        return icmp_error(st, &p, skb, path);
    }
    // The outside's side of flows only: never a masquerade flow's
    // original (guest-side) entry.
    let hit = st
        .ct
        .get(&p.key)
        .filter(|e| e.flags & CT_F_ORIGINAL == 0 || e.flags & CT_F_DNAT != 0)
        .map(|e| e.rewrite);
    let to = match hit {
        Some(to) => to,
        None => {
            // A new flow to a port forward (without a rate limit).
            let fk = ForwardKey {
                ifindex: inp.ingress,
                port: p.key.dport,
                proto: p.key.proto,
                _pad: 0,
            };
            let fwd = st.forwards.get(&fk).copied();
            let n = fwd.and_then(|t| st.nets.get(&t.net_id).copied());
            let (Some(t), Some(n)) = (fwd, n) else {
                path.push_str(" no-flow");
                return TC_ACT_OK;
            };
            if p.key.proto == IPPROTO_ICMP || p.key.daddr != n.nat_ip {
                path.push_str(" no-flow");
                return TC_ACT_OK;
            }
            let mut to = CtKey {
                daddr: t.addr,
                dport: t.port,
                ..p.key
            };
            if !create_dnat(st, t.net_id, &p.key, &mut to) {
                path.push_str(" not-created");
                return TC_ACT_SHOT;
            }
            path.push_str(" forwarded");
            to
        }
    };
    if !translate(&mut skb.bytes, &p, &to) {
        path.push_str(" truncated");
        return TC_ACT_SHOT;
    }
    if let Some(entry) = st.ct.get_mut(&p.key) {
        let believed = touch(entry, &p);
        let net_id = entry.net_id;
        if !believed {
            nat_count(st, net_id, |s| s.out_of_window += 1);
        }
        nat_count(st, net_id, |s| s.translated += 1);
    }
    path.push_str(" translated");
    to_guest(skb, &p, path)
}

/// nat.rs `to_guest` with no route: the TTL, then dropped.
fn to_guest(skb: &mut Skb, p: &Pkt, path: &mut String) -> u32 {
    if p.ttl <= 1 {
        return TC_ACT_SHOT;
    }
    dec_ttl(&mut skb.bytes);
    path.push_str(" no-route");
    TC_ACT_SHOT
}

/// Both entries of a port forward's new flow `orig` -> `to`. A reply
/// entry that is already this flow's (another CPU opened it) or an
/// original entry already there is joined (`to` becomes its
/// translation); anything else in the way refuses the flow (counted as a
/// full table).
fn create_dnat(st: &mut MapState, net_id: u32, orig: &CtKey, to: &mut CtKey) -> bool {
    let rkey = to.reply();
    if let Some(r) = st.ct.get(&rkey) {
        if r.rewrite == orig.reply() {
            return true;
        }
        nat_count(st, net_id, |s| s.drop_table_full += 1);
        return false;
    }
    let entry = |rewrite, flags| CtEntry {
        rewrite,
        net_id,
        flags,
        ..Default::default()
    };
    st.ct.insert(rkey, entry(orig.reply(), CT_F_DNAT));
    if let Some(e) = st.ct.get(orig).copied() {
        st.ct.remove(&rkey);
        if e.flags & CT_F_ORIGINAL != 0 {
            *to = e.rewrite;
            return true;
        }
        nat_count(st, net_id, |s| s.drop_table_full += 1);
        return false;
    }
    st.ct.insert(*orig, entry(*to, CT_F_DNAT | CT_F_ORIGINAL));
    nat_count(st, net_id, |s| s.new_flows += 1);
    true
}

/// An ICMP error about a translated flow: the guest's address goes back
/// into the outer destination and the embedded packet's source (address,
/// port or echo id, with its header checksum), the ICMP checksum
/// following each change.
fn icmp_error(st: &mut MapState, p: &Pkt, skb: &mut Skb, path: &mut String) -> u32 {
    let b = &skb.bytes;
    let eip = p.l4 + 8;
    let Some(emb) = ipv4_at(b, eip) else {
        path.push_str(" icmp-error:not-ours");
        return TC_ACT_OK;
    };
    let el4 = eip + emb.hlen;
    let mut sent = CtKey {
        saddr: emb.saddr,
        daddr: emb.daddr,
        proto: emb.proto,
        ..Default::default()
    };
    let port_off = match emb.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (Some(s), Some(d)) = (be16(b, el4), be16(b, el4 + 2)) else {
                path.push_str(" icmp-error:not-ours");
                return TC_ACT_OK;
            };
            (sent.sport, sent.dport) = (s, d);
            el4
        }
        IPPROTO_ICMP => {
            let Some(id) = be16(b, el4 + 4) else {
                path.push_str(" icmp-error:not-ours");
                return TC_ACT_OK;
            };
            sent.sport = id;
            el4 + 4
        }
        _ => {
            path.push_str(" icmp-error:not-ours");
            return TC_ACT_OK;
        }
    };
    let Some(e) = st.ct.get(&sent.reply()).copied() else {
        path.push_str(" icmp-error:not-ours");
        return TC_ACT_OK;
    };
    let (guest, gport) = (e.rewrite.daddr, e.rewrite.dport);
    let b = &mut skb.bytes;
    let icmp_sum = p.l4 + 2;
    // Outer destination: the IPv4 header's checksum only.
    b[30..34].copy_from_slice(&guest.to_ne_bytes());
    csum_replace(
        b,
        24,
        &p.key.daddr.to_ne_bytes(),
        &guest.to_ne_bytes(),
        false,
    );
    // Embedded source address, its header checksum, its port (or id).
    let old_sum = u16::from_be_bytes([b[eip + 10], b[eip + 11]]);
    let new_sum = sum_update32(old_sum, emb.saddr, guest);
    b[eip + 12..eip + 16].copy_from_slice(&guest.to_ne_bytes());
    csum_replace(
        b,
        icmp_sum,
        &emb.saddr.to_ne_bytes(),
        &guest.to_ne_bytes(),
        false,
    );
    b[eip + 10..eip + 12].copy_from_slice(&new_sum.to_be_bytes());
    csum_replace(
        b,
        icmp_sum,
        &old_sum.to_be_bytes(),
        &new_sum.to_be_bytes(),
        false,
    );
    b[port_off..port_off + 2].copy_from_slice(&gport.to_be_bytes());
    csum_replace(
        b,
        icmp_sum,
        &sent.sport.to_be_bytes(),
        &gport.to_be_bytes(),
        false,
    );
    nat_count(st, e.net_id, |s| s.icmp_errors += 1);
    path.push_str(" icmp-error:translated");
    to_guest(skb, p, path)
}

/// RFC 1624 update of a checksum (host order) for a 32-bit field
/// (addresses as the maps hold them) changing from `old` to `new`.
fn sum_update32(sum: u16, old: u32, new: u32) -> u16 {
    let (o, n) = (u32::from_be(old), u32::from_be(new));
    let s = (!sum) as u64
        + (!(o >> 16) & 0xffff) as u64
        + (!o & 0xffff) as u64
        + (n >> 16) as u64
        + (n & 0xffff) as u64;
    !fold(s)
}

/// Rewrites addresses and ports (ICMP echo: the identifier) from `p.key`
/// to `to`, adjusting the IPv4 and L4 checksums field by field. False if
/// a field lies beyond the frame (a truncated packet): the fields before
/// it are rewritten already, and the packet is dropped.
fn translate(b: &mut [u8], p: &Pkt, to: &CtKey) -> bool {
    let proto = p.key.proto;
    let csum_off = p.l4
        + match proto {
            IPPROTO_TCP => 16,
            IPPROTO_UDP => 6,
            _ => 2,
        };
    let udp = proto == IPPROTO_UDP;
    for (off, old, new) in [(26, p.key.saddr, to.saddr), (30, p.key.daddr, to.daddr)] {
        if old == new {
            continue;
        }
        let (o, n) = (old.to_ne_bytes(), new.to_ne_bytes());
        b[off..off + 4].copy_from_slice(&n);
        csum_replace(b, 24, &o, &n, false);
        // ICMP's checksum does not cover the addresses; TCP's and UDP's do
        // (pseudo-header).
        if proto != IPPROTO_ICMP && !csum_replace(b, csum_off, &o, &n, udp) {
            return false;
        }
    }
    let ports: Vec<(usize, u16, u16)> = match (proto, p.icmp_type) {
        (IPPROTO_ICMP, 8) => vec![(p.l4 + 4, p.key.sport, to.sport)],
        (IPPROTO_ICMP, _) => vec![(p.l4 + 4, p.key.dport, to.dport)],
        _ => vec![
            (p.l4, p.key.sport, to.sport),
            (p.l4 + 2, p.key.dport, to.dport),
        ],
    };
    for (off, old, new) in ports {
        if old == new {
            continue;
        }
        let (o, n) = (old.to_be_bytes(), new.to_be_bytes());
        b[off..off + 2].copy_from_slice(&n);
        if !csum_replace(b, csum_off, &o, &n, udp) {
            return false;
        }
    }
    true
}

/// The kernel's incremental checksum update (`csum_replace4`, RFC 1624)
/// of the checksum at `at` for a 2- or 4-byte field that changed from
/// `old` to `new`, in the kernel's own arithmetic (32-bit one's complement
/// on the words as they lie in memory), so that even the choice between
/// 0x0000 and 0xffff is the kernel's. `udp`: a checksum of 0 means none
/// and stays 0, and a result of 0 is sent as 0xffff. False if the
/// checksum lies beyond the frame.
fn csum_replace(b: &mut [u8], at: usize, old: &[u8], new: &[u8], udp: bool) -> bool {
    let Some(c) = arr::<2>(b, at).map(u16::from_ne_bytes) else {
        return false;
    };
    if udp && c == 0 {
        return true;
    }
    let word = |x: &[u8]| -> u32 {
        let mut w = [0u8; 4];
        w[..x.len()].copy_from_slice(x);
        u32::from_ne_bytes(w)
    };
    let add = |a: u32, x: u32| -> u32 {
        let (r, carry) = a.overflowing_add(x);
        r.wrapping_add(carry as u32)
    };
    let sum = add(add(!(c as u32), !word(old)), word(new));
    let folded = (sum & 0xffff) + (sum >> 16);
    let folded = (folded & 0xffff) + (folded >> 16);
    let mut out = !(folded as u16);
    if udp && out == 0 {
        out = 0xffff;
    }
    b[at..at + 2].copy_from_slice(&out.to_ne_bytes());
    true
}

/// TTL - 1 with the IPv4 header checksum adjusted.
fn dec_ttl(b: &mut [u8]) {
    let old = [b[22], b[23]];
    b[22] = b[22].wrapping_sub(1);
    let new = [b[22], b[23]];
    csum_replace(b, 24, &old, &new, false);
}

/// How far from what its sender has sent a TCP segment may lie and still
/// be the flow's (retransmissions lie behind).
const SEQ_WINDOW: u32 = 1 << 20;

/// Counts a packet on its conntrack entry: packets, bytes and, for TCP,
/// the flags and next sequence number of its sender. A SYN on a closed
/// tuple starts the connection over; a segment far from the sequence its
/// sender is at (a blind guess, a spoofed RST) changes no state: false.
fn touch(e: &mut CtEntry, p: &Pkt) -> bool {
    e.packets += 1;
    e.bytes += p.tot_len as u64;
    if p.key.proto != IPPROTO_TCP {
        return true;
    }
    let f = p.tcp_flags;
    let mut seen = 0;
    for (bit, flag) in [
        (0x02, CT_F_SYN),
        (0x01, CT_F_FIN),
        (0x04, CT_F_RST),
        (0x10, CT_F_ACK),
    ] {
        if f & bit != 0 {
            seen |= flag;
        }
    }
    let closed = CT_F_FIN | CT_F_RST;
    if seen & CT_F_SYN != 0 && e.flags & closed != 0 {
        e.flags = (e.flags & !(closed | CT_F_SYN | CT_F_ACK)) | seen;
        e.seq_end = p.seq_next;
        return true;
    }
    let known = e.seq_end;
    let distance = p.seq.wrapping_sub(known).wrapping_add(SEQ_WINDOW);
    if known != 0 && distance > 2 * SEQ_WINDOW {
        return false;
    }
    if known == 0 || (p.seq_next.wrapping_sub(known) as i32) > 0 {
        e.seq_end = p.seq_next;
    }
    e.flags |= seen;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_adjustment_matches_a_full_recomputation() {
        // An IPv4 header whose source changes: adjusting must give what
        // summing the new header gives.
        let mut h = vec![
            0x45, 0, 0, 28, 0, 1, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        let c = !fold(sum16(&h, 0));
        h[10..12].copy_from_slice(&c.to_be_bytes());
        let mut b = vec![0u8; 14];
        b.extend_from_slice(&h);
        let (old, new) = ([10, 0, 0, 1], [198, 51, 100, 7]);
        b[26..30].copy_from_slice(&new);
        assert!(csum_replace(&mut b, 24, &old, &new, false));
        assert_eq!(fold(sum16(&b[14..34], 0)), 0xffff);
    }

    #[test]
    fn lpm_takes_the_longest_prefix() {
        let mut st = MapState::default();
        let a = |x: [u8; 4]| u32::from_ne_bytes(x);
        st.nat_subnets = vec![(8, a([10, 0, 0, 0]), 1), (24, a([10, 0, 1, 0]), 2)];
        assert_eq!(nat_subnet(&st, a([10, 0, 1, 5])), Some(2));
        assert_eq!(nat_subnet(&st, a([10, 9, 1, 5])), Some(1));
        assert_eq!(nat_subnet(&st, a([11, 0, 1, 5])), None);
    }
}
