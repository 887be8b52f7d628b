//! Issue 19: networks across hosts (VXLAN). Each "host" is a lab of its
//! own (hv namespace, kvnet daemon, guests); their underlay links `ul0`
//! meet in a router namespace (`u0`, `u1`, `u2`), one /24 per host, so the
//! VTEPs (10.99.N.2) reach each other routed, as across a fabric.
use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    eth_frame, inject,
    kvnet::Kvnet,
    lab::{privileged, sh},
    pcap::write_pcap,
    tools, Capture, Frame, GuestPort, Lab,
};
use serde_json::Value;

/// What `ip link` gives guests on an overlay: the underlay's 1500 less
/// the 50 bytes of VXLAN headers (what kvnet hands out by DHCP).
const GUEST_MTU: &str = "1450";

struct Host {
    // Stopped before its lab goes.
    k: Kvnet,
    lab: Lab,
    vtep: String,
}

struct Overlay {
    hosts: Vec<Host>,
    /// The router namespace (of the first host's lab).
    rt: String,
}

/// `n` hosts on a routed underlay, each with a kvnet daemon.
fn overlay(n: usize) -> Overlay {
    let labs: Vec<Lab> = (0..n).map(|_| Lab::new().unwrap()).collect();
    let rt = labs[0].add_netns("rt").unwrap();
    sh(
        &rt,
        "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.disable_ipv6=1",
    )
    .unwrap();
    for (i, lab) in labs.iter().enumerate() {
        let hv = lab.hv();
        sh(
            &rt,
            &format!(
                "ip link add u{i} type veth peer name ul0 netns {hv} && ip addr add 10.99.{i}.1/24 dev u{i} && ip link set u{i} up"
            ),
        )
        .unwrap();
        sh(
            hv,
            &format!(
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 && ip addr add 10.99.{i}.2/24 dev ul0 && ip link set ul0 up && ip route add default via 10.99.{i}.1"
            ),
        )
        .unwrap();
    }
    let hosts = labs
        .into_iter()
        .enumerate()
        .map(|(i, lab)| Host {
            k: Kvnet::start(&lab).unwrap(),
            lab,
            vtep: format!("10.99.{i}.2"),
        })
        .collect();
    Overlay { hosts, rt }
}

impl Overlay {
    /// Network `net` with `vni` on the hosts `on`, each naming the others
    /// as its static peers.
    fn net(&self, net: &str, vni: u32, on: &[usize]) {
        for &i in on {
            let h = &self.hosts[i];
            let remotes: Vec<&str> = on
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| self.hosts[j].vtep.as_str())
                .collect();
            h.k.cli(&[
                "net",
                "add",
                net,
                "--vxlan",
                &vni.to_string(),
                "--vtep-local",
                &h.vtep,
                "--vtep-dev",
                "ul0",
                "--remote",
                &remotes.join(","),
            ])
            .unwrap();
        }
    }

    /// A guest `name` on host `i` in `net` with address `cidr`.
    fn guest(&self, i: usize, net: &str, name: &str, cidr: &str) -> GuestPort {
        let h = &self.hosts[i];
        let g = h.lab.add_ipv4_guests(&[(name, cidr)]).unwrap().remove(0);
        g.sh(&format!("ip link set eth0 mtu {GUEST_MTU}")).unwrap();
        h.k.cli(&["port", "add", net, name]).unwrap();
        g
    }
}

/// The VXLAN header of an outer IPv4/UDP frame to port 4789: (outer
/// source, outer destination, VNI, inner frame).
fn vxlan_of(f: &Frame) -> Option<(Ipv4Addr, Ipv4Addr, u32, Frame)> {
    let d = &f.data;
    if f.ethertype() != 0x0800 || f.ipv4_proto() != Some(17) {
        return None;
    }
    let ihl = (d.get(14)? & 0x0f) as usize * 4;
    let udp = 14 + ihl;
    if u16::from_be_bytes([*d.get(udp + 2)?, *d.get(udp + 3)?]) != 4789 {
        return None;
    }
    let vx = udp + 8;
    let vni = u32::from_be_bytes([0, *d.get(vx + 4)?, *d.get(vx + 5)?, *d.get(vx + 6)?]);
    let (s, t) = f.ipv4_addrs()?;
    Some((
        s.into(),
        t.into(),
        vni,
        Frame::new(d.get(vx + 8..)?.to_vec()),
    ))
}

/// `mac`'s row of network `net`'s FDB (Null if it has none).
fn fdb_row(k: &Kvnet, net: &str, mac: &[u8; 6]) -> Value {
    let mac = kvnet_tests::mac_fmt(mac);
    k.fdb(net)
        .into_iter()
        .find(|r| r["mac"] == mac.as_str())
        .unwrap_or_default()
}

/// Whether the outer IPv4 header says "fragment" (MF or an offset).
fn fragmented(f: &Frame) -> bool {
    let d = &f.data;
    f.ethertype() == 0x0800 && d.len() > 21 && u16::from_be_bytes([d[20], d[21]]) & 0x3fff != 0
}

/// Whether a frame is IPv4 or ARP from/to an address starting with
/// `prefix` (`[192, 168, 50]`, or a whole address): ARP sender at 28,
/// target at 38 past the Ethernet header.
fn touches(inner: &Frame, prefix: &[u8]) -> bool {
    let d = &inner.data;
    let in_prefix = |off: usize| d.get(off..off + prefix.len()) == Some(prefix);
    match inner.ethertype() {
        0x0806 => in_prefix(28) || in_prefix(38),
        0x0800 => in_prefix(26) || in_prefix(30),
        _ => false,
    }
}

#[test]
fn guests_on_three_hosts_talk_over_vxlan_with_their_vni_on_the_wire() {
    if !privileged() {
        return;
    }
    let o = overlay(3);
    o.net("ov", 100, &[0, 1, 2]);
    let g: Vec<GuestPort> = (0..3)
        .map(|i| o.guest(i, "ov", "g", &format!("192.168.50.{}/24", i + 1)))
        .collect();
    let cap = Capture::start(&o.rt, "u0").unwrap();
    for (from, to) in [(0, 1), (0, 2), (1, 2)] {
        let ip = format!("192.168.50.{}", to + 1);
        assert!(g[from].ping(&ip), "guest on host {from} -> {ip}");
    }
    let frames = cap.stop().unwrap();
    // A's link carries A's guest's pings in VNI 100 to both other VTEPs.
    let tunnelled: Vec<(Ipv4Addr, Ipv4Addr, u32, Frame)> =
        frames.iter().filter_map(vxlan_of).collect();
    for peer in ["10.99.1.2", "10.99.2.2"] {
        let peer: Ipv4Addr = peer.parse().unwrap();
        let icmp = tunnelled.iter().find(|(s, t, vni, inner)| {
            *s == Ipv4Addr::new(10, 99, 0, 2)
                && *t == peer
                && *vni == 100
                && inner.src_mac() == g[0].mac
                && inner.icmp_type() == Some(8)
        });
        assert!(
            icmp.is_some(),
            "no ICMP echo in VNI 100 from A to {peer} on the underlay: {} tunnelled frames",
            tunnelled.len()
        );
    }
    assert!(
        tunnelled.iter().all(|(_, _, vni, _)| *vni == 100),
        "a VNI other than 100 on the underlay"
    );
    assert!(!frames.iter().any(fragmented), "fragmented outer packets");
    // tcpdump decodes it too.
    let file = o.hosts[0].lab.work_dir().join("underlay.pcap");
    std::fs::write(&file, write_pcap(&frames)).unwrap();
    let text = sh(
        &o.rt,
        &format!("tcpdump -nr {} 2>/dev/null", file.display()),
    )
    .unwrap();
    assert!(
        text.contains("VXLAN") && text.contains("vni 100"),
        "tcpdump's reading:\n{text}"
    );

    // TCP (GSO super-packets from the guest) across hosts, intact, and no
    // outer packet fragmented on the way.
    let frag_before = tools::snmp(o.hosts[0].lab.hv(), "Ip", "FragCreates");
    tools::echo_server(&o.hosts[2].lab, &g[2].ns, 7000).unwrap();
    let echoed = tools::py(
        &g[0].ns,
        "import socket\ns=socket.create_connection(('192.168.50.3',7000),timeout=5)\nd=b'kvnet-vxlan'*5000\ns.sendall(d)\nr=b''\nwhile len(r)<len(d):\n  c=s.recv(65536)\n  if not c: break\n  r+=c\nprint('ok' if r==d else 'short %d' % len(r))",
    );
    assert_eq!(echoed.trim(), "ok", "TCP echo across hosts");
    let bps = tools::iperf3_tcp_intact(&o.hosts[1].lab, &g[1].ns, "192.168.50.2", &g[0].ns);
    eprintln!(
        "TCP over kvnet VXLAN (veth underlay): {:.2} Gbit/s",
        bps / 1e9
    );
    assert_eq!(
        tools::snmp(o.hosts[0].lab.hv(), "Ip", "FragCreates"),
        frag_before,
        "the sending host fragmented outer packets"
    );

    // A's FDB: the remote guests behind their VTEPs.
    for (i, vtep) in [(1, "10.99.1.2"), (2, "10.99.2.2")] {
        let row = fdb_row(&o.hosts[0].k, "ov", &g[i].mac);
        assert_eq!(row["vtep"], vtep, "{row}");
        assert_eq!(row["port"], "kvnet-vtep", "{row}");
    }
    let text = o.hosts[0].k.cli(&["fdb", "show", "ov"]).unwrap();
    assert!(text.contains("10.99.2.2"), "fdb show:\n{text}");
    let vtep = o.hosts[0]
        .k
        .port_stats("kvnet-vtep")
        .expect("the VTEP's counters");
    assert!(
        vtep["rx_packets"].as_u64() > Some(0) && vtep["tx_packets"].as_u64() > Some(0),
        "{vtep}"
    );
    let show: Value = o.hosts[0].k.json(&["net", "show", "ov"]).unwrap();
    assert_eq!(show["vxlan"]["vni"], 100, "{show}");
    assert_eq!(show["vxlan"]["vtep_local"], "10.99.0.2", "{show}");
    assert_eq!(show["vxlan"]["remotes"][1], "10.99.2.2", "{show}");
    assert_eq!(show["vxlan"]["mtu"], 1450, "{show}");
}

#[test]
fn vnis_stay_apart_and_broadcasts_reach_only_their_vteps() {
    if !privileged() {
        return;
    }
    let o = overlay(3);
    // ov (VNI 100) on every host, blue (VNI 200) on A and B only; both
    // use one subnet, so a leak would show as an answered ARP too.
    o.net("ov", 100, &[0, 1, 2]);
    o.net("blue", 200, &[0, 1]);
    let a100 = o.guest(0, "ov", "a100", "192.168.50.1/24");
    let b100 = o.guest(1, "ov", "b100", "192.168.50.2/24");
    let a200 = o.guest(0, "blue", "a200", "192.168.50.11/24");
    let b200 = o.guest(1, "blue", "b200", "192.168.50.12/24");
    let to_b = Capture::start(&o.rt, "u1").unwrap();
    let to_c = Capture::start(&o.rt, "u2").unwrap();
    let at_b200 = Capture::start(&b200.ns, "eth0").unwrap();
    let at_b100 = Capture::start(&b100.ns, "eth0").unwrap();
    // Each ping starts with an ARP broadcast in its own VNI.
    assert!(a100.ping("192.168.50.2"), "ov: A -> B");
    assert!(a200.ping("192.168.50.12"), "blue: A -> B");
    assert!(a100.ping_unanswered("192.168.50.12"), "ov reached blue");
    let (to_b, to_c) = (to_b.stop().unwrap(), to_c.stop().unwrap());
    let (at_b200, at_b100) = (at_b200.stop().unwrap(), at_b100.stop().unwrap());
    let vnis = |frames: &[Frame], vni: u32, bcast: bool| {
        frames
            .iter()
            .filter_map(vxlan_of)
            .filter(|(_, _, v, inner)| *v == vni && (!bcast || inner.is_broadcast()))
            .count()
    };
    // Positive controls: each VNI's broadcast reached B, ov's reached C.
    assert!(vnis(&to_b, 100, true) > 0, "no VNI 100 broadcast to B");
    assert!(vnis(&to_b, 200, true) > 0, "no VNI 200 broadcast to B");
    assert!(vnis(&to_c, 100, true) > 0, "no VNI 100 broadcast to C");
    // C does not serve VNI 200: nothing of it on C's link.
    assert_eq!(vnis(&to_c, 200, false), 0, "VNI 200 frames sent to C");
    // The guest of VNI 200 on B saw its own network's traffic only.
    let ov_addrs = |f: &Frame| touches(f, &[192, 168, 50, 1]) || touches(f, &[192, 168, 50, 2]);
    assert!(
        at_b200.iter().any(|f| f.src_mac() == a200.mac),
        "positive control: blue's guest on B saw nothing of A's blue guest"
    );
    assert!(
        !at_b200
            .iter()
            .any(|f| f.src_mac() == a100.mac || ov_addrs(f)),
        "blue's guest on B saw ov's traffic"
    );
    assert!(
        at_b100
            .iter()
            .any(|f| f.src_mac() == a100.mac && touches(f, &[192, 168, 50])),
        "positive control: ov's guest on B saw nothing of A's"
    );
    assert!(
        !at_b100.iter().any(|f| f.src_mac() == a200.mac),
        "ov's guest on B saw blue's traffic"
    );
}

#[test]
fn a_guest_moved_to_another_host_is_reached_again_within_2s() {
    if !privileged() {
        return;
    }
    let o = overlay(3);
    o.net("ov", 100, &[0, 1, 2]);
    let mac = [0x02, 0, 0, 0, 0x99, 0x01];
    let moving = |i: usize| {
        let h = &o.hosts[i];
        let g = h
            .lab
            .add_ipv4_guests(&[("vm", "192.168.50.9/24")])
            .unwrap()
            .remove(0);
        g.sh(&format!(
            "ip link set eth0 down && ip link set eth0 address {} mtu {GUEST_MTU} && ip link set eth0 up",
            kvnet_tests::mac_fmt(&mac)
        ))
        .unwrap();
        h.k.cli(&["port", "add", "ov", "vm"]).unwrap();
        g
    };
    let _vm_a = moving(0);
    let c = o.guest(2, "ov", "c", "192.168.50.3/24");
    assert!(c.ping("192.168.50.9"), "C's guest -> the VM on A");
    let on =
        |host: usize| fdb_row(&o.hosts[2].k, "ov", &mac)["vtep"] == o.hosts[host].vtep.as_str();
    assert!(on(0), "C's FDB has the VM behind A's VTEP");

    // Migrated: its port goes on A, comes on B with the same MAC, and the
    // VM announces itself (a gratuitous ARP, as QEMU does after a move).
    o.hosts[0].k.cli(&["port", "del", "vm"]).unwrap();
    let vm_b = moving(1);
    let moved = Instant::now();
    let mut garp = Vec::new();
    garp.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    garp.extend_from_slice(&mac);
    garp.extend_from_slice(&[192, 168, 50, 9]);
    garp.extend_from_slice(&[0; 6]);
    garp.extend_from_slice(&[192, 168, 50, 9]);
    inject(
        &vm_b.ns,
        "eth0",
        &[eth_frame([0xff; 6], mac, 0x0806, &garp)],
    )
    .unwrap();
    loop {
        let out = kvnet_tests::lab::exec_output(&c.ns, &["ping", "-c1", "-W0.2", "192.168.50.9"]);
        if out.is_ok_and(|o| {
            kvnet_tests::lab::parse_ping_received(&String::from_utf8_lossy(&o.stdout)) > 0
        }) {
            break;
        }
        assert!(
            moved.elapsed() < Duration::from_secs(2),
            "the moved VM was not reached within 2 s"
        );
        thread::sleep(Duration::from_millis(20));
    }
    eprintln!("reached again {:?} after the move", moved.elapsed());
    assert!(on(1), "C's FDB has the VM behind B's VTEP");
}
