//! Protocol numbers and the VLAN ID range of the wire formats kvnet reads.
/// 802.1Q: valid VIDs are 1..=4094 (0 means "priority tag only", 4095 is
/// reserved).
pub const VID_MIN: u16 = 1;
pub const VID_MAX: u16 = 4094;
pub const VLAN_VID_MASK: u16 = 0x0fff;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const ETH_P_8021AD: u16 = 0x88a8;
/// Pre-standard QinQ outer TPID some switches still send.
pub const ETH_P_QINQ_9100: u16 = 0x9100;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
