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
    /// A port without VLAN config (untagged member of VLAN 0).
    fn port(&mut self, ifindex: u32, flags: u32) {
        self.vlan_port(ifindex, flags, VLAN_MODE_NONE, 0, &[(0, false)]);
    }
    /// A port with VLAN mode `mode`, untagged frames in `pvid` and these
    /// (vid, tagged) memberships.
    fn vlan_port(
        &mut self,
        ifindex: u32,
        flags: u32,
        mode: u16,
        pvid: u16,
        members: &[(u16, bool)],
    ) {
        self.dp.reset_stats(ifindex).unwrap();
        self.dp
            .ports()
            .unwrap()
            .insert(
                ifindex,
                PortConfig {
                    net_id: NET,
                    flags,
                    vlan_mode: mode,
                    pvid,
                    native_vid: if mode == VLAN_MODE_TRUNK { pvid } else { 0 },
                    _pad: 0,
                },
                0,
            )
            .unwrap();
        let mut m = self.dp.vlan_members().unwrap();
        for &(vid, tagged) in members {
            m.insert(
                VlanMemberKey {
                    ifindex,
                    vid,
                    _pad: 0,
                },
                VlanMember {
                    flags: if tagged { VLAN_M_TAGGED } else { 0 },
                },
                0,
            )
            .unwrap();
        }
    }
    fn fdb(&mut self, mac: [u8; 6], ifindex: u32, flags: u32) {
        self.fdb_vlan(mac, 0, ifindex, flags);
    }
    fn fdb_vlan(&mut self, mac: [u8; 6], vid: u16, ifindex: u32, flags: u32) {
        let key = FdbKey {
            net_id: NET,
            vid,
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
        self.fdb_get_vlan(mac, 0)
    }
    fn fdb_get_vlan(&mut self, mac: [u8; 6], vid: u16) -> Option<FdbEntry> {
        self.dp
            .fdb()
            .unwrap()
            .get(
                &FdbKey {
                    net_id: NET,
                    vid,
                    mac,
                },
                0,
            )
            .ok()
    }
    fn drops(&mut self, ifindex: u32, r: DropReason) -> u64 {
        self.dp.stats(ifindex).unwrap().drops[r as usize]
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

// ---- VLANs -------------------------------------------------------------

const TRUNK: u32 = 1010;
const ACCESS10: u32 = 1011;

/// `frame` with an 802.1Q (or other TPID) tag inserted after the MACs.
fn tagged(frame: &[u8], tpid: u16, tci: u16) -> Vec<u8> {
    let mut f = frame[..12].to_vec();
    f.extend_from_slice(&tpid.to_be_bytes());
    f.extend_from_slice(&tci.to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    f
}

/// lo as an access port of VLAN 10, TRUNK (tagged 10, 20; XDP may send)
/// and ACCESS10 (XDP may send).
fn vlan_fixture(lo_mode: u16, lo_pvid: u16, lo_members: &[(u16, bool)]) -> Option<Fixture> {
    let mut f = fixture()?;
    f.vlan_port(LO, 0, lo_mode, lo_pvid, lo_members);
    f.vlan_port(
        TRUNK,
        PORT_F_XDP_TX,
        VLAN_MODE_TRUNK,
        0,
        &[(10, true), (20, true)],
    );
    f.vlan_port(
        ACCESS10,
        PORT_F_XDP_TX,
        VLAN_MODE_ACCESS,
        10,
        &[(10, false)],
    );
    Some(f)
}

#[test]
fn access_ingress_learns_in_its_vlan_and_xdp_pushes_the_tag_to_a_trunk() {
    let Some(mut f) = vlan_fixture(VLAN_MODE_ACCESS, 10, &[(10, false)]) else {
        return;
    };
    f.fdb_vlan(B, 10, TRUNK, 0);
    let frame = udp_frame(B, A, b"to-trunk", true);
    let r = f.dp.run_xdp(&frame, LO, 1).unwrap();
    assert_eq!(r.verdict, XDP_REDIRECT);
    assert_eq!(r.frame, tagged(&frame, 0x8100, 10), "tag 10 pushed, PCP 0");
    assert_eq!(
        f.fdb_get_vlan(A, 10).unwrap().ifindex,
        LO,
        "learned in VLAN 10"
    );
    assert!(f.fdb_get(A).is_none(), "not in VLAN 0");
    // The same in tc: redirected (the tag rides in skb->vlan_tci, which
    // BPF_PROG_RUN does not return; the lab tests see it on the wire).
    assert_eq!(f.dp.run_tc(&frame, 1).unwrap().verdict, TC_ACT_REDIRECT);
    // A priority-tagged frame (VID 0) on an access port counts as untagged.
    let r =
        f.dp.run_xdp(&tagged(&frame, 0x8100, 0xa000), LO, 1)
            .unwrap();
    assert_eq!(r.verdict, XDP_REDIRECT);
    assert_eq!(
        r.frame,
        tagged(&frame, 0x8100, 0xa00a),
        "PCP 5 kept, VID 10 set"
    );
}

#[test]
fn trunk_to_access_pops_and_trunk_to_trunk_keeps_the_pcp() {
    let Some(mut f) = vlan_fixture(VLAN_MODE_TRUNK, 0, &[(10, true), (20, true)]) else {
        return;
    };
    let frame = udp_frame(B, A, b"from-trunk", true);
    f.fdb_vlan(B, 10, ACCESS10, 0);
    for run_tc in [false, true] {
        let r = if run_tc {
            f.dp.run_tc(&tagged(&frame, 0x8100, 0x600a), 1).unwrap()
        } else {
            f.dp.run_xdp(&tagged(&frame, 0x8100, 0x600a), LO, 1)
                .unwrap()
        };
        assert_eq!(
            r.verdict,
            if run_tc {
                TC_ACT_REDIRECT
            } else {
                XDP_REDIRECT
            }
        );
        assert_eq!(r.frame, frame, "tag popped (tc: {run_tc})");
    }
    // Trunk to trunk: the frame leaves as it came, PCP 3 and all.
    f.fdb_vlan(B, 20, TRUNK, 0);
    let t = tagged(&frame, 0x8100, 0x6014);
    let r = f.dp.run_xdp(&t, LO, 1).unwrap();
    assert_eq!((r.verdict, &r.frame), (XDP_REDIRECT, &t));
    let r = f.dp.run_tc(&t, 1).unwrap();
    assert_eq!((r.verdict, &r.frame), (TC_ACT_REDIRECT, &t));
    // The same MAC lives in both VLANs, on different ports.
    assert_eq!(f.fdb_get_vlan(A, 10).unwrap().ifindex, LO);
    assert_eq!(f.fdb_get_vlan(A, 20).unwrap().ifindex, LO);
    assert_eq!(f.fdb_get_vlan(B, 10).unwrap().ifindex, ACCESS10);
    assert_eq!(f.fdb_get_vlan(B, 20).unwrap().ifindex, TRUNK);
}

#[test]
fn trunk_drops_disallowed_vids_untagged_frames_and_qinq_with_counters() {
    let Some(mut f) = vlan_fixture(VLAN_MODE_TRUNK, 0, &[(10, true), (20, true)]) else {
        return;
    };
    let frame = udp_frame(B, A, b"x", true);
    let v30 = tagged(&frame, 0x8100, 30);
    assert_eq!(f.dp.run_xdp(&v30, LO, 1).unwrap().verdict, XDP_DROP);
    assert_eq!(f.dp.run_tc(&v30, 1).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::VlanNotAllowed), 2);
    // Untagged on a trunk without native VLAN: XDP cannot tell a stripped
    // tag from none and leaves it to tc, which drops it.
    assert_eq!(f.dp.run_xdp(&frame, LO, 1).unwrap().verdict, XDP_PASS);
    assert_eq!(f.dp.run_tc(&frame, 1).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::VlanUntagged), 1);
    // 802.1ad outer tag (and the old 0x9100) is not a trunk tag.
    let qinq = tagged(&tagged(&frame, 0x8100, 10), 0x88a8, 100);
    assert_eq!(f.dp.run_xdp(&qinq, LO, 1).unwrap().verdict, XDP_DROP);
    assert_eq!(f.dp.run_tc(&qinq, 1).unwrap().verdict, TC_ACT_SHOT);
    let old = tagged(&tagged(&frame, 0x8100, 10), 0x9100, 100);
    assert_eq!(f.dp.run_tc(&old, 1).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::Qinq), 3);
    assert!(f.fdb_get_vlan(A, 30).is_none() && f.fdb_get_vlan(A, 100).is_none());
    // VID 4095 is never allowed.
    let r = f.dp.run_tc(&tagged(&frame, 0x8100, 4095), 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::VlanNotAllowed), 3);
}

#[test]
fn native_vlan_takes_untagged_frames_and_access_ports_refuse_tags() {
    let Some(mut f) = vlan_fixture(VLAN_MODE_TRUNK, 10, &[(10, false), (20, true)]) else {
        return;
    };
    let frame = udp_frame(B, A, b"native", true);
    f.fdb_vlan(B, 10, TRUNK, 0);
    // Untagged on the trunk: native VLAN 10; out of the other trunk tagged.
    let r = f.dp.run_tc(&frame, 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_REDIRECT);
    assert_eq!(f.fdb_get_vlan(A, 10).unwrap().ifindex, LO);
    // lo as an access port: tagged frames are refused whatever the VID.
    f.vlan_port(LO, 0, VLAN_MODE_ACCESS, 10, &[(10, false)]);
    for vid in [10, 20] {
        let r = f.dp.run_xdp(&tagged(&frame, 0x8100, vid), LO, 1).unwrap();
        assert_eq!(r.verdict, XDP_DROP, "tag {vid} on an access port");
    }
    assert_eq!(f.drops(LO, DropReason::VlanNotAllowed), 2);
    // And a port without VLAN config takes untagged frames only.
    f.vlan_port(LO, 0, VLAN_MODE_NONE, 0, &[(0, false)]);
    let r = f.dp.run_tc(&tagged(&frame, 0x8100, 10), 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::VlanNotAllowed), 1, "counters reset");
}

#[test]
fn unicast_never_leaves_through_a_port_outside_the_vlan() {
    let Some(mut f) = vlan_fixture(VLAN_MODE_ACCESS, 20, &[(20, false)]) else {
        return;
    };
    // A stale entry in VLAN 20 naming a VLAN-10-only port.
    f.fdb_vlan(B, 20, ACCESS10, 0);
    let r = f.dp.run_tc(&udp_frame(B, A, b"x", true), 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::StalePort), 1);
}

#[test]
fn tc_floods_per_vlan() {
    let Some(mut f) = vlan_fixture(VLAN_MODE_TRUNK, 0, &[(10, true), (20, true)]) else {
        return;
    };
    let mut set = FloodSet::default();
    set.count = 2;
    set.ifindex[0] = LO;
    set.ifindex[1] = LO;
    set.tagged = 1;
    f.dp.flood()
        .unwrap()
        .insert(
            FloodKey {
                net_id: NET,
                vid: 10,
                _pad: 0,
            },
            set,
            0,
        )
        .unwrap();
    let frame = tagged(&udp_frame(BCAST, A, b"x", true), 0x8100, 10);
    let r = f.dp.run_tc(&frame, 1).unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT, "the clones carry the frame");
    assert_eq!(f.dp.stats(LO).unwrap().flooded, 1);
    // VLAN 20 has no flood set: nowhere to go.
    let r =
        f.dp.run_tc(&tagged(&udp_frame(BCAST, A, b"x", true), 0x8100, 20), 1)
            .unwrap();
    assert_eq!(r.verdict, TC_ACT_SHOT);
}

/// A UDP frame `sport` -> `dport` (checksum 0: none), broadcast from A.
fn dhcp_frame(sport: u16, dport: u16) -> Vec<u8> {
    let mut f = udp_frame(BCAST, A, &[0u8; 240], true);
    f[34..36].copy_from_slice(&sport.to_be_bytes());
    f[36..38].copy_from_slice(&dport.to_be_bytes());
    f[40..42].copy_from_slice(&[0, 0]);
    f
}

#[test]
fn rogue_dhcp_servers_on_untrusted_guest_ports_are_dropped() {
    let Some(mut f) = fixture() else { return };
    let offer = dhcp_frame(67, 68);
    assert_eq!(f.dp.run_xdp(&offer, LO, 1).unwrap().verdict, XDP_DROP);
    assert_eq!(f.dp.run_tc(&offer, 1).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::RogueDhcp), 2);
    assert!(f.fdb_get(A).is_none(), "a rogue frame teaches nothing");
    assert_eq!(f.dp.stats(LO).unwrap().flooded, 0);
    // A tag still in the packet is looked through.
    let mut tagged_offer = offer.clone();
    tagged_offer.splice(12..12, [0x81, 0x00, 0x00, 0x00]);
    assert_eq!(f.dp.run_tc(&tagged_offer, 1).unwrap().verdict, TC_ACT_SHOT);
    assert_eq!(f.drops(LO, DropReason::RogueDhcp), 3);
    // Clients (68 -> 67), other UDP and later fragments pass as usual.
    let discover = dhcp_frame(68, 67);
    assert_eq!(f.dp.run_xdp(&discover, LO, 1).unwrap().verdict, XDP_PASS);
    f.dp.run_tc(&discover, 1).unwrap();
    let mut frag = offer.clone();
    frag[20..22].copy_from_slice(&[0x00, 0x10]);
    f.dp.run_tc(&frag, 1).unwrap();
    f.dp.run_tc(&dhcp_frame(53, 67), 1).unwrap();
    assert_eq!(f.drops(LO, DropReason::RogueDhcp), 3);
    assert_eq!(f.dp.stats(LO).unwrap().flooded, 3);
    // A trusted port (and a bridged uplink) may serve DHCP.
    for flags in [PORT_F_TRUSTED, PORT_F_UPLINK_BRIDGED] {
        f.port(LO, flags);
        assert_eq!(f.dp.run_xdp(&offer, LO, 1).unwrap().verdict, XDP_PASS);
        f.dp.run_tc(&offer, 1).unwrap();
        assert_eq!(f.drops(LO, DropReason::RogueDhcp), 0, "flags {flags:#x}");
    }
    assert!(f.fdb_get(A).is_some());
}

#[test]
#[ignore = "measurement, run by hand"]
fn zz_cost_known_unicast_tc() {
    let Some(mut f) = fixture() else { return };
    f.port(1000, PORT_F_XDP_TX);
    f.fdb(B, 1000, 0);
    let frame = udp_frame(B, A, b"payload!", true);
    let mut best = u128::MAX;
    for _ in 0..5 {
        best = best.min(f.dp.run_tc(&frame, 1_000_000).unwrap().per_run.as_nanos());
    }
    println!("COST known unicast tc: {best} ns");
}
