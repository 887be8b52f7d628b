//! The switching decision, written once and executed by both hooks.
use kvnet_common::{DropReason, FloodKey, PortConfig, PORT_F_HAIRPIN};

use crate::{fdb, maps, parse};

pub enum Action {
    /// Not kvnet's business: let the host stack have it.
    Pass,
    Drop(DropReason),
    /// Send out of this port (ifindex, its port flags).
    Unicast(u32, u32),
    /// Send to every port of this flood domain except the ingress one.
    Flood(FloodKey),
}

#[inline(always)]
pub fn decide(ingress: u32, port: &PortConfig, data: usize, data_end: usize) -> Action {
    let Some(eth) = parse::eth(data, data_end) else {
        return Action::Drop(DropReason::Malformed);
    };
    if parse::is_multicast(&eth.src) || parse::is_zero(&eth.src) {
        return Action::Drop(DropReason::BadSrcMac);
    }
    let net_id = port.net_id;
    let vid = 0;
    fdb::learn(net_id, vid, eth.src, ingress);

    let flood = Action::Flood(FloodKey {
        net_id,
        vid,
        _pad: 0,
    });
    if parse::is_multicast(&eth.dst) {
        return flood;
    }
    let Some(egress) = fdb::lookup(net_id, vid, eth.dst) else {
        return flood;
    };
    if egress == ingress {
        return if port.flags & PORT_F_HAIRPIN != 0 {
            Action::Unicast(egress, port.flags)
        } else {
            Action::Drop(DropReason::Hairpin)
        };
    }
    // Never forward into another network, even if the FDB is stale.
    match maps::port(egress) {
        Some(p) if p.net_id == net_id => Action::Unicast(egress, p.flags),
        _ => Action::Drop(DropReason::StalePort),
    }
}
