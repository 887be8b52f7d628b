//! The ports-per-network scale table (issue 21): one network grown to 64,
//! 1024 and 4096 veth ports (the flood set's maximum), then 10,000 ports
//! across networks. At each size: the time the daemon takes per port in a
//! bulk apply (a rule attaching the new links), a single `kvnet port add`
//! (the CLI round trip included), and the daemon's resident memory. The
//! per-member cost of a flood and ARP answered vs flooded come from the
//! BPF_PROG_RUN cost table.
use std::time::{Duration, Instant};

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

/// Waits until the daemon has `n` ports; the seconds it took from `t0`.
fn wait_ports(k: &Kvnet, n: usize, t0: Instant) -> Result<f64> {
    while port_count(k) < n {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("{} of {n} ports attached after 10 minutes", port_count(k));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(t0.elapsed().as_secs_f64())
}

/// Milliseconds of `kvnet port add` for `count` new links `x{n}` of
/// network `net` (CLI process, socket round trip, attach), the median.
fn single_adds(lab: &Lab, k: &Kvnet, crowd: &str, net: &str, tag: &str, count: usize) -> Result<f64> {
    add_links(lab, crowd, tag, 1, count)?;
    let mut ms = Vec::new();
    for n in 1..=count {
        let t = Instant::now();
        k.cli(&["port", "add", net, &format!("{tag}{n}")])?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(crate::bench::median(&ms).unwrap_or(f64::NAN))
}

pub fn ports_scale(quick: bool) -> Result<Value> {
    let sizes: &[usize] = if quick { &[64, 1024] } else { &[64, 1024, 4096] };
    let lab = Lab::new()?;
    let crowd = lab.add_netns("crowd")?;
    for ns in [lab.hv(), crowd.as_str()] {
        sh(ns, "sysctl -qw net.ipv6.conf.default.disable_ipv6=1")?;
    }
    let k = Kvnet::start(&lab)?;
    let cfg = lab.work_dir().join("ports.toml");
    std::fs::write(
        &cfg,
        "[networks.big]\nmode = \"isolated\"\n\n[[rules]]\nmatch = \"s*\"\nnet = \"big\"\n",
    )?;
    k.cli(&["apply", &cfg.to_string_lossy()])?;
    let mut rows = Vec::new();
    let mut have = 0;
    for (i, &n) in sizes.iter().enumerate() {
        // Grow by rule to n - 10, then 10 by hand (the single-add figure).
        let bulk = n - 10;
        println!("bench: [ports] growing network 'big' to {n} ports");
        let t0 = Instant::now();
        add_links(&lab, &crowd, "s", have + 1, bulk)?;
        let secs = wait_ports(&k, bulk, t0)?;
        let per_port_ms = secs * 1e3 / (bulk - have) as f64;
        let single_ms = single_adds(&lab, &k, &crowd, "big", &format!("x{i}n"), 10)?;
        have = bulk;
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
        let have_ports = port_count(&k);
        let nets = (total - have_ports).div_ceil(1000);
        let mut toml = String::new();
        for j in 0..nets {
            toml += &format!("[networks.n{j}]\nmode = \"isolated\"\n\n[[rules]]\nmatch = \"m{j}x*\"\nnet = \"n{j}\"\n\n");
        }
        std::fs::write(&cfg, format!(
            "[networks.big]\nmode = \"isolated\"\n\n[[rules]]\nmatch = \"s*\"\nnet = \"big\"\n\n[[rules]]\nmatch = \"x*\"\nnet = \"big\"\n\n{toml}"
        ))?;
        k.cli(&["apply", &cfg.to_string_lossy()])?;
        println!("bench: [ports] {total} ports across {} networks", nets + 1);
        let t0 = Instant::now();
        let mut left = total - have_ports;
        for j in 0..nets {
            let c = left.min(1000);
            add_links(&lab, &crowd, &format!("m{j}x"), 1, c)?;
            left -= c;
        }
        let secs = wait_ports(&k, total, t0)?;
        let single_ms = single_adds(&lab, &k, &crowd, "n0", "y", 10)?;
        across = json!({
            "ports": total,
            "networks": nets + 1,
            "bulk_ms_per_port": secs * 1e3 / (total - have_ports) as f64,
            "port_add_ms": single_ms,
            "daemon_rss_kib": rss_kib(&k),
        });
    }
    Ok(json!({"per_network": rows, "across_networks": across}))
}
