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
    let sw = lab.add_netns("sw").unwrap();
    let out = lab.add_netns("out").unwrap();
    let hv = lab.hv().to_string();
    lab.sh(&sw, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1; ip link add br0 type bridge; ip link set br0 up")
        .unwrap();
    lab.sh(&hv, "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1").unwrap();
    for (m, s) in [("m1", "s1"), ("m2", "s2")] {
        lab.sh(
            &hv,
            &format!("ip link add {m} type veth peer name {s} netns {sw} && ip link set {m} up"),
        )
        .unwrap();
        lab.sh(&sw, &format!("ip link set {s} master br0 && ip link set {s} up"))
            .unwrap();
    }
    lab.sh(
        &sw,
        &format!("ip link add so type veth peer name eth0 netns {out} && ip link set so master br0 && ip link set so up"),
    )
    .unwrap();
    lab.sh(
        &out,
        &format!("sysctl -qw net.ipv6.conf.all.disable_ipv6=1; ip link set eth0 up; ip addr add {OUTSIDE_IP}/24 dev eth0"),
    )
    .unwrap();
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
        let mut cmd = vec!["uplink", "add", "bond0", "--members", "m1,m2"];
        cmd.extend_from_slice(args);
        self.k.cli(&cmd).unwrap();
        self.lab
            .sh(self.hv(), &format!("ip addr add {HOST_IP}/24 dev bond0"))
            .unwrap();
        self.k
            .cli(&["net", "add", "lan", "--mode", "bridged", "--uplink", "bond0"])
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
            .and_then(|p| p.trim().trim_start_matches('+').split(' ').next()?.parse().ok())
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
    let g = f.group_and_guests(
        &["--mode", "active-backup", "--primary", "m1", "--miimon", "100"],
        1,
    );
    let g1 = &g[0];
    assert!(g1.ping(OUTSIDE_IP), "guest -> outside over the group");
    assert!(kvnet_tests::lab::ping(&f.out, HOST_IP), "outside -> host address on the group");
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

    for (what, p) in [("guest -> outside", &mut guest_ping), ("outside -> host", &mut host_ping)] {
        p.wait_timeout(Duration::from_secs(10)).unwrap().expect("ping ended");
        let text = stdout_text(p);
        let (sent, got, dup) = ping_summary(&text);
        // Two failovers, 100 ms each at most: 10 pings each.
        assert!(sent - got <= 20, "{what}: {sent} sent, {got} answered\n{text}");
        assert_eq!(dup, 0, "{what}: duplicate replies\n{text}");
    }
    let status = tcp.wait_timeout(Duration::from_secs(10)).unwrap().expect("iperf3 ended");
    let out = stdout_text(&mut tcp);
    assert!(status.success(), "the TCP transfer broke: {out}");
    let s = f.show();
    assert_eq!(s["failovers"], 2, "{s:#}");
    let log = f.k.daemon_log();
    assert!(log.contains("uplink bond0: m1 down; active m1 -> m2"), "{log}");
}
