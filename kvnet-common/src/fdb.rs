//! The MAC table (map `fdb`), MAC owners, flood sets and VLAN membership.
use bytemuck::{Pod, Zeroable};

use crate::MAX_FLOOD_PORTS;

/// A learned entry is rewritten at most this often while it stays on the
/// same port, so the hot path does not bounce the entry's cache line.
pub const FDB_REFRESH_NS: u64 = 1_000_000_000;

/// FDB key, map `fdb`: one MAC table per (network, VLAN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FdbKey {
    pub net_id: u32,
    pub vid: u16,
    pub mac: [u8; 6],
}

/// The VID of the network-wide entry learning keeps beside each VLAN's
/// (never a real VID): which port sent from a MAC last, in any VLAN, so the
/// MAC guard refuses a claim on a MAC busy in another VLAN. Not a
/// forwarding entry: listings and counts leave it out.
pub const FDB_VID_ANY: u16 = 0xffff;

/// The `mac_owners` key of `mac` in network `net_id`: a guest owns its MAC
/// in the whole network, whatever VLAN it is seen in (so a trunk guest's MAC
/// cannot be claimed in another of its VLANs, nor a neighbour's MAC taken
/// through a VLAN the neighbour is not in).
#[inline(always)]
pub fn owner_key(net_id: u32, mac: [u8; 6]) -> FdbKey {
    FdbKey {
        net_id,
        vid: 0,
        mac,
    }
}

/// FDB entry flags.
pub const FDB_F_STATIC: u32 = 1 << 0;
/// The host's own MAC on a bridged uplink: frames to it go up that
/// uplink's stack.
pub const FDB_F_HOST: u32 = 1 << 1;

/// FDB value: where the MAC lives and when it was last seen
/// (`bpf_ktime_get_ns`, i.e. CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct FdbEntry {
    pub ifindex: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
}

/// Flood domain key, map `flood`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FloodKey {
    pub net_id: u32,
    pub vid: u16,
    pub _pad: u16,
}

/// The ports of one flood domain (network, VLAN). Written whole by the
/// daemon: ports that want the frame untagged first, then the last
/// `tagged` ones that want it tagged, so a flood changes the tag at most
/// once. (A set written without VLANs in mind, `tagged` 0, is all untagged.)
/// Each member is an ifindex, with [`FLOOD_M_ISOLATED`] for isolated ports.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FloodSet {
    pub count: u32,
    pub tagged: u32,
    pub members: [u32; MAX_FLOOD_PORTS],
}

/// [`FloodSet::members`]: the port is isolated (floods from isolated ports
/// skip it). The rest of the word is the ifindex.
pub const FLOOD_M_ISOLATED: u32 = 1 << 31;
pub const FLOOD_M_IFINDEX: u32 = !FLOOD_M_ISOLATED;

impl FloodSet {
    pub fn ifindex(&self, i: usize) -> u32 {
        self.members[i] & FLOOD_M_IFINDEX
    }
}

/// Key of map `vlan_members`: a port's membership in one VLAN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct VlanMemberKey {
    pub ifindex: u32,
    pub vid: u16,
    pub _pad: u16,
}

/// [`VlanMember::flags`]: the port sends this VLAN's frames tagged (and,
/// on a trunk, accepts them tagged). Without it: untagged (access, native).
pub const VLAN_M_TAGGED: u32 = 1 << 0;

/// Value of map `vlan_members`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct VlanMember {
    pub flags: u32,
}

impl Default for FloodSet {
    fn default() -> Self {
        Zeroable::zeroed()
    }
}
