//! Table sizes and per-port limits: what the maps are created with.
/// Largest number of ports one flood domain (a network's VLAN) can hold:
/// the size of its flood set, which tc walks with `bpf_loop` (a power of
/// two: the walk masks its index with it).
pub const MAX_FLOOD_PORTS: usize = 4096;
/// Ports kvnet holds, all networks together (the port maps' size).
pub const MAX_PORTS: u32 = 16384;
pub const MAX_FDB_ENTRIES: u32 = 1 << 20;
pub const MAX_NETWORKS: u32 = 4096;
/// Default conntrack capacity (entries; a flow takes two). The daemon can
/// size it at load (`--ct-max`).
pub const MAX_CT_ENTRIES: u32 = 262_144;
pub const MAX_FORWARDS: u32 = 4096;
/// Flood domains: one per (network, VLAN) in use.
pub const MAX_FLOOD_DOMAINS: u32 = 16384;
/// (port, VLAN) memberships across all ports.
pub const MAX_VLAN_MEMBERS: u32 = 65536;
/// Learned MACs one network may hold: ports without port security (uplinks,
/// trunks to other switches) learn freely up to this, so a flood from the
/// LAN cannot take the whole FDB. Guest ports are bounded by their own
/// `max_macs` and never lose an entry to it (nothing is evicted).
pub const MAX_LEARNED_PER_NET: u32 = 65536;
/// MACs a guest port can own ([`PortConfig::macs`]).
pub const PORT_MACS: usize = 4;
/// IPv4 source bindings a guest port can hold ([`PortConfig::ips`]).
pub const PORT_IPS: usize = 4;
/// MACs a guarded port may own unless told otherwise (`--max-macs`).
pub const DEFAULT_MAX_MACS: u8 = 1;
/// Owned (network, VLAN, MAC)s: every guest port's MACs plus gateways.
pub const MAX_MAC_OWNERS: u32 = MAX_PORTS * PORT_MACS as u32 + MAX_NETWORKS;
/// (network, VLAN, IPv4) -> owner entries ARP suppression answers from:
/// every port's bindings plus gateways.
pub const MAX_NEIGH_ENTRIES: u32 = MAX_PORTS * PORT_IPS as u32 + MAX_NETWORKS;
/// Default storm control: broadcast, multicast and unknown-unicast frames a
/// second one guest port may flood.
pub const DEFAULT_STORM_PPS: u32 = 2000;
/// Fragmented datagrams in flight through the NAT (LRU: the oldest go).
pub const MAX_NAT_FRAGS: u32 = 16384;
/// UDP mappings (two entries each) of endpoint-independent NAT networks.
pub const MAX_NAT_MAPPINGS: u32 = 131_072;
/// NAT66 conntrack entries (a flow takes two), apart from IPv4's.
pub const MAX_CT6_ENTRIES: u32 = 65_536;
/// IPv6 prefixes of NAT66 networks (several per network).
pub const MAX_NAT6_SUBNETS: u32 = 4096;
