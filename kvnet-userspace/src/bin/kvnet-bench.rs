//! `kvnet-bench`: the eBPF side of `cargo xtask bench`. Each subcommand does
//! one thing and prints one JSON object on stdout; xtask runs it inside the
//! right lab namespace (ifindexes and BPF_PROG_RUN's `lo` are per netns).
//!
//! * `setup DIR`: loads the object's bench programs (`bench_redirect`,
//!   `bench_sink`, `bench_gen`) and pins them with their maps under DIR, for
//!   `tc ... object-pinned` and `ip link ... xdp pinned`.
//! * `peer DIR A B`: the limit program redirects A -> B and B -> A.
//! * `count DIR [--reset]`: the sink's per-CPU frame/byte counters, summed.
//! * `gen DIR IFACE`: BPF_PROG_RUN live frames (XDP_TX out of IFACE).
//! * `cost DIR`: per-packet ns of kvnet_tc / kvnet_xdp / the limit through
//!   BPF_PROG_RUN with `repeat`, for several FDB sizes.
use std::{
    ffi::CString,
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
    names, FdbEntry, FdbKey, FloodKey, FloodSet, PortConfig, PortStats, FDB_F_STATIC,
    PORT_F_XDP_TX,
};
use serde_json::json;

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kvnet"));

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
        } => gen(&dir, &iface, count, batch, &src, &dst),
        Cmd::Cost {
            dir,
            a,
            b,
            sizes,
            repeat,
            trials,
            only,
        } => cost(&dir, &a, &b, &sizes, repeat, trials, only.as_deref()),
    };
    match r {
        Ok(v) => println!("{v}"),
        Err(e) => {
            eprintln!("kvnet-bench: {e:#}");
            std::process::exit(1);
        }
    }
}

fn load(dir: &Path) -> Result<Ebpf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let level: u8 = 0;
    EbpfLoader::new()
        .default_map_pin_directory(dir)
        .override_global("AYA_LOG_LEVEL", &level, false)
        .load(OBJECT)
        .context("loading the kvnet eBPF object")
}

fn ifindex(name: &str) -> Result<u32> {
    let c = CString::new(name)?;
    match unsafe { libc::if_nametoindex(c.as_ptr()) } {
        0 => bail!("no interface {name} in this netns"),
        i => Ok(i),
    }
}

fn parse_mac(s: &str) -> Result<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16))
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad MAC {s}"))?;
    v.try_into().map_err(|_| anyhow!("bad MAC {s}"))
}

fn setup(dir: &Path) -> Result<serde_json::Value> {
    let mut ebpf = load(dir)?;
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
fn udp_frame(src: [u8; 6], dst: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&[0x08, 0x00]);
    let payload = [0x5au8; 18];
    let udp_len = 8 + payload.len() as u16;
    let ip_len = 20 + udp_len;
    let (sip, dip) = ([10u8, 0, 0, 1], [10u8, 0, 0, 2]);
    let mut ip = vec![
        0x45, 0, (ip_len >> 8) as u8, ip_len as u8, 0, 0, 0x40, 0, 64, 17, 0, 0,
    ];
    ip.extend_from_slice(&sip);
    ip.extend_from_slice(&dip);
    let c = !fold(sum(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    f.extend_from_slice(&ip);
    let mut udp = vec![0x30, 0x39, 0x13, 0x89, (udp_len >> 8) as u8, udp_len as u8, 0, 0];
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
) -> Result<serde_json::Value> {
    let ifi = ifindex(iface)?;
    // A fresh load of the generator; the object's maps are the ones pinned
    // under DIR by `setup`, so nothing big is allocated again.
    let mut ebpf = load(dir)?;
    let prog: &mut Xdp = ebpf
        .program_mut("bench_gen")
        .ok_or_else(|| anyhow!("bench_gen missing"))?
        .try_into()?;
    prog.load()?;
    let prog = &*prog;
    let frame = udp_frame(parse_mac(src)?, parse_mac(dst)?);
    let ctx = xdp_ctx(frame.len(), ifi);
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&frame);
    opts.ctx_in = Some(&ctx);
    opts.repeat = count;
    opts.attrs = TestRunAttrs::new().xdp_live_frames(batch);
    let t = Instant::now();
    let r = prog
        .test_run(opts)
        .context("BPF_PROG_RUN live frames")?;
    let secs = t.elapsed().as_secs_f64();
    Ok(json!({"sent": count, "secs": secs, "verdict": r.return_value, "frame_len": frame.len()}))
}

fn run_once<P>(prog: &P, frame: &[u8], ctx: Option<&[u8]>, repeat: u32) -> Result<(u32, f64)>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = aya::programs::TestRunResult>,
{
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx;
    opts.repeat = repeat.max(1);
    let r = prog.test_run(opts).context("BPF_PROG_RUN")?;
    Ok((r.return_value, r.duration.as_nanos() as f64))
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
    let mut ebpf = load(dir)?;
    for name in [names::PROG_TC, "bench_redirect"] {
        let p: &mut SchedClassifier = ebpf
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
    let cpus = nr_cpus().map_err(|(_, e)| e)?;
    // Ports: lo (where tc test frames arrive), a (XDP ingress), b (egress).
    let set_ports = |ebpf: &mut Ebpf, b_flags: u32| -> Result<()> {
        let mut ports: HashMap<&mut MapData, u32, PortConfig> =
            HashMap::try_from(ebpf.map_mut(names::MAP_PORTS).unwrap())?;
        for (i, flags) in [(lo, 0), (ia, 0), (ib, b_flags)] {
            ports.insert(
                i,
                PortConfig {
                    net_id: NET,
                    flags,
                    ..Default::default()
                },
                0,
            )?;
        }
        Ok(())
    };
    set_ports(&mut ebpf, 0)?;
    {
        let mut stats: aya::maps::PerCpuHashMap<&mut MapData, u32, PortStats> =
            aya::maps::PerCpuHashMap::try_from(ebpf.map_mut(names::MAP_PORT_STATS).unwrap())?;
        for i in [lo, ia, ib] {
            stats.insert(i, PerCpuValues::try_from(vec![PortStats::default(); cpus])?, 0)?;
        }
        let mut flood: HashMap<&mut MapData, FloodKey, FloodSet> =
            HashMap::try_from(ebpf.map_mut(names::MAP_FLOOD).unwrap())?;
        let mut set = FloodSet::default();
        set.count = 2;
        set.ifindex[0] = ia;
        set.ifindex[1] = ib;
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
            HashMap::try_from(ebpf.map_mut("bench_peer").unwrap())?;
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
        let mut measure = |ebpf: &mut Ebpf,
                           path: &str,
                           prog: &str,
                           frame: &[u8],
                           rep: u32|
         -> Result<()> {
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
        measure(&mut ebpf, "unicast", names::PROG_XDP, &unicast, repeat)?;
        set_ports(&mut ebpf, PORT_F_XDP_TX)?;
        measure(&mut ebpf, "unicast-xdp-redirect", names::PROG_XDP, &unicast, repeat)?;
        set_ports(&mut ebpf, 0)?;
        measure(&mut ebpf, "unicast", "bench_redirect", &unicast, repeat)?;
        // Floods clone the frame into both real veths: far fewer repeats.
        measure(&mut ebpf, "flood", names::PROG_TC, &bcast, (repeat / 20).max(1))?;
        measure(&mut ebpf, "flood", names::PROG_XDP, &bcast, repeat)?;
    }
    Ok(json!({"repeat": repeat, "trials": trials, "rows": rows, "fill": fill_secs,
        "ifindex": {"lo": lo, "a": ia, "b": ib}}))
}
