//! The real datapath object run through BPF_PROG_RUN: verdicts, learning
//! and counters for each decision, without any network. Needs root (they
//! are skipped, loudly, without it).
use std::sync::atomic::{AtomicU32, Ordering};

use kvnet_common::*;

use super::Datapath;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_REDIRECT: u32 = 4;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;
/// Programs see test frames arrive on lo.
const LO: u32 = 1;
const NET: u32 = 7;

struct Fixture {
    dp: Datapath,
}

fn fixture() -> Option<Fixture> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: BPF_PROG_RUN datapath tests need root");
        return None;
    }
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = format!(
        "/sys/fs/bpf/kvnet-ut-p{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    );
    let dp = Datapath::load(std::path::Path::new(&dir), false).expect("load datapath");
    let mut f = Fixture { dp };
    f.port(LO, 0);
    let mut set = FloodSet::default();
    set.count = 1;
    set.ifindex[0] = LO;
    f.dp.flood()
        .unwrap()
        .insert(
            FloodKey {
                net_id: NET,
                vid: 0,
                _pad: 0,
            },
            set,
            0,
        )
        .unwrap();
    Some(f)
}

impl Fixture {
    fn port(&mut self, ifindex: u32, flags: u32) {
        self.dp.reset_stats(ifindex).unwrap();
        self.dp
            .ports()
            .unwrap()
            .insert(
                ifindex,
                PortConfig {
                    net_id: NET,
                    flags,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
    }
    fn fdb(&mut self, mac: [u8; 6], ifindex: u32, flags: u32) {
        let key = FdbKey {
            net_id: NET,
            vid: 0,
            mac,
        };
        self.dp
            .fdb()
            .unwrap()
            .insert(
                key,
                FdbEntry {
                    ifindex,
                    flags,
                    last_seen_ns: 0,
                },
                0,
            )
            .unwrap();
    }
    fn fdb_get(&mut self, mac: [u8; 6]) -> Option<FdbEntry> {
        self.dp
            .fdb()
            .unwrap()
            .get(
                &FdbKey {
                    net_id: NET,
                    vid: 0,
                    mac,
                },
                0,
            )
            .ok()
    }
}

const A: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xa];
const B: [u8; 6] = [0x52, 0x54, 0, 0, 0, 0xb];
const BCAST: [u8; 6] = [0xff; 6];

fn csum(data: &[u8], mut sum: u32) -> u16 {
    for c in data.chunks(2) {
        sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Ethernet + IPv4 + UDP; `good_l4` false leaves the pseudo-header-only sum
/// a sender with checksum offload hands over.
fn udp_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8], good_l4: bool) -> Vec<u8> {
    let (sip, dip) = ([10, 0, 0, 1], [10, 0, 0, 2]);
    let udp_len = 8 + payload.len();
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let ipsum = csum(&ip, 0);
    ip[10..12].copy_from_slice(&ipsum.to_be_bytes());
    let mut udp = vec![0x30, 0x39, 0x00, 0x35];
    udp.extend_from_slice(&(udp_len as u16).to_be_bytes());
    udp.extend_from_slice(&[0, 0]);
    udp.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&sip);
    pseudo.extend_from_slice(&dip);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&(udp_len as u16).to_be_bytes());
    let full = csum(&[pseudo.clone(), udp.clone()].concat(), 0);
    let partial = !csum(&pseudo, 0);
    udp[6..8].copy_from_slice(&if good_l4 { full } else { partial }.to_be_bytes());
    let mut f = Vec::new();
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend(ip);
    f.extend(udp);
    f
}

#[test]
fn unknown_unicast_learns_the_source_and_floods() {
    let Some(mut f) = fixture() else { return };
    let r =
        f.dp.run_xdp(&udp_frame(B, A, b"hello", true), LO, 1)
            .unwrap();
    assert_eq!(r.verdict, XDP_PASS, "XDP hands floods to tc");
    let e = f.fdb_get(A).expect("source MAC learned");
    assert_eq!(e.ifindex, LO);
    assert_eq!(e.flags & FDB_F_STATIC, 0);
    // tc floods by clone-redirect; with lo the only member nothing is sent.
    let r = f.dp.run_tc(&udp_frame(BCAST, A, b"x", true), 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(f.dp.stats(LO).unwrap().flooded, 1);
}

#[test]
fn known_unicast_is_redirected_where_xdp_may_send() {
    let Some(mut f) = fixture() else { return };
    f.port(1000, PORT_F_XDP_TX);
    f.fdb(B, 1000, 0);
    let frame = udp_frame(B, A, b"payload!", true);
    let r = f.dp.run_xdp(&frame, LO, 1).unwrap();
    assert_eq!(r.verdict, XDP_REDIRECT);
    assert_eq!(r.frame, frame, "L2 forwarding leaves the frame alone");
    let tx = f.dp.stats(1000).unwrap();
    assert_eq!((tx.tx_packets, tx.tx_bytes), (1, frame.len() as u64));
    assert_eq!(f.dp.run_tc(&frame, 1).unwrap().verdict, TC_ACT_REDIRECT);
}

#[test]
fn xdp_leaves_veth_targets_and_offloaded_checksums_to_tc() {
    let Some(mut f) = fixture() else { return };
    f.port(1001, 0); // a veth: no PORT_F_XDP_TX
    f.port(1002, PORT_F_XDP_TX);
    f.fdb(B, 1001, 0);
    assert_eq!(
        f.dp.run_xdp(&udp_frame(B, A, b"v", true), LO, 1)
            .unwrap()
            .verdict,
        XDP_PASS
    );
    let c = [0x52, 0x54, 0, 0, 0, 0xc];
    f.fdb(c, 1002, 0);
    // Odd and even payload lengths exercise the trailing-byte path.
    for payload in [&b"even"[..], b"odd", &[7u8; 1400]] {
        assert_eq!(
            f.dp.run_xdp(&udp_frame(c, A, payload, true), LO, 1)
                .unwrap()
                .verdict,
            XDP_REDIRECT
        );
        assert_eq!(
            f.dp.run_xdp(&udp_frame(c, A, payload, false), LO, 1)
                .unwrap()
                .verdict,
            XDP_PASS
        );
    }
}

#[test]
fn bad_source_and_hairpin_are_dropped_and_counted() {
    let Some(mut f) = fixture() else { return };
    let r =
        f.dp.run_xdp(&udp_frame(B, BCAST, b"x", true), LO, 1)
            .unwrap();
    assert_eq!(r.verdict, XDP_DROP);
    f.fdb(B, LO, 0);
    assert_eq!(
        f.dp.run_xdp(&udp_frame(B, A, b"x", true), LO, 1)
            .unwrap()
            .verdict,
        XDP_DROP
    );
    let s = f.dp.stats(LO).unwrap();
    assert_eq!(s.drops[DropReason::BadSrcMac as usize], 1);
    assert_eq!(s.drops[DropReason::Hairpin as usize], 1);
}

#[test]
fn hairpin_port_sends_back_out() {
    let Some(mut f) = fixture() else { return };
    f.port(LO, PORT_F_HAIRPIN);
    f.fdb(B, LO, 0);
    assert_eq!(
        f.dp.run_tc(&udp_frame(B, A, b"x", true), 1)
            .unwrap()
            .verdict,
        TC_ACT_REDIRECT
    );
}

#[test]
fn static_entries_survive_learning_and_moves_relearn_at_once() {
    let Some(mut f) = fixture() else { return };
    f.port(1000, 0);
    f.fdb(A, 1000, FDB_F_STATIC);
    f.dp.run_xdp(&udp_frame(B, A, b"x", true), LO, 1).unwrap();
    assert_eq!(f.fdb_get(A).unwrap().ifindex, 1000, "static entry kept");
    // A learned entry on another port moves with the guest.
    f.fdb(B, 1000, 0);
    f.dp.run_tc(&udp_frame(A, B, b"x", true), 1).unwrap();
    assert_eq!(
        f.fdb_get(B).unwrap().ifindex,
        LO,
        "MAC re-learned on its new port"
    );
}

#[test]
fn other_networks_are_never_a_target() {
    let Some(mut f) = fixture() else { return };
    f.dp.reset_stats(1003).unwrap();
    f.dp.ports()
        .unwrap()
        .insert(
            1003,
            PortConfig {
                net_id: NET + 1,
                flags: PORT_F_XDP_TX,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    f.fdb(B, 1003, 0);
    assert_eq!(
        f.dp.run_tc(&udp_frame(B, A, b"x", true), 1)
            .unwrap()
            .verdict,
        TC_ACT_SHOT
    );
    assert_eq!(
        f.dp.stats(LO).unwrap().drops[DropReason::StalePort as usize],
        1
    );
}
