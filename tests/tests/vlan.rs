//! Issue 4: VLANs in the fast path. Access, trunk and native VLAN ports,
//! per-VLAN learning and flooding, checked on captured frames. There is no
//! 8021q module here: the far side of a trunk injects and captures raw
//! tagged frames (AF_PACKET), or is a second kvnet host.
use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    count_frames, eth_frame, inject, inject::eth_frame_vlan, kvnet::Kvnet, lab::privileged,
    mac_fmt, tools, Capture, Frame, GuestPort, Lab,
};

const ETH_TEST: u16 = 0x88b5;

/// The 802.1Q tag of a captured frame: (TPID, PCP, VID).
fn tag(f: &Frame) -> Option<(u16, u8, u16)> {
    let d = &f.data;
    let tpid = u16::from_be_bytes([*d.get(12)?, *d.get(13)?]);
    if tpid != 0x8100 && tpid != 0x88a8 {
        return None;
    }
    let tci = u16::from_be_bytes([d[14], d[15]]);
    Some((tpid, (tci >> 13) as u8, tci & 0x0fff))
}

fn has_payload(f: &Frame, p: &[u8]) -> bool {
    f.payload().windows(p.len()).any(|w| w == p)
}

/// An untagged test broadcast carrying `payload`, sent by guest `g`.
fn broadcast_from(g: &GuestPort, payload: &[u8]) {
    inject(
        &g.ns,
        "eth0",
        &[eth_frame([0xff; 6], g.mac, ETH_TEST, payload)],
    )
    .unwrap();
}

/// A frame tagged `vid` with priority `pcp`.
fn tagged(dst: [u8; 6], src: [u8; 6], vid: u16, pcp: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = eth_frame_vlan(dst, src, vid, ETH_TEST, payload);
    f[14] |= pcp << 5;
    f
}

/// The members of VLAN `vid` in a `kvnet vlan show --json` listing, as
/// "port:tagging".
fn members(vlans: &serde_json::Value, vid: u64) -> Vec<String> {
    vlans
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["vid"] == vid)
        .flat_map(|v| v["ports"].as_array().unwrap().iter())
        .map(|p| {
            format!(
                "{}:{}",
                p["port"].as_str().unwrap(),
                p["tagging"].as_str().unwrap()
            )
        })
        .collect()
}

/// iperf3 TCP from `client` to `server_ip` (served in `server_ns`): moves
/// real data and the receiver sees no bad checksums.
fn iperf(lab: &Lab, client: &GuestPort, server_ns: &str, server_ip: &str) {
    let bps = tools::iperf3_tcp_intact(lab, server_ns, server_ip, &client.ns);
    println!("iperf3 TCP to {server_ip}: {:.2} Gbit/s", bps / 1e9);
}

#[test]
fn access_vlans_isolate_guests_and_a_live_move_joins_them() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    // One subnet for all three: only the VLANs keep g2 apart.
    let g = lab
        .add_ipv4_guests(&[
            ("g1", "10.40.0.1/24"),
            ("g2", "10.40.0.2/24"),
            ("g3", "10.40.0.3/24"),
        ])
        .unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "lan"]).unwrap();
    k.cli(&["port", "add", "lan", "g1", "--vlan", "10"])
        .unwrap();
    k.cli(&["port", "add", "lan", "g2", "--vlan", "20"])
        .unwrap();
    k.cli(&["port", "add", "lan", "g3", "--vlan", "10"])
        .unwrap();

    let c2 = Capture::start(&g[1].ns, "eth0").unwrap();
    let c3 = Capture::start(&g[2].ns, "eth0").unwrap();
    assert!(g[0].ping("10.40.0.3"), "g1 -> g3 in VLAN 10");
    assert!(
        g[0].ping_unanswered("10.40.0.2"),
        "g1 reached g2 across VLANs"
    );
    assert!(
        g[1].ping_unanswered("10.40.0.1"),
        "g2 reached g1 across VLANs"
    );
    broadcast_from(&g[0], b"bcast-v10");
    // The broadcast is flooded to g2 (if it leaks) as it is to g3: once g3
    // has it, g2's capture holds whatever leaked.
    let f3 = c3
        .stop_when("the VLAN 10 broadcast", Duration::from_secs(3), |f| {
            count_frames(f, |f| has_payload(f, b"bcast-v10")) > 0
        })
        .unwrap();
    let f2 = c2.stop().unwrap();
    assert_eq!(
        count_frames(&f2, |f| f.src_mac() == g[0].mac || f.src_mac() == g[2].mac),
        0,
        "g2 saw VLAN 10 frames (ARP broadcasts included): {f2:?}"
    );
    assert_eq!(
        count_frames(&f3, |f| has_payload(f, b"bcast-v10") && tag(f).is_none()),
        1,
        "VLAN 10 broadcast reaches g3, untagged"
    );

    // FDB rows carry the VLAN; vlan show lists members and tagging.
    let rows = k.fdb("lan");
    let g1_row = rows
        .iter()
        .find(|r| r["mac"] == mac_fmt(&g[0].mac).as_str())
        .expect("g1 learned");
    assert_eq!(
        (g1_row["vlan"].as_u64(), g1_row["port"].as_str()),
        (Some(10), Some("g1"))
    );
    let vlans = k.json(&["vlan", "show", "lan"]).unwrap();
    assert_eq!(members(&vlans, 10), ["g1:untagged", "g3:untagged"]);
    assert_eq!(members(&vlans, 20), ["g2:untagged"]);
    let table = k.cli(&["vlan", "show", "lan"]).unwrap();
    assert!(
        table.contains("VLAN") && table.contains("access"),
        "{table}"
    );

    // TCP inside VLAN 10.
    iperf(&lab, &g[0], &g[2].ns, "10.40.0.3");

    // Move g2 into VLAN 10 live: no restart, g1 <-> g3 traffic keeps going.
    // 60 pings 50 ms apart, each awaited: every one must be answered.
    let ping_log = lab.work_dir().join("bg-ping.log");
    let mut bg = Command::new("ping");
    bg.args(["-c", "60", "-i", "0.05", "-W", "1", "10.40.0.3"])
        .stdout(std::fs::File::create(&ping_log).unwrap())
        .stderr(Stdio::null());
    let bg = lab.spawn(&g[0].ns, bg).unwrap();
    let ping_text = || std::fs::read_to_string(&ping_log).unwrap_or_default();
    let t0 = Instant::now();
    while !ping_text().contains("bytes from") {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "background ping got no reply: {}",
            ping_text()
        );
        thread::sleep(Duration::from_millis(20));
    }
    k.cli(&["port", "set", "g2", "--vlan", "10"]).unwrap();
    assert!(g[0].ping("10.40.0.2"), "g1 -> g2 after the move");
    assert!(g[1].ping("10.40.0.3"), "g2 -> g3 after the move");
    assert!(bg.is_running(), "the move outlasted the background ping");
    bg.wait_timeout(Duration::from_secs(8)).unwrap();
    let text = ping_text();
    assert!(
        text.contains("60 packets transmitted, 60 received"),
        "g1 -> g3 pings lost during the move:\n{text}"
    );
    // The listing read again after the move: g2 joined VLAN 10, and
    // VLAN 20, left without members, is gone.
    let vlans = k.json(&["vlan", "show", "lan"]).unwrap();
    assert_eq!(
        members(&vlans, 10),
        ["g1:untagged", "g2:untagged", "g3:untagged"],
        "VLAN 10 after the move: {vlans}"
    );
    assert!(
        vlans.as_array().unwrap().iter().all(|v| v["vid"] != 20),
        "VLAN 20 has no members left: {vlans}"
    );
    assert!(
        k.fdb("lan").iter().all(|r| r["vlan"] != 20),
        "g2's VLAN 20 entries flushed"
    );
    assert!(k.daemon_running());
}

#[test]
fn trunk_uplink_tags_by_vlan_and_delivers_only_into_the_right_vlan() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("g1", "10.41.0.1/24"), ("g2", "10.41.0.2/24")])
        .unwrap();
    let out = lab.add_outside().unwrap();
    out.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        .unwrap();
    // A second trunk (another switch): shows trunk-to-trunk PCP.
    let t2 = lab.add_guest("t2").unwrap();
    t2.disable_ipv6().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "lan"]).unwrap();
    // g1 sends from a second MAC below (the same MAC in two VLANs).
    k.cli(&[
        "port",
        "add",
        "lan",
        "g1",
        "--vlan",
        "10",
        "--max-macs",
        "2",
    ])
    .unwrap();
    k.cli(&["port", "add", "lan", "g2", "--vlan", "20"])
        .unwrap();
    // Trunks to other switches carry many MACs: trusted.
    k.cli(&["port", "add", "lan", "up0", "--trunk", "10,20", "--trusted"])
        .unwrap();
    k.cli(&["port", "add", "lan", "t2", "--trunk", "10,20", "--trusted"])
        .unwrap();
    let up0 = k.port("up0").unwrap();
    assert_eq!(
        up0["vlan"],
        serde_json::json!({"mode": "trunk", "vids": [10, 20], "native": null})
    );

    let co = Capture::start(&out.ns, "eth0").unwrap();
    let ct = Capture::start(&t2.ns, "eth0").unwrap();
    let c1 = Capture::start(&g[0].ns, "eth0").unwrap();
    let c2 = Capture::start(&g[1].ns, "eth0").unwrap();
    // Guests send untagged; the trunk carries their VLAN's tag.
    broadcast_from(&g[0], b"from-g1");
    broadcast_from(&g[1], b"from-g2");
    // Tagged frames from the far side, to the guests' VLANs and others.
    let x = [0x02, 0, 0, 0, 0x0e, 0x01];
    inject(
        &out.ns,
        "eth0",
        &[
            tagged([0xff; 6], x, 10, 5, b"out-v10"),
            tagged([0xff; 6], x, 20, 0, b"out-v20"),
            tagged([0xff; 6], x, 30, 0, b"out-v30"),
            eth_frame([0xff; 6], x, ETH_TEST, b"out-untagged"),
        ],
    )
    .unwrap();
    // Known unicast to g1 from the trunk: learned MAC, tag popped.
    inject(
        &out.ns,
        "eth0",
        &[tagged(g[0].mac, x, 10, 0, b"out-uni-g1")],
    )
    .unwrap();
    // Positive control, sent last from the trunk: a VLAN 20 broadcast
    // reaches t2 and g2. Once a capture has the last frame that reaches
    // it, it holds everything sent before that could have leaked.
    inject(
        &out.ns,
        "eth0",
        &[tagged([0xff; 6], x, 20, 0, b"out-ctl-last")],
    )
    .unwrap();
    let wait = Duration::from_secs(3);
    let has_all = |ps: &'static [&'static [u8]]| {
        move |f: &[Frame]| ps.iter().all(|p| f.iter().any(|f| has_payload(f, p)))
    };
    let fo = co
        .stop_when(
            "g1's and g2's broadcasts",
            wait,
            has_all(&[b"from-g1", b"from-g2"]),
        )
        .unwrap();
    let ft = ct
        .stop_when("the last trunk frame", wait, has_all(&[b"out-ctl-last"]))
        .unwrap();
    let f1 = c1
        .stop_when("the unicast to g1", wait, has_all(&[b"out-uni-g1"]))
        .unwrap();
    let f2 = c2
        .stop_when("the last trunk frame", wait, has_all(&[b"out-ctl-last"]))
        .unwrap();

    let one = |frames: &[Frame], p: &[u8]| -> Frame {
        let m: Vec<&Frame> = frames.iter().filter(|f| has_payload(f, p)).collect();
        assert_eq!(m.len(), 1, "{:?}: {frames:?}", String::from_utf8_lossy(p));
        m[0].clone()
    };
    assert_eq!(
        tag(&one(&fo, b"from-g1")),
        Some((0x8100, 0, 10)),
        "g1 leaves tagged 10"
    );
    assert_eq!(
        tag(&one(&fo, b"from-g2")),
        Some((0x8100, 0, 20)),
        "g2 leaves tagged 20"
    );
    assert_eq!(tag(&one(&ft, b"from-g1")), Some((0x8100, 0, 10)));
    // Trunk to trunk: tag and PCP as sent.
    assert_eq!(
        tag(&one(&ft, b"out-v10")),
        Some((0x8100, 5, 10)),
        "PCP kept"
    );
    assert_eq!(tag(&one(&ft, b"out-v20")), Some((0x8100, 0, 20)));
    // Into the access guests: only their VLAN, untagged.
    assert_eq!(tag(&one(&f1, b"out-v10")), None);
    assert_eq!(tag(&one(&f1, b"out-uni-g1")), None);
    assert_eq!(tag(&one(&f2, b"out-v20")), None);
    for (frames, who) in [(&f1, "g1"), (&f2, "g2"), (&ft, "t2")] {
        for p in [&b"out-v30"[..], b"out-untagged"] {
            assert_eq!(
                count_frames(frames, |f| has_payload(f, p)),
                0,
                "{who} got {p:?}"
            );
        }
    }
    assert_eq!(
        count_frames(&f1, |f| has_payload(f, b"out-v20")
            || has_payload(f, b"from-g2")),
        0
    );
    assert_eq!(
        count_frames(&f2, |f| has_payload(f, b"out-v10")
            || has_payload(f, b"from-g1")),
        0
    );
    assert_eq!(
        count_frames(&ft, |f| has_payload(f, b"out-uni-g1")),
        0,
        "known unicast flooded"
    );
    assert!(
        k.port_drops("up0", "vlan_not_allowed") >= 1,
        "VID 30 counted"
    );
    assert!(
        k.port_drops("up0", "vlan_untagged") >= 1,
        "untagged without native counted"
    );

    // The same MAC in two VLANs on two ports (two switches' trunks).
    let y = [0x02, 0, 0, 0, 0x0e, 0x07];
    inject(&out.ns, "eth0", &[tagged([0xff; 6], y, 10, 0, b"y-in-v10")]).unwrap();
    inject(&t2.ns, "eth0", &[tagged([0xff; 6], y, 20, 0, b"y-in-v20")]).unwrap();
    let where_y = || {
        let mut w: Vec<(u64, String)> = k
            .fdb("lan")
            .iter()
            .filter(|r| r["mac"] == mac_fmt(&y).as_str())
            .map(|r| {
                (
                    r["vlan"].as_u64().unwrap(),
                    r["port"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        w.sort();
        w
    };
    let want = [(10, "up0".to_string()), (20, "t2".to_string())];
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while where_y() != want && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(where_y(), want);
    // A guest (with room for a second MAC) cannot take a MAC the LAN is
    // using: port security refuses it, the FDB stays.
    let before = k.port_drops("g1", "mac_spoof");
    inject(
        &g[0].ns,
        "eth0",
        &[eth_frame([0xff; 6], y, ETH_TEST, b"y-from-g1")],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while k.port_drops("g1", "mac_spoof") == before && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
    }
    assert!(k.port_drops("g1", "mac_spoof") > before, "g1 took y");
    assert_eq!(where_y(), want);

    // QinQ (802.1ad outer tag) is not a trunk tag: dropped and counted.
    let mut qinq = tagged([0xff; 6], x, 10, 0, b"qinq");
    qinq.splice(12..12, [0x88, 0xa8, 0x00, 0x0a]);
    let c1 = Capture::start(&g[0].ns, "eth0").unwrap();
    // Control: the same frame with only its VLAN 10 tag, sent after.
    inject(
        &out.ns,
        "eth0",
        &[qinq, tagged([0xff; 6], x, 10, 0, b"qctl-v10")],
    )
    .unwrap();
    let f1 = c1
        .stop_when("the single-tagged control", wait, has_all(&[b"qctl-v10"]))
        .unwrap();
    assert_eq!(count_frames(&f1, |f| has_payload(f, b"qinq")), 0, "{f1:?}");
    assert!(k.port_drops("up0", "qinq") >= 1, "QinQ counted");

    // A native VLAN: untagged frames belong to it and leave untagged.
    k.cli(&["port", "set", "up0", "--trunk", "10,20", "--native", "10"])
        .unwrap();
    let co = Capture::start(&out.ns, "eth0").unwrap();
    let c1 = Capture::start(&g[0].ns, "eth0").unwrap();
    let c2 = Capture::start(&g[1].ns, "eth0").unwrap();
    // The untagged frame, then a VLAN 20 control for g2 behind it.
    inject(
        &out.ns,
        "eth0",
        &[
            eth_frame([0xff; 6], x, ETH_TEST, b"native-in"),
            tagged([0xff; 6], x, 20, 0, b"nctl-v20"),
        ],
    )
    .unwrap();
    broadcast_from(&g[0], b"native-out");
    broadcast_from(&g[1], b"still-v20");
    let fo = co
        .stop_when(
            "both guests' broadcasts",
            wait,
            has_all(&[b"native-out", b"still-v20"]),
        )
        .unwrap();
    let f1 = c1
        .stop_when("the untagged frame", wait, has_all(&[b"native-in"]))
        .unwrap();
    let f2 = c2
        .stop_when("the VLAN 20 control", wait, has_all(&[b"nctl-v20"]))
        .unwrap();
    assert_eq!(
        tag(&one(&f1, b"native-in")),
        None,
        "untagged -> native VLAN 10"
    );
    assert_eq!(count_frames(&f2, |f| has_payload(f, b"native-in")), 0);
    assert_eq!(
        tag(&one(&fo, b"native-out")),
        None,
        "native VLAN leaves untagged"
    );
    assert_eq!(tag(&one(&fo, b"still-v20")), Some((0x8100, 0, 20)));
    let vlans = k.json(&["vlan", "show", "lan"]).unwrap();
    let v10 = vlans
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["vid"] == 10)
        .unwrap();
    assert!(
        v10["ports"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["port"] == "up0" && p["tagging"] == "untagged" && p["mode"] == "trunk"),
        "{v10}"
    );
}

#[test]
fn two_hosts_joined_by_a_trunk_keep_vlans_apart() {
    if !privileged() {
        return;
    }
    let a = Lab::new().unwrap();
    let b = Lab::new().unwrap();
    // One subnet for all: only the VLANs separate 10 from 20.
    let ga = a
        .add_ipv4_guests(&[("a10", "10.42.0.1/24"), ("a20", "10.42.0.11/24")])
        .unwrap();
    let gb = b
        .add_ipv4_guests(&[("b10", "10.42.0.2/24"), ("b20", "10.42.0.12/24")])
        .unwrap();
    a.exec(
        a.hv(),
        &[
            "ip",
            "link",
            "add",
            "trA",
            "type",
            "veth",
            "peer",
            "name",
            "trB",
            "netns",
            b.hv(),
        ],
    )
    .unwrap();
    a.exec(a.hv(), &["ip", "link", "set", "trA", "up"]).unwrap();
    b.exec(b.hv(), &["ip", "link", "set", "trB", "up"]).unwrap();
    let ka = Kvnet::start(&a).unwrap();
    let kb = Kvnet::start(&b).unwrap();
    for (k, p10, p20, tr) in [(&ka, "a10", "a20", "trA"), (&kb, "b10", "b20", "trB")] {
        k.cli(&["net", "add", "lan"]).unwrap();
        k.cli(&["port", "add", "lan", p10, "--vlan", "10"]).unwrap();
        k.cli(&["port", "add", "lan", p20, "--vlan", "20"]).unwrap();
        // The trunk between the hosts carries the other host's MACs.
        k.cli(&["port", "add", "lan", tr, "--trunk", "10,20", "--trusted"])
            .unwrap();
    }
    let cap = Capture::start(b.hv(), "trB").unwrap();
    assert!(ga[0].ping("10.42.0.2"), "VLAN 10 across hosts");
    assert!(ga[1].ping("10.42.0.12"), "VLAN 20 across hosts");
    assert!(
        ga[0].ping_unanswered("10.42.0.12"),
        "VLAN 10 reached VLAN 20 on host B"
    );
    assert!(
        gb[1].ping_unanswered("10.42.0.1"),
        "VLAN 20 reached VLAN 10 on host A"
    );
    let frames = cap.stop().unwrap();
    let icmp_from = |mac: [u8; 6]| {
        let tags: Vec<Option<(u16, u8, u16)>> = frames
            .iter()
            .filter(|f| f.src_mac() == mac && f.icmp_type().is_some())
            .map(tag)
            .collect();
        assert!(
            !tags.is_empty(),
            "no ICMP from {} on the trunk",
            mac_fmt(&mac)
        );
        tags
    };
    assert!(icmp_from(ga[0].mac)
        .iter()
        .all(|t| *t == Some((0x8100, 0, 10))));
    assert!(icmp_from(gb[1].mac)
        .iter()
        .all(|t| *t == Some((0x8100, 0, 20))));
    // TCP across the trunk: tagged on the wire between the hosts.
    iperf(&a, &ga[0], &gb[0].ns, "10.42.0.2");
    iperf(&b, &gb[1], &ga[1].ns, "10.42.0.11");
}

#[test]
fn bad_vlan_input_is_refused_clearly_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    lab.add_ipv4_guests(&[("p1", "10.43.0.1/24"), ("p2", "10.43.0.2/24")])
        .unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "n"]).unwrap();
    k.cli(&[
        "port", "add", "n", "p1", "--trunk", "10,20", "--native", "1",
    ])
    .unwrap();
    let state = |k: &Kvnet| {
        (
            k.json(&["port", "list"]).unwrap(),
            k.json(&["vlan", "show", "n"]).unwrap(),
            k.json(&["net", "list"]).unwrap(),
        )
    };
    let before = state(&k);
    // Most cases add p2 with bad VLAN options.
    let add_p2 = |opts: &[&'static str]| [&["port", "add", "n", "p2"][..], opts].concat();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (add_p2(&["--vlan", "0"]), "VLAN id 0"),
        (add_p2(&["--vlan", "4095"]), "VLAN id 4095 is reserved"),
        (add_p2(&["--vlan", "5000"]), "VLAN id 5000 is out of range"),
        (add_p2(&["--vlan", "ten"]), "invalid VLAN id 'ten'"),
        (
            add_p2(&["--vlan", "10", "--trunk", "20"]),
            "exclude each other",
        ),
        (
            add_p2(&["--native", "10"]),
            "--native only applies to a trunk",
        ),
        (
            add_p2(&["--trunk", "10,,20"]),
            "malformed VLAN list '10,,20'",
        ),
        (add_p2(&["--trunk", "20-10"]), "runs backwards"),
        (add_p2(&["--trunk", "10,4095"]), "VLAN id 4095 is reserved"),
        (add_p2(&["--trunk", "10", "--native", "0"]), "VLAN id 0"),
        (
            vec!["port", "set", "p1", "--trunk", "1-5000"],
            "VLAN id 5000 is out of range",
        ),
        (
            vec!["port", "set", "p1", "--vlan", "7", "--trunk", "7"],
            "exclude each other",
        ),
        (vec!["port", "set", "p1"], "nothing to change"),
        (
            vec!["port", "set", "p9", "--vlan", "7"],
            "'p9' is not a kvnet port",
        ),
        (vec!["vlan", "show", "nonet"], "no network named 'nonet'"),
    ];
    for (args, want) in &cases {
        let err = k.cli_err(args).unwrap();
        assert!(
            err.contains(want),
            "`kvnet {}`: expected {want:?} in {err:?}",
            args.join(" ")
        );
        assert_eq!(err.trim().lines().count(), 1, "one clear line: {err:?}");
        assert!(err.starts_with("kvnet: error: "), "{err:?}");
    }
    assert_eq!(state(&k), before, "a refused command changed the state");
    // And the good forms still work afterwards.
    k.cli(&["port", "add", "n", "p2", "--trunk", "10,20,100-199"])
        .unwrap();
    k.cli(&["port", "set", "p2", "--no-vlan"]).unwrap();
    let p2 = k.port("p2").unwrap();
    assert_eq!(p2["vlan"], serde_json::json!({"mode": "none"}));
}

/// Makes `iface` in namespace `ns` send every frame with a VLAN `vid` tag
/// in skb metadata, as a NIC's tx VLAN offload or tc act_vlan leaves it
/// (this kernel has no act_vlan): a tc egress program of five instructions
/// that calls `bpf_skb_vlan_push`. Off again with `tc filter del dev IFACE
/// egress`.
fn push_vlan_in_metadata(lab: &Lab, ns: &str, iface: &str, vid: u16) -> anyhow::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    /// One eBPF instruction (little-endian `struct bpf_insn`).
    const fn insn(code: u8, dst: u8, imm: i32) -> u64 {
        code as u64 | (dst as u64) << 8 | (imm as u32 as u64) << 32
    }
    const MOV64_IMM: u8 = 0xb7;
    let prog = [
        insn(MOV64_IMM, 2, i32::from(0x8100u16.to_be())), // r2 = vlan_proto (be16)
        insn(MOV64_IMM, 3, i32::from(vid)),               // r3 = vlan_tci
        insn(0x85, 0, 18),     // call bpf_skb_vlan_push(r1 = skb, r2, r3)
        insn(MOV64_IMM, 0, 0), // r0 = TC_ACT_OK
        insn(0x95, 0, 0),      // exit
    ];
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD, the fields up to the log.
    #[repr(C)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
    }
    let attr = ProgLoad {
        prog_type: 3, // BPF_PROG_TYPE_SCHED_CLS
        insn_cnt: prog.len() as u32,
        insns: prog.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 0,
        log_size: 0,
        log_buf: 0,
    };
    let bpf = |cmd: i32, attr: *const libc::c_void, size: usize| {
        // SAFETY: attr points at a live bpf_attr prefix of `size` bytes.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr, size) };
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    };
    let fd = bpf(5, (&attr as *const ProgLoad).cast(), size_of::<ProgLoad>())
        .map_err(|e| anyhow::anyhow!("loading the VLAN push program: {e}"))?;
    // SAFETY: a fresh descriptor the kernel just gave us.
    let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    // tc takes a pinned program; the filter holds it once attached.
    let pin = format!(
        "{}/kvnet-{}-vlanpush",
        kvnet_tests::lab::BPFFS,
        lab.suffix()
    );
    lab.remove_on_drop(&pin);
    let pin_c = std::ffi::CString::new(pin.clone())?;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
    }
    let attr = ObjPin {
        pathname: pin_c.as_ptr() as u64,
        bpf_fd: std::os::fd::AsRawFd::as_raw_fd(&fd) as u32,
        file_flags: 0,
    };
    bpf(6, (&attr as *const ObjPin).cast(), size_of::<ObjPin>())
        .map_err(|e| anyhow::anyhow!("pinning the VLAN push program at {pin}: {e}"))?;
    let attached = lab.sh(
        ns,
        &format!(
            "tc qdisc replace dev {iface} clsact && \
             tc filter add dev {iface} egress bpf direct-action object-pinned {pin}"
        ),
    );
    let _ = std::fs::remove_file(&pin);
    attached.map(|_| ())
}

/// The guest's end of a tap in the hv namespace, as qemu holds it: frames
/// the switch sends the guest are read here. A capture would not do: XDP
/// redirects into a tap go straight to its queue, past tcpdump.
struct TapEnd {
    fd: std::os::fd::OwnedFd,
}

impl TapEnd {
    fn open(lab: &Lab, tap: &str) -> anyhow::Result<TapEnd> {
        use anyhow::Context;
        use std::os::fd::{FromRawFd, OwnedFd};
        let hv = std::fs::File::open(kvnet_tests::lab::netns_path(lab.hv()))?;
        let name = tap.as_bytes().to_vec();
        // The tap is looked up in the namespace /dev/net/tun was opened in.
        thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<TapEnd> {
                nix::sched::setns(&hv, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                // SAFETY: plain libc calls with checked results.
                let raw = unsafe {
                    libc::open(
                        c"/dev/net/tun".as_ptr(),
                        libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
                    )
                };
                if raw < 0 {
                    return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
                }
                // SAFETY: a fresh descriptor we own.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                #[repr(C)]
                struct IfReq {
                    name: [u8; 16],
                    flags: u16,
                    _pad: [u8; 22],
                }
                let mut req = IfReq {
                    name: [0; 16],
                    flags: (libc::IFF_TAP | libc::IFF_NO_PI) as u16,
                    _pad: [0; 22],
                };
                req.name[..name.len().min(15)].copy_from_slice(&name[..name.len().min(15)]);
                let rc = unsafe {
                    libc::ioctl(
                        std::os::fd::AsRawFd::as_raw_fd(&fd),
                        libc::TUNSETIFF,
                        &mut req as *mut IfReq,
                    )
                };
                if rc < 0 {
                    return Err(std::io::Error::last_os_error()).context("TUNSETIFF");
                }
                Ok(TapEnd { fd })
            })
            .join()
            .map_err(|_| anyhow::anyhow!("tap opener panicked"))?
        })
        .with_context(|| format!("attaching to tap {tap}"))
    }

    /// Sends `frame` into the switch, as the guest.
    fn send(&self, frame: &[u8]) {
        let n = nix::unistd::write(&self.fd, frame).unwrap();
        assert_eq!(n, frame.len());
    }

    /// Reads what the tap delivers until `done` holds for it (or `timeout`
    /// passes, then panics naming `what`).
    fn read_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl Fn(&[Frame]) -> bool,
    ) -> Vec<Frame> {
        use std::os::fd::AsRawFd;
        let deadline = Instant::now() + timeout;
        let mut frames = Vec::new();
        let mut buf = vec![0u8; 65536];
        while !done(&frames) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "tap: no {what} within {timeout:?}: {frames:?}"
            );
            let mut pfd = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
            // SAFETY: one pollfd, ours.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                continue;
            }
            match nix::unistd::read(self.fd.as_raw_fd(), &mut buf) {
                Ok(n) => frames.push(Frame::new(buf[..n].to_vec())),
                Err(nix::errno::Errno::EAGAIN) => {}
                Err(e) => panic!("reading the tap: {e}"),
            }
        }
        frames
    }
}

/// Issue 14: an access port whose device hands XDP frames with the VLAN
/// tag already taken out into skb metadata (a veth passing on its peer's
/// offloaded tag; a NIC with rx VLAN offload). XDP sees such a frame as
/// untagged; switching it into the access VLAN would let a guest on an
/// access port reach it with any tag. It must go on to tc, which sees the
/// tag and drops it (`vlan_not_allowed`). The frame is known unicast to a
/// tap, the case XDP finishes itself (a flood goes to tc anyway).
#[test]
fn xdp_access_port_drops_a_tag_its_device_stripped() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("g1", "10.44.0.1/24"), ("g2", "10.44.0.2/24")])
        .unwrap();
    for x in &g {
        x.disable_ipv6().unwrap();
    }
    let tap = lab.add_tap("tap0").unwrap();
    let t = TapEnd::open(&lab, &tap).unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "lan"]).unwrap();
    // g1's XDP program is the one that must not be fooled.
    k.cli(&["port", "add", "lan", "g1", "--vlan", "10", "--hook", "xdp"])
        .unwrap();
    k.cli(&["port", "add", "lan", "g2", "--vlan", "10"])
        .unwrap();
    k.cli(&["port", "add", "lan", &tap, "--vlan", "10"])
        .unwrap();

    // Positive control: untagged traffic from g1 flows.
    assert!(g[0].ping("10.44.0.2"), "g1 -> g2 untagged");
    // The tap's guest speaks first, so the switch knows its MAC.
    let tmac = [0x02, 0, 0, 0, 0x0e, 0x21];
    t.send(&eth_frame([0xff; 6], tmac, ETH_TEST, b"tap-hello"));
    let deadline = Instant::now() + Duration::from_secs(3);
    while k.fdb_port_of("lan", &tmac).as_deref() != Some(tap.as_str()) {
        assert!(Instant::now() < deadline, "tap0's MAC not learned");
        thread::sleep(Duration::from_millis(20));
    }
    let to_tap = |p: &[u8]| eth_frame(tmac, g[0].mac, ETH_TEST, p);
    let got = |p: &'static [u8]| move |f: &[Frame]| f.iter().any(|f| has_payload(f, p));
    // Known unicast from g1 into the tap: through g1's XDP program.
    let xdp_before = k.port_stats("g1").unwrap()["xdp_seen"].as_u64().unwrap();
    inject(&g[0].ns, "eth0", &[to_tap(b"plain-1")]).unwrap();
    let f = t.read_until("plain-1", Duration::from_secs(3), got(b"plain-1"));
    assert_eq!(
        count_frames(&f, |f| has_payload(f, b"plain-1") && tag(f).is_none()),
        1
    );
    assert!(
        k.port_stats("g1").unwrap()["xdp_seen"].as_u64().unwrap() > xdp_before,
        "g1's XDP program saw nothing: the test would prove nothing"
    );

    // The same frame tagged VLAN 20, the tag in metadata: an access port
    // drops every tagged frame.
    push_vlan_in_metadata(&lab, &g[0].ns, "eth0", 20).unwrap();
    let drops = k.port_drops("g1", "vlan_not_allowed");
    inject(&g[0].ns, "eth0", &[to_tap(b"stripped-v20")]).unwrap();
    g[0].sh("tc filter del dev eth0 egress").unwrap();
    // Control, sent after it on the same path: once the tap has it, it
    // has whatever leaked before.
    inject(&g[0].ns, "eth0", &[to_tap(b"plain-2")]).unwrap();
    let f = t.read_until("plain-2", Duration::from_secs(3), got(b"plain-2"));
    assert_eq!(
        count_frames(&f, |f| has_payload(f, b"stripped-v20")),
        0,
        "a frame tagged VLAN 20 reached VLAN 10 through g1's access port: {f:?}"
    );
    assert!(
        k.port_drops("g1", "vlan_not_allowed") > drops,
        "the tagged frame was not counted as vlan_not_allowed"
    );
    assert!(g[0].ping("10.44.0.2"), "g1 -> g2 untagged, after");
}
