//! Issue: the host in the picture. Gateway interface, host-only, routed
//! (eBPF fast path through the kernel FIB) and bridged networks.
use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use kvnet_tests::{
    count_frames,
    kvnet::Kvnet,
    lab::{ping, ping_unanswered, privileged},
    tools::snmp,
    Capture, GuestPort, Lab, Outside,
};
use serde_json::Value;

fn guest(lab: &Lab, port: &str, cidr: &str, gw: Option<&str>) -> GuestPort {
    let g = lab.add_guest_with(port, Some(cidr)).unwrap();
    g.disable_ipv6().unwrap();
    if let Some(gw) = gw {
        g.sh(&format!("ip route add default via {gw}")).unwrap();
    }
    g
}

/// The outside world: 198.51.100.0/24 behind the hypervisor's uplink up0.
fn outside(lab: &Lab) -> Outside {
    lab.add_outside_with("198.51.100.2/24", "198.51.100.1/24")
        .unwrap()
}

fn iperf(lab: &Lab, server_ns: &str, server_ip: &str, client_ns: &str) -> Value {
    kvnet_tests::tools::iperf3(lab, server_ns, server_ip, client_ns, &["-t", "2"]).unwrap()
}

#[test]
fn host_only_reaches_the_host_but_not_beyond() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let out = outside(&lab);
    let g1 = guest(&lab, "p1", "10.30.0.2/24", Some("10.30.0.1"));
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&[
        "net",
        "add",
        "ho",
        "--mode",
        "host-only",
        "--gateway",
        "10.30.0.1/24",
    ])
    .unwrap();
    k.cli(&["port", "add", "ho", "p1"]).unwrap();
    lab.sh(lab.hv(), "sysctl -qw net.ipv4.ip_forward=1")
        .unwrap();
    out.sh("ip route add 10.30.0.0/24 via 198.51.100.1")
        .unwrap();

    let show = k.json(&["net", "show", "ho"]).unwrap();
    assert_eq!(show["mode"], "host-only", "{show}");
    assert_eq!(show["gateway"]["address"], "10.30.0.1", "{show}");
    assert_eq!(show["gateway"]["prefix"], 24, "{show}");
    assert!(ping(&g1.ns, "10.30.0.1"), "guest -> gateway");
    // A TCP service bound to the gateway address on the host.
    let v = iperf(&lab, lab.hv(), "10.30.0.1", &g1.ns);
    assert!(v["end"]["sum_received"]["bytes"].as_u64().unwrap() > 1_000_000);
    assert!(ping(lab.hv(), "10.30.0.2"), "host -> guest");
    assert!(
        ping_unanswered(&g1.ns, "198.51.100.2"),
        "host-only guest reached the outside"
    );
}

#[test]
fn routed_network_forwards_in_the_fast_path_without_nat() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let out = outside(&lab);
    out.sh("ip route add 10.31.0.0/24 via 198.51.100.1")
        .unwrap();
    let g1 = guest(&lab, "p1", "10.31.0.2/24", Some("10.31.0.1"));
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&[
        "net",
        "add",
        "rt",
        "--mode",
        "routed",
        "--gateway",
        "10.31.0.1/24",
        "--uplink",
        "up0",
    ])
    .unwrap();
    k.cli(&["port", "add", "rt", "p1"]).unwrap();

    let cap = Capture::start(&out.ns, "eth0").unwrap();
    assert!(ping(&g1.ns, "198.51.100.2"), "guest -> outside");
    assert!(ping(&out.ns, "10.31.0.2"), "outside -> guest");
    let frames = cap.stop().unwrap();
    let from_guest = count_frames(&frames, |f| {
        f.ipv4_addrs().is_some_and(|(s, _)| s == [10, 31, 0, 2])
    });
    assert!(
        from_guest >= 2,
        "the outside sees the guest's own address: {frames:?}"
    );

    // Established bulk traffic bypasses the host stack's forwarding.
    let fwd_before = snmp(lab.hv(), "Ip", "ForwDatagrams");
    let v = iperf(&lab, &out.ns, "198.51.100.2", &g1.ns);
    let fwd = snmp(lab.hv(), "Ip", "ForwDatagrams") - fwd_before;
    let sent = v["end"]["sum_sent"]["bytes"].as_u64().unwrap();
    println!(
        "routed iperf3: {:.2} Gbit/s, host forwarded {fwd} datagrams",
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .unwrap()
            / 1e9
    );
    assert!(sent > 10_000_000);
    assert!(
        fwd < 50,
        "host stack forwarded {fwd} datagrams of an established flow"
    );
    assert_eq!(snmp(&out.ns, "Tcp", "InCsumErrors"), 0);
    let p1 = k.port_stats("p1").unwrap();
    assert!(p1["routed"].as_u64().unwrap() > 1000, "{p1}");

    // TTL expiry and a path-MTU bottleneck give the guest correct ICMP errors.
    let ttl = g1.exec_output_str("ping -c 1 -W 2 -t 1 198.51.100.2");
    assert!(ttl.contains("Time to live exceeded"), "{ttl}");
    lab.exec(lab.hv(), &["ip", "link", "set", "up0", "mtu", "1400"])
        .unwrap();
    let mtu = g1.exec_output_str(
        "ping -c 1 -W 2 -M do -s 1450 198.51.100.2; ping -c 1 -W 2 -M do -s 1450 198.51.100.2",
    );
    assert!(
        mtu.contains("mtu = 1400") || mtu.contains("Frag needed"),
        "{mtu}"
    );
}

trait ShOut {
    fn exec_output_str(&self, cmd: &str) -> String;
}
impl ShOut for GuestPort {
    fn exec_output_str(&self, cmd: &str) -> String {
        let o = kvnet_tests::lab::exec_output(&self.ns, &["sh", "-c", cmd]).unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    }
}

#[test]
fn bridged_guests_are_peers_on_the_lan_and_the_host_keeps_its_address() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let out = outside(&lab);
    let g1 = guest(&lab, "p1", "198.51.100.11/24", None);
    let g2 = guest(&lab, "p2", "198.51.100.12/24", None);
    let k = Kvnet::start(&lab).unwrap();

    // The outside pings the hypervisor and holds a TCP session to it
    // throughout attaching and detaching.
    let mut pinger = Command::new("ping");
    pinger
        .args(["-i", "0.05", "-w", "6", "198.51.100.1"])
        .stdout(Stdio::piped());
    let pinger = lab.spawn(&out.ns, pinger).unwrap();
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", "198.51.100.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(lab.hv(), srv).unwrap();
    thread::sleep(Duration::from_millis(300));
    let mut cli = Command::new("iperf3");
    cli.args(["-c", "198.51.100.1", "-t", "5", "-b", "50M", "-J"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut tcp = lab.spawn(&out.ns, cli).unwrap();
    thread::sleep(Duration::from_millis(500));

    k.cli(&["net", "add", "lan", "--mode", "bridged", "--uplink", "up0"])
        .unwrap();
    k.cli(&["port", "add", "lan", "p1"]).unwrap();
    k.cli(&["port", "add", "lan", "p2"]).unwrap();
    let promisc = lab.sh(lab.hv(), "ip -d link show up0").unwrap();
    assert!(promisc.contains("promiscuity 1"), "{promisc}");

    assert!(ping(&g1.ns, "198.51.100.2"), "guest -> outside host");
    assert!(ping(&out.ns, "198.51.100.12"), "outside -> guest");
    assert!(ping(&g1.ns, "198.51.100.1"), "guest -> hypervisor");
    assert!(ping(lab.hv(), "198.51.100.11"), "hypervisor -> guest");
    assert!(ping(&g1.ns, "198.51.100.12"), "guest -> guest");
    let v = iperf(&lab, &out.ns, "198.51.100.2", &g2.ns);
    assert!(
        v["end"]["sum_received"]["bytes"].as_u64().unwrap_or(0) > 10_000_000,
        "{v}"
    );
    assert_eq!(snmp(&out.ns, "Tcp", "InCsumErrors"), 0);

    k.cli(&["net", "del", "lan"]).unwrap();
    let promisc = lab.sh(lab.hv(), "ip -d link show up0").unwrap();
    assert!(
        promisc.contains("promiscuity 0"),
        "promiscuous mode restored: {promisc}"
    );

    let status = tcp
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("iperf3 finished");
    assert!(status.success(), "TCP session to the hypervisor broke");
    let mut json = String::new();
    use std::io::Read;
    tcp.stdout
        .take()
        .unwrap()
        .read_to_string(&mut json)
        .unwrap();
    let v: Value = serde_json::from_str(&json).unwrap();
    assert!(
        v["end"]["sum_received"]["bytes"].as_u64().unwrap() > 1_000_000,
        "{v}"
    );
    let mut pinger = pinger;
    pinger.wait_timeout(Duration::from_secs(10)).unwrap();
    let mut ping_out = String::new();
    pinger
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut ping_out)
        .unwrap();
    assert!(
        ping_out.contains(" 0% packet loss"),
        "pings to the hypervisor lost:\n{ping_out}"
    );
    let _ = &mut tcp;
}

#[test]
fn bad_gateway_and_uplink_input_is_refused() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    outside(&lab);
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "b1", "--mode", "bridged", "--uplink", "up0"])
        .unwrap();
    let before = (
        k.json(&["net", "list"]).unwrap(),
        k.json(&["port", "list"]).unwrap(),
    );
    let links_before = lab
        .sh(lab.hv(), "ip -o link show | cut -d: -f2 | sort")
        .unwrap();
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "net",
                "add",
                "g0",
                "--mode",
                "routed",
                "--gateway",
                "10.1.1.1/0",
                "--uplink",
                "up0",
            ],
            "out of range",
        ),
        (
            &[
                "net",
                "add",
                "g1",
                "--mode",
                "host-only",
                "--gateway",
                "10.1.1.1/32",
            ],
            "out of range",
        ),
        (
            &["net", "add", "g2", "--mode", "host-only"],
            "needs --gateway",
        ),
        (&["net", "add", "g3", "--mode", "bridged"], "needs --uplink"),
        (
            &["net", "add", "g4", "--mode", "bridged", "--uplink", "up0"],
            "already a port of network 'b1'",
        ),
        (
            &[
                "net",
                "add",
                "g5",
                "--mode",
                "routed",
                "--gateway",
                "10.2.2.1/24",
                "--uplink",
                "nosuch0",
            ],
            "'nosuch0' does not exist",
        ),
    ];
    for (args, want) in cases {
        let err = k.cli_err(args).unwrap();
        assert!(
            err.contains(want),
            "`kvnet {}`: want {want:?} in {err:?}",
            args.join(" ")
        );
    }
    assert_eq!(
        (
            k.json(&["net", "list"]).unwrap(),
            k.json(&["port", "list"]).unwrap()
        ),
        before
    );
    assert_eq!(
        lab.sh(lab.hv(), "ip -o link show | cut -d: -f2 | sort")
            .unwrap(),
        links_before,
        "no interface left half-made"
    );
}

/// Review finding (issue 14): on a bridged network, the host's frame to a
/// guest whose MAC had aged out of the FDB went only to the wire, never to
/// the guests (a bridge floods unknown unicast to every port).
#[test]
fn the_host_reaches_a_guest_whose_mac_left_the_fdb() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _out = outside(&lab);
    let g1 = guest(&lab, "p1", "198.51.100.11/24", None);
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "lan", "--mode", "bridged", "--uplink", "up0"])
        .unwrap();
    k.cli(&["port", "add", "lan", "p1"]).unwrap();
    let once = |ns: &str, ip: &str| {
        kvnet_tests::lab::exec_output(ns, &["ping", "-c", "1", "-W", "1", ip])
            .is_ok_and(|o| o.status.success())
    };
    assert!(once(lab.hv(), "198.51.100.11"), "positive control");
    let mac = g1
        .sh("ip -br link show eth0")
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    // The host keeps the guest's neighbour entry, the switch forgets the MAC.
    lab.sh(
        lab.hv(),
        &format!("ip neigh replace 198.51.100.11 lladdr {mac} dev up0 nud permanent"),
    )
    .unwrap();
    k.cli(&["fdb", "del", "lan", &mac]).unwrap();
    assert!(
        !k.json(&["fdb", "show", "lan"])
            .unwrap()
            .to_string()
            .contains(&mac),
        "the MAC is gone"
    );
    assert!(once(lab.hv(), "198.51.100.11"), "flooded to the guests");
}
