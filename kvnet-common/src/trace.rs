//! `kvnet trace`: the filter (map `trace_cfg`) and the events (ring `trace`).
use bytemuck::{Pod, Zeroable};

use crate::CtKey;

/// `kvnet trace`'s filter, map `trace_cfg` (one entry). `enabled == 0`:
/// nobody traces and the datapath skips tracing after one array lookup.
/// Zero fields match anything.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceFilter {
    pub enabled: u32,
    /// Ingress or egress ifindex.
    pub ifindex: u32,
    /// Source or destination, before or after NAT (network order).
    pub ip: u32,
    pub proto: u8,
    /// 1: `mac` must be the source or destination MAC.
    pub has_mac: u8,
    pub mac: [u8; 6],
}

/// Where a trace event was taken ([`TraceEvent::hook`]).
pub const TRACE_HOOK_XDP: u8 = 0;
pub const TRACE_HOOK_TC: u8 = 1;
pub const TRACE_HOOK_TC_OUT: u8 = 2;
pub const TRACE_HOOK_NAMES: [&str; 3] = ["xdp", "tc", "tc_out"];

/// What the switching core decided ([`TraceEvent::action`]).
pub const TRACE_PASS: u8 = 0;
pub const TRACE_DROP: u8 = 1;
pub const TRACE_UNICAST: u8 = 2;
pub const TRACE_FLOOD: u8 = 3;
pub const TRACE_ROUTE: u8 = 4;
pub const TRACE_NAT_OUT: u8 = 5;
pub const TRACE_NAT_IN: u8 = 6;
pub const TRACE_TO_HOST: u8 = 7;
/// tc egress of an uplink (host frames to guests, the NAT guard); of an
/// uplink group's device, `egress` is the member chosen (0: all of them).
pub const TRACE_EGRESS: u8 = 8;
/// An ARP request answered in the datapath (suppression).
pub const TRACE_ARP_REPLY: u8 = 9;
pub const TRACE_ACTION_NAMES: [&str; 10] = [
    "pass",
    "drop",
    "unicast",
    "flood",
    "route",
    "nat_out",
    "nat_in",
    "to_host",
    "egress",
    "arp_reply",
];

/// One packet's path through a hook, ring buffer `trace`. Tuples as in
/// [`CtKey`]; ICMP carries the type in `sport` and the identifier in
/// `dport`. `after` is read from the packet once the verdict is taken
/// (the NAT translation included).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct TraceEvent {
    pub ts_ns: u64,
    pub ingress: u32,
    /// 0 when the egress is chosen by the kernel (FIB, flood).
    pub egress: u32,
    pub len: u32,
    /// The program's return code (TC_ACT_* / XDP_*).
    pub rc: i32,
    pub vid: u16,
    pub hook: u8,
    pub action: u8,
    /// DropReason + 1 when the switching core dropped, else 0.
    pub reason: u8,
    pub _pad: [u8; 3],
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub _pad2: [u8; 4],
    pub before: CtKey,
    pub after: CtKey,
}
