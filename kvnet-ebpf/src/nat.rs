//! Masquerade and port forwards with a conntrack table (map `ct`), in tc
//! only: translating needs the skb's checksum helpers, which stay correct
//! for checksum-offloaded (CHECKSUM_PARTIAL) packets.
//!
//! Every flow has two `ct` entries, one per direction, each mapping the
//! tuple a packet arrives with to the tuple it leaves with. New outbound
//! flows get a source port by inserting the reply direction's entry with
//! BPF_NOEXIST: the kernel's atomic insert is the lock that keeps two CPUs
//! from ever handing out the same (remote, port) pair.
use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release, bpf_skb_change_tail,
    },
    programs::TcContext,
};
use kvnet_common::{
    CtEntry, CtKey, DropReason, ForwardKey, FragKey, FragPorts, NatMapKey, NatMapping, NatStats,
    NetConfig, CT_F_ACK, CT_F_DNAT, CT_F_FIN, CT_F_ORIGINAL, CT_F_RST, CT_F_SYN, IPPROTO_ICMP,
    IPPROTO_TCP, IPPROTO_UDP, MAP_SIDE_GUEST, MAP_SIDE_UPLINK, NET_F_CLOSED, NET_F_NAT_UDP_EIM,
};

use crate::{
    fdb,
    maps::{self, CT, CT_QUOTA, FORWARDS, NAT_FRAGS, NAT_MAPPINGS, NAT_STATS},
    parse::{self, ETH_HLEN},
    route,
};

const L3: usize = ETH_HLEN;
pub(crate) const FIB_SKIP_NEIGH: u32 = 1 << 2;
/// The main table, not the policy rules: a tracked flow's packet back to
/// its guest is conntrack's decision, and a NAT network's rules refuse
/// everything forwarded into it (`close_nat_subnet` in the daemon).
pub(crate) const FIB_DIRECT: u32 = 1 << 0;
pub(crate) const F_PSEUDO_HDR: u64 = 1 << 4;
pub(crate) const F_MARK_MANGLED_0: u64 = 1 << 5;
const ICMP_ECHOREPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_ECHO: u8 = 8;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETERPROB: u8 = 12;
pub(crate) const PORT_TRIES: u32 = 24;

/// What the NAT stage did with a packet.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum NatKind {
    /// Not a NAT matter: route or switch it as usual.
    Skip,
    /// Let the host stack have it untranslated (TTL expiring, MTU).
    ToHost,
    Drop,
    /// Translated and sent: `rc` is the tc verdict, `egress` the interface.
    Sent,
    /// Refused by policy (counted on the ingress port under `reason`):
    /// a new flow into another closed network, or over the guest's quota.
    Refused,
}

/// The NAT stage's outcome. A struct, not an enum with payloads: every
/// field is always written, so no path hands the verifier an undefined
/// register (which an enum's unused payload can be).
#[derive(Clone, Copy)]
pub struct Nat {
    pub kind: NatKind,
    pub rc: i32,
    pub egress: u32,
    pub reason: DropReason,
}

impl Nat {
    const fn of(kind: NatKind) -> Nat {
        Nat {
            kind,
            rc: 0,
            egress: 0,
            reason: DropReason::Malformed,
        }
    }
    pub const SKIP: Nat = Nat::of(NatKind::Skip);
    pub const TO_HOST: Nat = Nat::of(NatKind::ToHost);
    pub const DROP: Nat = Nat::of(NatKind::Drop);

    #[inline(always)]
    pub(crate) fn sent(rc: i32, egress: u32) -> Nat {
        Nat {
            rc,
            egress,
            ..Nat::of(NatKind::Sent)
        }
    }

    #[inline(always)]
    pub(crate) fn refused(reason: DropReason) -> Nat {
        Nat {
            reason,
            ..Nat::of(NatKind::Refused)
        }
    }
}

struct Pkt {
    key: CtKey,
    /// Where the L4 header is (past Ethernet and IPv4): 16 bits, as the
    /// NAT path has little stack to spare.
    l4_off: u16,
    ttl: u8,
    tot_len: u16,
    icmp_type: u8,
    tcp_flags: u8,
    /// TCP: the segment's sequence number and the one after it.
    seq: u32,
    seq_next: u32,
    /// Don't Fragment, a header of 20 bytes (no options).
    df: bool,
    plain_header: bool,
    /// IP identification, and 1 if more fragments follow (a first
    /// fragment), computed without a branch: a constant per path would
    /// make the verifier walk the NAT path once per value.
    id: u16,
    more_frags: u8,
}

impl Pkt {
    #[inline(always)]
    fn l4(&self) -> usize {
        self.l4_off as usize
    }
}

#[inline(always)]
fn load<T>(ctx: &TcContext, off: usize) -> Option<T> {
    ctx.load::<T>(off).ok()
}

#[inline(always)]
pub(crate) fn count(net_id: u32, f: impl FnOnce(&mut NatStats)) {
    if let Some(s) = NAT_STATS.get_ptr_mut(&net_id) {
        f(unsafe { &mut *s });
    }
}

/// Parses IPv4 TCP/UDP/ICMP at L3; None for anything else and for later
/// fragments (no L4 header: [`later_fragment`] has them).
#[inline(always)]
fn packet(ctx: &TcContext) -> Option<Pkt> {
    let ip = parse::ipv4_skb(ctx, L3)?;
    if !ip.is_first_fragment() {
        return None;
    }
    let l4 = L3 + ip.hlen;
    let proto = ip.proto;
    let mut key = CtKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        proto,
        ..Default::default()
    };
    let mut icmp_type = 0;
    let mut tcp_flags = 0;
    let (mut seq, mut seq_next) = (0, 0);
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            key.sport = u16::from_be(load::<u16>(ctx, l4)?);
            key.dport = u16::from_be(load::<u16>(ctx, l4 + 2)?);
            if proto == IPPROTO_TCP {
                // Sequence (4..8), data offset (12), flags (13).
                let h: [u8; 10] = load(ctx, l4 + 4)?;
                tcp_flags = h[9];
                seq = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
                let headers = (ip.hlen + ((h[8] >> 4) as usize) * 4) as u32;
                // SYN and FIN take a sequence number each.
                let control = (tcp_flags & 0x01 != 0) as u32 + (tcp_flags & 0x02 != 0) as u32;
                seq_next = seq
                    .wrapping_add((ip.tot_len as u32).saturating_sub(headers))
                    .wrapping_add(control);
            }
        }
        IPPROTO_ICMP => {
            icmp_type = load::<u8>(ctx, l4)?;
            let id = u16::from_be(load::<u16>(ctx, l4 + 4)?);
            match icmp_type {
                ICMP_ECHO => key.sport = id,
                ICMP_ECHOREPLY => key.dport = id,
                _ => {}
            }
        }
        _ => return None,
    }
    Some(Pkt {
        key,
        l4_off: l4 as u16,
        ttl: ip.ttl,
        tot_len: ip.tot_len,
        icmp_type,
        tcp_flags,
        seq,
        seq_next,
        df: ip.frag & 0x4000 != 0,
        plain_header: ip.hlen == parse::IPV4_HLEN,
        id: ip.id,
        more_frags: ((ip.frag >> 13) & 1) as u8,
    })
}

/// Keeps a first fragment's ports (as it arrived) for the fragments after
/// it.
#[inline(always)]
fn first_fragment_done(p: &Pkt) {
    if p.more_frags == 0 {
        return;
    }
    let fk = FragKey {
        saddr: p.key.saddr,
        daddr: p.key.daddr,
        id: p.id,
        proto: p.key.proto,
        _pad: 0,
    };
    let first = FragPorts {
        sport: p.key.sport,
        dport: p.key.dport,
        icmp_type: p.icmp_type,
        _pad: [0; 3],
    };
    let _ = NAT_FRAGS.insert(&fk, &first, 0);
}

/// A later fragment (no L4 header) of a datagram whose first fragment was
/// translated: its tuple, the first's ports with its own addresses.
#[inline(always)]
fn later_fragment(ip: &parse::Ipv4) -> Option<Pkt> {
    if ip.is_first_fragment() {
        return None;
    }
    let fk = FragKey {
        saddr: ip.saddr,
        daddr: ip.daddr,
        id: ip.id,
        proto: ip.proto,
        _pad: 0,
    };
    let first = unsafe { NAT_FRAGS.get(&fk) }?;
    Some(Pkt {
        key: CtKey {
            saddr: ip.saddr,
            daddr: ip.daddr,
            sport: first.sport,
            dport: first.dport,
            proto: ip.proto,
            _pad: [0; 3],
        },
        l4_off: (L3 + ip.hlen) as u16,
        ttl: ip.ttl,
        tot_len: ip.tot_len,
        icmp_type: first.icmp_type,
        tcp_flags: 0,
        seq: 0,
        seq_next: 0,
        df: false,
        plain_header: ip.hlen == parse::IPV4_HLEN,
        id: ip.id,
        more_frags: 0,
    })
}

/// Rewrites the addresses of a later fragment (the IP header checksum
/// only: the L4 checksum, in the first fragment, was fixed there).
#[inline(always)]
fn apply_addrs(ctx: &TcContext, from: &CtKey, to: &CtKey) -> bool {
    for (off, old, new) in [
        (L3 + 12, from.saddr, to.saddr),
        (L3 + 16, from.daddr, to.daddr),
    ] {
        if old != new
            && (ctx.store(off, &new, 0).is_err()
                || ctx
                    .l3_csum_replace(L3 + 10, old as u64, new as u64, 4)
                    .is_err())
        {
            return false;
        }
    }
    true
}

/// A guest's later fragment to the gateway: translated as its flow's first
/// fragment was, routed where that one went.
#[inline(always)]
fn fragment_from_guest(ctx: &TcContext, net_id: u32, n: &NetConfig) -> Nat {
    let Some(ip) = parse::ipv4_skb(ctx, L3) else {
        return Nat::SKIP;
    };
    if ip.is_first_fragment()
        || in_subnet(n, ip.daddr)
        || is_multicast_or_bcast(ip.daddr)
        || !in_subnet(n, ip.saddr)
    {
        // Not a fragment, or one for the host: not a NAT matter.
        return Nat::SKIP;
    }
    let flow = later_fragment(&ip).and_then(|p| {
        let e = CT
            .get_ptr_mut(&p.key)
            .filter(|e| unsafe { (**e).net_id } == net_id)?;
        Some((p, e))
    });
    let Some((p, e)) = flow else {
        // Its first fragment was never translated: no flow to follow.
        count(net_id, |s| s.drop_frag_unknown += 1);
        return Nat::DROP;
    };
    let to = unsafe { (*e).rewrite };
    if p.ttl <= 1 {
        return Nat::TO_HOST;
    }
    let Ok(egress) = fib_egress(ctx, &p, to.saddr, to.daddr, n.gw_host) else {
        return Nat::TO_HOST;
    };
    if egress != n.uplink && maps::gw_host_net(egress).is_none() {
        return Nat::refused(DropReason::ForeignNet);
    }
    if !apply_addrs(ctx, &p.key, &to) || !dec_ttl(ctx, p.ttl) {
        return Nat::DROP;
    }
    touch_counts(e, &p);
    count(net_id, |s| s.fragments += 1);
    Nat::sent(
        unsafe { bpf_redirect_neigh(egress, core::ptr::null_mut(), 0, 0) } as i32,
        egress,
    )
}

/// A later fragment from outside of a datagram whose first fragment was
/// translated for a guest. None: not ours (the host's own, say).
#[inline(always)]
fn fragment_from_uplink(ctx: &TcContext, ingress: u32) -> Nat {
    let Some(p) = parse::ipv4_skb(ctx, L3).and_then(|ip| later_fragment(&ip)) else {
        return Nat::SKIP;
    };
    let Some(e) = CT.get_ptr_mut(&p.key).filter(|e| {
        let flags = unsafe { (**e).flags };
        flags & CT_F_ORIGINAL == 0 || flags & CT_F_DNAT != 0
    }) else {
        return Nat::SKIP;
    };
    let mut to = unsafe { (*e).rewrite };
    if !apply_addrs(ctx, &p.key, &to) {
        return Nat::DROP;
    }
    touch_counts(e, &p);
    let net_id = unsafe { (*e).net_id };
    count(net_id, |s| s.fragments += 1);
    to.proto = p.key.proto;
    to_guest(ctx, &p, &to, ingress, net_id)
}

#[inline(always)]
fn l4_csum_off(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2,
    }
}

/// Rewrites addresses and ports from `p.key` to `to`, fixing the IP and
/// L4 checksums incrementally.
#[inline(always)]
fn apply(ctx: &TcContext, p: &Pkt, to: &CtKey) -> bool {
    let proto = p.key.proto;
    let csum = p.l4() + l4_csum_off(proto);
    let pseudo = if proto == IPPROTO_ICMP {
        0
    } else {
        F_PSEUDO_HDR
    };
    let mangled0 = if proto == IPPROTO_UDP {
        F_MARK_MANGLED_0
    } else {
        0
    };
    for (off, old, new) in [
        (L3 + 12, p.key.saddr, to.saddr),
        (L3 + 16, p.key.daddr, to.daddr),
    ] {
        if old != new {
            if ctx.store(off, &new, 0).is_err()
                || ctx
                    .l3_csum_replace(L3 + 10, old as u64, new as u64, 4)
                    .is_err()
            {
                return false;
            }
            // ICMP's checksum does not cover the addresses; TCP's and
            // UDP's do, through the pseudo-header.
            if pseudo != 0
                && ctx
                    .l4_csum_replace(csum, old as u64, new as u64, pseudo | mangled0 | 4)
                    .is_err()
            {
                return false;
            }
        }
    }
    // ICMP echo: the identifier plays the port.
    let (old_s, new_s, old_d, new_d) = (p.key.sport, to.sport, p.key.dport, to.dport);
    let ports: [(usize, u16, u16); 2] = if proto == IPPROTO_ICMP {
        if p.icmp_type == ICMP_ECHO {
            [(p.l4() + 4, old_s, new_s), (0, 0, 0)]
        } else {
            [(p.l4() + 4, old_d, new_d), (0, 0, 0)]
        }
    } else {
        [(p.l4(), old_s, new_s), (p.l4() + 2, old_d, new_d)]
    };
    for (off, old, new) in ports {
        if off != 0 && old != new {
            let (o, n) = (old.to_be(), new.to_be());
            if ctx.store(off, &n, 0).is_err()
                || ctx
                    .l4_csum_replace(csum, o as u64, n as u64, mangled0 | 2)
                    .is_err()
            {
                return false;
            }
        }
    }
    true
}

/// TTL - 1 with the IP checksum adjusted.
#[inline(always)]
fn dec_ttl(ctx: &TcContext, ttl: u8) -> bool {
    let proto: u8 = match load(ctx, L3 + 9) {
        Some(p) => p,
        None => return false,
    };
    let old = u16::from_be_bytes([ttl, proto]).to_be();
    let new = u16::from_be_bytes([ttl - 1, proto]).to_be();
    ctx.store(L3 + 8, &(ttl - 1), 0).is_ok()
        && ctx
            .l3_csum_replace(L3 + 10, old as u64, new as u64, 2)
            .is_ok()
}

/// FIB lookup for `daddr` as if the packet arrived on `ifindex`.
#[inline(always)]
fn fib(
    ctx: &TcContext,
    p: &Pkt,
    saddr: u32,
    daddr: u32,
    ifindex: u32,
    flags: u32,
) -> Result<route::Fib, route::FibMiss> {
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as u16;
    // One segment's headers, read only for GSO packets (the MTU check).
    let headers = if gso_size == 0 {
        0
    } else {
        let doff = if p.key.proto == IPPROTO_TCP {
            load::<u8>(ctx, p.l4() + 12).ok_or(route::FibMiss::Other)?
        } else {
            0
        };
        (p.l4() - L3) as u16 + route::l4_header_len(p.key.proto, doff)
    };
    route::fib_v4(
        ctx.skb.skb as *mut _,
        &route::FibQuery {
            proto: p.key.proto,
            tos: 0,
            saddr,
            daddr,
            tot_len: p.tot_len,
            l3_len: ctx.len().saturating_sub(L3 as u32),
            headers,
            gso_size,
            ifindex,
            flags,
        },
    )
}

/// Counts a packet on its flow's entry: last seen, packets, bytes.
#[inline(always)]
fn touch_counts(e: *mut CtEntry, p: &Pkt) {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    unsafe {
        // Plain adds: the bpfel target has no atomic RMW here; two CPUs
        // racing on one flow may lose a count, never a translation.
        (*e).packets += 1;
        (*e).bytes += p.tot_len as u64;
        if now.wrapping_sub((*e).last_seen_ns) > 1_000_000_000 {
            (*e).last_seen_ns = now;
        }
    }
}

/// How far from what its sender has sent a TCP segment may lie and still
/// be the flow's (either way: retransmissions lie behind). A blind guess at
/// a flow's sequence falls in with a chance of 1 in 2048.
const SEQ_WINDOW: u32 = 1 << 20;

/// Counts a packet of a flow on its entry: last seen, packets, bytes and,
/// for TCP, the flags and sequence of its sender (written only when new,
/// to keep the line quiet).
#[inline(always)]
fn touch(e: *mut CtEntry, p: &Pkt) {
    touch_counts(e, p);
    if p.key.proto != IPPROTO_TCP {
        return;
    }
    unsafe {
        tcp_track(
            &mut (*e).flags,
            &mut (*e).seq_end,
            (*e).net_id,
            p.tcp_flags,
            p.seq,
            p.seq_next,
        )
    };
}

/// A TCP segment's flags and sequence on its direction's entry (`flags`,
/// `seq_end`): what the daemon's conntrack states and timeouts follow.
/// Shared by the IPv4 and IPv6 (NAT66) tables.
#[inline(always)]
pub(crate) fn tcp_track(
    flags: &mut u32,
    seq_end: &mut u32,
    net_id: u32,
    tcp_flags: u8,
    seq: u32,
    seq_next: u32,
) {
    let mut seen = 0;
    if tcp_flags & 0x02 != 0 {
        seen |= CT_F_SYN;
    }
    if tcp_flags & 0x01 != 0 {
        seen |= CT_F_FIN;
    }
    if tcp_flags & 0x04 != 0 {
        seen |= CT_F_RST;
    }
    if tcp_flags & 0x10 != 0 {
        seen |= CT_F_ACK;
    }
    let closed = CT_F_FIN | CT_F_RST;
    if seen & CT_F_SYN != 0 && *flags & closed != 0 {
        // A SYN on a tuple whose connection closed: a new connection
        // (a client reusing its port), not the old one's flags.
        *flags = (*flags & !(closed | CT_F_SYN | CT_F_ACK)) | seen;
        *seq_end = seq_next;
        return;
    }
    let known = *seq_end;
    if known != 0 && seq.wrapping_sub(known).wrapping_add(SEQ_WINDOW) > 2 * SEQ_WINDOW {
        // Far from anything its sender sent: a guess at the flow (a
        // spoofed RST, say). It goes on for the receiver to judge,
        // as Linux conntrack lets it, but changes nothing here.
        count(net_id, |s| s.out_of_window += 1);
        return;
    }
    if known == 0 || (seq_next.wrapping_sub(known) as i32) > 0 {
        *seq_end = seq_next;
    }
    if *flags & seen != seen {
        *flags |= seen;
    }
}

/// The source ports masquerade hands out: the network's range without the
/// host's ephemeral range, so every try is a port that may be taken.
pub(crate) struct PortRange {
    lo: u32,
    /// Ports in the range, the ephemeral ones not counted.
    size: u32,
    /// The ephemeral ports inside the range: `skip` ports from `skip_at`.
    skip_at: u32,
    skip: u32,
}

impl PortRange {
    #[inline(always)]
    pub(crate) fn of(n: &NetConfig) -> PortRange {
        let (lo, hi) = (n.port_lo as u32, n.port_hi as u32);
        let (slo, shi) = (n.skip_lo as u32, n.skip_hi as u32);
        let (skip_at, end) = (slo.max(lo), shi.min(hi));
        let skip = if slo <= shi && skip_at <= end {
            end - skip_at + 1
        } else {
            0
        };
        PortRange {
            lo,
            size: (hi + 1).saturating_sub(lo).saturating_sub(skip),
            skip_at,
            skip,
        }
    }

    /// Whether `port` is one this range hands out.
    #[inline(always)]
    pub(crate) fn contains(&self, port: u16) -> bool {
        let p = port as u32;
        p >= self.lo
            && p < self.lo + self.size + self.skip
            && !(self.skip != 0 && p >= self.skip_at && p < self.skip_at + self.skip)
    }

    /// The port random number `x` names; None when nothing is left.
    #[inline(always)]
    pub(crate) fn pick(&self, x: u32) -> Option<u16> {
        if self.size == 0 {
            return None;
        }
        let mut port = self.lo + x % self.size;
        if self.skip != 0 && port >= self.skip_at {
            port += self.skip;
        }
        Some(port as u16)
    }
}

/// A port the uplink address serves: a port forward's, or a host socket's
/// that the reply of `to` from `port` would reach (a listener, say).
#[inline(always)]
fn port_in_use(ctx: &TcContext, n: &NetConfig, to: &CtKey, port: u16) -> bool {
    let fwd = ForwardKey {
        ifindex: n.uplink,
        port,
        proto: to.proto,
        _pad: 0,
    };
    if unsafe { FORWARDS.get(&fwd) }.is_some() {
        return true;
    }
    if to.proto != IPPROTO_TCP && to.proto != IPPROTO_UDP {
        return false;
    }
    // A guest socket's endpoint-independent mapping holds its port towards
    // every remote.
    let mapped = NatMapKey {
        addr: to.saddr,
        port,
        proto: to.proto,
        side: MAP_SIDE_UPLINK,
    };
    if to.proto == IPPROTO_UDP && unsafe { NAT_MAPPINGS.get(&mapped) }.is_some() {
        return true;
    }
    // struct bpf_sock_tuple.ipv4, seen from the reply: remote -> us.
    let mut tuple = [0u8; 12];
    tuple[0..4].copy_from_slice(&to.daddr.to_ne_bytes());
    tuple[4..8].copy_from_slice(&to.saddr.to_ne_bytes());
    tuple[8..10].copy_from_slice(&to.dport.to_be_bytes());
    tuple[10..12].copy_from_slice(&port.to_be_bytes());
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    let t = tuple.as_mut_ptr() as *mut _;
    let sk = unsafe {
        if to.proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(skb, t, 12, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(skb, t, 12, CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

/// BPF_F_CURRENT_NETNS: the namespace of the device the packet is on.
pub(crate) const CURRENT_NETNS: u64 = u64::MAX;

/// The uplink port of the guest socket `orig` comes from, if it has an
/// endpoint-independent mapping on the uplink's current address.
#[inline(always)]
fn mapped_port(n: &NetConfig, orig: &CtKey) -> Option<u16> {
    let key = NatMapKey {
        addr: orig.saddr,
        port: orig.sport,
        proto: orig.proto,
        side: MAP_SIDE_GUEST,
    };
    let m = unsafe { NAT_MAPPINGS.get(&key) }?;
    (m.addr == n.nat_ip).then_some(m.port)
}

/// Maps the guest socket of `orig` to the uplink port of `to` for every
/// remote, unless it has a mapping. The uplink's side is written first and
/// only if free: it is what reserves the port.
#[inline(always)]
fn map_socket(net_id: u32, n: &NetConfig, orig: &CtKey, to: &CtKey, guest_port: u32) {
    if n.flags & NET_F_NAT_UDP_EIM == 0
        || orig.proto != IPPROTO_UDP
        || mapped_port(n, orig).is_some()
    {
        return;
    }
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let uplink = NatMapKey {
        addr: to.saddr,
        port: to.sport,
        proto: to.proto,
        side: MAP_SIDE_UPLINK,
    };
    let mut m = NatMapping {
        addr: orig.saddr,
        port: orig.sport,
        _pad: 0,
        net_id,
        guest_port,
        created_ns: now,
    };
    if NAT_MAPPINGS
        .insert(&uplink, &m, BPF_NOEXIST as u64)
        .is_err()
    {
        return;
    }
    let guest = NatMapKey {
        addr: orig.saddr,
        port: orig.sport,
        proto: orig.proto,
        side: MAP_SIDE_GUEST,
    };
    m.addr = to.saddr;
    m.port = to.sport;
    let _ = NAT_MAPPINGS.insert(&guest, &m, 0);
}

/// How [`create`] opened a flow.
#[derive(PartialEq, Eq)]
pub(crate) enum Opened {
    /// Its two entries are ours.
    New,
    /// Another CPU created the same flow first: `to` is now its translation.
    Joined,
}

pub(crate) const EEXIST: i32 = -17;

/// The translation another CPU gave `orig` while this one was creating it.
#[inline(always)]
fn winner(orig: &CtKey, to: &mut CtKey) -> Option<Opened> {
    let e = unsafe { CT.get(orig) }?;
    if e.flags & CT_F_ORIGINAL == 0 {
        return None;
    }
    *to = e.rewrite;
    Some(Opened::Joined)
}

/// Creates both entries of a flow `orig` -> `to`. For SNAT (`alloc`), the
/// source port of `to` is chosen here. None: refused (counted).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn create(
    ctx: &TcContext,
    net_id: u32,
    n: &NetConfig,
    orig: &CtKey,
    to: &mut CtKey,
    alloc: bool,
    flags: u32,
    port: u32,
) -> Option<Opened> {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // The entries are built in per-CPU scratch memory: 64 bytes the NAT
    // path's stack does not have.
    let rev = maps::CT_SCRATCH.get_ptr_mut(0)?;
    let rev = unsafe { &mut *rev };
    rev.rewrite = orig.reply();
    rev.net_id = net_id;
    rev.flags = flags;
    rev.created_ns = now;
    rev.last_seen_ns = now;
    rev.packets = 0;
    rev.bytes = 0;
    rev.port = port;
    rev.seq_end = 0;
    if alloc {
        let range = PortRange::of(n);
        let start = unsafe { bpf_get_prandom_u32() };
        let mut found = false;
        let mut full = false;
        // UDP of an endpoint-independent network: the socket's mapping
        // (its port is in use, by it). Tried apart from the loop, which the
        // verifier then walks once, not once per outcome.
        if n.flags & NET_F_NAT_UDP_EIM != 0 && orig.proto == IPPROTO_UDP && flags & CT_F_DNAT == 0 {
            if let Some(mapped) = mapped_port(n, orig) {
                to.sport = mapped;
                match CT.insert(&to.reply(), &*rev, BPF_NOEXIST as u64) {
                    Ok(()) => found = true,
                    Err(e) if e == EEXIST => {}
                    Err(_) => full = true,
                }
            }
        }
        for i in 0..PORT_TRIES {
            if found || full {
                break;
            }
            // The guest's own port first, when the range has it (port
            // preservation, as Linux's masquerade does): peer-to-peer
            // applications that predict their mapping keep working.
            let port = if i == 0 && range.contains(orig.sport) {
                orig.sport
            } else {
                let Some(p) = range.pick(start.wrapping_add(i.wrapping_mul(7919))) else {
                    break;
                };
                p
            };
            if port_in_use(ctx, n, to, port) {
                continue;
            }
            to.sport = port;
            let rkey = to.reply();
            match CT.insert(&rkey, &*rev, BPF_NOEXIST as u64) {
                Ok(()) => {
                    found = true;
                    break;
                }
                // -EEXIST: port taken for that destination; else the table is full.
                Err(e) if e == EEXIST => continue,
                Err(_) => {
                    full = true;
                    break;
                }
            }
        }
        if !found {
            count(net_id, |s| {
                if full {
                    s.drop_table_full += 1
                } else {
                    s.drop_no_port += 1
                }
            });
            return None;
        }
    } else if let Err(e) = CT.insert(&to.reply(), &*rev, BPF_NOEXIST as u64) {
        // A forward's reply tuple is fixed: it exists when another CPU is
        // opening this very flow, whose translation is `to` as well.
        if e == EEXIST {
            if let Some(r) = unsafe { CT.get(&to.reply()) } {
                if r.rewrite == orig.reply() {
                    return Some(Opened::Joined);
                }
            }
        }
        count(net_id, |s| s.drop_table_full += 1);
        return None;
    }
    rev.rewrite = *to;
    rev.flags = flags | CT_F_ORIGINAL;
    if let Err(e) = CT.insert(orig, &*rev, BPF_NOEXIST as u64) {
        let _ = CT.remove(&to.reply());
        if e == EEXIST {
            // Another CPU won the race for this flow: use its entry.
            if let Some(joined) = winner(orig, to) {
                return Some(joined);
            }
        }
        count(net_id, |s| s.drop_table_full += 1);
        return None;
    }
    count(net_id, |s| s.new_flows += 1);
    Some(Opened::New)
}

/// One more flow open on a guest's port (its quota, map `ct_quota`).
#[inline(always)]
pub(crate) fn quota_add(port: u32) {
    match CT_QUOTA.get_ptr_mut(&port) {
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = CT_QUOTA.insert(&port, &1, 0);
        }
    }
}

#[inline(always)]
fn in_subnet(n: &NetConfig, addr: u32) -> bool {
    addr & n.mask == n.subnet
}

#[inline(always)]
fn is_multicast_or_bcast(addr: u32) -> bool {
    let b = addr.to_ne_bytes();
    b[0] >= 224 || addr == u32::MAX
}

/// A packet from a guest of NAT network `net_id`, addressed to the gateway
/// MAC: translate (existing flow, new masquerade flow, or a port forward
/// reached from inside), then route it.
#[inline(always)]
pub fn from_guest(ctx: &TcContext, net_id: u32, n: &NetConfig, ingress: u32) -> Nat {
    let Some(p) = packet(ctx) else {
        return fragment_from_guest(ctx, net_id, n);
    };
    if p.key.proto == IPPROTO_ICMP && p.icmp_type != ICMP_ECHO && p.icmp_type != ICMP_ECHOREPLY {
        if is_icmp_error(p.icmp_type) {
            return icmp_error_from_guest(ctx, &p, net_id, n);
        }
        return Nat::SKIP;
    }
    // One lookup for an established flow: the entry is translated from and
    // counted through the same pointer. Only this network's guests' side
    // of a flow: a guest forging the remote end of someone's flow (a reply
    // entry) to its gateway must not have it delivered.
    let mut entry = CT
        .get_ptr_mut(&p.key)
        .filter(|e| unsafe { (**e).net_id } == net_id && in_subnet(n, p.key.saddr));
    let existing = entry.map(|e| unsafe { (*e).rewrite });
    let (mut to, new_flow, fwd) = match existing {
        Some(r) => (r, false, false),
        None => {
            if in_subnet(n, p.key.daddr)
                || is_multicast_or_bcast(p.key.daddr)
                || !in_subnet(n, p.key.saddr)
            {
                return Nat::SKIP;
            }
            let mut to = CtKey {
                saddr: n.nat_ip,
                ..p.key
            };
            let mut fwd = false;
            if p.key.daddr == n.nat_ip && p.key.proto != IPPROTO_ICMP {
                // Hairpin: a guest reaching a port forward through the
                // uplink address.
                let fk = ForwardKey {
                    ifindex: n.uplink,
                    port: p.key.dport,
                    proto: p.key.proto,
                    _pad: 0,
                };
                match unsafe { FORWARDS.get(&fk) } {
                    Some(t) => {
                        to.daddr = t.addr;
                        to.dport = t.port;
                        fwd = true;
                    }
                    None => return Nat::SKIP,
                }
            }
            (to, true, fwd)
        }
    };
    if p.ttl <= 1 {
        return Nat::TO_HOST;
    }
    if new_flow && !fwd {
        // Into another NAT network: refused here, where it is counted
        // (the host's own rules would refuse it too).
        use aya_ebpf::maps::lpm_trie::Key;
        if maps::NAT_SUBNETS
            .get(Key::new(32, to.daddr))
            .is_some_and(|other| *other != net_id)
        {
            return Nat::refused(DropReason::ForeignNet);
        }
    }
    let Ok(egress) = fib_egress(ctx, &p, to.saddr, to.daddr, n.gw_host) else {
        // Unroutable or too big: the host answers with the ICMP error.
        return Nat::TO_HOST;
    };
    // A NAT network leaves by its uplink only (libvirt's FORWARD rules
    // accept `-o dev` and reject the rest): a destination the host routes
    // out of another interface gets neither the uplink's address nor the
    // guest's.
    if egress != n.uplink && maps::gw_host_net(egress).is_none() {
        return Nat::refused(DropReason::ForeignNet);
    }
    if new_flow && !fwd {
        // Into another kvnet network: only a routed one takes it.
        if let Some(other) = maps::gw_host_net(egress) {
            if other != net_id && maps::net(other).is_none_or(|o| o.flags & NET_F_CLOSED != 0) {
                return Nat::refused(DropReason::ForeignNet);
            }
        }
    }
    // Read, not reserved: two CPUs may each open one flow past the quota.
    let used = unsafe { CT_QUOTA.get(&ingress) }.copied().unwrap_or(0);
    if new_flow && n.ct_quota != 0 && used >= n.ct_quota {
        count(net_id, |s| s.drop_ct_quota += 1);
        return Nat::refused(DropReason::CtQuota);
    }
    let opened = if new_flow {
        let Some(o) = create(
            ctx,
            net_id,
            n,
            &p.key,
            &mut to,
            true,
            if fwd { CT_F_DNAT } else { 0 },
            ingress,
        ) else {
            return Nat::DROP;
        };
        entry = CT.get_ptr_mut(&p.key);
        Some(o)
    } else {
        None
    };
    // The flow counts against the quota of the CPU that created it only.
    if opened == Some(Opened::New) {
        quota_add(ingress);
        if !fwd {
            map_socket(net_id, n, &p.key, &to, ingress);
        }
    }
    if !apply(ctx, &p, &to) || !dec_ttl(ctx, p.ttl) {
        return Nat::DROP;
    }
    if let Some(e) = entry {
        touch(e, &p);
    }
    first_fragment_done(&p);
    count(net_id, |s| s.translated += 1);
    Nat::sent(
        unsafe { bpf_redirect_neigh(egress, core::ptr::null_mut(), 0, 0) } as i32,
        egress,
    )
}

/// The interface the FIB sends `daddr` out of (the neighbour is resolved on
/// the way out). Only the index is kept: the whole lookup is 64 bytes of a
/// stack the NAT path has little of.
#[inline(always)]
fn fib_egress(
    ctx: &TcContext,
    p: &Pkt,
    saddr: u32,
    daddr: u32,
    ifindex: u32,
) -> Result<u32, route::FibMiss> {
    fib(ctx, p, saddr, daddr, ifindex, FIB_SKIP_NEIGH).map(|f| f.ifindex)
}

/// Sends a translated packet arriving from outside on to its guest: via
/// the FIB to the network's gateway, then straight to the guest's port.
#[inline(always)]
fn to_guest(ctx: &TcContext, p: &Pkt, to: &CtKey, ingress: u32, net_id: u32) -> Nat {
    if p.ttl <= 1 || !dec_ttl(ctx, p.ttl) {
        return Nat::DROP;
    }
    let f = match fib(ctx, p, to.saddr, to.daddr, ingress, FIB_DIRECT) {
        Ok(f) => f,
        // Larger than the guest's network takes: the sender must learn so
        // (PMTUD through a port forward or a masquerade reply).
        Err(route::FibMiss::FragNeeded(mtu)) => return frag_needed(ctx, p, ingress, mtu, net_id),
        Err(route::FibMiss::Other) => {
            // Neighbour unresolved: the kernel resolves it on the way out.
            let Ok(f) = fib(
                ctx,
                p,
                to.saddr,
                to.daddr,
                ingress,
                FIB_DIRECT | FIB_SKIP_NEIGH,
            ) else {
                return Nat::DROP;
            };
            return Nat::sent(
                unsafe { bpf_redirect_neigh(f.ifindex, core::ptr::null_mut(), 0, 0) } as i32,
                f.ifindex,
            );
        }
    };
    let macs: [u8; 12] = {
        let mut m = [0u8; 12];
        m[..6].copy_from_slice(&f.dmac);
        m[6..].copy_from_slice(&f.smac);
        m
    };
    if ctx.store(0, &macs, 0).is_err() {
        return Nat::DROP;
    }
    let mut egress = f.ifindex;
    if let Some(net) = maps::gw_host_net(f.ifindex) {
        let vid = maps::net(net).map_or(0, |n| n.gw_vid);
        if let Some(port) = fdb::lookup(net, vid, f.dmac) {
            egress = port;
        }
    }
    Nat::sent(unsafe { bpf_redirect(egress, 0) } as i32, egress)
}

/// ICMP "fragmentation needed", type 3 code 4.
const ICMP_FRAG_NEEDED: u8 = 4;
/// The IPv4 header and 8 bytes an ICMP error quotes.
const QUOTE_LEN: usize = 28;
/// Where the quote lies in the error: past Ethernet, IPv4 and ICMP headers.
const QUOTE: usize = ETH_HLEN + 20 + 8;
const BPF_ADJ_ROOM_MAC: u32 = 1;

/// A packet from outside, already translated for its guest, is larger
/// than the guest's network takes (`mtu`). The host stack cannot answer
/// for it (the packet was addressed to the uplink itself), so kvnet turns
/// it, in place, into the ICMP "fragmentation needed" its sender needs,
/// quoting the packet as the sender sent it, and sends that back out of
/// the uplink. Without DF the packet is dropped (kvnet does not fragment).
#[inline(always)]
fn frag_needed(ctx: &TcContext, p: &Pkt, ingress: u32, mtu: u16, net_id: u32) -> Nat {
    let gso = unsafe { (*ctx.skb.skb).gso_size };
    if !p.df
        || !p.plain_header
        || gso != 0
        || (p.key.proto != IPPROTO_TCP && p.key.proto != IPPROTO_UDP)
    {
        return Nat::DROP;
    }
    // A spoofed sender could aim these at a victim: as few as the kernel's own.
    if !icmp_rate_allows() {
        count(net_id, |s| s.frag_needed_limited += 1);
        return Nat::DROP;
    }
    // Keep the quote (IPv4 header + 8 bytes) and open room for the new
    // IPv4 and ICMP headers in front of it.
    let skb = ctx.skb.skb as *mut _;
    if unsafe { bpf_skb_change_tail(skb, (ETH_HLEN + QUOTE_LEN) as u32, 0) } != 0
        || ctx
            .adjust_room((QUOTE - ETH_HLEN) as i32, BPF_ADJ_ROOM_MAC, 0)
            .is_err()
        || ctx.pull_data((QUOTE + QUOTE_LEN) as u32).is_err()
    {
        return Nat::DROP;
    }
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(f) = parse::ptr_at::<[u8; QUOTE + QUOTE_LEN]>(data, data_end, 0) else {
        return Nat::DROP;
    };
    let f = unsafe { &mut *(f as *mut [u8; QUOTE + QUOTE_LEN]) };
    // Back to where it came from: the MACs swap.
    for i in 0..6 {
        f.swap(i, i + 6);
    }
    // Undo the translation in the quote: the sender matches it against
    // what it sent (to the uplink's address and port). Its TTL is one less
    // and its L4 checksum the translated one; receivers check neither.
    f[QUOTE + 16..QUOTE + 20].copy_from_slice(&p.key.daddr.to_ne_bytes());
    f[QUOTE + 22..QUOTE + 24].copy_from_slice(&p.key.dport.to_be_bytes());
    f[QUOTE + 10] = 0;
    f[QUOTE + 11] = 0;
    let q = !crate::csum::fold(sum_words(&f[QUOTE..QUOTE + 20]));
    f[QUOTE + 10..QUOTE + 12].copy_from_slice(&q.to_be_bytes());
    let ip = ETH_HLEN;
    f[ip..ip + 20].fill(0);
    f[ip] = 0x45;
    f[ip + 2..ip + 4].copy_from_slice(&((20 + 8 + QUOTE_LEN) as u16).to_be_bytes());
    f[ip + 8] = 64;
    f[ip + 9] = IPPROTO_ICMP;
    f[ip + 12..ip + 16].copy_from_slice(&p.key.daddr.to_ne_bytes());
    f[ip + 16..ip + 20].copy_from_slice(&p.key.saddr.to_ne_bytes());
    let c = !crate::csum::fold(sum_words(&f[ip..ip + 20]));
    f[ip + 10..ip + 12].copy_from_slice(&c.to_be_bytes());
    let icmp = ip + 20;
    f[icmp..QUOTE].fill(0);
    f[icmp] = ICMP_DEST_UNREACH;
    f[icmp + 1] = ICMP_FRAG_NEEDED;
    f[icmp + 6..icmp + 8].copy_from_slice(&mtu.to_be_bytes());
    let c = !crate::csum::fold(sum_words(&f[icmp..]));
    f[icmp + 2..icmp + 4].copy_from_slice(&c.to_be_bytes());
    count(net_id, |s| s.frag_needed_sent += 1);
    Nat::sent(unsafe { bpf_redirect(ingress, 0) } as i32, ingress)
}

/// Takes a token of the ICMP errors kvnet sends itself (map `icmp_rate`,
/// shared by every CPU: a lost update costs a token, never a limit).
#[inline(always)]
pub(crate) fn icmp_rate_allows() -> bool {
    let Some(b) = maps::ICMP_RATE.get_ptr_mut(0) else {
        return false;
    };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (tokens, last) =
        unsafe { kvnet_common::refill((*b).tokens, (*b).last_ns, now, kvnet_common::ICMP_RATE) };
    if tokens == 0 {
        return false;
    }
    unsafe {
        (*b).tokens = tokens - 1;
        (*b).last_ns = last;
    }
    true
}

/// The one's-complement sum of big-endian 16-bit words (even length).
#[inline(always)]
fn sum_words(b: &[u8]) -> u64 {
    let mut sum = 0u64;
    for w in b.chunks_exact(2) {
        sum += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    sum
}

/// A packet arriving on a NAT uplink: replies of translated flows, new
/// flows to port forwards, and ICMP errors about translated flows.
#[inline(always)]
pub fn from_uplink(ctx: &TcContext, ingress: u32) -> Nat {
    let Some(p) = packet(ctx) else {
        return fragment_from_uplink(ctx, ingress);
    };
    if p.key.proto == IPPROTO_ICMP && is_icmp_error(p.icmp_type) {
        return icmp_error(ctx, &p, ingress);
    }
    // The outside's side of flows only: a masquerade flow's original
    // (guest-side) entry is never matched from the uplink.
    let mut entry = CT.get_ptr_mut(&p.key).filter(|e| {
        let flags = unsafe { (**e).flags };
        flags & CT_F_ORIGINAL == 0 || flags & CT_F_DNAT != 0
    });
    let mut to = match entry {
        Some(e) => unsafe { (*e).rewrite },
        None => {
            if p.key.proto == IPPROTO_ICMP {
                return Nat::SKIP;
            }
            let (net_id, mut to, guest_port) = match opening(&p, ingress) {
                Ok(o) => o,
                Err(nat) => return nat,
            };
            let Some(n) = maps::net(net_id) else {
                return Nat::SKIP;
            };
            let Some(opened) = create(
                ctx, net_id, &n, &p.key, &mut to, false, CT_F_DNAT, guest_port,
            ) else {
                return Nat::DROP;
            };
            if guest_port != 0 && opened == Opened::New {
                quota_add(guest_port);
                count(net_id, |s| s.eif_flows += 1);
            }
            entry = CT.get_ptr_mut(&p.key);
            to
        }
    };
    if !apply(ctx, &p, &to) {
        return Nat::DROP;
    }
    let mut net_id = 0;
    if let Some(e) = entry {
        touch(e, &p);
        net_id = unsafe { (*e).net_id };
        first_fragment_done(&p);
        count(net_id, |s| s.translated += 1);
    }
    to.proto = p.key.proto;
    to_guest(ctx, &p, &to, ingress, net_id)
}

/// Who a new flow from outside opens to: a port forward's target, or a
/// guest socket's endpoint-independent UDP mapping (filtering is
/// endpoint-independent too: anyone may answer a STUN-discovered address).
/// (net id, translation, the guest port whose quota the flow counts
/// against: 0 for forwards, which have a rate instead.)
#[inline(always)]
fn opening(p: &Pkt, ingress: u32) -> Result<(u32, CtKey, u32), Nat> {
    let fk = ForwardKey {
        ifindex: ingress,
        port: p.key.dport,
        proto: p.key.proto,
        _pad: 0,
    };
    if let Some(fwd) = FORWARDS.get_ptr_mut(&fk) {
        let t = unsafe { *fwd };
        if maps::net(t.net_id).is_none_or(|n| p.key.daddr != n.nat_ip) {
            return Err(Nat::SKIP);
        }
        if t.rate != 0 {
            // Spoofed first packets from anywhere must not fill the table.
            let now = unsafe { bpf_ktime_get_coarse_ns() };
            let (tokens, last) = kvnet_common::refill(t.tokens, t.last_ns, now, t.rate);
            if tokens == 0 {
                count(t.net_id, |s| s.drop_forward_rate += 1);
                return Err(Nat::DROP);
            }
            unsafe {
                (*fwd).tokens = tokens - 1;
                (*fwd).last_ns = last;
            }
        }
        let to = CtKey {
            daddr: t.addr,
            dport: t.port,
            ..p.key
        };
        return Ok((t.net_id, to, 0));
    }
    if p.key.proto != IPPROTO_UDP {
        return Err(Nat::SKIP);
    }
    let key = NatMapKey {
        addr: p.key.daddr,
        port: p.key.dport,
        proto: IPPROTO_UDP,
        side: MAP_SIDE_UPLINK,
    };
    let Some(m) = (unsafe { NAT_MAPPINGS.get(&key) }).copied() else {
        return Err(Nat::SKIP);
    };
    let Some(n) = maps::net(m.net_id) else {
        return Err(Nat::SKIP);
    };
    if n.flags & NET_F_NAT_UDP_EIM == 0 || n.nat_ip != p.key.daddr || n.uplink != ingress {
        return Err(Nat::SKIP);
    }
    // So no remote can fill the table through one guest's mapping.
    let used = unsafe { CT_QUOTA.get(&m.guest_port) }.copied().unwrap_or(0);
    if n.ct_quota != 0 && used >= n.ct_quota {
        count(m.net_id, |s| s.drop_ct_quota += 1);
        return Err(Nat::DROP);
    }
    let to = CtKey {
        daddr: m.addr,
        dport: m.port,
        ..p.key
    };
    Ok((m.net_id, to, m.guest_port))
}

/// RFC 1624 incremental update of a checksum for a 32-bit field change.
#[inline(always)]
fn csum_update32(csum: u16, old: u32, new: u32) -> u16 {
    let mut sum = (!u16::from_be(csum)) as u32;
    let (o, nw) = (u32::from_be(old), u32::from_be(new));
    sum += (!(o >> 16) & 0xffff) + (!o & 0xffff) + (nw >> 16) + (nw & 0xffff);
    (!crate::csum::fold(sum as u64)).to_be()
}

/// An ICMP error about a translated flow: the embedded header is our
/// translated packet; put the guest's address and port back in it and in
/// the outer destination, so traceroute and PMTUD work from guests.
#[inline(always)]
fn icmp_error(ctx: &TcContext, p: &Pkt, ingress: u32) -> Nat {
    let eip = p.l4() + 8;
    let Some(embedded) = parse::ipv4_skb(ctx, eip) else {
        return Nat::SKIP;
    };
    let el4 = eip + embedded.hlen;
    let (eproto, esaddr, edaddr) = (embedded.proto, embedded.saddr, embedded.daddr);
    // The embedded packet as we sent it: (nat, remote, nport, rport).
    let mut sent = CtKey {
        saddr: esaddr,
        daddr: edaddr,
        proto: eproto,
        ..Default::default()
    };
    let port_off;
    match eproto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let (Some(s), Some(d)) = (load::<u16>(ctx, el4), load::<u16>(ctx, el4 + 2)) else {
                return Nat::SKIP;
            };
            sent.sport = u16::from_be(s);
            sent.dport = u16::from_be(d);
            port_off = el4;
        }
        IPPROTO_ICMP => {
            let Some(id) = load::<u16>(ctx, el4 + 4) else {
                return Nat::SKIP;
            };
            sent.sport = u16::from_be(id);
            port_off = el4 + 4;
        }
        _ => return Nat::SKIP,
    }
    let Some(e) = (unsafe { CT.get(&sent.reply()) }).copied() else {
        return Nat::SKIP;
    };
    // e.rewrite = (remote, guest, rport, gport): the guest is its dest.
    let (guest, gport) = (e.rewrite.daddr, e.rewrite.dport);
    let icmp_csum = p.l4() + 2;
    // Outer destination (IP header checksum only: ICMP's does not cover it).
    if ctx.store(L3 + 16, &guest, 0).is_err()
        || ctx
            .l3_csum_replace(L3 + 10, p.key.daddr as u64, guest as u64, 4)
            .is_err()
    {
        return Nat::DROP;
    }
    // Embedded source address and its header checksum.
    let Some(ecsum) = load::<u16>(ctx, eip + 10) else {
        return Nat::DROP;
    };
    let new_ecsum = csum_update32(ecsum, esaddr, guest);
    let old_port = sent.sport.to_be();
    let new_port = gport.to_be();
    if ctx.store(eip + 12, &guest, 0).is_err()
        || ctx
            .l4_csum_replace(icmp_csum, esaddr as u64, guest as u64, 4)
            .is_err()
        || ctx.store(eip + 10, &new_ecsum, 0).is_err()
        || ctx
            .l4_csum_replace(icmp_csum, ecsum as u64, new_ecsum as u64, 2)
            .is_err()
        || ctx.store(port_off, &new_port, 0).is_err()
        || ctx
            .l4_csum_replace(icmp_csum, old_port as u64, new_port as u64, 2)
            .is_err()
    {
        return Nat::DROP;
    }
    count(e.net_id, |s| s.icmp_errors += 1);
    let to = CtKey {
        saddr: p.key.saddr,
        daddr: guest,
        proto: IPPROTO_ICMP,
        ..Default::default()
    };
    to_guest(ctx, p, &to, ingress, e.net_id)
}

#[inline(always)]
fn is_icmp_error(icmp_type: u8) -> bool {
    matches!(
        icmp_type,
        ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETERPROB
    )
}

/// An ICMP error a guest sends about a TCP/UDP packet it received on a
/// translated flow (port unreachable to a port forward's client, say): the
/// embedded header is that packet as translated for the guest. Put the
/// uplink's address and port back in it and in the outer source, then
/// route it out. Only about packets to the sender itself, on a flow of its
/// own network: a guest cannot send errors about a neighbour's flows.
#[inline(always)]
fn icmp_error_from_guest(ctx: &TcContext, p: &Pkt, net_id: u32, n: &NetConfig) -> Nat {
    let eip = p.l4() + 8;
    let Some(embedded) = parse::ipv4_skb(ctx, eip) else {
        return Nat::SKIP;
    };
    let guest = p.key.saddr;
    if embedded.daddr != guest || (embedded.proto != IPPROTO_TCP && embedded.proto != IPPROTO_UDP) {
        return Nat::SKIP;
    }
    let el4 = eip + embedded.hlen;
    let (Some(sport), Some(dport)) = (load::<u16>(ctx, el4), load::<u16>(ctx, el4 + 2)) else {
        return Nat::SKIP;
    };
    let received = CtKey {
        saddr: embedded.saddr,
        daddr: guest,
        sport: u16::from_be(sport),
        dport: u16::from_be(dport),
        proto: embedded.proto,
        ..Default::default()
    };
    // The guest's side of that flow: what its packets to the remote become.
    let Some(e) = (unsafe { CT.get(&received.reply()) }).copied() else {
        return Nat::SKIP;
    };
    if e.net_id != net_id {
        return Nat::SKIP;
    }
    let (nat, nport) = (e.rewrite.saddr, e.rewrite.sport.to_be());
    if p.ttl <= 1 {
        return Nat::TO_HOST;
    }
    let Ok(egress) = fib_egress(ctx, p, nat, p.key.daddr, n.gw_host) else {
        return Nat::TO_HOST;
    };
    if egress != n.uplink {
        return Nat::refused(DropReason::ForeignNet);
    }
    let icmp_csum = p.l4() + 2;
    let Some(ecsum) = load::<u16>(ctx, eip + 10) else {
        return Nat::DROP;
    };
    let new_ecsum = csum_update32(ecsum, guest, nat);
    // Outer source (the IP header checksum only: ICMP's does not cover it),
    // then the embedded destination, its header checksum and port.
    if ctx.store(L3 + 12, &nat, 0).is_err()
        || ctx
            .l3_csum_replace(L3 + 10, guest as u64, nat as u64, 4)
            .is_err()
        || ctx.store(eip + 16, &nat, 0).is_err()
        || ctx
            .l4_csum_replace(icmp_csum, guest as u64, nat as u64, 4)
            .is_err()
        || ctx.store(eip + 10, &new_ecsum, 0).is_err()
        || ctx
            .l4_csum_replace(icmp_csum, ecsum as u64, new_ecsum as u64, 2)
            .is_err()
        || ctx.store(el4 + 2, &nport, 0).is_err()
        || ctx
            .l4_csum_replace(icmp_csum, dport as u64, nport as u64, 2)
            .is_err()
        || !dec_ttl(ctx, p.ttl)
    {
        return Nat::DROP;
    }
    count(net_id, |s| s.icmp_errors += 1);
    Nat::sent(
        unsafe { bpf_redirect_neigh(egress, core::ptr::null_mut(), 0, 0) } as i32,
        egress,
    )
}

/// tc egress on a NAT uplink: drops IPv4 whose source is a NAT network's
/// guest subnet (it escaped translation through the host stack), counted.
#[inline(always)]
pub fn guard_uplink(ctx: &TcContext) -> i32 {
    use aya_ebpf::{
        bindings::{TC_ACT_OK, TC_ACT_SHOT},
        maps::lpm_trie::Key,
    };
    if unsafe { (*ctx.skb.skb).protocol } != (0x0800u16).to_be() as u32 {
        return TC_ACT_OK;
    }
    let Some(ip) = parse::ipv4_skb(ctx, L3) else {
        return TC_ACT_OK;
    };
    match maps::NAT_SUBNETS.get(Key::new(32, ip.saddr)) {
        Some(net_id) => {
            let net_id = *net_id;
            count(net_id, |s| s.drop_untranslated += 1);
            TC_ACT_SHOT
        }
        None => TC_ACT_OK,
    }
}
