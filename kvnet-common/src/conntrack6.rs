//! NAT66: conntrack for IPv6 (map `ct6`), IPv6 port forwards (map
//! `forwards6`), each NAT66 network's uplink address (map `nat6_nets`) and
//! its guests' prefixes (map `nat6_subnets`). Apart from the IPv4 maps so
//! their layouts stay as they are; the flags and semantics are the IPv4
//! table's ([`CtEntry`](crate::CtEntry), `CT_F_*`).
use bytemuck::{Pod, Zeroable};

/// An IPv6 address as the datapath keeps it: four 32-bit words in network
/// order (`u32::from_ne_bytes` of the wire's bytes), compared word by word.
pub type Addr6 = [u32; 4];

/// An IPv6 connection tuple as a packet carries it (ports host order).
/// ICMPv6 echo: the identifier is `sport` of a request and `dport` of a
/// reply, the other port is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct Ct6Key {
    pub saddr: Addr6,
    pub daddr: Addr6,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl Ct6Key {
    /// The same connection seen from the other end.
    #[inline(always)]
    pub fn reply(&self) -> Ct6Key {
        Ct6Key {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Conntrack entry, map `ct6`: a packet carrying the key's tuple leaves
/// carrying `rewrite`; as [`CtEntry`](crate::CtEntry), one per direction.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Ct6Entry {
    pub rewrite: Ct6Key,
    pub net_id: u32,
    /// CT_F_* : direction and the TCP flags seen in it.
    pub flags: u32,
    /// The guest port that opened the flow (0: opened from outside): its
    /// quota (map `ct_quota`) counts it, and only it sends on the flow.
    pub port: u32,
    /// TCP: the sequence number after the last segment this direction's
    /// sender sent (0: none seen yet).
    pub seq_end: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
}

/// A NAT66 network, map `nat6_nets` keyed by net id: the uplink's global
/// IPv6 address guests' flows leave with (followed by the daemon).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Nat6Config {
    pub nat_ip: Addr6,
}

/// An IPv6 port forward's target, map `forwards6` keyed by
/// [`ForwardKey`](crate::ForwardKey); rate as
/// [`ForwardTarget`](crate::ForwardTarget)'s.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct Forward6Target {
    pub addr: Addr6,
    pub port: u16,
    pub _pad: u16,
    pub net_id: u32,
    pub rate: u32,
    pub tokens: u32,
    pub last_ns: u64,
}
