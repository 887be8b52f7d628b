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

/// One request on the control socket, as the CLI sends it; milliseconds
/// from connect to the answer.
fn request_ms(k: &Kvnet, request: &Value) -> Result<f64> {
    use std::io::{BufRead, Write};
    let t = Instant::now();
    let stream =
        std::os::unix::net::UnixStream::connect(k.socket()).context("connecting to the daemon")?;
    (&stream).write_all(format!("{request}\n").as_bytes())?;
    let mut answer = String::new();
    std::io::BufReader::new(&stream).read_line(&mut answer)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let v: Value = serde_json::from_str(&answer).context("the daemon's answer")?;
    if v["ok"] != json!(true) {
        bail!("{request}: {}", v["error"]);
    }
    Ok(ms)
}

/// Medians, in milliseconds, of adding `count` new links `{tag}{n}` to
/// network `net` one at a time: by `kvnet port add` (the CLI process
/// included), then as bare requests on the control socket (the daemon's
/// own time: attach, maps, state files).
fn single_adds(
    lab: &Lab,
    k: &Kvnet,
    crowd: &str,
    net: &str,
    tag: &str,
    count: usize,
) -> Result<(f64, f64)> {
    add_links(lab, crowd, tag, 1, 2 * count)?;
    let mut cli = Vec::new();
    for n in 1..=count {
        let t = Instant::now();
        k.cli(&["port", "add", net, &format!("{tag}{n}")])?;
        cli.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut bare = Vec::new();
    for n in count + 1..=2 * count {
        bare.push(request_ms(
            k,
            &json!({"op": "port_add", "net": net, "iface": format!("{tag}{n}"),
                    "hairpin": false, "hook": "auto"}),
        )?);
    }
    let median = |v: &[f64]| crate::bench::median(v).unwrap_or(f64::NAN);
    Ok((median(&cli), median(&bare)))
}

/// TCP between the two guests of the measured pair (2 s, one stream):
/// the rate must not depend on how many ports the network has.
fn unicast_gbps(lab: &Lab, server: &str, client: &str) -> Option<f64> {
    let v = kvnet_tests::tools::iperf3(lab, server, "10.77.0.1", client, &["-t", "2"]).ok()?;
    Some(kvnet_tests::tools::received(&v).1 / 1e9)
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
    // Two guests whose unicast rate is measured at each size.
    let pair = lab.add_ipv4_guests(&[("ua", "10.77.0.1/24"), ("ub", "10.77.0.2/24")])?;
    let mut rules: Vec<(String, String)> = vec![("u*".into(), "big".into())];
    let mut rows = Vec::new();
    // (The pair are ports too.)
    let mut have = 2;
    for (i, &n) in sizes.iter().enumerate() {
        println!("bench: [ports] growing network 'big' to {n} ports");
        // In bulk to n - 20, then the last 20 one by one.
        let (tag, single) = (format!("g{i}x"), format!("x{i}n"));
        let bulk = n - 20 - have;
        add_links(&lab, &crowd, &tag, 1, bulk)?;
        rules.push((format!("{tag}*"), "big".into()));
        let secs = apply(&k, &lab, &networks, &rules)?;
        if port_count(&k) != n - 20 {
            bail!("{} ports attached, {} expected", port_count(&k), n - 20);
        }
        let per_port_ms = secs * 1e3 / bulk as f64;
        let (single_ms, request_ms) = single_adds(&lab, &k, &crowd, "big", &single, 10)?;
        // (Kept by the next applies.)
        rules.push((format!("{single}*"), "big".into()));
        have = n;
        let unicast = unicast_gbps(&lab, &pair[0].ns, &pair[1].ns);
        rows.push(json!({
            "ports": n,
            "bulk_ms_per_port": per_port_ms,
            "port_add_ms": single_ms,
            "port_add_request_ms": request_ms,
            "unicast_gbps": unicast,
            "daemon_rss_kib": rss_kib(&k),
        }));
    }
    // 10,000 ports across networks: the rest in networks of 1000.
    let mut across = Value::Null;
    if !quick {
        let total = 10_000;
        let nets = (total - 20 - have).div_ceil(1000);
        println!("bench: [ports] {total} ports across {} networks", nets + 1);
        let mut left = total - 20 - have;
        for j in 0..nets {
            let c = left.min(1000);
            add_links(&lab, &crowd, &format!("m{j}x"), 1, c)?;
            networks += &format!("\n[networks.n{j}]\nmode = \"isolated\"\n");
            rules.push((format!("m{j}x*"), format!("n{j}")));
            left -= c;
        }
        let secs = apply(&k, &lab, &networks, &rules)?;
        if port_count(&k) != total - 20 {
            bail!("{} ports attached, {} expected", port_count(&k), total - 20);
        }
        let (single_ms, request_ms) = single_adds(&lab, &k, &crowd, "n0", "y", 10)?;
        // (All ports: the last 20 by hand.)
        across = json!({
            "ports": total,
            "networks": nets + 1,
            "bulk_ms_per_port": secs * 1e3 / (total - 20 - have) as f64,
            "port_add_ms": single_ms,
            "port_add_request_ms": request_ms,
            "daemon_rss_kib": rss_kib(&k),
        });
    }
    Ok(json!({"per_network": rows, "across_networks": across}))
}
