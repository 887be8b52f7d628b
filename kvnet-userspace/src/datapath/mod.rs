//! The loaded eBPF object: programs pinned and attached to ports, and typed
//! access to the maps (pinned by name under the pin folder).

pub mod batch;
pub mod layout;
use std::{
    collections::HashMap as StdHashMap,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, bail, Context, Result};
use aya::{
    maps::{HashMap, MapData, PerCpuHashMap, PerCpuValues, ProgramArray},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{
            self, NlOptions, SchedClassifierLink, SchedClassifierLinkId, TcAttachOptions, TcHandle,
        },
        xdp::XdpLink,
        SchedClassifier, TcAttachType, TestRun, TestRunOptions, TestRunResult, Xdp, XdpMode,
    },
    util::nr_cpus,
    Ebpf, EbpfLoader,
};
use kvnet_common::{
    names, Addr6, Ct6Entry, Ct6Key, CtEntry, CtKey, FdbEntry, FdbKey, FloodKey, FloodSet,
    Forward6Target, ForwardKey, ForwardTarget, FragKey, FragPorts, Nat6Config, NatMapKey,
    NatMapping, NatStats, NeighEntry, NeighKey, NetConfig, PortConfig, PortPolicy, PortStats,
    V6Owner, V6OwnerKey, VlanMember, VlanMemberKey,
};

/// The datapath object built by build.rs from kvnet-ebpf.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kvnet-datapath"));

/// The datapath's eBPF object.
pub fn object() -> &'static [u8] {
    OBJECT
}

/// The benchmark's own eBPF object (`kvnet-bench`): the redirect-only
/// limit, a sink and a generator, never loaded by the daemon.
pub fn bench_object() -> &'static [u8] {
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/kvnet-bench"))
}

/// Where an upgrade keeps the older datapath's pins until it commits.
const PREVIOUS: &str = "previous";

/// kvnet's tc filters sit at this priority and handle, so a restarted
/// daemon finds them and swaps its program in atomically (a cls_bpf
/// replace at the same priority/handle), with no moment without a filter.
pub const TC_PRIO: u16 = 0x4b56;
pub const TC_HANDLE: TcHandle = TcHandle::new(0, 1);

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    links: StdHashMap<u32, PortLinks>,
    pub ct_capacity: u32,
    /// tc egress links on bridged uplinks.
    egress_links: StdHashMap<u32, SchedClassifierLinkId>,
    /// Uplink group devices: their egress program stays while the group
    /// does, whichever network stops using it.
    group_egress: std::collections::HashSet<u32>,
    logger: Option<aya_log::EbpfLogger<&'static dyn log::Log>>,
    /// A restarted daemon taking over a running datapath: attachments are
    /// replaced in place and existing counters kept.
    pub adopting: bool,
    /// On drop, leave programs attached and pinned (daemon stop or
    /// restart); false: detach and unpin everything (`kvnet down`, errors).
    pub keep_on_exit: bool,
    /// Taking over an older layout's datapath, until it commits.
    upgrade: Option<Upgrade>,
}

/// An upgrade in place: this daemon's maps were created fresh and filled
/// from the older datapath's, whose pins wait under `previous/` so that a
/// failure can put every interface back on the old programs.
struct Upgrade {
    from: u32,
    /// Pins of the older datapath (maps and programs), moved aside.
    moved: Vec<String>,
    /// Interfaces whose program this daemon replaced or added, in order.
    swapped: Vec<Swapped>,
    /// The first failure while swapping: the upgrade cannot commit.
    failed: Option<String>,
}

struct Swapped {
    iface: String,
    ifindex: u32,
    hook: Hook,
    /// False: the interface had no kvnet program before.
    replaced: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    TcIngress,
    TcEgress,
    Xdp,
}

/// `KVNET_FAIL_TAKEOVER=step` makes an upgrade fail at that step (the
/// rollback's test): `convert`, `swap` (after the first interface), `commit`.
fn induced_failure(step: &str) -> Result<()> {
    if std::env::var("KVNET_FAIL_TAKEOVER").is_ok_and(|s| s == step) {
        bail!("failure induced at step '{step}' (KVNET_FAIL_TAKEOVER)");
    }
    Ok(())
}

#[derive(Default)]
struct PortLinks {
    tc: Option<SchedClassifierLinkId>,
    /// XDP through a bpf_link, pinned (survives the daemon). XDP is only
    /// attached that way (a netlink attachment is refused).
    xdp_pin: Option<PathBuf>,
}

/// Where an XDP link of `ifindex` is pinned.
pub(crate) fn xdp_link_pin(pin_dir: &Path, ifindex: u32) -> PathBuf {
    pin_dir.join("links").join(format!("xdp_{ifindex}"))
}

impl Datapath {
    /// Loads the object, pins maps and programs under `pin_dir` (which must
    /// be on a bpffs and free of a previous run's pins). (The PROG_RUN
    /// tests' entry; the daemon sizes conntrack with `load_with`.)
    #[cfg_attr(not(test), allow(dead_code))]
    pub fn load(pin_dir: &Path, log_datapath: bool) -> Result<Self> {
        Self::load_with(pin_dir, log_datapath, None)
    }

    /// `ct_max`: conntrack capacity in entries (two per flow).
    pub fn load_with(pin_dir: &Path, log_datapath: bool, ct_max: Option<u32>) -> Result<Self> {
        std::fs::create_dir_all(pin_dir)
            .with_context(|| format!("creating the pin folder {}", pin_dir.display()))?;
        Self::load_pinned(pin_dir, log_datapath, ct_max, false)
            .and_then(|dp| crate::datapath::layout::record(pin_dir).map(|_| dp))
            .inspect_err(|_| {
                // Nothing half-applied: a failed load leaves no pins behind.
                let _ = std::fs::remove_dir_all(pin_dir);
            })
    }

    /// Takes over a running datapath pinned under `pin_dir`: the pinned
    /// maps (FDB, conntrack, ...) are reused as they are, freshly loaded
    /// programs replace the pinned ones, and `attach` swaps them into the
    /// existing attachments. A failure leaves the running datapath alone.
    pub fn adopt(pin_dir: &Path, log_datapath: bool, ct_max: Option<u32>) -> Result<Self> {
        let mut dp = Self::load_pinned(pin_dir, log_datapath, ct_max, true)?;
        dp.adopting = true;
        dp.keep_on_exit = true;
        Ok(dp)
    }

    fn load_pinned(
        pin_dir: &Path,
        log_datapath: bool,
        ct_max: Option<u32>,
        replace_pins: bool,
    ) -> Result<Self> {
        // The old program objects stay alive while attached; their pins
        // make room for the new ones.
        let repin = |path: PathBuf| -> PathBuf {
            if replace_pins {
                let _ = std::fs::remove_file(&path);
            }
            path
        };
        // aya-log's level word: 0 keeps every log statement off the hot path.
        let level: u8 = if log_datapath { 4 } else { 0 };
        let ct_capacity = ct_max.unwrap_or(kvnet_common::MAX_CT_ENTRIES);
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::MAP_CT, ct_capacity)
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
            xdp.pin(repin(pin_dir.join(names::PROG_XDP)))
                .context("pinning the XDP program")?;
        }
        {
            let tc: &mut SchedClassifier = program(&mut ebpf, names::PROG_TC)?.try_into()?;
            tc.load().context("loading the tc program (verifier)")?;
            tc.pin(repin(pin_dir.join(names::PROG_TC)))
                .context("pinning the tc program")?;
        }
        load_savi(&mut ebpf, Some(&repin(pin_dir.join(names::PROG_SAVI))))?;
        {
            let tc: &mut SchedClassifier = program(&mut ebpf, names::PROG_TC_OUT)?.try_into()?;
            tc.load()
                .context("loading the tc egress program (verifier)")?;
            tc.pin(repin(pin_dir.join(names::PROG_TC_OUT)))
                .context("pinning the tc egress program")?;
        }
        load_nat6(&mut ebpf)?;
        Ok(Self {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            links: StdHashMap::new(),
            egress_links: StdHashMap::new(),
            group_egress: Default::default(),
            logger,
            ct_capacity,
            adopting: false,
            keep_on_exit: false,
            upgrade: None,
        })
    }

    /// Takes over the datapath pinned under `pin_dir`: adopts it when its
    /// layout is this binary's, upgrades it in place when it is an older
    /// one this binary can carry over, and refuses anything else.
    pub fn take_over(pin_dir: &Path, log_datapath: bool, ct_max: Option<u32>) -> Result<Self> {
        match crate::datapath::layout::inspect(pin_dir, OBJECT)? {
            crate::datapath::layout::Found::Current => Self::adopt(pin_dir, log_datapath, ct_max),
            crate::datapath::layout::Found::Older { version } => {
                Self::upgrade(pin_dir, log_datapath, ct_max, version)
            }
        }
    }

    /// The first half of an upgrade: the older datapath's pins move aside
    /// (it keeps forwarding: its programs hold its maps), this binary's
    /// maps are created, filled from the old ones and pinned in their
    /// place. `attach` then swaps programs interface by interface, and
    /// `commit_upgrade` or `rollback_upgrade` ends it.
    fn upgrade(pin_dir: &Path, log_datapath: bool, ct_max: Option<u32>, from: u32) -> Result<Self> {
        let previous = pin_dir.join(PREVIOUS);
        if previous.exists() {
            bail!(
                "{} holds the pins of an upgrade that never finished: run `kvnet down` and start again",
                previous.display()
            );
        }
        std::fs::create_dir_all(&previous)
            .with_context(|| format!("creating {}", previous.display()))?;
        let mut moved = Vec::new();
        let step = (|| -> Result<Self> {
            let pinned: Vec<String> = crate::datapath::layout::expected(OBJECT)?
                .into_keys()
                .chain(
                    [
                        names::PROG_XDP,
                        names::PROG_TC,
                        names::PROG_TC_OUT,
                        names::PROG_SAVI,
                    ]
                    .map(String::from),
                )
                .filter(|n| pin_dir.join(n).exists())
                .collect();
            for name in pinned {
                std::fs::rename(pin_dir.join(&name), previous.join(&name))
                    .with_context(|| format!("moving the pin {name} aside"))?;
                moved.push(name);
            }
            let mut dp = Self::load_pinned(pin_dir, log_datapath, ct_max, false)?;
            // From here on, dropping `dp` must not unpin anything.
            dp.keep_on_exit = true;
            let maps: Vec<&String> = moved.iter().filter(|n| !n.starts_with("kvnet_")).collect();
            for name in maps {
                let n = crate::datapath::layout::carry(
                    name,
                    from,
                    &previous.join(name),
                    &pin_dir.join(name),
                    false,
                )
                .with_context(|| format!("carrying map {name} over"))?;
                log::info!("upgrade: map {name}: {n} entries carried over");
            }
            crate::datapath::layout::record(pin_dir)?;
            induced_failure("convert")?;
            Ok(dp)
        })();
        match step {
            Ok(mut dp) => {
                dp.adopting = true;
                dp.upgrade = Some(Upgrade {
                    from,
                    moved,
                    swapped: Vec::new(),
                    failed: None,
                });
                Ok(dp)
            }
            Err(e) => {
                restore_pins(pin_dir, &moved);
                Err(e.context(format!(
                    "upgrading the datapath from layout {from} (step 'convert'; rolled back: the running datapath is untouched)"
                )))
            }
        }
    }

    /// The layout an upgrade in progress started from.
    pub fn upgrading_from(&self) -> Option<u32> {
        self.upgrade.as_ref().map(|u| u.from)
    }

    /// Notes a program swap of an upgrade; fails on the induced `swap`
    /// failure right after the first one.
    fn swapped(&mut self, iface: &str, ifindex: u32, hook: Hook, replaced: bool) -> Result<()> {
        let Some(u) = self.upgrade.as_mut() else {
            return Ok(());
        };
        u.swapped.push(Swapped {
            iface: iface.to_string(),
            ifindex,
            hook,
            replaced,
        });
        if let Err(e) = induced_failure("swap") {
            u.failed.get_or_insert_with(|| format!("{e:#}"));
            return Err(e);
        }
        Ok(())
    }

    /// `swapped` for a tc link this object now owns: when the upgrade fails
    /// there, the link is forgotten (not detached when the program goes), so
    /// the rollback's old program stays on the filter.
    fn swapped_or_forget(
        &mut self,
        prog: &str,
        id: SchedClassifierLinkId,
        iface: &str,
        ifindex: u32,
        hook: Hook,
        replaced: bool,
    ) -> Result<SchedClassifierLinkId> {
        let Err(e) = self.swapped(iface, ifindex, hook, replaced) else {
            return Ok(id);
        };
        if let Ok(tc) = program(&mut self.ebpf, prog)
            .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(anyhow::Error::from))
        {
            if let Ok(link) = tc.take_link(id) {
                std::mem::forget(link);
            }
        }
        Err(e)
    }

    /// Notes a failed swap: the upgrade will roll back.
    fn swap_failed(&mut self, what: &str, e: &anyhow::Error) {
        if let Some(u) = self.upgrade.as_mut() {
            u.failed.get_or_insert_with(|| format!("{what}: {e:#}"));
        }
    }

    /// Ends an upgrade whose swaps all succeeded: entries the old datapath
    /// created while the programs were being swapped are carried over too,
    /// then the old pins go (and the old maps with the last old program).
    pub fn commit_upgrade(&mut self) -> Result<()> {
        let Some(u) = self.upgrade.as_ref() else {
            return Ok(());
        };
        if let Some(why) = &u.failed {
            bail!("step 'swap': {why}");
        }
        induced_failure("commit").context("step 'commit'")?;
        let previous = self.pin_dir.join(PREVIOUS);
        let from = u.from;
        for name in [names::MAP_CT, names::MAP_FDB] {
            let n = crate::datapath::layout::carry(
                name,
                from,
                &previous.join(name),
                &self.pin_dir.join(name),
                true,
            )
            .with_context(|| format!("step 'commit': carrying map {name} over again"))?;
            if n > 0 {
                log::info!("upgrade: map {name}: {n} entries created meanwhile carried over");
            }
        }
        let _ = std::fs::remove_dir_all(&previous);
        self.upgrade = None;
        Ok(())
    }

    /// Undoes an upgrade: every interface gets its old program back (or
    /// none, where it had none), this daemon's pins go and the old ones
    /// return. Returns what could not be undone.
    pub fn rollback_upgrade(&mut self) -> Vec<String> {
        let Some(u) = self.upgrade.take() else {
            return Vec::new();
        };
        let previous = self.pin_dir.join(PREVIOUS);
        let mut problems = Vec::new();
        for s in u.swapped.iter().rev() {
            let r = if s.replaced {
                restore_program(&previous, s)
            } else {
                self.remove_program(s)
            };
            if let Err(e) = r {
                problems.push(format!("{}: {e:#}", s.iface));
            }
        }
        // Our links must not be detached later by this object's drop.
        self.keep_on_exit = true;
        self.forget_links();
        restore_pins(&self.pin_dir, &u.moved);
        problems
    }

    /// Drops aya's handles of every attachment without detaching anything.
    fn forget_links(&mut self) {
        for (_, l) in self.links.drain() {
            if let Some(id) = l.tc {
                if let Ok(p) = program(&mut self.ebpf, names::PROG_TC)
                    .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(Into::into))
                {
                    if let Ok(link) = p.take_link(id) {
                        std::mem::forget(link);
                    }
                }
            }
        }
        for (_, id) in self.egress_links.drain() {
            if let Ok(p) = program(&mut self.ebpf, names::PROG_TC_OUT)
                .and_then(|p| <&mut SchedClassifier>::try_from(p).map_err(Into::into))
            {
                if let Ok(link) = p.take_link(id) {
                    std::mem::forget(link);
                }
            }
        }
    }

    /// Takes this daemon's program off an interface the old datapath had
    /// no program on.
    fn remove_program(&mut self, s: &Swapped) -> Result<()> {
        match s.hook {
            Hook::Xdp => {
                let _ = std::fs::remove_file(xdp_link_pin(&self.pin_dir, s.ifindex));
                Ok(())
            }
            Hook::TcIngress | Hook::TcEgress => {
                let t = if s.hook == Hook::TcIngress {
                    TcAttachType::Ingress
                } else {
                    TcAttachType::Egress
                };
                let link = SchedClassifierLink::attached(&s.iface, t, TC_PRIO, TC_HANDLE, None)?;
                aya::programs::links::Link::detach(link).map_err(Into::into)
            }
        }
    }

    /// Attaches (or, adopting, swaps into the existing filter) `prog` as
    /// kvnet's cls_bpf filter on `iface`.
    fn tc_attach(
        &mut self,
        prog: &str,
        iface: &str,
        attach_type: TcAttachType,
    ) -> Result<SchedClassifierLinkId> {
        let adopting = self.adopting;
        let tc: &mut SchedClassifier = program(&mut self.ebpf, prog)?.try_into()?;
        let replace = |tc: &mut SchedClassifier| {
            SchedClassifierLink::attached(iface, attach_type, TC_PRIO, TC_HANDLE, None)
                .map_err(anyhow::Error::from)
                .and_then(|l| tc.attach_to_link(l).map_err(anyhow::Error::from))
        };
        let hook = if attach_type == TcAttachType::Ingress {
            Hook::TcIngress
        } else {
            Hook::TcEgress
        };
        let ifindex = crate::netdev::ifindex(iface).unwrap_or(0);
        if adopting {
            if let Ok(id) = replace(tc) {
                return self.swapped_or_forget(prog, id, iface, ifindex, hook, true);
            }
        }
        let opts = NlOptions {
            priority: TC_PRIO,
            handle: TC_HANDLE,
            ..Default::default()
        };
        let r = match tc.attach_with_options(iface, attach_type, TcAttachOptions::Netlink(opts)) {
            Ok(id) => Ok(id),
            // A filter left by a daemon that did not clean up: take it over.
            Err(e) => replace(tc).map_err(|_| anyhow::Error::from(e)),
        };
        match r {
            Ok(id) => self.swapped_or_forget(prog, id, iface, ifindex, hook, false),
            Err(e) => {
                self.swap_failed(iface, &e);
                Err(e)
            }
        }
    }

    /// Attaches XDP to `ifindex` through a pinned bpf_link (or, adopting,
    /// updates the pinned link to the new program atomically).
    fn xdp_attach(&mut self, ifindex: u32, links: &mut PortLinks) -> Result<()> {
        let pin = xdp_link_pin(&self.pin_dir, ifindex);
        let xdp: &mut Xdp = program(&mut self.ebpf, names::PROG_XDP)?.try_into()?;
        if pin.exists() {
            let updated = PinnedLink::from_pin(&pin)
                .map_err(anyhow::Error::from)
                .and_then(|p| XdpLink::try_from(FdLink::from(p)).map_err(anyhow::Error::from))
                .and_then(|l| xdp.attach_to_link(l).map_err(anyhow::Error::from));
            match updated {
                Ok(id) => {
                    // The pin holds the link; our fd may go.
                    if let Ok(l) = xdp.take_link(id) {
                        drop(l);
                    }
                    links.xdp_pin = Some(pin);
                    return self.swapped(&format!("ifindex {ifindex}"), ifindex, Hook::Xdp, true);
                }
                Err(e) => {
                    log::warn!("updating the pinned XDP link of ifindex {ifindex}: {e:#}");
                    let _ = std::fs::remove_file(&pin);
                }
            }
        }
        let id = xdp
            .attach_to_if_index(ifindex, XdpMode::Driver)
            .or_else(|_| xdp.attach_to_if_index(ifindex, XdpMode::Skb))?;
        let link = xdp.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                std::fs::create_dir_all(pin.parent().expect("has a parent"))?;
                // Dropping the PinnedLink closes our fd; the pin keeps it.
                fd.pin(&pin).context("pinning the XDP link")?;
                links.xdp_pin = Some(pin);
                self.swapped(&format!("ifindex {ifindex}"), ifindex, Hook::Xdp, false)?;
            }
            Err(_) => {
                // A netlink attachment (no bpf_link support): it stays
                // until detached, whoever holds it.
                return Err(anyhow!(
                    "XDP attached through netlink; this kernel lacks XDP bpf_link"
                ));
            }
        }
        Ok(())
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
        // A clsact filter (netlink) rather than a TCX link: the admin's
        // `bpftool net show` and `tc filter show` list it, and it outlives
        // the daemon (the filter holds the program).
        if let Err(e) = tc::qdisc_add_clsact(iface) {
            if !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(e).with_context(|| format!("adding the clsact qdisc to '{iface}'"));
            }
        }
        links.tc = Some(
            self.tc_attach(names::PROG_TC, iface, TcAttachType::Ingress)
                .with_context(|| format!("attaching the tc program to '{iface}'"))?,
        );
        if with_xdp {
            if let Err(e) = self.xdp_attach(ifindex, &mut links) {
                self.links.insert(ifindex, links);
                self.detach(ifindex);
                return Err(e).with_context(|| format!("attaching the XDP program to '{iface}'"));
            }
        } else if self.adopting {
            // The port was XDP before the restart and no longer is.
            let pin = xdp_link_pin(&self.pin_dir, ifindex);
            let _ = std::fs::remove_file(pin);
        }
        self.links.insert(ifindex, links);
        Ok(())
    }

    /// Attaches the egress program (bridged uplinks: the host's frames to
    /// guests). The clsact qdisc is already there from `attach`.
    pub fn attach_egress(&mut self, iface: &str, ifindex: u32) -> Result<()> {
        if self.group_egress.contains(&ifindex) {
            // An uplink group's: attached already, for the group's life.
            return Ok(());
        }
        let id = self
            .tc_attach(names::PROG_TC_OUT, iface, TcAttachType::Egress)
            .with_context(|| format!("attaching the tc egress program to '{iface}'"))?;
        self.egress_links.insert(ifindex, id);
        Ok(())
    }

    /// An uplink group's device: egress attached for the group's life.
    pub fn attach_group_egress(&mut self, iface: &str, ifindex: u32) -> Result<()> {
        self.group_egress.remove(&ifindex);
        self.attach_egress(iface, ifindex)?;
        self.group_egress.insert(ifindex);
        Ok(())
    }

    pub fn detach_group_egress(&mut self, ifindex: u32) {
        self.group_egress.remove(&ifindex);
        self.detach_egress(ifindex);
    }

    pub fn uplink_groups(
        &mut self,
    ) -> Result<HashMap<&mut MapData, u32, kvnet_common::UplinkGroup>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_UPLINK_GROUPS,
        )?)?)
    }

    pub fn uplink_members(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_UPLINK_MEMBERS,
        )?)?)
    }

    /// A hash map by name (maps of one feature, opened by its module).
    pub fn hash_map<K: aya::Pod, V: aya::Pod>(
        &mut self,
        name: &str,
    ) -> Result<HashMap<&mut MapData, K, V>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, name)?)?)
    }

    pub fn has_egress(&self, ifindex: u32) -> bool {
        self.egress_links.contains_key(&ifindex)
    }

    pub fn nat_subnets(&mut self) -> Result<aya::maps::lpm_trie::LpmTrie<&mut MapData, u32, u32>> {
        Ok(aya::maps::lpm_trie::LpmTrie::try_from(map(
            &mut self.ebpf,
            names::MAP_NAT_SUBNETS,
        )?)?)
    }

    pub fn detach_egress(&mut self, ifindex: u32) {
        if self.group_egress.contains(&ifindex) {
            return;
        }
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

    /// A descriptor of the conntrack map of its own, for the GC thread's
    /// batched reads (daemon/ct_gc.rs).
    pub fn ct_fd(&mut self) -> Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        let m = map(&mut self.ebpf, names::MAP_CT)?;
        let data = match m {
            aya::maps::Map::HashMap(d) => d,
            _ => bail!("map {} is not a hash map", names::MAP_CT),
        };
        Ok(data.fd().as_fd().try_clone_to_owned()?)
    }

    /// NAT66 conntrack.
    pub fn ct6(&mut self) -> Result<HashMap<&mut MapData, Ct6Key, Ct6Entry>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_CT6)?)?)
    }

    /// IPv6 port forwards.
    pub fn forwards6(&mut self) -> Result<HashMap<&mut MapData, ForwardKey, Forward6Target>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_FORWARDS6,
        )?)?)
    }

    /// NAT66 networks: the uplink's IPv6 address.
    pub fn nat6_nets(&mut self) -> Result<HashMap<&mut MapData, u32, Nat6Config>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_NAT6_NETS,
        )?)?)
    }

    /// NAT66 networks' guest prefixes.
    pub fn nat6_subnets(
        &mut self,
    ) -> Result<aya::maps::lpm_trie::LpmTrie<&mut MapData, Addr6, u32>> {
        Ok(aya::maps::lpm_trie::LpmTrie::try_from(map(
            &mut self.ebpf,
            names::MAP_NAT6_SUBNETS,
        )?)?)
    }

    /// Fragmented datagrams in flight through the NAT (LRU).
    pub fn nat_frags(&mut self) -> Result<HashMap<&mut MapData, FragKey, FragPorts>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_NAT_FRAGS,
        )?)?)
    }

    /// Endpoint-independent UDP mappings, both sides of each.
    pub fn nat_mappings(&mut self) -> Result<HashMap<&mut MapData, NatMapKey, NatMapping>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_NAT_MAPPINGS,
        )?)?)
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
        let adopting = self.adopting;
        let mut m: PerCpuHashMap<&mut MapData, u32, NatStats> =
            PerCpuHashMap::try_from(map(&mut self.ebpf, names::MAP_NAT_STATS)?)?;
        if adopting && m.get(&net_id, 0).is_ok() {
            return Ok(());
        }
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
        if let Some(pin) = links.xdp_pin {
            // The pin held the link: without it (and our fd, closed long
            // ago) the link goes, and XDP with it.
            let _ = std::fs::remove_file(pin);
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

    pub fn fdb_count(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_FDB_COUNT,
        )?)?)
    }

    pub fn ct_quota(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_CT_QUOTA,
        )?)?)
    }

    pub fn mac_owners(&mut self) -> Result<HashMap<&mut MapData, FdbKey, u32>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_MAC_OWNERS,
        )?)?)
    }

    /// FCFS SAVI: who owns each guest IPv6 address (network-wide).
    pub fn v6_owners(&mut self) -> Result<HashMap<&mut MapData, V6OwnerKey, V6Owner>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_V6_OWNERS,
        )?)?)
    }

    /// IPv6 addresses each port claimed by using them.
    pub fn v6_claims(&mut self) -> Result<HashMap<&mut MapData, u32, u32>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_V6_CLAIMS,
        )?)?)
    }

    pub fn flood(&mut self) -> Result<HashMap<&mut MapData, FloodKey, FloodSet>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_FLOOD)?)?)
    }

    /// ARP suppression: the addresses whose owner kvnet knows.
    pub fn neigh(&mut self) -> Result<HashMap<&mut MapData, NeighKey, NeighEntry>> {
        Ok(HashMap::try_from(map(&mut self.ebpf, names::MAP_NEIGH)?)?)
    }

    /// Storm control and rate limits by port.
    pub fn port_policy(&mut self) -> Result<HashMap<&mut MapData, u32, PortPolicy>> {
        Ok(HashMap::try_from(map(
            &mut self.ebpf,
            names::MAP_PORT_POLICY,
        )?)?)
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

    /// Creates (or zeroes) a port's counters; adopting, keeps them.
    pub fn reset_stats(&mut self, ifindex: u32) -> Result<()> {
        let cpus = nr_cpus().map_err(|(_, e)| e).context("counting CPUs")?;
        let zero = PerCpuValues::try_from(vec![PortStats::default(); cpus])?;
        if self.adopting && self.port_stats()?.get(&ifindex, 0).is_ok() {
            return Ok(());
        }
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
#[cfg_attr(not(test), allow(dead_code))]
pub struct ProgRun {
    pub verdict: u32,
    pub per_run: std::time::Duration,
    pub frame: Vec<u8>,
}

// BPF_PROG_RUN: the datapath tests' runner.
#[cfg_attr(not(test), allow(dead_code))]
impl Datapath {
    /// Runs `kvnet_xdp` on `frame` as if it arrived on `ingress` (which must
    /// be an existing device of this netns; redirects are not carried out).
    pub fn run_xdp(&mut self, frame: &[u8], ingress: u32, repeat: u32) -> Result<ProgRun> {
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index, egress_ifindex
        let md: [u32; 6] = [0, frame.len() as u32, 0, ingress, 0, 0];
        let ctx: Vec<u8> = md.iter().flat_map(|w| w.to_ne_bytes()).collect();
        let xdp: &mut Xdp = program(&mut self.ebpf, names::PROG_XDP)?.try_into()?;
        prog_run(xdp, frame, Some(&ctx), repeat)
    }

    /// Runs `kvnet_tc` on `frame`; the kernel presents it as received on lo.
    pub fn run_tc(&mut self, frame: &[u8], repeat: u32) -> Result<ProgRun> {
        let tc: &mut SchedClassifier = program(&mut self.ebpf, names::PROG_TC)?.try_into()?;
        prog_run(tc, frame, None, repeat)
    }

    /// Runs `kvnet_tc` once on `frame` as received on `ifindex` (a device
    /// of the calling thread's netns: `__sk_buff.ifindex`, offset 40).
    pub fn run_tc_on(&mut self, frame: &[u8], ifindex: u32) -> Result<ProgRun> {
        self.run_tc_gso(frame, ifindex, 0)
    }

    /// `run_tc_on` for a GSO super-packet of `gso_size`-byte segments
    /// (`__sk_buff.gso_segs`/`gso_size`, offsets 164 and 176).
    pub fn run_tc_gso(&mut self, frame: &[u8], ifindex: u32, gso_size: u32) -> Result<ProgRun> {
        let mut ctx = vec![0u8; if gso_size == 0 { 44 } else { 180 }];
        ctx[40..44].copy_from_slice(&ifindex.to_ne_bytes());
        if gso_size != 0 {
            let segs = (frame.len() as u32).div_ceil(gso_size);
            ctx[164..168].copy_from_slice(&segs.to_ne_bytes());
            ctx[176..180].copy_from_slice(&gso_size.to_ne_bytes());
        }
        let tc: &mut SchedClassifier = program(&mut self.ebpf, names::PROG_TC)?.try_into()?;
        prog_run(tc, frame, Some(&ctx), 1)
    }
}

/// One BPF_PROG_RUN of `prog` on `frame` (`repeat` times: the result's
/// duration is the mean).
pub fn prog_run<P>(prog: &P, frame: &[u8], ctx: Option<&[u8]>, repeat: u32) -> Result<ProgRun>
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
        if self.keep_on_exit {
            // Daemon stop/restart: the filters and pinned links keep
            // forwarding.
            self.forget_links();
            return;
        }
        let ports: Vec<u32> = self.links.keys().copied().collect();
        for ifindex in ports {
            self.detach(ifindex);
        }
        let uplinks: Vec<u32> = self.egress_links.keys().copied().collect();
        for ifindex in uplinks {
            self.detach_egress(ifindex);
        }
        // Pins outlive the process: removing everything (`kvnet down`) removes them too.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
    }
}

/// Loads the NAT66 program and puts it where tc tail-calls it (map
/// `nat6_prog`, pinned: an adopting daemon's program replaces the old one
/// there, and running tc programs call the new one from then on).
fn load_nat6(ebpf: &mut Ebpf) -> Result<()> {
    let tc: &mut SchedClassifier = program(ebpf, names::PROG_NAT6)?.try_into()?;
    tc.load().context("loading the NAT66 program (verifier)")?;
    let fd = tc.fd()?.try_clone()?;
    let mut jump = aya::maps::ProgramArray::try_from(map(ebpf, names::MAP_NAT6_PROG)?)?;
    jump.set(0, &fd, 0)
        .context("installing the NAT66 program")?;
    Ok(())
}

/// Puts the older datapath's pins back where they were and removes the
/// ones this daemon created (the old datapath never had them).
fn restore_pins(pin_dir: &Path, moved: &[String]) {
    let previous = pin_dir.join(PREVIOUS);
    let ours = crate::datapath::layout::expected(OBJECT)
        .map(|m| m.into_keys().collect::<Vec<_>>())
        .unwrap_or_default();
    let programs = [
        names::PROG_XDP,
        names::PROG_TC,
        names::PROG_TC_OUT,
        names::PROG_SAVI,
    ]
    .map(String::from);
    for name in ours.iter().chain(&programs) {
        if previous.join(name).exists() || !moved.contains(name) {
            let _ = std::fs::remove_file(pin_dir.join(name));
        }
    }
    for name in moved {
        if let Err(e) = std::fs::rename(previous.join(name), pin_dir.join(name)) {
            eprintln!("kvnet: putting the pin {name} back: {e}");
        }
    }
    let _ = std::fs::remove_dir(&previous);
}

/// Puts the older datapath's program back on one interface.
fn restore_program(previous: &Path, s: &Swapped) -> Result<()> {
    if s.hook == Hook::Xdp {
        let mut xdp = Xdp::from_pin(
            previous.join(names::PROG_XDP),
            aya_obj::programs::XdpAttachType::Interface,
        )?;
        let pin = xdp_link_pin(previous.parent().unwrap_or(previous), s.ifindex);
        let link = XdpLink::try_from(FdLink::from(PinnedLink::from_pin(&pin)?))?;
        xdp.attach_to_link(link)?;
        // The pin holds the link; dropping our handle closes only our fd.
        return Ok(());
    }
    let (name, t) = if s.hook == Hook::TcIngress {
        (names::PROG_TC, TcAttachType::Ingress)
    } else {
        (names::PROG_TC_OUT, TcAttachType::Egress)
    };
    let mut tc = SchedClassifier::from_pin(previous.join(name))?;
    let id = match SchedClassifierLink::attached(&s.iface, t, TC_PRIO, TC_HANDLE, None)
        .map_err(anyhow::Error::from)
        .and_then(|l| tc.attach_to_link(l).map_err(anyhow::Error::from))
    {
        Ok(id) => id,
        // The filter went with a failed attach: add it again.
        Err(_) => tc.attach_with_options(
            &s.iface,
            t,
            TcAttachOptions::Netlink(NlOptions {
                priority: TC_PRIO,
                handle: TC_HANDLE,
                ..Default::default()
            }),
        )?,
    };
    // The filter holds the program; our handle must not detach it.
    std::mem::forget(tc.take_link(id)?);
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::programs::Program> {
    ebpf.program_mut(name)
        .ok_or_else(|| anyhow!("program {name} missing from the eBPF object"))
}

/// Loads the IPv6 source guard (`kvnet_savi`), pinned at `pin` if given,
/// and points the jump table at it and back at `kvnet_tc` (loaded
/// already): attached programs, old or new, jump into these from now on.
pub fn load_savi(ebpf: &mut Ebpf, pin: Option<&Path>) -> Result<()> {
    let savi: &mut SchedClassifier = program(ebpf, names::PROG_SAVI)?.try_into()?;
    savi.load()
        .context("loading the IPv6 source guard program (verifier)")?;
    if let Some(pin) = pin {
        savi.pin(pin)
            .context("pinning the IPv6 source guard program")?;
    }
    let savi_fd = savi.fd()?.try_clone()?;
    let tc: &mut SchedClassifier = program(ebpf, names::PROG_TC)?.try_into()?;
    let tc_fd = tc.fd()?.try_clone()?;
    let mut jump: ProgramArray<&mut MapData> =
        ProgramArray::try_from(map(ebpf, names::MAP_SAVI_JUMP)?)?;
    jump.set(0, &savi_fd, 0)
        .context("writing the IPv6 source guard's jump table")?;
    jump.set(1, &tc_fd, 0)
        .context("writing the IPv6 source guard's jump table")?;
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .ok_or_else(|| anyhow!("map {name} missing from the eBPF object"))
}

#[cfg(test)]
mod tests;
