//! Checksums: the one's-complement fold every rewrite uses, and the check
//! the XDP hook makes before it redirects on its own.

use crate::parse::{self, ETH_HLEN, ETH_P_8021Q, ETH_P_IPV4, IPV4_HLEN};

use kvnet_common::{IPPROTO_TCP, IPPROTO_UDP};
/// Longest L4 segment summed in XDP (a 1500-byte MTU frame); longer ones
/// are left to tc.
const MAX_L4_WORDS: usize = 740;

/// True when the frame's TCP/UDP checksum is complete and valid, or the
/// frame carries no L4 checksum a sender could have offloaded. False sends
/// the frame on to tc: checksum-offloaded (CHECKSUM_PARTIAL) frames, IPv6
/// TCP/UDP, IPv4 with options and anything too long to sum here.
#[inline(always)]
pub fn l4_checksum_complete(data: usize, data_end: usize) -> bool {
    if data + ETH_HLEN + 4 + IPV4_HLEN > data_end {
        return data + ETH_HLEN + IPV4_HLEN > data_end;
    }
    let Some(eth) = parse::eth(data, data_end) else {
        return true;
    };
    // Look past one 802.1Q tag.
    let tagged = eth.ethertype == ETH_P_8021Q;
    let l3 = parse::l3(data, data_end, &eth, tagged);
    if l3.ethertype == crate::parse::ETH_P_IPV6 {
        return false;
    }
    if l3.ethertype != ETH_P_IPV4 {
        return true;
    }
    let l3 = if tagged { ETH_HLEN + 4 } else { ETH_HLEN };
    let ip = data + l3;
    if ip + IPV4_HLEN > data_end {
        return true;
    }
    let Some(hdr) = parse::ipv4(data, data_end, l3) else {
        return false;
    };
    let proto = hdr.proto;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return true;
    }
    // Fragments carry no complete L4 segment to check; options are left
    // to tc.
    if hdr.hlen != IPV4_HLEN || hdr.is_fragment() {
        return false;
    }
    let total = hdr.tot_len as usize;
    if total < IPV4_HLEN {
        return false;
    }
    let l4_len = total - IPV4_HLEN;
    let l4 = ip + IPV4_HLEN;
    // No up-front "l4 + l4_len <= data_end" test: LLVM would use it to drop
    // the per-read bounds checks the verifier needs. The loop checks each read.
    if l4_len > MAX_L4_WORDS * 2 {
        return false;
    }
    if proto == IPPROTO_UDP && l4 + 8 <= data_end {
        // UDP checksum 0 means "none": nothing to break.
        if unsafe { *((l4 + 6) as *const u16) } == 0 {
            return true;
        }
    }
    // Pseudo-header, summed in memory order like the payload.
    // (The addresses are in memory order already: their halves are the
    // 16-bit words a load would give.)
    let mut sum: u64 = 0;
    for a in [hdr.saddr, hdr.daddr] {
        sum += (a & 0xffff) as u64 + (a >> 16) as u64;
    }
    sum += u16::from_ne_bytes([0, proto]) as u64;
    sum += u16::from_ne_bytes((l4_len as u16).to_be_bytes()) as u64;
    let mut off = 0usize;
    for _ in 0..MAX_L4_WORDS {
        if off + 2 > l4_len {
            break;
        }
        let p = l4 + off;
        if p + 2 > data_end {
            return false;
        }
        sum += unsafe { *(p as *const u16) } as u64;
        off += 2;
    }
    if off < l4_len {
        let p = l4 + off;
        if p + 1 > data_end {
            return false;
        }
        sum += u16::from_ne_bytes([unsafe { *(p as *const u8) }, 0]) as u64;
    }
    fold(sum) == 0xffff
}

/// Folds a one's-complement sum into 16 bits: the datapath's one fold
/// (four rounds bring any sum of < 2^32 words down).
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}
