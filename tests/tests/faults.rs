//! Issue 15, point 7: faults under a running daemon, bounded here and long
//! under `KVNET_SOAK=1` (`cargo xtask soak`), each printing a `SOAK` line:
//!
//! * port churn with traffic: ports added and removed in a loop beside a
//!   steady ping; fds, RSS, map entries, pins and interfaces come back to
//!   the baseline, the ping loses nothing;
//! * a guest namespace deleted: its port is reaped with its FDB entries
//!   and bindings;
//! * a port's interface renamed: the old name's port goes (nothing is
//!   switched for the interface under a name no rule matches); a rule
//!   matching the new name attaches it afresh, at once, also when renamed
//!   straight from one matching name to another;
//! * uplink flapping under NAT and bridged traffic: forwarding (new and
//!   long-lived flows) recovers after each flap, no error loop in the log;
//! * the bpffs of the pin folder unmounted under the daemon: forwarding
//!   goes on (also once the daemon stops), the log and `kvnet status` say
//!   the pins are gone, a restart refuses clearly, and `kvnet down` on a
//!   bpffs again plus a fresh start rebuild it;
//! * kill -9 under 4-stream TCP with 100k conntrack entries: the restart
//!   adopts, every stream completes, every entry is still there.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    lab::{self, parse_ping_received, privileged},
    GuestPort, Lab, Proc,
};
use serde_json::Value;

#[path = "support/soak.rs"]
mod soak;
use soak::*;

#[path = "support/nat_lab.rs"]
mod nat_lab;

#[path = "support/libvirt_nat.rs"]
mod libvirt_nat;
use libvirt_nat::{echo_server, tcp_echo};

/// Interface names in namespace `ns`.
fn ifaces(ns: &str) -> BTreeSet<String> {
    let o = lab::exec(ns, &["ip", "-j", "link", "show"]).unwrap();
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|l| l["ifname"].as_str().unwrap_or_default().to_string())
        .collect()
}

/// Every pin under `dir` (relative path), with the entry count of the
/// hash maps among them (what a leak grows; arrays are fixed size).
fn pins(dir: &Path) -> BTreeMap<String, Option<usize>> {
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.filter_map(|e| e.ok()) {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
                continue;
            }
            let rel = p.strip_prefix(dir).unwrap().display().to_string();
            out.insert(rel, hash_map_entries(&p));
        }
    }
    out
}

fn hash_map_entries(pin: &Path) -> Option<usize> {
    let p = pin.to_str().unwrap();
    let o = Command::new("bpftool")
        .args(["-j", "map", "show", "pinned", p])
        .output()
        .ok()?;
    let info: Value = serde_json::from_slice(&o.stdout).ok()?;
    if !info["type"].as_str().unwrap_or_default().contains("hash") {
        return None;
    }
    let o = Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned", p])
        .output()
        .ok()?;
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array().map(Vec::len)
}

/// The differences between two pin inventories, for a leak report.
fn pin_diff(
    a: &BTreeMap<String, Option<usize>>,
    b: &BTreeMap<String, Option<usize>>,
) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => out.push(format!("pin {k} gone")),
            Some(w) if w != v => out.push(format!("map {k}: {v:?} -> {w:?} entries")),
            _ => {}
        }
    }
    for k in b.keys().filter(|k| !a.contains_key(*k)) {
        out.push(format!("pin {k} new"));
    }
    out
}

/// A ping running in the background until [`BgPing::finish`].
struct BgPing {
    proc: Proc,
    out: PathBuf,
}

impl BgPing {
    fn start(lab: &Lab, ns: &str, ip: &str, tag: &str) -> BgPing {
        let out = lab.work_dir().join(format!("ping-{tag}.txt"));
        let mut c = Command::new("sh");
        // Line-buffered: replies are counted while it runs.
        c.args([
            "-c",
            &format!("exec stdbuf -oL ping -i 0.05 -W 1 {ip} > {}", out.display()),
        ]);
        c.stderr(Stdio::null());
        BgPing {
            proc: lab.spawn(ns, c).unwrap(),
            out,
        }
    }
    /// Replies so far.
    fn replies(&self) -> usize {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("bytes from"))
            .count()
    }
    /// Stops it (SIGINT: it prints its summary) and returns (sent, received).
    fn finish(self) -> (u32, u32) {
        let (s, r, _) = self.finish_text();
        (s, r)
    }
    /// [`BgPing::finish`] and ping's output.
    fn finish_text(self) -> (u32, u32, String) {
        self.proc.signal(nix::sys::signal::Signal::SIGINT).unwrap();
        self.proc.wait_timeout(Duration::from_secs(5)).unwrap();
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let sent = text
            .lines()
            .find(|l| l.contains("packets transmitted"))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        (sent, parse_ping_received(&text), text)
    }
}

/// A ping from `ns` to `ip` answered within `t` (one ping a try).
fn reaches(ns: &str, ip: &str, t: Duration) -> bool {
    let end = Instant::now() + t;
    loop {
        if lab::ping_replies(ns, ip, 1) == 1 {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
    }
}

/// Ports by name, as `kvnet port list` shows them.
fn ports(k: &Kvnet) -> BTreeMap<String, Value> {
    k.json(&["port", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["iface"].as_str().unwrap().to_string(), p.clone()))
        .collect()
}

#[test]
fn port_churn_with_traffic_returns_to_baseline() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("cg1", "10.61.0.1/24"), ("cg2", "10.61.0.2/24")])
        .unwrap();
    let churn = lab.add_netns("churn").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let pid = k.daemon_pid().unwrap();
    k.cli(&["net", "add", "ch"]).unwrap();
    for gp in &g {
        k.cli(&["port", "add", "ch", &gp.hv_if]).unwrap();
    }
    assert!(g[0].ping("10.61.0.2"), "positive control: the guests talk");
    let hv = lab.hv().to_string();
    // One churn: a new interface (new ifindex, new MAC, same name), a
    // port, a guest learned behind it and bound by port security, gone.
    let one = |i: u64| {
        lab.exec(
            &hv,
            &[
                "ip", "link", "add", "chp", "type", "veth", "peer", "name", "c0", "netns", &churn,
            ],
        )
        .unwrap();
        lab.exec(&hv, &["ip", "link", "set", "chp", "up"]).unwrap();
        lab.sh(
            &churn,
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1; ip addr add 10.61.0.100/24 dev c0 && ip link set c0 up",
        )
        .unwrap();
        k.cli(&["port", "add", "ch", "chp"]).unwrap();
        assert!(
            reaches(&churn, "10.61.0.1", Duration::from_secs(5)),
            "churn {i}: the new port forwards"
        );
        k.cli(&["port", "del", "chp"]).unwrap();
        lab.exec(&hv, &["ip", "link", "del", "chp"]).unwrap();
    };
    // Warm-up: what the first port add allocates for good is no leak.
    for i in 0..2 {
        one(i);
    }
    let base = footprint(pid);
    let base_pins = pins(&lab.pin_dir());
    let base_ifaces = ifaces(&hv);
    let base_ports = ports(&k);
    let base_fdb = k.fdb("ch").len();
    assert!(
        base_pins.values().any(Option::is_some),
        "positive control: the inventory counts map entries: {base_pins:?}"
    );
    let ping = BgPing::start(&lab, &g[0].ns, "10.61.0.2", "churn");
    let budget = scale(Duration::from_secs(8), Duration::from_secs(600));
    let min_iterations = scale(15, 100);
    let mut n = 0u64;
    while n < min_iterations || started.elapsed() < budget {
        one(n);
        n += 1;
        if !soak() && n >= min_iterations {
            break;
        }
    }
    let (sent, received) = ping.finish();
    let mut leaks = Vec::new();
    let fds = settle_fds(pid, base.fds, Duration::from_secs(5));
    if fds > base.fds {
        leaks.push(format!("fds {} -> {fds}", base.fds));
    }
    let after = footprint(pid);
    // Allocator slack is no leak; a few KiB a port over 100s would show.
    if after.rss_kib > base.rss_kib + 16 * 1024 {
        leaks.push(format!("rss {} -> {} KiB", base.rss_kib, after.rss_kib));
    }
    leaks.extend(pin_diff(&base_pins, &pins(&lab.pin_dir())));
    let now_ifaces = ifaces(&hv);
    if now_ifaces != base_ifaces {
        leaks.push(format!("interfaces {base_ifaces:?} -> {now_ifaces:?}"));
    }
    if ports(&k) != base_ports {
        leaks.push("port list changed".into());
    }
    let fdb = k.fdb("ch").len();
    if fdb != base_fdb {
        leaks.push(format!("fdb {base_fdb} -> {fdb} entries"));
    }
    soak_line("port-churn", n, &leaks, started);
    println!("port churn: {n} ports, ping {received}/{sent}, footprint {base:?} -> {after:?}");
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(sent >= 5, "the background ping ran: {sent}");
    assert!(
        received * 100 >= sent * 99,
        "the steady flow lost pings during the churn: {received}/{sent}"
    );
    assert!(k.daemon_running());
}

#[test]
fn deleted_guest_namespace_is_reaped_without_leaks() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("dg1", "10.63.0.1/24"), ("dg2", "10.63.0.2/24")])
        .unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let pid = k.daemon_pid().unwrap();
    k.cli(&["net", "add", "dn"]).unwrap();
    k.cli(&["port", "add", "dn", "dg1"]).unwrap();
    // The baseline is taken after the first round: dg1 has then been
    // learned and bound for good (its entries are no leak).
    let mut base = None;
    let iterations = scale(3, 30);
    let mut leaks = Vec::new();
    for i in 0..iterations {
        if i == 1 {
            base = Some((footprint(pid), pins(&lab.pin_dir())));
        }
        // A guest comes, talks (learned, bound), and its namespace is
        // deleted under the daemon: the veth goes with it.
        let gone: GuestPort = if i == 0 {
            g[1].clone()
        } else {
            lab.add_guest_with("dg2", Some("10.63.0.2/24")).unwrap()
        };
        gone.disable_ipv6().unwrap();
        k.cli(&["port", "add", "dn", "dg2"]).unwrap();
        assert!(gone.ping("10.63.0.1"), "positive control {i}");
        assert_eq!(k.fdb_port_of("dn", &gone.mac).as_deref(), Some("dg2"));
        assert!(k.port("dg2").is_some());
        Command::new("ip")
            .args(["netns", "delete", &gone.ns])
            .status()
            .unwrap();
        wait_until("the port reaped", Duration::from_secs(5), || {
            k.port("dg2").is_none()
        });
        assert_eq!(k.fdb_port_of("dn", &gone.mac), None, "its FDB entry");
        let shown = k.cli_err(&["port", "show", "dg2"]).unwrap();
        assert!(shown.contains("not a kvnet port"), "{shown}");
        assert!(
            k.daemon_log().contains("port dg2 vanished: removed"),
            "{}",
            k.daemon_log()
        );
    }
    let (base, base_pins) = base.unwrap();
    let fds = settle_fds(pid, base.fds, Duration::from_secs(5));
    if fds > base.fds {
        leaks.push(format!("fds {} -> {fds}", base.fds));
    }
    leaks.extend(pin_diff(&base_pins, &pins(&lab.pin_dir())));
    soak_line("netns-deleted", iterations, &leaks, started);
    assert!(leaks.is_empty(), "{leaks:?}");
    assert!(k.daemon_running());
    assert_eq!(ports(&k).keys().collect::<Vec<_>>(), ["dg1"]);
}

#[test]
fn renamed_port_interface_is_dropped_and_a_rule_attaches_the_new_name() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("rn0", "10.64.0.1/24"), ("st0", "10.64.0.2/24")])
        .unwrap();
    let config = lab.work_dir().join("rn.toml");
    std::fs::write(
        &config,
        "[networks.rn]\n\n[[ports]]\niface = \"st0\"\nnet = \"rn\"\n\n[[rules]]\nmatch = \"rn*\"\nnet = \"rn\"\n",
    )
    .unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["apply", config.to_str().unwrap()]).unwrap();
    wait_until("rn0 attached by the rule", Duration::from_secs(5), || {
        k.port("rn0").is_some()
    });
    assert!(g[0].ping("10.64.0.2"), "positive control");
    let ifindex = k.port("rn0").unwrap()["ifindex"].clone();
    let hv = lab.hv().to_string();
    let rename = |from: &str, to: &str| {
        lab.sh(
            &hv,
            &format!(
                "ip link set {from} down && ip link set {from} name {to} && ip link set {to} up"
            ),
        )
        .unwrap();
    };
    let iterations = scale(1, 30);
    let direct_renames = scale(5, 3);
    let mut name = "rn0".to_string();
    for i in 0..iterations {
        // Renamed to a name no rule matches: the port goes with its FDB
        // entries, and nothing is switched for the interface any more.
        rename(&name, "xx0");
        wait_until("the old name's port gone", Duration::from_secs(5), || {
            k.port(&name).is_none()
        });
        assert!(k.port("xx0").is_none(), "attached without a rule");
        assert!(
            g[0].ping_unanswered("10.64.0.2"),
            "{i}: switched for an interface that is no port"
        );
        let fdb = k.fdb_port_of("rn", &g[0].mac);
        assert!(fdb.is_none(), "{i}: its MAC still learned on {fdb:?}");
        // Renamed to a name the rule matches: attached afresh under it,
        // the same interface, and it forwards again.
        let next = format!("rn{}", i + 1);
        rename("xx0", &next);
        wait_until("the new name attached", Duration::from_secs(5), || {
            k.port(&next).is_some()
        });
        assert_eq!(k.port(&next).unwrap()["ifindex"], ifindex);
        assert!(
            reaches(&g[0].ns, "10.64.0.2", Duration::from_secs(5)),
            "{i}: no forwarding after the rename to {next}"
        );
        assert_eq!(
            k.fdb_port_of("rn", &g[0].mac).as_deref(),
            Some(next.as_str()),
            "learned on the new name"
        );
        // Renamed straight from one matching name to another, a few
        // times: the new name is attached while the old name's port still
        // holds the ifindex, and that port's removal must not take the new
        // one's programs (or its attachment) with it.
        let mut from = next;
        for j in 0..direct_renames {
            let to = format!("rn{}d{j}", i + 1);
            rename(&from, &to);
            wait_until(
                &format!("{i}.{j}: {from} reaped"),
                Duration::from_secs(5),
                || {
                    k.daemon_log()
                        .contains(&format!("port {from} vanished: removed"))
                },
            );
            wait_until(
                &format!(
                    "{i}.{j}: {to} attached ({:?})",
                    ports(&k).keys().collect::<Vec<_>>()
                ),
                Duration::from_secs(5),
                || k.port(&to).is_some(),
            );
            assert!(k.port(&from).is_none(), "{i}.{j}: {from} still a port");
            // Attached at the first try, not after the old port's filter
            // refused it (and only because a later link event came by).
            let log = k.daemon_log();
            assert!(
                !log.contains(&format!("attaching {to}:")),
                "{i}.{j}: attaching {to} failed first:\n{log}"
            );
            assert!(
                reaches(&g[0].ns, "10.64.0.2", Duration::from_secs(5)),
                "{i}.{j}: no forwarding after the rename {from} -> {to}\n{}",
                k.daemon_log()
            );
            assert_eq!(
                k.fdb_port_of("rn", &g[0].mac).as_deref(),
                Some(to.as_str()),
                "{i}.{j}: learned on the new name"
            );
            from = to;
        }
        name = from;
    }
    soak_line(
        "iface-renamed",
        iterations * (2 + direct_renames),
        &[],
        started,
    );
    assert!(k.daemon_running());
}

#[test]
fn uplink_flapping_under_nat_and_bridged_traffic_recovers() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let n = nat_lab::nat_lab_with(1, &[], &[], &[]);
    let g = &n.guests[0];
    let hv = n.lab.hv().to_string();
    // Beside the NAT network on up0, a bridged one on up1: its guest is a
    // peer of the LAN 203.0.113.0/24 behind it.
    let lan = n.lab.add_netns("lan").unwrap();
    n.lab
        .exec(
            &hv,
            &[
                "ip", "link", "add", "up1", "type", "veth", "peer", "name", "eth0", "netns", &lan,
            ],
        )
        .unwrap();
    n.lab
        .exec(&hv, &["ip", "link", "set", "up1", "up"])
        .unwrap();
    n.lab
        .sh(
            &lan,
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1; ip addr add 203.0.113.2/24 dev eth0 && ip link set eth0 up",
        )
        .unwrap();
    let gb = n
        .lab
        .add_guest_with("vb0", Some("203.0.113.11/24"))
        .unwrap();
    gb.disable_ipv6().unwrap();
    n.k.cli(&["net", "add", "lan", "--mode", "bridged", "--uplink", "up1"])
        .unwrap();
    n.k.cli(&["port", "add", "lan", "vb0"]).unwrap();
    let paths = [(&g.ns, "198.51.100.2"), (&gb.ns, "203.0.113.2")];
    for (ns, ip) in paths {
        assert!(
            reaches(ns, ip, Duration::from_secs(5)),
            "positive control: {ns} -> {ip}"
        );
    }
    let pid = n.k.daemon_pid().unwrap();
    let base = footprint(pid);
    let ping = BgPing::start(&n.lab, &g.ns, "198.51.100.2", "flap");
    let ping_b = BgPing::start(&n.lab, &gb.ns, "203.0.113.2", "flap-b");
    let flaps = scale(3, 100);
    let mut worst = Duration::ZERO;
    let log_lines = |k: &Kvnet| k.daemon_log().lines().count();
    let log0 = log_lines(&n.k);
    for i in 0..flaps {
        n.lab
            .sh(&hv, "ip link set up0 down && ip link set up1 down")
            .unwrap();
        // Both paths at once (each check waits out a ping's timeout).
        let down: Vec<u32> = thread::scope(|sc| {
            let h: Vec<_> = paths
                .iter()
                .map(|(ns, ip)| sc.spawn(move || lab::ping_replies(ns, ip, 1)))
                .collect();
            h.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(down, [0, 0], "{i}: answered with the uplinks down");
        n.lab
            .sh(&hv, "ip link set up0 up && ip link set up1 up")
            .unwrap();
        let t = Instant::now();
        for (ns, ip) in paths {
            assert!(
                reaches(ns, ip, Duration::from_secs(10)),
                "{i}: {ns} -> {ip} did not recover after the uplink came back"
            );
        }
        // The long-lived flows (one ICMP id each; the NAT one's conntrack
        // entry from before the flap) get answers again too.
        for p in [&ping, &ping_b] {
            let seen = p.replies();
            wait_until(
                "the steady pings answered after the flap",
                Duration::from_secs(5),
                || p.replies() > seen,
            );
        }
        worst = worst.max(t.elapsed());
    }
    let (sent_b, received_b) = ping_b.finish();
    assert!(
        received_b > 0 && received_b < sent_b,
        "the bridged ping saw the flaps: {received_b}/{sent_b}"
    );
    let (sent, received, ping_text) = ping.finish_text();
    // No error loop: a few lines a flap at most, and none once it is over.
    let log1 = log_lines(&n.k);
    thread::sleep(Duration::from_secs(2));
    let log2 = log_lines(&n.k);
    let mut leaks = Vec::new();
    if log2 > log1 {
        leaks.push(format!(
            "log still growing after the flaps: {log1} -> {log2} lines"
        ));
    }
    if log1 - log0 > 3 * flaps as usize {
        leaks.push(format!("{} log lines for {flaps} flaps", log1 - log0));
    }
    let fds = settle_fds(pid, base.fds, Duration::from_secs(5));
    if fds > base.fds {
        leaks.push(format!("fds {} -> {fds}", base.fds));
    }
    soak_line("uplink-flap", flaps, &leaks, started);
    println!(
        "uplink flapping: {flaps} flaps, worst recovery {worst:?}, pings {received}/{sent} (NAT), {received_b}/{sent_b} (bridged)"
    );
    assert!(leaks.is_empty(), "{leaks:?}\n{}", n.k.daemon_log());
    assert!(
        received > 0 && received < sent,
        "the steady ping saw the flaps: {received}/{sent}\n{ping_text}"
    );
    let status = n.k.json(&["status"]).unwrap();
    assert_eq!(status["daemon"], "running", "{status}");
    let net = n.k.json(&["net", "show", "nat"]).unwrap();
    assert_eq!(net["uplink"], "up0", "{net}");
    // The flow table still translates: a TCP round trip through the NAT.
    echo_server(&n.lab, &n.out.ns, 5001).unwrap();
    let r = tcp_echo(&g.ns, "198.51.100.2", 5001, 10_000);
    assert!(r.contains("tcp 10000"), "{r}");
}

/// A private bpffs mounted at `path`, unmounted (lazily) on drop.
struct PrivateBpffs(PathBuf);

impl PrivateBpffs {
    fn mount(path: PathBuf) -> PrivateBpffs {
        std::fs::create_dir_all(&path).unwrap();
        let st = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .unwrap();
        assert!(st.success(), "mount a bpffs at {}", path.display());
        PrivateBpffs(path)
    }
    fn mounted(&self) -> bool {
        nix::sys::statfs::statfs(&self.0).is_ok_and(|s| s.filesystem_type().0 as i64 == 0xcafe4a11)
    }
    fn unmount(&self) {
        let st = Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(st.success());
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if self.mounted() {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn bpffs_unmounted_under_the_daemon_keeps_forwarding_and_fails_clearly() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let lab = Lab::new().unwrap();
    let g = lab
        .add_ipv4_guests(&[("bf1", "10.65.0.1/24"), ("bf2", "10.65.0.2/24")])
        .unwrap();
    // A bpffs of this test's own (never the machine's /sys/fs/bpf).
    let fs = PrivateBpffs::mount(lab.work_dir().join("bpffs"));
    let pin_dir = fs.0.join("kvnet");
    let k = Kvnet::start_at(&lab, &kvnet_bin().unwrap(), &pin_dir, &[], &[]).unwrap();
    k.cli(&["net", "add", "bf"]).unwrap();
    k.cli(&["port", "add", "bf", "bf1"]).unwrap();
    k.cli(&["port", "add", "bf", "bf2"]).unwrap();
    assert!(g[0].ping("10.65.0.2"), "positive control");
    let status = k.json(&["status"]).unwrap();
    assert!(
        !status["programs"].as_array().unwrap().is_empty(),
        "positive control: status lists the pinned programs: {status}"
    );
    assert_eq!(status["pin_dir"], pin_dir.to_str().unwrap());

    fs.unmount();
    assert!(!pin_dir.exists(), "the pins are out of sight");
    // The datapath does not depend on the pins: the daemon holds it.
    let ping = BgPing::start(&lab, &g[0].ns, "10.65.0.2", "bpffs");
    assert!(
        g[1].ping("10.65.0.1"),
        "forwarding stopped with the bpffs unmounted"
    );
    // The daemon keeps serving and reports the pins gone: in its log and
    // in `kvnet status`.
    wait_until(
        "the log says the pins are gone",
        Duration::from_secs(5),
        || k.daemon_log().contains("are gone (bpffs unmounted?)"),
    );
    let status = k.json(&["status"]).unwrap();
    assert_eq!(status["programs"], serde_json::json!([]), "{status}");
    assert_eq!(status["ports"], 2, "{status}");
    // What needs the pin folder fails with an error naming it, or works.
    let extra = lab.add_guest_with("bf3", Some("10.65.0.3/24")).unwrap();
    extra.disable_ipv6().unwrap();
    let added = k.try_cli(&["port", "add", "bf", "bf3"]).unwrap();
    let err = String::from_utf8_lossy(&added.stderr).into_owned();
    println!(
        "port add with the bpffs gone: {} {}",
        added.status,
        err.trim()
    );
    if added.status.success() {
        assert!(
            reaches(&extra.ns, "10.65.0.1", Duration::from_secs(5)),
            "a port added without pins forwards"
        );
    } else {
        assert!(!err.trim().is_empty(), "a failure says why");
    }
    assert!(k.daemon_running(), "{}", k.daemon_log());
    let (sent, received) = ping.finish();
    assert!(
        sent > 0 && received == sent,
        "pings lost with the bpffs unmounted: {received}/{sent}"
    );
    // Stopped, the daemon leaves the datapath attached (the programs are
    // on the interfaces, not in the pins): forwarding goes on...
    let socket = k.socket().to_path_buf();
    k.stop().unwrap();
    assert!(g[0].ping("10.65.0.2"), "forwarding stopped with the daemon");
    // ...but a daemon started on the vanished pin folder refuses clearly:
    // its parent is no bpffs any more.
    let bin = kvnet_bin().unwrap();
    let (bin, socket) = (bin.to_str().unwrap(), socket.to_str().unwrap());
    let state = lab.work_dir().join("state");
    let (pins, state) = (pin_dir.to_str().unwrap(), state.to_str().unwrap());
    let out = lab
        .exec_output(
            lab.hv(),
            &[
                bin,
                "--socket",
                socket,
                "daemon",
                "--pin-dir",
                pins,
                "--state-dir",
                state,
            ],
        )
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("is not on a bpffs"), "{err}");
    // The way back the log names: a bpffs again, `kvnet down` (which
    // finds the programs on the interfaces), a fresh start.
    let fs2 = PrivateBpffs::mount(fs.0.clone());
    let down = lab
        .exec_output(
            lab.hv(),
            &[
                bin,
                "--socket",
                socket,
                "down",
                "--pin-dir",
                pins,
                "--state-dir",
                state,
            ],
        )
        .unwrap();
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let net = lab.sh(lab.hv(), "bpftool net show").unwrap();
    assert!(!net.contains("kvnet"), "programs left after down:\n{net}");
    assert!(
        g[0].ping_unanswered("10.65.0.2"),
        "still forwarding after down"
    );
    let k = Kvnet::start_at(&lab, &kvnet_bin().unwrap(), &pin_dir, &[], &[]).unwrap();
    k.cli(&["net", "add", "bf"]).unwrap();
    k.cli(&["port", "add", "bf", "bf1"]).unwrap();
    k.cli(&["port", "add", "bf", "bf2"]).unwrap();
    assert!(g[0].ping("10.65.0.2"), "no forwarding after the rebuild");
    k.cli(&["down"]).unwrap();
    drop(fs2);
    soak_line("bpffs-unmounted", 1, &[], started);
}

/// The first, middle and last of the `n` synthetic flows `kvnet-bench
/// ctfill` writes (10.128.x.y:40000 -> 203.0.113.1:443, TCP), as bpftool
/// key bytes (addresses in network order, ports in host order).
fn synthetic_keys(n: u32) -> Vec<String> {
    [0, n / 4, n / 2 - 1]
        .iter()
        .map(|i| {
            let s = (0x0a80_0000u32 + i).to_be_bytes();
            let k = [
                s[0], s[1], s[2], s[3], 203, 0, 113, 1, 0x40, 0x9c, 0xbb, 0x01, 6, 0, 0, 0,
            ];
            k.iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// Entries in the pinned conntrack map (`bpftool map dump` key lines).
fn ct_entries(ct: &Path) -> usize {
    let o = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "bpftool map dump pinned {} | grep -c '^key'",
            ct.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn kill_9_under_4_tcp_streams_with_100k_conntrack_entries_loses_no_flow() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let bench = kvnet_bin().unwrap().with_file_name("kvnet-bench");
    assert!(
        bench.exists(),
        "{} missing: `cargo build --release -p kvnet-userspace` builds it",
        bench.display()
    );
    const SYNTHETIC: u32 = 100_000;
    let rounds = scale(1, 10);
    let n = nat_lab::nat_lab_with(1, &[], &[], &[]);
    let g = &n.guests[0];
    let mut k = Some(n.k);
    let ct = n.lab.pin_dir().join("ct");
    let fill = Command::new(&bench)
        .arg("ctfill")
        .arg(n.lab.pin_dir())
        .arg(SYNTHETIC.to_string())
        .output()
        .unwrap();
    assert!(
        fill.status.success(),
        "ctfill: {}",
        String::from_utf8_lossy(&fill.stderr)
    );
    let keys = synthetic_keys(SYNTHETIC);
    let present = |key: &str| {
        Command::new("sh")
            .arg("-c")
            .arg(format!(
                "bpftool map lookup pinned {} key {key}",
                ct.display()
            ))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        keys.iter().all(|k| present(k)),
        "positive control: the synthetic flows are found"
    );
    assert!(
        !present("1 2 3 4 5 6 7 8 9 10 11 12 6 0 0 0"),
        "positive control: a missing key is not"
    );
    let before = ct_entries(&ct);
    assert!(
        before >= SYNTHETIC as usize,
        "{before} entries after ctfill"
    );

    for round in 0..rounds {
        // 4 TCP streams from the guest through the NAT, paced well below
        // what the lab carries: a stall or reset is the restart's doing.
        let mut srv = Command::new("iperf3");
        srv.args(["-s", "-1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        n.lab.spawn(&n.out.ns, srv).unwrap();
        wait_until("iperf3 listening", Duration::from_secs(5), || {
            n.out
                .sh("ss -Hltn 'sport = :5201'")
                .is_ok_and(|s| !s.trim().is_empty())
        });
        let report = n.lab.work_dir().join(format!("iperf3-{round}.json"));
        let mut cli = Command::new("sh");
        cli.args([
            "-c",
            &format!(
                "iperf3 -c 198.51.100.2 -P 4 -t 6 -b 100M -J > {} 2>&1",
                report.display()
            ),
        ]);
        let client = n.lab.spawn(&g.ns, cli).unwrap();
        let kv = k.take().unwrap();
        wait_until("the 4 streams in conntrack", Duration::from_secs(8), || {
            let flows = kv.json(&["conntrack", "list", "nat"]).unwrap();
            flows
                .as_array()
                .unwrap()
                .iter()
                .filter(|f| f["orig"]["dport"] == 5201)
                .count()
                >= 5
        });
        let flows_before = kv.json(&["conntrack", "list", "nat"]).unwrap();
        kv.kill().unwrap();
        assert!(client.is_running(), "the transfer ended before the kill");
        let restarted = Kvnet::start(&n.lab).unwrap();
        let log = restarted.daemon_log();
        assert!(log.contains("adopted the running datapath"), "{log}");
        let flows_after = restarted.json(&["conntrack", "list", "nat"]).unwrap();
        let key = |v: &Value| -> BTreeSet<String> {
            v.as_array()
                .unwrap()
                .iter()
                .filter(|f| f["orig"]["dport"] == 5201)
                .map(|f| format!("{} {}", f["orig"], f["translated"]))
                .collect()
        };
        assert!(
            key(&flows_before).is_subset(&key(&flows_after)),
            "flows or translations lost: {flows_before} -> {flows_after}"
        );
        let st = client.wait_timeout(Duration::from_secs(30)).unwrap();
        let text = std::fs::read_to_string(&report).unwrap_or_default();
        assert!(st.is_some_and(|s| s.success()), "iperf3 failed:\n{text}");
        let j: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        assert!(j.get("error").is_none(), "iperf3: {}", j["error"]);
        let streams = j["end"]["streams"].as_array().unwrap();
        assert_eq!(streams.len(), 4, "{}", j["end"]);
        for s in streams {
            let r = &s["receiver"];
            assert!(
                r["seconds"].as_f64().unwrap_or(0.0) >= 5.5
                    && r["bytes"].as_u64().unwrap_or(0) > 1_000_000,
                "a stream did not complete: {s}"
            );
        }
        k = Some(restarted);
    }
    // Every synthetic entry survived the kills and adoptions (the GC keeps
    // established flows).
    let mut leaks = Vec::new();
    let after = ct_entries(&ct);
    if !keys.iter().all(|k| present(k)) || after < SYNTHETIC as usize {
        leaks.push(format!("conntrack entries {before} -> {after}"));
    }
    soak_line("kill9-100k-ct", rounds, &leaks, started);
    assert!(leaks.is_empty(), "{leaks:?}");
    let k = k.unwrap();
    assert!(k.daemon_running());
}
