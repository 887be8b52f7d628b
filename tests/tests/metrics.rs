//! Issue 20, point 3: `kvnet daemon --metrics ADDR:PORT` serves the
//! switch's counters to Prometheus; `promtool check metrics` accepts what
//! the live endpoint serves, and the numbers are the datapath's.
use std::{io::Write, process::Stdio};

use kvnet_tests::lab::privileged;

#[path = "support/nat_lab.rs"]
mod nat_lab;
use nat_lab::nat_lab_with;

/// Where `cargo xtask setup` puts promtool.
const PROMTOOL: &str = "/usr/local/lib/kvnet/promtool";
const ADDR: &str = "127.0.0.1:9477";

/// An HTTP/1.1 request over bash's /dev/tcp in namespace `ns` (no client
/// program needed): the status line, the headers and the body.
fn http(lab: &kvnet_tests::Lab, ns: &str, request_line: &str) -> (String, String, String) {
    let (host, port) = ADDR.split_once(':').unwrap();
    let script = format!(
        "exec 3<>/dev/tcp/{host}/{port}; printf '{request_line}\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3"
    );
    let out = lab.exec_output(ns, &["bash", "-c", &script]).unwrap();
    assert!(out.status.success(), "{out:?}");
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

/// The value of the series `name{labels}` (labels as the text format
/// writes them, sorted), if served.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn the_metrics_endpoint_serves_the_datapaths_counters_and_promtool_accepts_them() {
    if !privileged() {
        return;
    }
    let n = nat_lab_with(1, &["--metrics", ADDR], &[], &[]);
    let (lab, k, g) = (&n.lab, &n.k, &n.guests[0]);
    // DHCP and DNS on, the guest's address its static host.
    let mac = g.mac.map(|b| format!("{b:02x}")).join(":");
    k.cli(&[
        "net",
        "set",
        "nat",
        "--dhcp-range",
        "10.50.0.100,10.50.0.150",
    ])
    .unwrap();
    k.cli(&[
        "dhcp",
        "host",
        "add",
        "nat",
        &format!("{mac},10.50.0.11,vm0"),
    ])
    .unwrap();
    lab.sh(lab.hv(), "ip link set lo up").unwrap();
    assert!(g.ping("198.51.100.2"), "positive control: through the NAT");

    let (status, headers, body) = http(lab, lab.hv(), "GET /metrics HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 200 OK", "{headers}\n{body}");
    assert!(headers.contains("text/plain; version=0.0.4"), "{headers}");
    // promtool reads the text format and lints it (names, help, types).
    let mut check = std::process::Command::new(PROMTOOL)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (run `cargo xtask setup`)");
    check
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{body}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The numbers are the datapath's: the guest port's frames, the NAT's
    // translations, as `kvnet stats` reads them (counters only grow).
    let port = format!(r#"{{net="nat",port="{}"}}"#, g.hv_if);
    let rx = sample(&body, &format!("kvnet_port_rx_packets_total{port}")).expect(&body);
    let stats = k.json(&["stats"]).unwrap();
    let row = stats["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["port"] == g.hv_if.as_str())
        .unwrap()
        .clone();
    let rx_now = row["rx_packets"].as_u64().unwrap();
    assert!(rx >= 2 && rx <= rx_now, "scraped {rx}, stats now {rx_now}");
    let translated = sample(&body, r#"kvnet_nat_translated_total{net="nat"}"#).expect(&body);
    assert!(translated >= 2, "{body}");
    assert_eq!(
        sample(&body, r#"kvnet_network_info{mode="nat",net="nat"}"#),
        Some(1)
    );
    assert!(sample(&body, "kvnet_conntrack_capacity").is_some_and(|c| c > 0));
    // The GC thread walks at once and then at least every few seconds.
    assert!(
        sample(&body, "kvnet_conntrack_gc_walks_total").is_some(),
        "{body}"
    );
    assert!(
        body.contains(r#"kvnet_dns_events_total{event="udp_queries",net="nat"}"#),
        "{body}"
    );
    // A second scrape sees the counters move with traffic.
    assert!(g.ping("198.51.100.2"));
    let (_, _, again) = http(lab, lab.hv(), "GET /metrics HTTP/1.1");
    let rx2 = sample(&again, &format!("kvnet_port_rx_packets_total{port}")).unwrap();
    assert!(rx2 > rx, "{rx} then {rx2}");

    // Anything else: a clear refusal, and the endpoint keeps serving.
    let (status, _, _) = http(lab, lab.hv(), "GET /other HTTP/1.1");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = http(lab, lab.hv(), "garbage");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let (status, _, _) = http(lab, lab.hv(), "GET /metrics HTTP/1.0");
    assert_eq!(status, "HTTP/1.1 200 OK");
}
