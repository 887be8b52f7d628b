//! The ports-per-network scale table (issue 21): one network grown to 64,
//! 1024 and 4096 veth ports (the flood set's maximum), then 10,000 ports
//! across networks. At each size: the time the daemon takes per port in a
//! bulk apply (a rule attaching the new links), a single `kvnet port add`
//! (the CLI round trip included), and the daemon's resident memory. The
//! per-member cost of a flood and ARP answered vs flooded come from the
//! BPF_PROG_RUN cost table.
use std::time::Instant;

use anyhow::{bail, Context, Result};
use kvnet_tests::kvnet::Kvnet;
use kvnet_tests::lab::{exec, sh, Lab};
use serde_json::{json, Value};

/// Veths `s{from}..=s{to}` in the hv namespace, peers `c{n}` in `crowd`.
fn add_links(lab: &Lab, crowd: &str, prefix: &str, from: usize, to: usize) -> Result<()> {
    let add: String = (from..=to)
        .map(|n| {
            format!("link add {prefix}{n} type veth peer name c{prefix}{n} netns {crowd}\nlink set {prefix}{n} up\n")
        })
        .collect();
    let f = lab.work_dir().join(format!("ports-{prefix}-{from}.batch"));
    std::fs::write(&f, add)?;
    exec(lab.hv(), &["ip", "-batch", &f.to_string_lossy()])
        .with_context(|| format!("creating veths {prefix}{from}..{prefix}{to}"))?;
    Ok(())
}

fn rss_kib(k: &Kvnet) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", k.daemon_pid()?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn port_count(k: &Kvnet) -> usize {
    k.json(&["port", "list"])
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap_or(0)
}

/// Milliseconds of `kvnet port add` for `count` new links `{tag}{n}` of
/// network `net` (CLI process, socket round trip, attach), the median.
fn single_adds(
    lab: &Lab,
    k: &Kvnet,
    crowd: &str,
    net: &str,
    tag: &str,
    count: usize,
) -> Result<f64> {
    add_links(lab, crowd, tag, 1, count)?;
    let mut ms = Vec::new();
    for n in 1..=count {
        let t = Instant::now();
        k.cli(&["port", "add", net, &format!("{tag}{n}")])?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::bench::median(&ms).unwrap_or(f64::NAN))
}

/// Applies `networks` plus a rule per (glob, network): the links exist
/// already, so one apply attaches them all. Seconds it took.
fn apply(k: &Kvnet, lab: &Lab, networks: &str, rules: &[(String, String)]) -> Result<f64> {
    let mut toml = networks.to_string();
    for (glob, net) in rules {
        toml += &format!("\n[[rules]]\nmatch = \"{glob}\"\nnet = \"{net}\"\n");
    }
    let cfg = lab.work_dir().join("ports.toml");
    std::fs::write(&cfg, toml)?;
    let t = Instant::now();
    k.cli(&["apply", &cfg.to_string_lossy()])?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn ports_scale(quick: bool) -> Result<Value> {
    let sizes: &[usize] = if quick {
        &[64, 1024]
    } else {
        &[64, 1024, 4096]
    };
    let lab = Lab::new()?;
    let crowd = lab.add_netns("crowd")?;
    for ns in [lab.hv(), crowd.as_str()] {
        sh(ns, "sysctl -qw net.ipv6.conf.default.disable_ipv6=1")?;
    }
    let k = Kvnet::start(&lab)?;
    let mut networks = "[networks.big]\nmode = \"isolated\"\n".to_string();
    let mut rules: Vec<(String, String)> = Vec::new();
    let mut rows = Vec::new();
    let mut have = 0;
    for (i, &n) in sizes.iter().enumerate() {
        println!("bench: [ports] growing network 'big' to {n} ports");
        // In bulk to n - 10, then the last 10 one by one.
        let (tag, single) = (format!("g{i}x"), format!("x{i}n"));
        let bulk = n - 10 - have;
        add_links(&lab, &crowd, &tag, 1, bulk)?;
        rules.push((format!("{tag}*"), "big".into()));
        let secs = apply(&k, &lab, &networks, &rules)?;
        if port_count(&k) != n - 10 {
            bail!("{} ports attached, {} expected", port_count(&k), n - 10);
        }
        let per_port_ms = secs * 1e3 / bulk as f64;
        let single_ms = single_adds(&lab, &k, &crowd, "big", &single, 10)?;
        // (Kept by the next applies.)
        rules.push((format!("{single}*"), "big".into()));
        have = n;
        rows.push(json!({
            "ports": n,
            "bulk_ms_per_port": per_port_ms,
            "port_add_ms": single_ms,
            "daemon_rss_kib": rss_kib(&k),
        }));
    }
    // 10,000 ports across networks: the rest in networks of 1000.
    let mut across = Value::Null;
    if !quick {
        let total = 10_000;
        let nets = (total - 10 - have).div_ceil(1000);
        println!("bench: [ports] {total} ports across {} networks", nets + 1);
        let mut left = total - 10 - have;
        for j in 0..nets {
            let c = left.min(1000);
            add_links(&lab, &crowd, &format!("m{j}x"), 1, c)?;
            networks += &format!("\n[networks.n{j}]\nmode = \"isolated\"\n");
            rules.push((format!("m{j}x*"), format!("n{j}")));
            left -= c;
        }
        let secs = apply(&k, &lab, &networks, &rules)?;
        if port_count(&k) != total - 10 {
            bail!("{} ports attached, {} expected", port_count(&k), total - 10);
        }
        let single_ms = single_adds(&lab, &k, &crowd, "n0", "y", 10)?;
        // (All ports: the last 10 by hand.)
        across = json!({
            "ports": total,
            "networks": nets + 1,
            "bulk_ms_per_port": secs * 1e3 / (total - 10 - have) as f64,
            "port_add_ms": single_ms,
            "daemon_rss_kib": rss_kib(&k),
        });
    }
    Ok(json!({"per_network": rows, "across_networks": across}))
}
