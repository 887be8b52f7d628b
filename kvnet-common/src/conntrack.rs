//! Conntrack (map `ct`), port forwards (map `forwards`) and their rate,
//! fragments in flight (map `nat_frags`) and UDP mappings (map `nat_mappings`).
use bytemuck::{Pod, Zeroable};

/// A connection tuple as a packet carries it (addresses network order,
/// ports host order). ICMP echo: the identifier is `sport` of a request
/// and `dport` of a reply, the other port is 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub _pad: [u8; 3],
}

impl CtKey {
    /// The same connection seen from the other end.
    pub fn reply(&self) -> CtKey {
        CtKey {
            saddr: self.daddr,
            daddr: self.saddr,
            sport: self.dport,
            dport: self.sport,
            proto: self.proto,
            _pad: [0; 3],
        }
    }
}

/// Conntrack entry, map `ct`: a packet carrying the key's tuple leaves
/// carrying `rewrite`. Every flow has two entries, one per direction; the
/// other's key is `rewrite.reply()`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct CtEntry {
    pub rewrite: CtKey,
    pub net_id: u32,
    /// CT_F_* : direction and the TCP flags seen in it.
    pub flags: u32,
    pub created_ns: u64,
    pub last_seen_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    /// The guest port that opened the flow (0: opened from outside), what
    /// its quota counts ([`NetConfig::ct_quota`], map `ct_quota`).
    pub port: u32,
    /// TCP: the sequence number after the last segment this direction's
    /// sender sent (0: none seen yet), what a RST must be near to count.
    pub seq_end: u32,
}

/// The entry of the direction that opened the flow.
pub const CT_F_ORIGINAL: u32 = 1 << 0;
/// The flow was opened from outside by a port forward (DNAT).
pub const CT_F_DNAT: u32 = 1 << 1;
pub const CT_F_SYN: u32 = 1 << 4;
pub const CT_F_ACK: u32 = 1 << 5;
pub const CT_F_FIN: u32 = 1 << 6;
pub const CT_F_RST: u32 = 1 << 7;

/// Port forward key, map `forwards`: (uplink ifindex, proto, port on the
/// uplink address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct ForwardKey {
    pub ifindex: u32,
    pub port: u16,
    pub proto: u8,
    pub _pad: u8,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct ForwardTarget {
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub net_id: u32,
    /// New flows per second the forward accepts (also the burst), so a
    /// flood of spoofed first packets cannot fill conntrack; 0: no limit.
    pub rate: u32,
    /// Token bucket of [`refill`], written by the datapath.
    pub tokens: u32,
    pub _pad2: u32,
    pub last_ns: u64,
}

/// New flows per second a port forward accepts unless told otherwise.
pub const DEFAULT_FORWARD_RATE: u32 = 200;
/// A guest's conntrack quota unless told otherwise: this share of the
/// table's flows (capacity / 2 / N).
pub const DEFAULT_CT_QUOTA_SHARE: u32 = 8;

/// A token bucket of `rate` tokens per second, holding at most `rate`:
/// (tokens, last refill) after `now`. Whole tokens only; the time of a
/// partial token is kept for the next refill.
#[inline(always)]
pub fn refill(tokens: u32, last_ns: u64, now: u64, rate: u32) -> (u32, u64) {
    if rate == 0 {
        return (tokens, now);
    }
    // Capped so the product cannot overflow (and a bucket fills in 1 s).
    let elapsed = now.saturating_sub(last_ns);
    if elapsed >= 2_000_000_000 {
        return (rate, now);
    }
    let add = elapsed * rate as u64 / 1_000_000_000;
    if add == 0 {
        return (tokens, last_ns);
    }
    let full = (tokens as u64 + add).min(rate as u64) as u32;
    // The time of the whole tokens only: a fraction carries over.
    (full, last_ns + add * 1_000_000_000 / rate as u64)
}

/// A fragmented datagram, map `nat_frags` (LRU): its tuple as it arrives
/// (addresses network order) and its IP ID. Later fragments carry no L4
/// header; the first one's ports are kept here for them, as Cilium does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FragKey {
    pub saddr: u32,
    pub daddr: u32,
    pub id: u16,
    pub proto: u8,
    pub _pad: u8,
}

/// What the first fragment of a datagram carried: its ports (as [`CtKey`]
/// has them) and, for ICMP, its type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FragPorts {
    pub sport: u16,
    pub dport: u16,
    pub icmp_type: u8,
    pub _pad: [u8; 3],
}

/// A UDP mapping of a NAT network with endpoint-independent mapping
/// (RFC 4787), map `nat_mappings`: one guest socket keeps one uplink port
/// whatever the remote. Each mapping has two entries: the guest's side
/// (guest address and port -> uplink address and port) and the uplink's
/// (uplink address and port -> guest's), which also reserves the port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NatMapKey {
    /// Network order.
    pub addr: u32,
    pub port: u16,
    pub proto: u8,
    /// [`MAP_SIDE_GUEST`] or [`MAP_SIDE_UPLINK`].
    pub side: u8,
}

pub const MAP_SIDE_GUEST: u8 = 0;
pub const MAP_SIDE_UPLINK: u8 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatMapping {
    /// The other side's address (network order) and port.
    pub addr: u32,
    pub port: u16,
    pub _pad: u16,
    pub net_id: u32,
    /// The guest's switch port (ifindex): flows opened from outside through
    /// the mapping count against its quota.
    pub guest_port: u32,
    pub created_ns: u64,
}

/// A token bucket shared by every CPU, map `icmp_rate`: the ICMP errors
/// kvnet itself sends (frag-needed), at most [`ICMP_RATE`] a second, as the
/// kernel limits its own (net.ipv4.icmp_msgs_per_sec).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct RateBucket {
    pub tokens: u32,
    pub _pad: u32,
    pub last_ns: u64,
}

pub const ICMP_RATE: u32 = 1000;
