//! IPv4 and IPv6 forwarding through the kernel's own FIB
//! (`bpf_fib_lookup`): the routed fast path. Anything the FIB cannot finish (local destination,
//! unresolved neighbour, TTL expiring, fragmentation needed) goes to the
//! host stack, which answers with the right ICMP error or resolves the
//! neighbour so the next packet takes the fast path.
use aya_ebpf::{bindings::bpf_fib_lookup as FibParams, helpers::bpf_fib_lookup};

use crate::parse::{self, ptr_at};

use kvnet_common::{IPPROTO_TCP, IPPROTO_UDP};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
const FIB_SUCCESS: i64 = 0;
const FIB_FRAG_NEEDED: i64 = 8;

/// Why the FIB did not give a next hop.
pub enum FibMiss {
    /// The packet is larger than the egress MTU, which is this.
    FragNeeded(u16),
    /// No route, a local destination, an unresolved neighbour, ...
    Other,
}

/// What a hook gives the core so it can route: its context (for the FIB
/// helper), the skb's GSO segment size (0 if none) and whether the frame
/// was addressed to this host's MAC (tc's pkt_type).
#[derive(Clone, Copy)]
pub struct L3Ctx {
    pub ctx: *mut core::ffi::c_void,
    pub gso_size: u16,
    pub to_us: bool,
    /// The frame's whole length (skb->len).
    pub len: u32,
}

pub struct Fib {
    pub ifindex: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
}

/// What the FIB is asked about one IPv4 packet.
pub struct FibQuery {
    pub proto: u8,
    pub tos: u8,
    pub saddr: u32,
    pub daddr: u32,
    pub tot_len: u16,
    /// What the frame really carries from the IPv4 header on: a sender
    /// cannot slip an oversized frame past the MTU with a small `tot_len`.
    pub l3_len: u32,
    /// IPv4 + L4 header bytes (GSO packets only): with `gso_size`, the
    /// length of one segment.
    pub headers: u16,
    pub gso_size: u16,
    pub ifindex: u32,
    pub flags: u32,
}

/// The L4 header bytes a GSO segment repeats: TCP's data offset (from the
/// byte holding it), UDP's 8.
#[inline(always)]
pub fn l4_header_len(proto: u8, tcp_doff: u8) -> u16 {
    match proto {
        IPPROTO_TCP => ((tcp_doff >> 4) as u16) * 4,
        IPPROTO_UDP => 8,
        _ => 0,
    }
}

/// The datapath's one FIB lookup. A GSO super-packet leaves as segments:
/// the MTU is checked against one of them. The helper's 64-byte argument
/// lives in per-CPU scratch memory (map `fib_scratch`), not on the stack.
#[inline(always)]
pub fn fib_v4(ctx: *mut core::ffi::c_void, q: &FibQuery) -> Result<Fib, FibMiss> {
    let mtu_len = if q.gso_size == 0 {
        // Capped: a length past 65535 fails any MTU check as 65535 does.
        (q.tot_len as u32).max(q.l3_len).min(u16::MAX as u32) as u16
    } else {
        q.headers + q.gso_size
    };
    fib(ctx, q.flags, |p| {
        p.family = AF_INET;
        p.l4_protocol = q.proto;
        p.ifindex = q.ifindex;
        p.__bindgen_anon_1.tot_len = mtu_len;
        p.__bindgen_anon_2.tos = q.tos;
        p.__bindgen_anon_3.ipv4_src = q.saddr;
        p.__bindgen_anon_4.ipv4_dst = q.daddr;
    })
}

/// What the FIB is asked about one IPv6 packet whose addresses are not
/// (or not yet) the packet's own: NAT66 looks a flow up as it will leave.
pub struct Fib6Query {
    pub proto: u8,
    pub saddr: [u32; 4],
    pub daddr: [u32; 4],
    /// The length the egress MTU is checked against (one segment's, GSO).
    pub mtu_len: u16,
    pub ifindex: u32,
    pub flags: u32,
}

/// The FIB lookup of [`Fib6Query`].
#[inline(always)]
pub fn fib_v6(ctx: *mut core::ffi::c_void, q: &Fib6Query) -> Result<Fib, FibMiss> {
    fib(ctx, q.flags, |p| {
        p.family = AF_INET6;
        p.l4_protocol = q.proto;
        p.ifindex = q.ifindex;
        p.__bindgen_anon_1.tot_len = q.mtu_len;
        p.__bindgen_anon_3.ipv6_src = q.saddr;
        p.__bindgen_anon_4.ipv6_dst = q.daddr;
    })
}

/// `bpf_fib_lookup` with the parameters `fill` writes (zeroed first).
#[inline(always)]
fn fib(
    ctx: *mut core::ffi::c_void,
    flags: u32,
    fill: impl FnOnce(&mut FibParams),
) -> Result<Fib, FibMiss> {
    let Some(p) = crate::maps::FIB_SCRATCH.get_ptr_mut(0) else {
        return Err(FibMiss::Other);
    };
    let p: &mut FibParams = unsafe {
        core::ptr::write_bytes(p, 0, 1);
        &mut *p
    };
    fill(p);
    let rc = unsafe { bpf_fib_lookup(ctx, p, core::mem::size_of::<FibParams>() as i32, flags) };
    match rc {
        FIB_SUCCESS => Ok(Fib {
            ifindex: p.ifindex,
            smac: p.smac,
            dmac: p.dmac,
        }),
        FIB_FRAG_NEEDED => Err(FibMiss::FragNeeded(unsafe {
            p.__bindgen_anon_1.mtu_result
        })),
        _ => Err(FibMiss::Other),
    }
}

/// Looks the IPv4 packet at `l3` up as if it arrived on `ifindex`. None
/// means "let the host stack have it".
#[inline(always)]
pub fn lookup_v4(
    l3c: &L3Ctx,
    data: usize,
    data_end: usize,
    l3: usize,
    ifindex: u32,
) -> Option<Fib> {
    let ip = parse::ipv4(data, data_end, l3)?;
    if ip.ttl <= 1 {
        // The TTL expires here: the host drops it or sends time-exceeded.
        return None;
    }
    let headers = if l3c.gso_size == 0 {
        0
    } else {
        let doff = if ip.proto == IPPROTO_TCP {
            unsafe { (*ptr_at::<[u8; 13]>(data, data_end, l3 + ip.hlen)?)[12] }
        } else {
            0
        };
        ip.hlen as u16 + l4_header_len(ip.proto, doff)
    };
    fib_v4(
        l3c.ctx,
        &FibQuery {
            proto: ip.proto,
            tos: ip.tos,
            saddr: ip.saddr,
            daddr: ip.daddr,
            tot_len: ip.tot_len,
            l3_len: l3c.len.saturating_sub(l3 as u32),
            headers,
            gso_size: l3c.gso_size,
            ifindex,
            flags: 0,
        },
    )
    .ok()
}

/// Looks the IPv6 packet at `l3` up as if it arrived on `ifindex` (which
/// must forward IPv6). None means "let the host stack have it": a hop limit
/// expiring, a packet too big, an unresolved neighbour, a local or
/// link-local destination; the host sends the ICMPv6 errors.
#[inline(always)]
pub fn lookup_v6(
    l3c: &L3Ctx,
    data: usize,
    data_end: usize,
    l3: usize,
    ifindex: u32,
) -> Option<Fib> {
    let h = unsafe { &*ptr_at::<[u8; 40]>(data, data_end, l3)? };
    if h[7] <= 1 {
        return None;
    }
    let next = h[6];
    let mtu_len = if l3c.gso_size == 0 {
        let payload = u16::from_be_bytes([h[4], h[5]]) as u32;
        (40 + payload)
            .max(l3c.len.saturating_sub(l3 as u32))
            .min(u16::MAX as u32) as u16
    } else {
        let doff = if next == IPPROTO_TCP {
            unsafe { (*ptr_at::<[u8; 13]>(data, data_end, l3 + 40)?)[12] }
        } else {
            0
        };
        40 + l4_header_len(next, doff) + l3c.gso_size
    };
    let word = |o: usize| u32::from_ne_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    fib(l3c.ctx, 0, |p| {
        p.family = AF_INET6;
        p.l4_protocol = next;
        p.ifindex = ifindex;
        p.__bindgen_anon_1.tot_len = mtu_len;
        // Traffic class and flow label, as the kernel's flowi6 takes them.
        p.__bindgen_anon_2.flowinfo = word(0) & 0x0fff_ffffu32.to_be();
        p.__bindgen_anon_3.ipv6_src = [word(8), word(12), word(16), word(20)];
        p.__bindgen_anon_4.ipv6_dst = [word(24), word(28), word(32), word(36)];
    })
    .ok()
}

/// Rewrites an IPv6 frame for its next hop: MACs and hop limit - 1 (no
/// header checksum in IPv6).
#[inline(always)]
pub fn rewrite_v6(data: usize, data_end: usize, l3: usize, fib: &Fib) -> bool {
    let Some(h) = ptr_at::<[u8; 8]>(data, data_end, l3) else {
        return false;
    };
    let h = unsafe { &mut *(h as *mut [u8; 8]) };
    h[7] = h[7].wrapping_sub(1);
    set_macs(data, data_end, fib)
}

/// Rewrites the frame for its next hop: MACs, TTL - 1 and the IP header
/// checksum, adjusted incrementally (RFC 1624). L4 checksums do not cover
/// any of it, so offloaded (CHECKSUM_PARTIAL) packets stay valid.
#[inline(always)]
pub fn rewrite_v4(data: usize, data_end: usize, l3: usize, fib: &Fib) -> bool {
    let Some(h) = ptr_at::<[u8; 20]>(data, data_end, l3) else {
        return false;
    };
    let h = unsafe { &mut *(h as *mut [u8; 20]) };
    let old = u16::from_be_bytes([h[8], h[9]]);
    h[8] = h[8].wrapping_sub(1);
    let new = u16::from_be_bytes([h[8], h[9]]);
    let csum = u16::from_be_bytes([h[10], h[11]]);
    let sum = (!csum as u64) + (!old as u64) + new as u64;
    let c = (!crate::csum::fold(sum)).to_be_bytes();
    h[10] = c[0];
    h[11] = c[1];
    set_macs(data, data_end, fib)
}

/// The next hop's MACs into the Ethernet header.
#[inline(always)]
fn set_macs(data: usize, data_end: usize, fib: &Fib) -> bool {
    let Some(eth) = ptr_at::<[u8; 12]>(data, data_end, 0) else {
        return false;
    };
    let eth = unsafe { &mut *(eth as *mut [u8; 12]) };
    eth[..6].copy_from_slice(&fib.dmac);
    eth[6..].copy_from_slice(&fib.smac);
    true
}
