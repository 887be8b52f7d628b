//! The pinned maps the daemon owns (names in `kvnet_common::names`).
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, ProgramArray},
};
use kvnet_common::{
    CtEntry, CtKey, FdbEntry, FdbKey, FloodKey, FloodSet, ForwardKey, ForwardTarget, FragKey,
    FragPorts, NatMapKey, NatMapping, NatStats, NeighEntry, NeighKey, NetConfig, PortConfig,
    PortPolicy, PortStats, RateBucket, V6Owner, V6OwnerKey, VlanMember, VlanMemberKey,
    MAX_CT_ENTRIES, MAX_FDB_ENTRIES, MAX_FLOOD_DOMAINS, MAX_FORWARDS, MAX_MAC_OWNERS,
    MAX_NAT_FRAGS, MAX_NAT_MAPPINGS, MAX_NEIGH_ENTRIES, MAX_NETWORKS, MAX_PORTS, MAX_V6_OWNERS,
    MAX_VLAN_MEMBERS,
};

/// Map flag: allocate entries as they are written. A flood set is 16 KiB;
/// preallocating every possible domain would pin gigabytes.
const BPF_F_NO_PREALLOC: u32 = 1;

/// The layout version of these maps (`kvnet_common::LAYOUT_VERSION`),
/// written by the daemon: what a newer daemon reads to upgrade in place.
#[map(name = "layout")]
pub static LAYOUT: Array<u32> = Array::pinned(1, 0);

#[map(name = "ports")]
pub static PORTS: HashMap<u32, PortConfig> = HashMap::pinned(MAX_PORTS, 0);

#[map(name = "fdb")]
pub static FDB: HashMap<FdbKey, FdbEntry> = HashMap::pinned(MAX_FDB_ENTRIES, 0);

/// (network, VLAN, MAC) -> the ifindex of the port that owns it (port
/// security): claimed with BPF_NOEXIST, freed by the daemon with the port.
#[map(name = "mac_owners")]
pub static MAC_OWNERS: HashMap<FdbKey, u32> = HashMap::pinned(MAX_MAC_OWNERS, 0);

/// Guest port ifindex -> NAT flows it has open: counted up by the datapath
/// as it creates them, recounted by the daemon's conntrack GC.
#[map(name = "ct_quota")]
pub static CT_QUOTA: HashMap<u32, u32> = HashMap::pinned(MAX_PORTS, 0);

/// Network id -> learned FDB entries: counted up by the datapath as it
/// learns, recounted by the daemon as it ages (MAX_LEARNED_PER_NET).
#[map(name = "fdb_count")]
pub static FDB_COUNT: HashMap<u32, u32> = HashMap::pinned(MAX_NETWORKS, 0);

#[map(name = "flood")]
pub static FLOOD: HashMap<FloodKey, FloodSet> =
    HashMap::pinned(MAX_FLOOD_DOMAINS, BPF_F_NO_PREALLOC);

/// (network, VLAN, IPv4) -> its owner's MAC and port: ARP requests for
/// these are answered in the datapath (suppression). Written by the daemon
/// (bindings, gateways) and by DHCP snooping.
#[map(name = "neigh")]
pub static NEIGH: HashMap<NeighKey, NeighEntry> = HashMap::pinned(MAX_NEIGH_ENTRIES, 0);

/// Ifindex -> storm control and rate limits (buckets refilled in place).
#[map(name = "port_policy")]
pub static PORT_POLICY: HashMap<u32, PortPolicy> = HashMap::pinned(MAX_PORTS, 0);

#[map(name = "port_stats")]
pub static PORT_STATS: PerCpuHashMap<u32, PortStats> = PerCpuHashMap::pinned(MAX_PORTS, 0);

#[map(name = "vlan_members")]
pub static VLAN_MEMBERS: HashMap<VlanMemberKey, VlanMember> = HashMap::pinned(MAX_VLAN_MEMBERS, 0);

/// Conntrack: both directions of every translated flow.
#[map(name = "ct")]
pub static CT: HashMap<CtKey, CtEntry> = HashMap::pinned(MAX_CT_ENTRIES, 0);

#[map(name = "forwards")]
pub static FORWARDS: HashMap<ForwardKey, ForwardTarget> = HashMap::pinned(MAX_FORWARDS, 0);

/// NAT networks' guest subnets -> net id: what must never leave an
/// uplink untranslated.
#[map(name = "nat_subnets")]
pub static NAT_SUBNETS: LpmTrie<u32, u32> = LpmTrie::pinned(MAX_NETWORKS, 0);

/// Fragmented datagrams through the NAT: the first fragment's ports, for
/// the fragments after it (least recently used go first).
#[map(name = "nat_frags")]
pub static NAT_FRAGS: LruHashMap<FragKey, FragPorts> = LruHashMap::pinned(MAX_NAT_FRAGS, 0);

/// Endpoint-independent UDP mappings, both sides of each.
#[map(name = "nat_mappings")]
pub static NAT_MAPPINGS: HashMap<NatMapKey, NatMapping> = HashMap::pinned(MAX_NAT_MAPPINGS, 0);

/// Where NAT builds a new flow's entries (one per CPU, not pinned): the
/// path's stack has no room for them.
#[map(name = "ct_scratch")]
pub static CT_SCRATCH: PerCpuArray<CtEntry> = PerCpuArray::with_max_entries(1, 0);

/// The FIB helper's argument, one per CPU (not pinned): 64 bytes the
/// datapath's stack does not have.
#[map(name = "fib_scratch")]
pub static FIB_SCRATCH: PerCpuArray<aya_ebpf::bindings::bpf_fib_lookup> =
    PerCpuArray::with_max_entries(1, 0);

/// The rate of the ICMP errors kvnet sends itself.
#[map(name = "icmp_rate")]
pub static ICMP_RATE: Array<RateBucket> = Array::pinned(1, 0);

#[map(name = "nat_stats")]
pub static NAT_STATS: PerCpuHashMap<u32, NatStats> = PerCpuHashMap::pinned(MAX_NETWORKS, 0);

/// (network, IPv6 address) -> the guarded port that owns it (FCFS SAVI,
/// `savi.rs`): claimed with BPF_NOEXIST on first use, bound by the daemon
/// (leases, static hosts, EUI-64), released by it with the port or when
/// idle. Allocated as claimed: most ports use two or three addresses.
#[map(name = "v6_owners")]
pub static V6_OWNERS: HashMap<V6OwnerKey, V6Owner> =
    HashMap::pinned(MAX_V6_OWNERS, BPF_F_NO_PREALLOC);

/// Port ifindex -> IPv6 addresses it claimed by using them: counted up by
/// the datapath, recounted by the daemon as claims age out.
#[map(name = "v6_claims")]
pub static V6_CLAIMS: HashMap<u32, u32> = HashMap::pinned(MAX_PORTS, 0);

/// The IPv6 source guard's jump table (`savi.rs`): slot 0 `kvnet_savi`,
/// slot 1 `kvnet_tc`, filled by the daemon. Pinned: attached programs
/// keep jumping while no daemon runs.
#[map(name = "savi_jump")]
pub static SAVI_JUMP: ProgramArray = ProgramArray::pinned(2, 0);

/// Set by `kvnet_savi` right before it jumps back into `kvnet_tc` (same
/// CPU, no preemption in between), cleared by `kvnet_tc` as it reads it:
/// the frame is checked.
#[map(name = "savi_passed")]
pub static SAVI_PASSED: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[map(name = "nets")]
pub static NETS: HashMap<u32, NetConfig> = HashMap::pinned(MAX_NETWORKS, 0);

/// Gateway host interface ifindex -> its network's id: where a FIB result
/// pointing at `kvnet-NET` really leads.
#[map(name = "gw_hosts")]
pub static GW_HOSTS: HashMap<u32, u32> = HashMap::pinned(MAX_NETWORKS, 0);

#[inline(always)]
pub fn net(net_id: u32) -> Option<NetConfig> {
    unsafe { NETS.get(&net_id).copied() }
}

#[inline(always)]
pub fn gw_host_net(ifindex: u32) -> Option<u32> {
    unsafe { GW_HOSTS.get(&ifindex).copied() }
}

/// A port's membership flags in `vid` (`VLAN_M_*`), None if not a member.
#[inline(always)]
pub fn vlan_member(ifindex: u32, vid: u16) -> Option<u32> {
    let key = VlanMemberKey {
        ifindex,
        vid,
        _pad: 0,
    };
    unsafe { VLAN_MEMBERS.get(&key) }.map(|m| m.flags)
}

/// The port's entry in place: copying it (bindings included) would cost
/// stack the verifier does not have to spare.
#[inline(always)]
pub fn port(ifindex: u32) -> Option<&'static PortConfig> {
    unsafe { PORTS.get(&ifindex) }
}

#[inline(always)]
pub fn flood_set(key: &FloodKey) -> Option<&'static FloodSet> {
    unsafe { FLOOD.get(key) }
}

/// NAT66 conntrack: both directions of every translated IPv6 flow.
#[map(name = "ct6")]
pub static CT6: HashMap<kvnet_common::Ct6Key, kvnet_common::Ct6Entry> =
    HashMap::pinned(kvnet_common::MAX_CT6_ENTRIES, 0);

/// IPv6 port forwards: (uplink, proto, port) -> guest.
#[map(name = "forwards6")]
pub static FORWARDS6: HashMap<ForwardKey, kvnet_common::Forward6Target> =
    HashMap::pinned(MAX_FORWARDS, 0);

/// NAT66 networks: net id -> the uplink's IPv6 address.
#[map(name = "nat6_nets")]
pub static NAT6_NETS: HashMap<u32, kvnet_common::Nat6Config> = HashMap::pinned(MAX_NETWORKS, 0);

/// NAT66 networks' guest prefixes -> net id: who may be translated, and
/// what must never leave an uplink untranslated.
#[map(name = "nat6_subnets")]
pub static NAT6_SUBNETS: LpmTrie<kvnet_common::Addr6, u32> =
    LpmTrie::pinned(kvnet_common::MAX_NAT6_SUBNETS, 0);

/// Where NAT66 builds a new flow's entries (one per CPU, not pinned).
#[map(name = "ct6_scratch")]
pub static CT6_SCRATCH: PerCpuArray<kvnet_common::Ct6Entry> = PerCpuArray::with_max_entries(1, 0);

/// The NAT66 program (`kvnet_nat6`), index 0: tc tail-calls it. Pinned so
/// the entry outlives the daemon (a prog array empties when its last user
/// reference goes).
#[map(name = "nat6_prog")]
pub static NAT6_PROG: aya_ebpf::maps::ProgramArray = aya_ebpf::maps::ProgramArray::pinned(1, 0);
