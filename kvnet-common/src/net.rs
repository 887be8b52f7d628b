//! Networks: their settings (map `nets`).
use bytemuck::{Pod, Zeroable};

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
/// UDP leaves with endpoint-independent mapping and filtering (RFC 4787
/// REQ-1, REQ-8): one guest socket, one uplink port, reachable from any
/// remote once mapped (`--nat-udp eim`). Off: a mapping per remote.
pub const NET_F_NAT_UDP_EIM: u32 = 1 << 2;
/// IPv6 from the network's guests leaves masqueraded behind the uplink's
/// global IPv6 address (NAT66, `--nat6`; map `nat6_nets` has the address).
pub const NET_F_NAT6: u32 = 1 << 3;
