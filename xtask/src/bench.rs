//! `cargo xtask bench [--quick]`: kvnet and the kernel's own paths, side by
//! side in one run on one lab topology (see docs/bench.md for a report).
//!
//! Scenarios and configurations (each measured in turn, round-robin over
//! the repeats so that machine noise spreads over all of them):
//! * L2 guest-to-guest (g1 -> g2 through the hv namespace's veths p1, p2):
//!   Linux bridge, kvnet `--hook tc`, kvnet `--hook xdp`, and the limit
//!   (`bench_redirect`: a tc program that only redirects p1 <-> p2).
//! * Access-to-trunk VLAN tagging (g1 untagged on an access port of VLAN
//!   10, a trunk to a second kvnet host that untags for its guest r1):
//!   kvnet `--hook tc|xdp`; the Linux VLAN-filtering bridge when the
//!   kernel has it.
//! * Guest-to-guest over taps (a writer process on one tap, a reader on
//!   the other, as qemu would be): Linux bridge, kvnet tc, kvnet XDP.
//! * Guest-to-outside (g1 -> `out` over the uplink up0): Linux routing,
//!   Linux bridge + iptables MASQUERADE (libvirt's shape), nftables
//!   masquerade with a flowtable, kvnet routed and kvnet NAT (also with
//!   1M synthetic conntrack entries in the daemon's table, and the
//!   daemon's CPU time meanwhile): TCP, 64-byte frames sent by trafgen as
//!   ordinary skbs, new TCP connections per second.
//! * Per-packet program cost through BPF_PROG_RUN, FDB and conntrack scale.
//!
//! Output: target/bench/{report.md, results.json, bench.png}.

mod chart;
mod connrate;
mod gcwalk;
mod ipv6;
mod ports;
mod report;
mod taps;
mod targets;
mod trafgen;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kvnet_tests::kvnet::Kvnet;
use kvnet_tests::lab::{GuestPort, Lab};
use serde::Serialize;
use serde_json::Value;

use crate::{build, cmd, run, setup, workspace_root};

/// Knobs that differ between `--quick` and the full run.
#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub quick: bool,
    pub repeats: usize,
    pub iperf_secs: u32,
    pub pings: u32,
    pub gen_frames: u32,
    pub cost_sizes: String,
    pub cost_repeat: u32,
    pub install_entries: u32,
    /// Conntrack sizes for the NAT path costs.
    pub ct_sizes: String,
    /// Packets per rewriting path (one BPF_PROG_RUN each).
    pub single_runs: u32,
}

impl Plan {
    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                repeats: 1,
                iperf_secs: 2,
                pings: 200,
                gen_frames: 1 << 18,
                cost_sizes: "10,10000,1000000".into(),
                cost_repeat: 200_000,
                install_entries: 10_000,
                ct_sizes: "10,100000,1000000".into(),
                single_runs: 5_000,
            }
        } else {
            Plan {
                quick,
                repeats: 3,
                iperf_secs: 5,
                pings: 500,
                gen_frames: 1 << 20,
                cost_sizes: "10,10000,1000000".into(),
                cost_repeat: 1_000_000,
                install_entries: 100_000,
                ct_sizes: "10,100000,1000000".into(),
                single_runs: 20_000,
            }
        }
    }
}

/// One measured quantity: every repeat's value kept.
#[derive(Clone, Debug, Serialize)]
pub struct Series {
    pub scenario: String,
    pub config: String,
    pub metric: String,
    pub unit: String,
    pub values: Vec<f64>,
    /// Why there is no value (failed or not applicable), if so.
    pub note: Option<String>,
}

impl Series {
    pub fn median(&self) -> Option<f64> {
        median(&self.values)
    }
}

pub fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

#[derive(Default, Serialize)]
pub struct Results {
    pub machine: BTreeMap<String, String>,
    pub plan: Option<Plan>,
    pub series: Vec<Series>,
    /// Raw output of the per-packet cost runs.
    pub cost: Value,
    pub scale: BTreeMap<String, Value>,
    pub notes: Vec<String>,
}

impl Results {
    fn add(&mut self, scenario: &str, config: &str, metric: &str, unit: &str, v: f64) {
        self.series_mut(scenario, config, metric, unit)
            .values
            .push(v);
    }
    fn fail(&mut self, scenario: &str, config: &str, metric: &str, unit: &str, why: String) {
        eprintln!("bench:   {scenario}/{config}/{metric}: {why}");
        let s = self.series_mut(scenario, config, metric, unit);
        if s.note.is_none() {
            s.note = Some(why);
        }
    }
    fn series_mut(
        &mut self,
        scenario: &str,
        config: &str,
        metric: &str,
        unit: &str,
    ) -> &mut Series {
        let pos = self
            .series
            .iter()
            .position(|s| s.scenario == scenario && s.config == config && s.metric == metric);
        let i = match pos {
            Some(i) => i,
            None => {
                self.series.push(Series {
                    scenario: scenario.into(),
                    config: config.into(),
                    metric: metric.into(),
                    unit: unit.into(),
                    values: Vec::new(),
                    note: None,
                });
                self.series.len() - 1
            }
        };
        &mut self.series[i]
    }
    pub fn get(&self, scenario: &str, config: &str, metric: &str) -> Option<&Series> {
        self.series
            .iter()
            .find(|s| s.scenario == scenario && s.config == config && s.metric == metric)
    }
}

pub fn bench(quick: bool, ports_only: bool) -> Result<()> {
    setup::ensure(setup::Mode::Quiet)?;
    let started = Instant::now();
    let kvnet = build::kvnet()?;
    let mut c = build::cargo();
    c.args([
        "build",
        build::PROFILE_FLAG,
        "-p",
        "kvnet-userspace",
        "--bin",
        "kvnet-bench",
    ]);
    println!("build: {}", cmd::display(&c));
    cmd::run(&mut c)?;
    let helper = kvnet.with_file_name("kvnet-bench");
    if !cmd::is_root() {
        // Namespaces and BPF need root: this same invocation again under sudo.
        let me = std::env::current_exe().context("locating the xtask executable")?;
        let args: Vec<_> = std::env::args_os().skip(1).collect();
        return cmd::run(&mut run::as_root(&me, &args)?);
    }
    run_as_root(quick, ports_only, &kvnet, &helper, started)
}

/// The measuring part, as root (re-executed under sudo by [`bench`]).
pub fn run_as_root(
    quick: bool,
    ports_only: bool,
    kvnet: &Path,
    helper: &Path,
    started: Instant,
) -> Result<()> {
    std::env::set_var("KVNET_BIN", kvnet);
    let plan = Plan::new(quick);
    // (A ports-only run keeps a full run's results.)
    let out_dir =
        workspace_root()
            .join("target")
            .join(if ports_only { "bench-ports" } else { "bench" });
    std::fs::create_dir_all(&out_dir)?;
    let mut res = Results {
        machine: machine_info(),
        plan: Some(plan.clone()),
        ..Default::default()
    };
    println!(
        "bench: {} run: {} repeat(s), iperf3 -t {}, {} pings, {} generated frames",
        if quick { "quick" } else { "full" },
        plan.repeats,
        plan.iperf_secs,
        plan.pings,
        plan.gen_frames
    );
    if ports_only {
        let v = ports::ports_scale(quick)?;
        res.scale.insert("ports per network".into(), v);
    } else {
        let mut b = Bench::new(&plan, helper)?;
        b.l2(&mut res)?;
        b.taps(&mut res)?;
        b.scale(&mut res)?;
        b.vlan(&mut res)?;
        b.routed(&mut res)?;
        b.cost(&mut res)?;
        match ports::ports_scale(plan.quick) {
            Ok(v) => {
                res.scale.insert("ports per network".into(), v);
            }
            Err(e) => res
                .notes
                .push(format!("ports-per-network scale failed: {e:#}")),
        }
        b.notes(&mut res);
        // The lab (namespaces, daemon, pins) goes away here.
    }
    res.machine.insert(
        "bench wall time".into(),
        format!("{:.0} s", started.elapsed().as_secs_f64()),
    );
    let json = serde_json::to_string_pretty(&res)?;
    std::fs::write(out_dir.join("results.json"), json)?;
    let md = report::markdown(&res);
    std::fs::write(out_dir.join("report.md"), &md)?;
    if let Err(e) = chart::draw(&res, &out_dir.join("bench.png")) {
        eprintln!("bench: chart not drawn: {e:#}");
    }
    println!("{md}");
    println!(
        "bench: wrote {}/{{report.md,results.json,bench.png}} in {:.0} s",
        out_dir.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Why nftables flowtables cannot work on this kernel, if the kernel says so.
fn kernel_lacks_flowtable() -> Option<String> {
    let out = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?CONFIG_NF_FLOW_TABLE[ =]'",
        ])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    line.contains("is not set")
        .then(|| format!("not available: the kernel is built without flowtables ({line})"))
}

/// Why a kernel feature cannot be used, if /proc/config.gz says it is off.
fn kernel_lacks(option: &str) -> Option<String> {
    let out = Command::new("sh")
        .args([
            "-c",
            &format!("zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?{option}[ =]'"),
        ])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if line.is_empty() {
        return Some(format!(
            "not available: the kernel is built without it ({option} absent from /proc/config.gz)"
        ));
    }
    line.contains("is not set")
        .then(|| format!("not available: the kernel is built without it ({line})"))
}

fn machine_info() -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    m.insert("kernel".into(), kernel.trim().to_string());
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    m.insert("cpu".into(), model);
    m.insert(
        "cores".into(),
        std::thread::available_parallelism()
            .map(|n| n.get().to_string())
            .unwrap_or_default(),
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    m.insert("loadavg at start".into(), load.trim().to_string());
    let mem = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    if let Some(l) = mem.lines().next() {
        m.insert(
            "memory".into(),
            l.trim_start_matches("MemTotal:").trim().into(),
        );
    }
    for (k, args) in [
        ("iperf3", vec!["iperf3", "--version"]),
        ("nft", vec!["nft", "--version"]),
        ("iptables", vec!["iptables", "--version"]),
    ] {
        if let Ok(o) = Command::new(args[0]).args(&args[1..]).output() {
            let s = String::from_utf8_lossy(&o.stdout);
            m.insert(k.into(), s.lines().next().unwrap_or("").trim().to_string());
        }
    }
    m
}

const L2: &str = "L2 guest-to-guest";
const OUT: &str = "guest-to-outside";
const VLAN: &str = "access-to-trunk VLAN";
pub const L2_CONFIGS: &[&str] = &["linux-bridge", "kvnet-tc", "kvnet-xdp", "limit-redirect"];
pub const VLAN_CONFIGS: &[&str] = &["linux-bridge-vlan", "kvnet-tc", "kvnet-xdp"];
pub const OUT_CONFIGS: &[&str] = &[
    "linux-routed",
    "bridge+iptables-masq",
    "nft-masq",
    "nft-masq+flowtable",
    "kvnet-routed",
    "kvnet-nat",
];
/// kvnet-nat measured again with this many synthetic conntrack entries.
pub const CT_SCALE: u32 = 1_000_000;
pub const CT_MAX: &str = "2200000";
/// The daemon's CPU time over the 64-byte run / over all the metrics of a
/// configuration.
pub const DAEMON_CPU_FRAMES: &str = "daemon CPU, during the 64-byte run";
pub const DAEMON_CPU_ALL: &str = "daemon CPU, during all its metrics";
/// With the grown table: the daemon's share of a core during one GC walk,
/// and the long-run share that the GC's pacing implies from it.
pub const DAEMON_CPU_WALK: &str = "daemon CPU, during one GC walk";
pub const DAEMON_CPU_LONG_RUN: &str = "daemon CPU, long run (a walk, then a pause as long)";
const G1_IP: &str = "10.0.0.1";
const G2_IP: &str = "10.0.0.2";
const GW_IP: &str = "10.0.0.254";
const UP_HV: &str = "192.168.77.1";
const UP_OUT: &str = "192.168.77.2";
/// The far host's guest in the VLAN scenario.
const FAR_IP: &str = "10.0.0.3";

struct Bench<'p> {
    plan: &'p Plan,
    helper: PathBuf,
    lab: Lab,
    kv: Kvnet,
    g1: GuestPort,
    g2: GuestPort,
    out_ns: String,
    /// Pins of the bench programs (bench_redirect, bench_sink, bench_gen).
    pins: PathBuf,
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl<'p> Bench<'p> {
    fn new(plan: &'p Plan, helper: &Path) -> Result<Self> {
        println!("bench: lab: hv namespace, guests g1 ({G1_IP}) and g2 ({G2_IP}) on veths p1, p2, outside on up0");
        let lab = Lab::new().context("creating the lab")?;
        let g1 = lab.add_guest_with("p1", Some(&format!("{G1_IP}/24")))?;
        let g2 = lab.add_guest_with("p2", Some(&format!("{G2_IP}/24")))?;
        let out = lab.add_outside()?;
        let kv =
            Kvnet::start_with(&lab, &["--ct-max", CT_MAX]).context("starting the kvnet daemon")?;
        let pins = PathBuf::from(format!("{}-bench", lab.pin_dir().display()));
        lab.remove_on_drop(&pins);
        let b = Bench {
            plan,
            helper: helper.to_path_buf(),
            g1,
            g2,
            out_ns: out.ns.clone(),
            kv,
            lab,
            pins,
        };
        b.helper_in(b.lab.hv(), &["setup", &b.pins.display().to_string()])
            .context("pinning the bench programs")?;
        // Servers for the whole run (the lab stops them).
        for ns in [b.g2.ns.clone(), b.out_ns.clone()] {
            let mut c = Command::new("iperf3");
            c.args(["-s", "-i", "0"])
                .stdout(std::process::Stdio::null());
            b.lab.spawn(&ns, c)?;
        }
        std::thread::sleep(Duration::from_millis(300));
        Ok(b)
    }

    fn hv(&self, args: &[&str]) -> Result<String> {
        let o = self.lab.exec(self.lab.hv(), args)?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn helper_in(&self, ns: &str, args: &[&str]) -> Result<Value> {
        let mut full = vec![self.helper.to_str().unwrap_or("kvnet-bench")];
        full.extend_from_slice(args);
        let o = self.lab.exec(ns, &full)?;
        let s = String::from_utf8_lossy(&o.stdout);
        serde_json::from_str(s.trim()).with_context(|| format!("kvnet-bench output {s:?}"))
    }

    // ---- configurations -------------------------------------------------

    /// A Linux bridge or a kvnet network (either hook) over `ports`; false
    /// for the other configurations.
    fn switch_up(&self, config: &str, ports: [&str; 2]) -> Result<bool> {
        match config {
            "linux-bridge" => {
                self.hv(&[
                    "ip",
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "stp_state",
                    "0",
                    "forward_delay",
                    "0",
                ])?;
                for p in ports {
                    self.hv(&["ip", "link", "set", p, "master", "br0"])?;
                }
                self.hv(&["ip", "link", "set", "br0", "up"])?;
            }
            "kvnet-tc" | "kvnet-xdp" => {
                let hook = config.trim_start_matches("kvnet-");
                self.kv.cli(&["net", "add", "bench"])?;
                for p in ports {
                    self.kv.cli(&["port", "add", "bench", p, "--hook", hook])?;
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn l2_up(&self, config: &str) -> Result<()> {
        if self.switch_up(config, ["p1", "p2"])? {
            return Ok(());
        }
        match config {
            "limit-redirect" => {
                let prog = self.pins.join("bench_redirect").display().to_string();
                for p in ["p1", "p2"] {
                    self.hv(&["tc", "qdisc", "replace", "dev", p, "clsact"])?;
                    self.hv(&[
                        "tc",
                        "filter",
                        "add",
                        "dev",
                        p,
                        "ingress",
                        "bpf",
                        "da",
                        "object-pinned",
                        &prog,
                    ])?;
                }
                let pins = self.pins.display().to_string();
                self.helper_in(self.lab.hv(), &["peer", &pins, "p1", "p2"])?;
            }
            _ => bail!("unknown config {config}"),
        }
        self.wait_ping(&self.g1.ns, G2_IP)
    }

    fn l2_down(&self, config: &str) -> Result<()> {
        match config {
            "linux-bridge" => {
                self.hv(&["ip", "link", "del", "br0"])?;
            }
            "kvnet-tc" | "kvnet-xdp" => {
                for p in ["p1", "p2"] {
                    self.kv.cli(&["port", "del", p])?;
                }
                self.kv.cli(&["net", "del", "bench"])?;
            }
            "limit-redirect" => {
                for p in ["p1", "p2"] {
                    self.hv(&["tc", "qdisc", "del", "dev", p, "clsact"])?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn out_up(&self, config: &str) -> Result<()> {
        let hv = self.lab.hv();
        let out = &self.out_ns;
        self.hv(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        self.lab.exec(
            hv,
            &[
                "ip",
                "addr",
                "replace",
                &format!("{UP_HV}/24"),
                "dev",
                "up0",
            ],
        )?;
        self.lab.exec(
            out,
            &[
                "ip",
                "addr",
                "replace",
                &format!("{UP_OUT}/24"),
                "dev",
                "eth0",
            ],
        )?;
        self.lab.exec(
            &self.g1.ns,
            &["ip", "route", "replace", "default", "via", GW_IP],
        )?;
        // Each configuration's gateway has its own MAC: forget the last one.
        self.lab
            .exec(&self.g1.ns, &["ip", "neigh", "flush", "dev", "eth0"])?;
        let gw = format!("{GW_IP}/24");
        match config {
            "linux-routed" => {
                self.hv(&["ip", "addr", "add", &gw, "dev", "p1"])?;
                self.lab.exec(
                    out,
                    &["ip", "route", "replace", "10.0.0.0/24", "via", UP_HV],
                )?;
            }
            "bridge+iptables-masq" => {
                self.hv(&[
                    "ip",
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "stp_state",
                    "0",
                    "forward_delay",
                    "0",
                ])?;
                self.hv(&["ip", "link", "set", "p1", "master", "br0"])?;
                self.hv(&["ip", "link", "set", "br0", "up"])?;
                self.hv(&["ip", "addr", "add", &gw, "dev", "br0"])?;
                // What libvirt installs for a NAT network (LIBVIRT_* chains
                // folded into the built-in ones).
                let rules: &[&[&str]] = &[
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "10.0.0.0/24",
                        "-d",
                        "224.0.0.0/24",
                        "-j",
                        "RETURN",
                    ],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "10.0.0.0/24",
                        "-d",
                        "255.255.255.255/32",
                        "-j",
                        "RETURN",
                    ],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "10.0.0.0/24",
                        "!",
                        "-d",
                        "10.0.0.0/24",
                        "-p",
                        "tcp",
                        "-j",
                        "MASQUERADE",
                        "--to-ports",
                        "1024-65535",
                    ],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "10.0.0.0/24",
                        "!",
                        "-d",
                        "10.0.0.0/24",
                        "-p",
                        "udp",
                        "-j",
                        "MASQUERADE",
                        "--to-ports",
                        "1024-65535",
                    ],
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "POSTROUTING",
                        "-s",
                        "10.0.0.0/24",
                        "!",
                        "-d",
                        "10.0.0.0/24",
                        "-j",
                        "MASQUERADE",
                    ],
                    &[
                        "-A",
                        "FORWARD",
                        "-d",
                        "10.0.0.0/24",
                        "-o",
                        "br0",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "RELATED,ESTABLISHED",
                        "-j",
                        "ACCEPT",
                    ],
                    &[
                        "-A",
                        "FORWARD",
                        "-s",
                        "10.0.0.0/24",
                        "-i",
                        "br0",
                        "-j",
                        "ACCEPT",
                    ],
                    &["-A", "FORWARD", "-i", "br0", "-o", "br0", "-j", "ACCEPT"],
                    &[
                        "-A",
                        "FORWARD",
                        "-o",
                        "br0",
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "icmp-port-unreachable",
                    ],
                    &[
                        "-A",
                        "FORWARD",
                        "-i",
                        "br0",
                        "-j",
                        "REJECT",
                        "--reject-with",
                        "icmp-port-unreachable",
                    ],
                ];
                for r in rules {
                    let mut a = vec!["iptables"];
                    a.extend_from_slice(r);
                    self.hv(&a)?;
                }
            }
            "kvnet-routed" | "kvnet-nat" => {
                let mode = config.trim_start_matches("kvnet-");
                let gw6 = format!("{}/64", ipv6::GW_IP6);
                let mut args = vec![
                    "net",
                    "add",
                    "out",
                    "--mode",
                    mode,
                    "--gateway",
                    &gw,
                    "--uplink",
                    "up0",
                    "--gateway6",
                    &gw6,
                ];
                if mode == "nat" && self.has_nat6() {
                    args.push("--nat6");
                }
                self.kv.cli(&args)?;
                self.kv.cli(&["port", "add", "out", "p1"])?;
                if mode == "routed" {
                    self.lab.exec(
                        out,
                        &["ip", "route", "replace", "10.0.0.0/24", "via", UP_HV],
                    )?;
                }
            }
            "nft-masq" | "nft-masq+flowtable" => {
                let flow = config.ends_with("flowtable");
                if flow {
                    if let Some(why) = kernel_lacks_flowtable() {
                        bail!("{why}");
                    }
                }
                self.hv(&["ip", "addr", "add", &gw, "dev", "p1"])?;
                let ruleset = format!(
                    "table inet kvbench {{\n{}\
                     chain forward {{ type filter hook forward priority 0; policy accept;\n{}}}\n\
                     chain post {{ type nat hook postrouting priority 100; policy accept;\n\
                       oifname \"up0\" masquerade; }}\n}}\n",
                    if flow {
                        "flowtable ft { hook ingress priority 0; devices = { p1, up0 }; }\n"
                    } else {
                        ""
                    },
                    if flow {
                        "meta l4proto { tcp, udp } flow add @ft;\n"
                    } else {
                        ""
                    },
                );
                let f = self.lab.work_dir().join("kvbench.nft");
                std::fs::write(&f, ruleset)?;
                self.hv(&["nft", "-f", &f.display().to_string()])?;
            }
            _ => bail!("unknown config {config}"),
        }
        self.wait_ping(&self.g1.ns, UP_OUT)
    }

    /// Whether this kvnet masquerades IPv6 (`net add --nat6`).
    fn has_nat6(&self) -> bool {
        self.kv
            .cli(&["net", "add", "--help"])
            .is_ok_and(|h| h.contains("--nat6"))
    }

    /// The IPv6 half of a guest-to-outside configuration (its IPv4 half
    /// is up): addresses, the gateway's, masquerade or a route back.
    /// `out_down` takes it down with the rest.
    fn out_up6(&self, config: &str) -> Result<()> {
        let hv = self.lab.hv();
        self.hv(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        let addr = |ns: &str, a: &str, dev: &str| -> Result<()> {
            let a = format!("{a}/64");
            self.lab
                .exec(
                    ns,
                    &["ip", "-6", "addr", "replace", &a, "dev", dev, "nodad"],
                )
                .map(|_| ())
        };
        addr(hv, ipv6::UP_HV6, "up0")?;
        addr(&self.out_ns, ipv6::UP_OUT6, "eth0")?;
        addr(&self.g1.ns, ipv6::G1_IP6, "eth0")?;
        self.lab.exec(
            &self.g1.ns,
            &[
                "ip",
                "-6",
                "route",
                "replace",
                "default",
                "via",
                ipv6::GW_IP6,
            ],
        )?;
        match config {
            "linux-routed" | "nft-masq" | "nft-masq+flowtable" => addr(hv, ipv6::GW_IP6, "p1")?,
            "bridge+iptables-masq" => {
                addr(hv, ipv6::GW_IP6, "br0")?;
                self.hv(&ipv6::ip6tables_masquerade())?;
            }
            // kvnet's gateway has it (`--gateway6`).
            _ => {}
        }
        if ipv6::carried(config, self.has_nat6()) == ipv6::Carried::Routed {
            self.lab.exec(
                &self.out_ns,
                &[
                    "ip",
                    "-6",
                    "route",
                    "replace",
                    ipv6::GUEST_PREFIX,
                    "via",
                    ipv6::UP_HV6,
                ],
            )?;
        }
        self.wait_ping(&self.g1.ns, ipv6::UP_OUT6)
    }

    fn out_down6(&self, config: &str) {
        let _ = self.lab.exec_output(
            &self.out_ns,
            &["ip", "-6", "route", "del", ipv6::GUEST_PREFIX],
        );
        let _ = self
            .lab
            .exec_output(&self.g1.ns, &["ip", "-6", "route", "del", "default"]);
        if config == "bridge+iptables-masq" {
            let _ = self.hv(&["ip6tables", "-t", "nat", "-F", "POSTROUTING"]);
        }
    }

    /// The IPv6 rows of a configuration: ping and one TCP stream.
    fn measure6(&self, res: &mut Results, config: &str) {
        match self.latency(&self.g1.ns, ipv6::UP_OUT6) {
            Ok((p50, p99)) => {
                res.add(OUT, config, ipv6::RR_P50, "µs", p50);
                res.add(OUT, config, ipv6::RR_P99, "µs", p99);
            }
            Err(e) => res.fail(OUT, config, ipv6::RR_P50, "µs", format!("{e:#}")),
        }
        match self.iperf(&self.g1.ns, ipv6::UP_OUT6, 1) {
            Ok(g) => res.add(OUT, config, ipv6::TCP_1, "Gbit/s", g),
            Err(e) => res.fail(OUT, config, ipv6::TCP_1, "Gbit/s", format!("{e:#}")),
        }
    }

    fn out_down(&self, config: &str) -> Result<()> {
        self.out_down6(config);
        let _ = self
            .lab
            .exec_output(&self.out_ns, &["ip", "route", "del", "10.0.0.0/24"]);
        match config {
            "bridge+iptables-masq" => {
                self.hv(&["iptables", "-t", "nat", "-F", "POSTROUTING"])?;
                self.hv(&["iptables", "-F", "FORWARD"])?;
                self.hv(&["ip", "link", "del", "br0"])?;
            }
            "nft-masq" | "nft-masq+flowtable" => {
                let _ = self.lab.exec_output(
                    self.lab.hv(),
                    &["nft", "delete", "table", "inet", "kvbench"],
                );
                self.hv(&["ip", "addr", "flush", "dev", "p1"])?;
            }
            "kvnet-routed" | "kvnet-nat" => {
                self.kv.cli(&["port", "del", "p1"])?;
                self.kv.cli(&["net", "del", "out"])?;
            }
            _ => {
                self.hv(&["ip", "addr", "flush", "dev", "p1"])?;
            }
        }
        Ok(())
    }

    fn wait_ping(&self, ns: &str, ip: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let o = self
                .lab
                .exec_output(ns, &["ping", "-c", "1", "-W", "1", ip])?;
            if o.status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{ip} unreachable from {ns}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    // ---- metrics ----------------------------------------------------------

    /// ICMP echo round trips, `ping -i 0.002`: (p50, p99) in microseconds.
    fn latency(&self, ns: &str, ip: &str) -> Result<(f64, f64)> {
        let n = self.plan.pings.to_string();
        let o = self
            .lab
            .exec(ns, &["ping", "-n", "-c", &n, "-i", "0.002", "-W", "1", ip])?;
        let s = String::from_utf8_lossy(&o.stdout);
        let rtts: Vec<f64> = s
            .lines()
            .filter_map(|l| l.split("time=").nth(1))
            .filter_map(|t| t.split_whitespace().next()?.parse::<f64>().ok())
            .map(|ms| ms * 1000.0)
            .collect();
        if rtts.len() < self.plan.pings as usize / 2 {
            bail!("only {} of {} pings answered", rtts.len(), self.plan.pings);
        }
        Ok((percentile(&rtts, 50.0), percentile(&rtts, 99.0)))
    }

    /// iperf3 TCP bulk, Gbit/s received.
    fn iperf(&self, ns: &str, ip: &str, streams: u32) -> Result<f64> {
        let t = self.plan.iperf_secs.to_string();
        let p = streams.to_string();
        let o = self.lab.exec(
            ns,
            &[
                "iperf3",
                "-c",
                ip,
                "-t",
                &t,
                "-P",
                &p,
                "-J",
                "--connect-timeout",
                "2000",
            ],
        )?;
        let v: Value = serde_json::from_slice(&o.stdout).context("iperf3 -J output")?;
        v["end"]["sum_received"]["bits_per_second"]
            .as_f64()
            .map(|b| b / 1e9)
            .ok_or_else(|| anyhow!("iperf3: no sum_received ({})", v["error"]))
    }

    /// 64-byte frames g1 -> g2: live-frame generator on g1's eth0, counted
    /// (and dropped) by `bench_sink` on g2's eth0. Returns (Mpps, delivered share).
    fn frame_rate(&self) -> Result<(f64, f64)> {
        self.frame_rate_to(&self.g2.ns.clone(), &mac_str(&self.g2.mac), G2_IP)
    }

    /// 64-byte frames from g1's eth0 to `dst_mac`/`dst_ip`, counted by the
    /// sink on `sink_ns`'s eth0 (tagged or not, it counts every frame).
    fn frame_rate_to(&self, sink_ns: &str, dst_mac: &str, dst_ip: &str) -> Result<(f64, f64)> {
        let pins = self.pins.display().to_string();
        let sink = self.pins.join("bench_sink").display().to_string();
        // Frames XDP_TX'd into a veth need NAPI on its peer (GRO or XDP).
        let gro_before = self.hv(&["ethtool", "-k", "p1"])?;
        let gro_was_on = gro_before
            .lines()
            .any(|l| l.starts_with("generic-receive-offload: on"));
        self.hv(&["ethtool", "-K", "p1", "gro", "on"])?;
        self.lab.exec(
            sink_ns,
            &["ip", "link", "set", "dev", "eth0", "xdp", "pinned", &sink],
        )?;
        let result = (|| -> Result<(f64, f64)> {
            self.helper_in(self.lab.hv(), &["count", &pins, "--reset"])?;
            let frames = self.plan.gen_frames.to_string();
            let src = mac_str(&self.g1.mac);
            let g = self.helper_in(
                &self.g1.ns,
                &[
                    "gen", &pins, "eth0", "--count", &frames, "--src", &src, "--dst", dst_mac,
                    "--dst-ip", dst_ip,
                ],
            )?;
            let secs = g["secs"].as_f64().unwrap_or(f64::NAN);
            // Let queued frames drain before reading the counter.
            std::thread::sleep(Duration::from_millis(100));
            let c = self.helper_in(self.lab.hv(), &["count", &pins, "--reset"])?;
            let got = c["frames"].as_f64().unwrap_or(0.0);
            let sent = self.plan.gen_frames as f64;
            if got < sent * 0.01 {
                bail!("only {got} of {sent} frames reached {sink_ns}");
            }
            Ok((got.min(sent) / secs / 1e6, got.min(sent) / sent))
        })();
        let _ = self
            .lab
            .exec_output(sink_ns, &["ip", "link", "set", "dev", "eth0", "xdp", "off"]);
        if !gro_was_on {
            let _ = self.hv(&["ethtool", "-K", "p1", "gro", "off"]);
        }
        result
    }

    /// Every metric of one configuration once.
    fn measure_pair(
        &self,
        res: &mut Results,
        scenario: &str,
        config: &str,
        ns: &str,
        ip: &str,
        frames: bool,
    ) {
        match self.latency(ns, ip) {
            Ok((p50, p99)) => {
                res.add(scenario, config, "RR latency p50 (ping)", "µs", p50);
                res.add(scenario, config, "RR latency p99 (ping)", "µs", p99);
            }
            Err(e) => {
                res.fail(
                    scenario,
                    config,
                    "RR latency p50 (ping)",
                    "µs",
                    format!("{e:#}"),
                );
                res.fail(
                    scenario,
                    config,
                    "RR latency p99 (ping)",
                    "µs",
                    format!("{e:#}"),
                );
            }
        }
        for streams in [1, 4] {
            let metric = format!(
                "TCP bulk, {streams} stream{}",
                if streams > 1 { "s" } else { "" }
            );
            match self.iperf(ns, ip, streams) {
                Ok(g) => res.add(scenario, config, &metric, "Gbit/s", g),
                Err(e) => res.fail(scenario, config, &metric, "Gbit/s", format!("{e:#}")),
            }
        }
        if frames {
            match self.frame_rate() {
                Ok((mpps, share)) => {
                    res.add(scenario, config, "64-byte frames", "Mpps", mpps);
                    res.add(
                        scenario,
                        config,
                        "64-byte frames delivered",
                        "%",
                        share * 100.0,
                    );
                }
                Err(e) => res.fail(scenario, config, "64-byte frames", "Mpps", format!("{e:#}")),
            }
        }
    }

    // ---- scenarios -------------------------------------------------------

    fn l2(&mut self, res: &mut Results) -> Result<()> {
        for rep in 1..=self.plan.repeats {
            for &config in L2_CONFIGS {
                println!("bench: [{L2}] repeat {rep}/{}: {config}", self.plan.repeats);
                if let Err(e) = self.l2_up(config) {
                    let _ = self.l2_down(config);
                    for m in ["TCP bulk, 1 stream", "64-byte frames"] {
                        res.fail(L2, config, m, "", format!("set-up failed: {e:#}"));
                    }
                    continue;
                }
                self.measure_pair(res, L2, config, &self.g1.ns.clone(), G2_IP, true);
                match self.trafgen_rate(&mac_str(&self.g2.mac), G2_IP, &self.g2.ns, "eth0") {
                    Ok((mpps, _)) => res.add(L2, config, trafgen::METRIC, "Mpps", mpps),
                    Err(e) => res.fail(L2, config, trafgen::METRIC, "Mpps", format!("{e:#}")),
                }
                if config.starts_with("kvnet") {
                    self.kvnet_counters(res, config);
                }
                self.l2_down(config)
                    .with_context(|| format!("tearing down {config}"))?;
            }
        }
        Ok(())
    }

    /// Which kvnet hook saw the frames (proves the path measured).
    fn kvnet_counters(&self, res: &mut Results, config: &str) {
        if let Ok(v) = self.kv.json(&["stats"]) {
            res.scale
                .entry(format!("kvnet stats after {config}"))
                .or_insert(v);
        }
    }

    fn routed(&mut self, res: &mut Results) -> Result<()> {
        for rep in 1..=self.plan.repeats {
            for &config in OUT_CONFIGS {
                println!(
                    "bench: [{OUT}] repeat {rep}/{}: {config}",
                    self.plan.repeats
                );
                if let Err(e) = self.out_up(config) {
                    let _ = self.out_down(config);
                    for (m, unit) in [
                        ("TCP bulk, 1 stream", "Gbit/s"),
                        ("TCP bulk, 4 streams", "Gbit/s"),
                        ("RR latency p50 (ping)", "µs"),
                        ("RR latency p99 (ping)", "µs"),
                        (trafgen::METRIC, "Mpps"),
                        (connrate::METRIC, "conn/s"),
                    ] {
                        res.fail(OUT, config, m, unit, format!("{e:#}"));
                    }
                    continue;
                }
                let cpu = self.daemon_cpu_start();
                self.out_frames(res, config);
                if config == "kvnet-nat" {
                    self.daemon_cpu_end(res, config, DAEMON_CPU_FRAMES, cpu);
                }
                self.measure_pair(res, OUT, config, &self.g1.ns.clone(), UP_OUT, false);
                match self.out_up6(config) {
                    Ok(()) => self.measure6(res, config),
                    Err(e) => {
                        for (m, unit) in [(ipv6::TCP_1, "Gbit/s"), (ipv6::RR_P50, "µs")] {
                            res.fail(OUT, config, m, unit, format!("IPv6 set-up: {e:#}"));
                        }
                    }
                }
                self.conn_rate(res, config);
                if config == "kvnet-nat" {
                    self.daemon_cpu_end(res, config, DAEMON_CPU_ALL, cpu);
                }
                if config.starts_with("kvnet") {
                    self.kvnet_counters(res, config);
                }
                if config == "kvnet-nat" {
                    self.ct_scale(res);
                }
                if config == "nft-masq+flowtable" {
                    if let Ok(s) = self.hv(&["nft", "list", "flowtable", "inet", "kvbench", "ft"]) {
                        res.scale
                            .entry("nft flowtable".into())
                            .or_insert(Value::String(s));
                    }
                }
                self.out_down(config)
                    .with_context(|| format!("tearing down {config}"))?;
            }
        }
        Ok(())
    }

    /// The 64-byte rate to the outside: trafgen on g1 sends to the
    /// gateway's MAC (as g1 resolved it), `out`'s eth0 counts.
    fn out_frames(&self, res: &mut Results, config: &str) {
        self.out_frames_as(res, config, trafgen::METRIC)
    }

    fn out_frames_as(&self, res: &mut Results, config: &str, metric: &str) {
        let r = (|| -> Result<(f64, f64)> {
            let o = self.lab.exec(
                &self.g1.ns,
                &["ip", "-j", "neigh", "show", GW_IP, "dev", "eth0"],
            )?;
            let v: Value = serde_json::from_slice(&o.stdout)?;
            let mac = v[0]["lladdr"]
                .as_str()
                .ok_or_else(|| anyhow!("g1 has no neighbour entry for {GW_IP}: {v}"))?
                .to_string();
            self.trafgen_rate(&mac, UP_OUT, &self.out_ns, "eth0")
        })();
        match r {
            Ok((mpps, share)) => {
                res.add(OUT, config, metric, "Mpps", mpps);
                res.add(OUT, config, "64-byte frames delivered", "%", share * 100.0);
            }
            Err(e) => res.fail(OUT, config, metric, "Mpps", format!("{e:#}")),
        }
    }

    /// The daemon's CPU time so far (user + system, /proc/PID/stat) and
    /// the wall clock, to start a window.
    fn daemon_cpu_start(&self) -> Option<(f64, Instant)> {
        let pid = self.kv.daemon_pid()?;
        Some((proc_cpu_secs(pid).ok()?, Instant::now()))
    }

    /// The daemon's share of one core since `start`, as a metric.
    fn daemon_cpu_end(
        &self,
        res: &mut Results,
        config: &str,
        metric: &str,
        start: Option<(f64, Instant)>,
    ) {
        let r = (|| -> Result<f64> {
            let (cpu0, t0) = start.ok_or_else(|| anyhow!("no daemon pid or /proc/PID/stat"))?;
            let pid = self.kv.daemon_pid().ok_or_else(|| anyhow!("daemon gone"))?;
            let cpu = proc_cpu_secs(pid)? - cpu0;
            Ok(cpu / t0.elapsed().as_secs_f64() * 100.0)
        })();
        match r {
            Ok(pct) => res.add(OUT, config, metric, "% of one core", pct),
            Err(e) => res.fail(OUT, config, metric, "% of one core", format!("{e:#}")),
        }
    }

    /// kvnet-nat again with CT_SCALE synthetic entries in the daemon's
    /// conntrack table (TCP established, so its GC keeps them).
    fn ct_scale(&self, res: &mut Results) {
        let pins = self.lab.pin_dir().display().to_string();
        let n = CT_SCALE.to_string();
        let cfg = format!("kvnet-nat, +{}M conntrack", CT_SCALE / 1_000_000);
        println!("bench:   {cfg}");
        match self.helper_in(self.lab.hv(), &["ctfill", &pins, &n]) {
            Ok(v) => {
                res.scale.entry("daemon ct fill".into()).or_insert(v);
                // The 64-byte run once a walk of the grown table is under
                // way (the daemon paces walks, so one may take a while).
                let status = || self.kv.json(&["status"]);
                let walk =
                    gcwalk::Watch::after_fill(&status, self.kv.daemon_pid()).and_then(|mut w| {
                        let wait = Duration::from_secs(if self.plan.quick { 15 } else { 40 });
                        let seen = w.await_walk(wait)?;
                        Ok((w, seen))
                    });
                let (watch, walking) = match walk {
                    Ok((w, seen)) => (Some(w), seen),
                    Err(e) => {
                        res.notes.push(format!("{cfg}: following the GC: {e:#}"));
                        (None, false)
                    }
                };
                let cpu = self.daemon_cpu_start();
                self.out_frames_as(
                    res,
                    &cfg,
                    if walking {
                        trafgen::METRIC
                    } else {
                        trafgen::METRIC_NO_WALK
                    },
                );
                self.daemon_cpu_end(res, &cfg, DAEMON_CPU_FRAMES, cpu);
                // Only a run inside a walk counts as the +1M rate; one
                // outside it is kept apart.
                if walking && !watch.as_ref().is_some_and(|w| w.still_walking()) {
                    res.notes.push(format!(
                        "{cfg}: the GC walk ended before the 64-byte run did: part of that run saw no walk"
                    ));
                } else if !walking {
                    res.notes.push(format!(
                        "{cfg}: no GC walk seen after the fill; that 64-byte run is under `{}`",
                        trafgen::METRIC_NO_WALK
                    ));
                }
                if let Some(w) = watch {
                    let bound = Duration::from_secs(if self.plan.quick { 90 } else { 180 });
                    let walk = w
                        .finish(bound, CT_SCALE as u64 * 9 / 10)
                        .unwrap_or_else(|e| serde_json::json!({"error": format!("{e:#}")}));
                    // The whole daemon while it walked, where /proc says.
                    let during = if walk["daemon_share_of_core_during_walk"].is_f64() {
                        "daemon_share_of_core_during_walk"
                    } else {
                        "walk_share_of_core"
                    };
                    for (key, metric) in [
                        (during, DAEMON_CPU_WALK),
                        ("long_run_share_of_core", DAEMON_CPU_LONG_RUN),
                    ] {
                        if let Some(v) = walk[key].as_f64() {
                            res.add(OUT, &cfg, metric, "% of one core", v * 100.0);
                        }
                    }
                    if let Some(v) = walk["walk_wall_secs"].as_f64() {
                        res.add(OUT, &cfg, "daemon GC walk, wall time", "s", v);
                    }
                    let walks = res
                        .scale
                        .entry("daemon gc walks".into())
                        .or_insert_with(|| Value::Array(Vec::new()));
                    if let Some(a) = walks.as_array_mut() {
                        a.push(walk);
                    }
                }
                let cpu = self.daemon_cpu_start();
                self.measure_pair(res, OUT, &cfg, &self.g1.ns.clone(), UP_OUT, false);
                self.conn_rate(res, &cfg);
                self.daemon_cpu_end(res, &cfg, DAEMON_CPU_ALL, cpu);
                let ct = Path::new(&pins).join("ct").display().to_string();
                if let Ok(o) = self.lab.exec(
                    self.lab.hv(),
                    &["bpftool", "-j", "map", "show", "pinned", &ct],
                ) {
                    if let Ok(m) = serde_json::from_slice::<Value>(&o.stdout) {
                        res.scale.insert("daemon ct map (bpftool)".into(), m);
                    }
                }
            }
            Err(e) => res.fail(
                OUT,
                &cfg,
                "TCP bulk, 1 stream",
                "Gbit/s",
                format!("ctfill: {e:#}"),
            ),
        }
        if let Err(e) = self.helper_in(self.lab.hv(), &["ctfill", &pins, &n, "--remove"]) {
            res.notes
                .push(format!("removing synthetic conntrack entries: {e:#}"));
        }
    }

    /// Access-to-trunk: this host's p1 (g1) is an access port of VLAN 10,
    /// the trunk trA leads to a second kvnet host (its own lab and daemon)
    /// whose trunk trB pops the tag for its access port r1 (10.0.0.3). The
    /// kernel has no 802.1Q devices (CONFIG_VLAN_8021Q off), so a receiver
    /// that accepts tagged frames has to be a second switch.
    fn vlan(&mut self, res: &mut Results) -> Result<()> {
        let far = Lab::new().context("creating the far host's lab")?;
        let r = far.add_guest_with("r1", Some(&format!("{FAR_IP}/24")))?;
        self.hv(&[
            "ip",
            "link",
            "add",
            "trA",
            "type",
            "veth",
            "peer",
            "name",
            "trB",
            "netns",
            far.hv(),
        ])?;
        self.hv(&["ip", "link", "set", "trA", "up"])?;
        far.exec(far.hv(), &["ip", "link", "set", "trB", "up"])?;
        let kb = Kvnet::start(&far).context("starting the far host's kvnet daemon")?;
        kb.cli(&["net", "add", "lan"])?;
        kb.cli(&["port", "add", "lan", "r1", "--vlan", "10"])?;
        kb.cli(&["port", "add", "lan", "trB", "--trunk", "10"])?;
        let mut c = Command::new("iperf3");
        c.args(["-s", "-i", "0"])
            .stdout(std::process::Stdio::null());
        far.spawn(&r.ns, c)?;
        std::thread::sleep(Duration::from_millis(300));
        for rep in 1..=self.plan.repeats {
            for &config in VLAN_CONFIGS {
                println!(
                    "bench: [{VLAN}] repeat {rep}/{}: {config}",
                    self.plan.repeats
                );
                if let Err(e) = self.vlan_up(config) {
                    let _ = self.vlan_down(config);
                    let why = format!("{e:#}");
                    for (m, u) in [
                        ("RR latency p50 (ping)", "µs"),
                        ("RR latency p99 (ping)", "µs"),
                        ("TCP bulk, 1 stream", "Gbit/s"),
                        ("TCP bulk, 4 streams", "Gbit/s"),
                        ("64-byte frames", "Mpps"),
                    ] {
                        res.fail(VLAN, config, m, u, why.clone());
                    }
                    continue;
                }
                self.measure_pair(res, VLAN, config, &self.g1.ns.clone(), FAR_IP, false);
                match self.frame_rate_to(&r.ns, &mac_str(&r.mac), FAR_IP) {
                    Ok((mpps, share)) => {
                        res.add(VLAN, config, "64-byte frames", "Mpps", mpps);
                        res.add(VLAN, config, "64-byte frames delivered", "%", share * 100.0);
                    }
                    Err(e) => res.fail(VLAN, config, "64-byte frames", "Mpps", format!("{e:#}")),
                }
                if config.starts_with("kvnet") {
                    self.kvnet_counters(res, &format!("{config} (VLAN)"));
                }
                self.vlan_down(config)
                    .with_context(|| format!("tearing down {config} (VLAN)"))?;
            }
        }
        if let Ok(v) = kb.json(&["stats"]) {
            res.scale.insert("far kvnet stats after VLAN".into(), v);
        }
        let _ = self
            .lab
            .exec_output(self.lab.hv(), &["ip", "link", "del", "trA"]);
        drop(kb);
        drop(far);
        Ok(())
    }

    fn vlan_up(&self, config: &str) -> Result<()> {
        match config {
            "linux-bridge-vlan" => {
                if let Some(why) = kernel_lacks("CONFIG_BRIDGE_VLAN_FILTERING") {
                    bail!("{why}");
                }
                self.hv(&[
                    "ip",
                    "link",
                    "add",
                    "br0",
                    "type",
                    "bridge",
                    "stp_state",
                    "0",
                    "forward_delay",
                    "0",
                    "vlan_filtering",
                    "1",
                ])?;
                for p in ["p1", "trA"] {
                    self.hv(&["ip", "link", "set", p, "master", "br0"])?;
                    self.hv(&["bridge", "vlan", "del", "dev", p, "vid", "1"])?;
                }
                self.hv(&[
                    "bridge", "vlan", "add", "dev", "p1", "vid", "10", "pvid", "untagged",
                ])?;
                self.hv(&["bridge", "vlan", "add", "dev", "trA", "vid", "10"])?;
                self.hv(&["ip", "link", "set", "br0", "up"])?;
            }
            "kvnet-tc" | "kvnet-xdp" => {
                let hook = config.trim_start_matches("kvnet-");
                self.kv.cli(&["net", "add", "bench"])?;
                self.kv
                    .cli(&["port", "add", "bench", "p1", "--hook", hook, "--vlan", "10"])?;
                self.kv.cli(&[
                    "port", "add", "bench", "trA", "--hook", hook, "--trunk", "10",
                ])?;
            }
            _ => bail!("unknown config {config}"),
        }
        self.wait_ping(&self.g1.ns, FAR_IP)
    }

    fn vlan_down(&self, config: &str) -> Result<()> {
        match config {
            "linux-bridge-vlan" => {
                let _ = self
                    .lab
                    .exec_output(self.lab.hv(), &["ip", "link", "del", "br0"]);
            }
            _ => {
                for p in ["p1", "trA"] {
                    let _ = self.kv.cli(&["port", "del", p]);
                }
                let _ = self.kv.cli(&["net", "del", "bench"]);
            }
        }
        Ok(())
    }

    /// Per-packet program cost, BPF_PROG_RUN with repeat, private maps.
    fn cost(&mut self, res: &mut Results) -> Result<()> {
        println!(
            "bench: [per-packet cost] BPF_PROG_RUN x{} with {} FDB entries",
            self.plan.cost_repeat, self.plan.cost_sizes
        );
        let dir = format!("{}-cost", self.lab.pin_dir().display());
        self.lab.remove_on_drop(&dir);
        let repeat = self.plan.cost_repeat.to_string();
        // For the routed/NAT paths: a gateway host end with the guests'
        // subnet (g1 a permanent neighbour), the uplink's address, and the
        // outside resolved.
        self.hv(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        let _ = self
            .lab
            .exec_output(self.lab.hv(), &["ip", "link", "del", "kvbgw"]);
        self.hv(&[
            "ip", "link", "add", "kvbgw", "type", "veth", "peer", "name", "kvbgwp",
        ])?;
        self.hv(&["ip", "link", "set", "kvbgw", "up"])?;
        self.hv(&["ip", "link", "set", "kvbgwp", "up"])?;
        self.hv(&["ip", "addr", "add", &format!("{GW_IP}/24"), "dev", "kvbgw"])?;
        self.hv(&[
            "ip",
            "neigh",
            "replace",
            G1_IP,
            "lladdr",
            "02:aa:00:00:00:01",
            "dev",
            "kvbgw",
            "nud",
            "permanent",
        ])?;
        self.lab.exec(
            self.lab.hv(),
            &[
                "ip",
                "addr",
                "replace",
                &format!("{UP_HV}/24"),
                "dev",
                "up0",
            ],
        )?;
        self.lab.exec(
            &self.out_ns,
            &[
                "ip",
                "addr",
                "replace",
                &format!("{UP_OUT}/24"),
                "dev",
                "eth0",
            ],
        )?;
        self.wait_ping(self.lab.hv(), UP_OUT)?;
        // IPv6 likewise: the gateway's prefix on kvbgw, the outside a
        // permanent neighbour of the uplink.
        self.hv(&["sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
        for (a, dev) in [(ipv6::GW_IP6, "kvbgw"), (ipv6::UP_HV6, "up0")] {
            let a = format!("{a}/64");
            self.hv(&["ip", "-6", "addr", "replace", &a, "dev", dev, "nodad"])?;
        }
        self.hv(&[
            "ip",
            "-6",
            "neigh",
            "replace",
            ipv6::UP_OUT6,
            "lladdr",
            "02:bb:00:00:00:02",
            "dev",
            "up0",
            "nud",
            "permanent",
        ])?;
        let single = self.plan.single_runs.to_string();
        let v = self.helper_in(
            self.lab.hv(),
            &[
                "cost",
                &dir,
                "--a",
                "p1",
                "--b",
                "p2",
                "--sizes",
                &self.plan.cost_sizes,
                "--repeat",
                &repeat,
                "--trials",
                "5",
                "--gw",
                "kvbgw",
                "--uplink",
                "up0",
                "--ct-sizes",
                &self.plan.ct_sizes,
                "--single",
                &single,
            ],
        )?;
        let ct = Path::new(&dir).join("ct").display().to_string();
        if let Ok(o) = self.lab.exec(
            self.lab.hv(),
            &["bpftool", "-j", "map", "show", "pinned", &ct],
        ) {
            if let Ok(m) = serde_json::from_slice::<Value>(&o.stdout) {
                res.scale.insert("ct map (bpftool)".into(), m);
            }
        }
        let fdb = Path::new(&dir).join("fdb").display().to_string();
        if let Ok(o) = self.lab.exec(
            self.lab.hv(),
            &["bpftool", "-j", "map", "show", "pinned", &fdb],
        ) {
            if let Ok(m) = serde_json::from_slice::<Value>(&o.stdout) {
                res.scale.insert("fdb map (bpftool)".into(), m);
            }
        }
        res.cost = v;
        Ok(())
    }

    /// FDB scale through the daemon: install N static entries over the
    /// control socket (one connection, pipelined), then the frame rate with
    /// them in place.
    fn scale(&mut self, res: &mut Results) -> Result<()> {
        let n = self.plan.install_entries;
        println!("bench: [scale] installing {n} static FDB entries through the daemon");
        self.l2_up("kvnet-tc")?;
        let r = self.install_fdb(n);
        match &r {
            Ok(secs) => {
                res.scale.insert(
                    "daemon fdb install".into(),
                    serde_json::json!({"entries": n, "secs": secs, "per_sec": n as f64 / secs}),
                );
                println!("bench:   {n} entries in {secs:.2} s");
                match self.frame_rate() {
                    Ok((mpps, _)) => res.add(
                        L2,
                        &format!("kvnet-tc, +{n} FDB"),
                        "64-byte frames",
                        "Mpps",
                        mpps,
                    ),
                    Err(e) => res
                        .notes
                        .push(format!("frame rate with {n} FDB entries: {e:#}")),
                }
            }
            Err(e) => res.notes.push(format!("daemon FDB install failed: {e:#}")),
        }
        self.l2_down("kvnet-tc")?;
        Ok(())
    }

    fn install_fdb(&self, n: u32) -> Result<f64> {
        let sock = self.lab.socket_path();
        let stream =
            UnixStream::connect(&sock).with_context(|| format!("connect {}", sock.display()))?;
        let mut w = stream.try_clone()?;
        let t = Instant::now();
        let writer = std::thread::spawn(move || -> Result<()> {
            let mut buf = std::io::BufWriter::new(&mut w);
            for i in 0..n {
                let b = i.to_be_bytes();
                let mac = format!("02:bf:{:02x}:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2], b[3]);
                writeln!(
                    buf,
                    r#"{{"op":"fdb_add","net":"bench","mac":"{mac}","port":"p2"}}"#
                )?;
            }
            buf.flush()?;
            Ok(())
        });
        let mut lines = BufReader::new(stream).lines();
        let mut failed = 0u32;
        let mut first_err = None;
        for _ in 0..n {
            let l = lines
                .next()
                .ok_or_else(|| anyhow!("daemon closed the socket"))??;
            let v: Value = serde_json::from_str(&l)?;
            if v["ok"] != Value::Bool(true) {
                failed += 1;
                first_err.get_or_insert(v["error"].to_string());
            }
        }
        let secs = t.elapsed().as_secs_f64();
        writer.join().map_err(|_| anyhow!("writer panicked"))??;
        if failed > 0 {
            bail!(
                "{failed} of {n} fdb_add requests failed, first: {}",
                first_err.unwrap_or_default()
            );
        }
        Ok(secs)
    }

    fn notes(&self, res: &mut Results) {
        if let Ok(s) = self.hv(&[
            "sh",
            "-c",
            "cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo absent",
        ]) {
            res.machine.insert(
                "bridge-nf-call-iptables (hv netns)".into(),
                s.trim().to_string(),
            );
        }
        for (label, ns, dev) in [
            ("g1 eth0", &self.g1.ns, "eth0"),
            ("hv p1", &self.lab.hv().to_string(), "p1"),
        ] {
            if let Ok(o) = self.lab.exec(ns, &["ethtool", "-k", dev]) {
                let s = String::from_utf8_lossy(&o.stdout);
                let pick: Vec<&str> = s
                    .lines()
                    .filter(|l| {
                        l.starts_with("tcp-segmentation-offload")
                            || l.starts_with("generic-receive-offload")
                            || l.starts_with("tx-checksumming")
                    })
                    .collect();
                res.machine
                    .insert(format!("offloads {label}"), pick.join(", "));
            }
        }
    }
}

/// A process's user + system CPU seconds (fields 14 and 15 of
/// /proc/PID/stat, in clock ticks).
fn proc_cpu_secs(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces: count from after it.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("/proc/{pid}/stat: {stat:?}"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat field {}: {stat:?}", i + 3))
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    // After ")": field 3 is at index 0, so utime (14) at 11, stime (15) at 12.
    Ok((ticks(11)? + ticks(12)?) / hz)
}
