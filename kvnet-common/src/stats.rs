//! Counters: per port (map `port_stats`), per NAT network (map `nat_stats`) and the drop reasons.
use bytemuck::{Pod, Zeroable};

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
    /// Fragments after the first translated (by the first one's ports).
    pub fragments: u64,
    /// Later fragments from a guest whose first fragment was not seen.
    pub drop_frag_unknown: u64,
    /// ICMP frag-needed kvnet sent for outside packets too big for the
    /// guests' network, and those its rate limit held back.
    pub frag_needed_sent: u64,
    pub frag_needed_limited: u64,
    /// TCP segments too far from their sender's sequence to change a flow's
    /// state (a guessed RST, say): passed on, not believed.
    pub out_of_window: u64,
    /// Flows opened from outside through an endpoint-independent mapping.
    pub eif_flows: u64,
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
        self.fragments += o.fragments;
        self.drop_frag_unknown += o.drop_frag_unknown;
        self.frag_needed_sent += o.frag_needed_sent;
        self.frag_needed_limited += o.frag_needed_limited;
        self.out_of_window += o.out_of_window;
        self.eif_flows += o.eif_flows;
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
    /// Broadcast, multicast or unknown unicast beyond the port's storm
    /// limit (`storm_pps`).
    Storm = 17,
    /// Beyond the port's rate limit (`rate_in` / `rate_out`).
    RateLimit = 18,
    /// From an isolated port to another isolated port.
    Isolated = 19,
}

pub const DROP_REASONS: usize = 20;
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
    "storm",
    "rate_limit",
    "isolated",
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
    /// ARP requests answered in the datapath for a known address
    /// (suppressed: not flooded).
    pub arp_answered: u64,
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
        self.arp_answered += o.arp_answered;
        for i in 0..DROP_REASONS {
            self.drops[i] += o.drops[i];
        }
    }
}
