//! Issue: NAT. Masquerade with conntrack in the fast path, port forwards,
//! ICMP errors and PMTUD through the translation, table limits.
use std::{
    collections::BTreeSet,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::inject::{eth_frame_vlan, inject, mac_fmt, mac_parse};
use kvnet_tests::{kvnet::flow, lab::privileged, tools, Capture, Frame, Lab};
use serde_json::Value;
use tools::{echo_server, py};

const UPLINK_IP: [u8; 4] = [198, 51, 100, 1];

#[path = "support/nat_lab.rs"]
mod nat_lab;
use nat_lab::{nat_lab_with, Nat};

/// The NAT lab with conntrack timeouts 100x shorter, for the daemon only.
fn nat_lab(n: usize, daemon_args: &[&str]) -> Nat {
    nat_lab_with(n, daemon_args, &[("KVNET_CT_TIME_SCALE", "100")], &[])
}

/// The MAC of the NAT network's gateway interface (kvnet-nat).
fn gateway_mac(t: &Nat) -> [u8; 6] {
    let link = t.lab.sh(t.lab.hv(), "ip -br link show kvnet-nat").unwrap();
    mac_parse(link.split_whitespace().nth(2).unwrap()).unwrap()
}

fn ipv4_src(f: &Frame) -> Option<[u8; 4]> {
    f.ipv4_addrs().map(|(s, _)| s)
}

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    sum
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// `python3 -c code args...` in `ns`, in the background, stdout and
/// stderr in `log`.
fn python_logged(
    lab: &Lab,
    ns: &str,
    code: &str,
    args: &[&std::ffi::OsStr],
    log: &std::path::Path,
) -> kvnet_tests::Proc {
    let mut c = Command::new("python3");
    c.args(["-c", code])
        .args(args)
        .stdout(std::fs::File::create(log).unwrap())
        .stderr(Stdio::from(
            std::fs::OpenOptions::new().append(true).open(log).unwrap(),
        ));
    lab.spawn(ns, c).unwrap()
}

/// Verifies the IPv4 header checksum and the TCP/UDP/ICMP checksum of a
/// captured frame (full checksums: the sender had offloads off).
fn checksums_ok(f: &Frame) -> bool {
    let d = &f.data;
    if d.len() < 34 || d[12..14] != [0x08, 0x00] {
        return true;
    }
    let ihl = (d[14] & 0xf) as usize * 4;
    let ip = &d[14..14 + ihl];
    if fold(sum16(ip, 0)) != 0xffff {
        return false;
    }
    let tot = u16::from_be_bytes([d[16], d[17]]) as usize;
    let l4 = &d[14 + ihl..(14 + tot).min(d.len())];
    match d[23] {
        1 => fold(sum16(l4, 0)) == 0xffff,
        6 | 17 => {
            if d[23] == 17 && l4.len() >= 8 && l4[6..8] == [0, 0] {
                return true;
            }
            let mut ph = Vec::new();
            ph.extend_from_slice(&d[26..34]);
            ph.extend_from_slice(&[0, d[23]]);
            ph.extend_from_slice(&(l4.len() as u16).to_be_bytes());
            fold(sum16(l4, sum16(&ph, 0))) == 0xffff
        }
        _ => true,
    }
}

#[test]
fn guests_reach_outside_services_behind_the_uplink_address() {
    if !privileged() {
        return;
    }
    let t = nat_lab(2, &[]);
    echo_server(&t.lab, &t.out.ns, 5000).unwrap();
    // Guest 0 with offloads off: every checksum on the wire must be right.
    t.guests[0]
        .sh("ethtool -K eth0 tx off >/dev/null 2>&1 || true")
        .unwrap();
    for (i, g) in t.guests.iter().enumerate() {
        let cap = Capture::start(&t.out.ns, "eth0").unwrap();
        assert_eq!(
            kvnet_tests::lab::ping_replies(&g.ns, "198.51.100.2", 3),
            3,
            "{}: every ping answered",
            g.hv_if
        );
        let r = py(
            &g.ns,
            r#"
import socket
s = socket.create_connection(("198.51.100.2", 5000), timeout=5); s.sendall(b"x" * 100000)
got = b""
while len(got) < 100000: got += s.recv(65536)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3)
u.sendto(b"ping-udp", ("198.51.100.2", 5000)); print("tcp", len(got), "udp", u.recvfrom(100)[0].decode())
"#,
        );
        assert!(r.contains("tcp 100000 udp ping-udp"), "{}: {r}", g.hv_if);
        let frames = cap.stop().unwrap();
        let from_hv: Vec<&Frame> = frames
            .iter()
            .filter(|f| f.src_mac() != t.out.mac && f.ipv4_addrs().is_some())
            .collect();
        assert!(from_hv.len() >= 10, "{} frames", from_hv.len());
        for f in &from_hv {
            assert_eq!(
                ipv4_src(f),
                Some(UPLINK_IP),
                "the outside sees only the uplink address: {f:?}"
            );
        }
        if i == 0 {
            // Offloads off: every translated frame carries valid checksums.
            let bad = from_hv.iter().filter(|f| !checksums_ok(f)).count();
            assert_eq!(bad, 0, "frames with bad checksums");
        }
    }
    // Guest 1 kept its default offloads (checksums completed by the
    // receiver's stack): the outside counted no bad checksum.
    for proto in ["Tcp", "Udp"] {
        assert_eq!(
            tools::snmp(&t.out.ns, proto, "InCsumErrors"),
            0,
            "{proto} checksum errors at the outside"
        );
    }

    let tcp_bulk = tools::iperf3(
        &t.lab,
        &t.out.ns,
        "198.51.100.2",
        &t.guests[1].ns,
        &["-t", "2"],
    )
    .unwrap();
    let (bytes, bps) = tools::received(&tcp_bulk);
    println!("NAT iperf3 guest -> outside: {:.2} Gbit/s", bps / 1e9);
    assert!(bytes > 10_000_000);
    let ct = t.k.json(&["conntrack", "list", "nat"]).unwrap();
    // Timeouts run 100x faster in these tests: the bulk flow is listed.
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|c| c["proto"] == "tcp" && c["translated"]["saddr"] == "198.51.100.1"),
        "{ct}"
    );
    let stats = t.k.json(&["stats"]).unwrap();
    assert!(
        stats["nat"][0]["translated"].as_u64().unwrap() > 100,
        "{stats}"
    );
}

#[test]
fn two_thousand_connections_get_distinct_ports_and_the_table_drains() {
    if !privileged() {
        return;
    }
    let t = nat_lab(3, &[]);
    echo_server(&t.lab, &t.out.ns, 5001).unwrap();
    // The host's own connections to the same server run throughout.
    let host_client = r#"
import socket, time
ok = 0
end = time.time() + 6
while time.time() < end:
    s = socket.create_connection(("198.51.100.2", 5001), timeout=10); s.sendall(b"host"); assert s.recv(10) == b"host"; s.close(); ok += 1
print("host-ok", ok)
"#;
    let mut hc = Command::new("python3");
    hc.args(["-c", host_client])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut host = t.lab.spawn(t.lab.hv(), hc).unwrap();
    let flag = t.lab.work_dir().join("close-now");
    // Each guest: 667 connections, each echoing its "hello" ("open N"
    // counts those that did), then closed on the flag.
    let client = r#"
import socket, sys, os, time
conns = []
for i in range(667):
    s = socket.create_connection(("198.51.100.2", 5001), timeout=10); conns.append(s)
for s in conns: s.sendall(b"hello")
okc = sum(1 for s in conns if s.recv(10) == b"hello")
print("open", okc, flush=True)
while not os.path.exists(sys.argv[1]): time.sleep(0.2)
for s in conns: s.close()
print("closed", flush=True)
"#;
    let mut clients = Vec::new();
    let mut logs = Vec::new();
    for g in &t.guests {
        let log = t.lab.work_dir().join(format!("clients-{}.log", g.hv_if));
        clients.push(python_logged(
            &t.lab,
            &g.ns,
            client,
            &[flag.as_os_str()],
            &log,
        ));
        logs.push(log);
    }
    // Wait until all 2001 connections are up (the table holds them).
    let deadline = Instant::now() + Duration::from_secs(60);
    let rows = loop {
        let ct = t.k.json(&["conntrack", "list", "nat"]).unwrap();
        let rows: Vec<Value> = ct
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["proto"] == "tcp" && r["state"] == "established")
            .cloned()
            .collect();
        if rows.len() >= 2001 {
            break rows;
        }
        assert!(
            Instant::now() < deadline,
            "only {} established flows",
            rows.len()
        );
        thread::sleep(Duration::from_millis(500));
    };
    let ports: BTreeSet<String> = rows
        .iter()
        .map(|r| format!("{}:{}", r["translated"]["saddr"], r["translated"]["sport"]))
        .collect();
    assert_eq!(
        ports.len(),
        rows.len(),
        "translated source ports are distinct"
    );
    for r in &rows {
        assert_eq!(r["translated"]["saddr"], "198.51.100.1", "{r}");
    }
    // Close them all; after the (shortened) timeouts the table drains.
    std::fs::write(&flag, b"").unwrap();
    for (c, log) in clients.iter().zip(&logs) {
        let st = c.wait_timeout(Duration::from_secs(30)).unwrap();
        let text = std::fs::read_to_string(log).unwrap_or_default();
        assert!(
            st.is_some_and(|s| s.success()),
            "a guest's connections failed: {text}"
        );
        // Every one of the 667 connections echoed, then all were closed.
        assert!(
            text.contains("open 667\n") && text.contains("closed"),
            "{}: {text}",
            log.display()
        );
    }
    let status = host.wait_timeout(Duration::from_secs(20)).unwrap();
    let mut out = String::new();
    use std::io::Read;
    host.stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    // Its traceback, if it failed, says why.
    if let Some(mut e) = host.stderr.take() {
        let _ = e.read_to_string(&mut out);
    }
    println!("host connections: {}", out.trim());
    let host_ok: u32 = out
        .split_whitespace()
        .skip_while(|w| *w != "host-ok")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        status.is_some_and(|s| s.success()) && host_ok >= 10,
        "host connections broke (each must echo; {host_ok} did in 6 s): {out}"
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let n =
            t.k.json(&["conntrack", "list", "nat"])
                .unwrap()
                .as_array()
                .unwrap()
                .len();
        if n == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{n} flows still in the table");
        thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn same_source_port_from_two_guests_gets_two_translations() {
    if !privileged() {
        return;
    }
    let t = nat_lab(2, &[]);
    echo_server(&t.lab, &t.out.ns, 5002).unwrap();
    let code = r#"
import socket
s = socket.socket(); s.bind(("0.0.0.0", 40000)); s.settimeout(5); s.connect(("198.51.100.2", 5002))
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 40000)); u.settimeout(3)
s.sendall(b"same"); u.sendto(b"same", ("198.51.100.2", 5002))
print(s.recv(10).decode(), u.recvfrom(10)[0].decode())
import time; time.sleep(1)
"#;
    let handles: Vec<_> = t
        .guests
        .iter()
        .map(|g| {
            let ns = g.ns.clone();
            thread::spawn(move || py(&ns, code))
        })
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert!(r.contains("same same"), "{r}");
    }
    let ct = t.k.json(&["conntrack", "list", "nat"]).unwrap();
    let tcp: Vec<String> = ct
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["proto"] == "tcp" && r["orig"]["sport"] == 40000)
        .map(|r| flow(&r["translated"]))
        .collect();
    assert_eq!(tcp.len(), 2, "{ct}");
    assert_ne!(tcp[0], tcp[1]);
}

#[test]
fn icmp_errors_and_pmtud_reach_guests_through_the_nat() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    let g = &t.guests[0];
    // The outside routes 203.0.113.0/24 onward: a packet arriving there with
    // TTL 1 gets "time exceeded" from 198.51.100.2.
    t.out
        .sh("sysctl -qw net.ipv4.ip_forward=1; ip route add 203.0.113.0/24 via 198.51.100.1")
        .unwrap();
    t.lab
        .sh(t.lab.hv(), "ip route add 203.0.113.0/24 via 198.51.100.2")
        .unwrap();
    let o = kvnet_tests::lab::exec_output(
        &g.ns,
        &["ping", "-c", "1", "-W", "3", "-t", "2", "203.0.113.5"],
    )
    .unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("198.51.100.2") && text.contains("Time to live exceeded"),
        "{text}"
    );
    // Port unreachable for a translated UDP flow.
    let r = py(
        &g.ns,
        r#"
import socket
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.settimeout(3); u.connect(("198.51.100.2", 9))
u.send(b"x")
try:
    u.recv(10); print("no error")
except ConnectionRefusedError:
    print("refused")
"#,
    );
    assert!(r.contains("refused"), "{r}");
    let icmp_errors = || {
        t.k.json(&["stats"]).unwrap()["nat"][0]["icmp_errors"]
            .as_u64()
            .unwrap()
    };
    let after_two = icmp_errors();
    assert!(
        after_two >= 2,
        "time exceeded and port unreachable: {after_two}"
    );

    // PMTUD: beyond the outside (a router) a far host sits behind a
    // 1280-byte link. It advertises the MSS of a 1500-byte path (advmss
    // 1460), as a server on an ordinary LAN behind such a link does, so the
    // guest's full-size segments (DF) reach the narrow link, the outside
    // answers "fragmentation needed, mtu 1280" to the uplink address, and
    // only the NAT's translation of that error back to the guest lets the
    // transfer finish. (A 1280 MTU on the far host itself would shrink the
    // MSS it advertises: no segment would ever be too big.)
    let far = t.lab.add_netns("far").unwrap();
    t.out
        .sh(&format!(
            "ip link add fx0 type veth peer name eth0 netns {far} && \
             ip link set fx0 mtu 1280 up && ip addr add 192.0.2.1/24 dev fx0"
        ))
        .unwrap();
    t.lab
        .sh(
            &far,
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 && \
             ip link set eth0 mtu 1280 up && ip addr add 192.0.2.2/24 dev eth0 && \
             ip route add default via 192.0.2.1 advmss 1460",
        )
        .unwrap();
    t.lab
        .sh(t.lab.hv(), "ip route add 192.0.2.0/24 via 198.51.100.2")
        .unwrap();
    let guest_route = || g.sh("ip route get 192.0.2.2").unwrap();
    assert!(
        !guest_route().contains("mtu 1280"),
        "precondition: the guest knows no smaller path MTU yet: {}",
        guest_route()
    );
    let v = tools::iperf3(&t.lab, &far, "192.0.2.2", &g.ns, &["-n", "5M"]).unwrap();
    assert!(
        v["end"]["sum_sent"]["bytes"].as_u64().unwrap_or(0) >= 5_000_000,
        "{v}"
    );
    // The guest learnt the path MTU from the translated error...
    assert!(
        guest_route().contains("mtu 1280"),
        "the guest's route to the far host has no learnt MTU: {}",
        guest_route()
    );
    // ...which the NAT counted.
    let after_pmtud = icmp_errors();
    assert!(
        after_pmtud > after_two,
        "no 'fragmentation needed' translated: icmp_errors {after_two} -> {after_pmtud}"
    );
}

#[test]
fn port_forwards_from_outside_and_from_other_guests() {
    if !privileged() {
        return;
    }
    let t = nat_lab(2, &[]);
    let www = t.lab.work_dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    std::fs::write(www.join("hello.txt"), "served by guest vm0\n").unwrap();
    let mut httpd = Command::new("busybox");
    httpd
        .args(["httpd", "-f", "-p", "22", "-h"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    t.lab.spawn(&t.guests[0].ns, httpd).unwrap();
    t.k.cli(&[
        "forward",
        "add",
        "nat",
        "--proto",
        "tcp",
        "--port",
        "2222",
        "--to",
        "10.50.0.11:22",
    ])
    .unwrap();
    let fl = t.k.json(&["forward", "list", "nat"]).unwrap();
    assert_eq!(
        fl[0]["to"],
        serde_json::json!({"addr": "10.50.0.11", "port": 22}),
        "{fl}"
    );
    let t0 = Instant::now();
    while !t.guests[0]
        .sh("ss -Hltn 'sport = :22'")
        .is_ok_and(|s| !s.trim().is_empty())
    {
        assert!(t0.elapsed() < Duration::from_secs(5), "httpd did not start");
        thread::sleep(Duration::from_millis(20));
    }
    let got = t
        .out
        .sh("busybox wget -q -O - http://198.51.100.1:2222/hello.txt")
        .unwrap();
    assert_eq!(got, "served by guest vm0\n");
    let got = t.guests[1]
        .sh("busybox wget -q -O - http://198.51.100.1:2222/hello.txt")
        .unwrap();
    assert_eq!(
        got, "served by guest vm0\n",
        "hairpin through the uplink address"
    );
    let ct = t.k.json(&["conntrack", "list", "nat"]).unwrap();
    assert!(
        ct.as_array().unwrap().iter().any(|r| r["dnat"] == true),
        "{ct}"
    );
    t.k.cli(&["forward", "del", "nat", "--proto", "tcp", "--port", "2222"])
        .unwrap();
    assert!(t
        .out
        .sh("busybox wget -q -T 2 -O - http://198.51.100.1:2222/hello.txt")
        .is_err());
}

#[test]
fn a_full_table_keeps_established_flows_and_drops_new_ones() {
    if !privileged() {
        return;
    }
    // 8 entries: 4 flows.
    let t = nat_lab(1, &["--ct-max", "8"]);
    echo_server(&t.lab, &t.out.ns, 5003).unwrap();
    let code = r#"
import socket, time
conns = [socket.create_connection(("198.51.100.2", 5003), timeout=3) for _ in range(4)]
try:
    socket.create_connection(("198.51.100.2", 5003), timeout=2); print("fifth connected")
except OSError:
    print("fifth refused")
for s in conns: s.sendall(b"still"); assert s.recv(10) == b"still"
print("established ok")
"#;
    let r = py(&t.guests[0].ns, code);
    assert!(
        r.contains("fifth refused") && r.contains("established ok"),
        "{r}"
    );
    let stats = t.k.json(&["stats"]).unwrap();
    assert!(
        stats["nat"][0]["drops"]["table_full"].as_u64().unwrap() > 0,
        "{stats}"
    );
    assert_eq!(stats["nat"][0]["table_capacity"], 8);
}

#[test]
fn bad_nat_input_is_refused() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    let before = (
        t.k.json(&["net", "list"]).unwrap(),
        t.k.json(&["forward", "list", "nat"]).unwrap(),
    );
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "net",
                "add",
                "n3",
                "--mode",
                "nat",
                "--gateway",
                "10.52.0.1/24",
                "--uplink",
                "up0",
                "--nat-ports",
                "1024-70000",
            ],
            "beyond",
        ),
        (
            &[
                "forward",
                "add",
                "nat",
                "--port",
                "2222",
                "--to",
                "192.168.1.5:22",
            ],
            "not a guest address of network 'nat'",
        ),
        (
            &[
                "forward",
                "add",
                "nat",
                "--port",
                "2222",
                "--to",
                "10.50.0.11:99999",
            ],
            "beyond",
        ),
        (
            &[
                "forward",
                "add",
                "nat",
                "--proto",
                "sctp",
                "--port",
                "2222",
                "--to",
                "10.50.0.11:22",
            ],
            "tcp or udp",
        ),
    ];
    for (args, want) in cases {
        let err = t.k.cli_err(args).unwrap();
        assert!(
            err.contains(want),
            "`kvnet {}`: want {want:?} in {err:?}",
            args.join(" ")
        );
    }
    assert_eq!(
        (
            t.k.json(&["net", "list"]).unwrap(),
            t.k.json(&["forward", "list", "nat"]).unwrap()
        ),
        before
    );
}

#[test]
fn a_real_qemu_guest_reaches_the_outside_through_the_nat() {
    if !privileged() {
        return;
    }
    use kvnet_tests::guest::{default_cache_dir, Image, Vm, VmSpec, READY};
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let t = nat_lab(0, &[]);
    let tap = t.lab.add_tap("tap0").unwrap();
    t.k.cli(&["port", "add", "nat", &tap]).unwrap();
    let www = t.lab.work_dir().join("www");
    std::fs::create_dir_all(&www).unwrap();
    t.out
        .sh(&format!(
            "head -c 3000000 /dev/urandom > {}/blob",
            www.display()
        ))
        .unwrap();
    let want = t.out.sh(&format!("md5sum {}/blob", www.display())).unwrap();
    let want = want.split_whitespace().next().unwrap().to_string();
    let mut httpd = Command::new("busybox");
    httpd
        .args(["httpd", "-f", "-p", "8080", "-h"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    t.lab.spawn(&t.out.ns, httpd).unwrap();
    let script = "ip route add default via 10.50.0.1\n\
                  ping -c 3 -W 3 198.51.100.2 || exit 11\n\
                  wget -q -O /tmp/blob http://198.51.100.2:8080/blob || exit 12\n\
                  echo GOT-MD5 $(md5sum /tmp/blob)\n"
        .to_string();
    let vm = Vm::boot(
        &t.lab,
        &image,
        VmSpec {
            tap,
            mac: "52:54:00:50:00:05".into(),
            ip: "10.50.0.5/24".into(),
            script,
            ..VmSpec::default()
        },
    )
    .unwrap();
    vm.wait_for(READY, Duration::from_secs(120)).unwrap();
    let rc = vm.wait_done(Duration::from_secs(180)).unwrap();
    let out = vm.script_output();
    assert_eq!(rc, 0, "{}", vm.console());
    assert!(out.contains("3 packets received"), "{out}");
    let got = out
        .lines()
        .find_map(|l| l.strip_prefix("GOT-MD5 "))
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_default();
    assert_eq!(got, want, "download through the NAT arrived intact");
    // The VM is the only guest: every translation is its.
    let stats = t.k.json(&["stats"]).unwrap();
    assert!(
        stats["nat"][0]["new_flows"].as_u64().unwrap_or(0) >= 2,
        "{stats}"
    );
    assert!(
        stats["nat"][0]["translated"].as_u64().unwrap_or(0) > 50,
        "{stats}"
    );
}

#[test]
fn a_guest_on_a_vlan_access_port_is_translated_too() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    echo_server(&t.lab, &t.out.ns, 5004).unwrap();
    // Guest vm0 moves to VLAN 10, and so does the gateway.
    t.k.cli(&["port", "set", "vm0", "--vlan", "10"]).unwrap();
    let gw = t.k.json(&["net", "show", "nat"]).unwrap();
    let gw_port = gw["port_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "gateway")
        .unwrap()["iface"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(t
        .k
        .cli_err(&["port", "set", &gw_port, "--trunk", "10,20"])
        .unwrap()
        .contains("not a trunk"));
    t.k.cli(&["port", "set", &gw_port, "--vlan", "10"]).unwrap();
    let cap = Capture::start(&t.out.ns, "eth0").unwrap();
    let r = py(
        &t.guests[0].ns,
        r#"
import socket
s = socket.create_connection(("198.51.100.2", 5004), timeout=5); s.sendall(b"v" * 50000)
got = b""
while len(got) < 50000: got += s.recv(65536)
print("vlan-ok", len(got))
"#,
    );
    assert!(r.contains("vlan-ok 50000"), "{r}");
    let frames = cap.stop().unwrap();
    let tcp: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.ipv4_proto() == Some(6) && f.src_mac() != t.out.mac)
        .collect();
    assert!(!tcp.is_empty());
    assert!(
        tcp.iter()
            .all(|f| ipv4_src(f) == Some(UPLINK_IP) && f.vlan_id().is_none()),
        "untagged and translated on the uplink"
    );
}

#[test]
fn untranslatable_guest_packets_never_leave_with_the_guest_address() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    let cap = Capture::start(&t.out.ns, "eth0").unwrap();
    // GRE (protocol 47) has no ports to translate: the fast path hands it to
    // the host, which would forward it as is; the uplink's guard stops it.
    let r = py(
        &t.guests[0].ns,
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, 47)
for _ in range(3): s.sendto(b"\x00" * 24, ("198.51.100.2", 0))
print("sent")
"#,
    );
    assert!(r.contains("sent"), "{r}");
    // The guard counts them where they would have left.
    let untranslated = || {
        t.k.json(&["stats"]).unwrap()["nat"][0]["drops"]["untranslated"]
            .as_u64()
            .unwrap_or(0)
    };
    let t0 = Instant::now();
    while untranslated() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "untranslated drops: {}",
            untranslated()
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Positive control in the same capture: translated traffic still flows
    // through the guarded uplink, and the capture sees it.
    assert!(
        t.guests[0].ping("198.51.100.2"),
        "translated pings through the guarded uplink"
    );
    let frames = cap
        .stop_when(
            "the guest's translated echo requests",
            Duration::from_secs(3),
            |f| {
                f.iter()
                    .filter(|f| f.icmp_type() == Some(8) && ipv4_src(f) == Some(UPLINK_IP))
                    .count()
                    >= 2
            },
        )
        .unwrap();
    let leaked = frames
        .iter()
        .filter(|f| f.ipv4_addrs().is_some_and(|(s, _)| s[0] == 10))
        .count();
    assert_eq!(
        leaked, 0,
        "guest addresses leaked to the outside: {frames:?}"
    );
}

/// Review finding (issue 14): two NAT networks on one uplink, both with the
/// default port range, as libvirt's networks are. The port space of the
/// uplink's address is shared (a port is reserved by the conntrack entry of
/// its reply direction, whichever network took it): the same source port
/// from a guest of each network gets two translations.
#[test]
fn two_nat_networks_share_one_uplink_and_its_default_range() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    t.k.cli(&[
        "net",
        "add",
        "n2",
        "--mode",
        "nat",
        "--gateway",
        "10.51.0.1/24",
        "--uplink",
        "up0",
    ])
    .unwrap();
    let g2 = t.lab.add_guest_with("vm9", Some("10.51.0.11/24")).unwrap();
    g2.disable_ipv6().unwrap();
    g2.sh("ip route add default via 10.51.0.1").unwrap();
    t.k.cli(&["port", "add", "n2", &g2.hv_if]).unwrap();
    echo_server(&t.lab, &t.out.ns, 5003).unwrap();
    let code = r#"
import socket
s = socket.socket(); s.bind(("0.0.0.0", 40000)); s.settimeout(5); s.connect(("198.51.100.2", 5003))
s.sendall(b"shared"); print(s.recv(10).decode())
import time; time.sleep(1)
"#;
    let handles: Vec<_> = [t.guests[0].ns.clone(), g2.ns.clone()]
        .into_iter()
        .map(|ns| thread::spawn(move || py(&ns, code)))
        .collect();
    for h in handles {
        let r = h.join().unwrap();
        assert!(r.contains("shared"), "{r}");
    }
    let translated = |net: &str| -> Vec<String> {
        let ct = t.k.json(&["conntrack", "list", net]).unwrap();
        ct.as_array()
            .unwrap()
            .iter()
            .filter(|r| r["proto"] == "tcp" && r["orig"]["sport"] == 40000)
            .map(|r| flow(&r["translated"]))
            .collect()
    };
    let (a, b) = (translated("nat"), translated("n2"));
    assert_eq!((a.len(), b.len()), (1, 1), "{a:?} {b:?}");
    assert!(a[0].starts_with("198.51.100.1:") && b[0].starts_with("198.51.100.1:"));
    assert_ne!(a[0], b[0], "one uplink address, two distinct ports");
}

/// An IPv4/ICMP echo request (checksums filled in).
fn icmp_echo(src: [u8; 4], dst: [u8; 4], id: u16) -> Vec<u8> {
    let mut icmp = vec![8, 0, 0, 0];
    icmp.extend_from_slice(&id.to_be_bytes());
    icmp.extend_from_slice(&[0, 1]);
    icmp.extend_from_slice(b"kvnet-trunk");
    let c = !fold(sum16(&icmp, 0));
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 7, 0x40, 0, 64, 1, 0, 0]);
    ip.extend_from_slice(&src);
    ip.extend_from_slice(&dst);
    let c = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend_from_slice(&icmp);
    ip
}

/// Review finding (issue 14): a guest on a trunk port, in the gateway's
/// VLAN, had its translated packets leave the uplink still tagged, and the
/// replies came back to it untagged (into its native VLAN).
#[test]
fn a_trunk_guest_in_the_gateways_vlan_is_translated_untagged_and_answered_tagged() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    let g = &t.guests[0];
    t.k.cli(&["port", "set", "vm0", "--trunk", "10"]).unwrap();
    let net = t.k.json(&["net", "show", "nat"]).unwrap();
    let gw_port = net["port_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "gateway")
        .unwrap()["iface"]
        .as_str()
        .unwrap()
        .to_string();
    t.k.cli(&["port", "set", &gw_port, "--vlan", "10"]).unwrap();
    let gw_mac = gateway_mac(&t);
    // This kernel has no 802.1Q: the guest's tagged frames are written raw,
    // and the gateway is told its MAC (the guest cannot answer ARP tagged).
    t.lab
        .sh(
            t.lab.hv(),
            &format!(
                "ip neigh replace 10.50.0.11 lladdr {} dev kvnet-nat nud permanent",
                mac_fmt(&g.mac)
            ),
        )
        .unwrap();
    let out_cap = Capture::start(&t.out.ns, "eth0").unwrap();
    let guest_cap = Capture::start(&g.ns, "eth0").unwrap();
    let request = eth_frame_vlan(
        gw_mac,
        g.mac,
        10,
        0x0800,
        &icmp_echo([10, 50, 0, 11], [198, 51, 100, 2], 0x4b56),
    );
    inject(&g.ns, "eth0", &[request]).unwrap();
    let is_reply = |f: &Frame| f.icmp_type() == Some(0) && f.dst_mac() == g.mac;
    let back = guest_cap
        .stop_when("the echo reply", Duration::from_secs(5), |fs| {
            fs.iter().any(is_reply)
        })
        .unwrap();
    let reply = back.iter().find(|f| is_reply(f)).unwrap();
    assert_eq!(reply.vlan_id(), Some(10), "answered in VLAN 10, tagged");
    assert_eq!(
        reply.ipv4_addrs(),
        Some(([198, 51, 100, 2], [10, 50, 0, 11])),
        "translated back"
    );
    let frames = out_cap.stop().unwrap();
    let req: Vec<&Frame> = frames.iter().filter(|f| f.icmp_type() == Some(8)).collect();
    assert_eq!(req.len(), 1, "{frames:?}");
    assert_eq!(req[0].vlan_id(), None, "untagged on the uplink");
    assert_eq!(req[0].ipv4_addrs().unwrap().0, UPLINK_IP, "translated");
}

/// Review finding (issue 14), on the wire: PMTUD from the outside's side.
/// A datagram through a port forward that is larger than the guest
/// network's MTU was dropped in silence; the sender now gets ICMP
/// "fragmentation needed" from the uplink address and lowers its path MTU.
#[test]
fn an_outside_sender_learns_the_guest_networks_mtu_through_a_forward() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    t.lab
        .sh(t.lab.hv(), "ip link set kvnet-nat mtu 1280")
        .unwrap();
    t.k.cli(&[
        "forward",
        "add",
        "nat",
        "--proto",
        "udp",
        "--port",
        "5000",
        "--to",
        "10.50.0.11:5000",
    ])
    .unwrap();
    let path_mtu = || t.out.sh("ip route get 198.51.100.1").unwrap();
    assert!(
        !path_mtu().contains("mtu 1280"),
        "no path MTU learned yet: {}",
        path_mtu()
    );
    // 1400 bytes with DF (IP_MTU_DISCOVER = IP_PMTUDISC_DO), sent until
    // the kernel has learned the path MTU or 5 s have passed.
    let send = "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
                s.setsockopt(socket.IPPROTO_IP, 10, 2); \
                s.sendto(b'x' * 1400, ('198.51.100.1', 5000))";
    let t0 = Instant::now();
    loop {
        let _ = t.out.sh(&format!("python3 -c \"{send}\""));
        if path_mtu().contains("mtu 1280") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the sender never learned the guest network's MTU: {}",
            path_mtu()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

/// Review finding (issue 14), on the wire: a guest's ICMP errors about a
/// forwarded flow. A client's datagram to a forwarded port nobody listens
/// on in the guest is answered by the guest with "port unreachable"; the
/// error used to reach the host untranslated and die at the uplink, so the
/// client waited. Now its connected socket is refused at once.
#[test]
fn a_forwards_client_hears_the_guests_port_unreachable() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    t.k.cli(&[
        "forward",
        "add",
        "nat",
        "--proto",
        "udp",
        "--port",
        "5001",
        "--to",
        "10.50.0.11:5001",
    ])
    .unwrap();
    // Sent until the answer comes (the guest's first reply may wait for
    // ARP); each try waits 1 s for it.
    let client = "import socket\n\
                  s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n\
                  s.connect(('198.51.100.1', 5001)); s.settimeout(1)\n\
                  for _ in range(5):\n\
                  \x20   s.send(b'anyone?')\n\
                  \x20   try:\n\
                  \x20       s.recv(100)\n\
                  \x20   except ConnectionRefusedError:\n\
                  \x20       print('refused'); break\n\
                  \x20   except socket.timeout:\n\
                  \x20       print('timeout')\n";
    let script = t.lab.work_dir().join("udp-client.py");
    std::fs::write(&script, client).unwrap();
    let out = t.out.sh(&format!("python3 {}", script.display())).unwrap();
    assert!(out.contains("refused"), "the client never heard: {out}");
}

/// Review finding (issue 14), on the wire: a spoofed reset far from the
/// remote's sequence numbers closed a guest's tracked connection (and the
/// conntrack GC then deleted it under the guest). Now it changes nothing:
/// the flow stays established and the connection goes on.
#[test]
fn a_guessed_reset_from_outside_does_not_close_a_guests_connection() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    echo_server(&t.lab, &t.out.ns, 5000).unwrap();
    let flag = t.lab.work_dir().join("go-on");
    let client = format!(
        r#"
import socket, os, time
s = socket.create_connection(("198.51.100.2", 5000), timeout=5)
s.sendall(b"one"); assert s.recv(10) == b"one"
print("open", flush=True)
while not os.path.exists("{}"): time.sleep(0.05)
s.sendall(b"two"); print("after", s.recv(10).decode(), flush=True)
"#,
        flag.display()
    );
    let log = t.lab.work_dir().join("rst-client.log");
    let proc = python_logged(&t.lab, &t.guests[0].ns, &client, &[], &log);
    let established = || -> Option<(String, u16)> {
        let ct = t.k.json(&["conntrack", "list", "nat"]).ok()?;
        let row = ct
            .as_array()?
            .iter()
            .find(|r| {
                r["proto"] == "tcp"
                    && r["orig"]["daddr"] == "198.51.100.2"
                    && r["orig"]["dport"] == 5000
            })?
            .clone();
        let nport = row["translated"]["sport"].as_u64()?;
        Some((
            row["state"].as_str()?.to_string(),
            u16::try_from(nport).ok()?,
        ))
    };
    let t0 = Instant::now();
    let nport = loop {
        if let Some((state, nport)) = established() {
            if state == "established" && std::fs::read_to_string(&log).unwrap().contains("open") {
                break nport;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no established flow"
        );
        thread::sleep(Duration::from_millis(50));
    };
    // A reset from the remote's address and port, 300 MB off its
    // sequence, injected on the outside's wire (checksums valid).
    let uplink_mac = kvnet_tests::lab::read_mac(t.lab.hv(), &t.out.hv_if).unwrap();
    let (remote, uplink) = ([198, 51, 100, 2], [198, 51, 100, 1]);
    let mut tcp = Vec::new();
    tcp.extend_from_slice(&5000u16.to_be_bytes());
    tcp.extend_from_slice(&nport.to_be_bytes());
    tcp.extend_from_slice(&300_000_000u32.to_be_bytes());
    tcp.extend_from_slice(&[0, 0, 0, 0, 0x50, 0x04, 0, 0, 0, 0, 0, 0]);
    let mut ph = Vec::new();
    ph.extend_from_slice(&remote);
    ph.extend_from_slice(&uplink);
    ph.extend_from_slice(&[0, 6, 0, 20]);
    let c = !fold(sum16(&tcp, sum16(&ph, 0)));
    tcp[16..18].copy_from_slice(&c.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 1, 0x40, 0, 64, 6, 0, 0];
    ip.extend_from_slice(&remote);
    ip.extend_from_slice(&uplink);
    let c = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    ip.extend(tcp);
    let rst = kvnet_tests::eth_frame(uplink_mac, t.out.mac, 0x0800, &ip);
    inject(&t.out.ns, &t.out.iface, &[rst.clone(), rst]).unwrap();
    // The state must stay established for longer than the GC takes to
    // delete a closed flow (timeouts 100x shorter here).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(500) {
        assert_eq!(
            established().map(|(s, _)| s).as_deref(),
            Some("established"),
            "a guessed reset closed the flow"
        );
        thread::sleep(Duration::from_millis(50));
    }
    std::fs::write(&flag, "").unwrap();
    assert!(proc
        .wait_timeout(Duration::from_secs(10))
        .unwrap()
        .is_some_and(|s| s.success()));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("after two"), "the connection went on: {text}");
}

/// Review finding (issue 14), on the wire: NAT's MTU check trusted the
/// IPv4 header's total length. A guest's frame longer than its header
/// says, and longer than the uplink's MTU, left the uplink at its full
/// length. It is now checked at its real length: too big for the uplink,
/// it goes to the host stack (which trims it to its header's length and
/// whose forward the uplink's guard stops), never out at 1474 bytes.
#[test]
fn a_frame_longer_than_its_header_says_never_leaves_past_the_uplinks_mtu() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, &[]);
    let g = &t.guests[0];
    t.lab.sh(t.lab.hv(), "ip link set up0 mtu 1400").unwrap();
    let gw_mac = gateway_mac(&t);
    let untranslated = || {
        t.k.json(&["stats"]).unwrap()["nat"][0]["drops"]["untranslated"]
            .as_u64()
            .unwrap_or(0)
    };
    let before = untranslated();
    let cap = Capture::start(&t.out.ns, "eth0").unwrap();
    // An echo request whose header says 39 bytes, in 1460 bytes of IPv4.
    let mut ip = icmp_echo([10, 50, 0, 11], [198, 51, 100, 2], 0x7a11);
    ip.resize(1460, 0);
    let frame = kvnet_tests::eth_frame(gw_mac, g.mac, 0x0800, &ip);
    inject(&g.ns, "eth0", &[frame]).unwrap();
    // Control, sent after it on the same path: an ordinary ping arrives.
    assert!(g.ping("198.51.100.2"), "an ordinary ping goes through");
    let frames = cap
        .stop_when("the ordinary echo requests", Duration::from_secs(5), |fs| {
            fs.iter().any(|f| f.icmp_type() == Some(8))
        })
        .unwrap();
    let oversize: Vec<usize> = frames
        .iter()
        .map(|f| f.data.len())
        .filter(|len| *len > 1400 + 14)
        .collect();
    assert!(
        oversize.is_empty(),
        "frames past the uplink's MTU left it: {oversize:?}"
    );
    // Where it went instead: the host stack, and the uplink's guard.
    let t0 = Instant::now();
    while untranslated() <= before {
        assert!(
            t0.elapsed() < Duration::from_secs(3),
            "the trimmed packet never reached the uplink's guard"
        );
        thread::sleep(Duration::from_millis(20));
    }
}
