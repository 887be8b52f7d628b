//! Ports: their configuration (map `ports`), flags, VLAN modes and port security limits.
use bytemuck::{Pod, Zeroable};

use crate::{PORT_IPS, PORT_MACS};

/// Port VLAN modes ([`PortConfig::vlan_mode`]).
/// No VLAN config: the port carries untagged frames only, in VLAN 0.
pub const VLAN_MODE_NONE: u16 = 0;
/// Untagged on the wire, member of VLAN `pvid`.
pub const VLAN_MODE_ACCESS: u16 = 1;
/// Tagged frames of the VLANs in `vlan_members`; untagged frames belong to
/// `native_vid` when it is not 0 and are dropped otherwise.
pub const VLAN_MODE_TRUNK: u16 = 2;

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
/// A routed/NAT uplink also carries at least one NAT network.
pub const PORT_F_UPLINK_NAT: u32 = 1 << 8;
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
/// The device may hand a frame to XDP with its VLAN tag already taken out
/// into skb metadata (rx VLAN offload, a veth passing on its peer's
/// offloaded tag, a macvlan's lower device), where XDP cannot see it: the
/// XDP hook sends frames without an in-band tag on to tc, which can.
pub const PORT_F_RX_VLAN_STRIPPED: u32 = 1 << 11;

/// Isolated (libvirt's `<port isolated>`): no frame from another isolated
/// port of the network reaches it, switched or routed; the gateway, the
/// uplink and non-isolated ports still do. Drop reason `isolated`.
pub const PORT_F_ISOLATED: u32 = 1 << 12;
/// The port has rate limits in map `port_policy`: tc polices what the
/// guest sends (ingress) and, through the egress program, what it gets.
pub const PORT_F_RATE_LIMITED: u32 = 1 << 13;
/// The network advertises IPv6 prefixes (`--gateway6`): guests pick their
/// SLAAC addresses themselves, so the IP source guard leaves IPv6 sources
/// alone (it holds them to link-local otherwise).
pub const PORT_F_V6_SLAAC: u32 = 1 << 14;

/// skb->mark of frames kvnet hands to a host stack through an uplink's
/// ingress (bridged mode); the uplink's own program lets them pass.
pub const KVNET_HOST_MARK: u32 = 0x6b76_6e74;

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
