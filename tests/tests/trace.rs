//! Issue 9 point 5: `kvnet trace` shows a guest's ping through NAT
//! (ingress, translation, egress), filtered in the kernel, and leaves
//! tracing off when it is done.
use std::{process::Command, process::Stdio, time::Duration};

use kvnet_tests::{kvnet::Kvnet, lab::privileged, Lab};
use serde_json::Value;

/// `trace_cfg`'s `enabled` field, read with bpftool.
fn trace_enabled(lab: &Lab) -> u64 {
    let pin = lab.pin_dir().join("trace_cfg");
    let out = Command::new("bpftool")
        .args(["-j", "map", "lookup", "pinned"])
        .arg(&pin)
        .args(["key", "0", "0", "0", "0"])
        .output()
        .expect("bpftool");
    assert!(
        out.status.success(),
        "bpftool map lookup {}: {}",
        pin.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    if let Some(e) = v["formatted"]["value"]["enabled"].as_u64() {
        return e;
    }
    // Without BTF: the raw bytes, `enabled` is the first (native-endian) u32.
    let bytes: Vec<u8> = v["value"].as_array().unwrap()[..4]
        .iter()
        .map(|b| u8::from_str_radix(b.as_str().unwrap().trim_start_matches("0x"), 16).unwrap())
        .collect();
    u32::from_ne_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as u64
}

#[test]
fn trace_shows_a_ping_through_nat() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _out = lab
        .add_outside_with("198.51.100.2/24", "198.51.100.1/24")
        .unwrap();
    let g = lab.add_guest_with("vm0", Some("10.50.0.11/24")).unwrap();
    g.disable_ipv6().unwrap();
    g.sh("ip route add default via 10.50.0.1").unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&[
        "net",
        "add",
        "nat",
        "--mode",
        "nat",
        "--gateway",
        "10.50.0.1/24",
        "--uplink",
        "up0",
    ])
    .unwrap();
    k.cli(&["port", "add", "nat", &g.hv_if]).unwrap();
    // Neighbours resolved and the flow known before tracing, so the
    // traced pings take the fast path from the first packet.
    assert!(g.ping("198.51.100.2"), "the guest reaches the outside");
    assert_eq!(trace_enabled(&lab), 0, "nobody traces yet");

    // The CLI runs where the ports are, so it names them.
    let out_path = lab.work_dir().join("trace.jsonl");
    let mut cmd = Command::new(k.bin());
    cmd.arg("--socket")
        .arg(k.socket())
        .arg("trace")
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .args(["--ip", "10.50.0.11", "--count", "4", "--json"])
        .stdout(Stdio::from(std::fs::File::create(&out_path).unwrap()))
        .stderr(Stdio::from(
            std::fs::File::create(lab.work_dir().join("trace.err")).unwrap(),
        ));
    let tracer = lab.spawn(lab.hv(), cmd).unwrap();
    let mut status = None;
    for _ in 0..30 {
        if trace_enabled(&lab) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..20 {
        g.sh("ping -c 1 -W 1 198.51.100.2 >/dev/null || true")
            .unwrap();
        status = tracer.wait_timeout(Duration::from_millis(200)).unwrap();
        if status.is_some() {
            break;
        }
    }
    let text = std::fs::read_to_string(&out_path).unwrap();
    let err = std::fs::read_to_string(lab.work_dir().join("trace.err")).unwrap_or_default();
    let status =
        status.unwrap_or_else(|| panic!("trace did not end after 4 events:\n{text}\n{err}"));
    assert!(status.success(), "kvnet trace failed: {err}\n{text}");
    let events: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    eprintln!("{text}");
    assert_eq!(events.len(), 4, "--count 4:\n{text}");

    // The echo request: in on the guest's port, translated to the uplink
    // address and routed out.
    let out = events
        .iter()
        .find(|e| e["action"] == "nat_out")
        .unwrap_or_else(|| panic!("no nat_out event:\n{text}"));
    assert_eq!(out["hook"], "tc", "{out}");
    assert_eq!(out["ingress"], g.hv_if.as_str(), "{out}");
    assert_eq!(out["proto"], "icmp", "{out}");
    assert_eq!(out["before"]["saddr"], "10.50.0.11", "{out}");
    assert_eq!(out["before"]["daddr"], "198.51.100.2", "{out}");
    assert_eq!(out["after"]["saddr"], "198.51.100.1", "{out}");
    assert_eq!(out["after"]["daddr"], "198.51.100.2", "{out}");
    assert_eq!(out["verdict"], "redirect", "{out}");
    assert_eq!(out["egress"], "up0", "{out}");

    // The reply: in on the uplink, translated back to the guest.
    let back = events
        .iter()
        .find(|e| e["action"] == "nat_in")
        .unwrap_or_else(|| panic!("no nat_in event:\n{text}"));
    assert_eq!(back["ingress"], "up0", "{back}");
    assert_eq!(back["before"]["saddr"], "198.51.100.2", "{back}");
    assert_eq!(back["before"]["daddr"], "198.51.100.1", "{back}");
    assert_eq!(back["after"]["daddr"], "10.50.0.11", "{back}");
    assert_eq!(back["verdict"], "redirect", "{back}");
    assert_eq!(back["egress"], g.hv_if.as_str(), "{back}");
    // Each of the four is one of the two; the kernel filtered the rest.
    assert!(
        events
            .iter()
            .all(|e| e["action"] == "nat_out" || e["action"] == "nat_in"),
        "{text}"
    );

    // Done tracing: off again, and the datapath goes on.
    assert_eq!(trace_enabled(&lab), 0, "trace left tracing on");
    assert!(g.ping("198.51.100.2"));
    // A filter that matches nothing yields nothing, and stops on SIGINT.
    let mut cmd = Command::new(k.bin());
    cmd.arg("trace")
        .arg("--pin-dir")
        .arg(lab.pin_dir())
        .args(["--ip", "192.0.2.99", "--count", "1"])
        .stdout(Stdio::piped());
    let quiet = lab.spawn(lab.hv(), cmd).unwrap();
    for _ in 0..30 {
        if trace_enabled(&lab) == 1 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(trace_enabled(&lab), 1);
    assert!(g.ping("198.51.100.2"));
    assert!(quiet.is_running(), "nothing matched, trace goes on");
    quiet.signal(nix::sys::signal::Signal::SIGINT).unwrap();
    let st = quiet.wait_timeout(Duration::from_secs(5)).unwrap();
    assert!(st.is_some_and(|s| s.success()), "trace stops on Ctrl-C");
    assert_eq!(trace_enabled(&lab), 0, "Ctrl-C turns tracing off");
}
