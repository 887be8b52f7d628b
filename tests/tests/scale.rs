//! Issue 21: a network of a thousand guests. One broadcast reaches every
//! port of a 1024-port network exactly once, the network takes ports up to
//! the documented maximum (4096 a VLAN) and the next one is refused with a
//! clear error and nothing changed.
use std::{
    collections::BTreeMap,
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use kvnet_tests::{
    eth_frame, inject,
    kvnet::Kvnet,
    lab::{exec, privileged, sh},
    Capture, Lab,
};

/// The flood set's size (kvnet_common::MAX_FLOOD_PORTS).
const MAX_PORTS_PER_VLAN: usize = 4096;

/// Creates veths `s{from}..=s{to}` in the hv namespace whose peers
/// `c{n}` sit in `crowd`, all up, in two `ip -batch` runs; `napi`: see below.
fn add_crowd(
    lab: &Lab,
    crowd: &str,
    (s, c): (&str, &str),
    from: usize,
    to: usize,
    napi: bool,
) -> Result<()> {
    let dir = lab.work_dir();
    let add: String = (from..=to)
        .map(|n| {
            format!(
                "link add {s}{n} type veth peer name {c}{n} netns {crowd}\nlink set {s}{n} up\n"
            )
        })
        .collect();
    let up: String = (from..=to)
        .map(|n| format!("link set {c}{n} up\n"))
        .collect();
    let (fa, fu) = (dir.join("crowd-add.batch"), dir.join("crowd-up.batch"));
    fs::write(&fa, add)?;
    fs::write(&fu, up)?;
    exec(lab.hv(), &["ip", "-batch", &fa.to_string_lossy()])
        .context("creating the crowd's veths")?;
    exec(crowd, &["ip", "-batch", &fu.to_string_lossy()]).context("setting the crowd up")?;
    if napi {
        // Every clone of a flood into a plain veth queues on the sending
        // CPU's backlog, which holds net.core.netdev_max_backlog (1000)
        // frames: the kernel's limit, not kvnet's. With GRO on the far end
        // and TSO off on ours, each veth uses NAPI and a ring of its own,
        // as a tap queues to its own ring.
        sh(
            crowd,
            &format!("for n in $(seq {from} {to}); do ethtool -K {c}$n gro on || exit 1; done"),
        )
        .context("turning GRO on in the crowd")?;
        sh(
            lab.hv(),
            &format!("for n in $(seq {from} {to}); do ethtool -K {s}$n tso off || exit 1; done"),
        )
        .context("turning TSO off on the ports")?;
    }
    Ok(())
}

/// Received packets of every link in `ns`, by name.
fn rx_packets(ns: &str) -> Result<BTreeMap<String, u64>> {
    let out = sh(ns, "ip -s -j link show")?;
    let links: serde_json::Value = serde_json::from_str(&out).context("ip -s -j link")?;
    Ok(links
        .as_array()
        .context("ip -j: not a list")?
        .iter()
        .filter_map(|l| {
            Some((
                l["ifname"].as_str()?.to_string(),
                l["stats64"]["rx"]["packets"].as_u64()?,
            ))
        })
        .collect())
}

/// Waits until each of c1..c1023 received more than `before` counted.
fn wait_for_all_1023(crowd: &str, before: &BTreeMap<String, u64>, what: &str) {
    wait_for(what, Duration::from_secs(10), || {
        let after = rx_packets(crowd).unwrap();
        (1..=1023).all(|n| {
            let c = format!("c{n}");
            after.get(&c).copied().unwrap_or(0) > before.get(&c).copied().unwrap_or(0)
        })
    });
}

fn port_count(k: &Kvnet) -> usize {
    k.json(&["port", "list"])
        .ok()
        .and_then(|v| v.as_array().map(|a| a.len()))
        .unwrap_or(0)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn one_broadcast_reaches_all_1023_other_ports_and_the_port_past_the_maximum_is_refused() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let sender = lab
        .add_ipv4_guests(&[("s0", "10.21.0.1/16")])
        .unwrap()
        .remove(0);
    let crowd = lab.add_netns("crowd").unwrap();
    // Only the test's frames: no IPv6 chatter from a thousand links.
    sh(
        &crowd,
        "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1",
    )
    .unwrap();
    // The hv ends too: their IPv6 chatter would count at the receivers.
    sh(lab.hv(), "sysctl -qw net.ipv6.conf.default.disable_ipv6=1").unwrap();
    add_crowd(&lab, &crowd, ("s", "c"), 1, 1023, true).unwrap();

    let k = Kvnet::start(&lab).unwrap();
    let cfg = lab.work_dir().join("big.toml");
    fs::write(
        &cfg,
        "[networks.big]\nmode = \"host-only\"\ngateway = \"10.21.255.254/16\"\n\n[[rules]]\nmatch = \"s*\"\nnet = \"big\"\n",
    )
    .unwrap();
    let t0 = Instant::now();
    k.cli(&["apply", &cfg.to_string_lossy()]).unwrap();
    println!("apply of 1024 ports: {:?}", t0.elapsed());
    // 1024 guests and the gateway's port.
    assert_eq!(port_count(&k), 1025);

    // Two broadcasts, one after the other: each reaches every other port
    // exactly once (none twice, none back to the sender).
    for round in 0..2 {
        let before = rx_packets(&crowd).unwrap();
        let frame = eth_frame([0xff; 6], sender.mac, 0x88b5, b"kvnet: one to a thousand");
        inject(&sender.ns, "eth0", &[frame]).unwrap();
        let short = |after: &BTreeMap<String, u64>| -> Vec<String> {
            (1..=1023)
                .map(|n| format!("c{n}"))
                .filter(|c| {
                    after.get(c).copied().unwrap_or(0) < before.get(c).copied().unwrap_or(0) + 1
                })
                .collect()
        };
        let t0 = Instant::now();
        let mut after = rx_packets(&crowd).unwrap();
        while !short(&after).is_empty() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "broadcast {round} missed {:?}",
                short(&after)
            );
            std::thread::sleep(Duration::from_millis(100));
            after = rx_packets(&crowd).unwrap();
        }
        for n in 1..=1023 {
            let c = format!("c{n}");
            assert_eq!(after[&c] - before[&c], 1, "{c}: broadcast {round} once");
        }
    }
    let s0 = k.port_stats("s0").unwrap();
    assert_eq!(s0["flooded"].as_u64(), Some(2), "{s0}");
    assert_eq!(s0["drops"]["storm"].as_u64(), Some(0), "{s0}");

    // ARP for a known address (the gateway's) is answered by kvnet and
    // reaches none of the 1023; one for an unknown address reaches them
    // all (the positive control, after it).
    let arp = |tpa: [u8; 4]| {
        let mut a = vec![0, 1, 8, 0, 6, 4, 0, 1];
        a.extend_from_slice(&sender.mac);
        a.extend_from_slice(&[10, 21, 0, 1]);
        a.extend_from_slice(&[0; 6]);
        a.extend_from_slice(&tpa);
        eth_frame([0xff; 6], sender.mac, 0x0806, &a)
    };
    let before = rx_packets(&crowd).unwrap();
    let cap = Capture::start(&sender.ns, "eth0").unwrap();
    inject(&sender.ns, "eth0", &[arp([10, 21, 255, 254])]).unwrap();
    let frames = cap
        .stop_when("the ARP reply", Duration::from_secs(5), |f| {
            f.iter()
                .any(|f| f.ethertype() == 0x0806 && f.payload().get(6..8) == Some(&[0, 2][..]))
        })
        .unwrap();
    assert!(
        frames
            .iter()
            .any(|f| f.ethertype() == 0x0806 && f.payload().get(6..8) == Some(&[0, 2][..])),
        "no ARP reply for the gateway"
    );
    inject(&sender.ns, "eth0", &[arp([10, 21, 9, 9])]).unwrap();
    wait_for_all_1023(&crowd, &before, "the unknown ARP at all 1023");
    let after = rx_packets(&crowd).unwrap();
    for n in 1..=1023 {
        let c = format!("c{n}");
        assert_eq!(
            after[&c] - before[&c],
            1,
            "{c}: the known ARP was flooded to it"
        );
    }
    assert_eq!(
        k.port_stats("s0").unwrap()["arp_answered"].as_u64(),
        Some(1)
    );

    // Up to the maximum, in one apply of a second rule. (The gateway's
    // port is the 4096th.)
    add_crowd(
        &lab,
        &crowd,
        ("t", "u"),
        1024,
        MAX_PORTS_PER_VLAN - 2,
        false,
    )
    .unwrap();
    fs::write(
        &cfg,
        "[networks.big]\nmode = \"host-only\"\ngateway = \"10.21.255.254/16\"\n\n\
         [[rules]]\nmatch = \"s*\"\nnet = \"big\"\n\n[[rules]]\nmatch = \"t*\"\nnet = \"big\"\n",
    )
    .unwrap();
    let t0 = Instant::now();
    k.cli(&["apply", &cfg.to_string_lossy()]).unwrap();
    println!("apply of 3071 more ports: {:?}", t0.elapsed());
    assert_eq!(port_count(&k), MAX_PORTS_PER_VLAN);
    // One more, by hand (a name the rule does not match).
    exec(
        lab.hv(),
        &[
            "ip", "link", "add", "x4097", "type", "veth", "peer", "name", "y4097",
        ],
    )
    .unwrap();
    let err = k.cli_err(&["port", "add", "big", "x4097"]).unwrap();
    assert!(
        err.contains("VLAN 0 of network 'big' already has the maximum of 4096 ports"),
        "{err}"
    );
    assert_eq!(port_count(&k), MAX_PORTS_PER_VLAN, "nothing added");
    let filters = sh(lab.hv(), "tc filter show dev x4097 ingress").unwrap();
    assert!(filters.trim().is_empty(), "a filter was left: {filters}");
    // The full network still floods: a last broadcast reaches the first
    // 1023 (on NAPI: the others' clones overrun the kernel's backlog).
    let before = rx_packets(&crowd).unwrap();
    let frame = eth_frame([0xff; 6], sender.mac, 0x88b5, b"kvnet: still flooding");
    inject(&sender.ns, "eth0", &[frame]).unwrap();
    wait_for_all_1023(&crowd, &before, "the last broadcast at c1..c1023");
}
