//! Bounded header parsing over [data, data_end); never trusts a length.
//! The datapath's only header reader: every stage asks here.
use aya_ebpf::programs::TcContext;

pub const ETH_HLEN: usize = 14;
pub const IPV4_HLEN: usize = 20;
pub use kvnet_common::{ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6};

/// Where the network header starts, past a VLAN tag still in the packet,
/// and the ethertype that announces it.
pub struct L3 {
    pub ethertype: u16,
    pub off: usize,
}

/// The L3 header behind the Ethernet header and, when `tag_in_packet`,
/// one 802.1Q tag. A second tag shows up as a TPID in `ethertype`.
#[inline(always)]
pub fn l3(data: usize, data_end: usize, eth: &Eth, tag_in_packet: bool) -> L3 {
    if !tag_in_packet {
        return L3 {
            ethertype: eth.ethertype,
            off: ETH_HLEN,
        };
    }
    let ethertype = match ptr_at::<[u8; 2]>(data, data_end, ETH_HLEN + 2) {
        Some(p) => u16::from_be_bytes(unsafe { *p }),
        None => 0,
    };
    L3 {
        ethertype,
        off: ETH_HLEN + 4,
    }
}

pub struct Eth {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Ethertype of the outermost header (host order).
    pub ethertype: u16,
}

/// Returns a pointer to `T` at `offset` if the whole `T` lies in the packet.
#[inline(always)]
pub fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    if data + offset + core::mem::size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *const T)
}

#[inline(always)]
pub fn eth(data: usize, data_end: usize) -> Option<Eth> {
    let hdr: *const [u8; ETH_HLEN] = ptr_at(data, data_end, 0)?;
    let h = unsafe { &*hdr };
    Some(Eth {
        dst: [h[0], h[1], h[2], h[3], h[4], h[5]],
        src: [h[6], h[7], h[8], h[9], h[10], h[11]],
        ethertype: u16::from_be_bytes([h[12], h[13]]),
    })
}

#[inline(always)]
pub fn is_multicast(mac: &[u8; 6]) -> bool {
    mac[0] & 1 != 0
}

#[inline(always)]
pub fn is_zero(mac: &[u8; 6]) -> bool {
    (mac[0] | mac[1] | mac[2] | mac[3] | mac[4] | mac[5]) == 0
}

/// The fixed part of an IPv4 header.
#[derive(Clone, Copy)]
pub struct Ipv4 {
    pub tos: u8,
    /// Total length as the header claims it (host order): not checked
    /// against the frame, callers that rely on it must.
    pub tot_len: u16,
    /// Identification (host order): what the fragments of one datagram share.
    pub id: u16,
    /// Flags and fragment offset (host order).
    pub frag: u16,
    pub ttl: u8,
    pub proto: u8,
    /// Addresses in network byte order, as the maps key them.
    pub saddr: u32,
    pub daddr: u32,
    /// Header length in bytes, 20 to 60.
    pub hlen: usize,
}

impl Ipv4 {
    /// More fragments follow, or this is not the first: no whole L4 segment.
    #[inline(always)]
    pub fn is_fragment(&self) -> bool {
        self.frag & 0x3fff != 0
    }
    /// Offset 0: the L4 header, if any, is in this packet.
    #[inline(always)]
    pub fn is_first_fragment(&self) -> bool {
        self.frag & 0x1fff == 0
    }
}

/// Decodes an IPv4 header's fixed part; None unless version 4 with IHL >= 5.
#[inline(always)]
pub fn ipv4_from(h: &[u8; IPV4_HLEN]) -> Option<Ipv4> {
    if h[0] >> 4 != 4 || h[0] & 0xf < 5 {
        return None;
    }
    Some(Ipv4 {
        tos: h[1],
        tot_len: u16::from_be_bytes([h[2], h[3]]),
        id: u16::from_be_bytes([h[4], h[5]]),
        frag: u16::from_be_bytes([h[6], h[7]]),
        ttl: h[8],
        proto: h[9],
        saddr: u32::from_ne_bytes([h[12], h[13], h[14], h[15]]),
        daddr: u32::from_ne_bytes([h[16], h[17], h[18], h[19]]),
        hlen: ((h[0] & 0xf) as usize) * 4,
    })
}

/// The IPv4 header at `off` in [data, data_end).
#[inline(always)]
pub fn ipv4(data: usize, data_end: usize, off: usize) -> Option<Ipv4> {
    let h = ptr_at::<[u8; IPV4_HLEN]>(data, data_end, off)?;
    ipv4_from(unsafe { &*h })
}

/// The IPv4 header at `off` of a skb, copied out (it may lie beyond the
/// linear part, e.g. the header embedded in an ICMP error).
#[inline(always)]
pub fn ipv4_skb(ctx: &TcContext, off: usize) -> Option<Ipv4> {
    ipv4_from(&ctx.load::<[u8; IPV4_HLEN]>(off).ok()?)
}
