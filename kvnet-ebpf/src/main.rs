//! kvnet datapath: one pipeline ([`pipeline::decide`]) run from two hooks.
//!
//! * `kvnet_tc` (tc clsact ingress) sees every frame as an skb, so it can
//!   carry GSO super-packets and checksum-offloaded frames, and flood by
//!   clone-redirect.
//! * `kvnet_xdp` runs first where attached; it finishes what it can
//!   (known unicast, drops) and hands the rest (floods) to `kvnet_tc`
//!   with XDP_PASS, so a port with the xdp hook also carries the tc one.
//!
//! This file declares the entry programs; `xdp.rs` and `tc.rs` carry a
//! verdict out in each hook, `pipeline.rs` decides it.
#![no_std]
#![no_main]

mod bond;
mod csum;
mod fdb;
mod flood;
mod guard;
mod maps;
mod nat;
mod nat6;
mod neigh;
mod parse;
mod pipeline;
mod policy;
mod route;
mod savi;
mod stats;
mod tc;
mod trace;
mod vlan;
mod vxlan;
mod xdp;

use aya_ebpf::{
    bindings::xdp_action,
    macros::xdp,
    programs::{TcContext, XdpContext},
};

#[xdp]
pub fn kvnet_xdp(ctx: XdpContext) -> u32 {
    let (rc, aux) = xdp::run(&ctx);
    // One trace point for the frames XDP finishes (what it passes, tc
    // traces); `aux` is the drop reason or the egress port.
    if rc != xdp_action::XDP_PASS && trace::on() {
        trace::xdp(&ctx, rc, aux);
    }
    rc
}

/// The tc entry point, written out instead of `#[classifier]`: the macro's
/// inner function is too big for LLVM to inline, and the outlined copy in
/// `.text` (calling memset there) fails to load. Inlining keeps the whole
/// program in its own section.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn kvnet_tc(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    tc::ingress(TcContext::new(skb))
}

/// NAT66 (nat6.rs), tail-called by `kvnet_tc`: its own program for a stack
/// and verifier budget of its own.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn kvnet_nat6(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    tc::nat6_program(&TcContext::new(skb))
}

/// IPv6 source address validation on SLAAC networks, tail-called from
/// `kvnet_tc` (`savi.rs`): the tc program has no verifier budget left.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn kvnet_savi(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    savi::run(TcContext::new(skb))
}

/// tc egress on a bridged uplink: the host's own frames to guests go
/// straight to their ports (and its broadcasts to them too); everything
/// else, guests' frames to the LAN included, leaves untouched.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn kvnet_tc_out(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    tc::egress(TcContext::new(skb))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
