//! `kvnet daemon --metrics ADDR:PORT`: the switch's counters for
//! Prometheus, read from the datapath's maps at each scrape and encoded by
//! the `prometheus` crate in the text exposition format (what Prometheus
//! scrapes and `promtool check metrics` checks).
use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};
use prometheus::{IntCounterVec, IntGaugeVec, Opts, Registry};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

use crate::{
    control::{NatStatsRow, PortStatsRow},
    dhcp::service::NetServiceStats,
    switch::Switch,
};

/// A scrape's request head may not be longer, nor take longer.
const MAX_HEAD: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The text exposition format's media type.
const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Listens on `addr` and answers `GET /metrics`.
pub async fn serve(addr: SocketAddr, switch: Arc<Mutex<Switch>>) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("metrics: listening on {addr}"))?;
    eprintln!("kvnet: metrics on http://{addr}/metrics");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, switch.clone()));
                }
                Err(e) => {
                    log::warn!("metrics: accepting: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(())
}

async fn answer(mut stream: TcpStream, switch: Arc<Mutex<Switch>>) {
    let Ok(Ok(head)) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream)).await else {
        return;
    };
    let (status, body) = match request_target(&head) {
        Some(("GET", "/metrics")) => {
            let scraped = tokio::task::spawn_blocking(move || {
                let mut sw = switch
                    .lock()
                    .map_err(|_| anyhow::anyhow!("daemon state is poisoned"))?;
                Scrape::of(&mut sw)
            })
            .await
            .map_err(anyhow::Error::from)
            .and_then(|r| r)
            .and_then(|s| s.render());
            match scraped {
                Ok(text) => ("200 OK", text),
                Err(e) => ("500 Internal Server Error", format!("{e:#}\n")),
            }
        }
        Some(("GET", _)) => ("404 Not Found", "only /metrics is served\n".into()),
        _ => ("400 Bad Request", "GET /metrics\n".into()),
    };
    let kind = if status.starts_with("200") {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(reply.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The request head, up to the blank line.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<String> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_HEAD {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Method and path of an HTTP request line (the query left out).
fn request_target(head: &str) -> Option<(&str, &str)> {
    let mut words = head.lines().next()?.split_whitespace();
    let (method, target) = (words.next()?, words.next()?);
    words.next()?.strip_prefix("HTTP/")?;
    Some((method, target.split('?').next().unwrap_or(target)))
}

/// What one scrape reads, taken under the lock and encoded after it.
#[derive(Debug, Default)]
struct Scrape {
    ports: Vec<PortStatsRow>,
    nat: Vec<NatStatsRow>,
    networks: Vec<(String, String)>,
    fdb_entries: u64,
    fdb_capacity: u64,
    services: Vec<NetServiceStats>,
    /// Leases bound, by network.
    leases: Vec<(String, u64)>,
    conntrack_gc: crate::daemon::ct_gc::GcReport,
}

impl Scrape {
    fn of(sw: &mut Switch) -> Result<Scrape> {
        let status = crate::daemon::status::status(sw)?;
        Ok(Scrape {
            ports: sw.stats()?,
            nat: sw.nat_stats()?,
            networks: sw
                .nets
                .iter()
                .map(|(n, net)| (n.clone(), net.mode.to_string()))
                .collect(),
            fdb_entries: status.fdb_entries as u64,
            fdb_capacity: status.fdb_capacity as u64,
            leases: sw
                .nets
                .keys()
                .filter_map(|n| Some((n.clone(), sw.services.leases(n)?.len() as u64)))
                .collect(),
            services: sw.services.stats(),
            conntrack_gc: status.conntrack_gc,
        })
    }

    fn render(self) -> Result<String> {
        let registry = Registry::new();
        self.families(&registry).context("building the metrics")?;
        let mut text = String::new();
        prometheus::TextEncoder::new()
            .encode_utf8(&registry.gather(), &mut text)
            .context("encoding the metrics")?;
        Ok(text)
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum MetricType {
    Counter,
    Gauge,
}

type Labels = Vec<(&'static str, String)>;

fn label_values(l: &Labels) -> Vec<&str> {
    l.iter().map(|(_, v)| v.as_str()).collect()
}

/// One metric family: its series, each a label set and a value; counters
/// get their `_total` suffix here. A family without series is left out.
fn family(
    reg: &Registry,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl IntoIterator<Item = (Labels, u64)>,
) -> Result<()> {
    let series: Vec<(Labels, u64)> = series.into_iter().collect();
    let Some((first, _)) = series.first() else {
        return Ok(());
    };
    let names: Vec<&str> = first.iter().map(|(k, _)| *k).collect();
    match kind {
        MetricType::Counter => {
            let v = IntCounterVec::new(Opts::new(format!("{name}_total"), help), &names)?;
            for (l, n) in &series {
                v.get_metric_with_label_values(&label_values(l))?.inc_by(*n);
            }
            reg.register(Box::new(v))?;
        }
        MetricType::Gauge => {
            let v = IntGaugeVec::new(Opts::new(name, help), &names)?;
            for (l, n) in &series {
                v.get_metric_with_label_values(&label_values(l))?
                    .set(i64::try_from(*n).unwrap_or(i64::MAX));
            }
            reg.register(Box::new(v))?;
        }
    }
    Ok(())
}

impl Scrape {
    fn families(&self, e: &Registry) -> Result<()> {
        use MetricType::{Counter, Gauge};
        family(
            e,
            "kvnet_build_info",
            "The running kvnet's version",
            Gauge,
            [(vec![("version", env!("CARGO_PKG_VERSION").to_string())], 1)],
        )?;
        family(
            e,
            "kvnet_network_info",
            "The networks and their modes",
            Gauge,
            self.networks
                .iter()
                .map(|(n, mode)| (vec![("net", n.clone()), ("mode", mode.clone())], 1)),
        )?;
        let port = |p: &PortStatsRow| vec![("port", p.port.clone()), ("net", p.net.clone())];
        let per_port: [(&str, &str, fn(&PortStatsRow) -> u64); 10] = [
            (
                "kvnet_port_rx_packets",
                "Frames received on the port",
                |p| p.rx_packets,
            ),
            ("kvnet_port_rx_bytes", "Bytes received on the port", |p| {
                p.rx_bytes
            }),
            (
                "kvnet_port_tx_packets",
                "Frames kvnet sent out of the port",
                |p| p.tx_packets,
            ),
            (
                "kvnet_port_tx_bytes",
                "Bytes kvnet sent out of the port",
                |p| p.tx_bytes,
            ),
            (
                "kvnet_port_flooded",
                "Frames from the port flooded to its VLAN",
                |p| p.flooded,
            ),
            (
                "kvnet_port_learned",
                "Source MACs learned on the port",
                |p| p.learned,
            ),
            (
                "kvnet_port_learn_refused",
                "Source MACs not learned: the network's bound was reached",
                |p| p.learn_refused,
            ),
            (
                "kvnet_port_arp_answered",
                "ARP requests answered by the datapath instead of flooded",
                |p| p.arp_answered,
            ),
            (
                "kvnet_port_routed",
                "Frames from the port routed by the fast path",
                |p| p.routed,
            ),
            (
                "kvnet_port_to_host",
                "Frames from the port handed to the host stack",
                |p| p.to_host,
            ),
        ];
        for (name, help, value) in per_port {
            family(
                e,
                name,
                help,
                Counter,
                self.ports.iter().map(|p| (port(p), value(p))),
            )?;
        }
        family(
            e,
            "kvnet_port_drops",
            "Frames dropped on the port, by reason",
            Counter,
            self.ports.iter().flat_map(|p| {
                p.drops.iter().map(move |(reason, n)| {
                    let mut l = port(p);
                    l.push(("reason", reason.clone()));
                    (l, *n)
                })
            }),
        )?;
        family(
            e,
            "kvnet_fdb_entries",
            "MAC table entries in use",
            Gauge,
            [(vec![], self.fdb_entries)],
        )?;
        family(
            e,
            "kvnet_fdb_capacity",
            "MAC table capacity",
            Gauge,
            [(vec![], self.fdb_capacity)],
        )?;
        family(
            e,
            "kvnet_conntrack_gc_walks",
            "Conntrack GC walks finished",
            Counter,
            [(vec![], self.conntrack_gc.walks)],
        )?;
        family(
            e,
            "kvnet_conntrack_gc_walking",
            "Whether a conntrack GC walk is under way (it paces itself)",
            Gauge,
            [(vec![], self.conntrack_gc.walking as u64)],
        )?;
        // One conntrack table serves every NAT network.
        if let Some(n) = self.nat.first() {
            family(
                e,
                "kvnet_conntrack_entries",
                "Conntrack entries in use (two per flow)",
                Gauge,
                [(vec![], n.table_entries)],
            )?;
            family(
                e,
                "kvnet_conntrack_capacity",
                "Conntrack capacity",
                Gauge,
                [(vec![], n.table_capacity)],
            )?;
        }
        let net = |n: &NatStatsRow| vec![("net", n.net.clone())];
        let per_nat: [(&str, &str, MetricType, fn(&NatStatsRow) -> u64); 7] = [
            (
                "kvnet_nat_ports_in_use",
                "Uplink ports the network's flows hold",
                Gauge,
                |n| n.ports_in_use,
            ),
            (
                "kvnet_nat_udp_mappings",
                "Endpoint-independent UDP mappings in use",
                Gauge,
                |n| n.udp_mappings,
            ),
            ("kvnet_nat_translated", "Packets translated", Counter, |n| {
                n.translated
            }),
            ("kvnet_nat_new_flows", "Flows opened", Counter, |n| {
                n.new_flows
            }),
            (
                "kvnet_nat_icmp_errors",
                "ICMP errors translated",
                Counter,
                |n| n.icmp_errors,
            ),
            (
                "kvnet_nat_fragments",
                "Later fragments translated by their first's flow",
                Counter,
                |n| n.fragments,
            ),
            (
                "kvnet_nat_out_of_window",
                "TCP segments out of their flow's window",
                Counter,
                |n| n.out_of_window,
            ),
        ];
        for (name, help, kind, value) in per_nat {
            family(
                e,
                name,
                help,
                kind,
                self.nat.iter().map(|n| (net(n), value(n))),
            )?;
        }
        family(
            e,
            "kvnet_nat_drops",
            "Packets the NAT dropped, by reason",
            Counter,
            self.nat.iter().flat_map(|n| {
                n.drops.iter().map(move |(reason, v)| {
                    let mut l = net(n);
                    l.push(("reason", reason.clone()));
                    (l, *v)
                })
            }),
        )?;
        family(
            e,
            "kvnet_dhcp_leases",
            "DHCP leases bound",
            Gauge,
            self.leases
                .iter()
                .map(|(n, c)| (vec![("net", n.clone())], *c)),
        )?;
        // The servers' own counters, each a series by its name: what the
        // DHCP server did (received, acks, rate_limited, restarts...) and
        // what DNS did (queries, answers, cache use...).
        let dhcp = |g| service_series(&self.services, |s| &s.dhcp, &[], g);
        family(
            e,
            "kvnet_dhcp_events",
            "DHCP server events, by kind",
            Counter,
            dhcp(false)
                .into_iter()
                .map(|(n, k, v)| (vec![("net", n), ("event", k)], v)),
        )?;
        const DNS_GAUGES: &[&str] = &["cache_entries", "cache_bytes"];
        let dns = |g| service_series(&self.services, |s| &s.dns, DNS_GAUGES, g);
        family(
            e,
            "kvnet_dns_events",
            "DNS server events, by kind (queries, answers, cache hits...)",
            Counter,
            dns(false)
                .into_iter()
                .map(|(n, k, v)| (vec![("net", n), ("event", k)], v)),
        )?;
        family(
            e,
            "kvnet_dns_cache",
            "The DNS cache's fill: answers (entries) and bytes",
            Gauge,
            dns(true).into_iter().map(|(n, k, v)| {
                let what = k.trim_start_matches("cache_").to_string();
                (vec![("net", n), ("what", what)], v)
            }),
        )?;
        Ok(())
    }
}

/// (network, counter name, value) of the servers' counters: the gauges
/// among them, or the rest.
fn service_series(
    services: &[NetServiceStats],
    pick: fn(&NetServiceStats) -> &serde_json::Value,
    gauges: &[&str],
    want_gauges: bool,
) -> Vec<(String, String, u64)> {
    let mut out = Vec::new();
    for s in services {
        let Some(fields) = pick(s).as_object() else {
            continue;
        };
        for (k, v) in fields {
            if let Some(v) = v.as_u64() {
                if gauges.contains(&k.as_str()) == want_gauges {
                    out.push((s.net.clone(), k.clone(), v));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_lines_are_read_strictly() {
        assert_eq!(
            request_target("GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(
            request_target("GET /metrics?x=1 HTTP/1.0\n\n"),
            Some(("GET", "/metrics"))
        );
        assert_eq!(request_target("GET /metrics\r\n\r\n"), None);
        assert_eq!(request_target("garbage"), None);
        assert_eq!(request_target(""), None);
    }

    #[test]
    fn a_scrape_encodes_in_the_text_format() {
        let mut drops = std::collections::BTreeMap::new();
        drops.insert("spoofed_source".to_string(), 3);
        let s = Scrape {
            ports: vec![PortStatsRow {
                port: "vnet0".into(),
                net: "default".into(),
                rx_packets: 10,
                drops,
                ..Default::default()
            }],
            networks: vec![("default".into(), "nat".into())],
            fdb_entries: 2,
            fdb_capacity: 65536,
            ..Default::default()
        };
        let text = s.render().unwrap();
        assert!(
            text.contains("# TYPE kvnet_port_rx_packets_total counter"),
            "{text}"
        );
        assert!(
            text.contains(r#"kvnet_port_rx_packets_total{net="default",port="vnet0"} 10"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"kvnet_port_drops_total{net="default",port="vnet0",reason="spoofed_source"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains("kvnet_fdb_entries 2"), "{text}");
        assert!(!text.contains("{}"), "{text}");
    }
}
