//! DHCP and DNS under faults (issue 15): a serving task that fails is
//! restarted, logged with its network and reason, and counted in `kvnet
//! stats`; guests still get leases and answers. The failures are forced
//! with the daemon's test hook `KVNET_FAIL_ON=<task>` (each named task
//! fails once, on its first message). Run as root.
use std::time::{Duration, Instant};

use kvnet_tests::clients::{field, udhcpc_once};
use kvnet_tests::kvnet::{kvnet_bin, Kvnet};
use kvnet_tests::lab::privileged;
use kvnet_tests::Lab;
use serde_json::Value;

const GW: &str = "10.78.0.1";
const DOMAIN: &str = "lab.test";

/// The `kvnet stats --json` DHCP/DNS row of `net`.
fn services(k: &Kvnet, net: &str) -> Value {
    let s = k.json(&["stats"]).unwrap();
    s["services"]
        .as_array()
        .and_then(|v| v.iter().find(|r| r["net"] == net).cloned())
        .unwrap_or_else(|| panic!("no services row for {net}: {s}"))
}

/// Waits until the daemon's log contains `what` (the restart is logged
/// by the supervisor just after the task ended).
fn wait_log(k: &Kvnet, what: &str) -> String {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let log = k.daemon_log();
        if log.contains(what) {
            return log;
        }
        assert!(Instant::now() < end, "no `{what}` in the log:\n{log}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn failed_dhcp_and_dns_tasks_are_restarted_logged_and_counted() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start_bin(
        &lab,
        &kvnet_bin().unwrap(),
        &[],
        &[("KVNET_FAIL_ON", "dhcp-serve,dns-udp,dns-tcp")],
    )
    .unwrap();
    k.cli(&[
        "net",
        "add",
        "ho",
        "--mode",
        "host-only",
        "--gateway",
        "10.78.0.1/24",
        "--dhcp-range",
        "10.78.0.10,10.78.0.50",
        "--domain",
        DOMAIN,
    ])
    .unwrap();
    let g = lab.add_guest_with("p1", None).unwrap();
    g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1").unwrap();
    k.cli(&["port", "add", "ho", "p1"]).unwrap();
    let before = services(&k, "ho");
    assert_eq!(before["dhcp"]["restarts"], 0, "{before}");
    assert_eq!(before["dns"]["restarts"], 0, "{before}");

    // The first DISCOVER makes the serving loop fail; udhcpc's next one
    // (a second later) is answered by the restarted loop.
    let b = udhcpc_once(&lab, &g, "c1", "c1", None).unwrap();
    let ip = field(&b, "ip").to_string();
    assert_eq!(field(&b, "serverid"), GW, "{b}");
    let log = wait_log(&k, "task dhcp-serve failed");
    let line = log
        .lines()
        .find(|l| l.contains("task dhcp-serve failed"))
        .unwrap();
    assert!(
        line.contains("network ho")
            && line.contains("KVNET_FAIL_ON=dhcp-serve")
            && line.contains("restart 1"),
        "{line}"
    );
    let s = services(&k, "ho");
    assert_eq!(s["dhcp"]["restarts"], 1, "{s}");
    assert!(s["dhcp"]["acks"].as_u64().unwrap() >= 1, "{s}");
    // The ACK left after its lease was written.
    assert!(s["dhcp"]["lease_writes"].as_u64().unwrap() >= 1, "{s}");
    let file = std::fs::read_to_string(lab.work_dir().join("state/dhcp/ho/leases.json")).unwrap();
    assert!(file.contains(&format!("\"{ip}\"")), "{file}");

    // DNS over UDP: the first query fails the loop; dig's retry is
    // answered (from the lease's hostname).
    let a = g
        .sh(&format!("dig @{GW} +time=2 +tries=3 +short c1.{DOMAIN}"))
        .unwrap();
    // (dig notes the lost first try on stdout too.)
    assert_eq!(a.trim().lines().last(), Some(ip.as_str()), "{a}");
    wait_log(&k, "task dns-udp failed");
    // And over TCP: the first connection fails the listener's loop; until
    // the new listener is up (the restart's pause) connections are
    // refused, then answered.
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let r = g.sh(&format!(
            "dig @{GW} +tcp +time=2 +tries=1 +short c1.{DOMAIN}"
        ));
        match r {
            Ok(a) if a.trim() == ip => break,
            r => assert!(Instant::now() < end, "no TCP answer: {r:?}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = wait_log(&k, "task dns-tcp failed");
    assert!(
        log.lines()
            .any(|l| l.contains("dns of network ho") && l.contains("task dns-udp failed")),
        "{log}"
    );
    let s = services(&k, "ho");
    assert_eq!(s["dns"]["restarts"], 2, "{s}");
    assert_eq!(s["dhcp"]["restarts"], 1, "{s}");
    // The table shows the same.
    let t = k.cli(&["stats"]).unwrap();
    assert!(
        t.contains("DHCP NETWORK") && t.contains("LEASE_WRITES"),
        "{t}"
    );

    // Each hook fires once: later requests are served without restarts.
    let b = udhcpc_once(&lab, &g, "c2", "c1", Some(&ip)).unwrap();
    assert_eq!(field(&b, "ip"), ip, "{b}");
    let s = services(&k, "ho");
    assert_eq!(
        (
            s["dhcp"]["restarts"].as_u64(),
            s["dns"]["restarts"].as_u64()
        ),
        (Some(1), Some(2)),
        "{s}"
    );
    // net del stops the supervised tasks (no restart of a stopped task).
    k.cli(&["net", "del", "ho"]).unwrap();
    let log = k.daemon_log();
    assert_eq!(log.matches("restarting it in").count(), 3, "{log}");
}
