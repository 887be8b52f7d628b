//! Types shared by the eBPF datapath and the `kvnet` daemon.
//!
//! Every map key and value is `#[repr(C)]`, has explicit padding and no
//! `bool`, so both sides agree on the bytes and bytemuck can check them.
#![no_std]

pub mod names;

mod conntrack;
mod conntrack6;
mod fdb;
mod limits;
mod neigh;
mod net;
mod policy;
mod port;
mod proto;
mod savi;
mod stats;
mod trace;
mod uplink;
mod vxlan;

pub use conntrack::*;
pub use conntrack6::*;
pub use fdb::*;
pub use limits::*;
pub use neigh::*;
pub use net::*;
pub use policy::*;
pub use port::*;
pub use proto::*;
pub use savi::*;
pub use stats::*;
pub use trace::*;
pub use uplink::*;
pub use vxlan::*;

/// The version of the pinned maps' layouts (key and value types and what
/// they mean), recorded in the pinned map `layout`. Bump it with any change
/// to a pinned map and teach `kvnet-userspace/src/datapath/layout.rs` to carry the
/// previous version's contents over, so a running datapath upgrades in place.
/// 1: the first edition (no `layout` map); 2: port security (issue 13);
/// 3: NAT fragments, UDP mappings, ICMP rate and more NAT counters;
/// 4: flood sets of 4096 ports, ARP suppression, port policy (isolation,
/// storm control, rate limits).
pub const LAYOUT_VERSION: u32 = 4;

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
    unsafe impl aya::Pod for FragKey {}
    unsafe impl aya::Pod for FragPorts {}
    unsafe impl aya::Pod for NatMapKey {}
    unsafe impl aya::Pod for NatMapping {}
    unsafe impl aya::Pod for RateBucket {}
    unsafe impl aya::Pod for NeighKey {}
    unsafe impl aya::Pod for NeighEntry {}
    unsafe impl aya::Pod for PortPolicy {}
    unsafe impl aya::Pod for UplinkGroup {}
    unsafe impl aya::Pod for Ct6Key {}
    unsafe impl aya::Pod for Ct6Entry {}
    unsafe impl aya::Pod for Nat6Config {}
    unsafe impl aya::Pod for Forward6Target {}
    unsafe impl aya::Pod for VxlanNet {}
    unsafe impl aya::Pod for V6OwnerKey {}
    unsafe impl aya::Pod for V6Owner {}
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
        assert_eq!(size_of::<FloodSet>(), 8 + 4 * MAX_FLOOD_PORTS);
        assert_eq!(size_of::<NeighKey>(), 12);
        assert_eq!(size_of::<NeighEntry>(), 12);
        assert_eq!(size_of::<PortPolicy>(), 80);
        assert_eq!(size_of::<VlanMemberKey>(), 8);
        assert_eq!(size_of::<VlanMember>(), 4);
        assert_eq!(size_of::<PortStats>(), 8 * (12 + DROP_REASONS));
        assert_eq!(size_of::<NetConfig>(), 56);
        assert_eq!(size_of::<CtKey>(), 16);
        assert_eq!(size_of::<CtEntry>(), 64);
        assert_eq!(size_of::<Ct6Key>(), 40);
        assert_eq!(size_of::<Ct6Entry>(), 88);
        assert_eq!(size_of::<Forward6Target>(), 40);
        assert_eq!(size_of::<ForwardKey>(), 8);
        assert_eq!(size_of::<ForwardTarget>(), 32);
        assert_eq!(size_of::<FragKey>(), 12);
        assert_eq!(size_of::<FragPorts>(), 8);
        assert_eq!(size_of::<NatMapKey>(), 8);
        assert_eq!(size_of::<NatMapping>(), 24);
        assert_eq!(size_of::<RateBucket>(), 16);
        assert_eq!(size_of::<NatStats>(), 15 * 8);
        assert_eq!(size_of::<V6OwnerKey>(), 20);
        assert_eq!(size_of::<V6Owner>(), 16);
        assert_eq!(size_of::<TraceFilter>(), 20);
        assert_eq!(size_of::<TraceEvent>(), 80);
        assert_eq!(size_of::<VxlanNet>(), 16 + 4 * MAX_VTEPS);
    }
}
