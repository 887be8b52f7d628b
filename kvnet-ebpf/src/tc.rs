//! The tc hooks: ingress carries out every verdict (redirects, floods,
//! NAT, host delivery); egress on uplinks guards NAT and delivers the host's
//! frames on a bridged network to its guests.
use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_clone_redirect, bpf_redirect},
    programs::TcContext,
};
use aya_log_ebpf::debug;
use kvnet_common::{
    DropReason, FDB_F_HOST, KVNET_HOST_MARK, PORT_F_BRIDGED_NET, PORT_F_HAIRPIN, PORT_F_ISOLATED,
    PORT_F_RATE_LIMITED, PORT_F_TRUSTED, PORT_F_UPLINK_BRIDGED, PORT_F_UPLINK_NAT,
    PORT_F_UPLINK_ROUTED, TRACE_ARP_REPLY, TRACE_DROP, TRACE_EGRESS, TRACE_FLOOD, TRACE_HOOK_TC,
    TRACE_HOOK_TC_OUT, TRACE_NAT_IN, TRACE_NAT_OUT, TRACE_PASS, TRACE_ROUTE, TRACE_TO_HOST,
    TRACE_UNICAST, VLAN_MODE_TRUNK, VLAN_M_TAGGED,
};

use crate::{
    flood::{tc_flood, FloodArgs},
    pipeline::{Tag, Verdict},
    route::L3Ctx,
    vlan::tc_retag,
};

use crate::{
    bond, fdb, maps,
    nat::{self, Nat, NatKind},
    nat6, neigh, parse, pipeline, policy, stats, trace, vxlan,
};

/// Bytes of an untrusted port's frame tc makes linear before the guards
/// look (headers, IPv6 extension headers, DHCP up to chaddr).
const GUARD_PULL_LEN: u32 = crate::guard::ND_MAX_END as u32;

/// bpf_redirect flag: deliver to the device's receive path (its host stack).
const BPF_F_INGRESS: u64 = 1;

#[inline(always)]
pub fn ingress(ctx: TcContext) -> i32 {
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // A member of an uplink group is its group: one port however many NICs.
    // (No flag carried past this point: the verifier would walk the whole
    // pipeline once per value.)
    let ingress = match bond::member(ifindex) {
        bond::Member::No => ifindex,
        bond::Member::Of(g) => match bond::admit(&ctx, g) {
            Some(rc) => return rc,
            None => g,
        },
        bond::Member::Backup => return bond::backup(&ctx),
    };
    let len = ctx.len() as u64;
    let Some(port) = maps::port(ingress) else {
        // A VTEP device is no port: its frames join their VNI's network.
        return vxlan::ingress(&ctx, ingress);
    };
    if unsafe { (*ctx.skb.skb).mark } == KVNET_HOST_MARK {
        // Handed to this uplink's host stack by kvnet itself.
        ctx.set_mark(0);
        return TC_ACT_OK;
    }
    // On receive the kernel has usually moved the outer tag into
    // skb->vlan_tci already; BPF_PROG_RUN and XDP_PASSed frames may not.
    let hw = unsafe {
        let skb = &*ctx.skb.skb;
        (skb.vlan_present != 0).then(|| (u16::from_be(skb.vlan_proto as u16), skb.vlan_tci as u16))
    };
    if port.flags & (PORT_F_TRUSTED | PORT_F_UPLINK_BRIDGED | PORT_F_UPLINK_ROUTED) == 0 {
        // The guards read headers in place: a guest can hand over an skb
        // whose headers lie beyond its linear part (virtio hdr_len).
        let linear = (ctx.data_end() - ctx.data()) as u32;
        if ctx.len() > linear && linear < GUARD_PULL_LEN {
            let _ = ctx.pull_data(ctx.len().min(GUARD_PULL_LEN));
        }
    }
    // Read once: LLVM may otherwise keep `ctx + offset` around, which the
    // verifier refuses to dereference.
    let (data, data_end) = (ctx.data(), ctx.data_end());
    // IPv6 from a guarded port of a SLAAC network: through kvnet_savi
    // first (it jumps back here once the source is checked).
    if crate::savi::divert(&ctx, port, hw.is_some(), data, data_end) {
        stats::drop(ingress, DropReason::IpSpoof);
        return TC_ACT_SHOT;
    }
    // (After the detour: a frame passes here once.)
    if port.flags & PORT_F_RATE_LIMITED != 0 && !policy::out_allows(ingress, len) {
        stats::drop(ingress, DropReason::RateLimit);
        return TC_ACT_SHOT;
    }
    let tag = Tag::of(data, data_end, hw);
    let l3 = l3_ctx(&ctx);
    let action = pipeline::decide(ingress, &port, data, data_end, &tag, Some(l3));
    // One counter lookup for "seen" and "received" (the hot path's cost is
    // mostly hash lookups).
    stats::seen_tc_rx(ingress, len, !matches!(action, Verdict::Pass));
    if trace::on() {
        let (code, egress, reason) = match &action {
            Verdict::Pass => (TRACE_PASS, 0, 0),
            Verdict::Drop(r) => (TRACE_DROP, 0, *r as u8 + 1),
            Verdict::Unicast { egress, .. } => (TRACE_UNICAST, *egress, 0),
            Verdict::Flood { .. } => (TRACE_FLOOD, 0, 0),
            Verdict::Route { egress } => (TRACE_ROUTE, *egress, 0),
            Verdict::ToHost { uplink } => (TRACE_TO_HOST, *uplink, 0),
            Verdict::NatOut { .. } => (TRACE_NAT_OUT, 0, 0),
            Verdict::NatIn => (TRACE_NAT_IN, 0, 0),
            Verdict::ArpReply { .. } => (TRACE_ARP_REPLY, ingress, 0),
        };
        let vid = tag.tci & kvnet_common::VLAN_VID_MASK;
        trace::begin_tc(&ctx, TRACE_HOOK_TC, ingress, vid, code, egress, reason);
    }
    let mut rc = tc_act(&ctx, ingress, len, &port, action, &tag, l3, data, data_end);
    if rc == TC_ACT_OK && ingress != ifindex {
        // For the host: its address lives on the group device.
        rc = bond::to_group_host(&ctx, ingress, true);
    }
    // Looked up again rather than carried: the verifier then checks the
    // verdict paths once, not once per tracing state.
    if trace::on() {
        trace::finish_tc(&ctx, rc);
    }
    rc
}

/// The tc verdict for `action`: redirects, floods, NAT.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn tc_act(
    ctx: &TcContext,
    ingress: u32,
    len: u64,
    port: &kvnet_common::PortConfig,
    action: Verdict,
    tag: &Tag,
    l3: L3Ctx,
    data: usize,
    data_end: usize,
) -> i32 {
    let mut cur = tag.present().then_some(tag.tci);
    match action {
        Verdict::Pass => TC_ACT_OK,
        Verdict::Drop(reason) => {
            stats::drop(ingress, reason);
            debug!(
                &ctx,
                "tc drop on ifindex {}: reason {}", ingress, reason as u32
            );
            TC_ACT_SHOT
        }
        Verdict::Unicast {
            egress, out_tci, ..
        } => {
            if !tc_retag(&ctx, &mut cur, out_tci) {
                stats::drop(ingress, DropReason::RedirectFailed);
                return TC_ACT_SHOT;
            }
            let rc = unsafe { bpf_redirect(egress, 0) } as i32;
            stats::tx(egress, len);
            rc
        }
        Verdict::Route { egress } => {
            // Routed: the gateway's VLAN ends here, the egress port's begins.
            if !tc_retag(&ctx, &mut cur, None) {
                stats::drop(ingress, DropReason::RedirectFailed);
                return TC_ACT_SHOT;
            }
            route_to(ctx, ingress, egress, len)
        }
        Verdict::NatOut { net_id } => {
            let Some(n) = maps::net(net_id) else {
                return TC_ACT_SHOT;
            };
            // A trunk guest's tag (the gateway's VLAN) stays on this side.
            if !tc_retag(&ctx, &mut cur, None) {
                stats::drop(ingress, DropReason::RedirectFailed);
                return TC_ACT_SHOT;
            }
            let done = if nat6::is_ipv6(ctx) {
                // NAT66 runs as its own program: back here only if missing.
                nat6::tail_call(ctx, net_id, ingress);
                Nat::SKIP
            } else {
                nat::from_guest(ctx, net_id, &n, ingress)
            };
            nat_out_done(ctx, ingress, len, &n, done)
        }
        Verdict::NatIn => {
            let done = if nat6::is_ipv6(ctx) {
                nat6::tail_call(ctx, 0, ingress);
                Nat::SKIP
            } else {
                nat::from_uplink(ctx, ingress)
            };
            nat_in_done(ctx, ingress, len, done, tag, l3, data, data_end)
        }
        Verdict::ArpReply { answer, arp_off } => {
            // (The frame's VLAN, in skb metadata, goes back out with it.)
            if !neigh::make_reply(data, data_end, arp_off, &answer) {
                return TC_ACT_OK;
            }
            stats::arp_answered(ingress);
            stats::tx(ingress, len);
            unsafe { bpf_redirect(ingress, 0) as i32 }
        }
        Verdict::ToHost { uplink } => {
            stats::to_host(ingress);
            ctx.set_mark(KVNET_HOST_MARK);
            unsafe { bpf_redirect(uplink, BPF_F_INGRESS) as i32 }
        }
        Verdict::Flood {
            domain: key,
            out_tci,
        } => {
            if !policy::storm_allows(ingress) {
                stats::drop(ingress, DropReason::Storm);
                return TC_ACT_SHOT;
            }
            stats::flooded(ingress);
            if port.flags & PORT_F_UPLINK_BRIDGED != 0 {
                // From the LAN: the host's stack gets the frame as it came,
                // a clone taken before the flood retags the original.
                ctx.set_mark(KVNET_HOST_MARK);
                unsafe { bpf_clone_redirect(ctx.skb.skb as *mut _, ingress, BPF_F_INGRESS) };
                ctx.set_mark(0);
            } else if port.flags & PORT_F_BRIDGED_NET != 0 && key.vid == 0 && cur.is_none() {
                // A bridged network's broadcast also reaches the host stack.
                if let Some(n) = maps::net(key.net_id) {
                    ctx.set_mark(KVNET_HOST_MARK);
                    unsafe { bpf_clone_redirect(ctx.skb.skb as *mut _, n.uplink, BPF_F_INGRESS) };
                    ctx.set_mark(0);
                }
            }
            // VXLAN networks carry untagged frames only.
            if key.vid == 0 && cur.is_none() {
                vxlan::replicate(ctx, key.net_id, ingress, len as u32);
            }
            tc_flood(
                &ctx,
                FloodArgs {
                    net_id: key.net_id,
                    vid: key.vid as u32,
                    ingress,
                    hairpin: port.flags & PORT_F_HAIRPIN,
                    isolated: port.flags & PORT_F_ISOLATED,
                    len: len as u32,
                    tagged: cur.is_some() as u32,
                    cur_tci: cur.unwrap_or(0) as u32,
                    out_tci: out_tci as u32,
                    second_start: 0,
                    second_len: 0,
                },
            )
        }
    }
}

/// The NAT66 program (`kvnet_nat6`): the rest of the main program's tc
/// verdict for an IPv6 packet of a NAT66 network or from a NAT uplink.
#[inline(always)]
pub fn nat6_program(ctx: &TcContext) -> i32 {
    let (net_id, ingress) = unsafe { ((*ctx.skb.skb).cb[0], (*ctx.skb.skb).cb[1]) };
    let Some(sc) = nat6::NAT6_SCRATCH.get_ptr_mut(0) else {
        return TC_ACT_SHOT;
    };
    let sc = unsafe { &mut *sc };
    let len = ctx.len() as u64;
    let mut rc = if net_id != 0 {
        let Some(n) = maps::net(net_id) else {
            return TC_ACT_SHOT;
        };
        let done = nat6::from_guest(ctx, sc, net_id, &n, ingress);
        nat_out_done(ctx, ingress, len, &n, done)
    } else {
        let done = nat6::from_uplink(ctx, sc, ingress);
        // What NAT66 declines goes on as the main program would take it
        // (an untagged frame: NatIn has no tag).
        let (data, data_end) = (ctx.data(), ctx.data_end());
        let l3 = l3_ctx(ctx);
        nat_in_done(ctx, ingress, len, done, &Tag::NONE, l3, data, data_end)
    };
    if rc == TC_ACT_OK && ingress != unsafe { (*ctx.skb.skb).ifindex } {
        // For the host: its address lives on the uplink group's device.
        rc = bond::to_group_host(ctx, ingress, true);
    }
    if trace::on() {
        trace::finish_tc(ctx, rc);
    }
    rc
}

/// Carries out what NAT did with a guest's packet (IPv4, or NAT66's).
#[inline(always)]
pub(crate) fn nat_out_done(
    ctx: &TcContext,
    ingress: u32,
    len: u64,
    n: &kvnet_common::NetConfig,
    done: Nat,
) -> i32 {
    match done.kind {
        // Possibly a forward back into the network, to a guest's port.
        NatKind::Sent => nat_sent(ctx, ingress, done.rc, done.egress),
        NatKind::Drop => TC_ACT_SHOT,
        NatKind::Refused => {
            stats::drop(ingress, done.reason);
            TC_ACT_SHOT
        }
        // Not translated: to the gateway, i.e. the host stack.
        NatKind::Skip | NatKind::ToHost => {
            stats::tx(n.gw_port, len);
            unsafe { bpf_redirect(n.gw_port, 0) as i32 }
        }
    }
}

/// Carries out what NAT did with a packet from a NAT uplink (IPv4, or
/// NAT66's); what it declined is routed or the host's.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn nat_in_done(
    ctx: &TcContext,
    ingress: u32,
    len: u64,
    done: Nat,
    tag: &Tag,
    l3: L3Ctx,
    data: usize,
    data_end: usize,
) -> i32 {
    match done.kind {
        NatKind::Sent => nat_sent(ctx, ingress, done.rc, done.egress),
        NatKind::Drop | NatKind::Refused => TC_ACT_SHOT,
        NatKind::Skip | NatKind::ToHost => {
            // Not a NAT flow: a routed network's traffic, or the host's.
            // Skip: nat touched nothing, the packet pointers still hold.
            match pipeline::from_uplink(ingress, data, data_end, tag, Some(l3)) {
                Verdict::Route { egress } => route_to(ctx, ingress, egress, len),
                Verdict::Drop(reason) => {
                    stats::drop(ingress, reason);
                    TC_ACT_SHOT
                }
                _ => TC_ACT_OK,
            }
        }
    }
}

/// What a hook gives the core so it can route, from the skb.
#[inline(always)]
pub(crate) fn l3_ctx(ctx: &TcContext) -> L3Ctx {
    unsafe {
        let skb = &*ctx.skb.skb;
        L3Ctx {
            ctx: ctx.skb.skb as *mut _,
            gso_size: skb.gso_size as u16,
            // PACKET_HOST: addressed to this interface's MAC.
            to_us: skb.pkt_type == 0,
            len: skb.len,
        }
    }
}

/// Sends a routed frame (no tag left on it) out of `egress`, tagged for
/// that port when it is a trunk in the gateway's VLAN.
#[inline(always)]
fn route_to(ctx: &TcContext, ingress: u32, egress: u32, len: u64) -> i32 {
    if !tag_for_port(ctx, egress) {
        stats::drop(ingress, DropReason::RedirectFailed);
        return TC_ACT_SHOT;
    }
    stats::tx(egress, len);
    unsafe { bpf_redirect(egress, 0) as i32 }
}

/// Finishes a frame NAT translated and redirected to `egress`.
#[inline(always)]
fn nat_sent(ctx: &TcContext, ingress: u32, rc: i32, egress: u32) -> i32 {
    if !tag_for_port(ctx, egress) {
        stats::drop(ingress, DropReason::RedirectFailed);
        return TC_ACT_SHOT;
    }
    stats::routed(ingress);
    trace::egress(egress);
    rc
}

#[inline(always)]
pub fn egress(ctx: TcContext) -> i32 {
    let mut rc = egress_act(&ctx);
    // An uplink group's device: on to the member its mode picks (the
    // trace's egress; 0 for broadcast's every member).
    let mut member = 0;
    if rc == TC_ACT_OK {
        if let Some((r, m)) = bond::out(&ctx, unsafe { (*ctx.skb.skb).ifindex }) {
            (rc, member) = (r, m);
        }
    }
    if trace::on() {
        let uplink = unsafe { (*ctx.skb.skb).ifindex };
        trace::begin_tc(&ctx, TRACE_HOOK_TC_OUT, uplink, 0, TRACE_EGRESS, member, 0);
        trace::finish_tc(&ctx, rc);
    }
    rc
}

#[inline(always)]
fn egress_act(ctx: &TcContext) -> i32 {
    let uplink = unsafe { (*ctx.skb.skb).ifindex };
    let Some(port) = maps::port(uplink) else {
        return TC_ACT_OK;
    };
    if port.flags & PORT_F_RATE_LIMITED != 0 {
        // A guest port's egress (attached for `rate_in`): what it gets.
        if policy::in_allows(uplink, ctx.len() as u64) {
            return TC_ACT_OK;
        }
        stats::drop(uplink, DropReason::RateLimit);
        return TC_ACT_SHOT;
    }
    if port.flags & PORT_F_UPLINK_NAT != 0 {
        // A NAT uplink: a guest's packet that reached it untranslated
        // (through the host stack) must not leave with the guest's address.
        if nat6::is_ipv6(ctx) {
            return nat6::guard_uplink(ctx);
        }
        return nat::guard_uplink(ctx);
    }
    if port.flags & PORT_F_UPLINK_BRIDGED == 0 || unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return TC_ACT_OK;
    }
    let Some(eth) = parse::eth(ctx.data(), ctx.data_end()) else {
        return TC_ACT_OK;
    };
    let net_id = port.net_id;
    match fdb::lookup_entry(net_id, 0, eth.src) {
        Some((_, flags)) if flags & FDB_F_HOST != 0 => {}
        _ => return TC_ACT_OK,
    }
    let len = ctx.len();
    let egress = if parse::is_multicast(&eth.dst) {
        None
    } else {
        match fdb::lookup_entry(net_id, 0, eth.dst) {
            Some((egress, flags)) if egress != uplink && flags & FDB_F_HOST == 0 => Some(egress),
            // Behind the uplink (or the host's own): the wire has it.
            Some(_) => return TC_ACT_OK,
            // Unknown, as a bridge floods it: to the guests and the wire.
            None => None,
        }
    };
    match egress {
        Some(egress) => {
            stats::tx(egress, len as u64);
            unsafe { bpf_redirect(egress, 0) as i32 }
        }
        None => {
            stats::flooded(uplink);
            tc_flood(&ctx, FloodArgs::untagged(net_id, uplink, len));
            TC_ACT_OK
        }
    }
}

/// Routed and translated frames into a guest's port carry its network's
/// gateway VLAN as the port does: tagged on a trunk that has it tagged,
/// untagged anywhere else. False if the tag could not be pushed.
#[inline(always)]
fn tag_for_port(ctx: &TcContext, egress: u32) -> bool {
    let Some(p) = maps::port(egress) else {
        return true;
    };
    if p.vlan_mode != VLAN_MODE_TRUNK {
        return true;
    }
    let Some(n) = maps::net(p.net_id) else {
        return true;
    };
    match maps::vlan_member(egress, n.gw_vid) {
        Some(f) if n.gw_vid != 0 && f & VLAN_M_TAGGED != 0 => {
            tc_retag(ctx, &mut None, Some(n.gw_vid))
        }
        _ => true,
    }
}
