//! Port security: a hostile guest on a libvirt-like NAT network (gateway
//! 192.168.122.1/24, kvnet's DHCP, uplink to an outside at 198.51.100.2)
//! attacks its neighbour, the host and the NAT while the victim keeps a
//! ping and a TCP transfer running. Every attack must fail on the wire
//! (captures at the victim, the outside, the host's neighbour table), be
//! counted under the right drop reason, and a positive control in the same
//! run proves the capture would have seen it (the same frame with the
//! attacker's own MAC/address, or sent from a `--no-port-security` port,
//! does arrive). A second, small scenario checks the double-tag VLAN hop.
//!
//! The main test checks every attack and reports all failures at the end
//! (one line per attack and check) instead of stopping at the first one.
#[path = "support/libvirt_nat.rs"]
mod libvirt_nat;

use std::{
    collections::BTreeSet,
    fs,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use kvnet_tests::{
    eth_frame, inject,
    kvnet::{flow, Kvnet},
    lab::{self, privileged, read_mac},
    mac_fmt, Capture, Frame, GuestPort, Lab, Proc,
};
use libvirt_nat::{dhcp, echo_server, py, tcp_echo};
use nix::sys::signal::Signal;
use serde_json::Value;

const GW: &str = "192.168.122.1";
const GW_IP: [u8; 4] = [192, 168, 122, 1];
const OUTSIDE: &str = "198.51.100.2";
const OUTSIDE_IP: [u8; 4] = [198, 51, 100, 2];
const UPLINK_IP: [u8; 4] = [198, 51, 100, 1];
const FOREIGN_IP: [u8; 4] = [203, 0, 113, 77];
const ETH_TEST: u16 = 0x88b5;
/// The outside's TCP and UDP echo service.
const ECHO_PORT: u16 = 5000;

// ---------------------------------------------------------------------
// Frame building (checksums computed, so that a frame that got through
// would really be accepted by the receiver's stack).

fn sum16(data: &[u8], mut sum: u32) -> u32 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    sum
}

fn csum(data: &[u8], init: u32) -> u16 {
    let mut s = sum16(data, init);
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn ip4(s: &str) -> [u8; 4] {
    s.parse::<std::net::Ipv4Addr>().unwrap().octets()
}

fn ip4_fmt(a: [u8; 4]) -> String {
    std::net::Ipv4Addr::from(a).to_string()
}

/// An IPv4 packet (header checksum set) carrying `l4`.
fn ipv4_packet(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let tot = (20 + l4.len()) as u16;
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&tot.to_be_bytes());
    h.extend_from_slice(&[0x4b, 0x56, 0x40, 0, 64, proto, 0, 0]);
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let c = csum(&h, 0);
    h[10..12].copy_from_slice(&c.to_be_bytes());
    h.extend_from_slice(l4);
    h
}

/// An IPv4 UDP packet with a valid UDP checksum.
fn udp4(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let len = (8 + payload.len()) as u16;
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&len.to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    let mut ph = Vec::new();
    ph.extend_from_slice(&src);
    ph.extend_from_slice(&dst);
    ph.extend_from_slice(&[0, 17]);
    ph.extend_from_slice(&len.to_be_bytes());
    let mut c = csum(&u, sum16(&ph, 0));
    if c == 0 {
        c = 0xffff;
    }
    u[6..8].copy_from_slice(&c.to_be_bytes());
    ipv4_packet(src, dst, 17, &u)
}

/// An untagged IPv4 UDP frame.
#[allow(clippy::too_many_arguments)]
fn udp4_frame(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    eth_frame(dmac, smac, 0x0800, &udp4(src, dst, sport, dport, payload))
}

/// An ARP frame; `marker` goes into the Ethernet padding (ignored by every
/// ARP implementation, but it lets a capture tell the frames apart).
#[allow(clippy::too_many_arguments)]
fn arp_frame(
    dmac: [u8; 6],
    smac: [u8; 6],
    op: u16,
    sha: [u8; 6],
    spa: [u8; 4],
    tha: [u8; 6],
    tpa: [u8; 4],
    marker: &[u8],
) -> Vec<u8> {
    let mut a = vec![0, 1, 8, 0, 6, 4];
    a.extend_from_slice(&op.to_be_bytes());
    a.extend_from_slice(&sha);
    a.extend_from_slice(&spa);
    a.extend_from_slice(&tha);
    a.extend_from_slice(&tpa);
    a.extend_from_slice(marker);
    eth_frame(dmac, smac, 0x0806, &a)
}

/// A DHCP BOOTREPLY (an OFFER) for `chaddr`, offering `yiaddr` from
/// `server`; `marker` in the sname field.
fn bootreply(chaddr: [u8; 6], yiaddr: [u8; 4], server: [u8; 4], marker: &[u8]) -> Vec<u8> {
    let mut m = vec![2, 1, 6, 0, 0x13, 0x37, 0xbe, 0xef, 0, 0, 0x80, 0];
    m.extend_from_slice(&[0; 4]); // ciaddr
    m.extend_from_slice(&yiaddr);
    m.extend_from_slice(&server); // siaddr
    m.extend_from_slice(&[0; 4]); // giaddr
    let mut ch = [0u8; 16];
    ch[..6].copy_from_slice(&chaddr);
    m.extend_from_slice(&ch);
    let mut sname = [0u8; 64];
    sname[..marker.len()].copy_from_slice(marker);
    m.extend_from_slice(&sname);
    m.extend_from_slice(&[0u8; 128]);
    m.extend_from_slice(&[99, 130, 83, 99]);
    m.extend_from_slice(&[53, 1, 2]); // DHCPOFFER
    m.extend_from_slice(&[54, 4]);
    m.extend_from_slice(&server);
    m.extend_from_slice(&[1, 4, 255, 255, 255, 0, 3, 4]);
    m.extend_from_slice(&server); // router: the attacker
    m.extend_from_slice(&[6, 4]);
    m.extend_from_slice(&server); // DNS: the attacker
    m.extend_from_slice(&[51, 4, 0, 0, 0x0e, 0x10, 255]);
    m
}

/// fe80::/64 address from a MAC (modified EUI-64).
fn link_local(mac: [u8; 6]) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfe;
    a[1] = 0x80;
    a[8] = mac[0] ^ 2;
    a[9] = mac[1];
    a[10] = mac[2];
    a[11] = 0xff;
    a[12] = 0xfe;
    a[13] = mac[3];
    a[14] = mac[4];
    a[15] = mac[5];
    a
}

const ALL_NODES: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// An IPv6 frame with `next` header `l4`, whose checksum (at `csum_at`
/// inside `l4`) is computed over the pseudo header.
fn ipv6_frame(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    next: u8,
    mut l4: Vec<u8>,
    csum_at: usize,
) -> Vec<u8> {
    let mut ph = Vec::new();
    ph.extend_from_slice(&src);
    ph.extend_from_slice(&dst);
    ph.extend_from_slice(&(l4.len() as u32).to_be_bytes());
    ph.extend_from_slice(&[0, 0, 0, next]);
    let c = csum(&l4, sum16(&ph, 0));
    l4[csum_at..csum_at + 2].copy_from_slice(&c.to_be_bytes());
    let mut p = vec![0x60, 0, 0, 0];
    p.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    p.push(next);
    p.push(255);
    p.extend_from_slice(&src);
    p.extend_from_slice(&dst);
    p.extend_from_slice(&l4);
    eth_frame(dmac, smac, 0x86dd, &p)
}

/// ICMPv6 `body` (type, code, checksum placeholder, rest).
fn icmp6_frame(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    body: Vec<u8>,
) -> Vec<u8> {
    ipv6_frame(dmac, smac, src, dst, 58, body, 2)
}

fn udp6_frame(
    dmac: [u8; 6],
    smac: [u8; 6],
    src: [u8; 16],
    dst: [u8; 16],
    sport: u16,
    dport: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    ipv6_frame(dmac, smac, src, dst, 17, u, 6)
}

/// A router advertisement announcing 2001:db8:bad::/64 with `src` as router.
fn router_advert(smac: [u8; 6], marker: &[u8]) -> Vec<u8> {
    let mut b = vec![134, 0, 0, 0, 64, 0, 0x07, 0x08, 0, 0, 0, 0, 0, 0, 0, 0];
    b.extend_from_slice(&[1, 1]);
    b.extend_from_slice(&smac);
    b.extend_from_slice(&[
        3, 4, 64, 0xc0, 0, 0, 0x1c, 0x20, 0, 0, 0x0e, 0x10, 0, 0, 0, 0,
    ]);
    b.extend_from_slice(&[
        0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    b.extend_from_slice(marker);
    icmp6_frame(ALL_NODES_MAC, smac, link_local(smac), ALL_NODES, b)
}

/// Does the frame's bytes contain `marker` anywhere (past any tags)?
fn has(f: &Frame, marker: &[u8]) -> bool {
    f.data.windows(marker.len()).any(|w| w == marker)
}

fn count_marked(frames: &[Frame], marker: &[u8]) -> usize {
    frames.iter().filter(|f| has(f, marker)).count()
}

/// IPv6 next header and the first L4 byte (ICMPv6 type) and UDP ports.
fn ipv6_l4(f: &Frame) -> Option<(u8, u8, u16, u16)> {
    if f.ethertype() != 0x86dd {
        return None;
    }
    let p = f.payload();
    let next = *p.get(6)?;
    let l4 = p.get(40..44)?;
    Some((
        next,
        l4[0],
        u16::from_be_bytes([l4[0], l4[1]]),
        u16::from_be_bytes([l4[2], l4[3]]),
    ))
}

/// UDP ports of an IPv4 frame.
fn udp_ports(f: &Frame) -> Option<(u16, u16)> {
    if f.ipv4_proto()? != 17 {
        return None;
    }
    let p = f.payload();
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let u = p.get(ihl..ihl + 4)?;
    Some((
        u16::from_be_bytes([u[0], u[1]]),
        u16::from_be_bytes([u[2], u[3]]),
    ))
}

/// TCP destination port of an IPv4 frame.
fn tcp_dport(f: &Frame) -> Option<u16> {
    if f.ipv4_proto()? != 6 {
        return None;
    }
    let p = f.payload();
    let ihl = usize::from(p.first()? & 0x0f) * 4;
    let t = p.get(ihl..ihl + 4)?;
    Some(u16::from_be_bytes([t[2], t[3]]))
}

fn ts_of(t: SystemTime) -> Duration {
    t.duration_since(UNIX_EPOCH).unwrap()
}

// ---------------------------------------------------------------------
// Lab helpers.

/// Per-attack results: every check is recorded, failures are reported
/// together at the end.
#[derive(Default)]
struct Report {
    lines: Vec<String>,
    failures: Vec<String>,
}

impl Report {
    fn check(&mut self, attack: &str, what: &str, ok: bool, evidence: impl Into<String>) {
        let evidence = evidence.into();
        let line = if ok {
            // The first line of the evidence, shortened: enough to see
            // what was measured.
            let first = evidence.lines().next().unwrap_or("");
            let short: String = first.chars().take(160).collect();
            let more = if short.len() < evidence.len() {
                "..."
            } else {
                ""
            };
            format!("PASS [{attack}] {what} ({short}{more})")
        } else {
            format!("FAIL [{attack}] {what}: {evidence}")
        };
        println!("{line}");
        if !ok {
            self.failures.push(line.clone());
        }
        self.lines.push(line);
    }

    fn finish(self) {
        println!("\n==== hostile guest summary ====");
        for l in &self.lines {
            println!("{l}");
        }
        assert!(
            self.failures.is_empty(),
            "{} check(s) failed:\n{}",
            self.failures.len(),
            self.failures.join("\n")
        );
    }
}

/// Polls `f` every 50 ms for up to `t`; whether it became true.
fn wait_for(t: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + t;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until `port`'s `reason` drop counter reached `at_least`; returns
/// the counter as last read.
fn wait_drops(k: &Kvnet, port: &str, reason: &str, at_least: u64) -> u64 {
    let mut last = 0;
    wait_for(Duration::from_secs(3), || {
        last = k.port_drops(port, reason);
        last >= at_least
    });
    last
}

/// The neighbour entry for `ip` in `ns`: (lladdr, state), if any.
fn neigh(ns: &str, ip: &str) -> Option<(String, String)> {
    let o = lab::exec_output(ns, &["ip", "-j", "neigh", "show", ip]).ok()?;
    let v: Value = serde_json::from_slice(&o.stdout).ok()?;
    v.as_array()?.iter().find_map(|e| {
        let mac = e["lladdr"].as_str()?.to_string();
        let state = e["state"].to_string();
        Some((mac, state))
    })
}

fn neigh_mac(ns: &str, ip: &str) -> Option<String> {
    neigh(ns, ip).map(|(m, _)| m)
}

/// A process writing its stdout and stderr to a file of the lab.
fn spawn_logged(lab: &Lab, ns: &str, args: &[&str], log: &std::path::Path) -> Proc {
    let f = fs::File::create(log).unwrap();
    let mut cmd = Command::new(args[0]);
    cmd.args(&args[1..])
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f);
    lab.spawn(ns, cmd).unwrap()
}

/// The victim's background ping: every echo request answered (up to one
/// still in flight when it was stopped). Returns (ok, evidence).
fn ping_verdict(text: &str) -> (bool, String) {
    let mut seqs = BTreeSet::new();
    let mut dups = 0;
    for l in text.lines() {
        if let Some(s) = l.split("icmp_seq=").nth(1) {
            if l.contains("bytes from") {
                let n: u32 = s.split_whitespace().next().unwrap().parse().unwrap();
                if l.contains("DUP") {
                    dups += 1;
                } else {
                    seqs.insert(n);
                }
            }
        }
    }
    let transmitted: u32 = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    let max = seqs.iter().next_back().copied().unwrap_or(0);
    let missing: Vec<u32> = (1..=max).filter(|s| !seqs.contains(s)).collect();
    let ok = seqs.len() >= 100 && missing.is_empty() && transmitted <= max + 1;
    let summary = text
        .lines()
        .filter(|l| l.contains("transmitted") || l.contains("rtt"))
        .collect::<Vec<_>>()
        .join(" / ");
    (
        ok,
        format!(
            "{} replies, highest seq {max}, {transmitted} sent, missing seqs {missing:?}, {dups} duplicates; {summary}",
            seqs.len()
        ),
    )
}

/// The victim's background iperf3 (`-i 1`): every complete one-second
/// interval moved data at no less than 40 % of the paced rate and the
/// client reported no error. Returns (ok, evidence).
fn iperf_verdict(text: &str, paced_bps: f64) -> (bool, String) {
    let mut intervals = Vec::new();
    let mut retr_total = 0u64;
    for l in text.lines() {
        if !l.starts_with('[')
            || !l.contains("bits/sec")
            || l.contains("sender")
            || l.contains("receiver")
        {
            continue;
        }
        let t: Vec<&str> = l.split_whitespace().collect();
        let Some(i) = t.iter().position(|w| *w == "sec") else {
            continue;
        };
        let Some((a, b)) = t[i - 1].split_once('-') else {
            continue;
        };
        let (a, b): (f64, f64) = (a.parse().unwrap_or(0.0), b.parse().unwrap_or(0.0));
        let amount: f64 = t[i + 1].parse().unwrap_or(0.0);
        let unit = match t[i + 2] {
            "GBytes" => 1024.0 * 1024.0 * 1024.0,
            "MBytes" => 1024.0 * 1024.0,
            "KBytes" => 1024.0,
            _ => 1.0,
        };
        if let Some(r) = t.get(i + 5).and_then(|r| r.parse::<u64>().ok()) {
            retr_total += r;
        }
        intervals.push((a, b, amount * unit));
    }
    let full: Vec<&(f64, f64, f64)> = intervals.iter().filter(|(a, b, _)| b - a >= 0.9).collect();
    let min_bytes = paced_bps / 8.0 * 0.4;
    let slow: Vec<String> = full
        .iter()
        .filter(|(_, _, bytes)| *bytes < min_bytes)
        .map(|(a, b, bytes)| format!("{a:.0}-{b:.0}s: {:.0} KB", bytes / 1024.0))
        .collect();
    let errors: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("error") && !l.contains("interrupt"))
        .collect();
    let ok = full.len() >= 3 && slow.is_empty() && errors.is_empty();
    (
        ok,
        format!(
            "{} full intervals, stalled/slow: {slow:?}, errors: {errors:?}, retransmits {retr_total}",
            full.len()
        ),
    )
}

// ---------------------------------------------------------------------
// The main scenario.

struct Scene {
    lab: Lab,
    k: Kvnet,
    victim: GuestPort,
    attacker: GuestPort,
    open: GuestPort,
    other: GuestPort,
    vip: String,
    aip: String,
    oip: String,
    xip: String,
    gw_mac: [u8; 6],
    gw_iface: String,
    gw_port: String,
}

fn scene() -> Scene {
    let lab = Lab::new().unwrap();
    lab.add_outside_with(&format!("{OUTSIDE}/24"), "198.51.100.1/24")
        .unwrap();
    let mk = |name: &str| {
        let g = lab.add_guest_with(name, None).unwrap();
        g.disable_ipv6().unwrap();
        g
    };
    let victim = mk("victim");
    let attacker = mk("attacker");
    let open = mk("open");
    let other = mk("other");
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&[
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
        "--nat-ports",
        "10000-19999",
    ])
    .unwrap();
    k.cli(&[
        "net",
        "add",
        "second",
        "--mode",
        "nat",
        "--gateway",
        "192.168.123.1/24",
        "--uplink",
        "up0",
        "--dhcp-range",
        "192.168.123.2,192.168.123.254",
        "--nat-ports",
        "20000-29999",
    ])
    .unwrap();
    k.cli(&["port", "add", "default", "victim"]).unwrap();
    k.cli(&["port", "add", "default", "attacker"]).unwrap();
    k.cli(&["port", "add", "default", "open", "--no-port-security"])
        .unwrap();
    k.cli(&["port", "add", "second", "other"]).unwrap();
    let vip = dhcp(&lab, &victim, "victim");
    let aip = dhcp(&lab, &attacker, "attacker");
    let oip = dhcp(&lab, &open, "open");
    let xip = dhcp(&lab, &other, "other");
    assert!(xip.starts_with("192.168.123."), "{xip}");
    let net = k.json(&["net", "show", "default"]).unwrap();
    let gw_iface = net["gateway"]["iface"].as_str().unwrap().to_string();
    let gw_port = net["port_details"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "gateway")
        .unwrap()["iface"]
        .as_str()
        .unwrap()
        .to_string();
    let gw_mac = read_mac(lab.hv(), &gw_iface).unwrap();
    Scene {
        lab,
        k,
        victim,
        attacker,
        open,
        other,
        vip,
        aip,
        oip,
        xip,
        gw_mac,
        gw_iface,
        gw_port,
    }
}

#[test]
fn a_hostile_guest_cannot_spoof_poison_flood_or_hijack() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let s = scene();
    let (lab, k) = (&s.lab, &s.k);
    let (victim, attacker, open, other) = (&s.victim, &s.attacker, &s.open, &s.other);
    let (am, vm, om) = (attacker.mac, victim.mac, open.mac);
    let (vip, aip, oip) = (ip4(&s.vip), ip4(&s.aip), ip4(&s.oip));
    let gw_mac = s.gw_mac;
    let hv = lab.hv().to_string();
    let out_ns = format!("kvnet-{}-out", lab.suffix());
    let out_mac = read_mac(&out_ns, "eth0").unwrap();
    let up0_mac = read_mac(&hv, "up0").unwrap();
    let mut r = Report::default();
    println!(
        "victim {} ({}), attacker {} ({}), open {} ({}), other {}; gateway {} ({})",
        s.vip,
        mac_fmt(&vm),
        s.aip,
        mac_fmt(&am),
        s.oip,
        mac_fmt(&om),
        s.xip,
        mac_fmt(&gw_mac),
        s.gw_iface
    );

    // ---- port show: what the attacker's port is bound to.
    let show = k.json(&["port", "show", "attacker"]).unwrap();
    r.check(
        "port show",
        "attacker: security mac+ip, max_macs 1, its MAC, its DHCP address",
        show["iface"] == "attacker"
            && show["net"] == "default"
            && show["security"] == "mac+ip"
            && show["max_macs"] == 1
            && show["macs"] == serde_json::json!([mac_fmt(&am)])
            && show["ips"] == serde_json::json!([s.aip]),
        format!("{show}"),
    );
    let show = k.json(&["port", "show", "open"]).unwrap();
    r.check(
        "port show",
        "open (--no-port-security): security off",
        show["security"] == "off",
        format!("{show}"),
    );

    // ---- background: the victim's ping and TCP transfer to the outside.
    echo_server(lab, &out_ns, ECHO_PORT).unwrap();
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", OUTSIDE])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(&out_ns, srv).unwrap();
    assert!(
        wait_for(Duration::from_secs(5), || lab::sh(
            &out_ns,
            "ss -Hltn 'sport = :5201'"
        )
        .map(|s| !s.trim().is_empty())
        .unwrap_or(false)),
        "iperf3 server did not start"
    );
    let iperf_log = lab.work_dir().join("iperf3-victim.log");
    const PACED: f64 = 20e6;
    let iperf = spawn_logged(
        lab,
        &victim.ns,
        &[
            "iperf3",
            "-c",
            OUTSIDE,
            "-t",
            "600",
            "-b",
            "20M",
            "-i",
            "1",
            "--forceflush",
        ],
        &iperf_log,
    );
    assert!(
        wait_for(Duration::from_secs(5), || fs::read_to_string(&iperf_log)
            .unwrap_or_default()
            .contains(" sec ")),
        "victim's iperf3 did not start: {}",
        fs::read_to_string(&iperf_log).unwrap_or_default()
    );
    let ping_log = lab.work_dir().join("ping-victim.log");
    let ping = spawn_logged(lab, &victim.ns, &["ping", "-i", "0.05", OUTSIDE], &ping_log);
    assert!(
        wait_for(Duration::from_secs(5), || fs::read_to_string(&ping_log)
            .unwrap_or_default()
            .contains("bytes from")),
        "victim's ping got no reply: {}",
        fs::read_to_string(&ping_log).unwrap_or_default()
    );

    // ==== 1. IPv4 source spoofing to the outside.
    {
        let a = "1 ip spoof";
        let before = k.port_drops("attacker", "ip_spoof");
        let cap = Capture::start(&out_ns, "eth0").unwrap();
        let spoofs = [
            (vip, &b"spoof-as-victim"[..]),
            (FOREIGN_IP, &b"spoof-as-foreign"[..]),
            (GW_IP, &b"spoof-as-gateway"[..]),
        ];
        let frames: Vec<Vec<u8>> = spoofs
            .iter()
            .map(|(src, m)| udp4_frame(gw_mac, am, *src, OUTSIDE_IP, 31339, 9999, m))
            .collect();
        inject(&attacker.ns, "eth0", &frames).unwrap();
        // Controls: the attacker's own address; the victim's address from
        // the unguarded port.
        inject(
            &attacker.ns,
            "eth0",
            &[udp4_frame(
                gw_mac,
                am,
                aip,
                OUTSIDE_IP,
                31338,
                9999,
                b"spoof-ctl-own",
            )],
        )
        .unwrap();
        inject(
            &open.ns,
            "eth0",
            &[udp4_frame(
                gw_mac,
                om,
                vip,
                OUTSIDE_IP,
                31337,
                9999,
                b"spoof-ctl-open",
            )],
        )
        .unwrap();
        let n = wait_drops(k, "attacker", "ip_spoof", before + 3);
        // Both controls, sent after the spoofs, are in: so would a spoof be.
        let f = cap
            .stop_when("both controls", Duration::from_secs(3), |f| {
                count_marked(f, b"spoof-ctl-own") > 0 && count_marked(f, b"spoof-ctl-open") > 0
            })
            .unwrap_or_else(|e| {
                r.check(
                    a,
                    "controls captured at the outside",
                    false,
                    format!("{e:#}"),
                );
                Vec::new()
            });
        for (src, m) in &spoofs {
            let got = count_marked(&f, m);
            r.check(
                a,
                &format!("nothing with source {} reaches the outside", ip4_fmt(*src)),
                got == 0,
                format!(
                    "{got} frame(s) marked {:?} at the outside",
                    String::from_utf8_lossy(m)
                ),
            );
        }
        let raw: Vec<String> = f
            .iter()
            .filter_map(|x| x.ipv4_addrs())
            .filter(|(src, _)| *src == vip || *src == FOREIGN_IP || *src == GW_IP)
            .map(|(src, dst)| format!("{} -> {}", ip4_fmt(src), ip4_fmt(dst)))
            .collect();
        r.check(
            a,
            "no guest/foreign source address on the uplink wire",
            raw.is_empty(),
            format!("{raw:?}"),
        );
        // The datagrams as they left the uplink (the outside's ICMP port
        // unreachable quotes them too: not counted).
        let sent = |m: &[u8]| -> Vec<String> {
            f.iter()
                .filter(|x| {
                    x.src_mac() == up0_mac
                        && udp_ports(x).is_some_and(|(_, d)| d == 9999)
                        && has(x, m)
                })
                .map(|x| ip4_fmt(x.ipv4_addrs().unwrap().0))
                .collect()
        };
        let own = sent(b"spoof-ctl-own");
        r.check(
            a,
            "control: attacker's own address arrives (translated)",
            own == [ip4_fmt(UPLINK_IP)],
            format!("sources on the uplink: {own:?}"),
        );
        let opn = sent(b"spoof-ctl-open");
        r.check(
            a,
            "control: victim's address from the --no-port-security port arrives",
            opn == [ip4_fmt(UPLINK_IP)],
            format!("sources on the uplink: {opn:?}"),
        );
        r.check(
            a,
            "ip_spoof counted (>= 3 more)",
            n >= before + 3,
            format!("ip_spoof {before} -> {n}"),
        );
    }

    // ==== 2. MAC theft: the victim's (and the gateway's) MAC as source.
    {
        let a = "2 mac theft";
        let before = k.port_drops("attacker", "mac_spoof");
        let fdb_port = |mac: &[u8; 6]| -> Vec<String> {
            k.fdb("default")
                .iter()
                .filter(|e| e["mac"] == mac_fmt(mac).as_str())
                .map(|e| e["port"].as_str().unwrap_or("").to_string())
                .collect()
        };
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let co = Capture::start(&open.ns, "eth0").unwrap();
        let cx = Capture::start(&out_ns, "eth0").unwrap();
        let mut frames = Vec::new();
        for i in 0..20u8 {
            frames.push(eth_frame(
                [0xff; 6],
                vm,
                ETH_TEST,
                &[b"mac-theft-bcast-".as_slice(), &[i]].concat(),
            ));
            frames.push(udp4_frame(
                gw_mac,
                vm,
                vip,
                OUTSIDE_IP,
                31340,
                9999,
                b"mac-theft-ip",
            ));
        }
        frames.push(eth_frame([0xff; 6], gw_mac, ETH_TEST, b"mac-theft-gateway"));
        inject(&attacker.ns, "eth0", &frames).unwrap();
        let injected_at = ts_of(SystemTime::now());
        // Controls: the attacker's own MAC, same broadcast; its own MAC and
        // address, same datagram to the outside.
        inject(
            &attacker.ns,
            "eth0",
            &[
                eth_frame([0xff; 6], am, ETH_TEST, b"mac-theft-ctl-own"),
                udp4_frame(
                    gw_mac,
                    am,
                    aip,
                    OUTSIDE_IP,
                    31341,
                    9999,
                    b"mac-theft-ctl-ip",
                ),
            ],
        )
        .unwrap();
        let n = wait_drops(k, "attacker", "mac_spoof", before + 41);
        // Each capture is stopped once the control that follows the
        // attack on its path is in (and the victim has had two echo
        // replies since): no settling time.
        let mut stop = |c: Capture, where_: &str, done: &dyn Fn(&[Frame]) -> bool| {
            c.stop_when(where_, Duration::from_secs(3), done)
                .unwrap_or_else(|e| {
                    r.check(
                        a,
                        &format!("control captured at {where_}"),
                        false,
                        format!("{e:#}"),
                    );
                    Vec::new()
                })
        };
        let replies_since = |f: &[Frame]| {
            f.iter()
                .filter(|f| {
                    f.ts > injected_at
                        && f.icmp_type() == Some(0)
                        && f.ipv4_addrs().is_some_and(|(_, d)| d == vip)
                })
                .count()
        };
        let fv = stop(cv, "the victim", &|f| {
            count_marked(f, b"mac-theft-ctl-own") > 0 && replies_since(f) >= 2
        });
        let fo = stop(co, "'open'", &|f| count_marked(f, b"mac-theft-ctl-own") > 0);
        let fx = stop(cx, "the outside", &|f| {
            count_marked(f, b"mac-theft-ctl-ip") > 0
        });
        let where_v = fdb_port(&vm);
        r.check(
            a,
            "victim's MAC stays learned on the victim's port only",
            where_v == ["victim"],
            format!("fdb rows for {}: {where_v:?}", mac_fmt(&vm)),
        );
        let where_g = fdb_port(&gw_mac);
        r.check(
            a,
            "gateway's MAC never learned on the attacker's port",
            !where_g.iter().any(|p| p == "attacker"),
            format!(
                "fdb rows for {}: {where_g:?} (gateway port {})",
                mac_fmt(&gw_mac),
                s.gw_port
            ),
        );
        let stolen =
            count_marked(&fo, b"mac-theft-bcast-") + count_marked(&fo, b"mac-theft-gateway");
        r.check(
            a,
            "stolen-MAC broadcasts reach no other guest",
            stolen == 0,
            format!("{stolen} at 'open'"),
        );
        let at_victim =
            count_marked(&fv, b"mac-theft-bcast-") + count_marked(&fv, b"mac-theft-gateway");
        r.check(
            a,
            "stolen-MAC broadcasts never reach the victim",
            at_victim == 0,
            format!("{at_victim} at the victim"),
        );
        let out_ip = count_marked(&fx, b"mac-theft-ip");
        r.check(
            a,
            "stolen-MAC IPv4 never reaches the outside",
            out_ip == 0,
            format!("{out_ip} at the outside"),
        );
        let ctl = count_marked(&fo, b"mac-theft-ctl-own");
        r.check(
            a,
            "control: the same broadcast from the attacker's own MAC arrives",
            ctl == 1,
            format!("{ctl} at 'open'"),
        );
        let ctl_ip = count_marked(&fx, b"mac-theft-ctl-ip");
        r.check(
            a,
            "control: the same datagram from the attacker's own MAC reaches the outside",
            ctl_ip >= 1,
            format!("{ctl_ip} at the outside"),
        );
        let replies_after = replies_since(&fv);
        r.check(
            a,
            "victim keeps receiving (echo replies after the theft)",
            replies_after >= 2,
            format!("{replies_after} echo replies after the injection"),
        );
        r.check(
            a,
            "mac_spoof counted (>= 41 more)",
            n >= before + 41,
            format!(
                "mac_spoof {before} -> {n}, fdb_limit {}",
                k.port_drops("attacker", "fdb_limit")
            ),
        );
    }

    // ==== 3. ARP poisoning of the victim (gateway IP) and the host (victim IP).
    {
        let a = "3 arp poisoning";
        // Make both neighbour tables as gullible as Linux gets: no lock time.
        victim
            .sh("echo 0 > /proc/sys/net/ipv4/neigh/eth0/locktime")
            .unwrap();
        lab.sh(
            &hv,
            &format!("echo 0 > /proc/sys/net/ipv4/neigh/{}/locktime", s.gw_iface),
        )
        .unwrap();
        // Entries that exist, so that an ARP update would change them.
        lab.exec(&hv, &["ping", "-c", "1", "-W", "1", &s.vip])
            .unwrap();
        lab.exec(&hv, &["ping", "-c", "1", "-W", "1", &s.oip])
            .unwrap();
        victim
            .exec(&["ping", "-c", "1", "-W", "1", &s.oip])
            .unwrap();
        victim.exec(&["ping", "-c", "1", "-W", "1", GW]).unwrap();
        let v_gw0 = neigh(&victim.ns, GW);
        let h_v0 = neigh(&hv, &s.vip);
        r.check(
            a,
            "precondition: victim knows the gateway's MAC",
            v_gw0.as_ref().is_some_and(|(m, _)| *m == mac_fmt(&gw_mac)),
            format!("{v_gw0:?}"),
        );
        r.check(
            a,
            "precondition: host knows the victim's MAC",
            h_v0.as_ref().is_some_and(|(m, _)| *m == mac_fmt(&vm)),
            format!("{h_v0:?}"),
        );

        let before = k.port_drops("attacker", "arp_spoof");
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let z = [0u8; 6];
        let bc = [0xffu8; 6];
        let attacks = [
            // Gratuitous ARP request and reply claiming the gateway.
            arp_frame(bc, am, 1, am, GW_IP, z, GW_IP, b"arp-atk-garp-gw"),
            arp_frame(bc, am, 2, am, GW_IP, bc, GW_IP, b"arp-atk-grep-gw"),
            // Unicast reply to the victim: "the gateway is at my MAC".
            arp_frame(vm, am, 2, am, GW_IP, vm, vip, b"arp-atk-uni-gw"),
            // Unicast reply to the host: "the victim is at my MAC".
            arp_frame(gw_mac, am, 2, am, vip, gw_mac, GW_IP, b"arp-atk-uni-v"),
            // Gratuitous ARP claiming the victim's address.
            arp_frame(bc, am, 1, am, vip, z, vip, b"arp-atk-garp-v"),
            // Sender MAC not the frame's (own address even).
            arp_frame(
                bc,
                am,
                1,
                [0x02, 0x66, 0x66, 0x66, 0x66, 0x66],
                aip,
                z,
                aip,
                b"arp-atk-sha",
            ),
        ];
        // Twice: a first frame could be lost by no one's fault; the second
        // would poison what the first did not.
        inject(&attacker.ns, "eth0", &attacks).unwrap();
        thread::sleep(Duration::from_millis(50));
        inject(&attacker.ns, "eth0", &attacks).unwrap();
        // Controls: the attacker's legitimate gratuitous ARP reaches the
        // victim; the unguarded port's forged ARP (a fake MAC for its own
        // address) does poison both tables.
        inject(
            &attacker.ns,
            "eth0",
            &[arp_frame(bc, am, 1, am, aip, z, aip, b"arp-ctl-own")],
        )
        .unwrap();
        let fake = [0x02, 0x0f, 0x0f, 0x0f, 0x0f, 0x0f];
        inject(
            &open.ns,
            "eth0",
            &[arp_frame(bc, om, 1, fake, oip, z, oip, b"arp-ctl-open")],
        )
        .unwrap();
        let n = wait_drops(k, "attacker", "arp_spoof", before + 12);
        // The attacker's control follows its attacks on the same path.
        let fv = cv
            .stop_when("the attacker's own ARP", Duration::from_secs(3), |f| {
                count_marked(f, b"arp-ctl-own") > 0
            })
            .unwrap_or_else(|e| {
                r.check(a, "control captured at the victim", false, format!("{e:#}"));
                Vec::new()
            });
        for m in [
            "arp-atk-garp-gw",
            "arp-atk-grep-gw",
            "arp-atk-uni-gw",
            "arp-atk-garp-v",
            "arp-atk-sha",
        ] {
            let got = count_marked(&fv, m.as_bytes());
            r.check(
                a,
                &format!("{m} never reaches the victim"),
                got == 0,
                format!("{got} frame(s) at the victim"),
            );
        }
        let v_gw = neigh(&victim.ns, GW);
        r.check(
            a,
            "victim's neighbour entry for the gateway keeps the gateway's MAC",
            v_gw.as_ref().is_some_and(|(m, _)| *m == mac_fmt(&gw_mac)),
            format!("{GW}: {v_gw:?}, want {}", mac_fmt(&gw_mac)),
        );
        let h_v = neigh(&hv, &s.vip);
        r.check(
            a,
            "host's neighbour entry for the victim keeps the victim's MAC",
            h_v.as_ref().is_some_and(|(m, _)| *m == mac_fmt(&vm)),
            format!("{}: {h_v:?}, want {}", s.vip, mac_fmt(&vm)),
        );
        let ctl = count_marked(&fv, b"arp-ctl-own");
        r.check(
            a,
            "control: attacker's own gratuitous ARP reaches the victim",
            ctl == 1,
            format!("{ctl} frame(s)"),
        );
        // The tables take the forged entry as they process the frame.
        let fake_s = mac_fmt(&fake);
        let (mut vo, mut ho) = (None, None);
        wait_for(Duration::from_secs(3), || {
            vo = neigh_mac(&victim.ns, &s.oip);
            ho = neigh_mac(&hv, &s.oip);
            vo.as_deref() == Some(fake_s.as_str()) && ho.as_deref() == Some(fake_s.as_str())
        });
        r.check(
            a,
            "control: a forged ARP from the unguarded port poisons victim and host",
            vo.as_deref() == Some(mac_fmt(&fake).as_str())
                && ho.as_deref() == Some(mac_fmt(&fake).as_str()),
            format!("victim's entry for {}: {vo:?}, host's: {ho:?}", s.oip),
        );
        r.check(
            a,
            "arp_spoof counted (>= 12 more)",
            n >= before + 12,
            format!("arp_spoof {before} -> {n}"),
        );
        // Forget what the controls (and a successful attack) taught the
        // tables, so that the attacks below start from a healthy victim.
        for ip in [GW, s.oip.as_str()] {
            let _ = victim.exec(&["ip", "neigh", "del", ip, "dev", "eth0"]);
        }
        for ip in [s.vip.as_str(), s.oip.as_str()] {
            let _ = lab.exec(&hv, &["ip", "neigh", "del", ip, "dev", &s.gw_iface]);
        }
        let _ = victim.exec(&["ping", "-c", "1", "-W", "1", GW]);
    }

    // ==== 4. MAC flood: 100,000 random source MACs.
    {
        let a = "4 mac flood";
        let fdb0 = k.fdb("default");
        let before = k.port_drops("attacker", "fdb_limit");
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let mut x: u64 = ts_of(SystemTime::now()).as_nanos() as u64 | 1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        const TOTAL: u64 = 100_000;
        let t0 = Instant::now();
        for _ in 0..10 {
            let frames: Vec<Vec<u8>> = (0..TOTAL / 10)
                .map(|_| {
                    let b = next().to_be_bytes();
                    let mac = [(b[0] & 0xfc) | 0x02, b[1], b[2], b[3], b[4], b[5]];
                    eth_frame([0xff; 6], mac, ETH_TEST, b"mac-flood")
                })
                .collect();
            inject(&attacker.ns, "eth0", &frames).unwrap();
        }
        let took = t0.elapsed();
        inject(
            &attacker.ns,
            "eth0",
            &[eth_frame([0xff; 6], am, ETH_TEST, b"mac-flood-ctl-own")],
        )
        .unwrap();
        let n = wait_drops(k, "attacker", "fdb_limit", before + TOTAL);
        let fv = cv
            .stop_when(
                "the attacker's own broadcast",
                Duration::from_secs(3),
                |f| count_marked(f, b"mac-flood-ctl-own") > 0,
            )
            .unwrap_or_else(|e| {
                r.check(a, "control captured at the victim", false, format!("{e:#}"));
                Vec::new()
            });
        let fdb1 = k.fdb("default");
        let attacker_rows: Vec<String> = fdb1
            .iter()
            .filter(|e| e["port"] == "attacker")
            .map(|e| e["mac"].as_str().unwrap_or("").to_string())
            .collect();
        println!(
            "[{a}] injected {TOTAL} frames in {took:?}; fdb {} -> {} rows",
            fdb0.len(),
            fdb1.len()
        );
        r.check(
            a,
            "the network's FDB grows by at most the attacker's limit (1)",
            fdb1.len() <= fdb0.len() + 1,
            format!("{} rows before, {} after", fdb0.len(), fdb1.len()),
        );
        r.check(
            a,
            "the attacker's port holds only its own MAC",
            attacker_rows.iter().all(|m| *m == mac_fmt(&am)) && attacker_rows.len() <= 1,
            format!(
                "{} rows on 'attacker', first: {:?}",
                attacker_rows.len(),
                &attacker_rows[..attacker_rows.len().min(5)]
            ),
        );
        let leaked = count_marked(&fv, b"mac-flood") - count_marked(&fv, b"mac-flood-ctl-own");
        r.check(
            a,
            "no flood frame reaches the victim",
            leaked == 0,
            format!("{leaked} frame(s)"),
        );
        let ctl = count_marked(&fv, b"mac-flood-ctl-own");
        r.check(
            a,
            "control: the same broadcast from the attacker's own MAC arrives",
            ctl == 1,
            format!("{ctl} frame(s)"),
        );
        r.check(
            a,
            "fdb_limit counted (every flood frame)",
            n >= before + TOTAL * 95 / 100,
            format!("fdb_limit {before} -> {n} ({} of {TOTAL})", n - before),
        );
    }

    // ==== 5. Rogue DHCP server messages.
    {
        let a = "5 rogue dhcp";
        let before = k.port_drops("attacker", "rogue_dhcp");
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let bc = [0xffu8; 6];
        let bcast = [255u8; 4];
        let offer = |m: &[u8]| bootreply(vm, [192, 168, 122, 200], aip, m);
        let attacks = [
            udp4_frame(bc, am, aip, bcast, 1067, 68, &offer(b"rogue-1067-68-bcast")),
            udp4_frame(vm, am, aip, bcast, 1067, 68, &offer(b"rogue-1067-68-uni")),
            udp4_frame(bc, am, aip, bcast, 67, 68, &offer(b"rogue-67-68-bcast")),
            udp4_frame(bc, am, aip, bcast, 67, 1068, &offer(b"rogue-67-1068-bcast")),
        ];
        inject(&attacker.ns, "eth0", &attacks).unwrap();
        // Control: the same BOOTP payload between ports no DHCP speaks.
        inject(
            &attacker.ns,
            "eth0",
            &[udp4_frame(
                bc,
                am,
                aip,
                bcast,
                1067,
                69,
                &offer(b"rogue-ctl-1067-69"),
            )],
        )
        .unwrap();
        let n = wait_drops(k, "attacker", "rogue_dhcp", before + 4);
        let fv = cv
            .stop_when("the UDP 69 control", Duration::from_secs(3), |f| {
                count_marked(f, b"rogue-ctl-1067-69") > 0
            })
            .unwrap_or_else(|e| {
                r.check(a, "control captured at the victim", false, format!("{e:#}"));
                Vec::new()
            });
        for m in [
            "rogue-1067-68-bcast",
            "rogue-1067-68-uni",
            "rogue-67-68-bcast",
            "rogue-67-1068-bcast",
        ] {
            let got = count_marked(&fv, m.as_bytes());
            r.check(
                a,
                &format!("{m} never reaches the victim"),
                got == 0,
                format!("{got} frame(s)"),
            );
        }
        let to68 = fv
            .iter()
            .filter(|f| {
                f.src_mac() == am && udp_ports(f).is_some_and(|(sp, dp)| dp == 68 || sp == 67)
            })
            .count();
        r.check(
            a,
            "no DHCP server message from the attacker at the victim",
            to68 == 0,
            format!("{to68} frame(s)"),
        );
        let ctl = count_marked(&fv, b"rogue-ctl-1067-69");
        r.check(
            a,
            "control: same payload to UDP 69 arrives",
            ctl == 1,
            format!("{ctl} frame(s)"),
        );
        r.check(
            a,
            "rogue_dhcp counted (>= 4 more)",
            n >= before + 4,
            format!("rogue_dhcp {before} -> {n}"),
        );
    }

    // ==== 6. Rogue IPv6 router advertisement, redirect and DHCPv6 server.
    {
        let a = "6 rogue ra/dhcpv6";
        let ra_before = k.port_drops("attacker", "rogue_ra");
        let d_before = k.port_drops("attacker", "rogue_dhcp");
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let ll_a = link_local(am);
        let ll_v = link_local(vm);
        let mut redirect = vec![137, 0, 0, 0, 0, 0, 0, 0];
        redirect.extend_from_slice(&ll_a); // target: go through me
        redirect.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
        redirect.extend_from_slice(b"rogue-redirect");
        let mut adv = vec![2, 0xab, 0xcd, 0xef];
        adv.extend_from_slice(&[0, 0xfe, 0, 14]);
        adv.extend_from_slice(b"rogue-dhcpv6-a");
        let attacks = [
            router_advert(am, b"rogue-ra"),
            icmp6_frame(vm, am, ll_a, ll_v, redirect),
            udp6_frame(ALL_NODES_MAC, am, ll_a, ALL_NODES, 547, 546, &adv),
        ];
        inject(&attacker.ns, "eth0", &attacks).unwrap();
        // Controls: an echo request and a UDP datagram between other
        // ports, same addresses.
        let mut echo = vec![128, 0, 0, 0, 0x12, 0x34, 0, 1];
        echo.extend_from_slice(b"ra-ctl-echo");
        let mut adv_ctl = adv.clone();
        adv_ctl.extend_from_slice(b"-ctl");
        inject(
            &attacker.ns,
            "eth0",
            &[
                icmp6_frame(ALL_NODES_MAC, am, ll_a, ALL_NODES, echo),
                udp6_frame(ALL_NODES_MAC, am, ll_a, ALL_NODES, 1547, 1546, &adv_ctl),
            ],
        )
        .unwrap();
        let nra = wait_drops(k, "attacker", "rogue_ra", ra_before + 2);
        let nd = wait_drops(k, "attacker", "rogue_dhcp", d_before + 1);
        let fv = cv
            .stop_when("both controls", Duration::from_secs(3), |f| {
                count_marked(f, b"ra-ctl-echo") > 0 && count_marked(f, b"rogue-dhcpv6-a-ctl") > 0
            })
            .unwrap_or_else(|e| {
                r.check(
                    a,
                    "controls captured at the victim",
                    false,
                    format!("{e:#}"),
                );
                Vec::new()
            });
        let from_a: Vec<(u8, u8, u16, u16)> = fv
            .iter()
            .filter(|f| f.src_mac() == am)
            .filter_map(ipv6_l4)
            .collect();
        let ra = from_a
            .iter()
            .filter(|(n, t, _, _)| *n == 58 && (*t == 134 || *t == 137))
            .count();
        r.check(
            a,
            "no RA or redirect from the attacker at the victim",
            ra == 0,
            format!("{ra} frame(s); attacker's IPv6 at the victim: {from_a:?}"),
        );
        let d6 = from_a
            .iter()
            .filter(|(n, _, sp, dp)| *n == 17 && (*sp == 547 || *dp == 546))
            .count();
        r.check(
            a,
            "no DHCPv6 ADVERTISE from the attacker at the victim",
            d6 == 0,
            format!("{d6} frame(s)"),
        );
        let ctl_echo = count_marked(&fv, b"ra-ctl-echo");
        let ctl_udp = count_marked(&fv, b"rogue-dhcpv6-a-ctl");
        r.check(
            a,
            "controls: ICMPv6 echo and UDP 1547->1546 from the attacker arrive",
            ctl_echo == 1 && ctl_udp == 1,
            format!("echo {ctl_echo}, udp {ctl_udp}"),
        );
        r.check(
            a,
            "rogue_ra counted (>= 2 more)",
            nra >= ra_before + 2,
            format!("rogue_ra {ra_before} -> {nra}"),
        );
        r.check(
            a,
            "DHCPv6 counted as rogue_dhcp (>= 1 more)",
            nd > d_before,
            format!("rogue_dhcp {d_before} -> {nd}"),
        );
    }

    // ==== 7. NAT reply injection into the victim's UDP flow.
    {
        let a = "7 nat reply injection";
        let victim_ns = victim.ns.clone();
        let listener = thread::spawn(move || {
            py(
                &victim_ns,
                &format!(
                    r#"
import socket, time
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 40053)); u.settimeout(0.2)
u.sendto(b"q1", ("{OUTSIDE}", {ECHO_PORT}))
end = time.time() + 4
while time.time() < end:
    try:
        d, src = u.recvfrom(2048)
        print("got", src[0], src[1], d.decode(errors="replace"), flush=True)
    except socket.timeout:
        pass
"#
                ),
            )
        });
        let mut nat_port = None;
        let mut ct = Value::Null;
        wait_for(Duration::from_secs(3), || {
            ct = k.json(&["conntrack", "list", "default"]).unwrap();
            nat_port = ct.as_array().unwrap().iter().find_map(|c| {
                let (orig, tr) = (&c["orig"], &c["translated"]);
                if c["proto"] != "udp" || orig["saddr"] != s.vip.as_str() || orig["sport"] != 40053
                {
                    return None;
                }
                (tr["saddr"] == "198.51.100.1")
                    .then(|| u16::try_from(tr["sport"].as_u64()?).ok())
                    .flatten()
            });
            nat_port.is_some()
        });
        r.check(
            a,
            "precondition: the victim's UDP flow is in the conntrack table",
            nat_port.is_some(),
            format!("{ct}"),
        );
        // Without the flow (an earlier attack broke the victim) this
        // attack cannot be run; the failure above says why.
        let nat_port = nat_port.unwrap_or(1);
        println!(
            "[{a}] victim {}:40053 is {}:{nat_port} outside",
            s.vip,
            ip4_fmt(UPLINK_IP)
        );
        let before = k.port_drops("attacker", "ip_spoof");
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let forged = |smac: [u8; 6], m: &[u8]| {
            udp4_frame(gw_mac, smac, OUTSIDE_IP, UPLINK_IP, ECHO_PORT, nat_port, m)
        };
        inject(&attacker.ns, "eth0", &[forged(am, b"nat-inject-attacker")]).unwrap();
        inject(&open.ns, "eth0", &[forged(om, b"nat-inject-open")]).unwrap();
        // The forged replies are handled before the real one is sent.
        wait_drops(k, "attacker", "ip_spoof", before + 1);
        // Control: the real remote end sends the same reply from outside.
        inject(
            &out_ns,
            "eth0",
            &[udp4_frame(
                up0_mac,
                out_mac,
                OUTSIDE_IP,
                UPLINK_IP,
                ECHO_PORT,
                nat_port,
                b"nat-real-reply",
            )],
        )
        .unwrap();
        let said = listener.join().unwrap();
        let fv = cv.stop().unwrap();
        let n = k.port_drops("attacker", "ip_spoof");
        r.check(
            a,
            "precondition: the flow was answered",
            said.contains("got 198.51.100.2 5000 q1"),
            said.clone(),
        );
        for m in ["nat-inject-attacker", "nat-inject-open"] {
            let got = count_marked(&fv, m.as_bytes());
            r.check(
                a,
                &format!("{m}: forged reply never reaches the victim"),
                got == 0 && !said.contains(m),
                format!("{got} frame(s) at the victim; socket: {said}"),
            );
        }
        let real = count_marked(&fv, b"nat-real-reply");
        r.check(
            a,
            "control: the same reply from the outside is delivered",
            real == 1 && said.contains("nat-real-reply"),
            format!("{real} frame(s); socket: {said}"),
        );
        r.check(
            a,
            "attacker's forged reply counted as ip_spoof",
            n > before,
            format!("ip_spoof {before} -> {n}"),
        );
    }

    // ==== 9. A guest of another NAT network reaching into this one.
    {
        let a = "9 other network";
        echo_server(lab, &victim.ns, 7000).unwrap();
        let ctl = tcp_echo(&attacker.ns, &s.vip, 7000, 1000);
        r.check(
            a,
            "control: a guest of the same network reaches the victim's TCP service",
            ctl.contains("tcp 1000"),
            ctl,
        );
        let before = k.port_drops("other", "foreign_net");
        let cv = Capture::start(&victim.ns, "eth0").unwrap();
        let pinged = lab::exec_output(
            &other.ns,
            &["ping", "-c", "2", "-i", "0.2", "-W", "1", &s.vip],
        )
        .unwrap();
        let tcp = tcp_echo(&other.ns, &s.vip, 7000, 1000);
        let fv = cv.stop().unwrap();
        r.check(
            a,
            "ping from the other network to the victim fails",
            !pinged.status.success(),
            String::from_utf8_lossy(&pinged.stdout).into_owned(),
        );
        r.check(
            a,
            "TCP from the other network to the victim fails",
            !tcp.contains("tcp 1000"),
            tcp.trim().to_string(),
        );
        let seen: Vec<String> = fv
            .iter()
            .filter(|f| {
                f.ipv4_addrs().is_some_and(|(src, dst)| {
                    src[..3] == [192, 168, 123]
                        || (dst == vip && (f.icmp_type() == Some(8) || tcp_dport(f) == Some(7000)))
                })
            })
            .map(|f| {
                let (s, d) = f.ipv4_addrs().unwrap();
                format!(
                    "{} -> {} proto {:?}",
                    ip4_fmt(s),
                    ip4_fmt(d),
                    f.ipv4_proto()
                )
            })
            .collect();
        r.check(
            a,
            "the victim's capture sees nothing of it",
            seen.is_empty(),
            format!("{seen:?}"),
        );
        let back = lab::exec_output(&victim.ns, &["ping", "-c", "1", "-W", "1", &s.xip]).unwrap();
        r.check(
            a,
            "nor does the victim reach into the other NAT network",
            !back.status.success(),
            String::from_utf8_lossy(&back.stdout).into_owned(),
        );
        let n = wait_drops(k, "other", "foreign_net", before + 1);
        r.check(
            a,
            "foreign_net counted on the sending port",
            n > before,
            format!("foreign_net {before} -> {n}"),
        );
        let out_ping = lab::exec_output(
            &other.ns,
            &["ping", "-c", "2", "-i", "0.2", "-W", "1", OUTSIDE],
        )
        .unwrap();
        let out_tcp = tcp_echo(&other.ns, OUTSIDE, ECHO_PORT, 100_000);
        r.check(
            a,
            "the other network's guest still reaches the outside (ping, TCP)",
            out_ping.status.success() && out_tcp.contains("tcp 100000"),
            format!("{} / {out_tcp}", String::from_utf8_lossy(&out_ping.stdout)),
        );
    }

    // ---- The victim's traffic went on throughout.
    ping.signal(Signal::SIGINT).unwrap();
    iperf.signal(Signal::SIGINT).unwrap();
    let _ = ping.wait_timeout(Duration::from_secs(3));
    let _ = iperf.wait_timeout(Duration::from_secs(3));
    let (ok, ev) = ping_verdict(&fs::read_to_string(&ping_log).unwrap());
    r.check("victim traffic", "background ping: no loss", ok, ev);
    let (ok, ev) = iperf_verdict(&fs::read_to_string(&iperf_log).unwrap(), PACED);
    r.check(
        "victim traffic",
        "background TCP transfer never stalled",
        ok,
        ev,
    );
    r.check(
        "daemon",
        "still running",
        k.daemon_running(),
        k.daemon_log(),
    );
    println!("runtime: {:?}", started.elapsed());
    r.finish();
}

// ---------------------------------------------------------------------
// 8. Double-tag VLAN hop.

#[test]
fn a_double_tagged_frame_cannot_hop_into_another_vlan() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let lab = Lab::new().unwrap();
    let out = lab.add_outside().unwrap();
    out.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        .unwrap();
    let a10 = lab.add_guest("a10").unwrap();
    a10.disable_ipv6().unwrap();
    let v20 = lab.add_guest("v20").unwrap();
    v20.disable_ipv6().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "lan"]).unwrap();
    k.cli(&["port", "add", "lan", "a10", "--vlan", "10"])
        .unwrap();
    k.cli(&["port", "add", "lan", "v20", "--vlan", "20"])
        .unwrap();
    k.cli(&[
        "port", "add", "lan", "up0", "--trunk", "10,20", "--native", "10",
    ])
    .unwrap();
    let mut r = Report::default();
    let a = "8 double tag";

    let tagged2 = |outer_tpid: u16, outer_tci: u16, inner_tci: u16, marker: &[u8]| -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&a10.mac);
        f.extend_from_slice(&outer_tpid.to_be_bytes());
        f.extend_from_slice(&outer_tci.to_be_bytes());
        f.extend_from_slice(&0x8100u16.to_be_bytes());
        f.extend_from_slice(&inner_tci.to_be_bytes());
        f.extend_from_slice(&ETH_TEST.to_be_bytes());
        f.extend_from_slice(marker);
        if f.len() < 68 {
            f.resize(68, 0);
        }
        f
    };
    // Let the attacker's own MAC be known first (sticky), as a guest's is.
    inject(
        &a10.ns,
        "eth0",
        &[eth_frame([0xff; 6], a10.mac, ETH_TEST, b"hello")],
    )
    .unwrap();
    assert!(
        wait_for(Duration::from_secs(3), || k
            .fdb_port_of("lan", &a10.mac)
            .as_deref()
            == Some("a10")),
        "a10's MAC not learned: {:?}",
        k.fdb("lan")
    );
    let before = k.port_drops("a10", "double_tag");
    let ct = Capture::start(&out.ns, "eth0").unwrap();
    let cv = Capture::start(&v20.ns, "eth0").unwrap();
    let attacks = [
        // Priority tag (VID 0, PCP 5) around a VLAN 20 tag: the classic hop.
        (
            tagged2(0x8100, 5 << 13, 20, b"dtag-prio-20"),
            "dtag-prio-20",
        ),
        // Outer tag in the access VLAN itself around a VLAN 20 tag.
        (tagged2(0x8100, 10, 20, b"dtag-10-20"), "dtag-10-20"),
        // 802.1ad outer tag.
        (tagged2(0x88a8, 0, 20, b"dtag-ad-20"), "dtag-ad-20"),
    ];
    let frames: Vec<Vec<u8>> = attacks.iter().map(|(f, _)| f.clone()).collect();
    inject(&a10.ns, "eth0", &frames).unwrap();
    // Controls: a10's plain broadcast leaves on the trunk (native VLAN 10,
    // untagged); a VLAN 20 frame from the trunk reaches v20.
    inject(
        &a10.ns,
        "eth0",
        &[eth_frame([0xff; 6], a10.mac, ETH_TEST, b"dtag-ctl-a10")],
    )
    .unwrap();
    let mut from_trunk = kvnet_tests::inject::eth_frame_vlan(
        [0xff; 6],
        [0x02, 0, 0, 0, 0x0e, 0x20],
        20,
        ETH_TEST,
        b"dtag-ctl-trunk-20",
    );
    from_trunk.resize(64, 0);
    inject(&out.ns, "eth0", &[from_trunk]).unwrap();
    let n = wait_drops(&k, "a10", "double_tag", before + 1);
    // The controls follow the attacks on each capture's path.
    let ft = ct
        .stop_when("a10's control broadcast", Duration::from_secs(3), |f| {
            count_marked(f, b"dtag-ctl-a10") > 0
        })
        .unwrap_or_else(|e| {
            r.check(a, "control captured on the trunk", false, format!("{e:#}"));
            Vec::new()
        });
    let fv = cv
        .stop_when("the VLAN 20 control", Duration::from_secs(3), |f| {
            count_marked(f, b"dtag-ctl-trunk-20") > 0
        })
        .unwrap_or_else(|e| {
            r.check(a, "control captured at v20", false, format!("{e:#}"));
            Vec::new()
        });
    for (_, m) in &attacks {
        let on_trunk: Vec<Option<u16>> = ft
            .iter()
            .filter(|f| has(f, m.as_bytes()))
            .map(|f| f.vlan_id())
            .collect();
        r.check(
            a,
            &format!("{m} never leaves on the trunk (in particular not tagged 20)"),
            on_trunk.is_empty(),
            format!("on the trunk with outer VIDs {on_trunk:?}"),
        );
        let at_v = count_marked(&fv, m.as_bytes());
        r.check(
            a,
            &format!("{m} never reaches the VLAN 20 guest"),
            at_v == 0,
            format!("{at_v} frame(s)"),
        );
    }
    let ctl: Vec<Option<u16>> = ft
        .iter()
        .filter(|f| has(f, b"dtag-ctl-a10"))
        .map(|f| f.vlan_id())
        .collect();
    r.check(
        a,
        "control: a10's untagged broadcast leaves on the trunk untagged",
        ctl == [None],
        format!("{ctl:?}"),
    );
    let ctl20 = count_marked(&fv, b"dtag-ctl-trunk-20");
    r.check(
        a,
        "control: a VLAN 20 frame from the trunk reaches v20",
        ctl20 == 1,
        format!("{ctl20} frame(s)"),
    );
    r.check(
        a,
        "double_tag counted",
        n > before,
        format!(
            "double_tag {before} -> {n}; stats: {}",
            k.port_stats("a10")
                .map(|s| s["drops"].to_string())
                .unwrap_or_default()
        ),
    );
    println!("runtime: {:?}", started.elapsed());
    r.finish();
}

// ---------------------------------------------------------------------
// Conntrack exhaustion: a guest opening flows without end, and spoofed
// first packets through a port forward, must not fill the table.

/// A libvirt-like NAT network "default" (kvnet's DHCP) behind up0.
fn default_nat(k: &Kvnet) {
    k.cli(&[
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
    ])
    .unwrap();
}

/// Flows in `kvnet conntrack list default` whose guest side is `ip`.
fn flows_of(k: &Kvnet, ip: &str) -> usize {
    k.json(&["conntrack", "list", "default"])
        .unwrap()
        .as_array()
        .map_or(0, |rows| {
            rows.iter()
                .filter(|r| r["orig"]["saddr"] == ip || r["translated"]["saddr"] == ip)
                .count()
        })
}

/// (source address, source port) of the flows of network "default" whose
/// original direction starts with `prefix` ("ADDR:PORT -> ...").
fn ct_sources(k: &Kvnet, prefix: &str) -> Vec<([u8; 4], u16)> {
    let rows = k.json(&["conntrack", "list", "default"]).unwrap();
    rows.as_array()
        .map(|rows| {
            rows.iter()
                .filter_map(|r| {
                    let orig = &r["orig"];
                    if !flow(orig).starts_with(prefix) {
                        return None;
                    }
                    let ip: std::net::Ipv4Addr = orig["saddr"].as_str()?.parse().ok()?;
                    Some((ip.octets(), u16::try_from(orig["sport"].as_u64()?).ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

fn nat_drops(k: &Kvnet, reason: &str) -> u64 {
    let stats = k.json(&["stats"]).unwrap();
    stats["nat"]
        .as_array()
        .and_then(|n| n.iter().find(|r| r["net"] == "default"))
        .and_then(|r| r["drops"][reason].as_u64())
        .unwrap_or(0)
}

#[test]
fn conntrack_cannot_be_exhausted_by_a_guest_or_through_a_forward() {
    if !privileged() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let lab = Lab::new().unwrap();
    let out = lab
        .add_outside_with(&format!("{OUTSIDE}/24"), "198.51.100.1/24")
        .unwrap();
    let mk = |name: &str| {
        let g = lab.add_guest_with(name, None).unwrap();
        g.disable_ipv6().unwrap();
        g
    };
    let flooder = mk("flooder");
    let bystander = mk("bystander");
    // 2048 entries: 1024 flows, a guest's quota is 128 of them.
    let k = Kvnet::start_with(&lab, &["--ct-max", "2048"]).unwrap();
    default_nat(&k);
    k.cli(&["port", "add", "default", "flooder"]).unwrap();
    k.cli(&["port", "add", "default", "bystander"]).unwrap();
    let fip = dhcp(&lab, &flooder, "flooder");
    let bip = dhcp(&lab, &bystander, "bystander");
    let net = k.json(&["net", "show", "default"]).unwrap();
    let gw_iface = net["gateway"]["iface"].as_str().unwrap().to_string();
    let gw_mac = read_mac(lab.hv(), &gw_iface).unwrap();
    let up_mac = read_mac(lab.hv(), &out.hv_if).unwrap();
    assert!(bystander.ping(OUTSIDE), "bystander reaches the outside");

    // 1. One guest opens 1000 UDP flows at once: its quota holds.
    let cap_out = Capture::start(&out.ns, &out.iface).unwrap();
    let frames: Vec<Vec<u8>> = (0..1000u16)
        .map(|i| {
            udp4_frame(
                gw_mac,
                flooder.mac,
                ip4(&fip),
                OUTSIDE_IP,
                20000 + i,
                9,
                b"ct-flood",
            )
        })
        .collect();
    inject(&flooder.ns, "eth0", &frames).unwrap();
    // All 1000 handled: 128 translated, the rest refused.
    let dropped = wait_drops(&k, "flooder", "ct_quota", 850);
    // Control, sent after the flood on one of the flows it opened: once
    // the outside has it, every translated flood packet is in too.
    let (_, ctl_sport) = *ct_sources(&k, &format!("{fip}:"))
        .first()
        .expect("no flow open for the flooder");
    inject(
        &flooder.ns,
        "eth0",
        &[udp4_frame(
            gw_mac,
            flooder.mac,
            ip4(&fip),
            OUTSIDE_IP,
            ctl_sport,
            9,
            b"ctl-after-flood",
        )],
    )
    .unwrap();
    let seen = cap_out
        .stop_when("the control on an open flow", Duration::from_secs(3), |f| {
            f.iter().any(|f| {
                has(f, b"ctl-after-flood") && f.ipv4_addrs().is_some_and(|(s, _)| s == UPLINK_IP)
            })
        })
        .unwrap();
    // The flood itself, translated (not the outside's ICMP errors quoting it).
    let translated = seen
        .iter()
        .filter(|f| has(f, b"ct-flood") && f.ipv4_addrs().is_some_and(|(s, _)| s == UPLINK_IP))
        .count();
    let open_flows = flows_of(&k, &fip);
    assert!(dropped >= 850, "ct_quota drops: {dropped}");
    assert!(
        (120..=140).contains(&open_flows),
        "{open_flows} flows open for the flooder (quota 128)"
    );
    // Positive control: the flows let in are real (the capture may miss
    // some of a burst, never invent them).
    assert!(
        translated >= 1 && translated <= open_flows,
        "the outside saw {translated} of the flood's packets, {open_flows} flows open"
    );
    assert!(nat_drops(&k, "ct_quota") >= 800);
    // Others are untouched: the bystander opens new flows.
    assert!(bystander.ping(OUTSIDE), "bystander after the guest's flood");

    // 2. Spoofed first packets from everywhere to a port forward: bounded
    // by the forward's rate (200 new flows/s), the table keeps room.
    k.cli(&[
        "forward",
        "add",
        "default",
        "--proto",
        "udp",
        "--port",
        "6000",
        "--to",
        &format!("{bip}:6000"),
    ])
    .unwrap();
    let new_flows = |k: &Kvnet| {
        k.json(&["stats"]).unwrap()["nat"][0]["new_flows"]
            .as_u64()
            .unwrap_or(0)
    };
    let flows_before = new_flows(&k);
    let cap_b = Capture::start(&bystander.ns, "eth0").unwrap();
    let started = Instant::now();
    let spoofed: Vec<Vec<u8>> = (0..3000u32)
        .map(|i| {
            let src = [203, 0, 113, (i % 250) as u8 + 1];
            udp4_frame(
                up_mac,
                out.mac,
                src,
                UPLINK_IP,
                1024 + i as u16,
                6000,
                b"fwd-flood",
            )
        })
        .collect();
    inject(&out.ns, &out.iface, &spoofed).unwrap();
    let refused = {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let n = nat_drops(&k, "forward_rate");
            if n >= 2000 || Instant::now() > deadline {
                break n;
            }
            thread::sleep(Duration::from_millis(50));
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    // Control, sent after the flood on one of the flows it opened (an
    // established flow is not rate limited): once the guest has it, every
    // spoofed packet let in is in too.
    let (ctl_src, ctl_sport) = *ct_sources(&k, "203.0.113.")
        .first()
        .expect("no flow opened through the forward");
    inject(
        &out.ns,
        &out.iface,
        &[udp4_frame(
            up_mac,
            out.mac,
            ctl_src,
            UPLINK_IP,
            ctl_sport,
            6000,
            b"ctl-after-fwd",
        )],
    )
    .unwrap();
    let to_guest =
        |f: &Frame, m: &[u8]| has(f, m) && f.ipv4_addrs().is_some_and(|(_, d)| d == ip4(&bip));
    // Arriving ones only (not the guest's port-unreachable errors quoting them).
    let through = cap_b
        .stop_when(
            "the control on an opened flow",
            Duration::from_secs(3),
            |f| f.iter().any(|f| to_guest(f, b"ctl-after-fwd")),
        )
        .unwrap()
        .iter()
        .filter(|f| to_guest(f, b"fwd-flood"))
        .count();
    let opened = new_flows(&k) - flows_before;
    let bound = 200.0 + 200.0 * elapsed + 20.0;
    assert!(refused >= 2000, "forward_rate drops: {refused}");
    assert!(
        opened >= 150 && (opened as f64) <= bound,
        "{opened} flows opened by 3000 spoofed first packets in {elapsed:.2}s (burst 200 + 200/s)"
    );
    // Positive control: those that were let in really reached the guest
    // (the capture may miss some of a burst, never invent them).
    assert!(
        through >= 1 && through as u64 <= opened,
        "{through} spoofed first packets seen at the guest, {opened} flows opened"
    );
    let rows = k.json(&["conntrack", "list", "default"]).unwrap();
    let total = rows.as_array().map_or(0, |r| r.len());
    assert!(total < 1024 - 100, "{total} flows: the table kept room");
    // A later legitimate packet through the forward arrives (the bucket
    // refills) and the guests still open flows. It is sent again every
    // 200 ms until the guest has it: the bucket refills 200 first packets
    // a second, so within a second at most.
    let cap_b = Capture::start(&bystander.ns, "eth0").unwrap();
    let legit = udp4_frame(
        up_mac,
        out.mac,
        OUTSIDE_IP,
        UPLINK_IP,
        4242,
        6000,
        b"fwd-legit",
    );
    let t0 = Instant::now();
    let mut sent = 0;
    loop {
        inject(&out.ns, &out.iface, std::slice::from_ref(&legit)).unwrap();
        sent += 1;
        let got = wait_for(Duration::from_millis(200), || {
            cap_b
                .frames()
                .unwrap()
                .iter()
                .any(|f| to_guest(f, b"fwd-legit"))
        });
        if got || t0.elapsed() > Duration::from_secs(2) {
            break;
        }
    }
    let arrived = cap_b
        .stop()
        .unwrap()
        .iter()
        .filter(|f| to_guest(f, b"fwd-legit"))
        .count();
    println!(
        "legitimate packet through the forward: {arrived} of {sent} sent arrived, after {:?}",
        t0.elapsed()
    );
    assert!(
        arrived >= 1 && arrived <= sent,
        "a legitimate packet through the forward after the flood: {arrived} of {sent} arrived"
    );
    assert!(bystander.ping(OUTSIDE), "bystander after the forward flood");
}

/// The `ips` of `kvnet port show IFACE --json`.
fn bound_ips(k: &Kvnet, iface: &str) -> Vec<String> {
    k.json(&["port", "show", iface]).unwrap()["ips"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_released_lease_unbinds_its_address() {
    if !privileged() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let lab = Lab::new().unwrap();
    lab.add_outside_with(&format!("{OUTSIDE}/24"), "198.51.100.1/24")
        .unwrap();
    let g = lab.add_guest_with("leaser", None).unwrap();
    g.disable_ipv6().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    default_nat(&k);
    k.cli(&["port", "add", "default", "leaser"]).unwrap();
    let ip = dhcp(&lab, &g, "leaser");
    assert_eq!(bound_ips(&k, "leaser"), [ip.clone()]);
    assert!(g.ping(OUTSIDE), "the leased address works");
    // The guest gives its lease back: a udhcpc with -R releases when it
    // is told to quit, once it holds the lease again.
    let events = lab.work_dir().join("release.events");
    let script = lab.work_dir().join("release.sh");
    fs::write(
        &script,
        format!("#!/bin/sh\necho \"$1\" >> {}\n", events.display()),
    )
    .unwrap();
    let mut perm = fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    fs::set_permissions(&script, perm).unwrap();
    let mut cmd = Command::new("busybox");
    cmd.args([
        "udhcpc", "-i", "eth0", "-f", "-R", "-t", "5", "-T", "1", "-s",
    ])
    .arg(&script)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    let client = lab.spawn(&g.ns, cmd).unwrap();
    let bound = wait_for(Duration::from_secs(10), || {
        fs::read_to_string(&events).is_ok_and(|e| e.contains("bound"))
    });
    assert!(bound, "udhcpc did not get its lease back");
    client.signal(Signal::SIGTERM).unwrap();
    client.wait_timeout(Duration::from_secs(5)).unwrap();
    let released = wait_for(Duration::from_secs(5), || {
        k.json(&["dhcp", "leases", "default"])
            .unwrap()
            .as_array()
            .is_some_and(|a| a.is_empty())
    });
    assert!(released, "the lease was not released");
    let leases = k.json(&["dhcp", "leases", "default"]).unwrap();
    assert_eq!(
        leases.as_array().map(|a| a.len()),
        Some(0),
        "released: {leases}"
    );
    // The daemon's walk forgets the binding; the address stops working.
    let unbound = wait_for(Duration::from_secs(10), || {
        bound_ips(&k, "leaser").is_empty()
    });
    assert!(unbound, "still bound: {:?}", bound_ips(&k, "leaser"));
    let before = k.port_drops("leaser", "ip_spoof");
    assert!(
        g.ping_unanswered(OUTSIDE),
        "a released address still reached the outside"
    );
    assert!(k.port_drops("leaser", "ip_spoof") > before);
}

#[test]
fn the_outside_cannot_reach_into_a_nat_network() {
    if !privileged() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let lab = Lab::new().unwrap();
    let out = lab
        .add_outside_with(&format!("{OUTSIDE}/24"), "198.51.100.1/24")
        .unwrap();
    let g = lab.add_guest_with("inner", None).unwrap();
    g.disable_ipv6().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    default_nat(&k);
    k.cli(&["port", "add", "default", "inner"]).unwrap();
    let ip = dhcp(&lab, &g, "inner");
    let gw_iface = k.json(&["net", "show", "default"]).unwrap()["gateway"]["iface"]
        .as_str()
        .unwrap()
        .to_string();
    // The outside knows the way to the guests' subnet (a router would).
    out.sh("ip route add 192.168.122.0/24 via 198.51.100.1")
        .unwrap();
    // Twice: with the guest's neighbour entry flushed on the host (the fast
    // path cannot finish and hands the packet to the host stack), then
    // with it resolved (the fast path refuses it itself).
    for round in ["host stack", "fast path"] {
        if round == "host stack" {
            lab.sh(lab.hv(), &format!("ip neigh flush dev {gw_iface}"))
                .unwrap();
        }
        let cap = Capture::start(&g.ns, "eth0").unwrap();
        let reached = out
            .exec(&["ping", "-c", "2", "-W", "1", "-p", "6f757473696465", &ip])
            .is_ok();
        // Positive control in the same capture: the host itself may reach
        // the guest.
        assert!(
            lab::ping(lab.hv(), &ip),
            "{round}: the host reaches its guest"
        );
        let frames = cap.stop().unwrap();
        assert!(!reached, "{round}: the outside reached {ip}");
        let from_outside = frames
            .iter()
            .filter(|f| f.ipv4_addrs().is_some_and(|(s, _)| s == OUTSIDE_IP))
            .count();
        assert_eq!(from_outside, 0, "{round}: packets from the outside arrived");
        let from_host = frames
            .iter()
            .filter(|f| f.ipv4_addrs().is_some_and(|(s, _)| s == GW_IP))
            .count();
        assert!(from_host > 0, "{round}: the capture saw the host's ping");
    }
    assert!(g.ping(OUTSIDE), "the guest still reaches the outside");
}

#[test]
fn a_trunk_guests_mac_is_its_own_in_every_vlan_at_once() {
    if !privileged() {
        eprintln!("SKIPPED: needs root");
        return;
    }
    let lab = Lab::new().unwrap();
    let trunk = lab.add_guest_with("trunkvm", None).unwrap();
    let other = lab.add_guest_with("v20", None).unwrap();
    for g in [&trunk, &other] {
        g.disable_ipv6().unwrap();
    }
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "lan"]).unwrap();
    k.cli(&["port", "add", "lan", "trunkvm", "--trunk", "10,20"])
        .unwrap();
    // Room for a second MAC: without the owner, v20 would take it.
    k.cli(&[
        "port",
        "add",
        "lan",
        "v20",
        "--vlan",
        "20",
        "--max-macs",
        "2",
    ])
    .unwrap();
    // The trunk guest is first seen in VLAN 10 only.
    let first =
        kvnet_tests::inject::eth_frame_vlan([0xff; 6], trunk.mac, 10, ETH_TEST, b"trunk-v10");
    inject(&trunk.ns, "eth0", &[first]).unwrap();
    // Positive control: v20's own MAC is fine.
    inject(
        &other.ns,
        "eth0",
        &[eth_frame([0xff; 6], other.mac, ETH_TEST, b"v20-own")],
    )
    .unwrap();
    // Owned in the whole network at once, whatever VLAN it was seen in.
    let owned = wait_for(Duration::from_secs(5), || {
        k.json(&["port", "show", "trunkvm"]).unwrap()["owned"]
            == serde_json::json!([mac_fmt(&trunk.mac)])
    });
    assert!(owned, "{}", k.json(&["port", "show", "trunkvm"]).unwrap());
    // v20 sending from it is refused, though it may own a second MAC.
    inject(
        &other.ns,
        "eth0",
        &[eth_frame([0xff; 6], trunk.mac, ETH_TEST, b"v20-steal")],
    )
    .unwrap();
    assert!(
        wait_drops(&k, "v20", "mac_spoof", 1) >= 1,
        "v20 took the MAC"
    );
    let port_show = k.json(&["port", "show", "v20"]).unwrap();
    assert_eq!(
        port_show["macs"],
        serde_json::json!([mac_fmt(&other.mac)]),
        "{port_show}"
    );
}
