//! NAT66 masquerade (`--nat6`): a NAT network's guests' IPv6 leaves with the
//! uplink's global IPv6 address, TCP/UDP ports from the network's NAT range
//! and ICMPv6 echo by identifier; replies, port forwards (map `forwards6`)
//! and ICMPv6 errors about translated flows come back. The IPv4 NAT's
//! design (nat.rs: two entries a flow, a port reserved by the BPF_NOEXIST
//! insert of the reply's entry) over its own maps (`ct6`, `nat6_nets`,
//! `nat6_subnets`), tc only.
//!
//! Headers are read and written in place: one pull makes the IPv6 header,
//! the L4 header and an ICMPv6 error's quote linear, then pointers. IPv6
//! has no header checksum; TCP's, UDP's and ICMPv6's cover the addresses
//! (pseudo-header), fixed with one incremental update per kind of change.
use aya_ebpf::{
    bindings::{bpf_sock_tuple, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{
        bpf_get_prandom_u32, bpf_ktime_get_coarse_ns, bpf_redirect, bpf_redirect_neigh,
        bpf_sk_lookup_tcp, bpf_sk_lookup_udp, bpf_sk_release,
    },
    macros::map,
    maps::{lpm_trie::Key, PerCpuArray},
    programs::TcContext,
};
use kvnet_common::{
    Addr6, Ct6Entry, Ct6Key, DropReason, ForwardKey, NetConfig, CT_F_DNAT, CT_F_ORIGINAL,
    ETH_P_IPV6, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, NET_F_CLOSED,
};

use crate::{
    csum::fold,
    fdb,
    maps::{self, CT6, CT6_SCRATCH, CT_QUOTA, FORWARDS6, NAT6_NETS, NAT6_PROG, NAT6_SUBNETS},
    nat::{
        count, quota_add, tcp_track, Nat, Opened, PortRange, CURRENT_NETNS, EEXIST, FIB_DIRECT,
        FIB_SKIP_NEIGH, F_MARK_MANGLED_0, F_PSEUDO_HDR, PORT_TRIES,
    },
    parse::{ptr_at, ETH_HLEN},
    route::{self, Fib6Query, FibMiss},
};

const L3: usize = ETH_HLEN;
/// No extension headers: anything else is left to the host stack (whose
/// forwarding the uplink's egress guard then stops).
const L4: usize = L3 + 40;
/// What one pull makes linear and writable: IPv6, ICMPv6 and the quoted
/// IPv6 header with 8 bytes of its L4 (an error's), which also covers the
/// TCP header up to its flags.
const PULL: u32 = (L4 + 8 + 40 + 8) as u32;
const ICMP6_DEST_UNREACH: u8 = 1;
const ICMP6_PKT_TOO_BIG: u8 = 2;
const ICMP6_TIME_EXCEEDED: u8 = 3;
const ICMP6_PARAM_PROB: u8 = 4;
const ICMP6_ECHO_REQUEST: u8 = 128;
const ICMP6_ECHO_REPLY: u8 = 129;

/// NAT66's working memory, one per CPU (map `nat6_scratch`): the program's
/// 512-byte stack holds neither its tuples nor the FIB's argument.
pub struct Scratch {
    p: Pkt6,
    /// The tuple the packet leaves with.
    to: Ct6Key,
    /// A reply tuple, a quoted one: keys built for a lookup.
    key: Ct6Key,
    lpm: Key<Addr6>,
    fib: Fib6Query,
    /// struct bpf_sock_tuple.ipv6.
    tuple: [u32; 9],
}

/// NAT66's working memory (one per CPU, not pinned).
#[map(name = "nat6_scratch")]
pub static NAT6_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

/// An IPv6 packet NAT66 may translate.
pub struct Pkt6 {
    key: Ct6Key,
    hop: u8,
    /// The IPv6 header and payload (host order): what flows count.
    len: u16,
    /// What the egress MTU is checked against (one segment's, GSO).
    mtu_len: u16,
    icmp_type: u8,
    tcp_flags: u8,
    seq: u32,
    seq_next: u32,
}

/// Hands a packet to the NAT66 program (map `nat6_prog`), which then
/// finishes it: a tail call, so NAT66 has a stack and a verifier budget of
/// its own, apart from the main program's. The packet's direction rides in
/// the skb's control block: `net_id` (0: from the uplink) and the ingress
/// port. Returns only if the program is missing.
#[inline(always)]
pub fn tail_call(ctx: &TcContext, net_id: u32, ingress: u32) {
    unsafe {
        (*ctx.skb.skb).cb[0] = net_id;
        (*ctx.skb.skb).cb[1] = ingress;
        NAT6_PROG.tail_call(ctx, 0);
    }
}

/// IPv6 by the skb's protocol (any VLAN tag already out of the packet).
#[inline(always)]
pub fn is_ipv6(ctx: &TcContext) -> bool {
    let proto = unsafe { (*ctx.skb.skb).protocol };
    proto == ETH_P_IPV6.to_be() as u32
}

/// The 16 bytes at `off` as four network-order words.
#[inline(always)]
fn addr_at(h: &[u8], off: usize) -> Addr6 {
    let w = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    [w(off), w(off + 4), w(off + 8), w(off + 12)]
}

#[inline(always)]
fn eq6(a: &Addr6, b: &Addr6) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Global unicast: not multicast (ff00::/8), link-local (fe80::/10),
/// loopback or unspecified: the only destinations worth translating.
#[inline(always)]
fn is_global(a: &Addr6) -> bool {
    let b = a[0].to_ne_bytes();
    let zero_head = a[0] == 0 && a[1] == 0 && a[2] == 0;
    b[0] != 0xff && !(b[0] == 0xfe && b[1] & 0xc0 == 0x80) && !zero_head
}

/// The NAT66 network whose guest prefix holds `a`.
#[inline(always)]
fn subnet_of(lpm: &mut Key<Addr6>, a: &Addr6) -> Option<u32> {
    lpm.prefix_len = 128;
    lpm.data = *a;
    NAT6_SUBNETS.get(lpm).copied()
}

/// Pulls the headers linear, then parses IPv6 TCP/UDP/ICMPv6 at L3 (no
/// extension headers) into `p`. False: not NAT66's.
#[inline(always)]
fn packet(ctx: &TcContext, p: &mut Pkt6) -> bool {
    let skb_len = ctx.len();
    let _ = ctx.pull_data(skb_len.min(PULL));
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(h) = ptr_at::<[u8; 40]>(data, data_end, L3) else {
        return false;
    };
    let h = unsafe { &*h };
    if h[0] >> 4 != 6 {
        return false;
    }
    let proto = h[6];
    let payload = u16::from_be_bytes([h[4], h[5]]);
    p.key.saddr = addr_at(h, 8);
    p.key.daddr = addr_at(h, 24);
    p.key.proto = proto;
    p.key.sport = 0;
    p.key.dport = 0;
    p.key._pad = [0; 3];
    p.hop = h[7];
    p.len = 40u16.saturating_add(payload);
    p.icmp_type = 0;
    p.tcp_flags = 0;
    p.seq = 0;
    p.seq_next = 0;
    let mut l4_hdr: u32 = 8;
    match proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            let Some(l) = ptr_at::<[u8; 4]>(data, data_end, L4) else {
                return false;
            };
            let l = unsafe { &*l };
            p.key.sport = u16::from_be_bytes([l[0], l[1]]);
            p.key.dport = u16::from_be_bytes([l[2], l[3]]);
            if proto == IPPROTO_TCP {
                let Some(t) = ptr_at::<[u8; 14]>(data, data_end, L4) else {
                    return false;
                };
                let t = unsafe { &*t };
                let flags = t[13];
                let seq = u32::from_be_bytes([t[4], t[5], t[6], t[7]]);
                l4_hdr = ((t[12] >> 4) as u32) * 4;
                // SYN and FIN take a sequence number each.
                let control = (flags & 0x01 != 0) as u32 + (flags & 0x02 != 0) as u32;
                p.tcp_flags = flags;
                p.seq = seq;
                p.seq_next = seq
                    .wrapping_add((payload as u32).saturating_sub(l4_hdr))
                    .wrapping_add(control);
            }
        }
        IPPROTO_ICMPV6 => {
            let Some(i) = ptr_at::<[u8; 6]>(data, data_end, L4) else {
                return false;
            };
            let i = unsafe { &*i };
            p.icmp_type = i[0];
            let id = u16::from_be_bytes([i[4], i[5]]);
            match i[0] {
                ICMP6_ECHO_REQUEST => p.key.sport = id,
                ICMP6_ECHO_REPLY => p.key.dport = id,
                _ => {}
            }
        }
        _ => return false,
    }
    let gso = unsafe { (*ctx.skb.skb).gso_size } as u32;
    p.mtu_len = if gso == 0 {
        (40 + payload as u32)
            .max(skb_len.saturating_sub(L3 as u32))
            .min(u16::MAX as u32)
    } else {
        (40 + l4_hdr + gso).min(u16::MAX as u32)
    } as u16;
    true
}

/// Writes `new` over the address at `p` (16 bytes): the checksum
/// difference, a one's-complement sum of memory-order words.
#[inline(always)]
fn put_addr(p: *mut u8, old: &Addr6, new: &Addr6) -> u64 {
    let mut sum = 0u64;
    for i in 0..4 {
        let (o, n) = (old[i], new[i]);
        unsafe { core::ptr::write_unaligned(p.add(4 * i) as *mut [u8; 4], n.to_ne_bytes()) };
        sum += (!o & 0xffff) as u64 + (!(o >> 16) & 0xffff) as u64;
        sum += (n & 0xffff) as u64 + (n >> 16) as u64;
    }
    sum
}

/// Writes port (or echo identifier) `new` over `old` at `p`; its checksum
/// difference.
#[inline(always)]
fn put_port(p: *mut u8, old: u16, new: u16) -> u64 {
    unsafe { core::ptr::write_unaligned(p as *mut [u8; 2], new.to_be_bytes()) };
    (!old.to_be()) as u64 + new.to_be() as u64
}

#[inline(always)]
fn l4_csum_off(proto: u8) -> usize {
    match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => 2,
    }
}

/// Rewrites addresses and ports from `p.key` to `to` and takes one off
/// the hop limit; then the L4 checksum: the addresses' change as a
/// pseudo-header one (right for checksum-offloaded packets too), the
/// ports' as payload.
#[inline(always)]
fn apply(ctx: &TcContext, p: &Pkt6, to: &Ct6Key) -> bool {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(h) = ptr_at::<[u8; 48]>(data, data_end, L3) else {
        return false;
    };
    let h = h as *mut u8;
    let proto = p.key.proto;
    let pseudo = unsafe {
        *h.add(7) = p.hop - 1;
        put_addr(h.add(8), &p.key.saddr, &to.saddr) + put_addr(h.add(24), &p.key.daddr, &to.daddr)
    };
    let ports = unsafe {
        if proto == IPPROTO_ICMPV6 {
            if p.icmp_type == ICMP6_ECHO_REQUEST {
                put_port(h.add(44), p.key.sport, to.sport)
            } else {
                put_port(h.add(44), p.key.dport, to.dport)
            }
        } else {
            put_port(h.add(40), p.key.sport, to.sport) + put_port(h.add(42), p.key.dport, to.dport)
        }
    };
    let csum = L4 + l4_csum_off(proto);
    let mangled0 = if proto == IPPROTO_UDP {
        F_MARK_MANGLED_0
    } else {
        0
    };
    ctx.l4_csum_replace(csum, 0, fold(pseudo) as u64, F_PSEUDO_HDR | mangled0)
        .is_ok()
        && ctx
            .l4_csum_replace(csum, 0, fold(ports) as u64, mangled0)
            .is_ok()
}

/// Counts a packet on its flow's entry, and TCP's flags and sequence.
#[inline(always)]
fn touch(e: *mut Ct6Entry, p: &Pkt6) {
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    unsafe {
        (*e).packets += 1;
        (*e).bytes += p.len as u64;
        if now.wrapping_sub((*e).last_seen_ns) > 1_000_000_000 {
            (*e).last_seen_ns = now;
        }
        if p.key.proto == IPPROTO_TCP {
            tcp_track(
                &mut (*e).flags,
                &mut (*e).seq_end,
                (*e).net_id,
                p.tcp_flags,
                p.seq,
                p.seq_next,
            );
        }
    }
}

/// `k` seen from the other end, into `out`.
#[inline(always)]
fn reply_into(k: &Ct6Key, out: &mut Ct6Key) {
    out.saddr = k.daddr;
    out.daddr = k.saddr;
    out.sport = k.dport;
    out.dport = k.sport;
    out.proto = k.proto;
    out._pad = [0; 3];
}

/// A port the uplink's IPv6 address serves: an IPv6 forward's, or a host
/// socket's that the reply of `to` from `port` would reach.
#[inline(always)]
fn port_in_use(
    ctx: &TcContext,
    n: &NetConfig,
    to: &Ct6Key,
    port: u16,
    tuple: &mut [u32; 9],
) -> bool {
    let fwd = ForwardKey {
        ifindex: n.uplink,
        port,
        proto: to.proto,
        _pad: 0,
    };
    if unsafe { FORWARDS6.get(&fwd) }.is_some() {
        return true;
    }
    if to.proto != IPPROTO_TCP && to.proto != IPPROTO_UDP {
        return false;
    }
    // struct bpf_sock_tuple.ipv6, seen from the reply: remote -> us.
    tuple[..4].copy_from_slice(&to.daddr);
    tuple[4..8].copy_from_slice(&to.saddr);
    let (r, l) = (to.dport.to_be_bytes(), port.to_be_bytes());
    tuple[8] = u32::from_ne_bytes([r[0], r[1], l[0], l[1]]);
    let skb = ctx.skb.skb as *mut core::ffi::c_void;
    let t = tuple.as_mut_ptr() as *mut bpf_sock_tuple;
    let sk = unsafe {
        if to.proto == IPPROTO_TCP {
            bpf_sk_lookup_tcp(skb, t, 36, CURRENT_NETNS, 0)
        } else {
            bpf_sk_lookup_udp(skb, t, 36, CURRENT_NETNS, 0)
        }
    };
    if sk.is_null() {
        return false;
    }
    unsafe { bpf_sk_release(sk as *mut _) };
    true
}

/// Creates both entries of the flow `sc.p.key` -> `sc.to` (nat.rs's
/// `create`, for `ct6`; no endpoint-independent mappings). For SNAT
/// (`alloc`) the source port of `sc.to` is chosen here. None: refused
/// (counted).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn create(
    ctx: &TcContext,
    sc: &mut Scratch,
    net_id: u32,
    n: &NetConfig,
    alloc: bool,
    flags: u32,
    port: u32,
) -> Option<Opened> {
    let Scratch {
        p, to, key, tuple, ..
    } = sc;
    let orig = &p.key;
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let rev = CT6_SCRATCH.get_ptr_mut(0)?;
    let rev = unsafe { &mut *rev };
    reply_into(orig, &mut rev.rewrite);
    rev.net_id = net_id;
    rev.flags = flags;
    rev.port = port;
    rev.seq_end = 0;
    rev.created_ns = now;
    rev.last_seen_ns = now;
    rev.packets = 0;
    rev.bytes = 0;
    if alloc {
        let range = PortRange::of(n);
        let start = unsafe { bpf_get_prandom_u32() };
        let mut found = false;
        let mut full = false;
        for i in 0..PORT_TRIES {
            // The guest's own port first, when the range has it.
            let port = if i == 0 && range.contains(orig.sport) {
                orig.sport
            } else {
                let Some(p) = range.pick(start.wrapping_add(i.wrapping_mul(7919))) else {
                    break;
                };
                p
            };
            if port_in_use(ctx, n, to, port, tuple) {
                continue;
            }
            to.sport = port;
            reply_into(to, key);
            match CT6.insert(&*key, &*rev, BPF_NOEXIST as u64) {
                Ok(()) => {
                    found = true;
                    break;
                }
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
    } else {
        reply_into(to, key);
        if let Err(e) = CT6.insert(&*key, &*rev, BPF_NOEXIST as u64) {
            // A forward's reply tuple is fixed: another CPU opening this
            // very flow made it.
            if e == EEXIST
                && unsafe { CT6.get(&*key) }.is_some_and(|r| {
                    eq6(&r.rewrite.daddr, &orig.saddr) && r.rewrite.dport == orig.sport
                })
            {
                return Some(Opened::Joined);
            }
            count(net_id, |s| s.drop_table_full += 1);
            return None;
        }
    }
    rev.rewrite = *to;
    rev.flags = flags | CT_F_ORIGINAL;
    if let Err(e) = CT6.insert(orig, &*rev, BPF_NOEXIST as u64) {
        let _ = CT6.remove(&*key);
        if e == EEXIST {
            // Another CPU won the race for this flow: use its entry.
            if let Some(w) = unsafe { CT6.get(orig) }.filter(|w| w.flags & CT_F_ORIGINAL != 0) {
                *to = w.rewrite;
                return Some(Opened::Joined);
            }
        }
        count(net_id, |s| s.drop_table_full += 1);
        return None;
    }
    count(net_id, |s| s.new_flows += 1);
    Some(Opened::New)
}

/// An IPv6 packet from a guest of NAT66 network `net_id` to its gateway's
/// MAC: translate (an existing flow or a new masquerade flow) and route it
/// out. Skip: the host's (neighbour discovery, link-local, its own
/// network, extension headers); ToHost: the host answers (hop limit,
/// unroutable, too big: ICMPv6 errors from the gateway).
#[inline(always)]
pub fn from_guest(
    ctx: &TcContext,
    sc: &mut Scratch,
    net_id: u32,
    n: &NetConfig,
    ingress: u32,
) -> Nat {
    let Some(cfg) = (unsafe { NAT6_NETS.get(&net_id) }) else {
        return Nat::SKIP;
    };
    if !packet(ctx, &mut sc.p) {
        return Nat::SKIP;
    }
    let p = &sc.p;
    if p.key.proto == IPPROTO_ICMPV6
        && p.icmp_type != ICMP6_ECHO_REQUEST
        && p.icmp_type != ICMP6_ECHO_REPLY
    {
        return Nat::SKIP;
    }
    // Only this network's guests' prefixes: a guest forging the remote end
    // of a flow (its reply entry) gets nothing delivered.
    if !is_global(&p.key.daddr) || subnet_of(&mut sc.lpm, &sc.p.key.saddr) != Some(net_id) {
        return Nat::SKIP;
    }
    let mut entry = CT6
        .get_ptr_mut(&sc.p.key)
        .filter(|e| unsafe { (**e).net_id } == net_id);
    let new_flow = entry.is_none();
    match entry {
        Some(e) => {
            // Only the port that opened a flow sends on it: a neighbour
            // that spoofs a guest's address cannot ride its mapping.
            let owner = unsafe { (*e).port };
            if owner != 0 && owner != ingress {
                return Nat::refused(DropReason::IpSpoof);
            }
            sc.to = unsafe { (*e).rewrite };
        }
        None => {
            match subnet_of(&mut sc.lpm, &sc.p.key.daddr) {
                Some(other) if other == net_id => return Nat::SKIP,
                Some(_) => return Nat::refused(DropReason::ForeignNet),
                None => {}
            }
            if eq6(&sc.p.key.daddr, &cfg.nat_ip) {
                // The host's own address (no IPv6 hairpin to forwards).
                return Nat::SKIP;
            }
            sc.to = sc.p.key;
            sc.to.saddr = cfg.nat_ip;
        }
    }
    if sc.p.hop <= 1 {
        return Nat::TO_HOST;
    }
    sc.fib = Fib6Query {
        proto: sc.p.key.proto,
        saddr: sc.to.saddr,
        daddr: sc.to.daddr,
        mtu_len: sc.p.mtu_len,
        ifindex: n.gw_host,
        flags: FIB_SKIP_NEIGH,
    };
    let Ok(egress) = route::fib_v6(ctx.skb.skb as *mut _, &sc.fib).map(|f| f.ifindex) else {
        // Unroutable or too big: the host answers with the ICMPv6 error.
        return Nat::TO_HOST;
    };
    // Out of the uplink, or into a kvnet network that takes routed flows.
    if egress != n.uplink {
        let into = maps::gw_host_net(egress);
        let open = into.is_some_and(|o| {
            o == net_id || !new_flow || maps::net(o).is_some_and(|c| c.flags & NET_F_CLOSED == 0)
        });
        if !open {
            return Nat::refused(DropReason::ForeignNet);
        }
    }
    if new_flow {
        // The guest's quota counts its IPv4 and IPv6 flows together.
        let used = unsafe { CT_QUOTA.get(&ingress) }.copied().unwrap_or(0);
        if n.ct_quota != 0 && used >= n.ct_quota {
            count(net_id, |s| s.drop_ct_quota += 1);
            return Nat::refused(DropReason::CtQuota);
        }
        let Some(opened) = create(ctx, sc, net_id, n, true, 0, ingress) else {
            return Nat::DROP;
        };
        if opened == Opened::New {
            quota_add(ingress);
        }
        entry = CT6.get_ptr_mut(&sc.p.key);
    }
    if !apply(ctx, &sc.p, &sc.to) {
        return Nat::DROP;
    }
    if let Some(e) = entry {
        touch(e, &sc.p);
    }
    count(net_id, |s| s.translated += 1);
    Nat::sent(
        unsafe { bpf_redirect_neigh(egress, core::ptr::null_mut(), 0, 0) } as i32,
        egress,
    )
}

/// An IPv6 packet arriving on a NAT uplink, to this host: replies of
/// translated flows, new flows to IPv6 port forwards, ICMPv6 errors about
/// translated flows. Skip: not NAT66's (the host's own, routed networks').
#[inline(always)]
pub fn from_uplink(ctx: &TcContext, sc: &mut Scratch, ingress: u32) -> Nat {
    if !packet(ctx, &mut sc.p) {
        return Nat::SKIP;
    }
    if sc.p.key.proto == IPPROTO_ICMPV6 {
        if matches!(
            sc.p.icmp_type,
            ICMP6_DEST_UNREACH | ICMP6_PKT_TOO_BIG | ICMP6_TIME_EXCEEDED | ICMP6_PARAM_PROB
        ) {
            return icmp_error(ctx, sc, ingress);
        }
        if sc.p.icmp_type != ICMP6_ECHO_REPLY {
            return Nat::SKIP;
        }
    }
    // The outside's side of flows only.
    let mut entry = CT6.get_ptr_mut(&sc.p.key).filter(|e| {
        let flags = unsafe { (**e).flags };
        flags & CT_F_ORIGINAL == 0 || flags & CT_F_DNAT != 0
    });
    match entry {
        Some(e) => sc.to = unsafe { (*e).rewrite },
        None => {
            let Some(net_id) = opening(sc, ingress) else {
                return Nat::SKIP;
            };
            if sc.to.dport == 0 {
                return Nat::DROP;
            }
            let Some(n) = maps::net(net_id) else {
                return Nat::SKIP;
            };
            if create(ctx, sc, net_id, &n, false, CT_F_DNAT, 0).is_none() {
                return Nat::DROP;
            }
            entry = CT6.get_ptr_mut(&sc.p.key);
        }
    }
    if sc.p.hop <= 1 || !apply(ctx, &sc.p, &sc.to) {
        return Nat::DROP;
    }
    if let Some(e) = entry {
        touch(e, &sc.p);
        count(unsafe { (*e).net_id }, |s| s.translated += 1);
    }
    to_guest(ctx, sc, ingress)
}

/// A new flow from outside to an IPv6 port forward on the uplink's
/// address: its net id, `sc.to` its translation. A forward over its rate
/// gives port 0 (dropped, counted).
#[inline(always)]
fn opening(sc: &mut Scratch, ingress: u32) -> Option<u32> {
    let p = &sc.p;
    if p.key.proto != IPPROTO_TCP && p.key.proto != IPPROTO_UDP {
        return None;
    }
    let fk = ForwardKey {
        ifindex: ingress,
        port: p.key.dport,
        proto: p.key.proto,
        _pad: 0,
    };
    let fwd = FORWARDS6.get_ptr_mut(&fk)?;
    let t = unsafe { &mut *fwd };
    let cfg = unsafe { NAT6_NETS.get(&t.net_id) }?;
    if !eq6(&p.key.daddr, &cfg.nat_ip) {
        return None;
    }
    sc.to = sc.p.key;
    sc.to.daddr = t.addr;
    sc.to.dport = t.port;
    if t.rate != 0 {
        // Spoofed first packets from anywhere must not fill the table.
        let now = unsafe { bpf_ktime_get_coarse_ns() };
        let (tokens, last) = kvnet_common::refill(t.tokens, t.last_ns, now, t.rate);
        if tokens == 0 {
            count(t.net_id, |s| s.drop_forward_rate += 1);
            sc.to.dport = 0;
        } else {
            t.tokens = tokens - 1;
            t.last_ns = last;
        }
    }
    Some(t.net_id)
}

/// An ICMPv6 error about a translated flow (time exceeded on the way,
/// destination unreachable, packet too big): its quote is our translated
/// packet. The guest's address and port go back into the quote and the
/// outer destination, so traceroute and PMTUD work from guests. (The
/// quote's own L4 checksum stays the translated one: receivers match the
/// quote's tuple, they do not check it.)
#[inline(always)]
fn icmp_error(ctx: &TcContext, sc: &mut Scratch, ingress: u32) -> Nat {
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let Some(q) = ptr_at::<[u8; 48]>(data, data_end, L4 + 8) else {
        return Nat::SKIP;
    };
    let qh = unsafe { &*q };
    if qh[0] >> 4 != 6 {
        return Nat::SKIP;
    }
    // The quoted packet as we sent it: (nat, remote, nport, rport), seen
    // from the remote: the key of its flow's reply entry.
    let sent_saddr = addr_at(qh, 8);
    let k = &mut sc.key;
    k.daddr = sent_saddr;
    k.saddr = addr_at(qh, 24);
    k.proto = qh[6];
    k.sport = 0;
    k.dport = 0;
    k._pad = [0; 3];
    let port_off = match k.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            k.dport = u16::from_be_bytes([qh[40], qh[41]]);
            k.sport = u16::from_be_bytes([qh[42], qh[43]]);
            40
        }
        IPPROTO_ICMPV6 if qh[40] == ICMP6_ECHO_REQUEST => {
            // The reply's identifier sits in dport (see Ct6Key).
            k.dport = u16::from_be_bytes([qh[44], qh[45]]);
            44
        }
        _ => return Nat::SKIP,
    };
    let sent_port = k.dport;
    // Addressed to the address the quote came from: ours.
    if !eq6(&sent_saddr, &sc.p.key.daddr) || sc.p.hop <= 1 {
        return Nat::SKIP;
    }
    let Some(e) = (unsafe { CT6.get(&sc.key) }) else {
        return Nat::SKIP;
    };
    // e.rewrite = (remote, guest, rport, gport): the guest is its dest.
    let (gport, net_id) = (e.rewrite.dport, e.net_id);
    sc.to.daddr = e.rewrite.daddr;
    let Some(h) = ptr_at::<[u8; 40]>(data, data_end, L3) else {
        return Nat::DROP;
    };
    let (h, q) = (h as *mut u8, q as *mut u8);
    let p = &sc.p;
    let guest = &sc.to.daddr;
    let (pseudo, quote) = unsafe {
        *h.add(7) = p.hop - 1;
        (
            put_addr(h.add(24), &p.key.daddr, guest),
            put_addr(q.add(8), &sent_saddr, guest) + put_port(q.add(port_off), sent_port, gport),
        )
    };
    let csum = L4 + 2;
    if ctx
        .l4_csum_replace(csum, 0, fold(pseudo) as u64, F_PSEUDO_HDR)
        .is_err()
        || ctx.l4_csum_replace(csum, 0, fold(quote) as u64, 0).is_err()
    {
        return Nat::DROP;
    }
    count(net_id, |s| s.icmp_errors += 1);
    sc.to.saddr = sc.p.key.saddr;
    sc.to.proto = IPPROTO_ICMPV6;
    to_guest(ctx, sc, ingress)
}

/// Sends a translated packet from outside (`sc.to`) on to its guest: via
/// the FIB to the network's gateway, then straight to the guest's port.
#[inline(always)]
fn to_guest(ctx: &TcContext, sc: &mut Scratch, ingress: u32) -> Nat {
    sc.fib = Fib6Query {
        proto: sc.to.proto,
        saddr: sc.to.saddr,
        daddr: sc.to.daddr,
        mtu_len: sc.p.mtu_len,
        ifindex: ingress,
        flags: FIB_DIRECT,
    };
    let skb = ctx.skb.skb as *mut _;
    let f = match route::fib_v6(skb, &sc.fib) {
        Ok(f) => f,
        // Larger than the guests' network takes: kvnet does not fragment
        // (nor do IPv6 routers), and the host cannot send the sender a
        // packet-too-big for a translated flow: dropped.
        Err(FibMiss::FragNeeded(_)) => return Nat::DROP,
        Err(FibMiss::Other) => {
            // Neighbour unresolved: the kernel resolves it on the way out.
            sc.fib.flags = FIB_DIRECT | FIB_SKIP_NEIGH;
            let Ok(f) = route::fib_v6(skb, &sc.fib) else {
                return Nat::DROP;
            };
            return Nat::sent(
                unsafe { bpf_redirect_neigh(f.ifindex, core::ptr::null_mut(), 0, 0) } as i32,
                f.ifindex,
            );
        }
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&f.dmac);
    macs[6..].copy_from_slice(&f.smac);
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

/// tc egress on a NAT uplink: drops IPv6 whose source is a NAT66 guest
/// prefix (it escaped translation through the host stack), counted.
#[inline(always)]
pub fn guard_uplink(ctx: &TcContext) -> i32 {
    let Ok(saddr) = ctx.load::<Addr6>(L3 + 8) else {
        return TC_ACT_OK;
    };
    match NAT6_SUBNETS.get(Key::new(128, saddr)).copied() {
        Some(net_id) => {
            count(net_id, |s| s.drop_untranslated += 1);
            TC_ACT_SHOT
        }
        None => TC_ACT_OK,
    }
}
