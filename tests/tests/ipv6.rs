//! Issue 17: IPv6 in a routed network, with real clients. A guest with the
//! kernel's default sysctls takes a SLAAC address and its default route
//! from kvnet's router advertisements, resolves names through the
//! gateway's IPv6 resolver and pings the outside, which sees the guest's
//! own address; dhclient -6 gets a static host's address and one from the
//! range; a guest's rogue RA reaches nobody.
use std::time::Duration;

use kvnet_tests::{
    clients::{dhclient6, field, wait_first_event},
    kvnet::Kvnet,
    lab::privileged,
    Capture, Frame, GuestPort, Lab,
};

#[path = "support/v6_lab.rs"]
mod v6_lab;
use v6_lab::{net_add_v6, outside6, until, OUTSIDE6};

const GW6: &str = "2001:db8:1::1";
const WEB6: &str = "2001:db8:1::5";

/// The guest's global IPv6 address in `prefix` (a SLAAC or DHCPv6 one).
fn global_addr(g: &GuestPort, prefix: &str) -> Option<String> {
    let out = g.sh("ip -6 -o addr show dev eth0 scope global").ok()?;
    out.split_whitespace()
        .filter_map(|w| w.split_once('/').map(|(a, _)| a))
        .find(|a| a.starts_with(prefix))
        .map(str::to_string)
}

/// Its link-local address is usable (DAD done): dhclient -6 binds to it.
fn link_local_ready(g: &GuestPort) -> Option<()> {
    let all = g.sh("ip -6 -o addr show dev eth0 scope link").ok()?;
    let tentative = g.sh("ip -6 -o addr show dev eth0 tentative").ok()?;
    (all.contains("fe80") && tentative.trim().is_empty()).then_some(())
}

/// ICMPv6 type and source address of an IPv6 frame.
fn icmp6(f: &Frame) -> Option<(u8, std::net::Ipv6Addr)> {
    let p = f.payload();
    if f.ethertype() != 0x86dd || *p.get(6)? != 58 {
        return None;
    }
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    Some((*p.get(40)?, src.into()))
}

/// The guest's own stack sends ICMPv6 `msg` (hex; the kernel adds the
/// checksum) to `dst` on eth0 with hop limit 255, as a router would.
fn icmp6_send(g: &GuestPort, dst: &str, msg: &str) {
    let code = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)\n\
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)\n\
         s.sendto(bytes.fromhex('{msg}'), ('{dst}', 0, 0, socket.if_nametoindex('eth0')))\n\
         print('sent')\n"
    );
    let out = kvnet_tests::tools::py(&g.ns, &code);
    assert_eq!(out.trim(), "sent", "{out}");
}

/// A router advertisement (default route, 1800 s) for 2001:db8:bad::/64
/// with SLAAC.
const ROGUE_RA: &str = concat!(
    "8600000040000708",
    "0000000000000000",
    "030440c0",
    "00015180",
    "00003840",
    "00000000",
    "20010db80bad00000000000000000000"
);
/// A router solicitation.
const RS: &str = "8500000000000000";

#[test]
fn slaac_dhcp6_dns_routed_ipv6_and_the_ra_guard() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    // The outside: 2001:db8:ffff::/64 behind the uplink up0; it routes the
    // guests' prefix back through the host (the routed model: no NAT).
    let out = outside6(&lab, "");
    // g1: SLAAC with the kernel's defaults; g2: the static DHCPv6 host
    // "web"; g3: a DHCPv6 client from the range, and the rogue router.
    let g1 = lab.add_guest("p1").unwrap();
    let g2 = lab.add_guest("p2").unwrap();
    let g3 = lab.add_guest("p3").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let web = format!("{},{WEB6},web", kvnet_tests::mac_fmt(&g2.mac));
    k.cli(&[
        "net",
        "add",
        "v6",
        "--mode",
        "routed",
        "--gateway",
        "10.60.0.1/24",
        "--uplink",
        "up0",
        "--dhcp-range",
        "10.60.0.10,10.60.0.20",
        "--domain",
        "lab.test",
        "--gateway6",
        "2001:db8:1::1/64",
        "--gateway6",
        "2001:db8:2::1/64",
        "--dhcp6-range",
        "2001:db8:1::100-2001:db8:1::1ff",
        "--dhcp6-host",
        &web,
    ])
    .unwrap();
    for p in ["p1", "p2", "p3"] {
        k.cli(&["port", "add", "v6", p]).unwrap();
    }
    let show = k.json(&["net", "show", "v6"]).unwrap();
    assert_eq!(
        show["ipv6"]["gateways"],
        serde_json::json!(["2001:db8:1::1/64", "2001:db8:2::1/64"]),
        "{show}"
    );
    let text = k.cli(&["net", "show", "v6"]).unwrap();
    assert!(
        text.contains("gateway6") && text.contains("2001:db8:1::100-2001:db8:1::1ff"),
        "{text}"
    );

    // 1. SLAAC in both prefixes, and a default route via the gateway's
    // link-local address, from kvnet's RAs alone.
    let a1 = until("g1's SLAAC address", Duration::from_secs(15), || {
        global_addr(&g1, "2001:db8:1:")
    });
    let a2 = until("g1's second SLAAC address", Duration::from_secs(5), || {
        global_addr(&g1, "2001:db8:2:")
    });
    let route = until("g1's default route", Duration::from_secs(5), || {
        let r = g1.sh("ip -6 route show default").ok()?;
        r.contains("via fe80::").then_some(r)
    });
    assert!(route.contains("proto ra"), "{route}");

    // 2. DHCPv6: the static host gets its address, another client one of
    // the range; both are told the resolver.
    until("link-local addresses", Duration::from_secs(5), || {
        link_local_ready(&g2).and(link_local_ready(&g3))
    });
    let (_c2, ev2) = dhclient6(&lab, &g2, "g2");
    let (_c3, ev3) = dhclient6(&lab, &g3, "g3");
    let b2 = wait_first_event(&ev2, "BOUND6", Duration::from_secs(20));
    let b3 = wait_first_event(&ev3, "BOUND6", Duration::from_secs(20));
    assert_eq!(field(&b2, "ip6"), WEB6, "{b2}");
    let ip3: std::net::Ipv6Addr = field(&b3, "ip6").parse().unwrap();
    assert!(
        (0x2001_0db8_0001_0000_0000_0000_0000_0100..=0x2001_0db8_0001_0000_0000_0000_0000_01ff)
            .contains(&u128::from(ip3)),
        "{b3}"
    );
    assert_eq!(field(&b2, "dns"), GW6, "{b2}");
    let leases = k.json(&["net", "show", "v6"]).unwrap()["ipv6"]["leases"].clone();
    assert_eq!(leases.as_array().map(Vec::len), Some(2), "{leases}");

    // 3. DNS on the gateway's IPv6 address: the static host's AAAA and
    // its reverse name, from g1 (which learnt nothing but SLAAC).
    let aaaa = g1
        .sh(&format!(
            "dig +short +time=2 +tries=2 @{GW6} AAAA web.lab.test"
        ))
        .unwrap();
    assert_eq!(aaaa.trim(), WEB6, "AAAA of web.lab.test");
    let ptr = g1
        .sh(&format!("dig +short +time=2 +tries=2 @{GW6} -x {WEB6}"))
        .unwrap();
    assert_eq!(ptr.trim(), "web.lab.test.", "PTR of {WEB6}");
    // ... and the guest reaches the host by that name's address.
    assert!(g1.ping(WEB6), "g1 -> web ({WEB6})");

    // 4. Routed IPv6: g1 pings the outside, which sees g1's own address.
    let cap = Capture::start(&out.ns, "eth0").unwrap();
    assert!(g1.ping(OUTSIDE6), "g1 -> outside over routed IPv6");
    let own: [std::net::Ipv6Addr; 2] = [a1.parse().unwrap(), a2.parse().unwrap()];
    let from_g1 = |f: &Frame| icmp6(f).is_some_and(|(t, src)| t == 128 && own.contains(&src));
    cap.stop_when("g1's echo request", Duration::from_secs(3), |f| {
        f.iter().any(from_g1)
    })
    .unwrap();
    for a in own {
        assert!(
            kvnet_tests::lab::ping(&out.ns, &a.to_string()),
            "outside -> g1's own address {a}"
        );
    }

    // 4b. The fast path: an established TCP flow (data one way, ACKs the
    // other) bypasses the host's forwarding; checksums stay right; the
    // host still answers an expiring hop limit.
    let forwarded = || {
        lab.sh(
            lab.hv(),
            "awk '$1==\"Ip6OutForwDatagrams\" {print $2}' /proc/net/snmp6",
        )
        .unwrap()
        .trim()
        .parse::<u64>()
        .unwrap()
    };
    let before = forwarded();
    let v = kvnet_tests::tools::iperf3(&lab, &out.ns, OUTSIDE6, &g1.ns, &["-t", "2"]).unwrap();
    let host_fwd = forwarded() - before;
    let (bytes, bps) = kvnet_tests::tools::received(&v);
    println!(
        "routed IPv6 iperf3: {:.2} Gbit/s, host forwarded {host_fwd}",
        bps / 1e9
    );
    assert!(bytes > 10_000_000, "{v}");
    assert!(
        host_fwd < 50,
        "the host forwarded {host_fwd} datagrams of an established flow"
    );
    assert_eq!(kvnet_tests::tools::snmp(&out.ns, "Tcp", "InCsumErrors"), 0);
    let p1 = k.port_stats("p1").unwrap();
    assert!(p1["routed"].as_u64().unwrap_or(0) > 1000, "{p1}");
    let hop = g1
        .sh(&format!("ping -6 -c 1 -W 2 -t 1 {OUTSIDE6} || true"))
        .unwrap();
    assert!(hop.contains("Time exceeded"), "{hop}");

    // 5. RA guard: g3 sends an RA for 2001:db8:bad::/64; g1 (accept_ra=1)
    // hears kvnet's RA (the positive control: its RS answered) but not g3's.
    let before = k.port_drops("p3", "rogue_ra");
    let cap = Capture::start(&g1.ns, "eth0").unwrap();
    icmp6_send(&g3, "ff02::1", ROGUE_RA);
    icmp6_send(&g1, "ff02::2", RS);
    let gw_mac =
        kvnet_tests::mac_parse(show["gateway"]["mac"].as_str().unwrap_or_default()).unwrap();
    let frames = cap
        .stop_when("kvnet's RA", Duration::from_secs(3), |f| {
            f.iter()
                .any(|f| f.src_mac() == gw_mac && icmp6(f).is_some_and(|(t, _)| t == 134))
        })
        .unwrap();
    let rogue = frames
        .iter()
        .filter(|f| f.src_mac() == g3.mac && icmp6(f).is_some_and(|(t, _)| t == 134))
        .count();
    assert_eq!(rogue, 0, "g3's RA reached g1");
    let drops = until("the rogue RA counted", Duration::from_secs(3), || {
        let n = k.port_drops("p3", "rogue_ra");
        (n > before).then_some(n)
    });
    assert!(drops > before);
    assert_eq!(
        global_addr(&g1, "2001:db8:bad:"),
        None,
        "g1 took the rogue prefix"
    );

    // 6. A restarted daemon adopts the network: its RAs, resolver and
    // routed IPv6 come back.
    k.stop().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let show = k.json(&["net", "show", "v6"]).unwrap();
    assert_eq!(show["ipv6"]["gateways"][0], "2001:db8:1::1/64", "{show}");
    let cap = Capture::start(&g1.ns, "eth0").unwrap();
    icmp6_send(&g1, "ff02::2", RS);
    cap.stop_when(
        "kvnet's RA after the restart",
        Duration::from_secs(5),
        |f| {
            f.iter()
                .any(|f| f.src_mac() == gw_mac && icmp6(f).is_some_and(|(t, _)| t == 134))
        },
    )
    .unwrap();
    let aaaa = g1
        .sh(&format!(
            "dig +short +time=2 +tries=2 @{GW6} AAAA web.lab.test"
        ))
        .unwrap();
    assert_eq!(aaaa.trim(), WEB6, "AAAA after the restart");
    assert!(g1.ping(OUTSIDE6), "g1 -> outside after the restart");
}

/// A server behind a 1280-byte link: the outside router's ICMPv6
/// packet-too-big reaches the guest through routed IPv6, the guest learns
/// the path MTU and its TCP transfer completes.
#[test]
fn packet_too_big_from_a_1280_hop_reaches_the_guest_and_tcp_completes() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    // outside (a router) -- r1, MTU 1280 -- server 2001:db8:fff0::2 (its
    // own side 1500: it offers a full MSS, so the guest's segments are too
    // big for r1).
    let server = lab.add_netns("srv").unwrap();
    let _out = outside6(
        &lab,
        &format!(
            "&& sysctl -qw net.ipv6.conf.all.forwarding=1 \
             && ip link add r1 mtu 1280 type veth peer name eth0 netns {server} \
             && ip link set r1 up && ip -6 addr add 2001:db8:fff0::1/64 dev r1 nodad"
        ),
    );
    lab.sh(
        &server,
        "ip link set lo up && ip link set eth0 up \
         && ip -6 addr add 2001:db8:fff0::2/64 dev eth0 nodad \
         && ip -6 route add default via 2001:db8:fff0::1",
    )
    .unwrap();
    lab.sh(
        lab.hv(),
        "ip -6 route add 2001:db8:fff0::/64 via 2001:db8:ffff::2",
    )
    .unwrap();
    let g = lab.add_guest("p1").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    net_add_v6(&k, "10.62.0.1/24", &[]);
    k.cli(&["port", "add", "v6", "p1"]).unwrap();
    until("g's SLAAC address", Duration::from_secs(15), || {
        global_addr(&g, "2001:db8:1:")
    });
    until("g's default route", Duration::from_secs(5), || {
        let r = g.sh("ip -6 route show default").ok()?;
        r.contains("via fe80::").then_some(())
    });
    // Full-size segments leave the guest (MTU 1500) and stop at r1.
    let cap = Capture::start(&g.ns, "eth0").unwrap();
    // (Timed: with -n iperf3 ends when the sender has queued the bytes,
    // before the receiver has them all.)
    let v =
        kvnet_tests::tools::iperf3(&lab, &server, "2001:db8:fff0::2", &g.ns, &["-t", "2"]).unwrap();
    let (bytes, _) = kvnet_tests::tools::received(&v);
    assert!(bytes > 5_000_000, "the transfer stalled: {v}");
    let frames = cap.stop().unwrap();
    let ptb = frames
        .iter()
        .filter(|f| icmp6(f).is_some_and(|(t, _)| t == 2))
        .count();
    assert!(ptb > 0, "no packet-too-big reached the guest");
    let route = g.sh("ip -6 route get 2001:db8:fff0::2").unwrap();
    assert!(route.contains("mtu 1280"), "{route}");
}

/// The qemu guest (Debian's kernel, busybox) on a tap takes a SLAAC
/// address from kvnet's RA and reaches the outside over routed IPv6.
#[test]
fn qemu_guest_on_a_tap_takes_slaac_and_reaches_the_outside() {
    use kvnet_tests::guest::{default_cache_dir, Image, Vm, VmSpec, READY};
    if !privileged() {
        return;
    }
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    let _out = outside6(&lab, "");
    let tap = lab.add_tap("tap0").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    net_add_v6(&k, "10.63.0.1/24", &[]);
    k.cli(&["port", "add", "v6", &tap]).unwrap();
    let script = format!(
        "i=0; while [ $i -lt 150 ]; do a=$(ip -6 addr show dev eth0 scope global | grep -v tentative | sed -n 's/.*inet6 \\(2001:db8:1:[^/]*\\).*/\\1/p'); [ -n \"$a\" ] && break; sleep 0.2; i=$((i+1)); done\n\
         echo V6-ADDR $a\n\
         ip -6 route show default\n\
         ping -6 -c 3 -W 3 {OUTSIDE6} || ping6 -c 3 {OUTSIDE6} || exit 11\n"
    );
    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap,
            mac: "52:54:00:8a:00:06".into(),
            script,
            ..VmSpec::default()
        },
    )
    .unwrap();
    vm.wait_for(READY, Duration::from_secs(120)).unwrap();
    let rc = vm.wait_done(Duration::from_secs(120)).unwrap();
    let outp = vm.script_output();
    assert_eq!(rc, 0, "{}", vm.console());
    let a = outp
        .lines()
        .find_map(|l| l.strip_prefix("V6-ADDR "))
        .unwrap_or_default()
        .trim()
        .to_string();
    assert_eq!(
        a.parse::<std::net::Ipv6Addr>().ok(),
        "2001:db8:1::5054:ff:fe8a:6".parse().ok(),
        "the VM's SLAAC (EUI-64) address: {outp}"
    );
    assert!(outp.contains("3 packets received"), "{outp}");
    // (Replies to the VM's own address: routed, the outside saw it.)
    assert!(
        outp.contains("via fe80::"),
        "default route from the RA: {outp}"
    );
}
