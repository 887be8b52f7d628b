//! Issue 16's targets, each as a ratio (or ns / %) computed from one run's
//! results, with whether it is met: the report's targets table and the
//! chart's ratio panel.

use serde_json::Value;

use super::taps::{TAP, TAP_METRIC};
use super::{
    connrate, median, trafgen, Results, CT_SCALE, DAEMON_CPU_ALL, DAEMON_CPU_LONG_RUN,
    DAEMON_CPU_WALK, L2, OUT,
};

pub struct Target {
    pub name: &'static str,
    /// Short label for the chart.
    pub short: &'static str,
    pub value: Option<f64>,
    pub unit: &'static str,
    /// The bound, and whether the value must stay at or below it.
    pub bound: f64,
    pub at_most: bool,
    /// What the value is made of (configs compared).
    pub detail: String,
}

impl Target {
    pub fn met(&self) -> Option<bool> {
        self.value.map(|v| {
            if self.at_most {
                v <= self.bound
            } else {
                v >= self.bound
            }
        })
    }
}

fn med(res: &Results, sc: &str, c: &str, m: &str) -> Option<f64> {
    res.get(sc, c, m).and_then(|s| s.median())
}

fn div(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b != 0.0 => Some(a / b),
        _ => None,
    }
}

/// Per-packet ns of a `repeat` row at the smallest FDB size.
fn cost(res: &Results, path: &str, prog: &str) -> Option<f64> {
    let rows = res.cost["rows"].as_array()?;
    let first = rows.iter().find_map(|r| r["fdb_entries"].as_u64())?;
    let r = rows.iter().find(|r| {
        r["path"] == path && r["prog"] == prog && r["fdb_entries"].as_u64() == Some(first)
    })?;
    let v: Vec<f64> = r["ns"]
        .as_array()?
        .iter()
        .filter_map(Value::as_f64)
        .collect();
    median(&v)
}

/// p50 ns of a one-packet-per-run row (the smallest conntrack size).
fn one(res: &Results, path: &str) -> Option<f64> {
    let prog = if path == "limit" {
        "bench_redirect"
    } else {
        "kvnet_tc"
    };
    let path = if path == "limit" { "unicast" } else { path };
    let rows = res.cost["paths"]["rows"].as_array()?;
    rows.iter()
        .filter(|r| r["path"] == path && r["prog"] == prog)
        .min_by_key(|r| r["ct_entries"].as_u64().unwrap_or(0))
        .and_then(|r| r["ns"]["p50"].as_f64())
}

pub fn targets(res: &Results) -> Vec<Target> {
    let ratio =
        |name, short, a: Option<f64>, b: Option<f64>, bound, at_most, detail: &str| Target {
            name,
            short,
            value: div(a, b),
            unit: "x",
            bound,
            at_most,
            detail: detail.to_string(),
        };
    let limit1 = one(res, "limit");
    let unicast1 = one(res, "unicast");
    let sub = |a: Option<f64>, b: Option<f64>| a.zip(b).map(|(a, b)| a - b);
    let tg = trafgen::METRIC;
    let l2 = |c| med(res, L2, c, tg);
    let out = |c| med(res, OUT, c, tg);
    let tap = |c| med(res, TAP, c, TAP_METRIC);
    let (best_tap, best_tap_name) = match (tap("kvnet-tc"), tap("kvnet-xdp")) {
        (Some(t), Some(x)) if x > t => (Some(x), "kvnet-xdp"),
        (Some(t), _) => (Some(t), "kvnet-tc"),
        (None, x) => (x, "kvnet-xdp"),
    };
    let ct = format!("kvnet-nat, +{}M conntrack", CT_SCALE / 1_000_000);
    // Flood: cost per member from the 64- and 1024-port rows, and what is
    // left of the 2-port flood once its members are paid for.
    let (f2, f64_, f1024) = (
        cost(res, "flood", "kvnet_tc"),
        cost(res, "flood-64", "kvnet_tc"),
        cost(res, "flood-1024", "kvnet_tc"),
    );
    let per_member = sub(f1024, f64_).map(|d| d / 960.0);
    let fixed = match (f2, per_member) {
        (Some(f), Some(p)) => Some(f - 2.0 * p),
        _ => None,
    };
    vec![
        ratio(
            "known unicast, tc / redirect-only limit (repeat)",
            "unicast/limit",
            cost(res, "unicast", "kvnet_tc"),
            cost(res, "unicast", "bench_redirect"),
            1.5,
            true,
            "per-packet cost table",
        ),
        ratio(
            "NAT established / limit (one packet per run)",
            "nat est/limit",
            one(res, "nat-established"),
            limit1,
            4.0,
            true,
            "rewriting-path table",
        ),
        ratio(
            "NAT reply / limit (one packet per run)",
            "nat reply/limit",
            one(res, "nat-reply"),
            limit1,
            4.0,
            true,
            "rewriting-path table",
        ),
        ratio(
            "NAT new flow / limit (one packet per run)",
            "nat new/limit",
            one(res, "nat-new"),
            limit1,
            10.0,
            true,
            "rewriting-path table",
        ),
        Target {
            name: "VLAN push over known unicast",
            short: "push +ns",
            value: sub(one(res, "vlan-push"), unicast1),
            unit: "ns",
            bound: 40.0,
            at_most: true,
            detail: "rewriting-path table".into(),
        },
        Target {
            name: "VLAN pop over known unicast",
            short: "pop +ns",
            value: sub(one(res, "vlan-pop"), unicast1),
            unit: "ns",
            bound: 40.0,
            at_most: true,
            detail: "rewriting-path table".into(),
        },
        Target {
            name: "flood: fixed cost beyond its members, over one known-unicast lookup",
            short: "flood fixed",
            value: div(fixed, cost(res, "unicast", "kvnet_tc")),
            unit: "x",
            bound: 1.0,
            at_most: true,
            detail: format!(
                "per member {} ns (flood to 64 and 1024 ports), 2-port flood {} ns",
                per_member.map(|v| format!("{v:.0}")).unwrap_or("?".into()),
                f2.map(|v| format!("{v:.0}")).unwrap_or("?".into())
            ),
        },
        ratio(
            "64-byte frames L2 on veth, kvnet-tc / Linux bridge (trafgen)",
            "L2 64B",
            l2("kvnet-tc"),
            l2("linux-bridge"),
            1.5,
            false,
            &format!(
                "ceiling: limit-redirect / bridge = {}; kvnet-xdp / bridge = {}",
                fmt(div(l2("limit-redirect"), l2("linux-bridge"))),
                fmt(div(l2("kvnet-xdp"), l2("linux-bridge")))
            ),
        ),
        ratio(
            "64-byte frames routed, kvnet-routed / Linux forwarding (trafgen)",
            "routed 64B",
            out("kvnet-routed"),
            out("linux-routed"),
            2.0,
            false,
            "guest-to-outside table",
        ),
        ratio(
            "64-byte frames NAT, kvnet-nat / iptables MASQUERADE (trafgen)",
            "NAT 64B",
            out("kvnet-nat"),
            out("bridge+iptables-masq"),
            2.0,
            false,
            &format!(
                "kvnet-nat / nft-masq = {}",
                fmt(div(out("kvnet-nat"), out("nft-masq")))
            ),
        ),
        ratio(
            "64-byte frames over taps, best kvnet hook / Linux bridge",
            "taps 64B",
            best_tap,
            tap("linux-bridge"),
            1.5,
            false,
            &format!(
                "best: {best_tap_name}; kvnet-tc / bridge = {}",
                fmt(div(tap("kvnet-tc"), tap("linux-bridge")))
            ),
        ),
        ratio(
            "NAT new TCP connections/s, kvnet-nat / iptables MASQUERADE + conntrack",
            "NAT conn/s",
            med(res, OUT, "kvnet-nat", connrate::METRIC),
            med(res, OUT, "bridge+iptables-masq", connrate::METRIC),
            1.5,
            false,
            &format!(
                "kvnet-nat / nft-masq = {}",
                fmt(div(
                    med(res, OUT, "kvnet-nat", connrate::METRIC),
                    med(res, OUT, "nft-masq", connrate::METRIC)
                ))
            ),
        ),
        ratio(
            "64-byte NAT rate with 1M conntrack entries, run during a GC walk / empty table",
            "1M ct fwd",
            out(&ct),
            out("kvnet-nat"),
            0.95,
            false,
            "guest-to-outside table",
        ),
        Target {
            name: "daemon GC with 1M conntrack entries, long-run share (one walk, paced)",
            short: "GC CPU %",
            value: med(res, OUT, &ct, DAEMON_CPU_LONG_RUN),
            unit: "% of one core",
            bound: 5.0,
            at_most: true,
            detail: format!(
                "during a walk: {} % for {} s; over ping/iperf3/connections after it: {} % (empty table: {} %)",
                fmt(med(res, OUT, &ct, DAEMON_CPU_WALK)),
                fmt(med(res, OUT, &ct, "daemon GC walk, wall time")),
                fmt(med(res, OUT, &ct, DAEMON_CPU_ALL)),
                fmt(med(res, OUT, "kvnet-nat", DAEMON_CPU_ALL))
            ),
        },
    ]
}

fn fmt(v: Option<f64>) -> String {
    v.map(|v| format!("{v:.2}")).unwrap_or("—".into())
}
