//! target/bench/bench.png: the L2 figures side by side, one panel per
//! metric; below them guest-to-outside, VLAN and the rewriting-path costs.

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use plotters::style::FontStyle;

use super::taps::{TAP, TAP_CONFIGS, TAP_METRIC};
use super::{
    connrate, median, targets, trafgen, Results, CT_SCALE, L2, L2_CONFIGS, OUT, OUT_CONFIGS, VLAN,
    VLAN_CONFIGS,
};

const FONT: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";
const COLORS: [RGBColor; 4] = [
    RGBColor(120, 120, 120),
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

pub fn draw(res: &Results, path: &Path) -> Result<()> {
    let bytes =
        std::fs::read(FONT).map_err(|e| anyhow!("{FONT}: {e} (install fonts-dejavu-core)"))?;
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
        .map_err(|_| anyhow!("{FONT}: not a usable font"))?;

    let mut panels: Vec<(String, Vec<f64>)> = Vec::new();
    for (metric, title) in [
        ("64-byte frames", "64-byte frames, Mpps"),
        ("TCP bulk, 1 stream", "TCP 1 stream, Gbit/s"),
        ("TCP bulk, 4 streams", "TCP 4 streams, Gbit/s"),
        (
            "RR latency p50 (ping)",
            "ping RTT p50, µs (lower is better)",
        ),
    ] {
        let vals = L2_CONFIGS
            .iter()
            .map(|c| {
                res.get(L2, c, metric)
                    .and_then(|s| median(&s.values))
                    .unwrap_or(0.0)
            })
            .collect();
        panels.push((title.to_string(), vals));
    }
    let cost: Vec<f64> = [
        ("unicast", "bench_redirect"),
        ("unicast", "kvnet_tc"),
        ("unicast", "kvnet_xdp"),
    ]
    .iter()
    .map(|(p, g)| {
        res.cost["rows"]
            .as_array()
            .and_then(|rows| {
                rows.iter()
                    .find(|r| r["path"] == *p && r["prog"] == *g)
                    .and_then(|r| {
                        let v: Vec<f64> = r["ns"]
                            .as_array()?
                            .iter()
                            .filter_map(|x| x.as_f64())
                            .collect();
                        median(&v)
                    })
            })
            .unwrap_or(0.0)
    })
    .collect();

    let root = BitMapBackend::new(path, (1500, 1450)).into_drawing_area();
    root.fill(&WHITE)?;
    let (top, body) = root.split_vertically(50);
    top.titled(
        &format!(
            "kvnet vs Linux (kernel {}, {} cores {}); top: L2 guest-to-guest",
            res.machine.get("kernel").cloned().unwrap_or_default(),
            res.machine.get("cores").cloned().unwrap_or_default(),
            res.machine.get("cpu").cloned().unwrap_or_default()
        ),
        ("sans-serif", 22),
    )?;
    let (row1, rest) = body.split_vertically(470);
    let (row2, row3_area) = rest.split_vertically(470);
    let areas = row1.split_evenly((1, panels.len() + 1));
    let mut all = panels.clone();
    all.push(("per-packet cost, ns (lower is better)".into(), cost));
    for (i, (title, vals)) in all.iter().enumerate() {
        let labels: Vec<&str> = if i < panels.len() {
            vec!["bridge", "kvnet tc", "kvnet xdp", "limit"]
        } else {
            vec!["limit", "kvnet tc", "kvnet xdp"]
        };
        let colors: Vec<RGBColor> = if i < panels.len() {
            COLORS.to_vec()
        } else {
            vec![COLORS[3], COLORS[1], COLORS[2]]
        };
        let labels: Vec<String> = labels.iter().map(|s| s.to_string()).collect();
        bars(&areas[i], title, &labels, vals, &colors, None)?;
    }
    // Second row: guest-to-outside, VLAN, rewriting paths.
    let med = |sc: &str, c: &str, m: &str| {
        res.get(sc, c, m)
            .and_then(|s| median(&s.values))
            .unwrap_or(0.0)
    };
    let out_labels = [
        "routed",
        "ipt-masq",
        "nft-masq",
        "nft+ft",
        "kv routed",
        "kv nat",
    ];
    let mut row: Vec<(String, Vec<String>, Vec<f64>)> = vec![
        (
            "guest→outside TCP 1 stream, Gbit/s".into(),
            out_labels.iter().map(|s| s.to_string()).collect(),
            OUT_CONFIGS
                .iter()
                .map(|c| med(OUT, c, "TCP bulk, 1 stream"))
                .collect(),
        ),
        (
            "access→trunk VLAN TCP 1 stream, Gbit/s".into(),
            vec!["bridge".into(), "kvnet tc".into(), "kvnet xdp".into()],
            VLAN_CONFIGS
                .iter()
                .map(|c| med(VLAN, c, "TCP bulk, 1 stream"))
                .collect(),
        ),
    ];
    let prow = |path: &str, prog: &str| -> f64 {
        res.cost["paths"]["rows"]
            .as_array()
            .and_then(|rows| rows.iter().find(|r| r["path"] == path && r["prog"] == prog))
            .and_then(|r| r["ns"]["p50"].as_f64())
            .unwrap_or(0.0)
    };
    row.push((
        "one-packet cost p50, ns (lower is better)".into(),
        [
            "limit", "unicast", "push", "pop", "routed", "nat est", "reply", "nat new",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        vec![
            prow("unicast", "bench_redirect"),
            prow("unicast", "kvnet_tc"),
            prow("vlan-push", "kvnet_tc"),
            prow("vlan-pop", "kvnet_tc"),
            prow("routed", "kvnet_tc"),
            prow("nat-established", "kvnet_tc"),
            prow("nat-reply", "kvnet_tc"),
            prow("nat-new", "kvnet_tc"),
        ],
    ));
    let areas2 = row2.split_evenly((1, row.len()));
    for (i, (title, labels, vals)) in row.iter().enumerate() {
        // Bars of kvnet in blue, the kernel's (and the limit) in grey.
        let colors: Vec<RGBColor> = (0..vals.len())
            .map(|j| kv_color(labels[j].starts_with("kv") || (i > 0 && j > 0)))
            .collect();
        bars(&areas2[i], title, labels, vals, &colors, None)?;
    }
    // Third row: 64-byte rates through the host-stack peers, taps, new
    // connections, and the kvnet / kernel-peer ratios against the targets.
    let ct = format!("kvnet-nat, +{}M conntrack", CT_SCALE / 1_000_000);
    let out_cfgs: Vec<String> = OUT_CONFIGS
        .iter()
        .map(|c| c.to_string())
        .chain([ct])
        .collect();
    let out_labels3: Vec<String> = out_labels
        .iter()
        .map(|s| s.to_string())
        .chain(["kv +1M ct".to_string()])
        .collect();
    let kv_out: Vec<bool> = out_labels3.iter().map(|l| l.starts_with("kv")).collect();
    let ratios: Vec<targets::Target> = targets::targets(res)
        .into_iter()
        .filter(|t| t.unit == "x" && !t.at_most)
        .collect();
    let row3: Vec<(String, Vec<String>, Vec<f64>, Vec<bool>, Option<Vec<f64>>)> = vec![
        (
            "guest→outside 64-byte frames (trafgen), Mpps".into(),
            out_labels3.clone(),
            out_cfgs
                .iter()
                .map(|c| med(OUT, c, trafgen::METRIC))
                .collect(),
            kv_out.clone(),
            None,
        ),
        (
            "taps: writer → reader, 64-byte Mpps".into(),
            vec!["bridge".into(), "kvnet tc".into(), "kvnet xdp".into()],
            TAP_CONFIGS
                .iter()
                .map(|c| med(TAP, c, TAP_METRIC))
                .collect(),
            vec![false, true, true],
            None,
        ),
        (
            "new TCP connections/s through the gateway".into(),
            out_labels3,
            out_cfgs
                .iter()
                .map(|c| med(OUT, c, connrate::METRIC))
                .collect(),
            kv_out,
            None,
        ),
        (
            "kvnet / kernel peer (red: target)".into(),
            ratios.iter().map(|t| t.short.to_string()).collect(),
            ratios.iter().map(|t| t.value.unwrap_or(0.0)).collect(),
            vec![true; ratios.len()],
            Some(ratios.iter().map(|t| t.bound).collect()),
        ),
    ];
    let areas3 = row3_area.split_evenly((1, row3.len()));
    for (i, (title, labels, vals, kv, marks)) in row3.iter().enumerate() {
        let colors: Vec<RGBColor> = kv.iter().map(|k| kv_color(*k)).collect();
        bars(&areas3[i], title, labels, vals, &colors, marks.as_deref())?;
    }
    root.present()?;
    Ok(())
}

/// kvnet's bars blue, the kernel's grey.
fn kv_color(kv: bool) -> RGBColor {
    if kv {
        COLORS[1]
    } else {
        COLORS[0]
    }
}

/// One bar panel, a color per bar; `marks` draws a red line per bar (a
/// target).
fn bars(
    area: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    title: &str,
    labels: &[String],
    vals: &[f64],
    colors: &[RGBColor],
    marks: Option<&[f64]>,
) -> Result<()> {
    let top = marks
        .into_iter()
        .flatten()
        .chain(vals)
        .cloned()
        .fold(0.0, f64::max);
    let max = top.max(1e-9) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0..vals.len() as i32, 0f64..max)?;
    let l = labels.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(vals.len() + 1)
        .x_label_formatter(&move |x| l.get(*x as usize).cloned().unwrap_or_default())
        .label_style(("sans-serif", 11))
        .draw()?;
    chart.draw_series(vals.iter().enumerate().map(|(j, v)| {
        let c = colors.get(j).copied().unwrap_or(COLORS[0]);
        Rectangle::new([(j as i32, 0.0), (j as i32 + 1, *v)], c.filled())
    }))?;
    if let Some(m) = marks {
        chart.draw_series(m.iter().enumerate().map(|(j, b)| {
            PathElement::new(
                vec![(j as i32, *b), (j as i32 + 1, *b)],
                COLORS[3].stroke_width(3),
            )
        }))?;
    }
    chart.draw_series(vals.iter().enumerate().map(|(j, v)| {
        Text::new(
            if *v >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            },
            (j as i32, *v + max * 0.02),
            ("sans-serif", 11),
        )
    }))?;
    Ok(())
}
