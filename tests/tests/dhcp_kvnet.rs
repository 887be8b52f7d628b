//! DHCP and DNS for guests through kvnet itself (issue 7): the daemon
//! serves on a host-only network's gateway interface (`kvnet net add ...
//! --dhcp-range`), with clients nobody here wrote (busybox udhcpc, ISC
//! dhclient, dig, a qemu guest's udhcpc), and the fast path drops rogue
//! DHCP servers on untrusted guest ports. Run as root.
use std::fs;
use std::process::{Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

use kvnet_tests::clients::{
    dhclient, field, udhcpc_daemon, udhcpc_once, vm_udhcpc_script, wait_events, wait_first_event,
};
use kvnet_tests::guest::{default_cache_dir, Image, Vm, VmSpec};
use kvnet_tests::kvnet::Kvnet;
use kvnet_tests::lab::privileged;
use kvnet_tests::Proc;
use kvnet_tests::{GuestPort, Lab};

const GW: &str = "10.78.0.1";
const DOMAIN: &str = "lab.test";

/// `net add NAME --mode host-only --gateway 10.78.0.1/24 OPTS...`
fn host_only<'a>(name: &'a str, opts: &[&'a str]) -> Vec<&'a str> {
    let net = [
        "net",
        "add",
        name,
        "--mode",
        "host-only",
        "--gateway",
        "10.78.0.1/24",
    ];
    [&net[..], opts].concat()
}

fn net_add(k: &Kvnet, range: &str, extra: &[&str]) {
    let mut a = host_only("ho", &["--dhcp-range", range]);
    a.extend_from_slice(extra);
    k.cli(&a).unwrap();
}

fn guest(lab: &Lab, k: &Kvnet, name: &str) -> GuestPort {
    let g = lab.add_guest_with(name, None).unwrap();
    g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1").unwrap();
    k.cli(&["port", "add", "ho", name]).unwrap();
    g
}

fn in_range(ip: &str, lo: u8, hi: u8) -> bool {
    let last: u8 = ip.rsplit('.').next().unwrap().parse().unwrap();
    ip.starts_with("10.78.0.") && (lo..=hi).contains(&last)
}

fn leases(k: &Kvnet) -> Vec<serde_json::Value> {
    k.json(&["dhcp", "leases", "ho"])
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn udhcpc_dhclient_leases_dns_through_kvnet() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    // Checked before anything is created, one line each.
    for (args, why) in [
        (
            vec!["net", "add", "x", "--dhcp-range", "10.78.0.10,10.78.0.50"],
            "needs a network with a gateway",
        ),
        (
            host_only("x", &["--dhcp-range", "10.78.0.1,10.78.0.50"]),
            "gateway's own address",
        ),
        (
            host_only("x", &["--dhcp-range", "10.78.0.10,10.78.1.50"]),
            "outside the network 10.78.0.0/24",
        ),
        (
            host_only("x", &["--dhcp-range", "10.78.0.10,10.78.0.255"]),
            "broadcast",
        ),
        (
            host_only("x", &["--domain", "lab.test"]),
            "need --dhcp-range",
        ),
        (
            host_only(
                "x",
                &[
                    "--dhcp-range",
                    "10.78.0.10,10.78.0.50",
                    "--dhcp-host",
                    "52:54:00:00:00:01",
                ],
            ),
            "MAC,IP[,NAME]",
        ),
    ] {
        let e = k.cli_err(&args).unwrap();
        assert!(
            e.contains(why) && e.trim().lines().count() == 1,
            "{args:?}: {e}"
        );
        assert!(k
            .json(&["net", "list"])
            .unwrap()
            .as_array()
            .unwrap()
            .is_empty());
        assert!(lab
            .exec(lab.hv(), &["ip", "link", "show", "kvnet-x"])
            .is_err());
    }

    net_add(
        &k,
        "10.78.0.10,10.78.0.50",
        &["--domain", DOMAIN, "--dhcp-lease", "8"],
    );
    let g1 = guest(&lab, &k, "p1");
    let g2 = guest(&lab, &k, "p2");
    let (_u, uev) = udhcpc_daemon(&lab, &g1, "g1", "guest1");
    let (_d, dev) = dhclient(&lab, &g2, "g2");
    let bound = &wait_first_event(&uev, "bound ", Duration::from_secs(20));
    let ip1 = field(bound, "ip").to_string();
    assert!(in_range(&ip1, 10, 50), "{bound}");
    assert_eq!(field(bound, "router"), GW, "{bound}");
    assert_eq!(field(bound, "dns"), GW, "{bound}");
    assert_eq!(field(bound, "serverid"), GW, "{bound}");
    assert_eq!(field(bound, "subnet"), "255.255.255.0", "{bound}");
    assert_eq!(field(bound, "domain"), DOMAIN, "{bound}");
    assert_eq!(field(bound, "lease"), "8", "{bound}");
    let dbound = &wait_first_event(&dev, "BOUND ", Duration::from_secs(30));
    let ip2 = field(dbound, "ip").to_string();
    assert!(in_range(&ip2, 10, 50) && ip2 != ip1, "{dbound}");
    assert_eq!(field(dbound, "router"), GW, "{dbound}");
    assert_eq!(field(dbound, "dns"), GW, "{dbound}");
    assert_eq!(field(dbound, "mask"), "255.255.255.0", "{dbound}");
    assert_eq!(field(dbound, "domain"), DOMAIN, "{dbound}");
    g1.exec(&["ping", "-c", "1", "-W", "2", GW]).unwrap();
    g2.exec(&["ping", "-c", "1", "-W", "2", GW]).unwrap();

    // DNS on the gateway: a guest resolves another guest's hostname.
    let a = g2
        .sh(&format!(
            "dig @{GW} +time=3 +tries=1 +short guest1.{DOMAIN}"
        ))
        .unwrap();
    assert_eq!(a.trim(), ip1);
    let ptr = g2
        .sh(&format!("dig @{GW} +time=3 +tries=1 +short -x {ip1}"))
        .unwrap();
    assert_eq!(ptr.trim(), format!("guest1.{DOMAIN}."));

    // Renewals keep the addresses.
    let u = wait_events(&uev, "renew ", 1, Duration::from_secs(25));
    for l in u.lines().filter(|l| l.starts_with("renew ")) {
        assert_eq!(field(l, "ip"), ip1, "{u}");
    }
    let d = wait_events(&dev, "RENEW ", 2, Duration::from_secs(30));
    for l in d.lines().filter(|l| l.starts_with("RENEW ")) {
        assert_eq!(field(l, "ip"), ip2, "{d}");
    }
    // `kvnet dhcp leases`, JSON and table.
    let rows = leases(&k);
    assert_eq!(rows.len(), 2, "{rows:?}");
    let r1 = rows.iter().find(|r| r["ip"] == ip1.as_str()).unwrap();
    assert_eq!(r1["hostname"], "guest1");
    assert_eq!(r1["mac"], kvnet_tests::mac_fmt(&g1.mac));
    assert!(r1["expires_unix"].as_u64().unwrap() > 1_600_000_000);
    let t = k.cli(&["dhcp", "leases", "ho"]).unwrap();
    assert!(
        t.starts_with("MAC") && t.contains("EXPIRES") && t.contains(&ip2),
        "{t}"
    );
    assert!(t.contains("UTC"), "{t}");
    // The gateway port is trusted by role; guests are not.
    let ports = k.json(&["port", "list"]).unwrap();
    for p in ports.as_array().unwrap() {
        assert_eq!(p["trusted"], p["role"] == "gateway", "{p}");
    }

    // net del stops the servers and leaves the lease file.
    k.cli(&["net", "del", "ho"]).unwrap();
    let e = k.cli_err(&["dhcp", "leases", "ho"]).unwrap();
    assert!(e.contains("no network named 'ho'"), "{e}");
    assert!(lab.work_dir().join("state/dhcp/ho").is_dir());
    k.cli(&host_only("plain", &[])).unwrap();
    let e = k.cli_err(&["dhcp", "leases", "plain"]).unwrap();
    assert!(e.contains("has no DHCP server"), "{e}");
    // The same address and interface can serve again.
    k.cli(&["net", "del", "plain"]).unwrap();
    net_add(&k, "10.78.0.10,10.78.0.50", &["--domain", DOMAIN]);
    assert_eq!(leases(&k).len(), 2);
}

#[test]
fn static_host_pool_exhaustion_release_and_daemon_restart() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    // The MAC of the static host is known once its guest exists; create
    // the guests first, then the network, then the ports.
    let gs: Vec<GuestPort> = (1..=5)
        .map(|i| {
            let g = lab.add_guest_with(&format!("p{i}"), None).unwrap();
            g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1").unwrap();
            g
        })
        .collect();
    let host = format!("{},10.78.0.99,fixed", kvnet_tests::mac_fmt(&gs[4].mac));
    let opts = ["--dhcp-host", host.as_str(), "--domain", DOMAIN];
    let add_all = |k: &Kvnet| {
        net_add(k, "10.78.0.10,10.78.0.12", &opts);
        for i in 1..=5 {
            k.cli(&["port", "add", "ho", &format!("p{i}")]).unwrap();
        }
    };
    add_all(&k);
    for n in 0..2 {
        let b = udhcpc_once(&lab, &gs[4], &format!("fixed{n}"), "whatever", None).unwrap();
        assert_eq!(field(&b, "ip"), "10.78.0.99", "{b}");
        assert_eq!(field(&b, "hostname"), "fixed", "{b}");
    }
    let (first, ev) = udhcpc_daemon(&lab, &gs[0], "c1", "c1");
    let b1 = wait_first_event(&ev, "bound ", Duration::from_secs(15));
    let ip1 = field(&b1, "ip").to_string();
    let ip2 = field(&udhcpc_once(&lab, &gs[1], "c2", "c2", None).unwrap(), "ip").to_string();
    let ip3 = field(&udhcpc_once(&lab, &gs[2], "c3", "c3", None).unwrap(), "ip").to_string();
    let mut got = vec![ip1.clone(), ip2.clone(), ip3.clone()];
    got.sort();
    assert_eq!(got, ["10.78.0.10", "10.78.0.11", "10.78.0.12"]);
    // The fourth is refused cleanly...
    let e = udhcpc_once(&lab, &gs[3], "c4a", "c4", None).unwrap_err();
    assert!(e.contains("no lease"), "{e}");
    // ...and gets an address once the first releases (-R on SIGTERM).
    first.stop().unwrap();
    let end = Instant::now() + Duration::from_secs(5);
    while leases(&k).iter().any(|r| r["ip"] == ip1.as_str()) {
        assert!(Instant::now() < end, "release not seen: {:?}", leases(&k));
        sleep(Duration::from_millis(100));
    }
    let ip4 = field(&udhcpc_once(&lab, &gs[3], "c4b", "c4", None).unwrap(), "ip").to_string();
    assert_eq!(ip4, ip1);
    assert_eq!(leases(&k).len(), 4, "{:?}", leases(&k));

    // Everything removed (`kvnet down`; a plain stop would keep the network
    // running for the next daemon to adopt, see restart.rs), a new daemon
    // with the same state folder, the network re-added with the same
    // options: holders renew their own addresses, and the pool is still
    // full for a newcomer.
    k.cli(&["down"]).unwrap();
    drop(k);
    let k = Kvnet::start(&lab).unwrap();
    add_all(&k);
    assert_eq!(leases(&k).len(), 4, "{:?}", leases(&k));
    let e = udhcpc_once(&lab, &gs[0], "c1b", "c1", None).unwrap_err();
    assert!(e.contains("no lease"), "{e}");
    for (g, ip, tag) in [
        (&gs[1], &ip2, "c2"),
        (&gs[2], &ip3, "c3"),
        (&gs[3], &ip4, "c4"),
    ] {
        let b = udhcpc_once(&lab, g, &format!("{tag}r"), tag, Some(ip)).unwrap();
        assert_eq!(field(&b, "ip"), ip.as_str(), "{b}");
    }
    let b = udhcpc_once(&lab, &gs[4], "fixed-r", "x", None).unwrap();
    assert_eq!(field(&b, "ip"), "10.78.0.99", "{b}");
    let rows = leases(&k);
    let mut ips: Vec<&str> = rows.iter().map(|r| r["ip"].as_str().unwrap()).collect();
    ips.sort();
    assert_eq!(
        ips,
        ["10.78.0.10", "10.78.0.11", "10.78.0.12", "10.78.0.99"]
    );
}

/// A busybox udhcpd in guest `g` handing out .100-.110 of `net` (a /24
/// prefix like "10.79.0").
fn rogue_udhcpd(lab: &Lab, g: &GuestPort, net: &str) -> Proc {
    g.sh(&format!("ip addr add {net}.200/24 dev eth0")).unwrap();
    let conf = lab.work_dir().join(format!("udhcpd-{}.conf", g.hv_if));
    fs::write(
        &conf,
        format!(
            "start {net}.100\nend {net}.110\ninterface eth0\nmax_leases 10\n\
             lease_file {}\noption subnet 255.255.255.0\noption router {net}.200\n",
            lab.work_dir()
                .join(format!("udhcpd-{}.leases", g.hv_if))
                .display()
        ),
    )
    .unwrap();
    let mut cmd = Command::new("busybox");
    // -a: a short ARP probe of the address it offers (default 2 s).
    cmd.args(["udhcpd", "-f", "-a", "100"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let p = lab.spawn(&g.ns, cmd).unwrap();
    sleep(Duration::from_millis(300));
    assert!(p.is_running(), "udhcpd did not start");
    p
}

/// The rogue's offers on `port` are counted as `rogue_dhcp` drops.
fn wait_drops(k: &Kvnet, port: &str) {
    let end = Instant::now() + Duration::from_secs(5);
    while k.port_drops(port, "rogue_dhcp") == 0 {
        assert!(Instant::now() < end, "{}", k.cli(&["stats"]).unwrap());
        sleep(Duration::from_millis(100));
    }
}

#[test]
fn rogue_dhcp_server_in_a_guest_is_dropped_unless_trusted() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    // With kvnet's DHCP: the others only ever get kvnet's offers.
    net_add(&k, "10.78.0.10,10.78.0.50", &[]);
    let rogue = guest(&lab, &k, "p1");
    let client = guest(&lab, &k, "p2");
    let _r1 = rogue_udhcpd(&lab, &rogue, "10.78.0");
    for n in 0..3 {
        let b = udhcpc_once(&lab, &client, &format!("c{n}"), "c", None).unwrap();
        assert_eq!(field(&b, "serverid"), GW, "{b}");
        assert!(in_range(field(&b, "ip"), 10, 50), "{b}");
        assert_eq!(field(&b, "router"), GW, "{b}");
    }
    wait_drops(&k, "p1");

    // Without a kvnet server: an untrusted rogue reaches nobody.
    k.cli(&["net", "add", "iso"]).unwrap();
    let r2 = lab.add_guest_with("p3", None).unwrap();
    let c2 = lab.add_guest_with("p4", None).unwrap();
    k.cli(&["port", "add", "iso", "p3"]).unwrap();
    k.cli(&["port", "add", "iso", "p4"]).unwrap();
    let _r2 = rogue_udhcpd(&lab, &r2, "10.79.0");
    let e = udhcpc_once(&lab, &c2, "iso-a", "c", None).unwrap_err();
    assert!(e.contains("no lease"), "{e}");
    wait_drops(&k, "p3");
    // Trusted, the same server's offers go through.
    k.cli(&["port", "del", "p3"]).unwrap();
    k.cli(&["port", "add", "iso", "p3", "--trusted"]).unwrap();
    let b = udhcpc_once(&lab, &c2, "iso-b", "c", None).unwrap();
    assert_eq!(field(&b, "serverid"), "10.79.0.200", "{b}");
    let last: u8 = field(&b, "ip").rsplit('.').next().unwrap().parse().unwrap();
    assert!((100..=110).contains(&last), "{b}");
    assert_eq!(
        k.port_drops("p3", "rogue_dhcp"),
        0,
        "counters restart with the port"
    );
    let p3 = k.port("p3").unwrap();
    assert_eq!(p3["trusted"], true, "{p3}");
}

#[test]
fn qemu_guest_gets_lease_router_dns_through_kvnet() {
    if !privileged() {
        return;
    }
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    net_add(&k, "10.78.0.10,10.78.0.50", &["--domain", DOMAIN]);
    let tap = lab.add_tap("tap0").unwrap();
    k.cli(&["port", "add", "ho", &tap]).unwrap();
    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap,
            mac: "52:54:00:00:78:05".into(),
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
    assert!(in_range(&ip, 10, 50), "{lease}");
    assert_eq!(field(lease, "router"), GW, "{lease}");
    assert_eq!(field(lease, "dns"), GW, "{lease}");
    assert_eq!(field(lease, "domain"), DOMAIN, "{lease}");
    assert!(out.contains(&format!("inet {ip}/24")), "{out}");
    assert!(out.contains("PING-OK"), "{out}");
    assert!(out.contains(&format!("Address: {ip}")), "{out}");
    let rows = leases(&k);
    assert!(
        rows.iter().any(|r| r["ip"] == ip.as_str()
            && r["hostname"] == "vm1"
            && r["mac"] == "52:54:00:00:78:05"),
        "{rows:?}"
    );
}
