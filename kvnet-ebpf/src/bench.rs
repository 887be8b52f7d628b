//! Benchmark-only programs, an object of their own (`kvnet-bench`), loaded
//! by the `kvnet-bench` tool and never by the daemon:
//!
//! * `bench_redirect` (tc): the "limit". It only `bpf_redirect`s a frame
//!   from its ingress port to the peer named in `bench_peer`, the least any
//!   eBPF switch has to do between two ports.
//! * `bench_sink` (XDP): counts frames and bytes per CPU in `bench_count`
//!   and drops them; it sits on the receiving guest's interface.
//! * `bench_gen` (XDP): XDP_TX. Run through BPF_PROG_RUN in live-frames mode
//!   with the ingress device set to a guest's eth0, every frame is sent out
//!   of that eth0: a generator that costs almost nothing per frame.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_OK},
    helpers::bpf_redirect,
    macros::{classifier, map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::{TcContext, XdpContext},
};

/// ingress ifindex -> egress ifindex.
#[map(name = "bench_peer")]
static BENCH_PEER: HashMap<u32, u32> = HashMap::with_max_entries(16, 0);

/// [0] = frames, [1] = bytes, per CPU.
#[map(name = "bench_count")]
static BENCH_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);

#[classifier]
pub fn bench_redirect(ctx: TcContext) -> i32 {
    let ingress = unsafe { (*ctx.skb.skb).ifindex };
    match unsafe { BENCH_PEER.get(&ingress) } {
        Some(&peer) => unsafe { bpf_redirect(peer, 0) as i32 },
        None => TC_ACT_OK,
    }
}

#[xdp]
pub fn bench_sink(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    if let Some(c) = BENCH_COUNT.get_ptr_mut(0) {
        unsafe { *c += 1 };
    }
    if let Some(c) = BENCH_COUNT.get_ptr_mut(1) {
        unsafe { *c += len };
    }
    xdp_action::XDP_DROP
}

#[xdp]
pub fn bench_gen(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
