//! Shared by ipv6.rs and ipv6_guard.rs: a routed network with IPv6 whose
//! uplink up0 (2001:db8:ffff::1) leads to an outside namespace at
//! [`OUTSIDE6`] that routes the guests' prefixes back through the host.
#![allow(dead_code)]
use std::time::{Duration, Instant};

use kvnet_tests::{kvnet::Kvnet, Lab, Outside};

pub const OUTSIDE6: &str = "2001:db8:ffff::2";

/// Polls `f` every 100 ms until it is Some, or panics after `t` saying `what`.
pub fn until<T>(what: &str, t: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + t;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The outside, at [`OUTSIDE6`] behind up0, with `extra` run there too.
pub fn outside6(lab: &Lab, extra: &str) -> Outside {
    let out = lab.add_outside().unwrap();
    out.sh(&format!(
        "ip -6 addr add {OUTSIDE6}/64 dev eth0 nodad && ip -6 route add 2001:db8::/40 via 2001:db8:ffff::1 {extra}"
    ))
    .unwrap();
    lab.sh(lab.hv(), "ip -6 addr add 2001:db8:ffff::1/64 dev up0 nodad")
        .unwrap();
    out
}

/// `kvnet net add v6`: routed on up0, IPv4 gateway `gw4`, IPv6 gateway
/// 2001:db8:1::1/64, and `extra` options.
pub fn net_add_v6(k: &Kvnet, gw4: &str, extra: &[&str]) {
    let mut args = vec![
        "net",
        "add",
        "v6",
        "--mode",
        "routed",
        "--gateway",
        gw4,
        "--uplink",
        "up0",
        "--gateway6",
        "2001:db8:1::1/64",
    ];
    args.extend_from_slice(extra);
    k.cli(&args).unwrap();
}
