//! Issue 17: NAT66 (`--nat6`) with real clients. Guests with the kernel's
//! default sysctls take SLAAC addresses from kvnet's RA and reach an
//! outside that has no route to their prefix: ping6 and iperf3 -6 leave
//! with the uplink's address (checksums intact), a port forward reaches a
//! guest's server, traceroute6 shows the hops beyond the uplink, a guest
//! spoofing its neighbour's address cannot ride the neighbour's mapping,
//! and the table survives a daemon restart and goes with `net del`.
//!
//! The wire: guests -- kvnet (hv, uplink up0 2001:db8:ffff::1) -- out
//! (2001:db8:ffff::2, a router) -- far (2001:db8:fe::2).
use std::time::{Duration, Instant};

use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    lab::privileged,
    Capture, Frame, GuestPort, Lab, Outside,
};

const UP6: &str = "2001:db8:ffff::1";
const OUT6: &str = "2001:db8:ffff::2";
const FAR6: &str = "2001:db8:fe::2";
const GW6: &str = "2001:db8:1::1";

/// Polls `f` every 100 ms until it is Some, or panics after `t` saying `what`.
fn until<T>(what: &str, t: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + t;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The guest's SLAAC address in 2001:db8:1::/64.
fn slaac(g: &GuestPort) -> String {
    until("a SLAAC address", Duration::from_secs(15), || {
        let out = g
            .sh("ip -6 -o addr show dev eth0 scope global -tentative")
            .ok()?;
        out.split_whitespace()
            .filter_map(|w| w.split_once('/').map(|(a, _)| a))
            .find(|a| a.starts_with("2001:db8:1:"))
            .map(str::to_string)
    })
}

/// IPv6 source address, next header and payload of a frame.
fn ipv6(f: &Frame) -> Option<(std::net::Ipv6Addr, u8, &[u8])> {
    let p = f.payload();
    if f.ethertype() != 0x86dd {
        return None;
    }
    let src: [u8; 16] = p.get(8..24)?.try_into().ok()?;
    Some((src.into(), *p.get(6)?, p.get(40..)?))
}

/// A counter of /proc/net/snmp6 in `ns`.
fn snmp6(ns: &str, field: &str) -> u64 {
    kvnet_tests::lab::sh(
        ns,
        &format!("awk '$1==\"{field}\" {{print $2}}' /proc/net/snmp6"),
    )
    .ok()
    .and_then(|s| s.trim().parse().ok())
    .unwrap_or(0)
}

/// A UDP echo and a TCP "hello" server on [::]:`port` in `ns`.
fn servers6(lab: &Lab, ns: &str, port: u16) {
    let code = format!(
        r#"
import socket, threading
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::", {port}))
t = socket.socket(socket.AF_INET6); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("::", {port})); t.listen(64)
def udp():
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
threading.Thread(target=udp, daemon=True).start()
while True:
    c, a = t.accept(); c.sendall(("hello " + a[0]).encode()); c.close()
"#
    );
    let mut cmd = std::process::Command::new("python3");
    cmd.args(["-c", &code])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    lab.spawn(ns, cmd).unwrap();
    until("the IPv6 servers", Duration::from_secs(5), || {
        let s = kvnet_tests::lab::sh(ns, &format!("ss -Hltn 'sport = :{port}'")).ok()?;
        (!s.trim().is_empty()).then_some(())
    });
}

/// Sends `msg` from [::]:`sport` in `ns` to [dst]:`port` over UDP; the
/// echo, if one comes within 2 s.
fn udp6(ns: &str, sport: u16, dst: &str, port: u16, msg: &str) -> Option<String> {
    let code = format!(
        "import socket\n\
         s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n\
         s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('::', {sport})); s.settimeout(2)\n\
         s.sendto(b'{msg}', ('{dst}', {port}))\n\
         try:\n    print(s.recv(2048).decode())\n\
         except Exception:\n    print('-')\n"
    );
    let out = kvnet_tests::tools::py(ns, &code);
    let out = out.trim();
    (out != "-").then(|| out.to_string())
}

/// An IPv6 UDP packet with a correct checksum (hop limit 64).
fn udp6_packet(
    src: std::net::Ipv6Addr,
    dst: std::net::Ipv6Addr,
    sport: u16,
    dport: u16,
    data: &[u8],
) -> Vec<u8> {
    let len = (8 + data.len()) as u16;
    let mut udp = Vec::new();
    udp.extend_from_slice(&sport.to_be_bytes());
    udp.extend_from_slice(&dport.to_be_bytes());
    udp.extend_from_slice(&len.to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(data);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.octets());
    pseudo.extend_from_slice(&dst.octets());
    pseudo.extend_from_slice(&(len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, 17]);
    pseudo.extend_from_slice(&udp);
    if pseudo.len() % 2 == 1 {
        pseudo.push(0);
    }
    let mut sum: u32 = pseudo
        .chunks(2)
        .map(|w| u16::from_be_bytes([w[0], w[1]]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    udp[6..8].copy_from_slice(&if c == 0 { 0xffff } else { c }.to_be_bytes());
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&len.to_be_bytes());
    ip.extend_from_slice(&[17, 64]);
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    ip.extend_from_slice(&udp);
    ip
}

/// The lab: the outside router (and far behind it), guests p1 and p2 on
/// NAT66 network n66, kvnet started with `daemon_args` and `envs`.
fn nat66_lab(daemon_args: &[&str], envs: &[(&str, &str)]) -> (Lab, Outside, [GuestPort; 2], Kvnet) {
    let lab = Lab::new().unwrap();
    let out = lab.add_outside().unwrap();
    let far = lab.add_netns("far").unwrap();
    // The outside routes between the uplink's link and far's; it knows no
    // route to the guests' prefix.
    out.sh(&format!(
        "ip -6 addr add {OUT6}/64 dev eth0 nodad && \
         ip link add far0 type veth peer name eth0 netns {far} && \
         ip -6 addr add 2001:db8:fe::1/64 dev far0 nodad && ip link set far0 up && \
         sysctl -qw net.ipv6.conf.all.forwarding=1"
    ))
    .unwrap();
    lab.sh(
        &far,
        &format!("ip link set eth0 up && ip -6 addr add {FAR6}/64 dev eth0 nodad && ip -6 route add default via 2001:db8:fe::1"),
    )
    .unwrap();
    lab.sh(
        lab.hv(),
        &format!(
            "ip addr add 198.51.100.1/24 dev up0 && ip -6 addr add {UP6}/64 dev up0 nodad && \
             ip -6 route add 2001:db8:fe::/64 via {OUT6}"
        ),
    )
    .unwrap();
    let g1 = lab.add_guest("p1").unwrap();
    let g2 = lab.add_guest("p2").unwrap();
    let k = Kvnet::start_bin(&lab, &kvnet_bin().unwrap(), daemon_args, envs).unwrap();
    k.cli(&[
        "net",
        "add",
        "n66",
        "--mode",
        "nat",
        "--gateway",
        "10.66.0.1/24",
        "--uplink",
        "up0",
        "--gateway6",
        "2001:db8:1::1/64",
        "--nat6",
    ])
    .unwrap();
    for p in ["p1", "p2"] {
        k.cli(&["port", "add", "n66", p]).unwrap();
    }
    (lab, out, [g1, g2], k)
}

#[test]
fn nat66_masquerade_forwards_traceroute_and_no_hijack() {
    if !privileged() {
        return;
    }
    let (lab, out, [g1, g2], k) = nat66_lab(&[], &[]);
    let (a1, a2) = (slaac(&g1), slaac(&g2));
    let a1_ip: std::net::Ipv6Addr = a1.parse().unwrap();
    let up_ip: std::net::Ipv6Addr = UP6.parse().unwrap();
    until("g1's default route", Duration::from_secs(5), || {
        g1.sh("ip -6 route show default")
            .ok()?
            .contains("via fe80::")
            .then_some(())
    });

    // 1. ping6: the outside sees the uplink's address, never the guest's.
    let cap = Capture::start(&out.ns, "eth0").unwrap();
    assert!(g1.ping(OUT6), "g1 -> outside through NAT66");
    let frames = cap
        .stop_when("the translated echo request", Duration::from_secs(3), |f| {
            f.iter()
                .any(|f| ipv6(f).is_some_and(|(s, nh, p)| s == up_ip && nh == 58 && p[0] == 128))
        })
        .unwrap();
    assert!(
        !frames
            .iter()
            .any(|f| ipv6(f).is_some_and(|(s, ..)| s == a1_ip)),
        "g1's own address reached the outside"
    );

    // 2. iperf3 -6 (TCP), then UDP: checksums intact both ways.
    let v = kvnet_tests::tools::iperf3(&lab, &out.ns, OUT6, &g1.ns, &["-t", "2"]).unwrap();
    let (bytes, bps) = kvnet_tests::tools::received(&v);
    println!("NAT66 iperf3: {:.2} Gbit/s", bps / 1e9);
    assert!(bytes > 10_000_000, "{v}");
    servers6(&lab, &out.ns, 7);
    assert_eq!(
        udp6(&g1.ns, 40000, OUT6, 7, "mine").as_deref(),
        Some("mine")
    );
    for ns in [&out.ns, &g1.ns] {
        assert_eq!(
            kvnet_tests::tools::snmp(ns, "Tcp", "InCsumErrors"),
            0,
            "{ns}"
        );
        for f in ["Udp6InCsumErrors", "Icmp6InCsumErrors"] {
            assert_eq!(snmp6(ns, f), 0, "{f} in {ns}");
        }
    }
    // The table shows the flows, translated to the uplink's address.
    let ct = k.json(&["conntrack", "list", "n66"]).unwrap();
    let udp = ct
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["proto"] == "udp" && r["orig"]["saddr"] == a1.as_str())
        .unwrap_or_else(|| panic!("no IPv6 UDP flow of g1 in {ct}"));
    assert_eq!(udp["translated"]["saddr"], UP6, "{udp}");
    assert_eq!(udp["orig"]["sport"], 40000, "{udp}");
    let text = k.cli(&["conntrack", "list", "n66"]).unwrap();
    assert!(text.contains(&format!("[{a1}]:40000")), "{text}");

    // 3. A port forward on the uplink's IPv6 address to g2's server.
    servers6(&lab, &g2.ns, 22);
    k.cli(&[
        "forward",
        "add",
        "n66",
        "--proto",
        "tcp",
        "--port",
        "2222",
        "--to",
        &format!("[{a2}]:22"),
    ])
    .unwrap();
    let fw = k.json(&["forward", "list", "n66"]).unwrap();
    assert_eq!(fw[0]["to"]["addr"], a2.as_str(), "{fw}");
    let hello = kvnet_tests::tools::py(
        &out.ns,
        &format!(
            "import socket\ns = socket.create_connection(('{UP6}', 2222), timeout=3)\nprint(s.recv(100).decode())\n"
        ),
    );
    assert_eq!(hello.trim(), format!("hello {OUT6}"), "through the forward");

    // 4. traceroute6 through NAT66: the gateway, the outside router, far.
    let trace = g1
        .sh(&format!(
            "busybox traceroute6 -n -q 1 -w 2 -m 6 {FAR6} 2>&1"
        ))
        .unwrap();
    println!("{trace}");
    for hop in [GW6, OUT6, FAR6] {
        assert!(trace.contains(hop), "hop {hop} missing:\n{trace}");
    }

    // 5. g2 spoofs g1's address, on g1's flow and on a new one: the IPv6
    // source guard (first come, first bound) drops both at its port;
    // nothing leaves, nothing is answered.
    let gw_mac = k.json(&["net", "show", "n66"]).unwrap()["gateway"]["mac"]
        .as_str()
        .unwrap()
        .to_string();
    let gw_mac = kvnet_tests::mac_parse(&gw_mac).unwrap();
    let spoof = |sport: u16, msg: &str| {
        let ip = udp6_packet(a1_ip, OUT6.parse().unwrap(), sport, 7, msg.as_bytes());
        let frame = kvnet_tests::inject::eth_frame(gw_mac, g2.mac, 0x86dd, &ip);
        kvnet_tests::inject::inject(&g2.ns, "eth0", &[frame]).unwrap();
    };
    let before = k.port_drops("p2", "ip_spoof");
    let outcap = Capture::start(&out.ns, "eth0").unwrap();
    let g1cap = Capture::start(&g1.ns, "eth0").unwrap();
    let g2cap = Capture::start(&g2.ns, "eth0").unwrap();
    spoof(40000, "hijack");
    spoof(40001, "spoof2");
    // UDP carrying `msg` from `src` (each capture also sees what its own
    // side sent).
    let has = |frames: &[Frame], src: &str, msg: &str| {
        let src: std::net::Ipv6Addr = src.parse().unwrap();
        frames.iter().any(|f| {
            ipv6(f).is_some_and(|(s, nh, p)| {
                s == src && nh == 17 && p.windows(msg.len()).any(|w| w == msg.as_bytes())
            })
        })
    };
    // The positive control: g2's capture holds both spoofs as sent.
    let g2frames = g2cap
        .stop_when("g2's spoofed packets", Duration::from_secs(3), |f| {
            has(f, &a1, "hijack") && has(f, &a1, "spoof2")
        })
        .unwrap();
    let drops = until(
        "the spoofed packets counted",
        Duration::from_secs(3),
        || {
            let n = k.port_drops("p2", "ip_spoof");
            (n >= before + 2).then_some(n)
        },
    );
    assert!(drops >= before + 2);
    let outframes = outcap.stop().unwrap();
    assert!(
        !has(&outframes, UP6, "hijack") && !has(&outframes, UP6, "spoof2"),
        "a spoofed packet left through the NAT"
    );
    assert!(
        !has(&g1cap.stop().unwrap(), OUT6, "spoof2"),
        "an answer to a spoofed packet reached g1"
    );
    assert!(
        !has(&g2frames, OUT6, "spoof2"),
        "g2 got a reply to g1's address"
    );
    // g1's flow itself is untouched.
    assert_eq!(
        udp6(&g1.ns, 40000, OUT6, 7, "again").as_deref(),
        Some("again")
    );

    // 6. A restarted daemon keeps the table (pinned) and translates on.
    k.stop().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let ct = k.json(&["conntrack", "list", "n66"]).unwrap();
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|r| r["orig"]["saddr"] == a1.as_str()),
        "IPv6 flows lost over the restart: {ct}"
    );
    assert_eq!(
        udp6(&g1.ns, 40000, OUT6, 7, "after").as_deref(),
        Some("after")
    );
    assert!(g1.ping(OUT6), "g1 -> outside after the restart");

    // 7. net del takes its IPv6 flows along.
    k.cli(&["net", "del", "n66"]).unwrap();
    let left = lab
        .sh(
            lab.hv(),
            &format!(
                "bpftool map dump pinned {}/ct6 | tail -1",
                lab.pin_dir().display()
            ),
        )
        .unwrap();
    assert!(left.contains("Found 0 elements"), "{left}");
}

/// The guest's conntrack quota counts its IPv6 flows (a quota of 64 with
/// `--ct-max 1024`), and the GC expires them (timeouts / 100), after which
/// the guest opens new ones again.
#[test]
fn nat66_flows_count_against_the_quota_and_expire() {
    if !privileged() {
        return;
    }
    let (lab, out, [g1, _g2], k) =
        nat66_lab(&["--ct-max", "1024"], &[("KVNET_CT_TIME_SCALE", "100")]);
    slaac(&g1);
    servers6(&lab, &out.ns, 7);
    // 100 flows at once (a socket each), then the echoes that came back.
    let code = format!(
        "import socket, time\n\
         socks = []\n\
         for i in range(100):\n    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); s.setblocking(False)\n    s.bind(('::', 41000 + i)); s.sendto(b'q', ('{OUT6}', 7)); socks.append(s)\n\
         time.sleep(1)\n\
         n = 0\n\
         for s in socks:\n    try:\n        s.recv(16); n += 1\n    except BlockingIOError:\n        pass\n\
         print(n)\n"
    );
    let answered: u32 = kvnet_tests::tools::py(&g1.ns, &code)
        .trim()
        .parse()
        .unwrap();
    let refused = k.port_drops("p1", "ct_quota");
    assert!(
        (60..=64).contains(&answered),
        "{answered} flows answered over a quota of 64"
    );
    assert!(refused >= 36, "ct_quota drops: {refused}");
    // Idle UDP (assured: 1.2 s scaled) goes with the GC walk.
    until("the IPv6 flows expired", Duration::from_secs(20), || {
        let ct = k.json(&["conntrack", "list", "n66"]).ok()?;
        ct.as_array()?.is_empty().then_some(())
    });
    assert_eq!(
        udp6(&g1.ns, 42000, OUT6, 7, "fresh").as_deref(),
        Some("fresh")
    );
}
