//! Types shared by the eBPF datapath and the `kvnet` daemon.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding and no
//! `bool`, so both sides agree on the bytes and bytemuck can check them.
#![no_std]

use bytemuck::{Pod, Zeroable};

/// Names of the pinned maps and programs, as `bpftool` shows them
/// (the kernel keeps 15 characters of an object name).
pub mod names {
    pub const MAP_PORTS: &str = "ports";
    pub const MAP_FDB: &str = "fdb";
    pub const MAP_FLOOD: &str = "flood";
    pub const MAP_PORT_STATS: &str = "port_stats";
    pub const MAP_VLAN_MEMBERS: &str = "vlan_members";
    pub const MAP_NETS: &str = "nets";
    pub const MAP_GW_HOSTS: &str = "gw_hosts";
    pub const MAP_CT: &str = "ct";
    pub const MAP_FORWARDS: &str = "forwards";
    pub const MAP_NAT_STATS: &str = "nat_stats";
    pub const MAP_NAT_SUBNETS: &str = "nat_subnets";
    pub const MAP_TRACE_CFG: &str = "trace_cfg";
    pub const MAP_TRACE: &str = "trace";
    pub const MAP_MAC_OWNERS: &str = "mac_owners";
    pub const MAP_CT_QUOTA: &str = "ct_quota";
    pub const MAP_FDB_COUNT: &str = "fdb_count";
    /// One u32: the [`LAYOUT_VERSION`](super::LAYOUT_VERSION) of the pinned datapath.
    pub const MAP_LAYOUT: &str = "layout";
    pub const PROG_TC_OUT: &str = "kvnet_tc_out";
    pub const PROG_XDP: &str = "kvnet_xdp";
    pub const PROG_TC: &str = "kvnet_tc";
}

/// Largest number of ports one network (flood domain) can hold: the tc
/// flood loop is bounded by it.
pub const MAX_FLOOD_PORTS: usize = 64;
pub const MAX_PORTS: u32 = 4096;
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

/// The version of the pinned maps' layouts (key and value types and what
/// they mean), recorded in the pinned map `layout`. Bump it with any change
/// to a pinned map and teach `kvnet-userspace/src/layout.rs` to carry the
/// previous version's contents over, so a running datapath upgrades in place.
/// 1: the first edition (no `layout` map); 2: port security (issue 13).
pub const LAYOUT_VERSION: u32 = 2;

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

/// Port VLAN modes ([`PortConfig::vlan_mode`]).
/// No VLAN config: the port carries untagged frames only, in VLAN 0.
pub const VLAN_MODE_NONE: u16 = 0;
/// Untagged on the wire, member of VLAN `pvid`.
pub const VLAN_MODE_ACCESS: u16 = 1;
/// Tagged frames of the VLANs in `vlan_members`; untagged frames belong to
/// `native_vid` when it is not 0 and are dropped otherwise.
pub const VLAN_MODE_TRUNK: u16 = 2;

/// A learned entry is rewritten at most this often while it stays on the
/// same port, so the hot path does not bounce the entry's cache line.
pub const FDB_REFRESH_NS: u64 = 1_000_000_000;

/// Port flags ([`PortConfig::flags`]).
pub const PORT_F_HAIRPIN: u32 = 1 << 0;
/// The port's XDP program is attached and may redirect on its own.
pub const PORT_F_XDP: u32 = 1 << 1;
/// XDP may redirect frames into this port. Not set on veth ports: a frame
/// XDP-redirected into a veth is lost unless the far end runs NAPI, which
/// kvnet can neither see nor set for a guest; tc carries those instead.
pub const PORT_F_XDP_TX: u32 = 1 << 2;
/// The port belongs to a routed (or NAT) network: frames to the gateway MAC
/// may be routed in the fast path (see map `nets`).
pub const PORT_F_ROUTED_NET: u32 = 1 << 3;
/// A routed network's uplink: not an L2 member of any network; traffic for
/// a guest subnet arriving on it is routed straight to the guest's port.
pub const PORT_F_UPLINK_ROUTED: u32 = 1 << 4;
/// A bridged network's uplink (the physical NIC as a switch port): frames
/// for the host's own MAC go to its stack untouched, broadcasts to both.
pub const PORT_F_UPLINK_BRIDGED: u32 = 1 << 5;
/// The port belongs to a bridged network: its floods also go up the
/// uplink's host stack.
pub const PORT_F_BRIDGED_NET: u32 = 1 << 6;
/// A guest port allowed to act as a DHCP server (send from UDP port 67).
/// Gateway ports and uplinks are trusted by their role; untrusted guest
/// ports have server-to-client DHCP dropped (drop reason `rogue_dhcp`).
pub const PORT_F_TRUSTED: u32 = 1 << 7;
/// Port security (a guest port, on by default): frames only from the MACs
/// the port owns ([`PortConfig::macs`], sticky up to `max_macs`), ARP only
/// with that MAC as sender. Drop reasons `mac_spoof`, `fdb_limit`,
/// `arp_spoof`.
pub const PORT_F_GUARDED: u32 = 1 << 9;
/// IP source guard even while the port has no binding yet (kvnet serves
/// DHCP on its network, or `--ip` was given): IPv4 and ARP senders must be
/// in [`PortConfig::ips`] (0.0.0.0 DHCP/probes allowed). A guarded port
/// with bindings learned by DHCP snooping is checked the same way.
pub const PORT_F_IP_GUARD: u32 = 1 << 10;

/// skb->mark of frames kvnet hands to a host stack through an uplink's
/// ingress (bridged mode); the uplink's own program lets them pass.
pub const KVNET_HOST_MARK: u32 = 0x6b76_6e74;

/// Per-network settings the datapath needs, map `nets` keyed by net id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NetConfig {
    /// ifindex of the gateway interface's host end (`kvnet-NET`).
    pub gw_host: u32,
    /// ifindex of its switch-port end.
    pub gw_port: u32,
    /// ifindex of the uplink (bridged: the NIC that is also a port).
    pub uplink: u32,
    pub flags: u32,
    pub gw_mac: [u8; 6],
    pub _pad: [u8; 2],
    /// NAT networks: the uplink's address (network order), followed by the
    /// daemon when it changes.
    pub nat_ip: u32,
    /// The guests' subnet and mask (network order): never translated.
    pub subnet: u32,
    pub mask: u32,
    /// Source ports handed out, [port_lo, port_hi], minus the host's own
    /// ephemeral range [skip_lo, skip_hi] so host sockets are never hijacked.
    pub port_lo: u16,
    pub port_hi: u16,
    pub skip_lo: u16,
    pub skip_hi: u16,
    /// The VLAN the gateway port is an (access) member of; routing and NAT
    /// serve guests of that VLAN.
    pub gw_vid: u16,
    pub _pad2: u16,
    /// The gateway's own address (network order): no guest may claim it.
    pub gw_ip: u32,
    /// NAT: flows one guest port may have open at once (0: no limit).
    pub ct_quota: u32,
}

/// [`NetConfig::flags`]: masquerade traffic leaving through the uplink.
pub const NET_F_NAT: u32 = 1 << 0;
/// The network accepts no new connections routed in from other kvnet
/// networks or the outside (NAT and host-only, as libvirt's FORWARD rules).
pub const NET_F_CLOSED: u32 = 1 << 1;
/// A routed/NAT uplink also carries at least one NAT network.
pub const PORT_F_UPLINK_NAT: u32 = 1 << 8;

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
    pub _pad: u32,
}

/// The entry of the direction that opened the flow.
pub const CT_F_ORIGINAL: u32 = 1 << 0;
/// The flow was opened from outside by a port forward (DNAT).
pub const CT_F_DNAT: u32 = 1 << 1;
pub const CT_F_SYN: u32 = 1 << 4;
pub const CT_F_ACK: u32 = 1 << 5;
pub const CT_F_FIN: u32 = 1 << 6;
pub const CT_F_RST: u32 = 1 << 7;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

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

/// NAT counters per network, per-CPU hash `nat_stats` keyed by net id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NatStats {
    /// Packets translated.
    pub translated: u64,
    /// New flows (SNAT and port forwards).
    pub new_flows: u64,
    pub icmp_errors: u64,
    /// New flows refused: conntrack table full.
    pub drop_table_full: u64,
    /// New flows refused: no free port for that destination.
    pub drop_no_port: u64,
    /// Not translatable (fragments, ICMP other than echo and errors).
    pub drop_unsupported: u64,
    /// Guest packets that reached the uplink untranslated (through the
    /// host stack: other IP protocols, fragments) and were stopped there.
    pub drop_untranslated: u64,
    /// New flows to a port forward beyond its rate.
    pub drop_forward_rate: u64,
    /// New flows of a guest that has its quota of open flows.
    pub drop_ct_quota: u64,
}

impl NatStats {
    pub fn add(&mut self, o: &NatStats) {
        self.translated += o.translated;
        self.new_flows += o.new_flows;
        self.icmp_errors += o.icmp_errors;
        self.drop_table_full += o.drop_table_full;
        self.drop_no_port += o.drop_no_port;
        self.drop_unsupported += o.drop_unsupported;
        self.drop_untranslated += o.drop_untranslated;
        self.drop_forward_rate += o.drop_forward_rate;
        self.drop_ct_quota += o.drop_ct_quota;
    }
}

/// Port configuration, map `ports`, keyed by ifindex (u32). The port
/// security bindings live here too, so checking them costs no lookup.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortConfig {
    pub net_id: u32,
    pub flags: u32,
    /// `VLAN_MODE_*`.
    pub vlan_mode: u16,
    /// The VLAN untagged (and priority-tagged) frames are assigned to:
    /// the access VLAN, the trunk's native VLAN, or 0 (mode none).
    pub pvid: u16,
    /// Trunk native VLAN, 0 for none (then untagged frames are dropped).
    pub native_vid: u16,
    /// Port security ([`PORT_F_GUARDED`]): how many source MACs the port may
    /// own, and how many it owns (`macs[..mac_count]`, given by the daemon
    /// or claimed by the datapath on first sight, sticky).
    pub max_macs: u8,
    pub mac_count: u8,
    pub macs: [[u8; 6]; PORT_MACS],
    /// IPv4 source bindings (network order), `ips[..ip_count]`: given by
    /// the daemon (`--ip`) or snooped from DHCP replies to the port's MAC
    /// (then written round-robin at `ip_next`, past the first `ip_fixed`
    /// slots, which hold the daemon's).
    pub ips: [u32; PORT_IPS],
    pub ip_count: u8,
    pub ip_next: u8,
    pub ip_fixed: u8,
    pub _pad: u8,
}

impl PortConfig {
    pub fn owned_macs(&self) -> &[[u8; 6]] {
        &self.macs[..(self.mac_count as usize).min(PORT_MACS)]
    }
    pub fn bound_ips(&self) -> &[u32] {
        &self.ips[..(self.ip_count as usize).min(PORT_IPS)]
    }
}

/// FDB key, map `fdb`: one MAC table per (network, VLAN).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct FdbKey {
    pub net_id: u32,
    pub vid: u16,
    pub mac: [u8; 6],
}

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
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Pod, Zeroable)]
pub struct FloodSet {
    pub count: u32,
    pub ifindex: [u32; MAX_FLOOD_PORTS],
    pub tagged: u32,
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

/// Why the datapath dropped a frame. The index into [`PortStats::drops`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    /// Truncated or unparsable header.
    Malformed = 0,
    /// Source MAC is multicast/broadcast or zero.
    BadSrcMac = 1,
    /// Destination is the ingress port and hairpin is off.
    Hairpin = 2,
    /// Redirect to the egress port failed.
    RedirectFailed = 3,
    /// The FDB names a port that is not (any more) in this network or VLAN.
    StalePort = 4,
    /// Tagged frame of a VLAN the port is not a (tagged) member of: any tag
    /// on an access or untagged port, a VID outside a trunk's list.
    VlanNotAllowed = 5,
    /// Untagged frame on a trunk without a native VLAN.
    VlanUntagged = 6,
    /// 802.1ad / QinQ outer tag (0x88a8, 0x9100): no port carries them.
    Qinq = 7,
    /// A DHCP server message (IPv4 UDP from port 67 or to port 68, DHCPv6
    /// from 547 or to 546) from an untrusted guest port: a rogue server.
    RogueDhcp = 8,
    /// Source MAC owned by another port of the network.
    MacSpoof = 9,
    /// The port owns as many MACs as it may (`--max-macs`).
    FdbLimit = 10,
    /// IPv4 source (or IPv6 beyond link-local) not bound to the port.
    IpSpoof = 11,
    /// ARP whose sender MAC is not the frame's, or whose sender IP is not
    /// bound to the port or is the gateway's.
    ArpSpoof = 12,
    /// IPv6 router advertisement or redirect from a guest port.
    RogueRa = 13,
    /// A VLAN tag left inside the frame after classification (double tag).
    DoubleTag = 14,
    /// A new connection into a NAT or host-only network from another
    /// kvnet network or from outside.
    ForeignNet = 15,
    /// A new NAT flow from a guest that has its quota of open flows.
    CtQuota = 16,
}

pub const DROP_REASONS: usize = 17;
pub const DROP_REASON_NAMES: [&str; DROP_REASONS] = [
    "malformed",
    "bad_src_mac",
    "hairpin",
    "redirect_failed",
    "stale_port",
    "vlan_not_allowed",
    "vlan_untagged",
    "qinq",
    "rogue_dhcp",
    "mac_spoof",
    "fdb_limit",
    "ip_spoof",
    "arp_spoof",
    "rogue_ra",
    "double_tag",
    "foreign_net",
    "ct_quota",
];

/// Per-port counters, per-CPU hash `port_stats` keyed by ifindex.
/// rx_* count frames a port received and kvnet handled; tx_* frames kvnet
/// sent out of the port. xdp_seen/tc_seen count what each hook saw.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct PortStats {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub xdp_seen: u64,
    pub tc_seen: u64,
    pub flooded: u64,
    pub learned: u64,
    /// Frames routed in the fast path (bpf_fib_lookup) from this port.
    pub routed: u64,
    /// Frames handed to the host stack.
    pub to_host: u64,
    /// Source MACs not learned: the network holds MAX_LEARNED_PER_NET.
    pub learn_refused: u64,
    pub drops: [u64; DROP_REASONS],
}

impl PortStats {
    pub fn add(&mut self, o: &PortStats) {
        self.rx_packets += o.rx_packets;
        self.rx_bytes += o.rx_bytes;
        self.tx_packets += o.tx_packets;
        self.tx_bytes += o.tx_bytes;
        self.xdp_seen += o.xdp_seen;
        self.tc_seen += o.tc_seen;
        self.flooded += o.flooded;
        self.learned += o.learned;
        self.routed += o.routed;
        self.to_host += o.to_host;
        self.learn_refused += o.learn_refused;
        for i in 0..DROP_REASONS {
            self.drops[i] += o.drops[i];
        }
    }
}

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
/// tc egress of an uplink (host frames to guests, the NAT guard).
pub const TRACE_EGRESS: u8 = 8;
pub const TRACE_ACTION_NAMES: [&str; 9] = [
    "pass", "drop", "unicast", "flood", "route", "nat_out", "nat_in", "to_host", "egress",
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

#[cfg(feature = "user")]
mod user {
    use super::*;
    unsafe impl aya::Pod for TraceFilter {}
    unsafe impl aya::Pod for PortConfig {}
    unsafe impl aya::Pod for FdbKey {}
    unsafe impl aya::Pod for FdbEntry {}
    unsafe impl aya::Pod for FloodKey {}
    unsafe impl aya::Pod for FloodSet {}
    unsafe impl aya::Pod for PortStats {}
    unsafe impl aya::Pod for NetConfig {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtEntry {}
    unsafe impl aya::Pod for ForwardKey {}
    unsafe impl aya::Pod for ForwardTarget {}
    unsafe impl aya::Pod for NatStats {}
    unsafe impl aya::Pod for VlanMemberKey {}
    unsafe impl aya::Pod for VlanMember {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn token_bucket_refills_at_its_rate_up_to_its_burst() {
        const S: u64 = 1_000_000_000;
        // Empty, 100/s: 10 ms is one token, 5 ms none (time kept), 15 ms
        // one token and 5 ms carried over.
        assert_eq!(refill(0, S, S + 10_000_000, 100), (1, S + 10_000_000));
        assert_eq!(refill(0, S, S + 15_000_000, 100), (1, S + 10_000_000));
        assert_eq!(refill(0, S, S + 5_000_000, 100), (0, S));
        // Never beyond the rate, however long it sat.
        assert_eq!(refill(3, 0, 100 * S, 100), (100, 100 * S));
        // A clock that went backwards adds nothing.
        assert_eq!(refill(5, 2 * S, S, 100), (5, 2 * S));
        // No limit.
        assert_eq!(refill(0, 0, S, 0).0, 0);
    }

    #[test]
    fn layouts_have_no_hidden_padding() {
        assert_eq!(size_of::<PortConfig>(), 60);
        assert_eq!(size_of::<FdbKey>(), 12);
        assert_eq!(size_of::<FdbEntry>(), 16);
        assert_eq!(size_of::<FloodKey>(), 8);
        assert_eq!(size_of::<FloodSet>(), 4 + 4 * MAX_FLOOD_PORTS + 4);
        assert_eq!(size_of::<VlanMemberKey>(), 8);
        assert_eq!(size_of::<VlanMember>(), 4);
        assert_eq!(size_of::<PortStats>(), 8 * (11 + DROP_REASONS));
        assert_eq!(size_of::<NetConfig>(), 56);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 64);
        assert_eq!(size_of::<ForwardKey>(), 8);
        assert_eq!(size_of::<ForwardTarget>(), 32);
        assert_eq!(size_of::<TraceFilter>(), 20);
        assert_eq!(size_of::<TraceEvent>(), 80);
    }
}
