//! Port policy on the wire (issues 20 and 21): isolated ports, ARP
//! suppression, storm control and rate limits, each with a hostile or
//! greedy guest and a positive control.
use std::{
    fs, thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    eth_frame, inject,
    kvnet::Kvnet,
    lab::{privileged, read_mac},
    mac_fmt, tools, Capture, Frame, GuestPort, Lab,
};

fn apply(lab: &Lab, k: &Kvnet, name: &str, toml: &str) {
    let f = lab.work_dir().join(name);
    fs::write(&f, toml).unwrap();
    k.cli(&["apply", &f.to_string_lossy()]).unwrap();
}

fn arp_request(src: &GuestPort, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut arp = vec![0, 1, 8, 0, 6, 4, 0, 1];
    arp.extend_from_slice(&src.mac);
    arp.extend_from_slice(&spa);
    arp.extend_from_slice(&[0; 6]);
    arp.extend_from_slice(&tpa);
    eth_frame([0xff; 6], src.mac, 0x0806, &arp)
}

/// An ARP request asking for `ip`.
fn is_arp_request_for(f: &Frame, ip: [u8; 4]) -> bool {
    let p = f.payload();
    f.ethertype() == 0x0806 && p.len() >= 28 && p[6..8] == [0, 1] && p[24..28] == ip
}

/// The gateway's MAC: its host interface `kvnet-NET` in the hv namespace.
fn gateway_mac(lab: &Lab, net: &str) -> String {
    mac_fmt(&read_mac(lab.hv(), &format!("kvnet-{net}")).unwrap())
}

#[test]
fn isolated_ports_reach_the_gateway_and_open_ports_but_never_each_other() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[
            ("i1", "10.22.0.2/24"),
            ("i2", "10.22.0.3/24"),
            ("n1", "10.22.0.4/24"),
        ])
        .unwrap();
    let (i1, i2, n1) = (&g[0], &g[1], &g[2]);
    let k = Kvnet::start(&lab).unwrap();
    apply(
        &lab,
        &k,
        "iso.toml",
        r#"
[networks.iso]
mode = "host-only"
gateway = "10.22.0.1/24"

[[ports]]
iface = "i1"
net = "iso"
isolated = true

[[ports]]
iface = "i2"
net = "iso"
isolated = true

[[ports]]
iface = "n1"
net = "iso"
"#,
    );
    let cap_i2 = Capture::start(&i2.ns, "eth0").unwrap();
    assert!(i1.ping("10.22.0.1"), "isolated -> gateway");
    assert!(i1.ping("10.22.0.4"), "isolated -> open port");
    assert!(
        n1.ping("10.22.0.3"),
        "open port -> isolated (positive control)"
    );
    assert!(i1.ping_unanswered("10.22.0.3"), "isolated -> isolated");
    // Through the gateway's MAC instead: not routed back in either.
    let gw = gateway_mac(&lab, "iso");
    i1.sh(&format!(
        "ip neigh replace 10.22.0.3 lladdr {gw} dev eth0 nud permanent"
    ))
    .unwrap();
    assert!(
        i1.ping_unanswered("10.22.0.3"),
        "isolated -> isolated via the gateway"
    );
    assert!(
        k.port_drops("i1", "isolated") > 0,
        "{:?}",
        k.port_stats("i1")
    );
    let frames = cap_i2.stop().unwrap();
    let from_i1 = frames.iter().filter(|f| f.src_mac() == i1.mac).count();
    let from_n1 = frames.iter().filter(|f| f.src_mac() == n1.mac).count();
    assert_eq!(from_i1, 0, "i2 saw frames of i1");
    assert!(
        from_n1 > 0,
        "the capture saw nothing from n1: it would not have seen i1's"
    );
}

#[test]
fn arp_for_a_known_guest_is_answered_without_a_flood() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[
            ("a1", "10.23.0.2/24"),
            ("a2", "10.23.0.3/24"),
            ("a3", "10.23.0.4/24"),
        ])
        .unwrap();
    let (a1, a2, a3) = (&g[0], &g[1], &g[2]);
    let k = Kvnet::start(&lab).unwrap();
    let port = |g: &GuestPort, ip: &str| {
        format!(
            "[[ports]]\niface = \"{}\"\nnet = \"arp\"\nmac = [\"{}\"]\nip = [\"{ip}\"]\n",
            g.hv_if,
            mac_fmt(&g.mac)
        )
    };
    apply(
        &lab,
        &k,
        "arp.toml",
        &format!(
            "[networks.arp]\nmode = \"host-only\"\ngateway = \"10.23.0.1/24\"\n\n{}\n{}\n{}",
            port(a1, "10.23.0.2"),
            port(a2, "10.23.0.3"),
            port(a3, "10.23.0.4")
        ),
    );
    let cap_a3 = Capture::start(&a3.ns, "eth0").unwrap();
    let cap_a2 = Capture::start(&a2.ns, "eth0").unwrap();
    // Both ways and the gateway: every request answered by kvnet.
    assert!(a1.ping("10.23.0.3"), "a1 -> a2");
    assert!(a2.ping("10.23.0.2"), "a2 -> a1");
    assert!(a1.ping("10.23.0.1"), "a1 -> gateway");
    let neigh = a1.sh("ip neigh show 10.23.0.3").unwrap();
    assert!(
        neigh.contains(&mac_fmt(&a2.mac)),
        "a1 resolved a2 wrongly: {neigh}"
    );
    // Positive control: a request for an unknown address is flooded.
    inject(
        &a1.ns,
        "eth0",
        &[arp_request(a1, [10, 23, 0, 2], [10, 23, 0, 99])],
    )
    .unwrap();
    let t0 = Instant::now();
    let a3_frames = loop {
        let f = cap_a3.frames().unwrap();
        if f.iter().any(|f| is_arp_request_for(f, [10, 23, 0, 99])) {
            break f;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the unknown ARP was not flooded"
        );
        thread::sleep(Duration::from_millis(50));
    };
    cap_a3.stop().unwrap();
    let a2_frames = cap_a2.stop().unwrap();
    for (who, own_ip, frames) in [
        ("a3", [10, 23, 0, 4], &a3_frames),
        ("a2", [10, 23, 0, 3], &a2_frames),
    ] {
        // Broadcast requests that arrived: tcpdump shows the guest's own
        // too, and a unicast one (a neighbour refresh) is no flood.
        let known: Vec<String> = frames
            .iter()
            .filter(|f| f.is_broadcast() && f.payload().get(14..18) != Some(&own_ip[..]))
            .filter(|f| {
                [[10, 23, 0, 1], [10, 23, 0, 2], [10, 23, 0, 3]]
                    .iter()
                    .any(|ip| is_arp_request_for(f, *ip))
            })
            .map(|f| {
                format!(
                    "from {} for {:?}",
                    mac_fmt(&f.src_mac()),
                    &f.payload()[24..28]
                )
            })
            .collect();
        assert!(
            known.is_empty(),
            "{who} saw ARP requests for known addresses: {known:?}"
        );
    }
    let answered = k.port_stats("a1").unwrap()["arp_answered"]
        .as_u64()
        .unwrap_or(0);
    assert!(answered >= 2, "a1's requests answered by kvnet: {answered}");
}

#[test]
fn a_broadcast_storm_is_cut_and_counted_while_other_guests_talk() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[
            ("b1", "10.25.0.1/24"),
            ("b2", "10.25.0.2/24"),
            ("b3", "10.25.0.3/24"),
        ])
        .unwrap();
    let (b1, b2, b3) = (&g[0], &g[1], &g[2]);
    let k = Kvnet::start(&lab).unwrap();
    apply(
        &lab,
        &k,
        "storm.toml",
        "[networks.storm]\nstorm_pps = 200\n\n[[rules]]\nmatch = \"b*\"\nnet = \"storm\"\n",
    );
    let cap = Capture::start(&b3.ns, "eth0").unwrap();
    const SENT: usize = 5000;
    let frame = eth_frame([0xff; 6], b1.mac, 0x88b5, b"kvnet: storm");
    let flood = thread::scope(|s| {
        let flooder = s.spawn(|| {
            let t0 = Instant::now();
            for _ in 0..10 {
                inject(&b1.ns, "eth0", &vec![frame.clone(); SENT / 10]).unwrap();
            }
            t0.elapsed()
        });
        // Meanwhile b2 and b3 talk.
        assert!(b2.ping("10.25.0.3"), "b2 -> b3 during the storm");
        flooder.join().unwrap()
    });
    assert!(b3.ping("10.25.0.2"), "b3 -> b2 after the storm");
    let frames = cap.stop().unwrap();
    let got = frames
        .iter()
        .filter(|f| f.src_mac() == b1.mac && f.ethertype() == 0x88b5)
        .count();
    // 200 a second plus one second of burst, over the storm's length.
    let allowed = 200 + (200.0 * flood.as_secs_f64()).ceil() as usize + 10;
    assert!(
        got > 0,
        "nothing of the storm arrived: the limit cut everything"
    );
    assert!(
        got <= allowed,
        "{got} of {SENT} flooded in {flood:?}: more than {allowed}"
    );
    let dropped = k.port_drops("b1", "storm");
    assert!(
        dropped as usize >= SENT - allowed,
        "storm drops counted: {dropped}, {got} passed"
    );
}

/// iperf3's received rate in bits/s, from `client` to the server at `to`
/// (`reverse`: from the server to `client`).
fn iperf_rate(lab: &Lab, server: &GuestPort, to: &str, client: &GuestPort, reverse: bool) -> f64 {
    let mut args = vec!["-t", "5", "-O", "2"];
    if reverse {
        args.push("-R");
    }
    let v = tools::iperf3(lab, &server.ns, to, &client.ns, &args).unwrap();
    let (_, bps) = tools::received(&v);
    assert!(bps > 0.0, "iperf3: {v}");
    bps
}

#[test]
fn rate_limits_hold_each_way_within_ten_percent() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("r1", "10.26.0.1/24"), ("r2", "10.26.0.2/24")])
        .unwrap();
    let (r1, r2) = (&g[0], &g[1]);
    let k = Kvnet::start(&lab).unwrap();
    apply(
        &lab,
        &k,
        "rate.toml",
        r#"
[networks.rate]

[[ports]]
iface = "r1"
net = "rate"
rate_out = "10mbit"
rate_in = "20mbit"

[[ports]]
iface = "r2"
net = "rate"
"#,
    );
    let out = iperf_rate(&lab, r2, "10.26.0.2", r1, false);
    let inn = iperf_rate(&lab, r2, "10.26.0.2", r1, true);
    println!(
        "r1 out {:.2} Mbit/s (limit 10), in {:.2} Mbit/s (limit 20)",
        out / 1e6,
        inn / 1e6
    );
    assert!(
        (9.0e6..=11.0e6).contains(&out),
        "out of r1: {out} bit/s, limit 10mbit"
    );
    assert!(
        (18.0e6..=22.0e6).contains(&inn),
        "into r1: {inn} bit/s, limit 20mbit"
    );
    assert!(
        k.port_drops("r1", "rate_limit") > 0,
        "the policer never dropped: no limit seen"
    );
}

/// libvirt's `<port isolated='yes'/>` and `<bandwidth>`, imported from
/// network XML by `kvnet import-libvirt` and applied: the guests reach the
/// gateway but not each other, and TCP to and from the host holds the
/// imported averages (KiB/s) within 10%.
#[test]
fn libvirt_port_isolation_and_bandwidth_imported_from_xml_hold_on_the_wire() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("lv1", "10.27.0.2/24"), ("lv2", "10.27.0.3/24")])
        .unwrap();
    let (v1, v2) = (&g[0], &g[1]);
    let k = Kvnet::start(&lab).unwrap();
    let xml = lab.work_dir().join("iso.xml");
    // 2500 KiB/s in (20.48 Mbit/s), 1250 KiB/s out (10.24 Mbit/s).
    fs::write(
        &xml,
        "<network>\n  <name>iso</name>\n  <port isolated='yes'/>\n  \
         <bandwidth><inbound average='2500'/><outbound average='1250'/></bandwidth>\n  \
         <ip address='10.27.0.1' netmask='255.255.255.0'/>\n</network>\n",
    )
    .unwrap();
    let out = std::process::Command::new(k.bin())
        .arg("import-libvirt")
        .arg(&xml)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8(out.stdout).unwrap();
    assert!(toml.contains("isolated_ports = true"), "{toml}");
    apply(
        &lab,
        &k,
        "iso.toml",
        &format!("{toml}\n[[rules]]\nmatch = \"lv*\"\nnet = \"iso\"\n"),
    );
    assert!(v1.ping("10.27.0.1"), "isolated guest -> gateway");
    assert!(v2.ping("10.27.0.1"), "isolated guest -> gateway");
    assert!(v1.ping_unanswered("10.27.0.3"), "isolated -> isolated");
    // TCP with the host at the gateway address.
    let host = GuestPort {
        ns: lab.hv().to_string(),
        hv_if: "kvnet-iso".into(),
        guest_if: "kvnet-iso".into(),
        mac: read_mac(lab.hv(), "kvnet-iso").unwrap(),
    };
    let out = iperf_rate(&lab, &host, "10.27.0.1", v1, false);
    let inn = iperf_rate(&lab, &host, "10.27.0.1", v1, true);
    println!(
        "lv1 out {:.2} Mbit/s (10.24), in {:.2} Mbit/s (20.48)",
        out / 1e6,
        inn / 1e6
    );
    assert!(
        (0.9 * 10.24e6..=1.1 * 10.24e6).contains(&out),
        "out of lv1: {out} bit/s"
    );
    assert!(
        (0.9 * 20.48e6..=1.1 * 20.48e6).contains(&inn),
        "into lv1: {inn} bit/s"
    );
}
