//! Uplink groups (kvnet's bonding): a group is a device of its own (the
//! handle networks name as their uplink, where the host's address lives);
//! its tc egress sends each frame out of the member(s) its mode picks, and
//! the tc ingress of every member treats the frame as arrived on the group.

/// Members a group can hold (the datapath walks them unrolled).
pub const MAX_UPLINK_MEMBERS: usize = 8;
/// Groups kvnet can hold.
pub const MAX_UPLINK_GROUPS: u32 = 64;

/// One member carries everything (`active`); the others take nothing in.
pub const UPLINK_MODE_ACTIVE_BACKUP: u32 = 0;
/// A flow hash picks the member (`UPLINK_HASH_*`).
pub const UPLINK_MODE_BALANCE_XOR: u32 = 1;
/// Members in turn, packet by packet.
pub const UPLINK_MODE_BALANCE_RR: u32 = 2;
/// Every frame out of every member.
pub const UPLINK_MODE_BROADCAST: u32 = 3;
/// 802.3ad: as balance-xor over the aggregated members (`members`, which
/// the daemon's LACP keeps); the others take nothing in.
pub const UPLINK_MODE_LACP: u32 = 4;

/// Slow protocols (LACP, marker): the daemon's, never switched.
pub const ETH_P_SLOW: u16 = 0x8809;

/// Hash of the source and destination MACs.
pub const UPLINK_HASH_L2: u32 = 0;
/// Hash of IPv4 addresses and TCP/UDP ports (MACs for anything else).
pub const UPLINK_HASH_L3L4: u32 = 1;

/// Map `uplink_groups`, keyed by the group device's ifindex. Written whole
/// by the daemon whenever a member's carrier changes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct UplinkGroup {
    /// `UPLINK_MODE_*`.
    pub mode: u32,
    /// `UPLINK_HASH_*` (balance-xor).
    pub hash: u32,
    /// Active-backup: the member that carries traffic (0: none up).
    pub active: u32,
    /// How many of `members` are usable (carrier up), first.
    pub count: u32,
    /// Usable members' ifindexes, `count` of them first.
    pub members: [u32; MAX_UPLINK_MEMBERS],
}

/// Map `uplink_members`: member ifindex -> group ifindex.
pub type UplinkMemberOf = u32;
