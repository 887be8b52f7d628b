//! Bounded header parsing over [data, data_end); never trusts a length.

pub const ETH_HLEN: usize = 14;
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
