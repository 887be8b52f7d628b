//! `kvnet-bench`: the eBPF side of `cargo xtask bench`. Each subcommand does
//! one thing and prints one JSON object on stdout; xtask runs it inside the
//! right lab namespace (ifindexes and BPF_PROG_RUN's `lo` are per netns).
//!
//! * `setup DIR`: loads the bench object's programs (`bench_redirect`,
//!   `bench_sink`, `bench_gen`) and pins them with their maps under DIR, for
//!   `tc ... object-pinned` and `ip link ... xdp pinned`.
//! * `peer DIR A B`: the limit program redirects A -> B and B -> A.
//! * `count DIR [--reset]`: the sink's per-CPU frame/byte counters, summed.
//! * `gen DIR IFACE`: BPF_PROG_RUN live frames (XDP_TX out of IFACE).
//! * `cost DIR`: per-packet ns of kvnet_tc / kvnet_xdp / the limit through
//!   BPF_PROG_RUN with `repeat`, for several FDB sizes; with `--gw` and
//!   `--uplink`, also the rewriting paths (VLAN push/pop, routed, NAT new
//!   flow / established / reply) one packet per run, for several conntrack
//!   sizes (see [`paths`]).
//! * `ctfill DIR N [--remove]`: N synthetic conntrack entries (N/2 flows,
//!   both directions, TCP established) in the pinned `ct` map under DIR.
//! * `frame`: the 64-byte IPv4/UDP frame as a trafgen packet config (the
//!   AF_PACKET generator for paths through the host stack).
//! * `tap-gen TAP` / `tap-sink TAP`: a guest's hypervisor process on a tap:
//!   writes prebuilt 64-byte frames into the tap's fd / reads and counts
//!   them (bounded in count and time).
//! * `conn-server` / `conn-rate`: short TCP connections (accept and close;
//!   connect, wait for the close), bounded in count and time.
use std::{
    path::{Path, PathBuf},
    time::Instant,
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    programs::{SchedClassifier, TestRun, TestRunAttrs, TestRunOptions, Xdp},
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use clap::{Parser, Subcommand};
use kvnet_common::{
    names, CtEntry, CtKey, FdbEntry, FdbKey, FloodKey, FloodSet, NatStats, NeighEntry, NeighKey,
    NetConfig, PortConfig, PortStats, VlanMember, VlanMemberKey, CT_F_ACK, CT_F_ORIGINAL, CT_F_SYN,
    FDB_F_STATIC, IPPROTO_TCP, IPPROTO_UDP, NET_F_NAT, PORT_F_GUARDED, PORT_F_IP_GUARD,
    PORT_F_ROUTED_NET, PORT_F_UPLINK_NAT, PORT_F_UPLINK_ROUTED, PORT_F_V6_SLAAC, PORT_F_XDP_TX,
    VLAN_MODE_ACCESS, VLAN_MODE_TRUNK, VLAN_M_TAGGED,
};
use kvnet_userspace::{host::monotonic_ns, netdev::ifindex};
use serde_json::json;

const PROGS: &[&str] = &["bench_redirect", "bench_sink", "bench_gen"];
const MAPS: &[&str] = &["bench_peer", "bench_count"];
const NET: u32 = 7;

#[derive(Parser)]
#[command(name = "kvnet-bench")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Setup {
        dir: PathBuf,
    },
    Peer {
        dir: PathBuf,
        a: String,
        b: String,
    },
    Count {
        dir: PathBuf,
        #[arg(long)]
        reset: bool,
    },
    Gen {
        dir: PathBuf,
        iface: String,
        #[arg(long, default_value_t = 1 << 20)]
        count: u32,
        #[arg(long, default_value_t = 64)]
        batch: u32,
        #[arg(long)]
        src: String,
        #[arg(long)]
        dst: String,
        /// Destination IPv4 address (default 10.0.0.2, guest g2).
        #[arg(long, default_value = "10.0.0.2")]
        dst_ip: std::net::Ipv4Addr,
    },
    Cost {
        /// A private pin folder (the kvnet maps are created there).
        dir: PathBuf,
        /// Two existing ports of this netns (veths): ingress and egress.
        #[arg(long)]
        a: String,
        #[arg(long)]
        b: String,
        #[arg(long, default_value = "10,10000,1000000")]
        sizes: String,
        #[arg(long, default_value_t = 1_000_000)]
        repeat: u32,
        #[arg(long, default_value_t = 5)]
        trials: u32,
        /// Only this `path/program` (e.g. `unicast/kvnet_tc`), for profiling.
        #[arg(long)]
        only: Option<String>,
        /// The gateway's host end (an interface with the guest subnet's
        /// gateway address): enables the VLAN/routed/NAT paths.
        #[arg(long)]
        gw: Option<String>,
        /// The uplink (with the NAT address and a route to the outside).
        #[arg(long)]
        uplink: Option<String>,
        #[arg(long, default_value = "10,100000,1000000")]
        ct_sizes: String,
        /// Packets per rewriting path (one BPF_PROG_RUN each).
        #[arg(long, default_value_t = 20_000)]
        single: u32,
    },
    Ctfill {
        dir: PathBuf,
        entries: u32,
        #[arg(long)]
        remove: bool,
    },
    Frame {
        #[arg(long)]
        src: String,
        #[arg(long)]
        dst: String,
        #[arg(long)]
        sip: std::net::Ipv4Addr,
        #[arg(long)]
        dip: std::net::Ipv4Addr,
    },
    TapGen {
        tap: String,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        secs: f64,
        #[arg(long)]
        src: String,
        #[arg(long)]
        dst: String,
    },
    TapSink {
        tap: String,
        /// This guest's MAC: announced once (so switches learn it), and
        /// only frames to it are counted.
        #[arg(long)]
        mac: String,
        #[arg(long)]
        secs: f64,
        /// Stop once no frame came for this long after the first one.
        #[arg(long, default_value_t = 500)]
        idle_ms: u64,
    },
    ConnServer {
        #[arg(long)]
        port: u16,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        secs: f64,
    },
    ConnRate {
        #[arg(long)]
        to: std::net::SocketAddr,
        #[arg(long)]
        count: u32,
        #[arg(long)]
        secs: f64,
        #[arg(long, default_value_t = 4)]
        threads: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup { dir } => setup(&dir),
        Cmd::Peer { dir, a, b } => peer(&dir, &a, &b),
        Cmd::Count { dir, reset } => count(&dir, reset),
        Cmd::Gen {
            dir,
            iface,
            count,
            batch,
            src,
            dst,
            dst_ip,
        } => gen(&dir, &iface, count, batch, &src, &dst, dst_ip),
        Cmd::Cost {
            dir,
            a,
            b,
            sizes,
            repeat,
            trials,
            only,
            gw,
            uplink,
            ct_sizes,
            single,
        } => cost(&dir, &a, &b, &sizes, repeat, trials, only.as_deref()).and_then(|mut v| {
            if let (Some(gw), Some(up)) = (gw, uplink) {
                v["paths"] = paths(&dir, &a, &b, &gw, &up, &ct_sizes, single, only.as_deref())?;
            }
            Ok(v)
        }),
        Cmd::Ctfill {
            dir,
            entries,
            remove,
        } => ctfill(&dir, entries, remove),
        Cmd::Frame { src, dst, sip, dip } => trafgen_frame(&src, &dst, sip, dip),
        Cmd::TapGen {
            tap,
            count,
            secs,
            src,
            dst,
        } => tap_gen(&tap, count, secs, &src, &dst),
        Cmd::TapSink {
            tap,
            mac,
            secs,
            idle_ms,
        } => tap_sink(&tap, &mac, secs, idle_ms),
        Cmd::ConnServer { port, count, secs } => conn_server(port, count, secs),
        Cmd::ConnRate {
            to,
            count,
            secs,
            threads,
        } => conn_rate(to, count, secs, threads),
    };
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("kvnet-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

/// The conntrack capacity the bench daemon runs with (`--ct-max`).
pub const CT_MAX: u32 = 2_200_000;

fn load_with(dir: &Path, ct_max: Option<u32>) -> Result<Ebpf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let level: u8 = 0;
    let mut l = EbpfLoader::new();
    if let Some(n) = ct_max {
        l.map_max_entries(names::MAP_CT, n);
    }
    l.default_map_pin_directory(dir)
        .override_global("AYA_LOG_LEVEL", &level, false)
        .load(kvnet_userspace::datapath::object())
        .context("loading the kvnet eBPF object")
}

/// The bench programs' own object (`bench_redirect`, `bench_sink`,
/// `bench_gen` and their maps).
fn load_bench(dir: &Path) -> Result<Ebpf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .load(kvnet_userspace::datapath::bench_object())
        .context("loading the kvnet-bench eBPF object")
}

fn setup(dir: &Path) -> Result<serde_json::Value> {
    let mut ebpf = load_bench(dir)?;
    for name in PROGS {
        let prog = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("{name} missing"))?;
        match prog {
            aya::programs::Program::SchedClassifier(p) => p.load()?,
            aya::programs::Program::Xdp(p) => p.load()?,
            _ => bail!("{name}: unexpected program type"),
        }
        prog.pin(dir.join(name))
            .with_context(|| format!("pinning {name}"))?;
    }
    for name in MAPS {
        let map = ebpf.map(name).ok_or_else(|| anyhow!("{name} missing"))?;
        map.pin(dir.join(name))
            .with_context(|| format!("pinning {name}"))?;
    }
    Ok(json!({"pinned": dir}))
}

fn peer_map(dir: &Path) -> Result<HashMap<MapData, u32, u32>> {
    let m = Map::from_map_data(MapData::from_pin(dir.join("bench_peer"))?)?;
    Ok(HashMap::try_from(m)?)
}

fn peer(dir: &Path, a: &str, b: &str) -> Result<serde_json::Value> {
    let (ia, ib) = (ifindex(a)?, ifindex(b)?);
    let mut m = peer_map(dir)?;
    m.insert(ia, ib, 0)?;
    m.insert(ib, ia, 0)?;
    Ok(json!({"a": ia, "b": ib}))
}

fn count(dir: &Path, reset: bool) -> Result<serde_json::Value> {
    let m = Map::from_map_data(MapData::from_pin(dir.join("bench_count"))?)?;
    let mut arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(m)?;
    let mut sums = [0u64; 2];
    for (i, s) in sums.iter_mut().enumerate() {
        *s = arr.get(&(i as u32), 0)?.iter().sum();
    }
    if reset {
        let cpus = nr_cpus().map_err(|(_, e)| e)?;
        for i in 0..2 {
            arr.set(i, PerCpuValues::try_from(vec![0u64; cpus])?, 0)?;
        }
    }
    Ok(json!({"frames": sums[0], "bytes": sums[1]}))
}

/// A 60-byte (64 on the wire with FCS) IPv4/UDP frame with correct checksums.
/// Port security as the daemon sets it on a guest port by default: the
/// guest's MAC owned, its address bound, so the bench measures the guards.
fn guarded(mut p: PortConfig, mac: [u8; 6], ip: [u8; 4]) -> PortConfig {
    p.flags |= PORT_F_GUARDED | PORT_F_IP_GUARD;
    (p.max_macs, p.mac_count) = (1, 1);
    p.macs[0] = mac;
    p.ips[0] = u32::from_ne_bytes(ip);
    (p.ip_count, p.ip_fixed, p.ip_next) = (1, 1, 1);
    p
}

/// Makes `members` the flood set of the bench network's VLAN 0.
fn set_flood(ebpf: &mut Ebpf, members: &[u32]) -> Result<()> {
    let mut flood: HashMap<&mut MapData, FloodKey, FloodSet> =
        HashMap::try_from(ebpf.map_mut(names::MAP_FLOOD).unwrap())?;
    let mut set = Box::new(FloodSet::default());
    for (slot, m) in set.members.iter_mut().zip(members) {
        *slot = *m;
    }
    set.count = members.len() as u32;
    flood.insert(
        FloodKey {
            net_id: NET,
            vid: 0,
            _pad: 0,
        },
        &*set,
        0,
    )?;
    Ok(())
}

/// A broadcast ARP request from `src` (padded to 60 bytes).
fn arp_request(src: [u8; 6], spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 8, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&spa);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa);
    f.resize(60, 0);
    f
}

fn udp_frame(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    ip_frame(src, dst, [10, 0, 0, 1], [10, 0, 0, 2], 12345, 5001, None)
}

/// An IPv4/UDP frame, 64 bytes on the wire (68 with a tag).
fn ip_frame(
    src: [u8; 6],
    dst: [u8; 6],
    sip: [u8; 4],
    dip: [u8; 4],
    sport: u16,
    dport: u16,
    vid: Option<u16>,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    if let Some(v) = vid {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = [0x5au8; 18];
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let mut ip = vec![
        0x45,
        0,
        (ip_len >> 8) as u8,
        ip_len as u8,
        0,
        0,
        0x40,
        0,
        64,
        17,
        0,
        0,
    ];
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let c = !fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let (sp, dp) = (sport.to_be_bytes(), dport.to_be_bytes());
    let mut udp = vec![
        sp[0],
        sp[1],
        dp[0],
        dp[1],
        (udp_len >> 8) as u8,
        udp_len as u8,
        0,
        0,
    ];
    udp.extend_from_slice(&payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&sip);
    pseudo.extend_from_slice(&dip);
    pseudo.extend_from_slice(&[0, 17, (udp_len >> 8) as u8, udp_len as u8]);
    let c = !fold(sum(&udp, sum(&pseudo, 0)));
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

/// An IPv6/UDP frame of the same payload (82 bytes on the wire).
fn ip6_frame(
    src: [u8; 6],
    dst: [u8; 6],
    sip: std::net::Ipv6Addr,
    dip: std::net::Ipv6Addr,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut f = Vec::with_capacity(82);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x86, 0xdd]);
    let payload = [0x5au8; 12];
    let udp_len = 8 + payload.len() as u16;
    let len = udp_len.to_be_bytes();
    f.extend_from_slice(&[0x60, 0, 0, 0, len[0], len[1], 17, 64]);
    f.extend_from_slice(&sip.octets());
    f.extend_from_slice(&dip.octets());
    let (sp, dp) = (sport.to_be_bytes(), dport.to_be_bytes());
    let mut udp = vec![sp[0], sp[1], dp[0], dp[1], len[0], len[1], 0, 0];
    udp.extend_from_slice(&payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&sip.octets());
    pseudo.extend_from_slice(&dip.octets());
    pseudo.extend_from_slice(&[0, 0, len[0], len[1], 0, 0, 0, 17]);
    let c = !fold(sum(&udp, sum(&pseudo, 0)));
    udp[6..8].copy_from_slice(&(if c == 0 { 0xffff } else { c }).to_be_bytes());
    f.extend_from_slice(&udp);
    f
}

fn sum(b: &[u8], mut acc: u32) -> u32 {
    for c in b.chunks(2) {
        acc += (c[0] as u32) << 8 | *c.get(1).unwrap_or(&0) as u32;
    }
    acc
}

fn fold(mut s: u32) -> u16 {
    while s >> 16 != 0 {
        s = (s & 0xffff) + (s >> 16);
    }
    s as u16
}

/// struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
fn xdp_ctx(len: usize, ingress: u32) -> Vec<u8> {
    [0, len as u32, 0, ingress, 0, 0]
        .iter()
        .flat_map(|w: &u32| w.to_ne_bytes())
        .collect()
}

fn gen(
    dir: &Path,
    iface: &str,
    count: u32,
    batch: u32,
    src: &str,
    dst: &str,
    dst_ip: std::net::Ipv4Addr,
) -> Result<serde_json::Value> {
    let ifi = ifindex(iface)?;
    // A fresh load of the generator; the object's maps are the ones pinned
    // under DIR by `setup`, so nothing big is allocated again.
    let mut ebpf = load_bench(dir)?;
    let prog: &mut Xdp = ebpf
        .program_mut("bench_gen")
        .ok_or_else(|| anyhow!("bench_gen missing"))?
        .try_into()?;
    prog.load()?;
    let prog = &*prog;
    let frame = ip_frame(
        parse_mac(src)?,
        parse_mac(dst)?,
        [10, 0, 0, 1],
        dst_ip.octets(),
        12345,
        5001,
        None,
    );
    let ctx = xdp_ctx(frame.len(), ifi);
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = count;
    opts.attrs = TestRunAttrs::new().xdp_live_frames(batch);
    let t = Instant::now();
    let r = prog.test_run(opts).context("BPF_PROG_RUN live frames")?;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({"sent": count, "secs": secs, "verdict": r.return_value, "frame_len": frame.len()}))
}

fn run_once<P>(prog: &P, frame: &[u8], ctx: Option<&[u8]>, repeat: u32) -> Result<(u32, f64)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let r = kvnet_userspace::datapath::prog_run(prog, frame, ctx, repeat)?;
    Ok((r.verdict, r.per_run.as_nanos() as f64))
}

/// Deterministic, locally administered unicast MACs (02:..), distinct per i.
fn filler_mac(i: u32) -> [u8; 6] {
    let b = i.to_be_bytes();
    [0x02, 0xbe, b[0], b[1], b[2], b[3]]
}

fn cost(
    dir: &Path,
    a: &str,
    b: &str,
    sizes: &str,
    repeat: u32,
    trials: u32,
    only: Option<&str>,
) -> Result<serde_json::Value> {
    let (ia, ib) = (ifindex(a)?, ifindex(b)?);
    let lo = ifindex("lo")?;
    let mut ebpf = load_with(dir, Some(CT_MAX))?;
    let mut limit = load_bench(dir)?;
    for (obj, name) in [(&mut ebpf, names::PROG_TC), (&mut limit, "bench_redirect")] {
        let p: &mut SchedClassifier = obj
            .program_mut(name)
            .ok_or_else(|| anyhow!("{name} missing"))?
            .try_into()?;
        p.load()?;
    }
    {
        let p: &mut Xdp = ebpf
            .program_mut(names::PROG_XDP)
            .ok_or_else(|| anyhow!("xdp missing"))?
            .try_into()?;
        p.load()?;
    }
    // IPv6 from SLAAC-guarded ports passes the source guard first.
    kvnet_userspace::datapath::load_savi(&mut ebpf, None)?;
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    // Ports: lo (where tc test frames arrive), a (XDP ingress), b (egress).
    // `open`: the sender's port without port security (the same-run
    // comparison row); else guarded as the daemon sets it by default.
    let set_ports = |ebpf: &mut Ebpf, b_flags: u32, open: bool| -> Result<()> {
        let mut ports: HashMap<&mut MapData, u32, PortConfig> =
            HashMap::try_from(ebpf.map_mut(names::MAP_PORTS).unwrap())?;
        for (i, flags) in [(lo, 0), (ia, 0), (ib, b_flags)] {
            let p = PortConfig {
                net_id: NET,
                flags,
                ..Default::default()
            };
            // The frames' sender (see `udp_frame`) is a guarded guest.
            let p = if i == ib || open {
                p
            } else {
                guarded(p, [0x02, 0xaa, 0, 0, 0, 1], [10, 0, 0, 1])
            };
            ports.insert(i, p, 0)?;
        }
        Ok(())
    };
    set_ports(&mut ebpf, 0, false)?;
    {
        let mut stats: aya::maps::PerCpuHashMap<&mut MapData, u32, PortStats> =
            aya::maps::PerCpuHashMap::try_from(ebpf.map_mut(names::MAP_PORT_STATS).unwrap())?;
        for i in [lo, ia, ib] {
            stats.insert(
                i,
                PerCpuValues::try_from(vec![PortStats::default(); cpus])?,
                0,
            )?;
        }
        let mut flood: HashMap<&mut MapData, FloodKey, FloodSet> =
            HashMap::try_from(ebpf.map_mut(names::MAP_FLOOD).unwrap())?;
        let mut set = FloodSet::default();
        set.count = 2;
        set.members[0] = ia;
        set.members[1] = ib;
        flood.insert(
            FloodKey {
                net_id: NET,
                vid: 0,
                _pad: 0,
            },
            set,
            0,
        )?;
        let mut peer: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(limit.map_mut("bench_peer").unwrap())?;
        peer.insert(lo, ib, 0)?;
    }
    let src = [0x02, 0xaa, 0, 0, 0, 1];
    let dst = [0x02, 0xaa, 0, 0, 0, 2];
    let unicast = udp_frame(src, dst);
    let bcast = udp_frame(src, [0xff; 6]);

    let mut rows = Vec::new();
    let mut filled = 0u32;
    let mut fill_secs = Vec::new();
    let sizes: Vec<u32> = sizes
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("--sizes")?;
    for &size in &sizes {
        // Grow the FDB to `size` entries: dst -> b, plus fillers.
        {
            let mut fdb: HashMap<&mut MapData, FdbKey, FdbEntry> =
                HashMap::try_from(ebpf.map_mut(names::MAP_FDB).unwrap())?;
            let entry = |ifindex| FdbEntry {
                ifindex,
                flags: FDB_F_STATIC,
                last_seen_ns: 0,
            };
            fdb.insert(
                FdbKey {
                    net_id: NET,
                    vid: 0,
                    mac: dst,
                },
                entry(ib),
                0,
            )?;
            let t = Instant::now();
            let target = size.saturating_sub(2);
            let from = filled;
            while filled < target {
                fdb.insert(
                    FdbKey {
                        net_id: NET,
                        vid: 0,
                        mac: filler_mac(filled),
                    },
                    entry(ib),
                    0,
                )?;
                filled += 1;
            }
            if filled > from {
                fill_secs.push(json!({"from": from, "to": filled,
                    "secs": t.elapsed().as_secs_f64()}));
            }
        }
        let mut measure =
            |ebpf: &mut Ebpf, path: &str, prog: &str, frame: &[u8], rep: u32| -> Result<()> {
                if only.is_some_and(|o| o != format!("{path}/{prog}")) {
                    return Ok(());
                }
                let mut ns = Vec::new();
                let mut verdict = 0;
                for _ in 0..trials {
                    let (v, d) = if prog == names::PROG_XDP {
                        let p: &Xdp = ebpf.program(prog).unwrap().try_into()?;
                        let ctx = xdp_ctx(frame.len(), ia);
                        run_once(p, frame, Some(&ctx), rep)?
                    } else {
                        let p: &SchedClassifier = ebpf.program(prog).unwrap().try_into()?;
                        run_once(p, frame, None, rep)?
                    };
                    verdict = v;
                    ns.push(d);
                }
                rows.push(json!({"path": path, "prog": prog, "fdb_entries": size,
                "verdict": verdict, "ns": ns}));
                Ok(())
            };
        // Warm-up: learns `src` on lo (tc) and on a (xdp) once.
        {
            let p: &SchedClassifier = ebpf.program(names::PROG_TC).unwrap().try_into()?;
            run_once(p, &unicast, None, 1)?;
        }
        measure(&mut ebpf, "unicast", names::PROG_TC, &unicast, repeat)?;
        set_ports(&mut ebpf, 0, true)?;
        measure(&mut ebpf, "unicast-open", names::PROG_TC, &unicast, repeat)?;
        set_ports(&mut ebpf, 0, false)?;
        measure(&mut ebpf, "unicast", names::PROG_XDP, &unicast, repeat)?;
        set_ports(&mut ebpf, PORT_F_XDP_TX, false)?;
        measure(
            &mut ebpf,
            "unicast-xdp-redirect",
            names::PROG_XDP,
            &unicast,
            repeat,
        )?;
        set_ports(&mut ebpf, 0, false)?;
        measure(&mut limit, "unicast", "bench_redirect", &unicast, repeat)?;
        // Floods clone the frame into both real veths: far fewer repeats.
        measure(
            &mut ebpf,
            "flood",
            names::PROG_TC,
            &bcast,
            (repeat / 20).max(1),
        )?;
        measure(&mut ebpf, "flood", names::PROG_XDP, &bcast, repeat)?;
        if size == sizes[0] {
            // A large flood domain: b as every member, so each clone is
            // really sent (issue 21: the cost per member).
            for members in [64usize, 1024] {
                set_flood(&mut ebpf, &vec![ib; members])?;
                let rep = (repeat / members as u32).max(1);
                measure(
                    &mut ebpf,
                    &format!("flood-{members}"),
                    names::PROG_TC,
                    &bcast,
                    rep,
                )?;
            }
            set_flood(&mut ebpf, &[ia, ib])?;
            // ARP suppression: a request for a known address is answered
            // (and redirected back); for an unknown one, flooded.
            let arp = arp_request(src, [10, 0, 0, 1], [10, 0, 0, 2]);
            let key = NeighKey {
                net_id: NET,
                vid: 0,
                _pad: 0,
                ip: u32::from_ne_bytes([10, 0, 0, 2]),
            };
            let mut neigh: HashMap<&mut MapData, NeighKey, NeighEntry> =
                HashMap::try_from(ebpf.map_mut(names::MAP_NEIGH).unwrap())?;
            neigh.insert(
                key,
                NeighEntry {
                    mac: dst,
                    _pad: 0,
                    ifindex: ib,
                },
                0,
            )?;
            measure(&mut ebpf, "arp-answered", names::PROG_TC, &arp, repeat)?;
            let mut neigh: HashMap<&mut MapData, NeighKey, NeighEntry> =
                HashMap::try_from(ebpf.map_mut(names::MAP_NEIGH).unwrap())?;
            neigh.remove(&key)?;
            measure(
                &mut ebpf,
                "arp-flooded",
                names::PROG_TC,
                &arp,
                (repeat / 20).max(1),
            )?;
        }
    }
    Ok(
        json!({"repeat": repeat, "trials": trials, "rows": rows, "fill": fill_secs,
        "ifindex": {"lo": lo, "a": ia, "b": ib}}),
    )
}

/// `struct __sk_buff` up to and including `ifindex` (offset 40): the
/// device BPF_PROG_RUN builds the skb on (kernel >= 5.x; `lo` otherwise).
fn skb_ctx(ifindex: u32) -> Vec<u8> {
    let mut c = vec![0u8; 44];
    c[40..44].copy_from_slice(&ifindex.to_ne_bytes());
    c
}

fn be_addr(a: [u8; 4]) -> u32 {
    u32::from_ne_bytes(a)
}

/// Synthetic flow `i` (both directions), TCP established: never matches
/// the bench's own traffic (10.128/9 -> 203.0.113.1:443, translated to
/// 100.64/10 addresses).
fn synthetic_flow(i: u32, now: u64) -> [(CtKey, CtEntry); 2] {
    let orig = CtKey {
        saddr: (0x0a80_0000u32 + i).to_be(),
        daddr: be_addr([203, 0, 113, 1]),
        sport: 40000,
        dport: 443,
        proto: IPPROTO_TCP,
        _pad: [0; 3],
    };
    let to = CtKey {
        saddr: (0x6440_0000u32 + i).to_be(),
        ..orig
    };
    let e = CtEntry {
        rewrite: to,
        net_id: 999,
        flags: CT_F_ORIGINAL | CT_F_SYN | CT_F_ACK,
        created_ns: now,
        last_seen_ns: now,
        packets: 1,
        bytes: 60,
        ..Default::default()
    };
    let r = CtEntry {
        rewrite: orig.reply(),
        flags: CT_F_SYN | CT_F_ACK,
        ..e
    };
    [(orig, e), (to.reply(), r)]
}

/// Grows (or shrinks) the synthetic part of `ct` from `have` to `want`
/// entries (2 per flow). Returns seconds spent.
fn ct_resize<M: std::borrow::BorrowMut<MapData>>(
    ct: &mut HashMap<M, CtKey, CtEntry>,
    have: u32,
    want: u32,
) -> Result<f64> {
    let t = Instant::now();
    let now = monotonic_ns();
    let (h, w) = (have / 2, want / 2);
    for i in h..w {
        for (k, e) in synthetic_flow(i, now) {
            ct.insert(k, e, 0)
                .with_context(|| format!("ct insert #{}", 2 * i))?;
        }
    }
    for i in w..h {
        for (k, _) in synthetic_flow(i, now) {
            let _ = ct.remove(&k);
        }
    }
    Ok(t.elapsed().as_secs_f64())
}

fn ctfill(dir: &Path, entries: u32, remove: bool) -> Result<serde_json::Value> {
    let m = Map::from_map_data(MapData::from_pin(dir.join(names::MAP_CT))?)?;
    let mut ct: HashMap<MapData, CtKey, CtEntry> = HashMap::try_from(m)?;
    let secs = if remove {
        ct_resize(&mut ct, entries, 0)?
    } else {
        ct_resize(&mut ct, 0, entries)?
    };
    Ok(json!({"entries": entries, "removed": remove, "secs": secs}))
}

/// One packet per BPF_PROG_RUN (repeat 1): the per-run ns the kernel
/// reports, for `n` packets made by `frame(i)`. Rewriting paths need this:
/// with `repeat` the kernel runs the program again on the already
/// rewritten skb (TTL, tags, addresses), which is no longer the path.
fn single_runs(
    p: &SchedClassifier,
    ctx: &[u8],
    n: u32,
    mut frame: impl FnMut(u32) -> Vec<u8>,
) -> Result<(Vec<f64>, u32, Vec<u8>)> {
    let mut ns = Vec::with_capacity(n as usize);
    let mut verdict = 0;
    let mut last = Vec::new();
    for i in 0..n {
        let f = frame(i);
        let mut out = vec![0u8; f.len() + 256];
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(&f);
        opts.data_out = Some(&mut out);
        opts.ctx_in = Some(ctx);
        opts.repeat = 1;
        let r = p.test_run(opts).context("BPF_PROG_RUN")?;
        verdict = r.return_value;
        ns.push(r.duration.as_nanos() as f64);
        if i + 1 == n {
            last = out;
        }
    }
    Ok((ns, verdict, last))
}

fn summary(v: &[f64]) -> serde_json::Value {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let q = |p: f64| s[((p * (s.len() - 1) as f64).round() as usize).min(s.len() - 1)];
    json!({"n": s.len(), "p50": q(0.5), "p10": q(0.1), "p90": q(0.9), "mean": s.iter().sum::<f64>() / s.len() as f64})
}

const NET_VLAN: u32 = 10;
const NET_RT: u32 = 9;
const NET_NAT: u32 = 8;
const VID: u16 = 10;

/// The rewriting paths, one packet per run, on skbs built on the real
/// ingress device (`__sk_buff.ifindex`): `a` is the guest port, `b` a
/// trunk (VLAN) or second guest, `gw` the gateway's host end (guest
/// subnet 10.0.0.0/24, .254 on it, 10.0.0.1 a permanent neighbour),
/// `up` the uplink (192.168.77.1, the outside 192.168.77.2 a resolved
/// neighbour). NAT rows repeat for each conntrack size.
fn paths(
    dir: &Path,
    a: &str,
    b: &str,
    gw: &str,
    up: &str,
    ct_sizes: &str,
    n: u32,
    only: Option<&str>,
) -> Result<serde_json::Value> {
    let (ia, ib, igw, iup) = (ifindex(a)?, ifindex(b)?, ifindex(gw)?, ifindex(up)?);
    let up_mac = iface_mac(up)?;
    let mut ebpf = load_with(dir, Some(CT_MAX))?;
    let mut limit = load_bench(dir)?;
    for (obj, name) in [(&mut ebpf, names::PROG_TC), (&mut limit, "bench_redirect")] {
        let p: &mut SchedClassifier = obj
            .program_mut(name)
            .ok_or_else(|| anyhow!("{name} missing"))?
            .try_into()?;
        p.load()?;
    }
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    let guest = [0x02, 0xaa, 0, 0, 0, 1];
    let other = [0x02, 0xaa, 0, 0, 0, 2];
    let gw_mac = [0x02, 0xaa, 0, 0, 0, 0xfe];
    let nat_ip = be_addr([192, 168, 77, 1]);
    {
        let mut stats: aya::maps::PerCpuHashMap<&mut MapData, u32, PortStats> =
            aya::maps::PerCpuHashMap::try_from(ebpf.map_mut(names::MAP_PORT_STATS).unwrap())?;
        for i in [ia, ib, igw, iup] {
            stats.insert(
                i,
                PerCpuValues::try_from(vec![PortStats::default(); cpus])?,
                0,
            )?;
        }
        let mut ns: aya::maps::PerCpuHashMap<&mut MapData, u32, NatStats> =
            aya::maps::PerCpuHashMap::try_from(ebpf.map_mut(names::MAP_NAT_STATS).unwrap())?;
        ns.insert(
            NET_NAT,
            PerCpuValues::try_from(vec![NatStats::default(); cpus])?,
            0,
        )?;
        let mut nets: HashMap<&mut MapData, u32, NetConfig> =
            HashMap::try_from(ebpf.map_mut(names::MAP_NETS).unwrap())?;
        let base = NetConfig {
            gw_host: igw,
            gw_port: igw,
            uplink: iup,
            gw_mac,
            subnet: be_addr([10, 0, 0, 0]),
            mask: be_addr([255, 255, 255, 0]),
            ..Default::default()
        };
        nets.insert(NET_RT, base, 0)?;
        nets.insert(
            NET_NAT,
            NetConfig {
                flags: NET_F_NAT,
                nat_ip,
                port_lo: 1024,
                port_hi: 65535,
                skip_lo: 32768,
                skip_hi: 60999,
                ..base
            },
            0,
        )?;
        let mut gwh: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(ebpf.map_mut(names::MAP_GW_HOSTS).unwrap())?;
        gwh.insert(igw, NET_NAT, 0)?;
        let mut vm: HashMap<&mut MapData, VlanMemberKey, VlanMember> =
            HashMap::try_from(ebpf.map_mut(names::MAP_VLAN_MEMBERS).unwrap())?;
        let key = |ifindex| VlanMemberKey {
            ifindex,
            vid: VID,
            _pad: 0,
        };
        vm.insert(key(ia), VlanMember { flags: 0 }, 0)?;
        vm.insert(
            key(ib),
            VlanMember {
                flags: VLAN_M_TAGGED,
            },
            0,
        )?;
        let mut fdb: HashMap<&mut MapData, FdbKey, FdbEntry> =
            HashMap::try_from(ebpf.map_mut(names::MAP_FDB).unwrap())?;
        let e = |ifindex| FdbEntry {
            ifindex,
            flags: FDB_F_STATIC,
            last_seen_ns: 0,
        };
        let k = |net_id, vid, mac| FdbKey { net_id, vid, mac };
        fdb.insert(k(NET_VLAN, VID, other), e(ib), 0)?;
        fdb.insert(k(NET_VLAN, VID, guest), e(ia), 0)?;
        fdb.insert(k(NET_NAT, 0, guest), e(ia), 0)?;
    }
    let set_ports = |ebpf: &mut Ebpf, list: &[(u32, PortConfig)]| -> Result<()> {
        let mut ports: HashMap<&mut MapData, u32, PortConfig> =
            HashMap::try_from(ebpf.map_mut(names::MAP_PORTS).unwrap())?;
        for (i, c) in list {
            ports.insert(*i, *c, 0)?;
        }
        Ok(())
    };
    let mut rows = Vec::new();
    let mut run = |ebpf: &Ebpf,
                   path: &str,
                   prog: &str,
                   ct: u32,
                   ingress: u32,
                   frame: &mut dyn FnMut(u32) -> Vec<u8>|
     -> Result<Vec<u8>> {
        let p: &SchedClassifier = ebpf.program(prog).unwrap().try_into()?;
        // With --only, other paths run once (later ones depend on them).
        let n = if only.is_some_and(|o| o != format!("{path}/{prog}")) {
            1
        } else {
            n
        };
        let (ns, verdict, last) = single_runs(p, &skb_ctx(ingress), n, frame)?;
        let s = summary(&ns);
        eprintln!(
            "kvnet-bench: {path}/{prog} ct={ct}: p50 {} ns, verdict {verdict}",
            s["p50"]
        );
        rows.push(
            json!({"path": path, "prog": prog, "ct_entries": ct, "verdict": verdict, "ns": s}),
        );
        Ok(last)
    };
    // The limit and a known unicast in the same one-packet-per-run mode.
    let g_ip = [10, 0, 0, 1];
    let o_ip = [192, 168, 77, 2];
    {
        let mut peer: HashMap<&mut MapData, u32, u32> =
            HashMap::try_from(limit.map_mut("bench_peer").unwrap())?;
        peer.insert(ia, ib, 0)?;
    }
    let access = PortConfig {
        net_id: NET_VLAN,
        vlan_mode: VLAN_MODE_ACCESS,
        pvid: VID,
        ..Default::default()
    };
    let trunk = PortConfig {
        net_id: NET_VLAN,
        vlan_mode: VLAN_MODE_TRUNK,
        ..Default::default()
    };
    set_ports(
        &mut ebpf,
        &[(ia, guarded(access, guest, g_ip)), (ib, trunk)],
    )?;
    let plain = |vid| move |_| ip_frame(guest, other, g_ip, [10, 0, 0, 2], 12345, 5001, vid);
    run(&limit, "unicast", "bench_redirect", 0, ia, &mut plain(None))?;
    // VLAN push: access (untagged) -> trunk (tagged).
    run(&ebpf, "vlan-push", names::PROG_TC, 0, ia, &mut plain(None))?;
    // VLAN pop: trunk (tagged in the packet) -> access.
    let mut pop = |_| ip_frame(other, guest, [10, 0, 0, 2], g_ip, 5001, 12345, Some(VID));
    run(&ebpf, "vlan-pop", names::PROG_TC, 0, ib, &mut pop)?;
    // Known unicast without VLANs, same mode (compare with `repeat` rows).
    let none = PortConfig {
        net_id: NET_VLAN,
        ..Default::default()
    };
    set_ports(&mut ebpf, &[(ia, guarded(none, guest, g_ip)), (ib, none)])?;
    {
        let mut fdb: HashMap<&mut MapData, FdbKey, FdbEntry> =
            HashMap::try_from(ebpf.map_mut(names::MAP_FDB).unwrap())?;
        fdb.insert(
            FdbKey {
                net_id: NET_VLAN,
                vid: 0,
                mac: other,
            },
            FdbEntry {
                ifindex: ib,
                flags: FDB_F_STATIC,
                last_seen_ns: 0,
            },
            0,
        )?;
    }
    run(&ebpf, "unicast", names::PROG_TC, 0, ia, &mut plain(None))?;
    set_ports(&mut ebpf, &[(ia, none)])?;
    run(
        &ebpf,
        "unicast-open",
        names::PROG_TC,
        0,
        ia,
        &mut plain(None),
    )?;
    // Routed: guest -> gateway MAC -> FIB -> uplink.
    let routed = PortConfig {
        net_id: NET_RT,
        flags: PORT_F_ROUTED_NET,
        ..Default::default()
    };
    set_ports(&mut ebpf, &[(ia, guarded(routed, guest, g_ip))])?;
    let mut rt = |_| ip_frame(guest, gw_mac, g_ip, o_ip, 12345, 5201, None);
    run(&ebpf, "routed", names::PROG_TC, 0, ia, &mut rt)?;
    // Routed IPv6 likewise (the network advertises a prefix: SLAAC guests).
    let routed6 = PortConfig {
        flags: PORT_F_ROUTED_NET | PORT_F_V6_SLAAC,
        ..routed
    };
    set_ports(&mut ebpf, &[(ia, guarded(routed6, guest, g_ip))])?;
    let (g6, o6): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        ("2001:db8:10::1".parse()?, "2001:db8:77::2".parse()?);
    let mut rt6 = |_| ip6_frame(guest, gw_mac, g6, o6, 12345, 5201);
    run(&ebpf, "routed-v6", names::PROG_TC, 0, ia, &mut rt6)?;
    // NAT.
    let natp = PortConfig {
        net_id: NET_NAT,
        flags: PORT_F_ROUTED_NET,
        ..Default::default()
    };
    let uplink = PortConfig {
        net_id: 0,
        flags: PORT_F_UPLINK_ROUTED | PORT_F_UPLINK_NAT,
        ..Default::default()
    };
    set_ports(
        &mut ebpf,
        &[(ia, guarded(natp, guest, g_ip)), (iup, uplink)],
    )?;
    let sizes: Vec<u32> = ct_sizes
        .split(',')
        .map(|s| s.trim().parse())
        .collect::<Result<_, _>>()
        .context("--ct-sizes")?;
    let mut have = 0u32;
    let mut fills = Vec::new();
    let mut sport_base = 1000u32;
    for &size in &sizes {
        {
            let mut ct: HashMap<&mut MapData, CtKey, CtEntry> =
                HashMap::try_from(ebpf.map_mut(names::MAP_CT).unwrap())?;
            // The bench's own flows below add a few entries on top.
            let want = size.saturating_sub(2) & !1;
            let secs = ct_resize(&mut ct, have, want)?;
            fills.push(json!({"from": have, "to": want, "secs": secs}));
            have = want;
        }
        // Established: the same flow every packet (the first creates it).
        let est = |_| ip_frame(guest, gw_mac, g_ip, o_ip, 50000, 5201, None);
        let out = run(&ebpf, "nat-established", names::PROG_TC, size, ia, &mut {
            est
        })?;
        // The translation: source port chosen for the flow.
        let (nsrc, nsport) = (
            [out[26], out[27], out[28], out[29]],
            u16::from_be_bytes([out[34], out[35]]),
        );
        if nsrc != [192, 168, 77, 1] {
            bail!("nat-established: not translated (source {nsrc:?})");
        }
        // The same flow from the same port without port security.
        set_ports(&mut ebpf, &[(ia, natp)])?;
        run(
            &ebpf,
            "nat-established-open",
            names::PROG_TC,
            size,
            ia,
            &mut { est },
        )?;
        set_ports(&mut ebpf, &[(ia, guarded(natp, guest, g_ip))])?;
        // Reply: outside -> uplink address, to the uplink's MAC.
        let mut reply = |_| {
            ip_frame(
                [0x02, 0xbb, 0, 0, 0, 2],
                up_mac,
                o_ip,
                nsrc,
                5201,
                nsport,
                None,
            )
        };
        run(&ebpf, "nat-reply", names::PROG_TC, size, iup, &mut reply)?;
        // New flows: a fresh source port every packet.
        let base = sport_base;
        let mut newf = |i: u32| ip_frame(guest, gw_mac, g_ip, o_ip, (base + i) as u16, 5201, None);
        run(&ebpf, "nat-new", names::PROG_TC, size, ia, &mut newf)?;
        // Drop those flows again (and the established one).
        let mut ct: HashMap<&mut MapData, CtKey, CtEntry> =
            HashMap::try_from(ebpf.map_mut(names::MAP_CT).unwrap())?;
        let mut removed = 0u32;
        for sport in (base..base + n).chain([50000]) {
            let k = CtKey {
                saddr: be_addr(g_ip),
                daddr: be_addr(o_ip),
                sport: sport as u16,
                dport: 5201,
                proto: IPPROTO_UDP,
                _pad: [0; 3],
            };
            if let Ok(e) = ct.get(&k, 0) {
                let _ = ct.remove(&e.rewrite.reply());
                let _ = ct.remove(&k);
                removed += 2;
            }
        }
        if removed < n {
            eprintln!("kvnet-bench: only {removed} conntrack entries made by {n} new flows");
        }
        sport_base = if base + 2 * n < 30000 { base + n } else { 1000 };
    }
    Ok(json!({"runs": n, "rows": rows, "ct_fill": fills,
        "ifindex": {"a": ia, "b": ib, "gw": igw, "uplink": iup}}))
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    Ok(s.parse::<kvnet_userspace::mac::Mac>()?.0)
}

/// The MAC of `name` in this netns.
fn iface_mac(name: &str) -> Result<[u8; 6]> {
    Ok(kvnet_userspace::netdev::mac(name)?.0)
}

/// The bench's 64-byte frame (one UDP flow) as a trafgen packet config.
fn trafgen_frame(
    src: &str,
    dst: &str,
    sip: std::net::Ipv4Addr,
    dip: std::net::Ipv4Addr,
) -> Result<serde_json::Value> {
    let f = ip_frame(
        parse_mac(src)?,
        parse_mac(dst)?,
        sip.octets(),
        dip.octets(),
        12345,
        5001,
        None,
    );
    let bytes: Vec<String> = f.iter().map(|b| format!("0x{b:02x}")).collect();
    Ok(json!({"trafgen": format!("{{ {} }}", bytes.join(", ")), "len": f.len()}))
}

/// Attaches to tap `name` (created by the caller) as its hypervisor would.
fn tap_open(name: &str) -> Result<std::os::fd::OwnedFd> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain libc calls with checked results.
    let raw = unsafe { libc::open(c"/dev/net/tun".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("open /dev/net/tun");
    }
    // SAFETY: a fresh descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    #[repr(C)]
    struct IfReq {
        name: [u8; 16],
        flags: u16,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; 16],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI) as u16,
        _pad: [0; 22],
    };
    let n = name.len().min(15);
    req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
    // SAFETY: TUNSETIFF reads and writes an ifreq we own.
    let rc = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut IfReq) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("TUNSETIFF {name}"));
    }
    Ok(fd)
}

/// Writes `count` 64-byte frames src -> dst into the tap (or stops at
/// `secs`), one write(2) per frame like qemu's userspace virtio backend.
fn tap_gen(tap: &str, count: u32, secs: f64, src: &str, dst: &str) -> Result<serde_json::Value> {
    let fd = tap_open(tap)?;
    let frame = udp_frame(parse_mac(src)?, parse_mac(dst)?);
    let deadline = std::time::Duration::from_secs_f64(secs);
    let t = Instant::now();
    let (mut sent, mut errors) = (0u32, 0u32);
    let mut first_err = None;
    while sent + errors < count {
        match nix::unistd::write(&fd, &frame) {
            Ok(_) => sent += 1,
            Err(e) => {
                errors += 1;
                first_err.get_or_insert(e);
            }
        }
        if (sent + errors) % 1024 == 0 && t.elapsed() > deadline {
            break;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    if sent == 0 {
        bail!("no frame written into {tap}: {first_err:?}");
    }
    Ok(json!({"sent": sent, "errors": errors, "secs": secs,
        "first_error": first_err.map(|e| e.to_string())}))
}

/// Announces `mac` on the tap (one broadcast frame), prints a ready line,
/// then counts the 64-byte frames to `mac` until none came for `idle_ms`
/// after the first, or `secs` pass.
fn tap_sink(tap: &str, mac: &str, secs: f64, idle_ms: u64) -> Result<serde_json::Value> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let fd = tap_open(tap)?;
    let me = parse_mac(mac)?;
    let hello = ip_frame(
        me,
        [0xff; 6],
        [10, 0, 0, 2],
        [10, 0, 0, 255],
        5001,
        5001,
        None,
    );
    nix::unistd::write(&fd, &hello).context("announcing the sink's MAC")?;
    println!("{}", json!({"ready": true}));
    std::io::stdout().flush()?;
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(secs);
    let idle = std::time::Duration::from_millis(idle_ms);
    let mut buf = vec![0u8; 2048];
    let (mut frames, mut other) = (0u64, 0u64);
    let (mut first, mut last) = (None::<Instant>, Instant::now());
    loop {
        let now = Instant::now();
        if now > deadline || (first.is_some() && now.duration_since(last) > idle) {
            break;
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let rc = unsafe { libc::poll(&mut pfd, 1, 50) };
        if rc <= 0 {
            continue;
        }
        let n = nix::unistd::read(fd.as_raw_fd(), &mut buf).context("reading the tap")?;
        if n >= 14 && buf[..6] == me {
            frames += 1;
            last = Instant::now();
            first.get_or_insert(last);
        } else {
            other += 1;
        }
    }
    let span = first
        .map(|f| last.duration_since(f).as_secs_f64())
        .unwrap_or(0.0);
    Ok(json!({"frames": frames, "other": other, "span_secs": span}))
}

/// Accepts connections on `port` and closes each at once (the server's
/// FIN first, so the client's ports are free again), until `count` or
/// `secs`.
fn conn_server(port: u16, count: u32, secs: f64) -> Result<serde_json::Value> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let l =
        std::net::TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind {port}"))?;
    l.set_nonblocking(true)?;
    println!("{}", json!({"ready": true}));
    std::io::stdout().flush()?;
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(secs);
    let mut accepted = 0u32;
    while accepted < count && Instant::now() < deadline {
        match l.accept() {
            Ok((s, _)) => {
                accepted += 1;
                drop(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let mut pfd = libc::pollfd {
                    fd: l.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one pollfd we own.
                unsafe { libc::poll(&mut pfd, 1, 50) };
            }
            Err(e) => return Err(e).context("accept"),
        }
    }
    Ok(json!({"accepted": accepted}))
}

/// `count` short TCP connections to `to` from `threads` threads: connect,
/// wait for the server's close, close. Stops at `secs`.
fn conn_rate(
    to: std::net::SocketAddr,
    count: u32,
    secs: f64,
    threads: u32,
) -> Result<serde_json::Value> {
    use std::io::Read;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    let next = Arc::new(AtomicU32::new(0));
    let deadline = Instant::now() + std::time::Duration::from_secs_f64(secs);
    let t = Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let next = next.clone();
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u32, 0u32);
                let mut first_err = None;
                let mut buf = [0u8; 16];
                while next.fetch_add(1, Ordering::Relaxed) < count && Instant::now() < deadline {
                    let r = std::net::TcpStream::connect_timeout(
                        &to,
                        std::time::Duration::from_secs(1),
                    )
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(std::time::Duration::from_secs(1)))?;
                        s.read(&mut buf)
                    });
                    match r {
                        Ok(_) => ok += 1,
                        Err(e) => {
                            failed += 1;
                            first_err.get_or_insert(e.to_string());
                        }
                    }
                }
                (ok, failed, first_err)
            })
        })
        .collect();
    let (mut ok, mut failed, mut first_err) = (0u32, 0u32, None);
    for w in workers {
        let (o, f, e) = w.join().map_err(|_| anyhow!("connect worker panicked"))?;
        ok += o;
        failed += f;
        if first_err.is_none() {
            first_err = e;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({"connections": ok, "failed": failed, "secs": secs,
        "per_sec": ok as f64 / secs, "first_error": first_err}))
}
