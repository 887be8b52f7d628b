//! target/bench/report.md: medians with spread, ratios kvnet/peer.

use std::fmt::Write;

use serde_json::Value;

use super::taps::{TAP, TAP_CONFIGS};
use super::{
    median, targets, Results, Series, CT_SCALE, L2, L2_CONFIGS, OUT, OUT_CONFIGS, VLAN,
    VLAN_CONFIGS,
};

fn fmt_num(v: f64) -> String {
    if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn cell(s: Option<&Series>) -> String {
    match s {
        Some(s) if !s.values.is_empty() => {
            let m = s.median().unwrap_or(f64::NAN);
            if s.values.len() == 1 {
                fmt_num(m)
            } else {
                let lo = s.values.iter().cloned().fold(f64::INFINITY, f64::min);
                let hi = s.values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                format!("{} ({}–{})", fmt_num(m), fmt_num(lo), fmt_num(hi))
            }
        }
        Some(s) => {
            let note = s.note.as_deref().unwrap_or("no value");
            if note.starts_with("not available") {
                short(note)
            } else {
                format!("failed: {}", short(note))
            }
        }
        None => "—".into(),
    }
}

fn short(s: &str) -> String {
    let s = s.replace('|', "/").replace('\n', " ");
    if s.chars().count() > 90 {
        format!("{}…", s.chars().take(90).collect::<String>())
    } else {
        s
    }
}

fn ratio(a: Option<&Series>, b: Option<&Series>) -> String {
    match (a.and_then(Series::median), b.and_then(Series::median)) {
        (Some(a), Some(b)) if b != 0.0 => format!("{:.2}x", a / b),
        _ => "—".into(),
    }
}

fn metrics_of(res: &Results, scenario: &str) -> Vec<(String, String)> {
    let mut m: Vec<(String, String)> = Vec::new();
    for s in res.series.iter().filter(|s| s.scenario == scenario) {
        if !m.iter().any(|(n, _)| *n == s.metric) {
            m.push((s.metric.clone(), s.unit.clone()));
        }
    }
    m
}

pub fn markdown(res: &Results) -> String {
    let mut o = String::new();
    let plan = res.plan.as_ref();
    let _ = writeln!(o, "# kvnet benchmarks\n");
    let _ = writeln!(
        o,
        "`cargo xtask bench{}`: every figure below comes from one run on one lab topology; \
         the machine is shared and noisy, so the ratios within this run are what count. \
         Cells are `median (min–max)` over {} repeat(s), configurations measured round-robin.\n",
        if plan.map(|p| p.quick).unwrap_or(false) {
            " --quick"
        } else {
            ""
        },
        plan.map(|p| p.repeats).unwrap_or(1)
    );
    let _ = writeln!(o, "| machine | |\n|---|---|");
    for (k, v) in &res.machine {
        let _ = writeln!(o, "| {k} | {} |", short(v));
    }

    targets_table(&mut o, res);

    // ---- L2
    let _ = writeln!(
        o,
        "\n## {L2}: g1 → g2 over veths p1, p2 in the hv namespace\n"
    );
    let _ = write!(o, "| metric |");
    for c in L2_CONFIGS {
        let _ = write!(o, " {c} |");
    }
    let _ = writeln!(
        o,
        " kvnet-tc / bridge | kvnet-xdp / bridge | kvnet-tc / limit |"
    );
    let _ = writeln!(o, "|---|{}---|---|---|", "---|".repeat(L2_CONFIGS.len()));
    for (metric, unit) in metrics_of(res, L2) {
        if metric.ends_with("delivered") {
            continue;
        }
        let _ = write!(o, "| {metric} ({unit}) |");
        for c in L2_CONFIGS {
            let _ = write!(o, " {} |", cell(res.get(L2, c, &metric)));
        }
        let g = |c: &str| res.get(L2, c, &metric);
        let _ = writeln!(
            o,
            " {} | {} | {} |",
            ratio(g("kvnet-tc"), g("linux-bridge")),
            ratio(g("kvnet-xdp"), g("linux-bridge")),
            ratio(g("kvnet-tc"), g("limit-redirect"))
        );
    }
    for s in res
        .series
        .iter()
        .filter(|s| s.scenario == L2 && s.config.contains("FDB"))
    {
        let _ = writeln!(
            o,
            "\nkvnet-tc with the daemon's FDB grown by {} static entries: 64-byte frames {} Mpps (same run, same path).",
            s.config.trim_start_matches("kvnet-tc, +").trim_end_matches(" FDB"),
            cell(Some(s))
        );
    }
    let _ = writeln!(
        o,
        "\nHigher is better except latency. Ratios are of medians; for latency a ratio below 1 is better."
    );

    // ---- taps
    let _ = writeln!(
        o,
        "\n## {TAP}: a writer process on tap tA → the switch → a reader process on tap tB (hv namespace)\n"
    );
    hook_table(&mut o, res, TAP, TAP_CONFIGS, "linux-bridge");

    // ---- VLAN
    let _ = writeln!(
        o,
        "\n## {VLAN}: g1 (access port p1, VLAN 10) → trunk trA (tagged) → a second kvnet host (trunk trB, access port r1, 10.0.0.3)\n\n\
         The kernel has no 802.1Q devices and no bridge VLAN filtering, so the receiver of tagged frames is a second kvnet \
         host (its own lab and daemon, always tc), like tests/vlan.rs `two_hosts_joined_by_a_trunk_keep_vlans_apart`: \
         every packet is tagged by the config under test and untagged by the far host. The only Linux peer \
         (a VLAN-filtering bridge) cannot run here.\n"
    );
    hook_table(&mut o, res, VLAN, VLAN_CONFIGS, "linux-bridge-vlan");

    // ---- guest to outside
    let ctcfg = format!("kvnet-nat, +{}M conntrack", CT_SCALE / 1_000_000);
    let _ = writeln!(
        o,
        "\n## {OUT}: g1 → `out` over the uplink up0 (NAT and routed)\n"
    );
    let _ = write!(o, "| metric |");
    for c in OUT_CONFIGS {
        let _ = write!(o, " {c} |");
    }
    let _ = writeln!(
        o,
        " {ctcfg} | kvnet-routed / linux-routed | kvnet-nat / best masquerade peer | +1M conntrack / empty |"
    );
    let _ = writeln!(
        o,
        "|---|{}---|---|---|---|",
        "---|".repeat(OUT_CONFIGS.len() + 1)
    );
    let out_metrics: Vec<(String, String)> = metrics_of(res, OUT)
        .into_iter()
        .filter(|(m, _)| !m.ends_with("delivered"))
        .collect();
    for (metric, unit) in out_metrics {
        let _ = write!(o, "| {metric} ({unit}) |");
        for c in OUT_CONFIGS
            .iter()
            .map(|c| c.to_string())
            .chain([ctcfg.clone()])
        {
            let _ = write!(o, " {} |", cell(res.get(OUT, &c, &metric)));
        }
        let g = |c: &str| res.get(OUT, c, &metric);
        let lower_better = metric.starts_with("RR");
        let best = ["bridge+iptables-masq", "nft-masq", "nft-masq+flowtable"]
            .iter()
            .filter_map(|c| g(c).filter(|s| s.median().is_some()))
            .reduce(|a, b| {
                let (x, y) = (a.median().unwrap(), b.median().unwrap());
                if (x < y) == lower_better {
                    a
                } else {
                    b
                }
            });
        let _ = writeln!(
            o,
            " {} | {} | {} |",
            ratio(g("kvnet-routed"), g("linux-routed")),
            match best {
                Some(b) => format!("{} (vs {})", ratio(g("kvnet-nat"), Some(b)), b.config),
                None => "—".into(),
            },
            ratio(g(&ctcfg), g("kvnet-nat"))
        );
    }

    // ---- per-packet cost
    cost_table(&mut o, &res.cost);
    paths_table(&mut o, &res.cost["paths"]);

    // ---- scale
    let _ = writeln!(o, "\n## FDB scale\n");
    if let Some(m) = res.scale.get("fdb map (bpftool)") {
        let mem = m["bytes_memlock"].as_f64().unwrap_or(f64::NAN);
        let max = m["max_entries"].as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            o,
            "- Memory: `fdb` is a preallocated {} of {} entries, memlock {:.1} MiB: **{:.0} bytes per entry**, \
             paid up front for every slot (key {} B, value {} B).",
            m["type"].as_str().unwrap_or("?"),
            max,
            mem / 1048576.0,
            mem / max,
            m["bytes_key"],
            m["bytes_value"]
        );
    }
    if let Some(fill) = res.cost["fill"].as_array() {
        for f in fill {
            let n = f["to"].as_f64().unwrap_or(0.0) - f["from"].as_f64().unwrap_or(0.0);
            let secs = f["secs"].as_f64().unwrap_or(f64::NAN);
            if n >= 1000.0 {
                let _ = writeln!(
                    o,
                    "- Raw map writes (one `BPF_MAP_UPDATE_ELEM` each, kvnet-bench): {:.0} entries in {:.2} s = {:.0} k entries/s.",
                    n, secs, n / secs / 1e3
                );
            }
        }
    }
    if let Some(d) = res.scale.get("daemon fdb install") {
        let _ = writeln!(
            o,
            "- Through the daemon (`fdb_add` requests pipelined on one control-socket connection): \
             {} entries in {:.2} s = {:.0} entries/s{}.",
            d["entries"],
            d["secs"].as_f64().unwrap_or(f64::NAN),
            d["per_sec"].as_f64().unwrap_or(f64::NAN),
            if d["entries"].as_u64() == Some(100_000) {
                String::new()
            } else {
                format!(
                    " (100k would take ≈{:.1} s)",
                    100_000.0 / d["per_sec"].as_f64().unwrap_or(f64::NAN)
                )
            }
        );
    }
    ports_table(&mut o, res);
    // ---- conntrack scale
    let _ = writeln!(o, "\n## Conntrack scale\n");
    for (k, label) in [
        ("ct map (bpftool)", "the bench's private `ct`"),
        (
            "daemon ct map (bpftool)",
            "the daemon's `ct` (`--ct-max 2200000`)",
        ),
    ] {
        if let Some(m) = res.scale.get(k) {
            let mem = m["bytes_memlock"].as_f64().unwrap_or(f64::NAN);
            let max = m["max_entries"].as_f64().unwrap_or(f64::NAN);
            let _ = writeln!(
                o,
                "- Memory, {label}: preallocated {} of {} entries, memlock {:.1} MiB: **{:.0} bytes per entry** \
                 (key {} B, value {} B; a flow takes 2 entries), paid up front whatever the fill.",
                m["type"].as_str().unwrap_or("?"),
                max,
                mem / 1048576.0,
                mem / max,
                m["bytes_key"],
                m["bytes_value"]
            );
        }
    }
    if let Some(f) = res.cost["paths"]["ct_fill"].as_array() {
        for f in f {
            let n = f["to"].as_f64().unwrap_or(0.0) - f["from"].as_f64().unwrap_or(0.0);
            if n >= 1000.0 {
                let secs = f["secs"].as_f64().unwrap_or(f64::NAN);
                let _ = writeln!(o, "- Raw conntrack inserts (kvnet-bench, one update each): {n:.0} entries in {secs:.2} s = {:.0} k entries/s.", n / secs / 1e3);
            }
        }
    }
    if let Some(d) = res.scale.get("daemon ct fill") {
        let _ = writeln!(
            o,
            "- Throughput with {} synthetic entries (TCP established, kept by the daemon's GC) in the daemon's table: \
             column `{ctcfg}` of the guest-to-outside table (filled in {:.1} s).",
            d["entries"],
            d["secs"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if !res.notes.is_empty() {
        let _ = writeln!(o, "\n## Notes from this run\n");
        for n in &res.notes {
            let _ = writeln!(o, "- {}", short(n));
        }
    }
    let _ = writeln!(o, "\n## Method\n\n{}", METHOD);
    o
}

/// A scenario's table with kvnet-tc and kvnet-xdp against one Linux peer.
fn hook_table(o: &mut String, res: &Results, scenario: &str, configs: &[&str], peer: &str) {
    let _ = write!(o, "| metric |");
    for c in configs {
        let _ = write!(o, " {c} |");
    }
    let _ = writeln!(o, " kvnet-tc / bridge | kvnet-xdp / bridge |");
    let _ = writeln!(o, "|---|{}---|---|", "---|".repeat(configs.len()));
    for (metric, unit) in metrics_of(res, scenario) {
        if metric.ends_with("delivered") && scenario != TAP {
            continue;
        }
        let _ = write!(o, "| {metric} ({unit}) |");
        for c in configs {
            let _ = write!(o, " {} |", cell(res.get(scenario, c, &metric)));
        }
        let g = |c: &str| res.get(scenario, c, &metric);
        let _ = writeln!(
            o,
            " {} | {} |",
            ratio(g("kvnet-tc"), g(peer)),
            ratio(g("kvnet-xdp"), g(peer))
        );
    }
}

/// Issue 16's targets, computed from this run.
fn targets_table(o: &mut String, res: &Results) {
    let _ = writeln!(
        o,
        "\n## Targets (issue 16), from this run\n\n| target | measured | bound | met | from |\n|---|---|---|---|---|"
    );
    for t in targets::targets(res) {
        let _ = writeln!(
            o,
            "| {} | {} | {} {} | {} | {} |",
            t.name,
            t.value
                .map(|v| format!("{} {}", fmt_num(v), t.unit))
                .unwrap_or("not measured".into()),
            if t.at_most { "≤" } else { "≥" },
            match t.unit {
                "x" => format!("{}x", t.bound),
                u => format!("{} {u}", t.bound),
            },
            match t.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "—",
            },
            t.detail.replace('|', "/")
        );
    }
}

const PATHS: &[(&str, &str, &str)] = &[
    ("unicast", "bench_redirect", "limit: redirect-only (tc)"),
    ("unicast", "kvnet_tc", "known unicast, tc"),
    (
        "unicast-open",
        "kvnet_tc",
        "known unicast, tc, port security off (same run)",
    ),
    (
        "unicast",
        "kvnet_xdp",
        "known unicast to a veth, xdp (→ XDP_PASS, tc finishes)",
    ),
    (
        "unicast-xdp-redirect",
        "kvnet_xdp",
        "known unicast to a non-veth port, xdp (checksum check + redirect)",
    ),
    (
        "flood",
        "kvnet_tc",
        "flood to 2 ports, tc (clone-redirect, clones really sent)",
    ),
    ("flood", "kvnet_xdp", "flood, xdp (→ XDP_PASS, tc floods)"),
    ("flood-64", "kvnet_tc", "flood to 64 ports, tc"),
    ("flood-1024", "kvnet_tc", "flood to 1024 ports, tc"),
    (
        "arp-answered",
        "kvnet_tc",
        "ARP request for a known address, answered (suppression)",
    ),
    (
        "arp-flooded",
        "kvnet_tc",
        "ARP request for an unknown address, flooded to 2",
    ),
];

fn cost_table(o: &mut String, cost: &Value) {
    let Some(rows) = cost["rows"].as_array() else {
        let _ = writeln!(o, "\n## Per-packet program cost\n\nnot measured: {cost}");
        return;
    };
    let mut sizes: Vec<u64> = rows
        .iter()
        .filter_map(|r| r["fdb_entries"].as_u64())
        .collect();
    sizes.dedup();
    let _ = writeln!(
        o,
        "\n## Per-packet program cost (BPF_PROG_RUN, repeat {}, ns per packet, median of {} trials)\n",
        cost["repeat"], cost["trials"]
    );
    let _ = write!(o, "| path | ");
    for s in &sizes {
        let _ = write!(o, "{s} FDB entries | ");
    }
    let _ = writeln!(o, "/ limit |");
    let _ = writeln!(o, "|---|{}---|", "---|".repeat(sizes.len()));
    let get = |path: &str, prog: &str, size: u64| -> Option<f64> {
        rows.iter()
            .find(|r| {
                r["path"] == path && r["prog"] == prog && r["fdb_entries"].as_u64() == Some(size)
            })
            .and_then(|r| {
                let v: Vec<f64> = r["ns"]
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                median(&v)
            })
    };
    let first = sizes.first().copied().unwrap_or(10);
    let limit = get("unicast", "bench_redirect", first);
    for (path, prog, label) in PATHS {
        let _ = write!(o, "| {label} | ");
        for &s in &sizes {
            let _ = write!(
                o,
                "{} | ",
                get(path, prog, s).map(fmt_num).unwrap_or("—".into())
            );
        }
        let r = match (get(path, prog, first), limit) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "—".into(),
        };
        let _ = writeln!(o, "{r} |");
    }
    let _ = writeln!(
        o,
        "\nThe kernel measures the whole BPF_PROG_RUN loop: the program and the helpers it calls \
         (tc: on an skb arriving on `lo`; xdp: on an xdp_buff of p1's queue). A redirect is only \
         decided here, not carried out; clone-redirect floods are carried out. VLAN push/pop, routed \
         and NAT paths: next table."
    );
}

const PATH_ROWS: &[(&str, &str, &str)] = &[
    ("unicast", "bench_redirect", "limit: redirect-only (tc)"),
    ("unicast", "kvnet_tc", "known unicast, tc"),
    (
        "unicast-open",
        "kvnet_tc",
        "known unicast, tc, port security off (same run)",
    ),
    ("vlan-push", "kvnet_tc", "VLAN push: access → trunk, tc"),
    ("vlan-pop", "kvnet_tc", "VLAN pop: trunk → access, tc"),
    ("routed", "kvnet_tc", "routed: guest → FIB → uplink, tc"),
    (
        "routed-v6",
        "kvnet_tc",
        "routed IPv6: guest → FIB → uplink, tc",
    ),
    (
        "nat-new",
        "kvnet_tc",
        "NAT new flow (port pick + 2 inserts), tc",
    ),
    (
        "nat-established",
        "kvnet_tc",
        "NAT established, guest → outside, tc",
    ),
    (
        "nat-established-open",
        "kvnet_tc",
        "NAT established, port security off (same run)",
    ),
    ("nat-reply", "kvnet_tc", "NAT reply, outside → guest, tc"),
];

fn paths_table(o: &mut String, p: &Value) {
    let Some(rows) = p["rows"].as_array() else {
        return;
    };
    let mut cts: Vec<u64> = rows
        .iter()
        .filter(|r| r["path"].as_str().is_some_and(|s| s.starts_with("nat")))
        .filter_map(|r| r["ct_entries"].as_u64())
        .collect();
    cts.sort();
    cts.dedup();
    let _ = writeln!(
        o,
        "\n## Per-packet cost of the rewriting paths (BPF_PROG_RUN, one packet per run, {} runs, p50 ns)\n",
        p["runs"]
    );
    let _ = write!(o, "| path |");
    for c in &cts {
        let _ = write!(o, " {c} conntrack entries |");
    }
    let _ = writeln!(o, " / limit (same mode) | verdict |");
    let _ = writeln!(o, "|---|{}---|---|", "---|".repeat(cts.len()));
    let get = |path: &str, prog: &str, ct: Option<u64>| {
        rows.iter().find(|r| {
            r["path"] == path
                && r["prog"] == prog
                && ct.is_none_or(|c| r["ct_entries"].as_u64() == Some(c))
        })
    };
    let limit = get("unicast", "bench_redirect", None).and_then(|r| r["ns"]["p50"].as_f64());
    for (path, prog, label) in PATH_ROWS {
        let per_ct = path.starts_with("nat");
        let _ = write!(o, "| {label} |");
        let mut first = None;
        let mut verdict = String::new();
        for &c in &cts {
            let r = get(path, prog, if per_ct { Some(c) } else { None });
            let v = r.and_then(|r| r["ns"]["p50"].as_f64());
            first = first.or(v);
            if let Some(r) = r {
                verdict = r["verdict"].to_string();
            }
            let _ = write!(o, " {} |", v.map(fmt_num).unwrap_or("—".into()));
        }
        let ratio = match (first, limit) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "—".into(),
        };
        let _ = writeln!(o, " {ratio} | {verdict} |");
    }
    let _ = writeln!(
        o,
        "\nThese paths rewrite the packet (tag, TTL, addresses), so `repeat` would run the program again on its \
         own output; each packet is one BPF_PROG_RUN on a fresh skb built on the real ingress device \
         (`__sk_buff.ifindex`: p1 for the guest side, up0 for replies, so `bpf_fib_lookup` sees the real \
         interfaces and routes). The kernel's per-run time includes one clock read and a cold skb, so compare \
         with the limit and known unicast measured the same way (first two rows), not with the `repeat` table. \
         Verdict 7 = TC_ACT_REDIRECT (the path finished in the fast path; the redirect itself is not carried out). \
         Non-NAT rows do not depend on the conntrack size and are measured once."
    );
}

const METHOD: &str = "\
- Lab: per-run namespaces: `hv` with veths p1, p2 to guests g1 (10.0.0.1), g2 (10.0.0.2), and up0 \
  to `out` (192.168.77.2). Default offloads everywhere; the kvnet daemon runs in `hv`.
- linux-bridge: `br0` (STP off) over p1, p2. kvnet-tc / kvnet-xdp: `kvnet port add bench pN --hook tc|xdp` \
  (xdp on a veth hands unicast to tc with XDP_PASS, see DESIGN.md). limit-redirect: `bench_redirect` \
  (kvnet-ebpf/src/bench.rs), a tc program that only `bpf_redirect`s p1 <-> p2 from a 2-entry map.
- RR latency: `ping -i 0.002` from g1 (ICMP echo through both guests' stacks), p50/p99 of the per-reply times.
- TCP bulk: `iperf3 -c … -t T -P 1|4`, received rate.
- 64-byte frames: `bench_gen` (XDP_TX) run through BPF_PROG_RUN in live-frames mode (batch 64) with \
  g1's eth0 as ingress, so frames leave g1's eth0 as if the guest sent them; `bench_sink` (XDP_DROP with a \
  per-CPU counter) on g2's eth0 counts them. Rate = frames counted / generator wall time; p1 gets GRO on \
  during this test (a veth needs NAPI to take XDP frames), then its setting is restored. Everything runs \
  on the generator's CPU, so the rate is the inverse of the path's cost.
- Guest-to-outside: linux-routed (p1 10.0.0.254, ip_forward, `out` routes back), bridge+iptables-masq \
  (br0 10.0.0.254 and libvirt's NAT rules: MASQUERADE + FORWARD accepts/rejects), nft-masq+flowtable \
  (p1 10.0.0.254, `flowtable ft { devices = { p1, up0 } }`, `flow add @ft` for tcp/udp, masquerade on up0; \
  nft-masq: the same without the flowtable).
- Per-packet cost: kvnet-bench loads the same object with private maps (ports lo, p1, p2 in one network, \
  the FDB filled to N entries) and runs each program with `repeat`.
- Access-to-trunk VLAN: kvnet-tc/xdp: `kvnet port add bench p1 --vlan 10`, `... trA --trunk 10`; the far host \
  (second lab, second daemon) has `trB --trunk 10` and `r1 --vlan 10`; the 64-byte sink sits on r1's guest eth0. \
  linux-bridge-vlan would be `br0` with `vlan_filtering 1`, p1 `pvid 10 untagged`, trA `vid 10`.
- kvnet-routed / kvnet-nat: `kvnet net add out --mode routed|nat --gateway 10.0.0.254/24 --uplink up0`, \
  `kvnet port add out p1` (routed: `out` routes 10.0.0.0/24 back via up0). \
  `+1M conntrack`: the same kvnet-nat network with 1M synthetic entries (500k TCP-established flows) \
  written into the daemon's pinned `ct` (`kvnet-bench ctfill`), removed afterwards; its 64-byte run starts \
  once the daemon's GC walks the grown table.
- IPv6 rows (`TCP bulk IPv6`, `RR latency IPv6`): the same configurations carry g1's 2001:db8:10::1 to the \
  outside's 2001:db8:77::2 (g1's default route via the gateway 2001:db8:10::fe): linux-routed by IPv6 forwarding \
  with a route back, bridge+iptables-masq with libvirt's ip6tables `MASQUERADE` rule for the prefix, nft-masq \
  by the same `inet` table, kvnet-routed by `--gateway6` (routed IPv6 in tc) with a route back, and kvnet-nat \
  by `--gateway6 --nat6` (NAT66) where the build has it, else routed like kvnet-routed.
- 64-byte frames (trafgen): netsniff-ng's `trafgen` (AF_PACKET, qdisc bypass, one process, \
  `--no-sock-mem --notouch-irq`) sends one UDP flow of 64-byte frames (correct IPv4 checksum) from g1's \
  eth0, as ordinary skbs, so they enter routing and iptables/nftables like a guest's packets. Guest-to-outside: \
  destination MAC = the gateway's as g1 resolved it (p1, br0 or kvnet's gateway), IP 192.168.77.2; L2: g2's MAC \
  and IP. Counted by the receiving namespace's eth0 rx counter (`ip -s link`); rate = frames counted / \
  trafgen's wall time. The `kvnet stats` counters recorded in results.json show which kvnet path took them \
  (`routed`, NAT `translated`).
- New TCP connections: `kvnet-bench conn-server` on `out` accepts and closes at once; `kvnet-bench conn-rate` \
  on g1 opens short connections from 4 threads (connect, wait for the server's close, close) to 192.168.77.2, \
  bounded in count (3000 quick, 20000 full) and time; rate = connections / wall time. Each one is a new NAT \
  flow (kvnet: port pick and two conntrack inserts in tc; masquerade peers: a kernel conntrack entry).
- Daemon CPU: user + system time of the kvnet daemon from /proc/PID/stat over a window, as a share of one \
  core: during the 64-byte run, and during the configuration's other metrics (ping, iperf3, connections; for \
  kvnet-nat also the frames). With 1M entries the bench follows the daemon's own report of its GC walks \
  (`kvnet status --json`: `conntrack_gc`): the 64-byte run starts once a walk is under way after the fill \
  (bounded wait; a note says if the walk ended before the run did); `during one GC walk` is the whole daemon's \
  CPU over the first walk that read at least 90 % of the filled entries, and the long-run share is that walk \
  thread's CPU over the walk and the pause after it (as long as the walk, at least 1 s). The GC thread reads the table in batches of 4096 \
  (`BPF_MAP_LOOKUP_BATCH`) and sleeps 19 times as long as each batch took, so a walk takes at most about 5 % of \
  a core while it runs.
- Taps: two taps tA, tB in `hv` (`ip tuntap`); `kvnet-bench tap-sink tB` (the receiving guest's hypervisor \
  process) attaches to tB, announces its MAC with one broadcast frame and counts the 64-byte frames to it \
  (read(2) per frame); `kvnet-bench tap-gen tA` (the sending guest's process) writes prebuilt 64-byte frames \
  into tA's fd, one write(2) each, bounded in count and time. Rate = frames read / writer wall time; `delivered` \
  = frames read / written (the rest overflowed tB's queue because the reader fell behind). No vhost-net \
  here, so this is qemu's userspace virtio backend's shape. linux-bridge: br0 over tA, tB; kvnet-tc/xdp: \
  `kvnet port add bench tA|tB --hook tc|xdp` (XDP on a tap runs on written frames and redirects to tB as xdp_frames).
- Rewriting-path costs: kvnet-bench's private maps get a routed network, a NAT network (gateway host end \
  `kvbgw`, a veth with 10.0.0.254/24 and g1 as a permanent neighbour; uplink up0 192.168.77.1) and a VLAN \
  network (p1 access 10, p2 trunk); the conntrack is grown with synthetic flows to each size.";

/// Ports per network (issue 21): port add time, daemon memory, and the
/// flood's cost per member from the per-packet table.
fn ports_table(o: &mut String, res: &Results) {
    let Some(p) = res.scale.get("ports per network") else {
        return;
    };
    let _ = writeln!(o, "\n## Ports per network\n");
    let _ = writeln!(
        o,
        "| ports | bulk attach, ms a port | port add request, ms (median of 10) | `kvnet port add` with the CLI process, ms (median of 10) | unicast TCP between two guests, Gbit/s | daemon RSS, MiB |"
    );
    let _ = writeln!(o, "|---|---|---|---|---|---|");
    let rows = p["per_network"].as_array().cloned().unwrap_or_default();
    let across = p["across_networks"].clone();
    for r in rows.iter().chain((!across.is_null()).then_some(&across)) {
        let label = match r["networks"].as_u64() {
            Some(n) => format!("{} across {n} networks", r["ports"]),
            None => format!("{} in one network", r["ports"]),
        };
        let f = |k: &str| r[k].as_f64().map_or("—".into(), |v| format!("{v:.2}"));
        let rss = r["daemon_rss_kib"]
            .as_f64()
            .map_or("—".into(), |v| format!("{:.1}", v / 1024.0));
        let _ = writeln!(
            o,
            "| {label} | {} | {} | {} | {} | {rss} |",
            f("bulk_ms_per_port"),
            f("port_add_request_ms"),
            f("port_add_ms"),
            f("unicast_gbps")
        );
    }
    let rss_1k = rows
        .iter()
        .find(|r| r["ports"].as_u64() == Some(1024))
        .and_then(|r| r["daemon_rss_kib"].as_f64());
    let add_4k = rows
        .iter()
        .find(|r| r["ports"].as_u64() == Some(4096))
        .and_then(|r| r["port_add_request_ms"].as_f64());
    let _ = writeln!(
        o,
        "\nTargets: daemon RSS < 30 MB at 1,000 ports: {}; port add < 5 ms at 4,096 (the request, \
         from connect to answer; the CLI process adds its own start-up): {}.",
        rss_1k.map_or("not measured".into(), |v| format!(
            "{:.1} MiB, {}",
            v / 1024.0,
            if v / 1024.0 < 30.0 { "met" } else { "MISSED" }
        )),
        add_4k.map_or("not measured (--quick)".into(), |v| format!(
            "{v:.2} ms, {}",
            if v < 5.0 { "met" } else { "MISSED" }
        )),
    );
    let cost = |path: &str| -> Option<f64> {
        res.cost["rows"]
            .as_array()?
            .iter()
            .find(|r| r["path"] == path)
            .and_then(|r| {
                let v: Vec<f64> = r["ns"]
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                median(&v)
            })
    };
    if let (Some(a), Some(b)) = (cost("flood-64"), cost("flood-1024")) {
        let _ = writeln!(
            o,
            "\nOne broadcast's cost per member (BPF_PROG_RUN, tc, clones really sent): {:.0} ns \
             ((flood to 1024 - flood to 64) / 960; 64 members {:.1} us, 1024 members {:.1} us).",
            (b - a) / 960.0,
            a / 1e3,
            b / 1e3
        );
    }
    if let (Some(a), Some(f)) = (cost("arp-answered"), cost("arp-flooded")) {
        let _ = writeln!(
            o,
            "ARP request for a known address answered in the datapath: {a:.0} ns, against {f:.0} ns to flood \
             it to 2 ports (and every guest's stack woken, on a real network)."
        );
    }
}
