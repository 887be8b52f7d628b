//! Issue 22: upgrade in place. A daemon of this version takes over a
//! datapath pinned by an OLDER kvnet (`$KVNET_OLD_BIN`, built by `cargo
//! xtask upgrade-test` from the last revision with the previous map layout)
//! whose maps are laid out differently, without losing a flow; a takeover
//! that fails half way puts the older datapath back as it was.
//!
//! The same scenario as restart.rs's kill -9 test, but the first daemon is
//! the old binary and the second this one. Without `KVNET_OLD_BIN` (the
//! ordinary end-to-end phase) the tests say why and return.
use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    kvnet::{endpoint, flow, Kvnet},
    lab::privileged,
    mac_fmt, Proc,
};
use serde_json::Value;

#[path = "support/libvirt_nat.rs"]
mod libvirt_nat;
use libvirt_nat::*;

/// The uplink's address: what guests are translated to, where port
/// forwards listen.
const UPLINK_IP: &str = "198.51.100.1";
const GUEST1_IP: &str = "192.168.122.13";
const GATEWAY_IP: &str = "192.168.122.1";
/// The port forward: UPLINK_IP:FWD_PORT -> guest2:GUEST2_ECHO.
const FWD_PORT: u16 = 2222;
const GUEST2_ECHO: u16 = 5002;
/// A UDP sink in the outside namespace, for the source-address checks.
const SINK_PORT: u16 = 9999;
/// This version's map layout (kvnet_common::LAYOUT_VERSION).
const LAYOUT: u32 = 4;

/// What the daemon says when it upgraded from the old datapath's layout.
fn upgraded(old: &Shape) -> String {
    format!(
        "upgraded the running datapath from layout {} to layout {LAYOUT}",
        old.layout
    )
}

/// The older kvnet binary, from `KVNET_OLD_BIN`; `None` (after saying why)
/// when unset or not root. Set but missing is an error, not a skip.
fn old_bin() -> Option<PathBuf> {
    if !privileged() {
        return None;
    }
    let Some(p) = std::env::var_os("KVNET_OLD_BIN") else {
        eprintln!(
            "upgrade: KVNET_OLD_BIN is not set, skipping (run `cargo xtask upgrade-test`, \
             which builds the previous release and sets it)"
        );
        return None;
    };
    let p = PathBuf::from(p);
    assert!(p.is_file(), "KVNET_OLD_BIN={} does not exist", p.display());
    Some(p)
}

fn head_bin() -> PathBuf {
    kvnet_tests::kvnet::kvnet_bin().unwrap()
}

/// Polls `f` every 50 ms until it holds or `t` passes; whether it held.
fn wait_for(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + t;
    loop {
        if f() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Both of two pings answered.
fn ping_ok(ns: &str, ip: &str) -> bool {
    kvnet_tests::lab::ping(ns, ip)
}

/// The old daemon, started like `start_with_config` starts this one: the
/// imported libvirt network applied through the old CLI.
fn start_old_with_config(l: &LibvirtLab, old: &Path) -> Kvnet {
    let k = Kvnet::start_bin(&l.lab, old, &[], &[]).unwrap();
    let out = k.cli(&["apply", path(&l.config)]).unwrap();
    assert!(
        out.contains("+ network default"),
        "the old kvnet did not load the config: {out}"
    );
    k
}

// ---- pins and attached programs

fn pin(l: &LibvirtLab, name: &str) -> PathBuf {
    l.lab.pin_dir().join(name)
}

/// `bpftool map show pinned PATH -j`, or `None` if nothing is pinned there.
fn pinned_map(l: &LibvirtLab, name: &str) -> Option<Value> {
    let p = pin(l, name);
    let o = l
        .lab
        .exec_output(
            l.lab.hv(),
            &["bpftool", "-j", "map", "show", "pinned", path(&p)],
        )
        .unwrap();
    if !o.status.success() {
        return None;
    }
    Some(serde_json::from_slice(&o.stdout).unwrap())
}

/// The value size of a pinned map.
fn value_size(l: &LibvirtLab, name: &str) -> u64 {
    let m = pinned_map(l, name).unwrap_or_else(|| panic!("no pinned map `{name}`"));
    m["bytes_value"].as_u64().unwrap_or_else(|| panic!("{m}"))
}

/// What tells the pinned datapath's layout: its version (1: no `layout`
/// map, the first edition) and the value sizes of maps that changed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Shape {
    layout: u32,
    ports: u64,
    nat_stats: u64,
    port_stats: u64,
    flood: u64,
}

fn shape(l: &LibvirtLab) -> Shape {
    Shape {
        layout: if pin(l, "layout").exists() {
            layout_version(l)
        } else {
            1
        },
        ports: value_size(l, "ports"),
        nat_stats: value_size(l, "nat_stats"),
        port_stats: value_size(l, "port_stats"),
        flood: value_size(l, "flood"),
    }
}

/// The version in the pinned `layout` map (key 0, a little-endian u32).
fn layout_version(l: &LibvirtLab) -> u32 {
    let p = pin(l, "layout");
    let dump = l
        .lab
        .sh(
            l.lab.hv(),
            &format!("bpftool -j map dump pinned {}", p.display()),
        )
        .unwrap();
    let v: Value = serde_json::from_str(&dump).unwrap();
    let bytes: Vec<u8> = v[0]["value"]
        .as_array()
        .unwrap_or_else(|| panic!("layout map: {dump}"))
        .iter()
        .map(|b| {
            let s = b.as_str().unwrap_or_default().trim_start_matches("0x");
            u8::from_str_radix(s, 16).unwrap_or_else(|_| panic!("layout map: {dump}"))
        })
        .collect();
    u32::from_le_bytes(bytes[..4].try_into().unwrap())
}

/// The old datapath's pins, untouched: the shape they had under the old
/// daemon, an older layout than this version's, nothing moved aside under
/// `previous/`.
fn assert_old_pins(l: &LibvirtLab, old: &Shape, when: &str) {
    assert_eq!(&shape(l), old, "{when}: the pinned maps changed shape");
    assert!(old.layout < LAYOUT, "{when}: not an older layout: {old:?}");
    assert!(
        !pin(l, "previous").exists(),
        "{when}: old pins left under previous/"
    );
}

/// Every program attached in the hv namespace (`bpftool net show`):
/// "DEV HOOK NAME" -> program id.
fn attached(l: &LibvirtLab) -> BTreeMap<String, u64> {
    let out = l.lab.sh(l.lab.hv(), "bpftool -j net show").unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    let mut m = BTreeMap::new();
    for section in v.as_array().unwrap() {
        for hook in ["xdp", "tc"] {
            for e in section[hook].as_array().into_iter().flatten() {
                let id = e["id"].as_u64().or_else(|| e["prog_id"].as_u64());
                let Some(id) = id else { continue };
                let how = e["kind"]
                    .as_str()
                    .or_else(|| e["mode"].as_str())
                    .unwrap_or(hook);
                let name = e["name"].as_str().unwrap_or("");
                let key = format!("{} {hook}:{how} {name}", e["devname"].as_str().unwrap());
                m.insert(key, id);
            }
        }
    }
    m
}

// ---- the NAT transfer

/// A 'iperf3 -t SECS' from guest1 to the outside, through the NAT.
struct Transfer {
    client: Proc,
    report: PathBuf,
    secs: f64,
}

/// Starts the transfer and returns once conntrack shows both its
/// connections with data moving; also returns those flows (orig,
/// translated).
fn start_transfer(l: &LibvirtLab, k: &Kvnet, secs: u32) -> (Transfer, BTreeSet<(String, String)>) {
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", OUTSIDE_IP])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    l.lab.spawn(&l.out.ns, srv).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || l
            .out
            .sh("ss -Hltn 'sport = :5201'")
            .is_ok_and(|s| !s.trim().is_empty())),
        "iperf3 server did not listen"
    );
    let report = l.lab.work_dir().join("iperf3.json");
    let mut cli = Command::new("sh");
    cli.args([
        "-c",
        &format!(
            "iperf3 -c {OUTSIDE_IP} -t {secs} -J > {} 2>&1",
            report.display()
        ),
    ]);
    let client = l.lab.spawn(&l.guests[0].ns, cli).unwrap();
    let mut flows = Value::Null;
    let moving = wait_for(Duration::from_secs(5), || {
        flows = k.json(&["conntrack", "list", "default"]).unwrap();
        let f = iperf_rows(&flows);
        f.len() == 2
            && f.iter()
                .any(|r| r["bytes"].as_u64().unwrap_or(0) > 1_000_000)
    });
    assert!(moving, "iperf3's two connections moving data: {flows}");
    let t = Transfer {
        client,
        report,
        secs: secs as f64,
    };
    (t, iperf_flows(&flows))
}

/// iperf3's control and data connections in a conntrack listing.
fn iperf_rows(v: &Value) -> Vec<Value> {
    v.as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            let orig = flow(&r["orig"]);
            orig.starts_with(&format!("{GUEST1_IP}:")) && orig.ends_with(":5201")
        })
        .cloned()
        .collect()
}

/// Both directions of a conntrack row as text, whichever kvnet listed it.
fn row_flows(r: &Value) -> (String, String) {
    (flow(&r["orig"]), flow(&r["translated"]))
}

fn iperf_flows(v: &Value) -> BTreeSet<(String, String)> {
    iperf_rows(v).iter().map(row_flows).collect()
}

/// (proto, port, target) of a forward listing, whichever kvnet listed it.
fn forwards(v: &Value) -> Vec<(String, String, String)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["proto"].to_string(),
                f["port"].to_string(),
                endpoint(&f["to"]),
            )
        })
        .collect()
}

/// Waits for the transfer to end: it must succeed, last its full time and
/// have no interval without traffic.
fn finish_transfer(t: Transfer) {
    let st = t.client.wait_timeout(Duration::from_secs(40)).unwrap();
    let text = fs::read_to_string(&t.report).unwrap_or_default();
    assert!(st.is_some_and(|s| s.success()), "iperf3 failed:\n{text}");
    let j: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(j.get("error").is_none(), "iperf3: {}", j["error"]);
    let secs = j["end"]["sum_received"]["seconds"].as_f64().unwrap();
    let bytes = j["end"]["sum_received"]["bytes"].as_f64().unwrap();
    assert!(
        secs >= t.secs - 0.5 && bytes > 1e6,
        "{secs} s, {bytes} bytes"
    );
    let intervals = j["intervals"].as_array().unwrap();
    assert!(intervals.len() as f64 >= t.secs - 0.5, "{intervals:?}");
    for iv in intervals {
        assert!(
            iv["sum"]["bytes"].as_f64().unwrap() > 0.0,
            "a stalled second: {iv}"
        );
    }
}

// ---- port forward

/// A TCP connection from the outside through the port forward, held open
/// across the upgrade: one echo round trip at once ("before ok"), one more
/// when `trigger` appears ("after ok").
struct HeldConnection {
    log: PathBuf,
    trigger: PathBuf,
}

impl HeldConnection {
    fn open(l: &LibvirtLab) -> HeldConnection {
        let log = l.lab.work_dir().join("held.log");
        let trigger = l.lab.work_dir().join("held.go");
        let code = format!(
            r#"
import os, socket, time
s = socket.create_connection(("{UPLINK_IP}", {FWD_PORT}), timeout=5)
def rt(b):
    s.sendall(b)
    got = b""
    while len(got) < len(b):
        d = s.recv(65536)
        if not d: break
        got += d
    return "ok" if got == b else "short %d" % len(got)
print("before", rt(b"b" * 4000), flush=True)
while not os.path.exists("{trigger}"):
    time.sleep(0.05)
print("after", rt(b"a" * 4000), flush=True)
"#,
            trigger = trigger.display()
        );
        let mut cmd = Command::new("python3");
        cmd.args(["-c", &code])
            .stdout(fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ));
        l.lab.spawn(&l.out.ns, cmd).unwrap();
        let h = HeldConnection { log, trigger };
        assert!(
            wait_for(Duration::from_secs(8), || h.output().contains("before ok")),
            "held connection through the forward: {}",
            h.output()
        );
        h
    }

    fn output(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The second round trip, on the same connection.
    fn round_trip_again(&self) {
        fs::write(&self.trigger, "").unwrap();
        assert!(
            wait_for(Duration::from_secs(8), || self.output().contains("after ")),
            "held connection: no second round trip: {}",
            self.output()
        );
        assert!(
            self.output().contains("after ok"),
            "held connection after the upgrade: {}",
            self.output()
        );
    }
}

/// A fresh connection through the forward: "tcp N" when it echoed all.
fn via_forward(l: &LibvirtLab) -> String {
    tcp_echo(&l.out.ns, UPLINK_IP, FWD_PORT, 50_000)
}

// ---- source addresses (port security)

/// A UDP sink on SINK_PORT in the outside namespace, writing "SRC PAYLOAD"
/// lines to the returned file.
fn udp_sink(l: &LibvirtLab) -> PathBuf {
    let log = l.lab.work_dir().join("udp-sink.log");
    let code = format!(
        r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.bind(("0.0.0.0", {SINK_PORT}))
with open("{log}", "a") as f:
    while True:
        d, a = u.recvfrom(2048)
        f.write("%s %s\n" % (a[0], d.decode(errors="replace"))); f.flush()
"#,
        log = log.display()
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &code])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    l.lab.spawn(&l.out.ns, cmd).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || l
            .out
            .sh(&format!("ss -Hlun 'sport = :{SINK_PORT}'"))
            .is_ok_and(|s| !s.trim().is_empty())),
        "UDP sink did not start"
    );
    log
}

/// Sends UDP datagrams with a source address of our choosing from guest
/// `ns` to the outside's sink, through the guest's routing (gateway MAC,
/// its own source MAC): a raw IPv4 socket with a hand-built header.
/// `sends`: (source address, source port, payload), each sent 3 times.
fn send_udp_from(ns: &str, sends: &[(&str, u16, &str)]) {
    let list: Vec<String> = sends
        .iter()
        .map(|(src, sport, m)| format!("({src:?}, {sport}, {m:?})"))
        .collect();
    let out = py(
        ns,
        &format!(
            r#"
import socket, struct
def csum(b):
    if len(b) % 2: b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16: s = (s & 0xffff) + (s >> 16)
    return ~s & 0xffff
dst = "{OUTSIDE_IP}"
r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for src, sport, msg in [{list}]:
    p = msg.encode()
    n = 8 + len(p)
    ph = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, n)
    c = csum(ph + struct.pack("!HHHH", sport, {SINK_PORT}, n, 0) + p) or 0xffff
    udp = struct.pack("!HHHH", sport, {SINK_PORT}, n, c) + p
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + n, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    for _ in range(3):
        r.sendto(ip + udp, (dst, 0))
print("sent")
"#,
            list = list.join(", ")
        ),
    );
    assert!(out.trim() == "sent", "raw UDP send from {ns}: {out}");
}

fn sink_lines(sink: &Path, marker: &str) -> Vec<String> {
    fs::read_to_string(sink)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.ends_with(&format!(" {marker}")))
        .map(String::from)
        .collect()
}

// ---- the tests

#[test]
fn an_old_datapath_is_upgraded_under_a_nat_transfer() {
    let Some(old) = old_bin() else { return };
    let l = libvirt_lab();
    let k = start_old_with_config(&l, &old);
    // The pins are the old layout's: what this test is about.
    let old_shape = shape(&l);
    assert_old_pins(&l, &old_shape, "under the old daemon");
    assert_eq!(dhcp(&l.lab, &l.guests[0], "g1"), GUEST1_IP);
    let ip2 = dhcp(&l.lab, &l.guests[1], "g2");
    let leases_before = leases(&k);
    assert_eq!(leases_before.len(), 2, "{leases_before:?}");
    let g2_mac = mac_fmt(&l.guests[1].mac);

    // A port forward to guest2, through the old CLI.
    echo_server(&l.lab, &l.guests[1].ns, GUEST2_ECHO).unwrap();
    k.cli(&[
        "forward",
        "add",
        "default",
        "--proto",
        "tcp",
        "--port",
        &FWD_PORT.to_string(),
        "--to",
        &format!("{ip2}:{GUEST2_ECHO}"),
    ])
    .unwrap();
    let forwards_before = forwards(&k.json(&["forward", "list", "default"]).unwrap());
    let r = via_forward(&l);
    assert!(
        r.contains("tcp 50000"),
        "port forward under the old daemon: {r}"
    );

    // Source addresses under the old datapath. Layout 1 had no port
    // security: a forged one leaves translated like the guest's own, the
    // control for the hostile check after the upgrade. Later layouts
    // refuse it already.
    let forged = if ip2 == "192.168.122.200" {
        "192.168.122.201"
    } else {
        "192.168.122.200"
    };
    let sink = udp_sink(&l);
    send_udp_from(
        &l.guests[0].ns,
        &[(forged, 40001, "old-forged"), (GUEST1_IP, 40003, "old-own")],
    );
    if old_shape.layout == 1 {
        assert!(
            wait_for(Duration::from_secs(5), || !sink_lines(&sink, "old-own")
                .is_empty()
                && !sink_lines(&sink, "old-forged").is_empty()),
            "control: under the old datapath both the own and the forged source arrive: {}",
            fs::read_to_string(&sink).unwrap_or_default()
        );
        assert!(
            sink_lines(&sink, "old-forged")
                .iter()
                .all(|l| l.starts_with(&format!("{UPLINK_IP} "))),
            "{:?}",
            sink_lines(&sink, "old-forged")
        );
    } else {
        assert!(
            wait_for(Duration::from_secs(5), || !sink_lines(&sink, "old-own")
                .is_empty()),
            "the own source arrives under the old datapath: {}",
            fs::read_to_string(&sink).unwrap_or_default()
        );
        assert!(
            sink_lines(&sink, "old-forged").is_empty(),
            "the old datapath's port security refuses the forged source"
        );
    }

    // A connection through the forward held open across the upgrade, and
    // 10 s of TCP from guest1 to the outside through the NAT.
    let held = HeldConnection::open(&l);
    let (transfer, iperf_before) = start_transfer(&l, &k, 10);
    let ct_before = k.json(&["conntrack", "list", "default"]).unwrap();
    let dnat_before: BTreeSet<(String, String)> = ct_before
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dnat"] == true && r["state"] == "established")
        .map(row_flows)
        .collect();
    assert_eq!(
        dnat_before.len(),
        1,
        "the held connection in conntrack: {ct_before}"
    );
    assert_eq!(
        k.fdb_port_of("default", &kvnet_tests::mac_parse(GUEST1_MAC).unwrap()),
        Some("vnet0".to_string())
    );
    assert_eq!(
        k.fdb_port_of("default", &l.guests[1].mac),
        Some("vnet1".to_string())
    );
    let progs_before = attached(&l);
    assert!(
        progs_before.keys().any(|p| p.starts_with("vnet0 "))
            && progs_before.keys().any(|p| p.starts_with("vnet1 ")),
        "{progs_before:?}"
    );

    // The old daemon stops; its datapath keeps forwarding.
    k.stop().unwrap();
    assert!(
        ping_ok(&l.guests[1].ns, OUTSIDE_IP),
        "no forwarding without the daemon"
    );

    // This version takes over and upgrades.
    let t0 = Instant::now();
    let k = Kvnet::start(&l.lab).unwrap();
    let took = t0.elapsed();
    let log = k.daemon_log();
    assert!(
        log.contains(&upgraded(&old_shape)) && log.contains("adopted the running datapath"),
        "{log}"
    );
    assert!(took < Duration::from_secs(10), "the upgrade took {took:?}");
    assert!(
        transfer.client.is_running(),
        "iperf3 ended during the upgrade"
    );
    assert_eq!(layout_version(&l), LAYOUT, "the pinned `layout` map");
    let new_shape = shape(&l);
    assert!(
        Shape {
            layout: old_shape.layout,
            ..new_shape.clone()
        } != old_shape,
        "the maps still have the old layout's sizes: {new_shape:?}"
    );
    assert!(
        !pin(&l, "previous").exists(),
        "old pins left under previous/"
    );
    let progs_after = attached(&l);
    eprintln!(
        "upgrade: took {took:?}; maps {old_shape:?} -> {new_shape:?}; programs {progs_before:?} -> {progs_after:?}"
    );
    assert_eq!(
        progs_after.keys().collect::<Vec<_>>(),
        progs_before.keys().collect::<Vec<_>>(),
        "the same hooks, each with a program"
    );
    for (hook, id) in &progs_before {
        assert_ne!(
            progs_after[hook], *id,
            "{hook}: still the old program ({progs_after:?})"
        );
    }

    // The state came over: flows with their translations, MACs, leases,
    // ports, the forward.
    let ct = k.json(&["conntrack", "list", "default"]).unwrap();
    assert_eq!(
        iperf_flows(&ct),
        iperf_before,
        "iperf3's flows and their translations after the upgrade: {ct}"
    );
    let dnat: BTreeSet<(String, String)> = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["dnat"] == true)
        .map(row_flows)
        .collect();
    assert!(
        dnat_before.is_subset(&dnat),
        "the held connection's flow after the upgrade: {ct}"
    );
    let fdb = k.fdb("default");
    for (mac, port) in [(GUEST1_MAC, "vnet0"), (g2_mac.as_str(), "vnet1")] {
        assert!(
            fdb.iter().any(|e| e["mac"] == mac && e["port"] == port),
            "{mac} on {port} in the FDB after the upgrade: {fdb:?}"
        );
    }
    assert_eq!(leases(&k), leases_before, "DHCP leases after the upgrade");
    assert_eq!(k.json(&["net", "show", "default"]).unwrap()["mode"], "nat");
    assert_eq!(
        k.json(&["port", "list"]).unwrap().as_array().unwrap().len(),
        3,
        "2 guests + gateway"
    );
    assert_eq!(
        forwards(&k.json(&["forward", "list", "default"]).unwrap()),
        forwards_before,
        "port forwards after the upgrade"
    );

    // The carried-over guests are guarded by this version's port security,
    // bound to the address they were using (their lease), before any new
    // DHCP exchange could bind them.
    for (iface, mac, ip) in [
        ("vnet0", GUEST1_MAC, GUEST1_IP),
        ("vnet1", g2_mac.as_str(), ip2.as_str()),
    ] {
        let show = k.json(&["port", "show", iface]).unwrap();
        assert!(
            show["security"] == "mac+ip"
                && show["macs"] == serde_json::json!([mac])
                && show["ips"] == serde_json::json!([ip]),
            "{iface} after the upgrade: {show}"
        );
    }
    // Hostile: guest1 forges its source: an unleased address (the very
    // flow that went out under the old datapath, still in conntrack, and a
    // fresh one) and guest2's address. None reaches the outside; guest1's
    // own address, sent the same way right after, does.
    let spoof_before = k.port_drops("vnet0", "ip_spoof");
    send_udp_from(
        &l.guests[0].ns,
        &[
            (forged, 40001, "new-forged-kept-flow"),
            (forged, 40002, "new-forged"),
            (ip2.as_str(), 40004, "new-forged-guest2"),
            (GUEST1_IP, 40005, "new-own"),
        ],
    );
    assert!(
        wait_for(Duration::from_secs(5), || !sink_lines(&sink, "new-own")
            .is_empty()),
        "control: guest1's own address no longer reaches the outside: {}",
        fs::read_to_string(&sink).unwrap_or_default()
    );
    let dropped = wait_for(Duration::from_secs(5), || {
        k.port_drops("vnet0", "ip_spoof") >= spoof_before + 9
    });
    eprintln!(
        "upgrade: ip_spoof on vnet0 {spoof_before} -> {}; the sink got:\n{}",
        k.port_drops("vnet0", "ip_spoof"),
        fs::read_to_string(&sink).unwrap_or_default()
    );
    for m in ["new-forged-kept-flow", "new-forged", "new-forged-guest2"] {
        let got = sink_lines(&sink, m);
        assert!(
            got.is_empty(),
            "a forged source reached the outside: {got:?}"
        );
    }
    assert!(
        dropped,
        "9 forged datagrams counted as ip_spoof on vnet0: {} -> {}",
        spoof_before,
        k.port_drops("vnet0", "ip_spoof")
    );

    // The forward: the held connection goes on, a new one works.
    held.round_trip_again();
    let r = via_forward(&l);
    assert!(
        r.contains("tcp 50000"),
        "port forward after the upgrade: {r}"
    );

    // The transfer finishes, without a reset or a stalled second.
    finish_transfer(transfer);

    // The upgraded daemon serves DHCP from the carried leases.
    assert_eq!(dhcp(&l.lab, &l.guests[0], "g1b"), GUEST1_IP);
    assert_eq!(dhcp(&l.lab, &l.guests[1], "g2b"), ip2);
    assert!(
        ping_ok(&l.guests[0].ns, OUTSIDE_IP),
        "guest1 after renewing"
    );

    down_and_check(&l, &k);
}

#[test]
fn a_takeover_that_fails_half_way_leaves_the_old_datapath_forwarding() {
    let Some(old) = old_bin() else { return };
    let head = head_bin();
    let l = libvirt_lab();
    let k = start_old_with_config(&l, &old);
    let old_shape = shape(&l);
    assert_old_pins(&l, &old_shape, "under the old daemon");
    assert_eq!(dhcp(&l.lab, &l.guests[0], "g1"), GUEST1_IP);
    dhcp(&l.lab, &l.guests[1], "g2");
    let g2_mac = mac_fmt(&l.guests[1].mac);
    // Long enough for three takeovers on a loaded two-core machine (each
    // about 4 s in CI, up to 10 s with other builds running).
    let (transfer, _) = start_transfer(&l, &k, 30);
    let progs_before = attached(&l);
    assert!(
        ping_ok(&l.guests[0].ns, GATEWAY_IP),
        "control: guest1 reaches its gateway under the old daemon"
    );
    k.stop().unwrap();

    // Takeovers failing at each step: swap (the first interface already
    // has the new program), convert (maps converted, no interface touched)
    // and commit (every interface swapped, old pins not yet removed).
    for step in ["swap", "convert", "commit"] {
        let t0 = Instant::now();
        let failed = Kvnet::start_must_fail(
            &l.lab,
            &head,
            &[],
            &[("KVNET_FAIL_TAKEOVER", step)],
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("KVNET_FAIL_TAKEOVER={step}: {e:#}"));
        eprintln!(
            "upgrade: the takeover failing at '{step}' took {:?}",
            t0.elapsed()
        );
        let err = failed.log;
        assert!(
            err.contains(step) && err.contains("rolled back"),
            "KVNET_FAIL_TAKEOVER={step}: {}:\n{err}",
            failed.status
        );
        assert!(
            !err.contains(&upgraded(&old_shape)),
            "KVNET_FAIL_TAKEOVER={step} says it upgraded:\n{err}"
        );
        assert_old_pins(&l, &old_shape, &format!("after the failed '{step}'"));
        let why = |what: &str| {
            format!(
                "after the failed '{step}': {what}\nprograms now {:?}\nbefore {progs_before:?}\nits log:\n{err}",
                attached(&l)
            )
        };
        // On the wire: through the NAT (guest -> uplink) and to the host
        // (the gateway's port gets the host's replies to the guests).
        assert!(
            ping_ok(&l.guests[1].ns, OUTSIDE_IP),
            "{}",
            why("guest2 does not reach the outside")
        );
        assert!(
            ping_ok(&l.guests[0].ns, GATEWAY_IP),
            "{}",
            why("guest1 does not reach its gateway")
        );
        assert!(
            attached(&l) == progs_before,
            "{}",
            why("not the old programs on every interface")
        );
        assert!(
            transfer.client.is_running(),
            "iperf3 ended before the failed '{step}' was checked: lengthen it"
        );
    }
    // The transfer went on through all three, without a stalled second.
    finish_transfer(transfer);
    assert!(
        ping_ok(&l.guests[0].ns, OUTSIDE_IP),
        "guest1 after the transfer"
    );

    // The rolled-back datapath is the old kvnet's again: it adopts it.
    let k = Kvnet::start_bin(&l.lab, &old, &[], &[]).unwrap();
    assert!(
        k.daemon_log().contains("adopted the running datapath"),
        "the old kvnet after the rollbacks: {}",
        k.daemon_log()
    );
    let fdb = k.fdb("default");
    for (mac, port) in [(GUEST1_MAC.to_string(), "vnet0"), (g2_mac, "vnet1")] {
        assert!(
            fdb.iter()
                .any(|e| e["mac"] == mac.as_str() && e["port"] == port),
            "{mac} on {port} in the old kvnet's FDB after the rollbacks: {fdb:?}"
        );
    }
    k.stop().unwrap();

    // Without the failure, this version upgrades.
    let k = Kvnet::start_bin(&l.lab, &head, &[], &[]).unwrap();
    assert!(
        k.daemon_log().contains(&upgraded(&old_shape)),
        "{}",
        k.daemon_log()
    );
    assert_eq!(layout_version(&l), LAYOUT, "the pinned `layout` map");
    assert!(
        ping_ok(&l.guests[0].ns, OUTSIDE_IP),
        "guest1 after the upgrade"
    );
    assert!(
        ping_ok(&l.guests[1].ns, OUTSIDE_IP),
        "guest2 after the upgrade"
    );
    echo_server(&l.lab, &l.out.ns, 5001).unwrap();
    let r = tcp_echo(&l.guests[0].ns, OUTSIDE_IP, 5001, 50_000);
    assert!(r.contains("tcp 50000"), "{r}");

    down_and_check(&l, &k);
}

/// `kvnet down`: no program, pin, gateway or forwarding left.
fn down_and_check(l: &LibvirtLab, k: &Kvnet) {
    assert!(ping_ok(&l.guests[0].ns, OUTSIDE_IP), "control before down");
    k.cli(&["down"]).unwrap();
    let hv = l.lab.hv().to_string();
    let net = l.lab.sh(&hv, "bpftool net show").unwrap();
    assert!(!net.contains("kvnet"), "programs left:\n{net}");
    assert!(!l.lab.pin_dir().exists(), "pins left");
    assert!(
        !l.lab
            .exec_output(&hv, &["ip", "link", "show", "virbr0"])
            .unwrap()
            .status
            .success(),
        "gateway left"
    );
    assert!(
        kvnet_tests::lab::ping_unanswered(&l.guests[0].ns, OUTSIDE_IP),
        "still forwarding after down"
    );
}
