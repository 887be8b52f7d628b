//! Names of the pinned maps and programs, as `bpftool` shows them (the
//! kernel keeps 15 characters of an object name).

pub const MAP_PORTS: &str = "ports";
pub const MAP_FDB: &str = "fdb";
pub const MAP_FLOOD: &str = "flood";
pub const MAP_PORT_STATS: &str = "port_stats";
pub const MAP_VLAN_MEMBERS: &str = "vlan_members";
pub const MAP_NETS: &str = "nets";
pub const MAP_GW_HOSTS: &str = "gw_hosts";
pub const MAP_CT: &str = "ct";
pub const MAP_CT6: &str = "ct6";
pub const MAP_FORWARDS6: &str = "forwards6";
pub const MAP_NAT6_NETS: &str = "nat6_nets";
pub const MAP_NAT6_SUBNETS: &str = "nat6_subnets";
pub const MAP_NAT6_PROG: &str = "nat6_prog";
pub const MAP_FORWARDS: &str = "forwards";
pub const MAP_NAT_STATS: &str = "nat_stats";
pub const MAP_NAT_SUBNETS: &str = "nat_subnets";
pub const MAP_NAT_FRAGS: &str = "nat_frags";
pub const MAP_NAT_MAPPINGS: &str = "nat_mappings";
pub const MAP_ICMP_RATE: &str = "icmp_rate";
pub const MAP_TRACE_CFG: &str = "trace_cfg";
pub const MAP_TRACE: &str = "trace";
pub const MAP_MAC_OWNERS: &str = "mac_owners";
pub const MAP_CT_QUOTA: &str = "ct_quota";
pub const MAP_FDB_COUNT: &str = "fdb_count";
pub const MAP_NEIGH: &str = "neigh";
pub const MAP_PORT_POLICY: &str = "port_policy";
pub const MAP_UPLINK_GROUPS: &str = "uplink_groups";
pub const MAP_UPLINK_MEMBERS: &str = "uplink_members";
pub const MAP_VXLAN_NETS: &str = "vxlan_nets";
pub const MAP_VXLAN_VNIS: &str = "vxlan_vnis";
pub const MAP_VTEPS: &str = "vteps";
pub const MAP_FDB_REMOTE: &str = "fdb_remote";
pub const MAP_V6_OWNERS: &str = "v6_owners";
pub const MAP_V6_CLAIMS: &str = "v6_claims";
/// One u32: the [`LAYOUT_VERSION`](super::LAYOUT_VERSION) of the pinned datapath.
pub const MAP_LAYOUT: &str = "layout";
pub const PROG_TC_OUT: &str = "kvnet_tc_out";
pub const PROG_XDP: &str = "kvnet_xdp";
pub const PROG_TC: &str = "kvnet_tc";
pub const PROG_NAT6: &str = "kvnet_nat6";
/// The IPv6 source guard, tail-called from `kvnet_tc` (map `savi_jump`).
pub const PROG_SAVI: &str = "kvnet_savi";
pub const MAP_SAVI_JUMP: &str = "savi_jump";
