//! Real tools driven in lab namespaces, with the retries they need.
use std::{
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use serde_json::Value;

use crate::{lab, Lab};

/// Starts a one-shot `iperf3 -s` bound to `server_ip` in `server_ns`, then
/// runs `iperf3 -c server_ip -J ARGS` in `client_ns` until it really ran
/// (while the server starts, iperf3 can exit 0 with an "error" JSON).
pub fn iperf3(
    lab: &Lab,
    server_ns: &str,
    server_ip: &str,
    client_ns: &str,
    args: &[&str],
) -> Result<Value> {
    let mut srv = Command::new("iperf3");
    srv.args(["-s", "-1", "-B", server_ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(server_ns, srv)?;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut cmd = vec!["iperf3", "-c", server_ip, "-J"];
    cmd.extend_from_slice(args);
    loop {
        let o = lab::exec_output(client_ns, &cmd)?;
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        if o.status.success() && !v.is_null() && v.get("error").is_none() {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("iperf3 to {server_ip} from netns {client_ns} never ran: {v}");
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes the iperf3 receiver got, and its rate in bit/s.
pub fn received(v: &Value) -> (u64, f64) {
    let r = &v["end"]["sum_received"];
    (
        r["bytes"].as_u64().unwrap_or(0),
        r["bits_per_second"].as_f64().unwrap_or(0.0),
    )
}

/// A counter of `/proc/net/snmp` in `ns`: `field` of the `proto` lines
/// (e.g. "Tcp", "InCsumErrors").
pub fn snmp(ns: &str, proto: &str, field: &str) -> u64 {
    proc_net_counter(ns, "snmp", proto, field)
}

/// A counter of `/proc/net/netstat` in `ns` (`TcpExt`, `IpExt`).
pub fn netstat(ns: &str, proto: &str, field: &str) -> u64 {
    proc_net_counter(ns, "netstat", proto, field)
}

/// `/proc/net/snmp` and `/proc/net/netstat` share a layout: a header line
/// and a value line per protocol.
fn proc_net_counter(ns: &str, file: &str, proto: &str, field: &str) -> u64 {
    let s = lab::sh(ns, &format!("cat /proc/net/{file}")).unwrap();
    let mut lines = s.lines().filter(|l| l.starts_with(&format!("{proto}:")));
    let (h, v) = (lines.next().unwrap(), lines.next().unwrap());
    let i = h.split_whitespace().position(|x| x == field).unwrap();
    v.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// A 2 s iperf3 TCP run (see [`iperf3`]) that must move real data and
/// leave the receiver's TCP without a new bad-checksum drop: checksums are
/// what a datapath that rewrites or offloads packets gets wrong first.
/// Returns the received rate in bit/s.
pub fn iperf3_tcp_intact(lab: &Lab, server_ns: &str, server_ip: &str, client_ns: &str) -> f64 {
    let before = snmp(server_ns, "Tcp", "InCsumErrors");
    let v = iperf3(lab, server_ns, server_ip, client_ns, &["-t", "2"]).unwrap();
    let received = &v["end"]["sum_received"];
    assert!(
        received["bytes"].as_u64().unwrap() > 10_000_000,
        "iperf3 moved too little: {received}"
    );
    assert_eq!(
        snmp(server_ns, "Tcp", "InCsumErrors"),
        before,
        "TCP checksum errors at the receiver"
    );
    received["bits_per_second"].as_f64().unwrap()
}

/// `python3 -c CODE` in `ns`: its stdout and stderr together.
pub fn py(ns: &str, code: &str) -> String {
    match lab::exec_output(ns, &["python3", "-c", code]) {
        Ok(o) => format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => format!("python3 did not run: {e:#}"),
    }
}

/// A TCP and UDP echo server on `port` in `ns`, in the background; returns
/// once it listens.
pub fn echo_server(lab: &Lab, ns: &str, port: u16) -> Result<()> {
    let code = format!(
        r#"
import socket, threading
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", {port})); t.listen(4096)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", {port}))
def udp():
    while True:
        d, a = u.recvfrom(2048); u.sendto(d, a)
def serve(c):
    try:
        while True:
            d = c.recv(65536)
            if not d: break
            c.sendall(d)
    finally:
        c.close()
threading.Thread(target=udp, daemon=True).start()
while True:
    c, _ = t.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &code])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(ns, cmd)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let listening =
            lab::sh(ns, &format!("ss -Hltn 'sport = :{port}'")).is_ok_and(|s| !s.trim().is_empty());
        if listening {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20));
    }
    bail!("echo server on port {port} in {ns} did not start")
}
