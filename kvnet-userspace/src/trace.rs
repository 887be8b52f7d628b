//! `kvnet trace`: sets the datapath's trace filter (pinned map
//! `trace_cfg`), prints the events from the pinned ring buffer `trace`,
//! and turns tracing off again when done or interrupted. Needs root and
//! the daemon's pin folder, not the daemon.
use std::{
    net::Ipv4Addr,
    path::Path,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, Map, MapData, RingBuf};
use kvnet_common::{
    names, TraceEvent, TraceFilter, DROP_REASON_NAMES, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP,
    TRACE_ACTION_NAMES, TRACE_HOOK_NAMES,
};
use serde_json::json;

pub struct Args {
    pub port: Option<String>,
    pub mac: Option<String>,
    pub ip: Option<Ipv4Addr>,
    pub proto: Option<String>,
    pub count: Option<u64>,
    pub json: bool,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn ifindex(name: &str) -> Result<u32> {
    if let Ok(i) = name.parse::<u32>() {
        return Ok(i);
    }
    let c = std::ffi::CString::new(name)?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!(
            "no interface {name} here (run in the daemon's network namespace, or pass the ifindex)"
        ),
        i => Ok(i),
    }
}

fn ifname(index: u32) -> Option<String> {
    if index == 0 {
        return None;
    }
    crate::netdev::name_of(index)
}

pub fn proto_number(p: &str) -> Result<u8> {
    Ok(match p.to_ascii_lowercase().as_str() {
        "tcp" => IPPROTO_TCP,
        "udp" => IPPROTO_UDP,
        "icmp" => IPPROTO_ICMP,
        o => bail!("--proto {o}: expected tcp, udp or icmp"),
    })
}

use crate::control::proto_name;

/// The filter `args` ask for, enabled.
pub fn filter(args: &Args) -> Result<TraceFilter> {
    let mut f = TraceFilter {
        enabled: 1,
        ..Default::default()
    };
    if let Some(p) = &args.port {
        f.ifindex = ifindex(p)?;
    }
    if let Some(ip) = args.ip {
        f.ip = u32::from_ne_bytes(ip.octets());
    }
    if let Some(p) = &args.proto {
        f.proto = proto_number(p)?;
    }
    if let Some(m) = &args.mac {
        f.mac = m.parse::<crate::mac::Mac>()?.0;
        f.has_mac = 1;
    }
    Ok(f)
}

fn open(pin_dir: &Path, name: &str) -> Result<MapData> {
    let path = pin_dir.join(name);
    MapData::from_pin(&path).with_context(|| {
        format!(
            "opening {} (is the daemon running with this --pin-dir, and are you root?)",
            path.display()
        )
    })
}

fn set(cfg: &mut Array<MapData, TraceFilter>, f: TraceFilter) -> Result<()> {
    cfg.set(0, f, 0).context("writing trace_cfg")
}

pub fn run(pin_dir: &Path, args: Args) -> Result<()> {
    let f = filter(&args)?;
    let mut cfg: Array<MapData, TraceFilter> =
        Array::try_from(Map::Array(open(pin_dir, names::MAP_TRACE_CFG)?))?;
    let mut ring = RingBuf::try_from(Map::RingBuf(open(pin_dir, names::MAP_TRACE)?))?;
    // Whatever an earlier trace left behind is not ours.
    while ring.next().is_some() {}
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGPIPE, on_signal as *const () as libc::sighandler_t);
    }
    set(&mut cfg, f)?;
    let r = stream(&mut ring, &args);
    let off = set(&mut cfg, TraceFilter::default());
    r.and(off)
}

fn stream(ring: &mut RingBuf<MapData>, args: &Args) -> Result<()> {
    use std::io::Write;
    let mut seen = 0u64;
    let out = std::io::stdout();
    while !STOP.load(Ordering::SeqCst) {
        let mut got = false;
        while let Some(item) = ring.next() {
            got = true;
            if item.len() < std::mem::size_of::<TraceEvent>() {
                continue;
            }
            let ev: TraceEvent =
                bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<TraceEvent>()]);
            drop(item);
            let line = if args.json {
                to_json(&ev).to_string()
            } else {
                to_line(&ev)
            };
            let mut o = out.lock();
            if writeln!(o, "{line}").and_then(|_| o.flush()).is_err() {
                return Ok(());
            }
            seen += 1;
            if args.count.is_some_and(|c| seen >= c) {
                return Ok(());
            }
        }
        if !got {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    Ok(())
}

fn action(ev: &TraceEvent) -> &'static str {
    TRACE_ACTION_NAMES
        .get(ev.action as usize)
        .copied()
        .unwrap_or("?")
}

fn hook(ev: &TraceEvent) -> &'static str {
    TRACE_HOOK_NAMES
        .get(ev.hook as usize)
        .copied()
        .unwrap_or("?")
}

fn reason(ev: &TraceEvent) -> Option<&'static str> {
    (ev.reason != 0)
        .then(|| DROP_REASON_NAMES.get(ev.reason as usize - 1).copied())
        .flatten()
}

/// tc verdicts: TC_ACT_OK 0, SHOT 2, REDIRECT 7; XDP: DROP 1, PASS 2, REDIRECT 4.
fn verdict(ev: &TraceEvent) -> String {
    let s = if ev.hook == kvnet_common::TRACE_HOOK_XDP {
        match ev.rc {
            1 => "drop",
            2 => "pass",
            3 => "tx",
            4 => "redirect",
            _ => "",
        }
    } else {
        match ev.rc {
            0 => "ok",
            2 => "shot",
            7 => "redirect",
            _ => "",
        }
    };
    if s.is_empty() {
        ev.rc.to_string()
    } else {
        s.to_string()
    }
}

fn ip(a: u32) -> String {
    Ipv4Addr::from(a.to_ne_bytes()).to_string()
}

fn mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn port_name(i: u32) -> String {
    ifname(i).unwrap_or_else(|| if i == 0 { "-".into() } else { format!("if{i}") })
}

fn tuple_str(k: &kvnet_common::CtKey) -> String {
    if k.proto == 0 && k.saddr == 0 {
        return "-".into();
    }
    match k.proto {
        IPPROTO_TCP | IPPROTO_UDP => {
            format!("{}:{} > {}:{}", ip(k.saddr), k.sport, ip(k.daddr), k.dport)
        }
        IPPROTO_ICMP => format!(
            "{} > {} type {} id {}",
            ip(k.saddr),
            ip(k.daddr),
            k.sport,
            k.dport
        ),
        _ => format!("{} > {}", ip(k.saddr), ip(k.daddr)),
    }
}

fn to_line(ev: &TraceEvent) -> String {
    let mut s = format!(
        "{}.{:06} {:<6} {} > {} vid {} {} {} len {} {} > {} {}",
        ev.ts_ns / 1_000_000_000,
        ev.ts_ns % 1_000_000_000 / 1000,
        hook(ev),
        port_name(ev.ingress),
        port_name(ev.egress),
        ev.vid,
        action(ev),
        verdict(ev),
        ev.len,
        mac(&ev.src_mac),
        mac(&ev.dst_mac),
        proto_name(ev.before.proto),
    );
    if let Some(r) = reason(ev) {
        s.push_str(&format!(" reason {r}"));
    }
    s.push(' ');
    s.push_str(&tuple_str(&ev.before));
    if ev.after != ev.before {
        s.push_str(" => ");
        s.push_str(&tuple_str(&ev.after));
    }
    s
}

fn tuple_json(k: &kvnet_common::CtKey) -> serde_json::Value {
    json!({
        "saddr": ip(k.saddr),
        "daddr": ip(k.daddr),
        "sport": k.sport,
        "dport": k.dport,
    })
}

pub fn to_json(ev: &TraceEvent) -> serde_json::Value {
    json!({
        "ts_ns": ev.ts_ns,
        "hook": hook(ev),
        "ingress": ifname(ev.ingress),
        "ingress_ifindex": ev.ingress,
        "egress": ifname(ev.egress),
        "egress_ifindex": ev.egress,
        "vid": ev.vid,
        "action": action(ev),
        "verdict": verdict(ev),
        "reason": reason(ev),
        "len": ev.len,
        "src_mac": mac(&ev.src_mac),
        "dst_mac": mac(&ev.dst_mac),
        "proto": proto_name(ev.before.proto),
        "before": tuple_json(&ev.before),
        "after": tuple_json(&ev.after),
        "translated": ev.before != ev.after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_and_lines() {
        let a = Args {
            port: Some("7".into()),
            mac: Some("52:54:00:00:00:01".into()),
            ip: Some("10.50.0.11".parse().unwrap()),
            proto: Some("icmp".into()),
            count: None,
            json: false,
        };
        let f = filter(&a).unwrap();
        assert_eq!(f.enabled, 1);
        assert_eq!(f.ifindex, 7);
        assert_eq!(f.ip.to_ne_bytes(), [10, 50, 0, 11]);
        assert_eq!(f.proto, IPPROTO_ICMP);
        assert_eq!((f.has_mac, f.mac), (1, [0x52, 0x54, 0, 0, 0, 1]));
        assert!(proto_number("sctp").is_err());
        let mut ev = TraceEvent {
            hook: kvnet_common::TRACE_HOOK_TC,
            action: kvnet_common::TRACE_NAT_OUT,
            rc: 7,
            ..Default::default()
        };
        ev.before.proto = IPPROTO_ICMP;
        ev.before.saddr = u32::from_ne_bytes([10, 50, 0, 11]);
        ev.before.daddr = u32::from_ne_bytes([198, 51, 100, 2]);
        ev.before.sport = 8;
        ev.after = ev.before;
        ev.after.saddr = u32::from_ne_bytes([198, 51, 100, 1]);
        let l = to_line(&ev);
        assert!(l.contains("nat_out redirect"), "{l}");
        assert!(
            l.contains("10.50.0.11 > 198.51.100.2 type 8 id 0 => 198.51.100.1 > 198.51.100.2"),
            "{l}"
        );
        let j = to_json(&ev);
        assert_eq!(j["after"]["saddr"], "198.51.100.1");
        assert_eq!(j["translated"], true);
    }
}
