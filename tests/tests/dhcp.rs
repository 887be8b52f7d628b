//! DHCP and DNS for guests (issue 7), with clients nobody here wrote:
//! busybox udhcpc, ISC dhclient, dig, and a qemu guest's udhcpc.
//!
//! The gateway is emulated by a Linux bridge `br0` holding the gateway
//! address in the lab's hv namespace; `kvnet dhcp-serve` serves on it.
//! Run as root.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvnet_tests::clients::{
    dhclient, field, udhcpc_daemon, udhcpc_once, vm_udhcpc_script, wait_events, wait_first_event,
};
use kvnet_tests::guest::{default_cache_dir, Image, Vm, VmSpec};
use kvnet_tests::kvnet::kvnet_bin;
use kvnet_tests::lab::privileged;
use kvnet_tests::Proc;
use kvnet_tests::{GuestPort, Lab};

const GW: &str = "10.77.0.1";
const DOMAIN: &str = "lab.test";

/// br0 with the gateway address in the hv namespace.
fn bridge(lab: &Lab) {
    lab.sh(
        lab.hv(),
        &format!(
            "ip link add br0 type bridge && ip addr add {GW}/24 dev br0 && ip link set br0 up"
        ),
    )
    .unwrap();
}

fn guest(lab: &Lab, name: &str) -> GuestPort {
    let g = lab.add_guest_with(name, None).unwrap();
    lab.exec(lab.hv(), &["ip", "link", "set", name, "master", "br0"])
        .unwrap();
    g
}

struct Server {
    proc: Option<Proc>,
    log: PathBuf,
}

impl Server {
    fn start(lab: &Lab, state: &Path, extra: &[&str]) -> Server {
        Server::start_on(
            lab,
            lab.hv(),
            "br0",
            &format!("{GW}/24"),
            "10.77.0.10,10.77.0.50",
            state,
            extra,
        )
    }

    fn start_on(
        lab: &Lab,
        ns: &str,
        iface: &str,
        ip: &str,
        range: &str,
        state: &Path,
        extra: &[&str],
    ) -> Server {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = lab.work_dir().join(format!("dhcp-serve-{n}.log"));
        let f = fs::File::create(&log).unwrap();
        let mut cmd = Command::new(kvnet_bin().unwrap());
        cmd.args([
            "dhcp-serve",
            "--iface",
            iface,
            "--server-ip",
            ip,
            "--range",
            range,
        ])
        .arg("--state-dir")
        .arg(state)
        .args(extra)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
        let proc = lab.spawn(ns, cmd).unwrap();
        let s = Server {
            proc: Some(proc),
            log,
        };
        s.wait_log("ready on", Duration::from_secs(10));
        s
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str, t: Duration) {
        let end = Instant::now() + t;
        while !self.log().contains(what) {
            if let Some(p) = &self.proc {
                assert!(p.is_running(), "dhcp-serve exited:\n{}", self.log());
            }
            assert!(
                Instant::now() < end,
                "no {what:?} in server log:\n{}",
                self.log()
            );
            sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM; returns the log (with the counters printed on the way out).
    fn stop(&mut self) -> String {
        if let Some(p) = self.proc.take() {
            let st = p.stop().unwrap();
            assert!(st.success(), "dhcp-serve exit {st}:\n{}", self.log());
        }
        self.log()
    }

    fn counter(&self, name: &str) -> u64 {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("stopping; counters"))
            .unwrap_or_else(|| panic!("no counters in\n{log}"));
        let json = &line[line.find('{').unwrap()..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        v[name].as_u64().unwrap()
    }

    fn dns_counter(&self, name: &str) -> u64 {
        let log = self.log();
        let line = log.lines().find(|l| l.contains("dns counters")).unwrap();
        let v: serde_json::Value = serde_json::from_str(&line[line.find('{').unwrap()..]).unwrap();
        v[name].as_u64().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("---- {} ----\n{}", self.log.display(), self.log());
        }
    }
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {cmd}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn leases_json(state: &Path) -> serde_json::Value {
    let out = Command::new(kvnet_bin().unwrap())
        .args(["dhcp-leases", "--json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn in_range(ip: &str) -> bool {
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    ip.starts_with("10.77.0.") && (10..=50).contains(&last)
}

#[test]
fn udhcpc_and_dhclient_get_leases_and_renew() {
    if !privileged() {
        return;
    }
    assert!(
        have("dhclient"),
        "dhclient missing: run `cargo xtask setup`"
    );
    let lab = Lab::new().unwrap();
    bridge(&lab);
    let g1 = guest(&lab, "p1");
    let g2 = guest(&lab, "p2");
    let state = lab.work_dir().join("state");
    let mut srv = Server::start(
        &lab,
        &state,
        &["--domain", DOMAIN, "--lease-secs", "8", "--no-dns"],
    );

    let (_u, uev) = udhcpc_daemon(&lab, &g1, "g1", "guest1");
    let (_d, dev) = dhclient(&lab, &g2, "g2");
    let bound = &wait_first_event(&uev, "bound ", Duration::from_secs(20));
    let ip1 = field(bound, "ip").to_string();
    assert!(in_range(&ip1), "{bound}");
    assert_eq!(field(bound, "router"), GW, "{bound}");
    assert_eq!(field(bound, "dns"), GW, "{bound}");
    assert_eq!(field(bound, "mask"), "24", "{bound}"); // udhcpc gives the prefix length
    assert_eq!(field(bound, "subnet"), "255.255.255.0", "{bound}");
    assert_eq!(field(bound, "domain"), DOMAIN, "{bound}");
    assert_eq!(field(bound, "lease"), "8", "{bound}");

    let dbound = &wait_first_event(&dev, "BOUND ", Duration::from_secs(30));
    let ip2 = field(dbound, "ip").to_string();
    assert!(in_range(&ip2) && ip2 != ip1, "{dbound}");
    assert_eq!(field(dbound, "router"), GW, "{dbound}");
    assert_eq!(field(dbound, "dns"), GW, "{dbound}");
    assert_eq!(field(dbound, "mask"), "255.255.255.0", "{dbound}");
    assert_eq!(field(dbound, "domain"), DOMAIN, "{dbound}");
    // The addresses work: the guests ping the gateway.
    g1.exec(&["ping", "-c", "1", "-W", "2", GW]).unwrap();
    g2.exec(&["ping", "-c", "1", "-W", "2", GW]).unwrap();

    // Renewals (T1 = 4 s; busybox udhcpc stretches leases under 30 s to
    // 30 s, so it renews after 15 s), keeping the address.
    let u = wait_events(&uev, "renew ", 1, Duration::from_secs(25));
    for l in u.lines().filter(|l| l.starts_with("renew ")) {
        assert_eq!(field(l, "ip"), ip1, "{u}");
    }
    let d = wait_events(&dev, "RENEW ", 2, Duration::from_secs(30));
    for l in d.lines().filter(|l| l.starts_with("RENEW ")) {
        assert_eq!(field(l, "ip"), ip2, "{d}");
    }
    let l = leases_json(&state);
    let rows = l.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{l}");
    let r1 = rows.iter().find(|r| r["ip"] == ip1.as_str()).unwrap();
    assert_eq!(r1["hostname"], "guest1");
    assert_eq!(r1["mac"], kvnet_tests::mac_fmt(&g1.mac));
    srv.stop();
    assert!(srv.counter("acks") >= 4, "{}", srv.log());
}

#[test]
fn static_host_pool_exhaustion_release_and_restart() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    bridge(&lab);
    let gs: Vec<GuestPort> = (1..=5).map(|i| guest(&lab, &format!("p{i}"))).collect();
    let fixed_mac = kvnet_tests::mac_fmt(&gs[4].mac);
    let state = lab.work_dir().join("state");
    let host = format!("{fixed_mac},10.77.0.99,fixed");
    let args = ["--host", host.as_str(), "--domain", DOMAIN, "--no-dns"];
    let mut srv = Server::start_on(
        &lab,
        lab.hv(),
        "br0",
        &format!("{GW}/24"),
        "10.77.0.10,10.77.0.12",
        &state,
        &args,
    );

    // The static host gets its address, every time.
    for n in 0..2 {
        let b = udhcpc_once(&lab, &gs[4], &format!("fixed{n}"), "whatever", None).unwrap();
        assert_eq!(field(&b, "ip"), "10.77.0.99", "{b}");
        assert_eq!(field(&b, "hostname"), "fixed", "{b}");
    }
    // Three addresses, four clients: the first keeps running (-R releases
    // on SIGTERM), two more take the rest, the fourth is refused.
    let (first, ev) = udhcpc_daemon(&lab, &gs[0], "c1", "c1");
    let b1 = wait_first_event(&ev, "bound ", Duration::from_secs(15));
    let ip1 = field(&b1, "ip").to_string();
    let ip2 = field(&udhcpc_once(&lab, &gs[1], "c2", "c2", None).unwrap(), "ip").to_string();
    let ip3 = field(&udhcpc_once(&lab, &gs[2], "c3", "c3", None).unwrap(), "ip").to_string();
    let mut got = vec![ip1.clone(), ip2.clone(), ip3.clone()];
    got.sort();
    assert_eq!(got, ["10.77.0.10", "10.77.0.11", "10.77.0.12"]);
    let e = udhcpc_once(&lab, &gs[3], "c4a", "c4", None).unwrap_err();
    assert!(e.contains("no lease"), "{e}");
    srv.wait_log("no free address", Duration::from_secs(1));
    // The first releases; the fourth now gets its address.
    first.stop().unwrap();
    srv.wait_log(&format!("RELEASE {ip1}"), Duration::from_secs(5));
    let ip4 = field(&udhcpc_once(&lab, &gs[3], "c4b", "c4", None).unwrap(), "ip").to_string();
    assert_eq!(ip4, ip1);

    // Restart with the same state folder: the leases are still known, so
    // a newcomer is refused and the holders renew their own addresses.
    srv.stop();
    assert!(srv.counter("exhausted") >= 1, "{}", srv.log());
    let mut srv = Server::start_on(
        &lab,
        lab.hv(),
        "br0",
        &format!("{GW}/24"),
        "10.77.0.10,10.77.0.12",
        &state,
        &args,
    );
    assert!(srv.log().contains("(4 leases loaded)"), "{}", srv.log());
    let e = udhcpc_once(&lab, &gs[0], "c1b", "c1", None).unwrap_err();
    assert!(e.contains("no lease"), "{e}");
    for (g, ip, tag) in [
        (&gs[1], &ip2, "c2"),
        (&gs[2], &ip3, "c3"),
        (&gs[3], &ip4, "c4"),
    ] {
        // udhcpc asks for its previous address (INIT-REBOOT style -r).
        let bound = udhcpc_once(&lab, g, &format!("{tag}r"), tag, Some(ip)).unwrap();
        assert!(bound.contains(&format!("bound ip={ip} ")), "{bound}");
    }
    srv.stop();
}

/// A fake upstream resolver in the outside namespace: A 203.0.113.7 for
/// ext.example.net (TTL 300), NXDOMAIN for the rest; counts its queries.
const FAKE_UPSTREAM: &str = r#"
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
n = 0
while True:
    q, a = s.recvfrom(4096)
    n += 1
    i = 12
    labels = []
    while q[i] != 0:
        labels.append(q[i+1:i+1+q[i]].decode()); i += 1 + q[i]
    name = ".".join(labels).lower(); qend = i + 5
    print("query", n, name, flush=True)
    if name == "ext.example.net":
        hdr = q[:2] + b"\x81\x80" + struct.pack(">HHHH", 1, 1, 0, 0)
        ans = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 300, 4) + socket.inet_aton("203.0.113.7")
        s.sendto(hdr + q[12:qend] + ans, a)
    else:
        s.sendto(q[:2] + b"\x81\x83" + struct.pack(">HHHH", 1, 0, 0, 0) + q[12:qend], a)
"#;

fn dig(g: &GuestPort, args: &str) -> String {
    g.sh(&format!("dig @{GW} +time=3 +tries=1 {args}")).unwrap()
}

#[test]
fn dns_answers_leases_and_forwards() {
    if !privileged() {
        return;
    }
    assert!(have("dig"), "dig missing: run `cargo xtask setup`");
    let lab = Lab::new().unwrap();
    bridge(&lab);
    let out = lab.add_outside().unwrap();
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "10.99.0.1/24", "dev", &out.hv_if],
    )
    .unwrap();
    out.set_ip("10.99.0.53/24").unwrap();
    let py = lab.work_dir().join("upstream.py");
    fs::write(&py, FAKE_UPSTREAM).unwrap();
    let up_log = lab.work_dir().join("upstream.log");
    let mut cmd = Command::new("python3");
    cmd.arg(&py)
        .arg("10.99.0.53")
        .stdout(fs::File::create(&up_log).unwrap())
        .stderr(Stdio::null());
    lab.spawn(&out.ns, cmd).unwrap();

    let g1 = guest(&lab, "p1");
    let g2 = guest(&lab, "p2");
    let state = lab.work_dir().join("state");
    let mut srv = Server::start(
        &lab,
        &state,
        &[
            "--domain",
            DOMAIN,
            "--dns-upstream",
            "10.99.0.53:53",
            "--host",
            "52:54:00:aa:00:05,10.77.0.5,web",
        ],
    );
    let b = udhcpc_once(&lab, &g1, "g1", "guest1", None).unwrap();
    let ip1 = field(&b, "ip").to_string();
    udhcpc_once(&lab, &g2, "g2", "guest2", None).unwrap();

    // A and PTR for a lease's hostname, over UDP and TCP.
    assert_eq!(dig(&g2, &format!("+short guest1.{DOMAIN}")).trim(), ip1);
    assert_eq!(
        dig(&g2, &format!("+short +tcp guest1.{DOMAIN}")).trim(),
        ip1
    );
    assert_eq!(
        dig(&g2, &format!("+short -x {ip1}")).trim(),
        format!("guest1.{DOMAIN}.")
    );
    // A static host's name, before it ever asked for a lease.
    assert_eq!(
        dig(&g1, &format!("+short web.{DOMAIN}")).trim(),
        "10.77.0.5"
    );
    let nx = dig(&g1, &format!("nobody.{DOMAIN}"));
    assert!(
        nx.contains("status: NXDOMAIN") && nx.contains(" aa"),
        "{nx}"
    );
    // Other names go upstream, UDP and TCP; the second is a cache hit.
    assert_eq!(dig(&g1, "+short ext.example.net").trim(), "203.0.113.7");
    let tcp = dig(&g1, "+tcp ext.example.net");
    assert!(tcp.contains("203.0.113.7"), "{tcp}");
    let upstream_queries = || {
        fs::read_to_string(&up_log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(upstream_queries(), 1, "cached answer went upstream again");
    let nx = dig(&g1, "nothing.example.org");
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    // Malformed queries are dropped and counted; the server goes on.
    g1.sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         [s.sendto(b, ('{GW}', 53)) for b in [b'', b'\\x01\\x02\\x03', b'\\x00\\x01\\x01\\x00\\xff\\xff\\xff\\xff\\xff\\xff\\xff\\xff', bytes(300)]]\""
    ))
    .unwrap();
    sleep(Duration::from_millis(300));
    assert_eq!(dig(&g2, &format!("+short guest1.{DOMAIN}")).trim(), ip1);
    srv.stop();
    assert!(srv.dns_counter("malformed") >= 3, "{}", srv.log());
    assert!(srv.dns_counter("cache_hits") >= 1, "{}", srv.log());
}

#[test]
fn only_gateway_interface_and_malformed_dhcp() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    bridge(&lab);
    let g1 = guest(&lab, "p1");
    // A second interface of the hv namespace, not on br0 (the "uplink").
    let stray = lab.add_guest_with("p2", None).unwrap();
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "10.88.0.1/24", "dev", "p2"],
    )
    .unwrap();
    let state = lab.work_dir().join("state");
    let mut srv = Server::start(&lab, &state, &["--no-dns"]);
    let e = udhcpc_once(&lab, &stray, "stray", "stray", None).unwrap_err();
    assert!(e.contains("no lease"), "{e}");
    // Garbage to port 67 from a guest with an address: dropped, counted.
    let junk = guest(&lab, "p3");
    junk.set_ip("10.77.0.200/24").unwrap();
    junk.sh(&format!(
        "python3 -c \"import socket; s=socket.socket(socket.AF_INET, socket.SOCK_DGRAM); \
         good=bytes([1,1,6,0])+bytes(232)+bytes([99,130,83,99]); \
         [s.sendto(b, ('{GW}', 67)) for b in [b'', b'\\x01', bytes(239), good, good+bytes([53,1,1,12,200,97]), bytes([2,1,6,0])+bytes(232)+bytes([99,130,83,99,53,1,1,255])]]\""
    ))
    .unwrap();
    sleep(Duration::from_millis(300));
    let b = udhcpc_once(&lab, &g1, "g1", "g1", None).unwrap();
    assert!(in_range(field(&b, "ip")), "{b}");
    srv.stop();
    assert_eq!(srv.counter("malformed"), 6, "{}", srv.log());
    assert_eq!(srv.counter("offers"), 1, "{}", srv.log());
}

#[test]
fn qemu_guest_gets_lease_router_dns_and_pings_gateway() {
    if !privileged() {
        return;
    }
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    bridge(&lab);
    let tap = lab.add_tap("tap0").unwrap();
    lab.exec(lab.hv(), &["ip", "link", "set", &tap, "master", "br0"])
        .unwrap();
    let state = lab.work_dir().join("state");
    let mut srv = Server::start(
        &lab,
        &state,
        &["--domain", DOMAIN, "--dns-upstream", "127.0.0.1:9"],
    );
    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap,
            mac: "52:54:00:00:77:05".into(),
            ip: "dhcp".into(),
            script: vm_udhcpc_script("vm1", GW, DOMAIN),
            ..VmSpec::default()
        },
    )
    .unwrap();
    let rc = vm.wait_done(Duration::from_secs(180)).unwrap();
    let out = vm.script_output();
    assert_eq!(rc, 0, "{}", vm.console());
    let lease = out
        .lines()
        .find(|l| l.contains("LEASE ip="))
        .unwrap_or_else(|| panic!("{out}"));
    let ip = field(lease, "ip").to_string();
    assert!(in_range(&ip), "{lease}");
    assert_eq!(field(lease, "router"), GW, "{lease}");
    assert_eq!(field(lease, "dns"), GW, "{lease}");
    assert_eq!(field(lease, "domain"), DOMAIN, "{lease}");
    assert!(out.contains(&format!("inet {ip}/24")), "{out}");
    assert!(out.contains("PING-OK"), "{out}");
    assert!(out.contains(&format!("Address: {ip}")), "{out}");
    srv.stop();
}
