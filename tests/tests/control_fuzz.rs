//! Issue 15, point 7: a fuzzer for the control protocol (one JSON request
//! per line). Against a lab daemon with a network, a port and a static FDB
//! entry: random bytes, truncated and garbage JSON, valid JSON of wrong
//! shapes, every request kind with fields mutated into invalid values,
//! lines over 8 MiB, half-written requests, many concurrent and idle
//! connections, a client that never reads. Every invalid request gets one
//! clear error line (never a hang), the daemon keeps serving, its state
//! (networks, ports, FDB, interfaces) is unchanged and it leaks no fds.
//!
//! Seeded (`KVNET_FUZZ_SEED` replays a run); bounded to a few seconds in
//! the suite, longer under `KVNET_SOAK=1` (`cargo xtask soak`).
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::net::UnixStream,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{kvnet::Kvnet, lab::privileged, Lab};
use serde_json::{json, Value};

#[path = "support/soak.rs"]
mod soak;
use soak::*;

/// What an answer must be.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// Not a request at all: `malformed request: ...`.
    Malformed,
    /// A request, refused: ok=false with a non-empty error.
    Refused,
    /// Anything well-formed (the state check below still applies).
    Any,
}

/// How long any answer may take before it counts as a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).expect("connect to the control socket");
    s.set_read_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(ANSWER_TIMEOUT)).unwrap();
    s
}

/// Sends `lines` (each without its newline) on one connection and reads
/// one answer per line.
fn exchange(socket: &Path, lines: &[Vec<u8>]) -> Vec<Value> {
    let mut s = connect(socket);
    let mut buf = Vec::new();
    for l in lines {
        buf.extend_from_slice(l);
        buf.push(b'\n');
    }
    s.write_all(&buf).expect("send the requests");
    let mut r = BufReader::new(&s);
    lines
        .iter()
        .map(|l| {
            let mut answer = String::new();
            let n = r.read_line(&mut answer).unwrap_or_else(|e| {
                panic!("no answer to {} (hang?): {e}", show(l));
            });
            assert!(n > 0, "connection closed without an answer to {}", show(l));
            serde_json::from_str(&answer)
                .unwrap_or_else(|e| panic!("answer to {} is not JSON ({e}): {answer:?}", show(l)))
        })
        .collect()
}

/// A request for messages: at most 200 characters of it.
fn show(l: &[u8]) -> String {
    let s = String::from_utf8_lossy(l);
    if s.len() > 200 {
        let mut end = 200;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}... ({} bytes)", &s[..end], l.len())
    } else {
        format!("{s:?}")
    }
}

fn check(line: &[u8], expect: Expect, answer: &Value) {
    let ok = answer["ok"].as_bool();
    let err = answer["error"].as_str().unwrap_or_default();
    assert!(
        ok.is_some(),
        "answer without ok to {}: {answer}",
        show(line)
    );
    match expect {
        Expect::Malformed => assert!(
            ok == Some(false) && err.starts_with("malformed request: "),
            "{} should be malformed: {answer}",
            show(line)
        ),
        Expect::Refused => assert!(
            ok == Some(false) && !err.trim().is_empty() && err != "unknown error",
            "{} should be refused with a clear error: {answer}",
            show(line)
        ),
        Expect::Any => {}
    }
    if ok == Some(false) {
        assert!(
            !err.contains("panicked") && !err.contains("poisoned"),
            "{}: {err}",
            show(line)
        );
    }
}

/// Names that no network, port or interface of the lab has.
const NO_NET: &str = "nonet";
const NO_IF: &str = "noif0";
/// The lab's network, port, a static FDB entry and a free interface.
const NET: &str = "fz";
const PORT: &str = "fzp0";
const FREE: &str = "fzfree";

/// Invalid strings for names and values.
fn junk(rng: &mut Rng) -> String {
    match rng.below(9) {
        0 => String::new(),
        1 => "-x".into(),
        2 => "a b".into(),
        3 => "x".repeat(33 + rng.below(100)),
        4 => "../../etc".into(),
        5 => "ñé\u{202e}✓".into(),
        6 => "a\0b".into(),
        7 => "%s%n{}".into(),
        _ => {
            let n = 1 + rng.below(20);
            String::from_utf8_lossy(&rng.bytes(n)).replace(|c: char| c.is_ascii_alphanumeric(), "_")
        }
    }
}

/// One request of every kind except `down`, each invalid in a field the
/// fuzzer mutates: the daemon must refuse all and change nothing.
fn invalid_request(rng: &mut Rng, work: &Path) -> Value {
    let kind = rng.below(INVALID_KINDS);
    invalid_request_of(kind, rng, work)
}

/// How many kinds of invalid request [`invalid_request_of`] makes.
const INVALID_KINDS: usize = 27;

/// An invalid request of kind `kind` (0..INVALID_KINDS), its other
/// choices random.
fn invalid_request_of(kind: usize, rng: &mut Rng, work: &Path) -> Value {
    let j = junk(rng);
    match kind {
        0 => json!({"op": "net_add", "name": j, "ageing_secs": null}),
        1 => json!({"op": "net_add", "name": NET, "ageing_secs": 10}),
        2 => {
            // A fresh, valid name with an invalid option.
            let opts = match rng.below(9) {
                0 => json!({"mode": "nat"}),
                1 => json!({"mode": "nat", "gateway": "10.77.0.1/24", "uplink": NO_IF}),
                2 => json!({"mode": "host-only", "gateway": "999.1.1.1/24"}),
                3 => json!({"mode": "host-only", "gateway": "10.77.0.1/33"}),
                4 => {
                    // Names no interface can have (the kernel's rules: 1-15
                    // bytes, no '/', ':' or whitespace, no NUL).
                    let bad =
                        *rng.pick(&["", "a b", "xxxxxxxxxxxxxxxx", "../x", "a:b", "a\0b", "\t"]);
                    json!({"mode": "host-only", "gateway": "10.77.0.1/24", "gateway_iface": bad})
                }
                5 => json!({"dhcp_range": "10.77.0.10,10.77.0.20"}),
                6 => json!({"mode": "host-only", "gateway": "10.77.0.1/24",
                            "dhcp_range": "10.78.0.10,10.78.0.20"}),
                7 => json!({"mode": "host-only", "gateway": "10.77.0.1/24",
                            "dhcp_range": "10.77.0.10,10.77.0.20", "dhcp_hosts": [j]}),
                _ => json!({"mode": "nat", "gateway": "10.77.0.1/24", "uplink": NO_IF,
                            "nat_ports": "5000-100"}),
            };
            json!({"op": "net_add", "name": "fzfresh", "ageing_secs": null, "opts": opts})
        }
        3 => json!({"op": "net_show", "name": j}),
        4 => {
            json!({"op": "forward_add", "net": *rng.pick(&[NET, NO_NET]), "proto": *rng.pick(&["tcp", "sctp", ""]),
                    "port": rng.below(65536), "to": *rng.pick(&["10.0.0.2:80", "garbage", ""])})
        }
        5 => {
            json!({"op": "forward_del", "net": *rng.pick(&[NET, NO_NET]), "proto": "tcp", "port": 81})
        }
        6 => json!({"op": "forward_list", "net": NO_NET}),
        7 => json!({"op": "conntrack_list", "net": j}),
        8 => json!({"op": "conntrack_flush", "net": NO_NET}),
        9 => json!({"op": "net_del", "name": *rng.pick(&[NO_NET, ""])}),
        10 => json!({"op": "net_set", "name": NO_NET, "ageing_secs": 5}),
        11 => {
            let (net, iface) = *rng.pick(&[(NO_NET, FREE), (NET, NO_IF), (NET, "")]);
            json!({"op": "port_add", "net": net, "iface": iface, "hairpin": false, "hook": "auto"})
        }
        12 => {
            // The free interface into the real network, with bad VLAN or
            // security settings.
            let vlan = match rng.below(4) {
                0 => json!({"vlan": bad_vlan(rng)}),
                1 => json!({"trunk": bad_vlan(rng)}),
                2 => json!({"native": "5"}),
                _ => json!({"vlan": "5", "trunk": "6"}),
            };
            let security = match rng.below(4) {
                0 => json!({"mac": [j]}),
                1 => json!({"ip": ["300.1.1.1"]}),
                2 => json!({"max_macs": 0}),
                _ => json!({"max_macs": 200}),
            };
            let (v, s) = if rng.chance(50) {
                (vlan, json!({}))
            } else {
                (json!({}), security)
            };
            json!({"op": "port_add", "net": NET, "iface": FREE, "hairpin": false,
                   "hook": "auto", "vlan": v, "security": s})
        }
        13 => json!({"op": "port_show", "iface": j}),
        14 => {
            json!({"op": "port_set", "iface": *rng.pick(&[PORT, NO_IF]), "vlan": {"vlan": bad_vlan(rng)}})
        }
        15 => json!({"op": "vlan_show", "net": NO_NET}),
        16 => json!({"op": "port_del", "iface": *rng.pick(&[NO_IF, FREE, ""])}),
        17 => json!({"op": "fdb_show", "net": j}),
        18 => {
            let (mac, port, vlan) = *rng.pick(&[
                ("zz:00:00:00:00:01", PORT, None),
                ("02:00:00:00:00:09", NO_IF, None),
                ("02:00:00:00:00:09", PORT, Some("x")),
                ("ff:ff:ff:ff:ff:ff", PORT, None),
                ("02:00:00:00:00", PORT, None),
            ]);
            json!({"op": "fdb_add", "net": *rng.pick(&[NET, NO_NET]), "mac": mac, "port": port, "vlan": vlan})
        }
        19 => {
            json!({"op": "fdb_del", "net": *rng.pick(&[NET, NO_NET]), "mac": *rng.pick(&["zz", "", "1:2:3"])})
        }
        20 => json!({"op": "dhcp_leases", "net": NO_NET}),
        21 => json!({"op": "dhcp_set", "net": *rng.pick(&[NET, NO_NET]),
                     "range": *rng.pick(&["garbage", "10.9.9.9,10.9.9.1"]), "domain": null,
                     "lease_secs": null, "host_add": null, "host_del": null}),
        22 => {
            // Config text that cannot parse: it never replaces the state.
            let text = match rng.below(4) {
                0 => "[[[".to_string(),
                1 => format!("= = {j}"),
                2 => String::new(),
                _ => format!("[networks.{NET}]\nmode = \"{j}x\"\n"),
            };
            json!({"op": "apply", "path": null, "text": text, "dry_run": rng.chance(50)})
        }
        23 => {
            // Outside the config directory, unforced (one escapes it by `..`).
            let path = match rng.below(3) {
                0 => format!("/etc/kvnet/../..{}/escaped.toml", work.display()),
                1 => work.join("saved.toml").display().to_string(),
                _ => "relative.toml".into(),
            };
            json!({"op": "save", "path": path, "force": false})
        }
        24 => json!({"op": "ifup", "iface": *rng.pick(&[NO_IF, FREE]), "net": null, "vlan": null}),
        25 => json!({"op": "ifup", "iface": PORT, "net": NO_NET, "vlan": null}),
        _ => json!({"op": "ifup", "iface": FREE, "net": NET, "vlan": bad_vlan(rng)}),
    }
}

fn bad_vlan(rng: &mut Rng) -> &'static str {
    *rng.pick(&["0", "4095", "70000", "x", "1,,", "-1", ""])
}

/// Breaks the shape of a request: a required field removed, a field given
/// a value of no valid type, or the op changed. The base request is
/// invalid and none of these can make it valid (an optional field removed,
/// an object emptied or a flag set could), so the answer is an error.
fn reshape(rng: &mut Rng, mut v: Value) -> Value {
    const REQUIRED: &[&str] = &[
        "name", "net", "iface", "hairpin", "hook", "proto", "port", "to", "mac", "text", "dry_run",
    ];
    let obj = v.as_object_mut().unwrap();
    let keys: Vec<String> = obj.keys().cloned().collect();
    let k = rng.pick(&keys).clone();
    match rng.below(5) {
        0 if REQUIRED.contains(&k.as_str()) => {
            obj.remove(&k);
        }
        1 => {
            let wrong = match rng.below(4) {
                0 => json!(12345),
                1 => json!([1, "a", null]),
                2 => json!(-1),
                _ => json!(1.5e300),
            };
            obj.insert(k, wrong);
        }
        2 => {
            obj.insert(
                "op".into(),
                json!(*rng.pick(&["NET_ADD", "net-add", "", "down ", "netlist"])),
            );
        }
        3 => {
            obj.insert("op".into(), json!(null));
        }
        _ => {
            obj.remove("op");
        }
    }
    v
}

/// Random JSON, never an object with a valid op.
fn random_json(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 3 { 4 } else { 7 }) {
        0 => json!(null),
        1 => json!(rng.next() as i64),
        2 => {
            let n = rng.below(30);
            json!(String::from_utf8_lossy(&rng.bytes(n)))
        }
        3 => json!(rng.chance(50)),
        4 | 5 => Value::Array(
            (0..rng.below(5))
                .map(|_| random_json(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = serde_json::Map::new();
            for _ in 0..rng.below(5) {
                m.insert(
                    rng.pick(&["op", "name", "net", "iface", "x", ""])
                        .to_string(),
                    random_json(rng, depth + 1),
                );
            }
            // An op of a real request with random fields would be a real
            // request: keep the op a non-string or unknown.
            if m.get("op").is_some_and(Value::is_string) {
                m.insert("op".into(), json!("no_such_op"));
            }
            Value::Object(m)
        }
    }
}

fn no_newline(mut b: Vec<u8>) -> Vec<u8> {
    for c in &mut b {
        if *c == b'\n' {
            *c = b' ';
        }
    }
    b
}

/// The state the fuzzing must not change.
fn snapshot(k: &Kvnet, lab: &Lab) -> Value {
    let links: Value = serde_json::from_slice(
        &lab.exec(lab.hv(), &["ip", "-j", "link", "show"])
            .unwrap()
            .stdout,
    )
    .unwrap();
    let mut ifaces: Vec<String> = links
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            format!(
                "{} {}",
                l["ifname"].as_str().unwrap_or_default(),
                l["operstate"].as_str().unwrap_or_default()
            )
        })
        .collect();
    ifaces.sort();
    json!({
        "nets": k.json(&["net", "list"]).unwrap(),
        "net": k.json(&["net", "show", NET]).unwrap(),
        "ports": k.json(&["port", "list"]).unwrap(),
        "fdb_static": k.fdb(NET).into_iter().filter(|e| e["kind"] == "static").collect::<Vec<_>>(),
        "ifaces": ifaces,
    })
}

/// The daemon answers a normal request and is alive.
fn healthy(k: &Kvnet, what: &str) {
    assert!(k.daemon_running(), "daemon died after {what}");
    let a = exchange(k.socket(), &[br#"{"op":"status"}"#.to_vec()]);
    assert_eq!(a[0]["ok"], true, "status after {what}: {}", a[0]);
}

#[test]
fn control_socket_fuzz_gets_clear_errors_and_changes_nothing() {
    if !privileged() {
        return;
    }
    let started = Instant::now();
    let budget = scale(Duration::from_secs(8), Duration::from_secs(300));
    let mut rng = Rng::from_env("control fuzz");
    let lab = Lab::new().unwrap();
    let g = lab.add_guest(PORT).unwrap();
    lab.exec(
        lab.hv(),
        &[
            "ip", "link", "add", FREE, "type", "veth", "peer", "name", "fzfreep",
        ],
    )
    .unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", NET]).unwrap();
    k.cli(&["port", "add", NET, PORT]).unwrap();
    k.cli(&["fdb", "add", NET, "02:00:00:00:00:42", PORT])
        .unwrap();
    let _ = g;
    let pid = k.daemon_pid().unwrap();
    let sock = k.socket().to_path_buf();
    let work = lab.work_dir().to_path_buf();
    let before = snapshot(&k, &lab);
    let base = footprint(pid);
    let mut sent: u64 = 0;
    let mut rounds: u64 = 0;

    // Positive control: the state check sees a change when there is one.
    k.cli(&["fdb", "add", NET, "02:00:00:00:00:43", PORT])
        .unwrap();
    assert_ne!(snapshot(&k, &lab), before, "the snapshot misses changes");
    k.cli(&["fdb", "del", NET, "02:00:00:00:00:43"]).unwrap();
    assert_eq!(snapshot(&k, &lab), before);

    // Fixed cases first: what the protocol must refuse in any run.
    let fixed: Vec<(Vec<u8>, Expect)> = vec![
        (b"".to_vec(), Expect::Malformed),
        (b"   ".to_vec(), Expect::Malformed),
        (b"null".to_vec(), Expect::Malformed),
        (b"{}".to_vec(), Expect::Malformed),
        (b"[]".to_vec(), Expect::Malformed),
        (br#""net_list""#.to_vec(), Expect::Malformed),
        (br#"{"op":"no_such_op"}"#.to_vec(), Expect::Malformed),
        (br#"{"op":"net_list""#.to_vec(), Expect::Malformed),
        (br#"{"op":"net_add"}"#.to_vec(), Expect::Malformed),
        (br#"{"op":"net_add","name":5}"#.to_vec(), Expect::Malformed),
        (
            br#"{"op":"net_set","name":"fz","ageing_secs":0}"#.to_vec(),
            Expect::Refused,
        ),
        (
            br#"{"op":"port_add","net":"fz","iface":"fzfree"}"#.to_vec(),
            Expect::Malformed,
        ),
        (
            br#"{"op":"port_add","net":"fz","iface":"fzfree","hairpin":false,"hook":"bogus"}"#
                .to_vec(),
            Expect::Malformed,
        ),
        (
            br#"{"op":"forward_add","net":"fz","proto":"tcp","port":70000,"to":"x"}"#.to_vec(),
            Expect::Malformed,
        ),
        (b"\xff\xfe\x00garbage".to_vec(), Expect::Malformed),
        // Deep nesting: serde's recursion limit, not a stack overflow.
        ("[".repeat(100_000).into_bytes(), Expect::Malformed),
        (
            format!("{}{}", "{\"a\":".repeat(50_000), "1").into_bytes(),
            Expect::Malformed,
        ),
        // A 1 MiB name: refused like a short one.
        (
            format!(r#"{{"op":"net_show","name":"{}"}}"#, "n".repeat(1 << 20)).into_bytes(),
            Expect::Refused,
        ),
        // Unknown fields on a read are tolerated (older/newer clients).
        (
            br#"{"op":"net_list","extra":[1,2,3]}"#.to_vec(),
            Expect::Any,
        ),
    ];
    for (line, expect) in &fixed {
        let a = exchange(&sock, std::slice::from_ref(line));
        check(line, *expect, &a[0]);
        sent += 1;
    }
    healthy(&k, "the fixed cases");
    assert_eq!(snapshot(&k, &lab), before, "state after the fixed cases");

    // Every kind of invalid request, a few of each, before the random
    // rounds.
    for i in 0..INVALID_KINDS * 3 {
        let req = invalid_request_of(i % INVALID_KINDS, &mut rng, &work);
        let line = req.to_string().into_bytes();
        let a = exchange(&sock, std::slice::from_ref(&line));
        check(&line, Expect::Refused, &a[0]);
        sent += 1;
    }
    healthy(&k, "every kind of invalid request");
    assert_eq!(snapshot(&k, &lab), before, "state after invalid requests");

    // Random rounds until the budget is spent: each a batch of mixed
    // cases, pipelined on one connection, then the checks.
    let round_end = started + budget;
    while Instant::now() < round_end {
        let mut lines = Vec::new();
        for _ in 0..40 {
            let (line, expect) = match rng.below(5) {
                0 => {
                    let n = rng.below(300);
                    (no_newline(rng.bytes(n)), Expect::Any)
                }
                1 => {
                    // Truncated JSON: a valid request cut short.
                    let full = invalid_request(&mut rng, &work).to_string();
                    let cut = rng.below(full.len().max(1));
                    (full.as_bytes()[..cut].to_vec(), Expect::Malformed)
                }
                2 => (
                    random_json(&mut rng, 0).to_string().into_bytes(),
                    Expect::Malformed,
                ),
                3 => {
                    let base = invalid_request(&mut rng, &work);
                    (
                        reshape(&mut rng, base).to_string().into_bytes(),
                        Expect::Refused,
                    )
                }
                _ => (
                    invalid_request(&mut rng, &work).to_string().into_bytes(),
                    Expect::Refused,
                ),
            };
            // Random bytes may happen to be whitespace around nothing, or
            // (astronomically rarely) JSON: they must only be refused.
            let expect = if expect == Expect::Any {
                Expect::Refused
            } else {
                expect
            };
            lines.push((line, expect));
        }
        let raw: Vec<Vec<u8>> = lines.iter().map(|(l, _)| l.clone()).collect();
        let answers = exchange(&sock, &raw);
        for ((line, expect), a) in lines.iter().zip(&answers) {
            check(line, *expect, a);
        }
        sent += lines.len() as u64;
        rounds += 1;
        healthy(&k, "a random round");
    }
    assert_eq!(snapshot(&k, &lab), before, "state after the random rounds");
    assert!(
        !work.join("escaped.toml").exists() && !work.join("saved.toml").exists(),
        "an unforced save wrote outside the config directory"
    );

    // Over 8 MiB without a newline: the error, then the connection closes.
    let mut s = connect(&sock);
    let big = vec![b' '; 9 << 20];
    let _ = s.write_all(&big);
    let mut answer = String::new();
    let mut r = BufReader::new(&s);
    r.read_line(&mut answer).expect("an answer to 9 MiB");
    let v: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("longer than 8 MiB"),
        "{v}"
    );
    let mut rest = String::new();
    assert_eq!(r.read_line(&mut rest).unwrap_or(0), 0, "closed after it");
    drop(s);
    sent += 1;
    healthy(&k, "an oversized line");

    // Half-written requests. Closed for writing: the daemon answers the
    // partial line (malformed) and ends the connection.
    for part in [
        &br#"{"op":"net_a"#[..],
        br#"{"op":"net_add","name":"hal"#,
        b"{",
    ] {
        let mut s = connect(&sock);
        s.write_all(part).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        BufReader::new(&s).read_line(&mut answer).unwrap();
        let v: Value = serde_json::from_str(&answer).unwrap();
        check(part, Expect::Malformed, &v);
        sent += 1;
    }
    // Closed for good before any answer: nothing to answer to.
    for _ in 0..20 {
        let mut s = connect(&sock);
        s.write_all(br#"{"op":"net_add","name":"half"#).unwrap();
        drop(s);
    }
    // A whole valid request whose sender leaves without reading: carried
    // out (it was whole), the daemon's write just fails.
    healthy(&k, "half-written requests");
    assert_eq!(
        snapshot(&k, &lab),
        before,
        "state after half-written requests"
    );

    // Idle connections (silent, or stuck half way through a line) and a
    // client that sends without reading: all others are still served
    // promptly, by many concurrent clients.
    let idle_n = scale(40, 200);
    let idle: Vec<UnixStream> = (0..idle_n)
        .map(|i| {
            let mut s = connect(&sock);
            if i % 2 == 0 {
                s.write_all(br#"{"op":"net_li"#).unwrap();
            }
            s
        })
        .collect();
    let mut flood = connect(&sock);
    flood.set_nonblocking(true).unwrap();
    let line = b"{\"op\":\"bogus\"}\n".repeat(20_000);
    let mut off = 0;
    // Until the socket buffers are full: the daemon's answers pile up.
    while off < line.len() {
        match flood.write(&line[off..]) {
            Ok(n) => off += n,
            Err(_) => break,
        }
    }
    let clients = scale(16, 64);
    let per_client = scale(25, 200);
    let t0 = Instant::now();
    // Each client's RNG from the run's: one seed replays them all.
    let client_seed = rng.next();
    thread::scope(|sc| {
        for c in 0..clients {
            let sock = &sock;
            sc.spawn(move || {
                let mut rng = Rng::new(client_seed ^ c as u64);
                for _ in 0..per_client {
                    let (line, expect) = if rng.chance(50) {
                        (br#"{"op":"net_list"}"#.to_vec(), Expect::Any)
                    } else {
                        (
                            random_json(&mut rng, 0).to_string().into_bytes(),
                            Expect::Malformed,
                        )
                    };
                    let a = exchange(sock, std::slice::from_ref(&line));
                    check(&line, expect, &a[0]);
                    if expect == Expect::Any {
                        assert_eq!(a[0]["ok"], true, "{}", a[0]);
                    }
                }
            });
        }
    });
    let concurrent = t0.elapsed();
    sent += (clients * per_client) as u64;
    println!(
        "{} requests from {clients} concurrent clients in {concurrent:?}, {idle_n} idle connections open",
        clients * per_client
    );
    assert!(
        concurrent < scale(Duration::from_secs(20), Duration::from_secs(120)),
        "served too slowly beside idle clients: {concurrent:?}"
    );
    healthy(&k, "idle and concurrent connections");
    drop(idle);
    drop(flood);

    // Nothing leaked: the daemon's fds come back once every client is gone.
    let fds = settle_fds(pid, base.fds, Duration::from_secs(10));
    let after = footprint(pid);
    let mut leaks = Vec::new();
    if fds > base.fds {
        leaks.push(format!("fds {} -> {fds}", base.fds));
    }
    // RSS: allocator slack from the 8 MiB buffers may stay; growth beyond
    // 64 MiB is a leak.
    if after.rss_kib > base.rss_kib + 64 * 1024 {
        leaks.push(format!("rss {} KiB -> {} KiB", base.rss_kib, after.rss_kib));
    }
    let now = snapshot(&k, &lab);
    if now != before {
        leaks.push("state changed".into());
    }
    soak_line("control-fuzz", sent, &leaks, started);
    println!(
        "control fuzz: {sent} requests in {rounds} random rounds; footprint {base:?} -> {after:?}"
    );
    assert!(leaks.is_empty(), "{leaks:?}\nbefore {before}\nafter {now}");
    healthy(&k, "the whole run");
    let log = k.daemon_log();
    assert!(!log.contains("panicked"), "{log}");
    k.stop().unwrap();
}
