//! ARP suppression: the addresses kvnet knows the owner of (map `neigh`),
//! answered in the datapath instead of flooded.
use bytemuck::{Pod, Zeroable};

/// (network, VLAN, IPv4 address in network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Pod, Zeroable)]
pub struct NeighKey {
    pub net_id: u32,
    pub vid: u16,
    pub _pad: u16,
    pub ip: u32,
}

/// Who owns the address: its MAC and port (the gateway's port for the
/// gateway's own address).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Pod, Zeroable)]
pub struct NeighEntry {
    pub mac: [u8; 6],
    pub _pad: u16,
    pub ifindex: u32,
}
