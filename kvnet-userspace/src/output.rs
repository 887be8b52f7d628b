//! Human-readable tables for the CLI; `--json` prints the same structs.
use anyhow::{Context, Result};
use serde::{de::DeserializeOwned, Serialize};

use crate::control::{
    ConntrackRow, FdbRow, ForwardRow, NetDetail, NetInfo, PortInfo, PortStatsRow, StatsReport,
    VlanInfo,
};

/// Prints the daemon's answer as a table, or with `json` as JSON: both
/// from the same struct, so they show the same fields.
pub fn show<T: DeserializeOwned + Serialize>(
    data: serde_json::Value,
    json: bool,
    table: fn(&T) -> Vec<Vec<String>>,
) -> Result<()> {
    let rows: T = serde_json::from_value(data).context("unexpected answer from the daemon")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", render(&table(&rows)));
    }
    Ok(())
}

/// Left-aligned columns, two spaces apart; the first row is the header.
pub fn render(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(|r| r.len()).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.len())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .enumerate()
            .map(|(i, s)| format!("{:w$}", s, w = widths[i]))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out
}

fn header(cols: &[&str]) -> Vec<String> {
    cols.iter().map(|s| s.to_uppercase()).collect()
}

pub fn nets(nets: &Vec<NetInfo>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "name", "id", "mode", "gateway", "uplink", "ageing", "ports",
    ])];
    for n in nets {
        rows.push(vec![
            n.name.clone(),
            n.id.to_string(),
            n.mode.to_string(),
            n.gateway
                .as_ref()
                .map_or_else(|| "-".into(), |g| format!("{} ({})", g.cidr(), g.iface)),
            n.uplink.clone().unwrap_or_else(|| "-".into()),
            format!("{}s", n.ageing_secs),
            n.ports.join(","),
        ]);
    }
    rows
}

/// `kvnet net show`: the network's settings, one per line, then its ports.
pub fn net_detail(d: &NetDetail) -> Vec<Vec<String>> {
    let n = &d.net;
    let line = |k: &str, v: String| vec![k.to_string(), v];
    let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    let mut rows = vec![
        line("network", format!("{} (id {})", n.name, n.id)),
        line("mode", n.mode.to_string()),
    ];
    match &n.gateway {
        Some(g) => {
            rows.push(line(
                "gateway",
                format!(
                    "{} on {} (mac {})",
                    g.cidr(),
                    g.iface,
                    or_dash(g.mac.clone())
                ),
            ));
            rows.push(line(
                "gateway port",
                format!("{} (vlan {})", g.port, g.vlan),
            ));
        }
        None => rows.push(line("gateway", "-".into())),
    }
    rows.push(line("uplink", or_dash(n.uplink.clone())));
    if let Some(v) = &d.vxlan {
        rows.push(line(
            "vxlan",
            format!(
                "vni {}, vtep {} on {} (dev {}), mtu {}",
                v.vni,
                v.vtep_local,
                v.vtep_iface,
                or_dash(v.vtep_dev.clone()),
                v.mtu.map_or("-".into(), |m| m.to_string())
            ),
        ));
        let remotes: Vec<String> = v.remotes.iter().map(|r| r.to_string()).collect();
        rows.push(line(
            "vxlan remotes",
            or_dash(Some(remotes.join(",")).filter(|s| !s.is_empty())),
        ));
    }
    rows.push(line("ageing", format!("{}s", n.ageing_secs)));
    match &d.dhcp {
        Some(h) => {
            rows.push(line(
                "dhcp",
                format!(
                    "{}-{}, lease {}s, domain {}, {} static hosts, {} leases",
                    h.range.first,
                    h.range.last,
                    h.lease_secs,
                    or_dash(h.domain.clone()),
                    h.hosts.len(),
                    h.leases
                ),
            ));
            for x in &h.hosts {
                let name = x
                    .name
                    .as_deref()
                    .map(|s| format!(" {s}"))
                    .unwrap_or_default();
                rows.push(line("dhcp host", format!("{} {}{name}", x.mac, x.ip)));
            }
        }
        None => rows.push(line("dhcp", "off".into())),
    }
    rows.push(line("dns", if d.dns { "on" } else { "off" }.into()));
    if let Some(v6) = &d.ipv6 {
        for g in &v6.gateways {
            rows.push(line("gateway6", g.clone()));
        }
        rows.push(line(
            "dhcp6",
            format!(
                "{}, {} static hosts, {} leases",
                v6.dhcp6_range.as_deref().unwrap_or("stateless"),
                v6.dhcp6_hosts.len(),
                v6.leases.len()
            ),
        ));
        for l in &v6.leases {
            let name = l.hostname.as_deref().unwrap_or("-");
            rows.push(line("dhcp6 lease", format!("{} {name}", l.ip)));
        }
    }
    if let Some(t) = &n.nat {
        rows.push(line(
            "nat",
            format!(
                "ports {}-{}, udp {}, masquerade {}",
                t.ports.first, t.ports.last, t.udp, t.address
            ),
        ));
    }
    for f in &d.forwards {
        rows.push(line(
            "forward",
            format!("{} {} -> {}", f.proto, f.port, f.to),
        ));
    }
    let p = &d.policy;
    if p.isolated_ports {
        rows.push(line("isolated ports", "yes".into()));
    }
    let rate = |r: Option<u64>| r.map(|b| crate::rate::Rate(b).to_string());
    if let Some(r) = rate(p.port_rate_in_bps) {
        rows.push(line("port rate in", r));
    }
    if let Some(r) = rate(p.port_rate_out_bps) {
        rows.push(line("port rate out", r));
    }
    if let Some(s) = p.storm_pps {
        rows.push(line("storm pps", s.to_string()));
    }
    rows.push(line("ports", d.port_details.len().to_string()));
    rows.push(vec![]);
    rows.extend(ports(&d.port_details));
    rows
}

pub fn port_security(p: &crate::security::PortSecurityInfo) -> Vec<Vec<String>> {
    let list = |v: &Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    vec![
        vec!["port".into(), p.iface.clone()],
        vec!["network".into(), p.net.clone()],
        vec!["security".into(), p.security.clone()],
        vec!["max macs".into(), p.max_macs.to_string()],
        vec!["macs".into(), list(&p.macs)],
        vec!["ipv4".into(), list(&p.ips)],
        vec!["owned macs".into(), list(&p.owned)],
        vec!["note".into(), p.note.clone()],
    ]
}

pub fn ports(ports: &Vec<PortInfo>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "port", "ifindex", "network", "role", "driver", "hook", "attached", "hairpin", "vlan",
    ])];
    for p in ports {
        rows.push(vec![
            p.iface.clone(),
            p.ifindex.to_string(),
            p.net.clone(),
            p.role.clone(),
            p.driver.clone(),
            format!("{:?}", p.hook).to_lowercase(),
            p.attached.clone(),
            if p.hairpin { "on" } else { "off" }.into(),
            p.vlan.to_string(),
        ]);
    }
    rows
}

pub fn vlans(vlans: &Vec<VlanInfo>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["vlan", "port", "mode", "tagging"])];
    for v in vlans {
        for p in &v.ports {
            rows.push(vec![
                if v.vid == 0 {
                    "-".into()
                } else {
                    v.vid.to_string()
                },
                p.port.clone(),
                p.mode.clone(),
                p.tagging.clone(),
            ]);
        }
    }
    rows
}

pub fn fdb(fdb: &Vec<FdbRow>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["mac", "vlan", "port", "vtep", "kind", "age"])];
    for e in fdb {
        rows.push(vec![
            e.mac.clone(),
            e.vlan.to_string(),
            e.port.clone(),
            e.vtep.map_or("-".into(), |v| v.to_string()),
            e.kind.clone(),
            e.age_secs
                .map(|a| format!("{a:.1}s"))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    rows
}

pub fn port_stats(stats: &Vec<PortStatsRow>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "port", "network", "rx_pkts", "rx_bytes", "tx_pkts", "tx_bytes", "xdp_seen", "tc_seen",
        "flooded", "drops",
    ])];
    for s in stats {
        let drops: Vec<String> = s
            .drops
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k}={n}"))
            .collect();
        rows.push(vec![
            s.port.clone(),
            s.net.clone(),
            s.rx_packets.to_string(),
            s.rx_bytes.to_string(),
            s.tx_packets.to_string(),
            s.tx_bytes.to_string(),
            s.xdp_seen.to_string(),
            s.tc_seen.to_string(),
            s.flooded.to_string(),
            if drops.is_empty() {
                "0".into()
            } else {
                drops.join(",")
            },
        ]);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_align() {
        let t = render(&[
            vec!["A".into(), "BB".into()],
            vec!["ccc".into(), "d".into()],
        ]);
        assert_eq!(t, "A    BB\nccc  d\n");
    }
}

pub fn stats(r: &StatsReport) -> Vec<Vec<String>> {
    let mut rows = port_stats(&r.ports);
    if !r.nat.is_empty() {
        rows.push(vec![]);
        rows.push(header(&[
            "nat network",
            "translated",
            "new_flows",
            "icmp_errors",
            "fragments",
            "udp_mappings",
            "table",
            "ports_in_use",
            "drops",
        ]));
        for n in &r.nat {
            let drops: Vec<String> = n
                .drops
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            rows.push(vec![
                n.net.clone(),
                n.translated.to_string(),
                n.new_flows.to_string(),
                n.icmp_errors.to_string(),
                n.fragments.to_string(),
                n.udp_mappings.to_string(),
                format!("{}/{}", n.table_entries, n.table_capacity),
                n.ports_in_use.to_string(),
                if drops.is_empty() {
                    "0".into()
                } else {
                    drops.join(",")
                },
            ]);
        }
    }
    if !r.services.is_empty() {
        rows.push(vec![]);
        rows.push(header(&[
            "dhcp network",
            "acks",
            "naks",
            "rate_limited",
            "lease_writes",
            "restarts",
            "dns queries",
            "forwarded",
            "cache_hits",
            "cache_bytes",
            "evictions",
            "restarts",
        ]));
        // Counters the daemon did not send show as "-".
        let n = |v: &serde_json::Value, k: &str| {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map_or_else(|| "-".to_string(), |x| x.to_string())
        };
        for x in &r.services {
            let (h, d) = (&x.dhcp, &x.dns);
            let queries = ["udp_queries", "tcp_queries"]
                .iter()
                .filter_map(|k| d.get(*k).and_then(serde_json::Value::as_u64))
                .sum::<u64>();
            rows.push(vec![
                x.net.clone(),
                n(h, "acks"),
                n(h, "naks"),
                n(h, "rate_limited"),
                n(h, "lease_writes"),
                n(h, "restarts"),
                queries.to_string(),
                n(d, "forwarded"),
                n(d, "cache_hits"),
                n(d, "cache_bytes"),
                n(d, "cache_evictions"),
                n(d, "restarts"),
            ]);
        }
    }
    rows
}

pub fn forwards(f: &Vec<ForwardRow>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&["network", "proto", "port", "to"])];
    for x in f {
        rows.push(vec![
            x.net.clone(),
            x.proto.clone(),
            x.port.to_string(),
            x.to.to_string(),
        ]);
    }
    rows
}

pub fn conntrack(c: &Vec<ConntrackRow>) -> Vec<Vec<String>> {
    let mut rows = vec![header(&[
        "proto",
        "original",
        "translated",
        "state",
        "age",
        "idle",
        "pkts",
        "bytes",
        "reply_pkts",
        "reply_bytes",
    ])];
    for x in c {
        rows.push(vec![
            x.proto.clone(),
            x.orig.display(&x.proto),
            x.translated.display(&x.proto),
            if x.dnat {
                format!("{} (forward)", x.state)
            } else {
                x.state.clone()
            },
            format!("{:.0}s", x.age_secs),
            format!("{:.0}s", x.idle_secs),
            x.packets.to_string(),
            x.bytes.to_string(),
            x.reply_packets.to_string(),
            x.reply_bytes.to_string(),
        ]);
    }
    rows
}
