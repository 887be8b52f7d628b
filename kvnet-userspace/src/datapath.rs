//! The loaded eBPF object: programs pinned and attached to ports, and typed
//! access to the maps (pinned by name under the pin folder).
use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues},
    programs::{
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
        xdp::XdpLinkId,
        SchedClassifier, TcAttachType, TestRun, TestRunOptions, TestRunResult, Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use kvnet_common::{
    names, CtEntry, CtKey, FdbEntry, FdbKey, FloodKey, FloodSet, ForwardKey, ForwardTarget,
    NatStats, NetConfig, PortConfig, PortStats, VlanMember, VlanMemberKey,
};

/// The datapath object built by build.rs from kvnet-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kvnet"));

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: StdHashMap<u32, PortLinks>,
    pub ct_capacity: u32,
    /// tc egress links on bridged uplinks.
    egress_links: StdHashMap<u32, SchedClassifierLinkId>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
}

#[derive(Default)]
struct PortLinks {
    tc: Option<SchedClassifierLinkId>,
    xdp: Option<XdpLinkId>,
}

impl Datapath {
    /// Loads the object, pins maps and programs under `pin_dir` (which must
    /// be on a bpffs and free of a previous run's pins).
    pub fn load(pin_dir: &Path, log_datapath: bool) -> Result<Self> {
        Self::load_with(pin_dir, log_datapath, None)
    }

    /// `ct_max`: conntrack capacity in entries (two per flow).
    pub fn load_with(pin_dir: &Path, log_datapath: bool, ct_max: Option<u32>) -> Result<Self> {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating the pin folder {}", pin_dir.display()))?;
        Self::load_pinned(pin_dir, log_datapath, ct_max).inspect_err(|_| {
            // Nothing half-applied: a failed load leaves no pins behind.
            let _ = std::fs::remove_dir_all(pin_dir);
        })
    }

    fn load_pinned(pin_dir: &Path, log_datapath: bool, ct_max: Option<u32>) -> Result<Self> {
        // aya-log's level word: 0 keeps every log statement off the hot path.
        let level: u8 = if log_datapath { 4 } else { 0 };
        let ct_capacity = ct_max.unwrap_or(kvnet_common::MAX_CT_ENTRIES);
        let mut ebpf = EbpfLoader::new()
            .set_max_entries(names::MAP_CT, ct_capacity)
            .default_map_pin_directory(pin_dir)
            .override_global("AYA_LOG_LEVEL", &level, false)
            .load(OBJECT)
            .context("loading the kvnet eBPF object")?;
        let logger = if log_datapath {
            Some(aya_log::EbpfLogger::init(&mut ebpf).context("starting the datapath logger")?)
        } else {
            None
        };
        {
            let xdp: &mut Xdp = program(&mut ebpf, names::PROG_XDP)?.try_into()?;
            xdp.load().context("loading the XDP program (verifier)")?;
            xdp.pin(pin_dir.join(names::PROG_XDP))
                .context("pinning the XDP program")?;
        }
        {
            let tc: &mut SchedClassifier = program(&mut ebpf, names::PROG_TC)?.try_into()?;
            tc.load().context("loading the tc program (verifier)")?;
            tc.pin(pin_dir.join(names::PROG_TC))
                .context("pinning the tc program")?;
        }
        {
            let tc: &mut SchedClassifier = program(&mut ebpf, names::PROG_TC_OUT)?.try_into()?;
            tc.load()
                .context("loading the tc egress program (verifier)")?;
            tc.pin(pin_dir.join(names::PROG_TC_OUT))
                .context("pinning the tc egress program")?;
        }
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            links: StdHashMap::new(),
            egress_links: StdHashMap::new(),
            logger,
            ct_capacity,
        })
    }

    /// Forwards the datapath's log records (if on) to the daemon's log.
    pub fn flush_log(&mut self) {
        if let Some(l) = self.logger.as_mut() {
            l.flush();
        }
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Attaches tc ingress, and XDP too when `with_xdp`. All or nothing.
    pub fn attach(&mut self, iface: &str, ifindex: u32, with_xdp: bool) -> Result<()> {
        let mut links = PortLinks::default();
        let tc: &mut SchedClassifier = program(&mut self.ebpf, names::PROG_TC)?.try_into()?;
        // A clsact filter (netlink) rather than a TCX link: the admin's
        // `bpftool net show` and `tc filter show` list it.
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(e).with_context(|| format!("adding the clsact qdisc to '{iface}'"));
            }
        }
        links.tc = Some(
            tc.attach_with_options(
                iface,
                TcAttachType::Ingress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .with_context(|| format!("attaching the tc program to '{iface}'"))?,
        );
        if with_xdp {
            let xdp: &mut Xdp = program(&mut self.ebpf, names::PROG_XDP)?.try_into()?;
            let attached = xdp
                .attach_to_if_index(ifindex, XdpMode::Driver)
                .or_else(|_| xdp.attach_to_if_index(ifindex, XdpMode::Skb));
            match attached {
                Ok(id) => links.xdp = Some(id),
                Err(e) => {
                    self.links.insert(ifindex, links);
                    self.detach(ifindex);
                    return Err(e)
                        .with_context(|| format!("attaching the XDP program to '{iface}'"));
                }
            }
        }
        self.links.insert(ifindex, links);
        Ok(())
    }

    /// Attaches the egress program (bridged uplinks: the host's frames to
    /// guests). The clsact qdisc is already there from `attach`.
    pub fn attach_egress(&mut self, iface: &str, ifindex: u32) -> Result<()> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, names::PROG_TC_OUT)?.try_into()?;
        let id = tc
            .attach_with_options(
                iface,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions::default()),
            )
            .with_context(|| format!("attaching the tc egress program to '{iface}'"))?;
        self.egress_links.insert(ifindex, id);
        Ok(())
    }

    pub fn has_egress(&self, ifindex: u32) -> bool {
        self.egress_links.contains_key(&ifindex)
    }

    pub fn nat_subnets(&mut self) -> Result<aya::maps::lpm_trie::LpmTrie<&mut MapData, u32, u32>> {
        Ok(aya::maps::lpm_trie::LpmTrie::try_from(map(&mut self.ebpf, names::MAP_NAT_SUBNETS)?)?)
    }

    pub fn detach_egress(&mut self, ifindex: u32) {
        let Some(id) = self.egress_links.remove(&ifindex) else {
            return;
        };
        if let Ok(tc) = program(&mut self.ebpf, names::PROG_TC_OUT)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(anyhow::Error::from))
        {
            let _ = tc.detach(id);
        }
    }

    pub fn ct(&mut self) -> Result<HashMap<&mut MapData, CtKey, CtEntry>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_CT)?)?)
    }

    pub fn forwards(&mut self) -> Result<HashMap<&mut MapData, ForwardKey, ForwardTarget>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_FORWARDS,
        )?)?)
    }

    /// Creates (or zeroes) a network's NAT counters.
    pub fn reset_nat_stats(&mut self, net_id: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let zero = PerCpuValues::try_from(vec![NatStats::default(); cpus])?;
        let mut m: PerCpuHashMap<&mut MapData, u32, NatStats> =
            PerCpuHashMap::try_from(map(&mut self.ebpf, names::MAP_NAT_STATS)?)?;
        m.insert(net_id, zero, 0)
            .context("creating the NAT counters")?;
        Ok(())
    }

    pub fn remove_nat_stats(&mut self, net_id: u32) {
        if let Ok(m) = map(&mut self.ebpf, names::MAP_NAT_STATS) {
            if let Ok(mut m) = PerCpuHashMap::<&mut MapData, u32, NatStats>::try_from(m) {
                let _ = m.remove(&net_id);
            }
        }
    }

    pub fn nat_stats(&mut self, net_id: u32) -> Result<NatStats> {
        let m: PerCpuHashMap<&mut MapData, u32, NatStats> =
            PerCpuHashMap::try_from(map(&mut self.ebpf, names::MAP_NAT_STATS)?)?;
        let mut total = NatStats::default();
        if let Ok(values) = m.get(&net_id, 0) {
            for v in values.iter() {
                total.add(v);
            }
        }
        Ok(total)
    }

    pub fn nets(&mut self) -> Result<HashMap<&mut MapData, u32, NetConfig>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_NETS)?)?)
    }

    pub fn gw_hosts(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_GW_HOSTS,
        )?)?)
    }

    /// Detaches whatever is attached to `ifindex`. Errors are ignored: the
    /// device may already be gone, which detaches everything by itself.
    pub fn detach(&mut self, ifindex: u32) {
        let Some(links) = self.links.remove(&ifindex) else {
            return;
        };
        if let Some(id) = links.xdp {
            if let Ok(xdp) = program(&mut self.ebpf, names::PROG_XDP)
                .and_then(|p| <&mut Xdp>::try_from(p).map_err(anyhow::Error::from))
            {
                let _ = xdp.detach(id);
            }
        }
        if let Some(id) = links.tc {
            if let Ok(tc) = program(&mut self.ebpf, names::PROG_TC)
                .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(anyhow::Error::from))
            {
                let _ = tc.detach(id);
            }
        }
    }

    pub fn ports(&mut self) -> Result<HashMap<&mut MapData, u32, PortConfig>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_PORTS)?)?)
    }

    pub fn fdb(&mut self) -> Result<HashMap<&mut MapData, FdbKey, FdbEntry>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_FDB)?)?)
    }

    pub fn flood(&mut self) -> Result<HashMap<&mut MapData, FloodKey, FloodSet>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_FLOOD)?)?)
    }

    pub fn vlan_members(&mut self) -> Result<HashMap<&mut MapData, VlanMemberKey, VlanMember>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_VLAN_MEMBERS,
        )?)?)
    }

    pub fn port_stats(&mut self) -> Result<PerCpuHashMap<&mut MapData, u32, PortStats>> {
        Ok(PerCpuHashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_PORT_STATS,
        )?)?)
    }

    /// Creates (or zeroes) a port's counters.
    pub fn reset_stats(&mut self, ifindex: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let zero = PerCpuValues::try_from(vec![PortStats::default(); cpus])?;
        self.port_stats()?
            .insert(ifindex, zero, 0)
            .context("creating the port's counters")?;
        Ok(())
    }

    /// Sums a port's per-CPU counters.
    pub fn stats(&mut self, ifindex: u32) -> Result<PortStats> {
        let mut total = PortStats::default();
        if let Ok(values) = self.port_stats()?.get(&ifindex, 0) {
            for v in values.iter() {
                total.add(v);
            }
        }
        Ok(total)
    }
}

/// One BPF_PROG_RUN of a kvnet program over a frame: its verdict, the
/// kernel-measured mean time per run and the frame as the program left it.
pub struct ProgRun {
    pub verdict: u32,
    pub per_run: std::time::Duration,
    pub frame: Vec<u8>,
}

impl Datapath {
    /// Runs `kvnet_xdp` on `frame` as if it arrived on `ingress` (which must
    /// be an existing device of this netns; redirects are not carried out).
    pub fn run_xdp(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> Result<ProgRun> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let md: [u32; 6] = [0, frame.len() as u32, 0, ingress, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let xdp: &mut Xdp = program(&mut self.ebpf, names::PROG_XDP)?.try_into()?;
        run(xdp, frame, Some(&ctx), repeat)
    }

    /// Runs `kvnet_tc` on `frame`; the kernel presents it as received on lo.
    pub fn run_tc(&mut self, frame: &[u8], repeat: u32) -> Result<ProgRun> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, names::PROG_TC)?.try_into()?;
        run(tc, frame, None, repeat)
    }
}

fn run<P>(prog: &P, frame: &[u8], ctx: Option<&[u8]>, repeat: u32) -> Result<ProgRun>
where
    P: for<'a> TestRun<Opts<'a> = TestRunOptions<'a>, Result = TestRunResult>,
{
    // Room for tags a program may push.
    let mut out = vec![0u8; frame.len() + 256];
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(frame);
    opts.data_out = Some(&mut out);
    opts.ctx_in = ctx;
    opts.repeat = repeat.max(1);
    let r = prog.test_run(opts).context("BPF_PROG_RUN")?;
    out.truncate(r.data_size_out as usize);
    Ok(ProgRun {
        verdict: r.return_value,
        per_run: r.duration,
        frame: out,
    })
}

impl Drop for Datapath {
    fn drop(&mut self) {
        let ports: Vec<u32> = self.links.keys().copied().collect();
        for ifindex in ports {
            self.detach(ifindex);
        }
        let uplinks: Vec<u32> = self.egress_links.keys().copied().collect();
        for ifindex in uplinks {
            self.detach_egress(ifindex);
        }
        // Pins outlive the process; a stopped daemon leaves none behind.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

#[cfg(test)]
#[path = "datapath_tests.rs"]
mod tests;
