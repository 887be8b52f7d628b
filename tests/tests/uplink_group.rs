//! Issue 18: uplink groups (kvnet as the bond). The lab's "switch" is a
//! namespace with a Linux bridge holding the far ends (s1, s2) of the
//! group's members (m1, m2) and the outside host's link; the host's own
//! address (192.0.2.1) lives on the group device `bond0`, guests of a
//! bridged network are peers of the outside host (192.0.2.100).
use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{count_frames, kvnet::Kvnet, lab::privileged, Capture, GuestPort, Lab};
use serde_json::Value;

const OUTSIDE_IP: &str = "192.0.2.100";
const HOST_IP: &str = "192.0.2.1";
/// Active-backup with m1 primary, carrier polled every 100 ms.
const ACTIVE_BACKUP_M1: &[&str] = &[
    "--mode",
    "active-backup",
    "--primary",
    "m1",
    "--miimon",
    "100",
];

struct Fabric {
    lab: Lab,
    /// The switch namespace: bridge br0 with s1, s2 and the outside's link.
    sw: String,
    out: String,
    k: Kvnet,
}

/// hv m1/m2 <-> switch s1/s2 on br0 <-> outside eth0 (192.0.2.100).
fn fabric() -> Fabric {
    let lab = Lab::new().unwrap();
    lab.sh(
        lab.hv(),
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
    )
    .unwrap();
    let lan = lab
        .add_lan_switch(&[("m1", "s1"), ("m2", "s2")], &format!("{OUTSIDE_IP}/24"))
        .unwrap();
    let (sw, out) = (lan.ns, lan.outside);
    let k = Kvnet::start(&lab).unwrap();
    Fabric { lab, sw, out, k }
}

impl Fabric {
    fn hv(&self) -> &str {
        self.lab.hv()
    }

    /// Group bond0 over m1,m2 with `args`, the host's address on it, and a
    /// bridged network `lan` on it with guests p1.. (192.0.2.11..).
    fn group_and_guests(&self, args: &[&str], guests: usize) -> Vec<GuestPort> {
        self.group(args);
        self.lab
            .sh(self.hv(), &format!("ip addr add {HOST_IP}/24 dev bond0"))
            .unwrap();
        self.k
            .cli(&[
                "net", "add", "lan", "--mode", "bridged", "--uplink", "bond0",
            ])
            .unwrap();
        (1..=guests)
            .map(|i| {
                let p = format!("p{i}");
                let g = self
                    .lab
                    .add_guest_with(&p, Some(&format!("192.0.2.{}/24", 10 + i)))
                    .unwrap();
                g.disable_ipv6().unwrap();
                self.k.cli(&["port", "add", "lan", &p]).unwrap();
                g
            })
            .collect()
    }

    /// Group bond0 over m1,m2 with `args`.
    fn group(&self, args: &[&str]) {
        let mut cmd = vec!["uplink", "add", "bond0", "--members", "m1,m2"];
        cmd.extend_from_slice(args);
        self.k.cli(&cmd).unwrap();
    }

    fn show(&self) -> Value {
        self.k.json(&["uplink", "show"]).unwrap()[0].clone()
    }

    fn member<'a>(g: &'a Value, name: &str) -> &'a Value {
        g["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap()
    }

    fn tx_bytes(&self, name: &str) -> u64 {
        Self::member(&self.show(), name)["counters"]["tx_bytes"]
            .as_u64()
            .unwrap()
    }

    /// Takes the switch's end of a member down (a pulled cable: the member
    /// loses carrier) or up again.
    fn cable(&self, sw_if: &str, up: bool) {
        let state = if up { "up" } else { "down" };
        self.lab
            .sh(&self.sw, &format!("ip link set {sw_if} {state}"))
            .unwrap();
    }

    /// Waits until `uplink show` says `pred` (the daemon followed a change).
    fn until(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let g = self.show();
            if pred(&g) {
                return g;
            }
            assert!(Instant::now() < end, "{what}: {g:#}");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// (transmitted, received, duplicates) from ping's summary.
fn ping_summary(text: &str) -> (u32, u32, u32) {
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {text}"));
    let num = |key: &str| -> u32 {
        line.split(',')
            .find(|p| p.contains(key))
            .and_then(|p| {
                p.trim()
                    .trim_start_matches('+')
                    .split(' ')
                    .next()?
                    .parse()
                    .ok()
            })
            .unwrap_or(0)
    };
    (num("transmitted"), num("received"), num("duplicates"))
}

/// What a finished process wrote to its (piped) stdout.
fn stdout_text(p: &mut kvnet_tests::Proc) -> String {
    use std::io::Read;
    let mut s = String::new();
    if let Some(mut o) = p.stdout.take() {
        let _ = o.read_to_string(&mut s);
    }
    s
}

fn spawn_ping(f: &Fabric, ns: &str, ip: &str, count: u32) -> kvnet_tests::Proc {
    let mut c = Command::new("ping");
    c.args(["-q", "-i", "0.01", "-c", &count.to_string(), "-W", "1", ip])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    f.lab.spawn(ns, c).unwrap()
}

#[test]
fn active_backup_fails_over_within_100ms_and_back() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let g = f.group_and_guests(ACTIVE_BACKUP_M1, 1);
    let g1 = &g[0];
    assert!(g1.ping(OUTSIDE_IP), "guest -> outside over the group");
    assert!(
        kvnet_tests::lab::ping(&f.out, HOST_IP),
        "outside -> host address on the group"
    );
    let s = f.show();
    assert_eq!(s["active"], "m1", "{s:#}");
    assert_eq!(s["mode"], "active-backup");

    // A TCP transfer and two pingers (guest -> outside, outside -> host)
    // every 10 ms across a failover and a failback.
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", OUTSIDE_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    f.lab.spawn(&f.out, srv).unwrap();
    thread::sleep(Duration::from_millis(300));
    let mut cli = Command::new("iperf3");
    cli.args(["-c", OUTSIDE_IP, "-t", "4", "-b", "50M", "-J"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut tcp = f.lab.spawn(&g1.ns, cli).unwrap();
    let mut guest_ping = spawn_ping(&f, &g1.ns, OUTSIDE_IP, 300);
    let mut host_ping = spawn_ping(&f, &f.out, HOST_IP, 300);
    thread::sleep(Duration::from_millis(700));
    f.cable("s1", false);
    f.until("m2 takes over", |g| g["active"] == "m2");
    thread::sleep(Duration::from_millis(800));
    f.cable("s1", true);
    f.until("m1 (primary) takes back", |g| g["active"] == "m1");

    for (what, p) in [
        ("guest -> outside", &mut guest_ping),
        ("outside -> host", &mut host_ping),
    ] {
        p.wait_timeout(Duration::from_secs(10))
            .unwrap()
            .expect("ping ended");
        let text = stdout_text(p);
        let (sent, got, dup) = ping_summary(&text);
        eprintln!(
            "{what}: {sent} pings every 10 ms, {} lost over two failovers",
            sent - got
        );
        // Two failovers, 100 ms each at most: 10 pings each.
        assert!(
            sent - got <= 20,
            "{what}: {sent} sent, {got} answered\n{text}"
        );
        assert_eq!(dup, 0, "{what}: duplicate replies\n{text}");
    }
    let status = tcp
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .expect("iperf3 ended");
    let out = stdout_text(&mut tcp);
    assert!(status.success(), "the TCP transfer broke: {out}");
    let s = f.show();
    assert_eq!(s["failovers"], 2, "{s:#}");
    let log = f.k.daemon_log();
    assert!(
        log.contains("uplink bond0: m1 down; active m1 -> m2"),
        "{log}"
    );
}

/// Each member's share of what the group sent while `during` ran.
fn shares(f: &Fabric, during: impl FnOnce()) -> (u64, u64) {
    let (a, b) = (f.tx_bytes("m1"), f.tx_bytes("m2"));
    during();
    (
        f.tx_bytes("m1").wrapping_sub(a) & 0xffff_ffff,
        f.tx_bytes("m2").wrapping_sub(b) & 0xffff_ffff,
    )
}

#[test]
fn balance_xor_spreads_flows_over_members_and_survives_one_down() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let guests = f.group_and_guests(&["--mode", "balance-xor", "--hash", "l3l4"], 4);
    for port in 5201..=5208 {
        let mut srv = Command::new("iperf3");
        srv.args(["-s", "-1", "-B", OUTSIDE_IP, "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        f.lab.spawn(&f.out, srv).unwrap();
    }
    let end = Instant::now() + Duration::from_secs(5);
    while f
        .lab
        .sh(&f.out, "ss -ltnH | grep -c ':52'")
        .unwrap_or_default()
        .trim()
        != "8"
    {
        assert!(Instant::now() < end, "iperf3 servers never listened");
        thread::sleep(Duration::from_millis(50));
    }
    // 8 flows, 2 per guest, each at the same rate, so a member's share of
    // the bytes is its share of the flows. The hash is deterministic (as
    // bonding's layer3+4): fixed client ports make the split reproducible.
    let mut clients = Vec::new();
    for (i, g) in guests.iter().enumerate() {
        for j in 0..2 {
            let n = 2 * i + j;
            let mut c = Command::new("iperf3");
            c.args(["-c", OUTSIDE_IP, "-p", &(5201 + n).to_string()])
                .args([
                    "--cport",
                    &(40001 + n).to_string(),
                    "-t",
                    "6",
                    "-b",
                    "20M",
                    "-J",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            clients.push(f.lab.spawn(&g.ns, c).unwrap());
        }
    }
    let (m1, m2) = shares(&f, || thread::sleep(Duration::from_millis(2500)));
    let total = m1 + m2;
    eprintln!("balance-xor, 8 flows: m1 {m1} bytes, m2 {m2} bytes");
    assert!(
        total > 20_000_000,
        "the flows moved too little: {m1} + {m2}"
    );
    assert!(
        m1 * 4 >= total && m2 * 4 >= total,
        "uneven: m1 {m1}, m2 {m2}"
    );

    f.cable("s2", false);
    f.until("m2 down", |g| Fabric::member(g, "m2")["state"] == "down");
    let (m1, m2) = shares(&f, || thread::sleep(Duration::from_millis(1500)));
    eprintln!("balance-xor, m2 down: m1 {m1} bytes, m2 {m2} bytes");
    assert!(m1 > 10_000_000, "m1 carries all flows now: {m1}");
    assert!(
        m2 < 100_000,
        "nothing leaves by the member without carrier: {m2}"
    );
    for (n, c) in clients.iter_mut().enumerate() {
        let status = c
            .wait_timeout(Duration::from_secs(15))
            .unwrap()
            .expect("iperf3 ended");
        let out = stdout_text(c);
        assert!(status.success(), "flow {n} broke: {out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        let last = v["intervals"].as_array().unwrap().last().unwrap()["sum"]["bytes"]
            .as_u64()
            .unwrap();
        assert!(
            last > 1_000_000,
            "flow {n} stalled after m2 went down: {last} bytes in its last second"
        );
    }
    let log = f.k.daemon_log();
    assert!(log.contains("uplink bond0: m2 down"), "{log}");
}

/// Echo requests from `ip` in a capture.
fn echo_requests(frames: &[kvnet_tests::Frame], ip: [u8; 4]) -> usize {
    count_frames(frames, |f| {
        f.icmp_type() == Some(8) && f.ipv4_addrs().is_some_and(|(s, _)| s == ip)
    })
}

#[test]
fn broadcast_and_round_robin_leave_by_the_members_their_mode_says() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let g = f.group_and_guests(&["--mode", "broadcast"], 1);
    let guest_ip = [192, 0, 2, 11];
    assert!(g[0].ping(OUTSIDE_IP));
    let (c1, c2) = (
        Capture::start(&f.sw, "s1").unwrap(),
        Capture::start(&f.sw, "s2").unwrap(),
    );
    g[0].sh(&format!("ping -q -c 6 -i 0.05 {OUTSIDE_IP} || true"))
        .unwrap();
    let timeout = Duration::from_secs(5);
    let s1 = c1
        .stop_when("6 requests", timeout, |fr| echo_requests(fr, guest_ip) >= 6)
        .unwrap();
    let s2 = c2
        .stop_when("6 requests", timeout, |fr| echo_requests(fr, guest_ip) >= 6)
        .unwrap();
    assert_eq!(
        echo_requests(&s1, guest_ip),
        6,
        "broadcast: every request out of m1"
    );
    assert_eq!(
        echo_requests(&s2, guest_ip),
        6,
        "broadcast: every request out of m2"
    );

    // No loops: the guest's broadcasts leave by both members, the LAN's
    // bridge floods each copy back into the other member, and kvnet drops
    // those (hairpin) instead of switching them out again: the outside
    // gets exactly the two copies of each.
    let n = 20;
    let hairpin_before = f.k.port_drops("bond0", "hairpin");
    let outside = Capture::start(&f.out, "eth0").unwrap();
    let frame = kvnet_tests::eth_frame([0xff; 6], g[0].mac, 0x88b5, b"loop?");
    for _ in 0..n {
        kvnet_tests::inject(&g[0].ns, "eth0", std::slice::from_ref(&frame)).unwrap();
        thread::sleep(Duration::from_millis(5));
    }
    let ours = |fr: &[kvnet_tests::Frame]| {
        count_frames(fr, |x| x.ethertype() == 0x88b5 && x.src_mac() == g[0].mac)
    };
    let end = Instant::now() + timeout;
    while ours(&outside.frames().unwrap()) < 2 * n && Instant::now() < end {
        thread::sleep(Duration::from_millis(50));
    }
    // (A loop would go on multiplying them: give it the time to show.)
    thread::sleep(Duration::from_millis(300));
    let got = ours(&outside.stop().unwrap());
    eprintln!("broadcast: {n} broadcasts, {got} copies at the outside");
    assert!(
        (n..=2 * n).contains(&got),
        "each broadcast reaches the outside once per member at most: {got}"
    );
    let hairpin = f.k.port_drops("bond0", "hairpin") - hairpin_before;
    assert!(
        hairpin >= n as u64,
        "the copies flooded back into the group were dropped: {hairpin}"
    );

    // The same lab as balance-rr: the network goes, the group with it.
    f.k.cli(&["net", "del", "lan"]).unwrap();
    f.k.cli(&["uplink", "del", "bond0"]).unwrap();
    assert!(
        f.lab.sh(f.hv(), "ip link show bond0").is_err(),
        "the group's device is gone"
    );
    f.k.cli(&[
        "uplink",
        "add",
        "bond0",
        "--members",
        "m1,m2",
        "--mode",
        "balance-rr",
    ])
    .unwrap();
    f.k.cli(&[
        "net", "add", "lan", "--mode", "bridged", "--uplink", "bond0",
    ])
    .unwrap();
    f.k.cli(&["port", "add", "lan", "p1"]).unwrap();
    assert!(g[0].ping(OUTSIDE_IP));
    let (c1, c2) = (
        Capture::start(&f.sw, "s1").unwrap(),
        Capture::start(&f.sw, "s2").unwrap(),
    );
    g[0].sh(&format!("ping -q -c 10 -i 0.05 {OUTSIDE_IP} || true"))
        .unwrap();
    // The control: all 10 requests seen between the two captures.
    let (mut n1, mut n2) = (0, 0);
    let end = Instant::now() + timeout;
    while n1 + n2 < 10 && Instant::now() < end {
        n1 = echo_requests(&c1.frames().unwrap(), guest_ip);
        n2 = echo_requests(&c2.frames().unwrap(), guest_ip);
        thread::sleep(Duration::from_millis(50));
    }
    let (s1, s2) = (c1.stop().unwrap(), c2.stop().unwrap());
    let (n1, n2) = (echo_requests(&s1, guest_ip), echo_requests(&s2, guest_ip));
    eprintln!("balance-rr: {n1} requests out of m1, {n2} out of m2");
    assert_eq!(n1 + n2, 10, "each request left once");
    assert!(n1 >= 3 && n2 >= 3, "round robin: m1 {n1}, m2 {n2}");
}

#[test]
fn bad_uplink_input_is_refused_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let hv = f.hv().to_string();
    f.lab.sh(&hv, "ip link add m3 type veth peer name n3 && ip link add m4 type veth peer name n4 && ip link set m3 up && ip link set n3 up && ip link set m4 up && ip link set n4 up").unwrap();
    let mac_of = |i: &str| kvnet_tests::lab::read_mac(&hv, i).unwrap();
    f.k.cli(&[
        "uplink",
        "add",
        "bond0",
        "--members",
        "m1,m2",
        "--mode",
        "active-backup",
    ])
    .unwrap();
    let before = f.k.json(&["uplink", "show"]).unwrap();
    let m3_mac = mac_of("m3");

    let e =
        f.k.cli_err(&[
            "uplink",
            "add",
            "bond1",
            "--members",
            "m3,m2",
            "--mode",
            "balance-xor",
        ])
        .unwrap();
    assert!(
        e.contains("'m2' is already a member of uplink group 'bond0'"),
        "{e}"
    );
    f.k.cli(&["net", "add", "iso", "--mode", "isolated"])
        .unwrap();
    f.k.cli(&["port", "add", "iso", "m4"]).unwrap();
    let e =
        f.k.cli_err(&[
            "uplink",
            "add",
            "bond1",
            "--members",
            "m3,m4",
            "--mode",
            "balance-xor",
        ])
        .unwrap();
    assert!(e.contains("'m4' is a port of network 'iso'"), "{e}");
    let e =
        f.k.cli_err(&[
            "uplink",
            "add",
            "bond1",
            "--members",
            "m3",
            "--mode",
            "lacp-ish",
        ])
        .unwrap();
    assert!(e.contains("invalid value 'lacp-ish'"), "{e}");
    let e = f.k.cli_err(&["port", "add", "iso", "m1"]).unwrap();
    assert!(
        e.contains("'m1' is a member of uplink group 'bond0'"),
        "{e}"
    );
    assert!(
        f.lab.sh(&hv, "ip link show bond1").is_err(),
        "no bond1 device"
    );
    assert_eq!(mac_of("m3"), m3_mac, "m3 keeps its MAC");

    f.k.cli(&[
        "net", "add", "lan", "--mode", "bridged", "--uplink", "bond0",
    ])
    .unwrap();
    let e = f.k.cli_err(&["uplink", "del", "bond0"]).unwrap();
    assert!(e.contains("is the uplink of network(s) lan"), "{e}");
    let after = f.k.json(&["uplink", "show"]).unwrap();
    assert_eq!(after[0]["members"].as_array().unwrap().len(), 2);
    assert_eq!(after[0]["name"], before[0]["name"]);
    assert_eq!(after[0]["used_by"][0], "lan");

    // The config file: a group defined there; a dry run changes nothing.
    let file = f.lab.work_dir().join("uplinks.toml");
    std::fs::write(
        &file,
        "[[uplinks]]\nname = \"bond2\"\nmembers = [\"m3\"]\nmode = \"balance-xor\"\nhash = \"l3l4\"\n\n\
         [networks.lan2]\nmode = \"bridged\"\nuplink = \"bond2\"\n",
    )
    .unwrap();
    let file = file.to_str().unwrap();
    let plan = f.k.cli(&["apply", file, "--dry-run"]).unwrap();
    assert!(
        plan.contains("+ uplink bond2") && plan.contains("- uplink bond0"),
        "{plan}"
    );
    assert!(
        f.lab.sh(&hv, "ip link show bond2").is_err(),
        "dry run: no bond2"
    );
    // bond0 is in use by lan, which the file drops: removed in order.
    f.k.cli(&["apply", file]).unwrap();
    let now = f.k.json(&["uplink", "show"]).unwrap();
    assert_eq!(now.as_array().unwrap().len(), 1, "{now:#}");
    assert_eq!(now[0]["name"], "bond2");
    assert_eq!(now[0]["used_by"][0], "lan2");
}

#[test]
fn a_nat_network_masquerades_behind_a_group_across_a_failover() {
    if !privileged() {
        return;
    }
    let f = fabric();
    f.k.cli(&[
        "uplink",
        "add",
        "bond0",
        "--members",
        "m1,m2",
        "--mode",
        "active-backup",
    ])
    .unwrap();
    f.lab
        .sh(f.hv(), &format!("ip addr add {HOST_IP}/24 dev bond0"))
        .unwrap();
    f.k.cli(&[
        "net",
        "add",
        "nat",
        "--mode",
        "nat",
        "--gateway",
        "10.88.0.1/24",
        "--uplink",
        "bond0",
    ])
    .unwrap();
    let g = f.lab.add_guest_with("p1", Some("10.88.0.2/24")).unwrap();
    g.disable_ipv6().unwrap();
    g.sh("ip route add default via 10.88.0.1").unwrap();
    f.k.cli(&["port", "add", "nat", "p1"]).unwrap();
    assert!(
        g.ping(OUTSIDE_IP),
        "guest -> outside, masqueraded behind the group"
    );
    let conns = f.k.json(&["conntrack", "list", "nat"]).unwrap();
    assert!(
        !conns.as_array().unwrap().is_empty(),
        "NAT in the fast path: {conns}"
    );
    f.cable("s1", false);
    f.until("m2 takes over", |g| g["active"] == "m2");
    assert!(g.ping(OUTSIDE_IP), "guest -> outside after the failover");
    assert!(
        kvnet_tests::lab::ping(&f.out, HOST_IP),
        "the host's address answers"
    );

    // A restarted daemon adopts the group and keeps following its members.
    let Fabric { lab, sw, out, k } = f;
    k.stop().unwrap();
    assert!(g.ping(OUTSIDE_IP), "forwarding goes on without a daemon");
    let f = Fabric {
        k: Kvnet::start(&lab).unwrap(),
        lab,
        sw,
        out,
    };
    let s = f.show();
    assert_eq!(s["active"], "m2", "adopted: {s:#}");
    f.cable("s1", true);
    f.cable("s2", false);
    f.until("m1 takes over under the new daemon", |g| {
        g["active"] == "m1"
    });
    assert!(
        g.ping(OUTSIDE_IP),
        "guest -> outside after the second failover"
    );
}

#[test]
fn lacp_between_two_kvnet_hosts_aggregates_and_drops_a_silent_member_within_3s() {
    if !privileged() {
        return;
    }
    // Two hypervisors, each its own lab and daemon, cabled m1-n1 and m2-n2.
    let (a, b) = (Lab::new().unwrap(), Lab::new().unwrap());
    let (ha, hb) = (a.hv().to_string(), b.hv().to_string());
    for ns in [&ha, &hb] {
        a.sh(
            ns,
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
        )
        .unwrap();
    }
    for (m, n) in [("m1", "n1"), ("m2", "n2")] {
        a.sh(
            &ha,
            &format!("ip link add {m} type veth peer name {n} netns {hb} && ip link set {m} up"),
        )
        .unwrap();
        b.sh(&hb, &format!("ip link set {n} up")).unwrap();
    }
    let (ka, kb) = (Kvnet::start(&a).unwrap(), Kvnet::start(&b).unwrap());
    ka.cli(&[
        "uplink",
        "add",
        "bond0",
        "--members",
        "m1,m2",
        "--mode",
        "802.3ad",
        "--hash",
        "l3l4",
    ])
    .unwrap();
    kb.cli(&[
        "uplink",
        "add",
        "bond0",
        "--members",
        "n1,n2",
        "--mode",
        "802.3ad",
        "--hash",
        "l3l4",
    ])
    .unwrap();
    a.sh(&ha, "ip addr add 192.0.2.1/24 dev bond0").unwrap();
    b.sh(&hb, "ip addr add 192.0.2.2/24 dev bond0").unwrap();
    let carrying = |k: &Kvnet| -> Vec<String> {
        let g = k.json(&["uplink", "show"]).unwrap()[0].clone();
        g["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["carrying"] == true)
            .map(|m| m["name"].as_str().unwrap().to_string())
            .collect()
    };
    let until = |what: &str, t: Duration, pred: &dyn Fn() -> bool| {
        let end = Instant::now() + t;
        while !pred() {
            assert!(Instant::now() < end, "{what} within {t:?}");
            thread::sleep(Duration::from_millis(20));
        }
    };
    let end = Instant::now() + Duration::from_secs(6);
    while carrying(&ka).len() != 2 || carrying(&kb).len() != 2 {
        assert!(
            Instant::now() < end,
            "the aggregation forms on both sides: a {:#}\nb {:#}\n{}",
            ka.json(&["uplink", "show"]).unwrap(),
            kb.json(&["uplink", "show"]).unwrap(),
            format!("{}\n{}", ka.daemon_log(), kb.daemon_log())
        );
        thread::sleep(Duration::from_millis(20));
    }
    let g = ka.json(&["uplink", "show"]).unwrap()[0].clone();
    let partner = &g["members"][0]["lacp_partner"];
    assert_eq!(
        partner["state"].as_u64().unwrap() & 0x3d,
        0x3d,
        "partner active, in sync, collecting, distributing: {g:#}"
    );
    assert!(
        kvnet_tests::lab::ping(&ha, "192.0.2.2"),
        "host to host over the aggregation"
    );
    // tcpdump decodes what kvnet sends as LACP.
    let dump = a
        .sh(
            &ha,
            "timeout 5 tcpdump -i m1 -c 2 -nv ether proto 0x8809 2>/dev/null",
        )
        .unwrap();
    assert!(
        dump.contains("LACPv1")
            && dump.contains("Actor Information")
            && dump.contains("Partner Information"),
        "{dump}"
    );

    // m2 stops hearing its partner (n2's LACPDUs dropped on arrival, after
    // tc, before the daemon's socket; carrier stays up): a's m2 expires
    // and leaves the aggregation within the short timeout.
    a.sh(
        &ha,
        "nft add table netdev kvlacp && \
         nft add chain netdev kvlacp c '{ type filter hook ingress device m2 priority 0; }' && \
         nft add rule netdev kvlacp c ether type 0x8809 drop",
    )
    .unwrap();
    let pulled = Instant::now();
    until("m2 leaves the aggregation", Duration::from_secs(4), &|| {
        carrying(&ka) == ["m1"]
    });
    let took = pulled.elapsed();
    eprintln!("802.3ad: m2 left the aggregation {took:?} after its partner went silent");
    assert!(took <= Duration::from_millis(3300), "{took:?}");
    // b follows a's next PDU on that link (out of sync): n2 leaves too.
    until("n2 leaves b's aggregation", Duration::from_secs(2), &|| {
        carrying(&kb) == ["n1"]
    });
    assert!(
        kvnet_tests::lab::ping(&ha, "192.0.2.2"),
        "traffic goes on over m1"
    );
    let log = ka.daemon_log();
    assert!(
        log.contains("uplink bond0: m2 left the aggregation"),
        "{log}"
    );

    // m2 hears its partner again and rejoins; then its cable is pulled
    // (the far end goes down): out of the aggregation at once.
    a.sh(&ha, "nft delete table netdev kvlacp").unwrap();
    until("m2 rejoins", Duration::from_secs(6), &|| {
        carrying(&ka).len() == 2 && carrying(&kb).len() == 2
    });
    b.sh(&hb, "ip link set n2 down").unwrap();
    let pulled = Instant::now();
    until(
        "m2 leaves on the pulled cable",
        Duration::from_secs(3),
        &|| carrying(&ka) == ["m1"],
    );
    eprintln!(
        "802.3ad: m2 left the aggregation {:?} after its cable was pulled",
        pulled.elapsed()
    );
    assert!(
        kvnet_tests::lab::ping(&ha, "192.0.2.2"),
        "traffic goes on over m1 after the pull"
    );
}

#[test]
fn arp_monitoring_fails_over_when_the_path_dies_behind_a_live_link() {
    if !privileged() {
        return;
    }
    let f = fabric();
    // s1 leaves the LAN's bridge: m1 keeps its carrier, but nothing it
    // sends gets anywhere (a switch port out of its VLAN).
    let path = |up: bool| {
        let how = if up { "master br0" } else { "nomaster" };
        f.lab.sh(&f.sw, &format!("ip link set s1 {how}")).unwrap();
    };

    // The control: a group that follows the carrier only does not notice.
    f.group(ACTIVE_BACKUP_M1);
    f.lab
        .sh(f.hv(), &format!("ip addr add {HOST_IP}/24 dev bond0"))
        .unwrap();
    assert!(kvnet_tests::lab::ping(&f.out, HOST_IP), "outside -> host");
    path(false);
    assert!(
        kvnet_tests::lab::ping_unanswered(&f.out, HOST_IP),
        "carrier only: the host is cut off"
    );
    let s = f.show();
    assert_eq!(s["active"], "m1", "carrier only: no failover: {s:#}");
    assert_eq!(s["failovers"], 0, "{s:#}");
    assert_eq!(Fabric::member(&s, "m1")["arp_ok"], Value::Null);
    path(true);
    f.k.cli(&["uplink", "del", "bond0"]).unwrap();

    // With ARP monitoring of the outside host.
    let g = f.group_and_guests(
        &[
            "--mode",
            "active-backup",
            "--primary",
            "m1",
            "--arp-target",
            OUTSIDE_IP,
            "--arp-interval",
            "100",
        ],
        1,
    );
    assert!(g[0].ping(OUTSIDE_IP), "guest -> outside over m1");
    let s = f.until("both members hear the target", |s| {
        ["m1", "m2"]
            .iter()
            .all(|m| Fabric::member(s, m)["arp_ok"] == true)
    });
    assert_eq!(s["active"], "m1", "{s:#}");
    path(false);
    let cut = Instant::now();
    let s = f.until("m2 takes over", |s| s["active"] == "m2");
    eprintln!(
        "arp monitoring: failover {:?} after the path died",
        cut.elapsed()
    );
    let m1 = Fabric::member(&s, "m1");
    assert_eq!(m1["carrier"], true, "m1 kept its carrier: {s:#}");
    assert_eq!(m1["arp_ok"], false, "{s:#}");
    assert_eq!(m1["state"], "down", "{s:#}");
    assert_eq!(s["failovers"], 1, "{s:#}");
    assert!(g[0].ping(OUTSIDE_IP), "guest -> outside over m2");
    assert!(
        kvnet_tests::lab::ping(&f.out, HOST_IP),
        "the host's address answers again"
    );
    let log = f.k.daemon_log();
    assert!(
        log.contains(
            "uplink bond0: m1 down (no ARP from 192.0.2.100); active m1 -> m2 (failover 1)"
        ),
        "{log}"
    );
    // The path back: the primary hears the target again and takes over.
    path(true);
    let s = f.until("m1 (primary) takes back", |s| s["active"] == "m1");
    assert_eq!(s["failovers"], 2, "{s:#}");
    assert!(g[0].ping(OUTSIDE_IP), "guest -> outside over m1 again");
}

/// Unsolicited neighbour advertisements in a capture: (target, option MAC,
/// Ethernet source).
fn unsolicited_nas(frames: &[kvnet_tests::Frame]) -> Vec<(std::net::Ipv6Addr, [u8; 6], [u8; 6])> {
    frames
        .iter()
        .filter(|f| f.data.len() >= 86 && f.ethertype() == 0x86dd)
        .filter(|f| f.data[20] == 58 && f.data[54] == 136 && f.data[78] == 2)
        .map(|f| {
            let t: [u8; 16] = f.data[62..78].try_into().unwrap();
            let m: [u8; 6] = f.data[80..86].try_into().unwrap();
            (std::net::Ipv6Addr::from(t), m, f.src_mac())
        })
        .collect()
}

#[test]
fn a_failover_sends_unsolicited_nas_for_the_hosts_ipv6_addresses() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let guests = f.group_and_guests(ACTIVE_BACKUP_M1, 1);
    assert!(guests[0].ping(OUTSIDE_IP), "the guest's MAC is learned");
    // IPv6 on the group alone (the lab has it off elsewhere), no DAD so
    // the addresses are usable at once.
    f.lab
        .sh(
            f.hv(),
            "sysctl -qw net.ipv6.conf.bond0.accept_dad=0 net.ipv6.conf.bond0.disable_ipv6=0 && \
             ip addr add 2001:db8::1/64 dev bond0 nodad",
        )
        .unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while !f
        .lab
        .sh(f.hv(), "ip -6 addr show dev bond0 scope link")
        .unwrap_or_default()
        .contains("fe80::")
    {
        assert!(Instant::now() < end, "bond0 has no link-local address");
        thread::sleep(Duration::from_millis(50));
    }
    let group_mac = kvnet_tests::lab::read_mac(f.hv(), "bond0").unwrap();
    let c2 = Capture::start(&f.sw, "s2").unwrap();
    f.cable("s1", false);
    f.until("m2 takes over", |g| g["active"] == "m2");
    let frames = c2
        .stop_when("NAs for both addresses", Duration::from_secs(5), |fr| {
            unsolicited_nas(fr).len() >= 2
        })
        .unwrap();
    let nas = unsolicited_nas(&frames);
    eprintln!("unsolicited NAs out of m2: {nas:?}");
    let global: std::net::Ipv6Addr = "2001:db8::1".parse().unwrap();
    for what in ["global", "link-local"] {
        let na = nas
            .iter()
            .find(|(t, _, _)| match what {
                "global" => *t == global,
                _ => t.segments()[0] == 0xfe80,
            })
            .unwrap_or_else(|| panic!("no NA for the {what} address: {nas:?}"));
        assert_eq!(
            na.1, group_mac,
            "{what}: the group's MAC as target link-layer address"
        );
        assert_eq!(na.2, group_mac, "{what}: sent from the group's MAC");
    }
    // And the IPv4 side: a gratuitous ARP for the host's address from the
    // group's MAC, and the guest's MAC announced (GARP with its address
    // when ARP suppression knows it, else RARP).
    let garp = |mac: [u8; 6]| {
        count_frames(&frames, |x| {
            matches!(x.ethertype(), 0x0806 | 0x8035) && x.src_mac() == mac && x.is_broadcast()
        })
    };
    assert!(garp(group_mac) >= 1, "the host's address announced");
    assert!(garp(guests[0].mac) >= 1, "the guest's MAC announced");
    let log = f.k.daemon_log();
    assert!(log.contains("2 IPv6 address(es)"), "{log}");
}

/// `kvnet trace --ip IP --json` while `ping_once` runs until `count`
/// events came: the events.
fn trace_events(f: &Fabric, ip: &str, count: usize, ping_once: &dyn Fn()) -> Vec<Value> {
    let out_path = f.lab.work_dir().join("trace.jsonl");
    let mut cmd = Command::new(f.k.bin());
    cmd.arg("--socket")
        .arg(f.k.socket())
        .arg("trace")
        .arg("--pin-dir")
        .arg(f.lab.pin_dir())
        .args(["--ip", ip, "--count", &count.to_string(), "--json"])
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::null());
    let tracer = f.lab.spawn(f.hv(), cmd).unwrap();
    let mut ended = None;
    for _ in 0..50 {
        ping_once();
        ended = tracer.wait_timeout(Duration::from_millis(100)).unwrap();
        if ended.is_some() {
            break;
        }
    }
    let text = std::fs::read_to_string(&out_path).unwrap();
    assert!(
        ended.is_some_and(|s| s.success()),
        "trace did not end:\n{text}"
    );
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn trace_names_the_member_a_frame_leaves_the_group_by() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let g = f.group_and_guests(ACTIVE_BACKUP_M1, 1);
    assert!(g[0].ping(OUTSIDE_IP));
    let ping_once = || {
        g[0].sh(&format!("ping -c 1 -W 1 {OUTSIDE_IP} >/dev/null || true"))
            .unwrap();
    };
    let out_of_group = |events: &[Value]| -> Vec<String> {
        events
            .iter()
            .filter(|e| e["hook"] == "tc_out" && e["ingress"] == "bond0")
            .map(|e| e["egress"].as_str().unwrap_or("-").to_string())
            .collect()
    };
    let events = trace_events(&f, "192.0.2.11", 6, &ping_once);
    let members = out_of_group(&events);
    assert!(
        !members.is_empty() && members.iter().all(|m| m == "m1"),
        "the echo requests leave bond0 by m1: {members:?}\n{events:#?}"
    );
    f.cable("s1", false);
    f.until("m2 takes over", |g| g["active"] == "m2");
    let events = trace_events(&f, "192.0.2.11", 6, &ping_once);
    let members = out_of_group(&events);
    assert!(
        !members.is_empty() && members.iter().all(|m| m == "m2"),
        "after the failover, by m2: {members:?}\n{events:#?}"
    );
}

#[test]
fn members_get_their_own_macs_back_after_a_restart_and_from_down_without_a_daemon() {
    if !privileged() {
        return;
    }
    let Fabric { lab, sw, out, k } = fabric();
    let hv = lab.hv().to_string();
    let mac_of = |i: &str| kvnet_tests::lab::read_mac(&hv, i).unwrap();
    let promisc = |i: &str| {
        lab.sh(&hv, &format!("ip -d link show {i}"))
            .unwrap()
            .contains("promiscuity 1")
    };
    let (m1_mac, m2_mac) = (mac_of("m1"), mac_of("m2"));
    let add = |k: &Kvnet| {
        k.cli(&[
            "uplink",
            "add",
            "bond0",
            "--members",
            "m1,m2",
            "--mode",
            "active-backup",
            "--primary",
            "m1",
        ])
        .unwrap();
    };
    add(&k);
    assert_eq!(mac_of("m2"), m1_mac, "m2 wears the group's MAC (m1's)");
    assert!(promisc("m2"));

    // A restarted daemon adopts the group; deleting it then gives m2 the
    // MAC it had before the first daemon took it.
    k.stop().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    assert_eq!(k.json(&["uplink", "show"]).unwrap()[0]["name"], "bond0");
    k.cli(&["uplink", "del", "bond0"]).unwrap();
    assert_eq!(mac_of("m2"), m2_mac, "m2's own MAC after an adopted del");
    assert_eq!(mac_of("m1"), m1_mac);
    assert!(!promisc("m2") && !promisc("m1"), "members not promiscuous");

    // A killed daemon: `kvnet down` alone removes the group's device and
    // restores the members (across a restart too).
    add(&k);
    k.stop().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let bin = k.bin().to_path_buf();
    k.kill().unwrap();
    assert!(
        lab.sh(&hv, "ip link show bond0").is_ok(),
        "the group outlives its daemon"
    );
    let down = kvnet_tests::kvnet::down_without_daemon(&lab, &bin).unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(lab.sh(&hv, "ip link show bond0").is_err(), "bond0 is gone");
    assert_eq!(mac_of("m2"), m2_mac, "m2's own MAC after down");
    assert_eq!(mac_of("m1"), m1_mac);
    assert!(!promisc("m2") && !promisc("m1"), "members not promiscuous");
    let tc = lab.sh(&hv, "tc filter show dev m1 ingress").unwrap();
    assert!(tc.trim().is_empty(), "no kvnet filter left on m1: {tc}");
    drop((sw, out));
}

#[test]
fn apply_changes_a_group_in_use_in_place() {
    if !privileged() {
        return;
    }
    let f = fabric();
    let hv = f.hv().to_string();
    // A third member, cabled to the switch like the others.
    f.lab
        .sh(
            &hv,
            &format!(
                "ip link add m3 type veth peer name s3 netns {} && ip link set m3 up",
                f.sw
            ),
        )
        .unwrap();
    f.lab
        .sh(&f.sw, "ip link set s3 master br0 && ip link set s3 up")
        .unwrap();
    let m3_mac = kvnet_tests::lab::read_mac(&hv, "m3").unwrap();
    let file = f.lab.work_dir().join("group.toml");
    let write = |group: &str| {
        std::fs::write(
            &file,
            format!(
                "[[uplinks]]\nname = \"bond0\"\n{group}\n\n\
                 [networks.lan]\nmode = \"bridged\"\nuplink = \"bond0\"\n\n\
                 [[ports]]\niface = \"p1\"\nnet = \"lan\"\n"
            ),
        )
        .unwrap();
    };
    let g = f.lab.add_guest_with("p1", Some("192.0.2.11/24")).unwrap();
    g.disable_ipv6().unwrap();
    write("members = [\"m1\", \"m2\"]\nmode = \"active-backup\"\nprimary = \"m1\"\nmiimon = 100");
    let path = file.to_str().unwrap();
    f.k.cli(&["apply", path]).unwrap();
    assert!(
        g.ping(OUTSIDE_IP),
        "guest -> outside over bond0 (active-backup)"
    );
    let ifindex = f.show()["ifindex"].clone();

    // balance-rr over m1,m2,m3: planned as a change, done in place.
    write("members = [\"m1\", \"m2\", \"m3\"]\nmode = \"balance-rr\"\nmiimon = 100");
    let plan = f.k.cli(&["apply", path, "--dry-run"]).unwrap();
    assert!(
        plan.contains(
            "~ uplink bond0: members m1,m2 -> m1,m2,m3, mode active-backup -> balance-rr"
        ) && !plan.contains("- uplink")
            && !plan.contains("network"),
        "{plan}"
    );
    f.k.cli(&["apply", path]).unwrap();
    let s = f.show();
    assert_eq!(s["ifindex"], ifindex, "the same device: {s:#}");
    assert_eq!(s["mode"], "balance-rr", "{s:#}");
    assert_eq!(s["used_by"][0], "lan", "{s:#}");
    let s = f.until("m3 carries", |s| {
        Fabric::member(s, "m3")["carrying"] == true
    });
    assert_eq!(s["members"].as_array().unwrap().len(), 3, "{s:#}");
    assert_ne!(
        kvnet_tests::lab::read_mac(&hv, "m3").unwrap(),
        m3_mac,
        "m3 wears the group's MAC"
    );
    // Round robin over three members: each takes some of 12 requests.
    let caps: Vec<Capture> = ["s1", "s2", "s3"]
        .iter()
        .map(|s| Capture::start(&f.sw, s).unwrap())
        .collect();
    g.sh(&format!("ping -q -c 12 -i 0.05 {OUTSIDE_IP} || true"))
        .unwrap();
    let guest_ip = [192, 0, 2, 11];
    let end = Instant::now() + Duration::from_secs(5);
    let mut seen = vec![0; 3];
    while seen.iter().sum::<usize>() < 12 && Instant::now() < end {
        for (i, c) in caps.iter().enumerate() {
            seen[i] = echo_requests(&c.frames().unwrap(), guest_ip);
        }
        thread::sleep(Duration::from_millis(50));
    }
    eprintln!("balance-rr after apply: requests per member {seen:?}");
    assert_eq!(seen.iter().sum::<usize>(), 12, "{seen:?}");
    assert!(
        seen.iter().all(|n| *n >= 2),
        "every member takes its turn: {seen:?}"
    );

    // m2 leaves: it gets its own MAC back and carries nothing.
    write("members = [\"m1\", \"m3\"]\nmode = \"balance-rr\"\nmiimon = 100");
    f.k.cli(&["apply", path]).unwrap();
    let s = f.show();
    assert_eq!(s["members"].as_array().unwrap().len(), 2, "{s:#}");
    assert!(
        !f.lab
            .sh(&hv, "ip -d link show m2")
            .unwrap()
            .contains("promiscuity 1"),
        "m2 left"
    );
    assert!(g.ping(OUTSIDE_IP), "guest -> outside over m1,m3");
    // A change that cannot be made is refused and changes nothing.
    f.k.cli(&["net", "add", "iso", "--mode", "isolated"])
        .unwrap();
    f.k.cli(&["port", "add", "iso", "m2"]).unwrap();
    // (In the file too: else the apply would free m2 first.)
    write(
        "members = [\"m1\", \"m2\", \"m3\"]\nmode = \"balance-rr\"\nmiimon = 100\n\n\
         [networks.iso]\nmode = \"isolated\"\n\n[[ports]]\niface = \"m2\"\nnet = \"iso\"",
    );
    let e = f.k.cli_err(&["apply", path]).unwrap();
    assert!(
        e.contains("changing uplink group 'bond0'")
            && e.contains("'m2' is a port of network 'iso'"),
        "{e}"
    );
    let s = f.show();
    assert_eq!(
        s["members"].as_array().unwrap().len(),
        2,
        "unchanged: {s:#}"
    );
}
