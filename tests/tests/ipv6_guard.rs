//! Issue 17, guards: IPv6 source address validation (FCFS SAVI, RFC 6620)
//! on a network whose guests pick SLAAC addresses. A hostile guest on the
//! wire spoofs a neighbour's global and link-local addresses, advertises
//! them with its own MAC, denies another guest's DAD and sprays random
//! sources: nothing of it reaches the victims or the outside (captures
//! prove it, a control frame of its own ends each capture), the drop
//! counters rise, and its own traffic still flows. A DHCPv6 lease is its
//! client's at once and nobody else's.
use std::net::Ipv6Addr;
use std::time::Duration;

use kvnet_tests::{
    clients::{dhclient6, field, wait_first_event},
    eth_frame, inject,
    kvnet::Kvnet,
    lab::privileged,
    Capture, Frame, GuestPort, Lab,
};

#[path = "support/v6_lab.rs"]
mod v6_lab;
use v6_lab::{net_add_v6, outside6, until, OUTSIDE6};

const ALL_NODES: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
const ECHO_REQUEST: u8 = 128;
const NEIGHBOR_SOLICIT: u8 = 135;
const NEIGHBOR_ADVERT: u8 = 136;

/// The guest's usable (not tentative) address of `scope` starting with
/// `prefix`.
fn addr(g: &GuestPort, scope: &str, prefix: &str) -> Option<Ipv6Addr> {
    let out = g
        .sh(&format!(
            "ip -6 -o addr show dev eth0 scope {scope} -tentative"
        ))
        .ok()?;
    out.split_whitespace()
        .filter_map(|w| w.split_once('/').map(|(a, _)| a))
        .find(|a| a.starts_with(prefix))
        .and_then(|a| a.parse().ok())
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An Ethernet frame carrying ICMPv6 `msg` (checksum filled in).
fn icmp6(dmac: [u8; 6], smac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, msg: &[u8]) -> Vec<u8> {
    let mut m = msg.to_vec();
    m[2..4].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(m.len() as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 58]);
    pseudo.extend_from_slice(&m);
    let sum = checksum(&pseudo);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(m.len() as u16).to_be_bytes());
    ip.extend_from_slice(&[58, 255]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&m);
    eth_frame(dmac, smac, 0x86dd, &ip)
}

/// An echo request with identifier `id`.
fn echo(dmac: [u8; 6], smac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, id: u16) -> Vec<u8> {
    let mut m = vec![ECHO_REQUEST, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&[0, 1]);
    m.extend_from_slice(b"savi");
    icmp6(dmac, smac, src, dst, &m)
}

/// An unsolicited, overriding advertisement of `target` at `ll`, to all
/// nodes.
fn advert(smac: [u8; 6], src: Ipv6Addr, target: Ipv6Addr, ll: [u8; 6]) -> Vec<u8> {
    let mut m = vec![NEIGHBOR_ADVERT, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&ll);
    icmp6(ALL_NODES, smac, src, "ff02::1".parse().unwrap(), &m)
}

/// (ICMPv6 type, source, echo identifier or ND target's first 16 bytes).
fn parse(f: &Frame) -> Option<(u8, Ipv6Addr, &[u8])> {
    let p = f.payload();
    if f.ethertype() != 0x86dd || *p.get(6)? != 58 {
        return None;
    }
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    Some((*p.get(40)?, src.into(), p.get(44..)?))
}

fn echo_id(f: &Frame) -> Option<u16> {
    match parse(f)? {
        (ECHO_REQUEST, _, rest) => Some(u16::from_be_bytes([rest[0], rest[1]])),
        _ => None,
    }
}

fn nd_target(f: &Frame) -> Option<(u8, Ipv6Addr)> {
    match parse(f)? {
        (t @ (NEIGHBOR_SOLICIT | NEIGHBOR_ADVERT), _, rest) => {
            let a: [u8; 16] = rest.get(4..20)?.try_into().ok()?;
            Some((t, a.into()))
        }
        _ => None,
    }
}

const GRACE: Duration = Duration::from_secs(5);
/// kvnet_common::V6_CLAIMS_PER_PORT.
const V6_CLAIMS_PER_PORT: usize = 16;

#[test]
fn a_hostile_guest_cannot_use_or_advertise_its_neighbours_ipv6_addresses() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let out = outside6(&lab, "");
    // a: the victim; b: hostile; c: a guest that joins later (DAD); d: a
    // DHCPv6 client.
    let a = lab.add_guest("pa").unwrap();
    let b = lab.add_guest("pb").unwrap();
    let c = lab.add_guest("pc").unwrap();
    let d = lab.add_guest("pd").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    net_add_v6(
        &k,
        "10.61.0.1/24",
        &["--dhcp6-range", "2001:db8:1::100-2001:db8:1::1ff"],
    );
    for p in ["pa", "pb", "pc", "pd"] {
        k.cli(&["port", "add", "v6", p]).unwrap();
    }
    let show = k.json(&["net", "show", "v6"]).unwrap();
    let gw_mac =
        kvnet_tests::mac_parse(show["gateway"]["mac"].as_str().unwrap_or_default()).unwrap();
    let wait = Duration::from_secs(15);
    let a_global = until("a's SLAAC address", wait, || {
        addr(&a, "global", "2001:db8:1:")
    });
    let a_ll = until("a's link-local address", wait, || addr(&a, "link", "fe80"));
    let b_global = until("b's SLAAC address", wait, || {
        addr(&b, "global", "2001:db8:1:")
    });
    let b_ll = until("b's link-local address", wait, || addr(&b, "link", "fe80"));
    until("c's SLAAC address", wait, || {
        addr(&c, "global", "2001:db8:1:")
    });
    let outside: Ipv6Addr = OUTSIDE6.parse().unwrap();
    let send = |frames: &[Vec<u8>]| inject(&b.ns, "eth0", frames).unwrap();
    let spoof_before = k.port_drops("pb", "ip_spoof");
    let nd_before = k.port_drops("pb", "arp_spoof");

    // (a) A ping to the outside from a's global address, then b's own
    // (the control, and b's own traffic flowing).
    let cap = Capture::start(&out.ns, "eth0").unwrap();
    send(&[
        echo(gw_mac, b.mac, a_global, outside, 0xbad1),
        echo(gw_mac, b.mac, b_global, outside, 0x600d),
    ]);
    let seen = cap
        .stop_when("b's own echo request", GRACE, |f| {
            f.iter().any(|f| echo_id(f) == Some(0x600d))
        })
        .unwrap();
    assert!(
        !seen.iter().any(|f| echo_id(f) == Some(0xbad1)),
        "b's ping from a's global address left for the outside"
    );
    assert!(b.ping(OUTSIDE6), "b's own traffic is refused");

    // (b) From a's link-local address, (c) advertisements of a's addresses
    // with b's MAC: neighbour poisoning. c hears b's control only.
    let cap = Capture::start(&c.ns, "eth0").unwrap();
    let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
    send(&[
        echo(ALL_NODES, b.mac, a_ll, all_nodes, 0xbad2),
        advert(b.mac, b_ll, a_global, b.mac),
        advert(b.mac, b_ll, a_ll, b.mac),
        echo(ALL_NODES, b.mac, b_ll, all_nodes, 0x600e),
    ]);
    let seen = cap
        .stop_when("b's own link-local echo", GRACE, |f| {
            f.iter().any(|f| echo_id(f) == Some(0x600e))
        })
        .unwrap();
    assert!(
        !seen.iter().any(|f| echo_id(f) == Some(0xbad2)),
        "b's ping from a's link-local address reached c"
    );
    let poison = |f: &Frame, target: Ipv6Addr| {
        f.src_mac() == b.mac && nd_target(f) == Some((NEIGHBOR_ADVERT, target))
    };
    assert!(
        !seen.iter().any(|f| poison(f, a_global) || poison(f, a_ll)),
        "b's advertisement of a's addresses reached c"
    );

    // (d) DAD denial: c takes a new address (DAD of 3 probes); b answers
    // that it is b's. c's probe claims it first; b's answer goes nowhere.
    let fresh: Ipv6Addr = "2001:db8:1::c0c0".parse().unwrap();
    c.sh("sysctl -qw net.ipv6.conf.eth0.dad_transmits=3")
        .unwrap();
    let cap = Capture::start(&c.ns, "eth0").unwrap();
    c.sh(&format!("ip -6 addr add {fresh}/64 dev eth0"))
        .unwrap();
    until("c's DAD probe", GRACE, || {
        cap.frames()
            .ok()?
            .iter()
            .any(|f| f.src_mac() == c.mac && nd_target(f) == Some((NEIGHBOR_SOLICIT, fresh)))
            .then_some(())
    });
    send(&[
        advert(b.mac, b_ll, fresh, b.mac),
        echo(ALL_NODES, b.mac, b_ll, all_nodes, 0x600f),
    ]);
    let seen = cap
        .stop_when("b's control after its DAD denial", GRACE, |f| {
            f.iter().any(|f| echo_id(f) == Some(0x600f))
        })
        .unwrap();
    assert!(
        !seen.iter().any(|f| poison(f, fresh)),
        "b's DAD denial reached c"
    );
    until("c's new address after DAD", GRACE, || {
        addr(&c, "global", "2001:db8:1::c0c0")
    });
    let flags = c.sh("ip -6 -o addr show dev eth0").unwrap();
    assert!(!flags.contains("dadfailed"), "{flags}");

    // (e) Thousands of random sources: b's claims run out at its quota;
    // a and c are unaffected.
    let cap = Capture::start(&out.ns, "eth0").unwrap();
    let mut spray: Vec<Vec<u8>> = (0..3000u32)
        .map(|i| {
            let mut o = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0xbad, 0, 0, 0).octets();
            o[12..16].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
            echo(gw_mac, b.mac, o.into(), outside, 0xbad3)
        })
        .collect();
    spray.push(echo(gw_mac, b.mac, b_global, outside, 0x6010));
    send(&spray);
    let seen = cap
        .stop_when(
            "b's own echo after the spray",
            Duration::from_secs(10),
            |f| f.iter().any(|f| echo_id(f) == Some(0x6010)),
        )
        .unwrap();
    let through = seen.iter().filter(|f| echo_id(f) == Some(0xbad3)).count();
    println!("random sources through: {through} of 3000");
    assert!(
        through <= V6_CLAIMS_PER_PORT,
        "{through} random sources reached the outside"
    );
    assert!(a.ping(OUTSIDE6), "a after the spray");
    assert!(c.ping(OUTSIDE6), "c after the spray");
    assert!(b.ping(OUTSIDE6), "b's own address after the spray");
    let spoofed = k.port_drops("pb", "ip_spoof") - spoof_before;
    let nd = k.port_drops("pb", "arp_spoof") - nd_before;
    println!("pb drops: ip_spoof {spoofed}, arp_spoof {nd}");
    assert!(spoofed >= 2 + 3000 - 16, "ip_spoof {spoofed}");
    assert!(nd >= 3, "arp_spoof {nd}");

    // A DHCPv6 lease is bound to its client's port as it is handed out
    // (dhclient's script adds it without DAD): b cannot use it, d can.
    until("d's link-local address", wait, || addr(&d, "link", "fe80"));
    let (_client, events) = dhclient6(&lab, &d, "d");
    let bound = wait_first_event(&events, "BOUND6", Duration::from_secs(20));
    let lease: Ipv6Addr = field(&bound, "ip6").parse().unwrap();
    let cap = Capture::start(&out.ns, "eth0").unwrap();
    send(&[
        echo(gw_mac, b.mac, lease, outside, 0xbad4),
        echo(gw_mac, b.mac, b_global, outside, 0x6011),
    ]);
    let seen = cap
        .stop_when("b's control after the lease", GRACE, |f| {
            f.iter().any(|f| echo_id(f) == Some(0x6011))
        })
        .unwrap();
    assert!(
        !seen.iter().any(|f| echo_id(f) == Some(0xbad4)),
        "b used d's DHCPv6 lease {lease}"
    );
    let ping = d
        .sh(&format!(
            "ping -6 -c 1 -W 2 -I {lease} {OUTSIDE6} && echo ok"
        ))
        .unwrap_or_default();
    assert!(ping.contains("ok"), "d from its lease {lease}: {ping}");
}
