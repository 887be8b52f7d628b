//! NAT port mapping for UDP, seen from the outside: which uplink port a
//! guest socket gets (port preservation and the ports it must never get),
//! endpoint-independent mapping and filtering (`--nat-udp eim`, RFC 4787)
//! against a mapping per remote (`--nat-udp symmetric`), and datagrams too
//! big for one frame, fragmented by the sender's kernel, in both directions.
//!
//! The outside namespace holds three addresses that play three outside
//! hosts: 198.51.100.2 and 198.51.100.3 run STUN-like reflectors (each
//! datagram is answered with the source address and port it arrived from),
//! 198.51.100.4 is a stranger the guest never sends to.
use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    lab::{exec_output, privileged},
    Capture, Frame, GuestPort, Proc,
};

const UPLINK: &str = "198.51.100.1";
const UPLINK_IP: [u8; 4] = [198, 51, 100, 1];
/// Outside host A: the lab's outside address.
const REMOTE_A: &str = "198.51.100.2";
const REMOTE_A_IP: [u8; 4] = [198, 51, 100, 2];
/// Outside host B: a second address of the outside namespace.
const REMOTE_B: &str = "198.51.100.3";
/// A third outside host that the guest never sends to.
const STRANGER: &str = "198.51.100.4";
const STRANGER_PORT: u16 = 5555;
/// Where the reflectors listen (STUN's port).
const STUN_PORT: u16 = 3478;
const STUN: &str = "3478";
/// A datagram that takes three frames at MTU 1500.
const BIG: usize = 4000;

#[path = "support/nat_lab.rs"]
mod nat_lab;
use nat_lab::{nat_lab_with, Nat};

/// The NAT lab with `--nat-udp nat_udp` and two more outside addresses
/// (198.51.100.3 and .4). Conntrack keeps its real timeouts: a mapping
/// must outlive the seconds a test takes.
fn nat_lab(n: usize, nat_udp: &str) -> Nat {
    let t = nat_lab_with(n, &[], &[], &["--nat-udp", nat_udp]);
    t.out.set_ip(&format!("{REMOTE_B}/24")).unwrap();
    t.out.set_ip(&format!("{STRANGER}/24")).unwrap();
    t
}

impl Nat {
    /// `kvnet forward add nat --proto udp --port PORT --to TO`.
    fn udp_forward(&self, port: u16, to: &str) {
        self.k
            .cli(&[
                "forward",
                "add",
                "nat",
                "--proto",
                "udp",
                "--port",
                &port.to_string(),
                "--to",
                to,
            ])
            .unwrap();
    }

    /// `python3 -c code args...` in `ns`, in the background, stdout and
    /// stderr in `<work dir>/<name>.log` (returned).
    fn spawn_py(&self, ns: &str, name: &str, code: &str, args: &[&str]) -> (Proc, PathBuf) {
        let log = self.lab.work_dir().join(format!("{name}.log"));
        let mut c = Command::new("python3");
        c.args(["-c", code])
            .args(args)
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::from(
                std::fs::OpenOptions::new().append(true).open(&log).unwrap(),
            ));
        (self.lab.spawn(ns, c).unwrap(), log)
    }

    /// A service (`REFLECTOR`, `big_echo()`) started with `args` in `ns`,
    /// returned once it says its socket is bound ("ready"); its log.
    fn service(&self, ns: &str, name: &str, code: &str, args: &[&str]) -> PathBuf {
        let (_, log) = self.spawn_py(ns, name, code, args);
        wait_log(
            &log,
            &format!("{name} ready"),
            Duration::from_secs(5),
            |l| l.contains("ready\n"),
        );
        log
    }
}

/// Waits until the text of `log` satisfies `done`, for up to `timeout`;
/// returns the text. Panics naming `what` (and the text) otherwise.
fn wait_log(log: &Path, what: &str, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let end = Instant::now() + timeout;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if done(&text) {
            return text;
        }
        assert!(
            Instant::now() < end,
            "{what}: not within {timeout:?}; {}:\n{text}",
            log.display()
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// `python3 -c code args...` in `ns`: its stdout and stderr together.
fn run_py(ns: &str, code: &str, args: &[&str]) -> String {
    let mut argv = vec!["python3", "-c", code];
    argv.extend_from_slice(args);
    match exec_output(ns, &argv) {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("python3 did not run: {e:#}"),
    }
}

/// The host's ephemeral range in `ns` (`net.ipv4.ip_local_port_range`).
fn ephemeral_range(ns: &str) -> (u16, u16) {
    let s = kvnet_tests::lab::sh(ns, "cat /proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut it = s.split_whitespace().map(|p| p.parse::<u16>().unwrap());
    (it.next().unwrap(), it.next().unwrap())
}

/// "198.51.100.1:40000" -> ("198.51.100.1", 40000).
fn endpoint(s: &str) -> (String, u16) {
    let (a, p) = s
        .trim()
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("not ADDR:PORT: {s:?}"));
    (a.to_string(), p.parse().unwrap())
}

/// STUN-like reflector, args ADDR PORT: answers each datagram with the
/// "ADDR:PORT" it came from. SO_REUSEADDR so that a test can send from
/// its address and port too (see `SEND`).
const REFLECTOR: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    s.sendto(("%s:%d" % a).encode(), a)
"#;

/// Args SRC_ADDR SRC_PORT DST_ADDR DST_PORT MSG...: sends each MSG as one
/// datagram from SRC to DST (SO_REUSEADDR: SRC may be a reflector's).
const SEND: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
for m in sys.argv[5:]:
    s.sendto(m.encode(), (sys.argv[3], int(sys.argv[4])))
print("sent", flush=True)
"#;

/// Args SPORT ADDR PORT: from a socket bound to SPORT, asks the reflector
/// at ADDR:PORT what it sees ("mapped ADDR:PORT"); tries 5 times, 1 s
/// each (a first datagram may wait for a neighbour).
const ASK: &str = r#"
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(1)
dst = (sys.argv[2], int(sys.argv[3]))
for _ in range(5):
    s.sendto(b"who-am-i", dst)
    try:
        d, a = s.recvfrom(100)
    except socket.timeout:
        continue
    if a == dst:
        print("mapped", d.decode()); break
else:
    print("no answer from", dst)
"#;

/// Args SPORT PORT HOST,HOST...: one socket bound to SPORT asks the
/// reflector on PORT of each HOST in turn ("mapped HOST ADDR:PORT"), then
/// prints every datagram it receives ("got ADDR:PORT TEXT") until one says
/// "end" (exit 0) or 30 s pass (exit 2).
const ONE_SOCKET: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
for host in sys.argv[3].split(","):
    dst = (host, int(sys.argv[2]))
    s.settimeout(1)
    for _ in range(5):
        s.sendto(b"who-am-i", dst)
        try:
            d, a = s.recvfrom(100)
        except socket.timeout:
            continue
        if a == dst:
            print("mapped", host, d.decode(), flush=True); break
    else:
        print("no answer from", host, flush=True); sys.exit(1)
print("listening", flush=True)
end = time.time() + 30
while time.time() < end:
    s.settimeout(max(0.01, end - time.time()))
    try:
        d, a = s.recvfrom(2048)
    except socket.timeout:
        break
    print("got %s:%d %s" % (a[0], a[1], d.decode(errors="replace")), flush=True)
    if d == b"end":
        sys.exit(0)
print("timeout", flush=True)
sys.exit(2)
"#;

/// The big datagram's content: i % 251 (a prime), so misplaced fragments
/// show.
const PATTERN: &str = "bytes(i % 251 for i in range(int(sys.argv[3])))";

/// Args ADDR PORT SIZE: a UDP echo server whose answer is the whole
/// datagram, fragmented by its kernel (IP_PMTUDISC_DONT); logs "got N
/// bytes from ADDR:PORT intact|damaged" (intact: the expected pattern).
fn big_echo() -> String {
    format!(
        r#"
import socket, sys
want = {PATTERN}
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    print("got %d bytes from %s:%d %s" % (len(d), a[0], a[1], "intact" if d == want else "damaged"), flush=True)
    s.sendto(d, a)
"#
    )
}

/// Args ADDR PORT SIZE: sends the pattern to ADDR:PORT (fragmented by the
/// kernel) and prints "answer N bytes from ADDR:PORT intact|damaged";
/// tries 5 times, 2 s each.
fn big_client() -> String {
    format!(
        r#"
import socket, sys
want = {PATTERN}
dst = (sys.argv[1], int(sys.argv[2]))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IP, 10, 0); s.settimeout(2)
for _ in range(5):
    s.sendto(want, dst)
    try:
        d, a = s.recvfrom(65535)
    except socket.timeout:
        print("timeout", flush=True); continue
    print("answer %d bytes from %s:%d %s" % (len(d), a[0], a[1], "intact" if d == want else "damaged"))
    break
"#
    )
}

/// What the reflector at `remote` sees of a guest socket bound to `sport`.
fn observed(g: &GuestPort, sport: u16, remote: &str) -> (String, u16) {
    let r = run_py(&g.ns, ASK, &[&sport.to_string(), remote, STUN]);
    let line = r
        .lines()
        .find_map(|l| l.strip_prefix("mapped "))
        .unwrap_or_else(|| panic!("source port {sport}: no reflection from {remote}: {r}"));
    endpoint(line)
}

/// The mapping a `ONE_SOCKET` log reports for `host` ("mapped HOST ADDR:PORT").
fn mappings(text: &str, host: &str) -> (String, u16) {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(&format!("mapped {host} ")))
        .unwrap_or_else(|| panic!("no mapping reported for {host}:\n{text}"));
    endpoint(line)
}

/// A port in the middle of the hypervisor's ephemeral range: port
/// preservation never keeps it, so a shared mapping is no coincidence.
fn ephemeral_guest_port(t: &Nat) -> u16 {
    let (lo, hi) = ephemeral_range(t.lab.hv());
    assert!(lo < hi, "ephemeral range {lo}-{hi}");
    lo + (hi - lo) / 2
}

/// The guest socket of `ONE_SOCKET` on `sport`, after it has asked both
/// reflectors: (process, log, mapping seen by A, mapping seen by B).
fn one_socket_mapped(t: &Nat, sport: u16) -> (Proc, PathBuf, (String, u16), (String, u16)) {
    t.service(&t.out.ns, "reflector-a", REFLECTOR, &[REMOTE_A, STUN]);
    t.service(&t.out.ns, "reflector-b", REFLECTOR, &[REMOTE_B, STUN]);
    let (proc, log) = t.spawn_py(
        &t.guests[0].ns,
        "guest-socket",
        ONE_SOCKET,
        &[&sport.to_string(), STUN, &format!("{REMOTE_A},{REMOTE_B}")],
    );
    let text = wait_log(
        &log,
        "the guest socket hears both reflectors",
        Duration::from_secs(15),
        |l| l.contains("listening\n") || l.contains("no answer"),
    );
    assert!(text.contains("listening\n"), "{text}");
    let (a, b) = (mappings(&text, REMOTE_A), mappings(&text, REMOTE_B));
    (proc, log, a, b)
}

/// Sends `msgs` from `from` (address, port) in the outside namespace to
/// `to`.
fn send_from_outside(t: &Nat, from: (&str, u16), to: (&str, u16), msgs: &[&str]) {
    let mut args = vec![
        from.0.to_string(),
        from.1.to_string(),
        to.0.to_string(),
        to.1.to_string(),
    ];
    args.extend(msgs.iter().map(|m| m.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_py(&t.out.ns, SEND, &args);
    assert!(r.contains("sent"), "{r}");
}

#[test]
fn a_guests_source_port_is_kept_unless_the_uplink_address_serves_it() {
    if !privileged() {
        return;
    }
    let t = nat_lab(2, "symmetric");
    let g = &t.guests[0];
    t.service(&t.out.ns, "reflector", REFLECTOR, &[REMOTE_A, STUN]);
    let (elo, ehi) = ephemeral_range(t.lab.hv());

    // Positive control: a free port outside the ephemeral range is kept.
    assert!(!(elo..=ehi).contains(&3333), "3333 in {elo}-{ehi}");
    assert_eq!(
        observed(g, 3333, REMOTE_A),
        (UPLINK.to_string(), 3333),
        "a free port is preserved"
    );

    // A UDP port forward holds 2222 on the uplink address.
    t.udp_forward(2222, "10.50.0.12:2222");
    let (addr, port) = observed(g, 2222, REMOTE_A);
    assert_eq!(addr, UPLINK);
    assert_ne!(port, 2222, "the forward's port was handed to a guest flow");

    // A host socket on the uplink address listens on 4444.
    t.service(
        t.lab.hv(),
        "host-socket",
        r#"
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("198.51.100.1", 4444))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(2048); print("host got", d, a, flush=True)
"#,
        &[],
    );
    let (addr, port) = observed(g, 4444, REMOTE_A);
    assert_eq!(addr, UPLINK);
    assert_ne!(
        port, 4444,
        "a host socket's port was handed to a guest flow"
    );

    // A port of the host's ephemeral range is never handed out.
    let eph = elo + (ehi - elo) / 2;
    let (addr, port) = observed(g, eph, REMOTE_A);
    assert_eq!(addr, UPLINK);
    assert!(
        !(elo..=ehi).contains(&port),
        "source port {eph} left as {port}, inside the host's ephemeral range {elo}-{ehi}"
    );
}

/// The acceptance check: a STUN-style check from two outside hosts shows
/// the same mapped address and port for one guest socket (EIM); then a
/// third host reaches that socket through the mapping (EIF).
#[test]
fn one_guest_socket_keeps_one_mapping_towards_every_remote_with_eim() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, "eim");
    let sport = ephemeral_guest_port(&t);
    let (proc, log, a, b) = one_socket_mapped(&t, sport);
    assert_eq!(a.0, UPLINK, "host A sees the uplink address");
    assert_ne!(
        a.1, sport,
        "precondition: the guest's port is not preserved"
    );
    assert_eq!(
        b, a,
        "hosts A and B see one mapping of one guest socket (EIM)"
    );

    // Endpoint-independent filtering: the stranger, never sent to, reaches
    // the socket through its mapping (sent until it arrives, 5 s at most).
    let heard = format!("got {STRANGER}:{STRANGER_PORT} stranger\n");
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        send_from_outside(&t, (STRANGER, STRANGER_PORT), (UPLINK, a.1), &["stranger"]);
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains(&heard) {
            break;
        }
        assert!(
            Instant::now() < end,
            "the stranger's datagram to {UPLINK}:{} never reached the guest socket (EIF):\n{text}",
            a.1
        );
        thread::sleep(Duration::from_millis(100));
    }
    // Counted: one mapping, and the stranger's flow opened through it.
    let nat = &t.k.json(&["stats"]).unwrap()["nat"][0];
    assert_eq!(nat["udp_mappings"].as_u64(), Some(1), "{nat}");
    assert!(nat["eif_flows"].as_u64().unwrap_or(0) >= 1, "{nat}");
    send_from_outside(&t, (STRANGER, STRANGER_PORT), (UPLINK, a.1), &["end"]);
    let st = proc.wait_timeout(Duration::from_secs(5)).unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(st.is_some_and(|s| s.success()), "{text}");
}

#[test]
fn symmetric_mode_maps_each_remote_on_its_own_and_filters_strangers() {
    if !privileged() {
        return;
    }
    let t = nat_lab(1, "symmetric");
    let sport = ephemeral_guest_port(&t);
    let (proc, log, a, b) = one_socket_mapped(&t, sport);
    assert_eq!(a.0, UPLINK, "host A sees the uplink address");
    assert_eq!(b.0, UPLINK, "host B sees the uplink address");
    assert_ne!(
        a.1, sport,
        "precondition: the guest's port is not preserved"
    );
    // Each remote's port is drawn at random from ~36000: equal by chance
    // once in that many runs.
    assert_ne!(
        a.1, b.1,
        "one mapping per remote: hosts A and B see two ports"
    );

    // The stranger tries both mappings...
    for port in [a.1, b.1] {
        send_from_outside(
            &t,
            (STRANGER, STRANGER_PORT),
            (UPLINK, port),
            &["stranger", "stranger"],
        );
    }
    // ...then the hosts the guest sent to answer, unasked, on theirs: they
    // arrive (positive control, sent after the stranger's), it does not.
    send_from_outside(&t, (REMOTE_B, STUN_PORT), (UPLINK, b.1), &["control-b"]);
    wait_log(
        &log,
        "host B's datagram through its mapping",
        Duration::from_secs(5),
        |l| l.contains(&format!("got {REMOTE_B}:{STUN_PORT} control-b\n")),
    );
    send_from_outside(
        &t,
        (REMOTE_A, STUN_PORT),
        (UPLINK, a.1),
        &["control-a", "end"],
    );
    let st = proc.wait_timeout(Duration::from_secs(5)).unwrap();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        st.is_some_and(|s| s.success())
            && text.contains(&format!("got {REMOTE_A}:{STUN_PORT} control-a\n")),
        "host A's datagram through its mapping:\n{text}"
    );
    assert!(
        !text.contains("stranger"),
        "a stranger reached the guest through a per-remote mapping:\n{text}"
    );
}

/// IPv4 header fields of a captured frame: (id, more fragments, offset in
/// bytes, payload length).
fn frag_fields(f: &Frame) -> Option<(u16, bool, usize, usize)> {
    let p = f.payload();
    if f.ethertype() != 0x0800 || p.len() < 20 {
        return None;
    }
    let ihl = (p[0] & 0xf) as usize * 4;
    let tot = u16::from_be_bytes([p[2], p[3]]) as usize;
    let ff = u16::from_be_bytes([p[6], p[7]]);
    Some((
        u16::from_be_bytes([p[4], p[5]]),
        ff & 0x2000 != 0,
        (ff & 0x1fff) as usize * 8,
        tot.saturating_sub(ihl),
    ))
}

/// How many UDP datagrams of BIG bytes crossed as complete sets of
/// fragments from `src` to `dst` (first and last fragment seen, the
/// payloads adding up to the UDP datagram).
fn fragmented_datagrams(frames: &[Frame], src: [u8; 4], dst: [u8; 4]) -> usize {
    let mut by_id: std::collections::BTreeMap<u16, (bool, bool, usize)> = Default::default();
    for f in frames {
        if f.ipv4_addrs() != Some((src, dst)) || f.ipv4_proto() != Some(17) {
            continue;
        }
        let Some((id, mf, off, len)) = frag_fields(f) else {
            continue;
        };
        if !mf && off == 0 {
            continue;
        }
        let e = by_id.entry(id).or_default();
        e.0 |= off == 0;
        e.1 |= !mf;
        e.2 += len;
    }
    by_id
        .values()
        .filter(|(first, last, len)| *first && *last && *len == BIG + 8)
        .count()
}

fn fragments_cross_the_nat(nat_udp: &str) {
    let t = nat_lab(1, nat_udp);
    let g = &t.guests[0];
    let link = g.sh("ip -o link show eth0").unwrap();
    assert!(
        link.contains(" mtu 1500 "),
        "precondition: the guest's MTU is 1500: {link}"
    );
    let size = BIG.to_string();
    let outside_log = t.service(
        &t.out.ns,
        "outside-echo",
        &big_echo(),
        &[REMOTE_A, "7000", &size],
    );
    let guest_log = t.service(
        &g.ns,
        "guest-echo",
        &big_echo(),
        &["0.0.0.0", "6000", &size],
    );
    t.udp_forward(6000, "10.50.0.11:6000");
    let cap = Capture::start(&t.out.ns, "eth0").unwrap();

    // Guest -> outside: the request and its echo, whole.
    let r = run_py(&g.ns, &big_client(), &[REMOTE_A, "7000", &size]);
    assert!(
        r.contains(&format!("answer {BIG} bytes from {REMOTE_A}:7000 intact")),
        "{nat_udp}: the outside's echo of {BIG} bytes reached the guest whole: {r}"
    );
    let text = std::fs::read_to_string(&outside_log).unwrap();
    assert!(
        text.contains(&format!("got {BIG} bytes from {UPLINK}:")) && !text.contains("damaged"),
        "{nat_udp}: the outside got the guest's datagram whole, from the uplink address:\n{text}"
    );

    // Outside -> guest through the forward: the request and the answer.
    let r = run_py(&t.out.ns, &big_client(), &[UPLINK, "6000", &size]);
    assert!(
        r.contains(&format!("answer {BIG} bytes from {UPLINK}:6000 intact")),
        "{nat_udp}: the guest's answer through the forward arrived whole: {r}"
    );
    let text = std::fs::read_to_string(&guest_log).unwrap();
    assert!(
        text.contains(&format!("got {BIG} bytes from {REMOTE_A}:")) && !text.contains("damaged"),
        "{nat_udp}: the guest got the forwarded datagram whole:\n{text}"
    );

    // On the wire: both ways, fragments, the guests' behind the uplink
    // address (the guest's request and its answer through the forward).
    let frames = cap
        .stop_when(
            "two fragmented datagrams each way",
            Duration::from_secs(5),
            |fs| {
                fragmented_datagrams(fs, UPLINK_IP, REMOTE_A_IP) >= 2
                    && fragmented_datagrams(fs, REMOTE_A_IP, UPLINK_IP) >= 2
            },
        )
        .unwrap();
    let leaked: Vec<&Frame> = frames
        .iter()
        .filter(|f| f.ipv4_addrs().is_some_and(|(s, _)| s[0] == 10))
        .collect();
    assert!(
        leaked.is_empty(),
        "{nat_udp}: guest addresses on the outside wire: {leaked:?}"
    );
    // kvnet translated the later fragments itself (each datagram's two).
    let nat = &t.k.json(&["stats"]).unwrap()["nat"][0];
    let fragments = nat["fragments"].as_u64().unwrap_or(0);
    assert!(
        fragments >= 8,
        "{nat_udp}: later fragments translated: {fragments}: {nat}"
    );
}

#[test]
fn fragmented_datagrams_cross_the_nat_both_ways() {
    if !privileged() {
        return;
    }
    for mode in ["symmetric", "eim"] {
        fragments_cross_the_nat(mode);
    }
}
