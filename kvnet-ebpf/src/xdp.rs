//! The XDP hook: finishes what it can without an skb (known unicast to
//! ports that take XDP redirects, drops) and hands the rest to tc.
use aya_ebpf::{bindings::xdp_action, helpers::bpf_redirect, programs::XdpContext};
use aya_log_ebpf::debug;
use kvnet_common::{
    DropReason, PORT_F_ISOLATED, PORT_F_RX_VLAN_STRIPPED, PORT_F_XDP_TX, VLAN_MODE_TRUNK,
};

use crate::{
    csum, maps,
    pipeline::{self, Tag, Verdict},
    stats,
    vlan::xdp_retag,
};

#[inline(always)]
pub fn run(ctx: &XdpContext) -> (u32, u32) {
    let ingress = unsafe { (*ctx.ctx).ingress_ifindex };
    let (data, data_end) = (ctx.data(), ctx.data_end());
    let len = (data_end - data) as u64;
    let Some(port) = maps::port(ingress) else {
        return (xdp_action::XDP_PASS, 0);
    };
    stats::seen_xdp(ingress);
    if port.flags & PORT_F_ISOLATED != 0 {
        // Isolation is checked in tc, which sees routed frames too.
        return (xdp_action::XDP_PASS, 0);
    }
    let tag = Tag::of(data, data_end, None);
    // A NIC with rx VLAN offload strips the tag before XDP sees it; only
    // tc can tell an untagged frame from a stripped tagged one. On a trunk
    // whatever the device; elsewhere on devices the daemon found stripping,
    // where a tagged frame XDP took for untagged would join the access VLAN.
    if !tag.present()
        && (port.vlan_mode == VLAN_MODE_TRUNK || port.flags & PORT_F_RX_VLAN_STRIPPED != 0)
    {
        return (xdp_action::XDP_PASS, 0);
    }
    // No routing context: routed and host-bound frames go on to tc.
    match pipeline::decide(ingress, &port, data, data_end, &tag, None) {
        Verdict::Pass
        | Verdict::Flood { .. }
        | Verdict::Route { .. }
        | Verdict::ToHost { .. }
        | Verdict::NatOut { .. }
        | Verdict::NatIn
        | Verdict::ArpReply { .. } => (xdp_action::XDP_PASS, 0),
        Verdict::Drop(reason) => {
            stats::rx(ingress, len);
            stats::drop(ingress, reason);
            // Off unless the daemon runs with --log-datapath (AYA_LOG_LEVEL).
            debug!(
                ctx,
                "xdp drop on ifindex {}: reason {}", ingress, reason as u32
            );
            (xdp_action::XDP_DROP, reason as u32)
        }
        Verdict::Unicast {
            egress,
            egress_flags,
            out_tci,
        } => {
            if egress_flags & PORT_F_XDP_TX == 0 {
                return (xdp_action::XDP_PASS, 0);
            }
            // A guest with tx checksum offload hands us TCP/UDP frames whose
            // checksum holds only the pseudo-header sum; XDP cannot see that
            // flag and the receiver would drop them, so frames whose L4
            // checksum we cannot vouch for go on to tc, which keeps the skb.
            if !csum::l4_checksum_complete(data, data_end) {
                return (xdp_action::XDP_PASS, 0);
            }
            if !xdp_retag(ctx, &tag, out_tci) {
                // No headroom for the tag: tc pushes it instead.
                return (xdp_action::XDP_PASS, 0);
            }
            // Received as it came, sent as retagged.
            stats::rx(ingress, len);
            let sent = (ctx.data_end() - ctx.data()) as u64;
            let rc = unsafe { bpf_redirect(egress, 0) } as u32;
            if rc == xdp_action::XDP_REDIRECT {
                stats::tx(egress, sent);
            } else {
                stats::drop(ingress, DropReason::RedirectFailed);
            }
            (rc, egress)
        }
    }
}
