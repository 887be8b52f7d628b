//! `cargo xtask run` with no arguments: the showcase. Builds a throw-away
//! lab (namespaces only; the root namespace is never touched), runs kvnet in
//! it, shows every working capability once and tears everything down.
use std::{
    path::Path,
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use kvnet_tests::{
    guest::{default_cache_dir, Image, Vm, VmSpec, READY},
    kvnet::Kvnet,
    tools, GuestPort, Lab, Outside,
};

fn step(n: u32, title: &str) {
    println!("\n\x1b[1m== {n}. {title}\x1b[0m");
}

fn show(k: &Kvnet, args: &[&str]) -> Result<()> {
    println!("$ kvnet {}", args.join(" "));
    print!("{}", k.cli(args)?);
    Ok(())
}

/// Runs a kvnet command, echoing it.
fn kv(k: &Kvnet, args: &[&str]) -> Result<()> {
    println!("$ kvnet {}", args.join(" "));
    k.cli(args).map(|_| ())
}

fn ping(g: &GuestPort, ip: &str) -> bool {
    g.exec(&["ping", "-c", "2", "-i", "0.2", "-W", "1", ip])
        .is_ok()
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "ok"
    } else {
        "unreachable"
    }
}

/// A UDP reflector answering each datagram with the address and port it
/// came from, as a STUN server does.
const REFLECTOR: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 3478))
while True:
    d, a = s.recvfrom(64)
    s.sendto(("%s:%d" % a).encode(), a)
"#;

/// One guest socket asks two reflectors what they see.
const STUN_CLIENT: &str = r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", 45000))
s.settimeout(2)
for server in ("198.51.100.2", "198.51.100.3"):
    for _ in range(3):
        s.sendto(b"?", (server, 3478))
        try:
            print(server, s.recvfrom(64)[0].decode())
            break
        except socket.timeout:
            pass
"#;

/// Endpoint-independent mapping (the NAT's default for UDP): one guest
/// socket, two outside servers, one mapped address and port.
fn stun_check(lab: &Lab, out: &Outside, guest: &GuestPort) -> Result<bool> {
    out.sh("ip addr add 198.51.100.3/24 dev eth0")?;
    let mut reflector = Command::new("python3");
    reflector
        .args(["-c", REFLECTOR])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(&out.ns, reflector)?;
    let seen = lab.exec_output(&guest.ns, &["python3", "-c", STUN_CLIENT])?;
    let text = String::from_utf8_lossy(&seen.stdout).to_string();
    let mapped: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    println!("  UDP from guest port 45000, as two outside servers see it:");
    for l in text.lines() {
        println!("    {l}");
    }
    Ok(mapped.len() == 2 && mapped[0] == mapped[1])
}

/// Where the demo's daemon serves Prometheus metrics (hv's loopback).
const METRICS: &str = "127.0.0.1:9477";

pub fn run(kvnet: &Path) -> Result<()> {
    std::env::set_var("KVNET_BIN", kvnet);
    let mut failures = Vec::new();
    let mut expect = |what: &str, got: bool, want: bool| {
        println!(
            "  {what}: {}{}",
            verdict(got),
            if got == want { "" } else { "   <-- UNEXPECTED" }
        );
        if got != want {
            failures.push(what.to_string());
        }
    };

    step(1, "lab: a hypervisor namespace, guests, an outside network behind uplink up0, a tap for a real VM");
    let lab = Lab::new()?;
    let mk = |port: &str, ip: Option<&str>| -> Result<GuestPort> {
        let g = lab.add_guest_with(port, ip)?;
        g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1")?;
        Ok(g)
    };
    let blue = [
        mk("vnet0", Some("10.20.0.1/24"))?,
        mk("vnet1", Some("10.20.0.2/24"))?,
        mk("vnet2", Some("10.20.0.3/24"))?,
    ];
    let red = mk("vnet3", Some("10.20.0.11/24"))?;
    let green = [
        mk("vnet5", Some("10.30.0.1/24"))?,
        mk("vnet6", Some("10.30.0.2/24"))?,
        mk("vnet7", Some("10.30.0.3/24"))?,
    ];
    let nat_guest = mk("vnet4", None)?;
    // Step 12's guest keeps the kernel's IPv6 defaults (accept_ra=1).
    let v6_guest = lab.add_guest("vnet8")?;
    let bond_guest = mk("vnet9", Some("192.0.2.11/24"))?;
    let out = lab.add_outside()?;
    out.set_ip("198.51.100.2/24")?;
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "198.51.100.1/24", "dev", "up0"],
    )?;
    let tap = lab.add_tap("tap0")?;
    println!(
        "hypervisor namespace {0} (enter: nsenter --net=/var/run/netns/{0})",
        lab.hv()
    );

    step(2, "kvnet daemon in the hypervisor namespace");
    // Loopback up: Prometheus scrapes the daemon there (step 10).
    lab.sh(lab.hv(), "ip link set lo up")?;
    let k = Kvnet::start_with(&lab, &["--metrics", METRICS])?;
    println!(
        "control socket {}, pins under {}",
        k.socket().display(),
        lab.pin_dir().display()
    );

    step(
        3,
        "L2 switching in eBPF with VLANs: blue (access VLANs 10/20), red (isolated, same subnet)",
    );
    kv(&k, &["net", "add", "blue"])?;
    kv(&k, &["net", "add", "red"])?;
    kv(
        &k,
        &[
            "port", "add", "blue", "vnet0", "--vlan", "10", "--hook", "xdp",
        ],
    )?;
    kv(&k, &["port", "add", "blue", "vnet1", "--vlan", "10"])?;
    kv(&k, &["port", "add", "blue", "vnet2", "--vlan", "20"])?;
    kv(&k, &["port", "add", "red", "vnet3"])?;
    expect(
        "vnet0 -> vnet1 (VLAN 10)",
        ping(&blue[0], "10.20.0.2"),
        true,
    );
    expect(
        "vnet0 -> vnet2 (VLAN 20)",
        ping(&blue[0], "10.20.0.3"),
        false,
    );
    expect(
        "vnet0 -> red vnet3 (other network)",
        ping(&blue[0], "10.20.0.11"),
        false,
    );
    expect(
        "red vnet3 -> vnet0 (other network)",
        ping(&red, "10.20.0.1"),
        false,
    );
    kv(&k, &["port", "set", "vnet2", "--vlan", "10"])?;
    expect(
        "vnet0 -> vnet2 after moving it to VLAN 10 live",
        ping(&blue[0], "10.20.0.3"),
        true,
    );
    show(&k, &["vlan", "show", "blue"])?;
    show(&k, &["fdb", "show", "blue"])?;

    step(4, "TCP bulk between two guests (iperf3, default offloads)");
    let v = tools::iperf3(&lab, &blue[1].ns, "10.20.0.2", &blue[2].ns, &["-t", "2"])?;
    println!(
        "  vnet2 -> vnet1: {:.1} Gbit/s",
        tools::received(&v).1 / 1e9
    );

    step(
        5,
        "libvirt's default network: NAT behind up0's address, DHCP and DNS on the gateway",
    );
    kv(
        &k,
        &[
            "net",
            "add",
            "default",
            "--mode",
            "nat",
            "--gateway",
            "192.168.122.1/24",
            "--uplink",
            "up0",
            "--dhcp-range",
            "192.168.122.2,192.168.122.254",
            "--domain",
            "demo.test",
        ],
    )?;
    kv(&k, &["port", "add", "default", "vnet4"])?;
    let lease = nat_guest.sh("busybox udhcpc -i eth0 -q -n -t 5 -s /bin/true -x hostname:web 2>&1 | grep -i lease || true")?;
    // udhcpc's default script is not installed; configure what it obtained.
    let leases = k.json(&["dhcp", "leases", "default"])?;
    let ip = leases
        .as_array()
        .and_then(|l| l.first())
        .and_then(|l| l["ip"].as_str())
        .map(str::to_string);
    println!("  udhcpc: {}", lease.trim());
    show(&k, &["dhcp", "leases", "default"])?;
    if let Some(ip) = &ip {
        nat_guest.sh(&format!(
            "ip addr add {ip}/24 dev eth0; ip route add default via 192.168.122.1"
        ))?;
    }
    expect(
        "guest -> outside 198.51.100.2 through the NAT",
        ping(&nat_guest, "198.51.100.2"),
        true,
    );
    let v = tools::iperf3(&lab, &out.ns, "198.51.100.2", &nat_guest.ns, &["-t", "2"])?;
    println!(
        "  guest -> outside TCP through the NAT: {:.1} Gbit/s",
        tools::received(&v).1 / 1e9
    );
    show(&k, &["conntrack", "list", "default"])?;

    step(
        6,
        "a port forward: the outside reaches a guest's web server at up0:8080",
    );
    let www = lab.work_dir().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(
        www.join("index.html"),
        "hello from a guest behind kvnet's NAT\n",
    )?;
    let mut httpd = Command::new("busybox");
    httpd
        .args(["httpd", "-f", "-p", "80", "-h"])
        .arg(&www)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(&nat_guest.ns, httpd)?;
    if let Some(ip) = &ip {
        kv(
            &k,
            &[
                "forward",
                "add",
                "default",
                "--proto",
                "tcp",
                "--port",
                "8080",
                "--to",
                &format!("{ip}:80"),
            ],
        )?;
        thread::sleep(Duration::from_millis(300));
        let page = out.sh("busybox wget -q -O - http://198.51.100.1:8080/")?;
        println!(
            "  outside$ wget http://198.51.100.1:8080/ -> {}",
            page.trim()
        );
        expect(
            "port forward from the outside",
            page.contains("hello"),
            true,
        );
    }
    let one_mapping = stun_check(&lab, &out, &nat_guest)?;
    expect(
        "one mapping for one guest socket, whatever the remote (EIM)",
        one_mapping,
        true,
    );

    step(
        7,
        "port security, on by default: a guest that forges its address or MAC is stopped in the fast path",
    );
    show(&k, &["port", "show", "vnet4"])?;
    // The guest claims a neighbour's address, then another MAC.
    nat_guest.sh("ip addr add 192.168.122.250/24 dev eth0")?;
    let forged = lab
        .exec_output(
            &nat_guest.ns,
            &[
                "ping",
                "-c",
                "2",
                "-W",
                "1",
                "-I",
                "192.168.122.250",
                "198.51.100.2",
            ],
        )?
        .status
        .success();
    expect("ping from a forged source address", forged, false);
    nat_guest.sh("ip addr del 192.168.122.250/24 dev eth0")?;
    expect(
        "the guest's own address still works",
        ping(&nat_guest, "198.51.100.2"),
        true,
    );
    let ip_spoof = k.port_drops("vnet4", "ip_spoof");
    println!("  vnet4 drops ip_spoof: {ip_spoof}");
    expect("forged packets counted as ip_spoof", ip_spoof > 0, true);

    step(8, "a real qemu guest (virtio-net on tap0) joins the NAT network by DHCP and reaches the outside");
    kv(&k, &["port", "add", "default", &tap])?;
    match boot_vm(&lab, &tap) {
        Ok((text, rc)) => {
            print!("{text}");
            expect("qemu guest: DHCP lease, ping outside", rc == 0, true);
        }
        Err(e) => println!("  (skipped: {e:#})"),
    }

    step(
        9,
        "live counters (per port, per CPU summed; NAT counters) while vnet2 pings vnet0",
    );
    let mut p = Command::new("ping");
    p.args(["-i", "0.05", "-c", "40", "10.20.0.1"])
        .stdout(Stdio::null());
    lab.spawn(&blue[2].ns, p)?;
    for _ in 0..2 {
        thread::sleep(Duration::from_millis(800));
        show(&k, &["stats"])?;
    }

    step(
        10,
        "what an admin sees with bpftool in the hypervisor namespace",
    );
    println!("$ bpftool net show");
    print!("{}", lab.sh(lab.hv(), "bpftool net show")?);
    println!("$ ls {}", lab.pin_dir().display());
    print!(
        "{}",
        lab.sh(lab.hv(), &format!("ls {}", lab.pin_dir().display()))?
    );
    show(&k, &["net", "list"])?;
    println!(
        "$ curl -s http://{METRICS}/metrics | grep -E 'rx_packets|nat_translated'   (Prometheus)"
    );
    let scrape = lab.sh(
        lab.hv(),
        &format!("bash -c 'exec 3<>/dev/tcp/{}; printf \"GET /metrics HTTP/1.0\\r\\n\\r\\n\" >&3; cat <&3'", METRICS.replace(':', "/")),
    )?;
    let body = scrape.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    for l in body
        .lines()
        .filter(|l| {
            !l.starts_with('#') && (l.contains("rx_packets") || l.contains("nat_translated"))
        })
        .take(8)
    {
        println!("{l}");
    }
    let checked = (|| -> Result<std::process::Output> {
        use std::io::Write;
        let mut c = std::process::Command::new(crate::setup::PROMTOOL)
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()?;
        c.stdin
            .take()
            .context("promtool's stdin")?
            .write_all(body.as_bytes())?;
        Ok(c.wait_with_output()?)
    })();
    let promtool_ok = checked.as_ref().is_ok_and(|o| o.status.success());
    println!("$ ... | promtool check metrics");
    if !promtool_ok {
        println!("  {checked:?}");
    }
    expect("promtool check metrics", promtool_ok, true);

    step(
        11,
        "port policy: isolated ports, ARP answered by kvnet, storm control (network green)",
    );
    kv(&k, &["net", "add", "green", "--storm-pps", "100"])?;
    for (g, ip, isolated) in [
        (&green[0], "10.30.0.1", true),
        (&green[1], "10.30.0.2", true),
        (&green[2], "10.30.0.3", false),
    ] {
        let mac = kvnet_tests::mac_fmt(&g.mac);
        let mut args = vec!["port", "add", "green", &g.hv_if, "--mac", &mac, "--ip", ip];
        if isolated {
            args.push("--isolated");
        }
        kv(&k, &args)?;
    }
    expect(
        "isolated vnet5 -> open vnet7",
        ping(&green[0], "10.30.0.3"),
        true,
    );
    expect(
        "isolated vnet5 -> isolated vnet6",
        ping(&green[0], "10.30.0.2"),
        false,
    );
    let stat = |port: &str, field: &[&str]| -> u64 {
        k.json(&["stats"])
            .ok()
            .and_then(|s| {
                let row = s["ports"]
                    .as_array()?
                    .iter()
                    .find(|r| r["port"] == port)?
                    .clone();
                field
                    .iter()
                    .try_fold(row, |v, f| v.get(*f).cloned())?
                    .as_u64()
            })
            .unwrap_or(0)
    };
    let answered = stat("vnet5", &["arp_answered"]);
    println!("  ARP requests of vnet5 answered by kvnet (not flooded): {answered}");
    expect("vnet5's ARP answered in the datapath", answered > 0, true);
    let frame = kvnet_tests::eth_frame([0xff; 6], green[2].mac, 0x88b5, b"storm");
    kvnet_tests::inject(&green[2].ns, "eth0", &vec![frame; 2000])?;
    let cut = stat("vnet7", &["drops", "storm"]);
    println!("  vnet7 sent 2000 broadcasts at once; storm control (100/s) cut {cut}");
    expect("a broadcast storm cut and counted", cut > 1000, true);
    expect(
        "vnet7 -> vnet5 right after the storm",
        ping(&green[2], "10.30.0.1"),
        true,
    );
    show(&k, &["net", "show", "green"])?;

    step(
        12,
        "IPv6: a routed network; a guest with default sysctls takes a SLAAC address from kvnet's router advertisements and pings the outside",
    );
    let slaac = ipv6_step(&lab, &k, &out, &v6_guest)?;
    expect(
        "SLAAC address and default route from kvnet's RA",
        slaac.is_some(),
        true,
    );
    expect(
        "guest -> outside 2001:db8:ffff::2 over routed IPv6",
        ping(&v6_guest, OUTSIDE6),
        true,
    );
    if let Some(a) = &slaac {
        // Routed, not NATed: the outside reaches the guest's own address.
        expect(
            "outside -> the guest's own SLAAC address",
            kvnet_tests::lab::ping(&out.ns, a),
            true,
        );
    }

    step(
        13,
        "uplink group (kvnet as the bond): active-backup over m1,m2; m1's cable is pulled while a guest pings every 10 ms",
    );
    let (pings, failover) = bond_step(&lab, &k, &bond_guest)?;
    expect("guest -> outside over bond0 (m1)", pings.0, true);
    expect("m2 active, one failover counted", failover, true);
    expect("guest -> outside over bond0 (m2)", pings.1, true);

    step(
        14,
        "teardown: `kvnet down` removes everything kvnet installed, then the lab goes",
    );
    // (A plain stop or crash would keep the datapath forwarding for the
    // next daemon to adopt; `down` is the full removal.)
    kv(&k, &["down"])?;
    let pins_left = lab.pin_dir().exists();
    let status = k.stop()?;
    drop(lab);
    if !status.success() {
        bail!("kvnet daemon exited with {status}");
    }
    if pins_left {
        bail!("`kvnet down` left pins behind");
    }
    if !failures.is_empty() {
        bail!("unexpected results: {}", failures.join("; "));
    }
    println!("done; nothing left behind.");
    Ok(())
}

/// The outside's IPv6 address (step 12), behind up0's 2001:db8:ffff::1.
const OUTSIDE6: &str = "2001:db8:ffff::2";

/// Step 12's setup: IPv6 on the uplink and the outside (which routes the
/// guests' prefix back via the host), a routed network with `--gateway6`,
/// the guest on it. Returns the guest's SLAAC address once it has one and
/// a default route from the RA (None after 15 s).
fn ipv6_step(lab: &Lab, k: &Kvnet, out: &Outside, guest: &GuestPort) -> Result<Option<String>> {
    out.sh(&format!(
        "ip -6 addr add {OUTSIDE6}/64 dev eth0 nodad && ip -6 route add 2001:db8:1::/64 via 2001:db8:ffff::1"
    ))?;
    lab.sh(lab.hv(), "ip -6 addr add 2001:db8:ffff::1/64 dev up0 nodad")?;
    kv(
        k,
        &[
            "net",
            "add",
            "v6",
            "--mode",
            "routed",
            "--gateway",
            "10.40.0.1/24",
            "--uplink",
            "up0",
            "--gateway6",
            "2001:db8:1::1/64",
        ],
    )?;
    kv(k, &["port", "add", "v6", &guest.hv_if])?;
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let found = loop {
        let addr = guest.sh("ip -6 -o addr show dev eth0 scope global")?;
        let route = guest.sh("ip -6 route show default")?;
        let slaac = addr
            .split_whitespace()
            .filter_map(|w| w.split_once('/').map(|(a, _)| a))
            .find(|a| a.starts_with("2001:db8:1:"))
            .map(str::to_string);
        // (Usable once its duplicate address detection is done.)
        let ready = route.contains("proto ra") && !addr.contains("tentative");
        if let (Some(a), true) = (&slaac, ready) {
            println!("  guest$ ip -6 addr: {a} (SLAAC)");
            println!("  guest$ ip -6 route show default: {}", route.trim());
            break slaac;
        }
        if std::time::Instant::now() > deadline {
            println!("  no SLAAC address after 15 s: {addr} / {route}");
            break None;
        }
        thread::sleep(Duration::from_millis(200));
    };
    show(k, &["net", "show", "v6"])?;
    Ok(found)
}

/// Step 13: a LAN switch holding the far ends of m1 and m2 and a host
/// 192.0.2.100; group bond0 over m1,m2, a bridged
/// network on it with the guest. Returns (ping before, ping after) and
/// whether m2 took over with one failover counted.
fn bond_step(lab: &Lab, k: &Kvnet, guest: &GuestPort) -> Result<((bool, bool), bool)> {
    let lan = lab.add_lan_switch(&[("m1", "s1"), ("m2", "s2")], "192.0.2.100/24")?;
    kv(
        k,
        &[
            "uplink",
            "add",
            "bond0",
            "--members",
            "m1,m2",
            "--mode",
            "active-backup",
            "--primary",
            "m1",
            "--miimon",
            "100",
        ],
    )?;
    kv(
        k,
        &[
            "net", "add", "office", "--mode", "bridged", "--uplink", "bond0",
        ],
    )?;
    kv(k, &["port", "add", "office", &guest.hv_if])?;
    let before = ping(guest, "192.0.2.100");
    let mut cmd = Command::new("ping");
    cmd.args(["-q", "-i", "0.01", "-c", "150", "-W", "1", "192.0.2.100"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut pinger = lab.spawn(&guest.ns, cmd)?;
    thread::sleep(Duration::from_millis(300));
    println!("  switch$ ip link set s1 down   (m1 loses its carrier)");
    lab.sh(&lan.ns, "ip link set s1 down")?;
    let active =
        |k: &Kvnet| -> Result<serde_json::Value> { Ok(k.json(&["uplink", "show"])?[0].clone()) };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while active(k)?["active"] != "m2" && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    pinger.wait_timeout(Duration::from_secs(10))?;
    let mut text = String::new();
    if let Some(mut o) = pinger.stdout.take() {
        use std::io::Read;
        let _ = o.read_to_string(&mut text);
    }
    if let Some(l) = text.lines().find(|l| l.contains("transmitted")) {
        println!("  guest$ ping -i 0.01 across the failover: {}", l.trim());
    }
    show(k, &["uplink", "show"])?;
    let g = active(k)?;
    let failover = g["active"] == "m2" && g["failovers"] == 1;
    Ok(((before, ping(guest, "192.0.2.100")), failover))
}

/// Boots the lab's tiny VM with DHCP; returns its script output and rc.
fn boot_vm(lab: &Lab, tap: &str) -> Result<(String, i32)> {
    println!("  building/using the cached guest image (Debian kernel + busybox initramfs)...");
    let image = Image::ensure(&default_cache_dir())?;
    let script = "ip route\nping -c 3 -W 3 198.51.100.2\n".to_string();
    let vm = Vm::boot(
        lab,
        &image,
        VmSpec {
            tap: tap.to_string(),
            mac: "52:54:00:20:00:05".into(),
            ip: "dhcp".into(),
            script,
            ..VmSpec::default()
        },
    )?;
    println!("  booting (TCG; ~10 s)...");
    vm.wait_for(READY, Duration::from_secs(120))
        .context("guest boot")?;
    let rc = vm.wait_done(Duration::from_secs(120))?;
    Ok((vm.script_output(), rc))
}
