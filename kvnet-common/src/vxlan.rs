//! VXLAN overlays (networks across hosts): one collect_md VXLAN device per
//! host (the VTEP) carries every VXLAN network; tc sets the tunnel key
//! (remote VTEP, VNI) on the way out and reads it on the way in.

/// Remote VTEPs one network floods to (head-end replication). A power of
/// two: the datapath masks indexes with it.
pub const MAX_VTEPS: usize = 32;
/// IANA's VXLAN port.
pub const VXLAN_PORT: u16 = 4789;
/// Outer IPv4 + UDP + VXLAN + inner Ethernet: what the underlay MTU must
/// hold beyond the guests' MTU.
pub const VXLAN_OVERHEAD: u16 = 50;

/// Map `vxlan_nets`, keyed by net id: the network's VNI, the VTEP device
/// and the remote VTEPs its floods go to. Written whole by the daemon.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct VxlanNet {
    pub vni: u32,
    /// ifindex of the VTEP device.
    pub vtep: u32,
    /// This host's VTEP address (network order): the outer source.
    pub local_ip: u32,
    /// How many of `remotes` are in use, first.
    pub count: u32,
    /// Remote VTEP addresses (network order).
    pub remotes: [u32; MAX_VTEPS],
}

impl Default for VxlanNet {
    fn default() -> Self {
        bytemuck::Zeroable::zeroed()
    }
}

impl VxlanNet {
    pub fn remotes(&self) -> &[u32] {
        &self.remotes[..(self.count as usize).min(MAX_VTEPS)]
    }
}
