//! IPv6 source address validation for guarded ports on SLAAC networks
//! (FCFS SAVI, RFC 6620; types in `kvnet_common::savi`): an address is
//! the first port's to use it (as a source, or as the target of its DAD
//! probe or advertisement), up to `V6_CLAIMS_PER_PORT` claims; nobody else
//! may send from it or advertise it (no spoofing, no DAD denial, no
//! neighbour poisoning).
//!
//! Its own program, `kvnet_savi`: the tc program's verifier budget is
//! spent. `kvnet_tc` tail-calls it ([`divert`]) for IPv6 from such ports
//! only (nothing for IPv4, nothing for other ports); it drops, or marks
//! the frame checked and tail-calls `kvnet_tc` back (one hash lookup per
//! packet on the way). XDP never sends IPv6 itself (see
//! `csum::l4_checksum_complete`): every such frame passes here.
use aya_ebpf::{
    bindings::{BPF_NOEXIST, TC_ACT_SHOT},
    helpers::bpf_ktime_get_coarse_ns,
    programs::TcContext,
};
use kvnet_common::{
    owner_key, DropReason, PortConfig, V6Owner, V6OwnerKey, ETH_P_8021Q, IPPROTO_ICMPV6,
    PORT_F_GUARDED, PORT_F_TRUSTED, PORT_F_UPLINK_BRIDGED, PORT_F_UPLINK_ROUTED, PORT_F_V6_SLAAC,
    PORT_MACS, V6_CLAIMS_PER_PORT, V6_OWNER_REFRESH_NS,
};

use crate::{
    maps::{self, MAC_OWNERS, SAVI_JUMP, SAVI_PASSED, V6_CLAIMS, V6_OWNERS},
    parse::{self, ptr_at, ETH_HLEN},
    stats,
};

/// `savi_jump` slots.
pub const JUMP_SAVI: u32 = 0;
pub const JUMP_TC: u32 = 1;

const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;

/// In `kvnet_tc`, before the pipeline: true if the frame must be dropped
/// because `kvnet_savi` could not be reached (fail closed). On success the
/// tail call does not return; a frame `kvnet_savi` already passed goes on.
#[inline(always)]
pub fn divert(
    ctx: &TcContext,
    port: &PortConfig,
    hw_tag: bool,
    data: usize,
    data_end: usize,
) -> bool {
    let watched = PORT_F_GUARDED | PORT_F_V6_SLAAC;
    let exempt = PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED;
    if port.flags & (watched | exempt) != watched {
        return false;
    }
    if !hw_tag && ethertype(data, data_end).1 != parse::ETH_P_IPV6 {
        return false;
    }
    if hw_tag {
        match ptr_at::<[u8; 2]>(data, data_end, 12) {
            Some(t) if u16::from_be_bytes(unsafe { *t }) == parse::ETH_P_IPV6 => {}
            _ => return false,
        }
    }
    if let Some(p) = SAVI_PASSED.get_ptr_mut(0) {
        unsafe {
            if *p != 0 {
                // Back from kvnet_savi: checked.
                *p = 0;
                return false;
            }
        }
    }
    unsafe { SAVI_JUMP.tail_call(ctx, JUMP_SAVI) };
    true
}

/// (L3 offset, ethertype) past at most one 802.1Q tag in the packet.
#[inline(always)]
fn ethertype(data: usize, data_end: usize) -> (usize, u16) {
    let Some(t) = ptr_at::<[u8; 6]>(data, data_end, 12) else {
        return (ETH_HLEN, 0);
    };
    let t = unsafe { &*t };
    let outer = u16::from_be_bytes([t[0], t[1]]);
    if outer == ETH_P_8021Q {
        (ETH_HLEN + 4, u16::from_be_bytes([t[4], t[5]]))
    } else {
        (ETH_HLEN, outer)
    }
}

/// The `kvnet_savi` program.
#[inline(always)]
pub fn run(ctx: TcContext) -> i32 {
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    if let Some(port) = maps::port(ingress) {
        if let Some(r) = check(ingress, port, data, data_end) {
            stats::rx(ingress, ctx.len() as u64);
            stats::drop(ingress, r);
            return TC_ACT_SHOT as i32;
        }
    }
    if let Some(p) = SAVI_PASSED.get_ptr_mut(0) {
        unsafe { *p = 1 };
    }
    unsafe { SAVI_JUMP.tail_call(&ctx, JUMP_TC) };
    // kvnet_tc is not in the table: nothing to hand the frame to.
    TC_ACT_SHOT as i32
}

/// Why an IPv6 frame from guarded port `ingress` must not go on: a source
/// not its own, or an NA / DAD probe for a target not its own. What it
/// cannot read is left to the main guard.
#[inline(always)]
fn check(ingress: u32, port: &PortConfig, data: usize, data_end: usize) -> Option<DropReason> {
    let (off, et) = ethertype(data, data_end);
    if et != parse::ETH_P_IPV6 {
        return None;
    }
    let mac = ptr_at::<[u8; 12]>(data, data_end, 0)?;
    let mac = unsafe { &*mac };
    let mac = [mac[6], mac[7], mac[8], mac[9], mac[10], mac[11]];
    // Only a MAC the port owns claims (the pipeline's MAC guard decides
    // about the others after this, and would drop a stolen one: no claim
    // may be left behind by it).
    let mut claims = false;
    for i in 0..PORT_MACS {
        if i < port.mac_count as usize && port.macs[i] == mac {
            claims = true;
        }
    }
    let net_id = port.net_id;
    let h = ptr_at::<[u8; 40]>(data, data_end, off)?;
    let h = unsafe { &*h };
    let (src_hi, src_lo) = words(&h[8..24]);
    if !eui64_of(ingress, net_id, src_lo, &mac)
        || bind(ingress, net_id, src_hi, src_lo, false, claims).is_err()
    {
        return Some(DropReason::IpSpoof);
    }
    // ND behind a few extension headers is still ND.
    let mut next = h[6];
    let mut l4 = off + 40;
    for _ in 0..3 {
        if next != 0 && next != 43 && next != 44 && next != 60 {
            break;
        }
        let e = ptr_at::<[u8; 4]>(data, data_end, l4)?;
        let e = unsafe { &*e };
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
    // Type, code, checksum, flags, target.
    let nd = ptr_at::<[u8; 24]>(data, data_end, l4)?;
    let nd = unsafe { &*nd };
    let probe = nd[0] == ND_NEIGHBOR_SOLICIT && src_hi | src_lo == 0;
    if nd[0] == ND_NEIGHBOR_ADVERT || probe {
        let (hi, lo) = words(&nd[8..24]);
        if !eui64_of(ingress, net_id, lo, &mac)
            || bind(ingress, net_id, hi, lo, true, claims).is_err()
        {
            return Some(DropReason::ArpSpoof);
        }
    }
    None
}

/// An address as two words read straight from the packet (byte order
/// kept: they go back into the key as they came).
#[inline(always)]
fn words(a: &[u8]) -> (u64, u64) {
    let mut hi = [0u8; 8];
    let mut lo = [0u8; 8];
    hi.copy_from_slice(&a[0..8]);
    lo.copy_from_slice(&a[8..16]);
    (u64::from_ne_bytes(hi), u64::from_ne_bytes(lo))
}

/// False if the interface identifier `lo` is a modified EUI-64 (ff:fe in
/// its middle) of a MAC another port of the network owns: nobody but that
/// MAC's owner forms it, so a neighbour's EUI-64 addresses are refused
/// even before the neighbour used them (its link-local one from before
/// its port joined, say). The EUI-64 of an unowned MAC, or of one this
/// port owns, passes: a guest that changed its MAC keeps its old
/// link-local address.
#[inline(always)]
fn eui64_of(ingress: u32, net_id: u32, lo: u64, mac: &[u8; 6]) -> bool {
    let b = lo.to_ne_bytes();
    if b[3] != 0xff || b[4] != 0xfe {
        return true;
    }
    let formed_from = [b[0] ^ 0x02, b[1], b[2], b[5], b[6], b[7]];
    if formed_from == *mac {
        return true;
    }
    match unsafe { MAC_OWNERS.get(&owner_key(net_id, formed_from)) } {
        Some(owner) => *owner == ingress,
        None => true,
    }
}

/// Ok if the address (`hi`, `lo`) is `ingress`'s in network `net_id`, or
/// nobody's (then claimed for it if `claim`); Err if another port owns
/// it, it is multicast, or `ingress` may claim no more. `::` passes as a
/// source (DAD), never as a `target`.
#[inline(always)]
fn bind(ingress: u32, net_id: u32, hi: u64, lo: u64, target: bool, claim: bool) -> Result<(), ()> {
    if hi == 0 && lo == 0 {
        return if target { Err(()) } else { Ok(()) };
    }
    // The first byte on the wire.
    if hi.to_ne_bytes()[0] == 0xff {
        return Err(());
    }
    let mut addr = [0u8; 16];
    addr[0..8].copy_from_slice(&hi.to_ne_bytes());
    addr[8..16].copy_from_slice(&lo.to_ne_bytes());
    let key = V6OwnerKey { net_id, addr };
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(o) = V6_OWNERS.get_ptr_mut(&key) {
        let o = unsafe { &mut *o };
        if o.ifindex != ingress {
            return Err(());
        }
        if now.wrapping_sub(o.last_seen_ns) > V6_OWNER_REFRESH_NS {
            o.last_seen_ns = now;
        }
        return Ok(());
    }
    if !claim {
        return Ok(());
    }
    // Read, not reserved: two CPUs may each claim one past the quota.
    let used = unsafe { V6_CLAIMS.get(&ingress) }.copied().unwrap_or(0);
    if used >= V6_CLAIMS_PER_PORT {
        return Err(());
    }
    let claim = V6Owner {
        ifindex: ingress,
        flags: 0,
        last_seen_ns: now,
    };
    if V6_OWNERS.insert(&key, &claim, BPF_NOEXIST as u64).is_err() {
        // Claimed meanwhile (another CPU, the daemon), or the table is full.
        return match unsafe { V6_OWNERS.get(&key) } {
            Some(o) if o.ifindex == ingress => Ok(()),
            _ => Err(()),
        };
    }
    match V6_CLAIMS.get_ptr_mut(&ingress) {
        Some(c) => unsafe { *c += 1 },
        None => {
            let _ = V6_CLAIMS.insert(&ingress, &1, 0);
        }
    }
    Ok(())
}
