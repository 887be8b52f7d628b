//! IPv6 source address validation (FCFS SAVI, RFC 6620) on networks where
//! guests pick their own addresses (SLAAC, [`PORT_F_V6_SLAAC`]): the first
//! guarded port to use an address in a network owns it (map `v6_owners`),
//! and no other port may send from it or advertise it in ND.
//!
//! [`PORT_F_V6_SLAAC`]: crate::PORT_F_V6_SLAAC
use bytemuck::{Pod, Zeroable};

use crate::MAX_PORTS;

/// Addresses one port may claim by using them (the daemon's own bindings
/// are not counted): a guest cycling through random sources fills its own
/// quota, not the table.
pub const V6_CLAIMS_PER_PORT: u32 = 16;
/// Owned (network, IPv6 address)s: every port's claims plus room for the
/// daemon's bindings (leases, static hosts, EUI-64 addresses, gateways).
pub const MAX_V6_OWNERS: u32 = MAX_PORTS * (V6_CLAIMS_PER_PORT + 4);
/// The datapath rewrites an owned address's `last_seen_ns` at most this
/// often, so a busy flow does not bounce the entry's cache line.
pub const V6_OWNER_REFRESH_NS: u64 = 10_000_000_000;
/// A claim unused this long is released by the daemon (privacy addresses
/// rotate; the port's quota comes back).
pub const V6_OWNER_IDLE_NS: u64 = 30 * 60 * 1_000_000_000;

/// Key of map `v6_owners`: an address in a network (link-local ones too:
/// a network is one link, whatever its VLANs).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct V6OwnerKey {
    pub net_id: u32,
    pub addr: [u8; 16],
}

/// [`V6Owner::flags`]: bound by the daemon (a DHCPv6 lease, a static host,
/// the EUI-64 address of a port's configured MAC, a gateway address):
/// never aged, not counted in the port's claims.
pub const V6_OWNER_F_DAEMON: u32 = 1 << 0;

/// Value of map `v6_owners`: the owning port and when it last used the
/// address (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct V6Owner {
    pub ifindex: u32,
    pub flags: u32,
    pub last_seen_ns: u64,
}
