//! Uplink groups: kvnet as the bond (`kvnet uplink`). A group is a veth
//! device named as the group (its peer idles): networks take it as their
//! uplink and the host's address lives on it, as on a bond device. Its MAC
//! is the primary member's (else the first's), set on every member too, so
//! a failover moves no address: the datapath's map says which member
//! carries traffic, and announcements make the LAN's switch follow.
pub mod announce;
pub mod arpmon;
pub mod lacp;
pub mod link;

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use kvnet_common::{
    UplinkGroup, MAX_UPLINK_MEMBERS, UPLINK_HASH_L2, UPLINK_HASH_L3L4, UPLINK_MODE_ACTIVE_BACKUP,
    UPLINK_MODE_BALANCE_RR, UPLINK_MODE_BALANCE_XOR, UPLINK_MODE_BROADCAST, UPLINK_MODE_LACP,
};
use serde::{Deserialize, Serialize};

use crate::{
    datapath::Datapath,
    mac::Mac,
    netdev, rtnl,
    uplink_spec::{UplinkHash, UplinkMode, UplinkSpec},
};

pub struct Member {
    pub name: String,
    pub ifindex: u32,
    /// Its MAC before it joined, given back when it leaves (a group
    /// adopted after a daemon restart knows only the group's MAC).
    pub own_mac: Mac,
    pub up: bool,
    /// 802.3ad: its LACP; else None.
    pub lacp: Option<lacp::MemberLacp>,
    /// In the aggregation (802.3ad); always true in the other modes.
    pub aggregated: bool,
    /// `--arp-target`: its ARP monitor; else None.
    pub arp: Option<arpmon::MemberArp>,
}

pub struct Group {
    pub spec: UplinkSpec,
    pub ifindex: u32,
    /// The idle end of the group's veth pair.
    pub peer: String,
    pub mac: Mac,
    pub members: Vec<Member>,
    /// The member carrying traffic (active-backup), 0 for none.
    pub active: u32,
    pub failovers: u64,
    /// `--arp-target`: when the members last probed.
    pub last_probe: Option<std::time::Instant>,
}

/// What the state files keep of a group beyond its spec: the members'
/// own MACs (a restarted daemon finds them wearing the group's), for
/// `uplink del` after an adoption and `kvnet down` without a daemon.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedGroup {
    pub own_macs: BTreeMap<String, Mac>,
}

impl SavedGroup {
    /// `kvnet down` without a daemon: the members get their MACs back and
    /// leave promiscuous mode; the group's device goes (its peer with it).
    pub fn undo(&self, name: &str) {
        for (m, mac) in &self.own_macs {
            let _ = link::set_mac(m, *mac);
            let _ = rtnl::link_set_promisc(m, false);
        }
        if netdev::ifindex(name).is_ok() {
            let _ = rtnl::link_del(name);
        }
    }
}

/// A change of the members carrying a group's traffic.
pub struct Failover {
    pub group: String,
    /// Members now carrying traffic, for the announcements.
    pub carriers: Vec<u32>,
    pub what: String,
}

/// `kvnet uplink show`: one group.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkInfo {
    pub name: String,
    pub ifindex: u32,
    pub mode: UplinkMode,
    pub hash: Option<UplinkHash>,
    pub primary: Option<String>,
    pub miimon: Option<u64>,
    pub mac: String,
    /// active-backup: the member carrying traffic.
    pub active: Option<String>,
    pub failovers: u64,
    /// Networks whose uplink it is.
    pub used_by: Vec<String>,
    pub members: Vec<MemberInfo>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemberInfo {
    pub name: String,
    pub ifindex: u32,
    /// "up" (may carry: carrier, and answers from the ARP targets when
    /// monitored) or "down".
    pub state: String,
    /// The link's carrier.
    pub carrier: bool,
    /// `--arp-target`: a target answered within 3 intervals (null when
    /// not monitored).
    pub arp_ok: Option<bool>,
    /// Carries traffic now (active-backup: the active one; 802.3ad: the
    /// aggregated ones; else every up member).
    pub carrying: bool,
    pub counters: link::Counters,
    /// 802.3ad: the partner's last LACPDU (null when none or expired).
    pub lacp_partner: Option<LacpPartner>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LacpPartner {
    pub system: String,
    pub key: u16,
    pub port: u16,
    /// The partner's state bits (0x3d: active, aggregating, in sync,
    /// collecting, distributing).
    pub state: u8,
}

/// Whether a member may carry traffic: down the moment its carrier goes;
/// up once the kernel calls it operational (the LAN's side of the link
/// comes up on the same schedule, so frames sent earlier would be lost),
/// except under 802.3ad, where the partner's LACPDUs are the readiness.
fn usable(links: &BTreeMap<String, link::LinkState>, name: &str, mode: UplinkMode) -> bool {
    links
        .get(name)
        .is_some_and(|l| l.carrier && (l.running || mode == UplinkMode::Lacp))
}

/// How often an 802.3ad group's LACP round runs (PDUs in and out).
const LACP_ROUND_MS: u64 = 100;

/// The idle veth end of group `name`: a short, stable name of its own.
fn peer_name(name: &str) -> String {
    let h = name.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    format!("kvgp{h:08x}")
}

#[derive(Default)]
pub struct Groups {
    pub groups: BTreeMap<String, Group>,
}

impl Groups {
    pub fn is_group(&self, iface: &str) -> bool {
        self.groups.contains_key(iface)
    }

    /// The group `iface` is a member of.
    pub fn group_of_member(&self, iface: &str) -> Option<&str> {
        self.groups
            .values()
            .find(|g| g.members.iter().any(|m| m.name == iface))
            .map(|g| g.spec.name.as_str())
    }

    /// Creates the group. `busy(iface)` says what else uses an interface
    /// (a port, a network's uplink); such a member is refused. All or
    /// nothing: a failure undoes what was done.
    pub fn add(
        &mut self,
        dp: &mut Datapath,
        spec: &UplinkSpec,
        busy: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        spec.check()?;
        let name = &spec.name;
        if self.groups.contains_key(name) {
            bail!("uplink group '{name}' already exists");
        }
        // A restarted daemon takes over the group its predecessor built
        // (the datapath kept forwarding through it).
        let adopting = dp.adopting && netdev::ifindex(name).is_ok();
        if netdev::ifindex(name).is_ok() && !adopting {
            bail!("uplink group '{name}': an interface of that name already exists");
        }
        if self.groups.len() >= kvnet_common::MAX_UPLINK_GROUPS as usize {
            bail!(
                "kvnet holds at most {} uplink groups",
                kvnet_common::MAX_UPLINK_GROUPS
            );
        }
        let mut members = Vec::new();
        for m in &spec.members {
            members.push(self.newcomer(m, spec, busy)?);
        }
        let lead = spec.primary.as_ref().unwrap_or(&spec.members[0]);
        let mac = members
            .iter()
            .find(|m| &m.name == lead)
            .map(|m| m.own_mac)
            .context("the primary member vanished")?;
        let mut group = Group {
            spec: spec.clone(),
            ifindex: 0,
            peer: peer_name(name),
            mac,
            members,
            active: 0,
            failovers: 0,
            last_probe: None,
        };
        match group.build(dp, adopting) {
            Ok(()) => {
                log::info!("uplink group {name} ({}) created", spec.mode.name());
                eprintln!(
                    "uplink {name}: {} over {} (active {})",
                    spec.mode.name(),
                    spec.members.join(","),
                    group.active_name().unwrap_or("none")
                );
                self.groups.insert(name.clone(), group);
                Ok(())
            }
            Err(e) if adopting => Err(e.context(format!("adopting uplink group '{name}'"))),
            Err(e) => {
                group.destroy(dp);
                Err(e.context(format!("creating uplink group '{name}': nothing changed")))
            }
        }
    }

    /// A member about to join `spec`'s group, if it may.
    fn newcomer(
        &self,
        m: &str,
        spec: &UplinkSpec,
        busy: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Member> {
        if let Some(g) = self.group_of_member(m).filter(|g| *g != spec.name) {
            bail!("'{m}' is already a member of uplink group '{g}'");
        }
        if self.groups.contains_key(m) {
            bail!("'{m}' is an uplink group; groups do not nest");
        }
        if let Some(what) = busy(m) {
            bail!("'{m}' is {what}; a member must be used by nothing else");
        }
        Ok(Member {
            name: m.to_string(),
            ifindex: netdev::ifindex(m)?,
            own_mac: netdev::mac(m)?,
            up: false,
            lacp: None,
            aggregated: spec.mode != UplinkMode::Lacp,
            arp: None,
        })
    }

    /// Changes a group in place (`apply`): members leave and join, the
    /// mode and its settings change; the device, its MAC and the networks
    /// on it stay. Every new member is checked before anything changes.
    pub fn update(
        &mut self,
        dp: &mut Datapath,
        spec: &UplinkSpec,
        busy: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        spec.check()?;
        let name = &spec.name;
        let g = self
            .groups
            .get(name)
            .with_context(|| format!("no uplink group named '{name}'"))?;
        let changes = g.spec.changes_to(spec);
        let mut joining = Vec::new();
        for m in spec
            .members
            .iter()
            .filter(|m| !g.members.iter().any(|x| &x.name == *m))
        {
            joining.push(self.newcomer(m, spec, busy)?);
        }
        let g = self.groups.get_mut(name).context("uplink group")?;
        let (leaving, staying): (Vec<Member>, Vec<Member>) = std::mem::take(&mut g.members)
            .into_iter()
            .partition(|m| !spec.members.contains(&m.name));
        for m in &leaving {
            m.leave(dp);
        }
        let mode_changed = g.spec.mode != spec.mode;
        g.spec = spec.clone();
        let mut all: Vec<Member> = staying.into_iter().chain(joining).collect();
        all.sort_by_key(|m| spec.members.iter().position(|n| *n == m.name));
        g.members = all;
        let result = g.rebuild(dp, mode_changed);
        log::info!("uplink group {name} changed: {}", changes.join(", "));
        eprintln!("uplink {name}: changed in place: {}", changes.join(", "));
        result
    }

    /// Deletes a group; `used_by` names what still uses it (refused then).
    pub fn del(&mut self, dp: &mut Datapath, name: &str, used_by: &[String]) -> Result<()> {
        if !self.groups.contains_key(name) {
            bail!("no uplink group named '{name}'");
        }
        if !used_by.is_empty() {
            bail!(
                "uplink group '{name}' is the uplink of network(s) {}; delete them first (nothing changed)",
                used_by.join(", ")
            );
        }
        if let Some(g) = self.groups.remove(name) {
            g.destroy(dp);
            eprintln!("uplink {name}: deleted");
        }
        Ok(())
    }

    pub fn show(&self, used_by: &dyn Fn(&str) -> Vec<String>) -> Vec<UplinkInfo> {
        let links = link::states();
        let now = std::time::Instant::now();
        self.groups
            .values()
            .map(|g| UplinkInfo {
                name: g.spec.name.clone(),
                ifindex: g.ifindex,
                mode: g.spec.mode,
                hash: g.spec.hash,
                primary: g.spec.primary.clone(),
                miimon: g.spec.miimon,
                mac: g.mac.to_string(),
                active: g.active_name().map(str::to_string),
                failovers: g.failovers,
                used_by: used_by(&g.spec.name),
                members: g
                    .members
                    .iter()
                    .map(|m| MemberInfo {
                        name: m.name.clone(),
                        ifindex: m.ifindex,
                        state: if m.up { "up" } else { "down" }.into(),
                        carrier: links.get(&m.name).is_some_and(|l| l.carrier),
                        arp_ok: g.arp_alive(m, now),
                        carrying: g.carries(m),
                        counters: links.get(&m.name).map(|l| l.counters).unwrap_or_default(),
                        lacp_partner: m
                            .lacp
                            .as_ref()
                            .and_then(|l| l.fresh_partner(std::time::Instant::now()))
                            .map(|p| LacpPartner {
                                system: Mac(p.system).to_string(),
                                key: p.key,
                                port: p.port,
                                state: p.state,
                            }),
                    })
                    .collect(),
            })
            .collect()
    }

    /// Re-reads every member's carrier (on a link event or a poll) and
    /// rewrites the datapath's entry of each group whose members changed.
    pub fn follow_carrier(&mut self, dp: &mut Datapath) -> Vec<Failover> {
        let mut out = Vec::new();
        let links = link::states();
        let now = std::time::Instant::now();
        for g in self.groups.values_mut() {
            let before: Vec<(bool, bool)> =
                g.members.iter().map(|m| (m.up, m.aggregated)).collect();
            let was_active = g.active;
            let mode = g.spec.mode;
            g.arp_round(&links, now);
            for i in 0..g.members.len() {
                let up = usable(&links, &g.members[i].name, mode)
                    && g.arp_alive(&g.members[i], now) != Some(false);
                g.members[i].up = up;
            }
            if g.spec.mode == UplinkMode::Lacp {
                g.lacp_round();
            }
            let after: Vec<(bool, bool)> = g.members.iter().map(|m| (m.up, m.aggregated)).collect();
            if after == before {
                continue;
            }
            g.choose_active();
            if let Err(e) = g.write(dp) {
                log::warn!("uplink {}: writing the datapath: {e:#}", g.spec.name);
                continue;
            }
            let changes: Vec<String> = g
                .members
                .iter()
                .zip(&before)
                .filter(|(m, b)| (m.up, m.aggregated) != **b)
                .map(|(m, (up, _))| match (m.up != *up, m.aggregated) {
                    (true, _) if g.arp_alive(m, now) == Some(false) => format!(
                        "{} down (no ARP from {})",
                        m.name,
                        g.spec
                            .arp_target
                            .iter()
                            .map(|t| t.to_string())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                    (true, _) => format!("{} {}", m.name, if m.up { "up" } else { "down" }),
                    (false, true) => format!("{} joined the aggregation", m.name),
                    (false, false) => format!("{} left the aggregation", m.name),
                })
                .collect();
            let mut what = changes.join(", ");
            let moved = g.spec.mode == UplinkMode::ActiveBackup && g.active != was_active;
            if moved {
                g.failovers += 1;
                what = format!(
                    "{what}; active {} -> {} (failover {})",
                    g.member_name(was_active).unwrap_or("none"),
                    g.active_name().unwrap_or("none"),
                    g.failovers
                );
            } else if g.spec.mode != UplinkMode::ActiveBackup {
                g.failovers += 1;
                what = format!("{what} (failover {})", g.failovers);
            }
            let carriers: Vec<u32> = g
                .members
                .iter()
                .filter(|m| g.carries(m))
                .map(|m| m.ifindex)
                .collect();
            if moved || g.spec.mode != UplinkMode::ActiveBackup {
                out.push(Failover {
                    group: g.spec.name.clone(),
                    carriers,
                    what,
                });
            } else {
                eprintln!("uplink {}: {what}", g.spec.name);
            }
        }
        out
    }

    /// For the state files.
    pub fn saved(&self) -> BTreeMap<String, SavedGroup> {
        self.groups
            .iter()
            .map(|(n, g)| {
                let own_macs = g
                    .members
                    .iter()
                    .map(|m| (m.name.clone(), m.own_mac))
                    .collect();
                (n.clone(), SavedGroup { own_macs })
            })
            .collect()
    }

    /// After an adoption: the members' own MACs, as the previous daemon
    /// knew them.
    pub fn adopt_saved(&mut self, saved: &BTreeMap<String, SavedGroup>) {
        for (n, s) in saved {
            let Some(g) = self.groups.get_mut(n) else {
                continue;
            };
            for m in g.members.iter_mut() {
                if let Some(mac) = s.own_macs.get(&m.name) {
                    m.own_mac = *mac;
                }
            }
        }
    }

    /// The smallest miimon of any group (how often to poll carriers).
    pub fn miimon(&self) -> Option<u64> {
        // 802.3ad: PDUs are read and sent from the same round.
        let lacp = self
            .groups
            .values()
            .any(|g| g.spec.mode == UplinkMode::Lacp)
            .then_some(LACP_ROUND_MS);
        self.groups
            .values()
            .filter_map(|g| g.spec.miimon)
            .chain(lacp)
            .chain(
                self.groups
                    .values()
                    .filter_map(|g| g.spec.arp_every())
                    .map(|d| d.as_millis() as u64),
            )
            .min()
    }

    /// Puts the members back as they were and removes the devices (`kvnet
    /// down`, daemon exit without keeping the datapath).
    pub fn destroy_all(&mut self, dp: &mut Datapath) {
        for (_, g) in std::mem::take(&mut self.groups) {
            g.destroy(dp);
        }
    }
}

impl Member {
    /// Wears the group's MAC, takes the guests' frames, is up.
    fn dress(&self, mac: Mac) -> Result<()> {
        if self.own_mac != mac {
            link::set_mac(&self.name, mac)?;
        }
        // Frames for guests' MACs must reach the group from the LAN.
        rtnl::link_set_promisc(&self.name, true)?;
        Ok(rtnl::link_set_up(&self.name)?)
    }

    /// Its frames are the group's from now on.
    fn enlist(&self, dp: &mut Datapath, group: u32) -> Result<()> {
        dp.uplink_members()?
            .insert(self.ifindex, group, 0)
            .context("writing the uplink member map")?;
        dp.attach(&self.name, self.ifindex, false)
    }

    /// Back as it was before it joined (errors ignored: best effort).
    fn leave(&self, dp: &mut Datapath) {
        dp.detach(self.ifindex);
        if let Ok(mut map) = dp.uplink_members() {
            let _ = map.remove(&self.ifindex);
        }
        let _ = link::set_mac(&self.name, self.own_mac);
        let _ = rtnl::link_set_promisc(&self.name, false);
    }

    /// Its monitors as the group's spec wants them (kept when they stay,
    /// so an 802.3ad partner or ARP history is not lost).
    fn monitors(&mut self, spec: &UplinkSpec, port: u16, probe_mac: Mac) -> Result<()> {
        let now = std::time::Instant::now();
        if spec.mode != UplinkMode::Lacp {
            self.lacp = None;
        } else if self.lacp.is_none() {
            self.lacp = Some(lacp::MemberLacp::open(self.ifindex, port)?);
        }
        if spec.arp_target.is_empty() {
            self.arp = None;
        } else if self.arp.is_none() {
            self.arp = Some(arpmon::MemberArp::open(self.ifindex, probe_mac, now)?);
        }
        Ok(())
    }
}

impl Group {
    /// After `update`: new members dressed and enlisted, monitors as the
    /// spec says, the datapath's entry rewritten.
    fn rebuild(&mut self, dp: &mut Datapath, mode_changed: bool) -> Result<()> {
        let links = link::states();
        let now = std::time::Instant::now();
        for i in 0..self.members.len() {
            let mac = self.mac;
            let m = &mut self.members[i];
            let new = dp.uplink_members()?.get(&m.ifindex, 0).is_err();
            if new {
                m.dress(mac)?;
                m.enlist(dp, self.ifindex)?;
            }
            if mode_changed || new {
                m.aggregated = self.spec.mode != UplinkMode::Lacp;
            }
            m.monitors(&self.spec, i as u16 + 1, arpmon::probe_mac(mac, i))?;
        }
        self.last_probe = None;
        self.arp_round(&links, now);
        for i in 0..self.members.len() {
            let up = usable(&links, &self.members[i].name, self.spec.mode)
                && self.arp_alive(&self.members[i], now) != Some(false);
            self.members[i].up = up;
        }
        if self.spec.mode == UplinkMode::Lacp {
            self.lacp_round();
        }
        self.choose_active();
        self.write(dp)
    }

    fn member_name(&self, ifindex: u32) -> Option<&str> {
        self.members
            .iter()
            .find(|m| m.ifindex == ifindex && ifindex != 0)
            .map(|m| m.name.as_str())
    }

    fn active_name(&self) -> Option<&str> {
        if self.spec.mode != UplinkMode::ActiveBackup {
            return None;
        }
        self.member_name(self.active)
    }

    /// `--arp-target`: whether `m` heard a target lately (None: not
    /// monitored).
    fn arp_alive(&self, m: &Member, now: std::time::Instant) -> Option<bool> {
        let every = self.spec.arp_every()?;
        Some(m.arp.as_ref().is_some_and(|a| a.alive(now, every)))
    }

    /// ARP monitoring's round: read what the members heard; every
    /// interval, probe the targets out of every member with carrier (a
    /// member that is out too, to see it come back).
    fn arp_round(&mut self, links: &BTreeMap<String, link::LinkState>, now: std::time::Instant) {
        let Some(every) = self.spec.arp_every() else {
            return;
        };
        let targets = &self.spec.arp_target;
        for m in self.members.iter_mut() {
            if let Some(a) = m.arp.as_mut() {
                a.receive(targets, now);
            }
        }
        if self
            .last_probe
            .is_some_and(|t| now.duration_since(t) < every)
        {
            return;
        }
        self.last_probe = Some(now);
        for m in &self.members {
            let carrier = links.get(&m.name).is_some_and(|l| l.carrier);
            if let (Some(a), true) = (m.arp.as_ref(), carrier) {
                a.probe(targets);
            }
        }
    }

    fn carries(&self, m: &Member) -> bool {
        m.up && m.aggregated
            && (self.spec.mode != UplinkMode::ActiveBackup || m.ifindex == self.active)
    }

    /// The LACP key of this group's ports (one aggregator per group).
    fn lacp_key(&self) -> u16 {
        (self.ifindex & 0x3fff) as u16 | 0x4000
    }

    /// One 802.3ad round: read the partners' PDUs, select the members
    /// whose partner agrees with the group's first one, send what changed
    /// (and every FAST_PERIOD), mark the aggregated ones.
    fn lacp_round(&mut self) {
        let now = std::time::Instant::now();
        let (system, key, mac) = (self.mac.0, self.lacp_key(), self.mac);
        for m in self.members.iter_mut() {
            if let Some(l) = m.lacp.as_mut() {
                l.receive(now);
            }
        }
        let aggregator = self.members.iter().filter(|m| m.up).find_map(|m| {
            let p = m.lacp.as_ref()?.fresh_partner(now)?;
            (p.state & lacp::ST_AGGREGATION != 0).then_some((p.system, p.key))
        });
        for m in self.members.iter_mut() {
            let up = m.up;
            let Some(l) = m.lacp.as_mut() else { continue };
            let partner = l.fresh_partner(now);
            let selected = up && partner.is_some_and(|p| Some((p.system, p.key)) == aggregator);
            let actor = lacp::PortInfo {
                system,
                key,
                port: l.port,
                state: lacp::actor_state(selected, partner.is_some()),
            };
            m.aggregated = selected
                && partner.is_some_and(|p| lacp::partner_ready(&p, l.seen_as.as_ref(), &actor));
            let due = l
                .last_tx
                .is_none_or(|t| now.duration_since(t) >= lacp::FAST_PERIOD);
            if up && (due || selected != l.selected) {
                l.send(mac, &actor, now);
            }
            l.selected = selected;
        }
    }

    /// active-backup: the primary when it is up, else the active one while
    /// it stays up, else the first member up.
    fn choose_active(&mut self) {
        let up = |i: u32| self.members.iter().any(|m| m.ifindex == i && m.up);
        let primary = self
            .spec
            .primary
            .as_ref()
            .and_then(|p| self.members.iter().find(|m| &m.name == p))
            .filter(|m| m.up)
            .map(|m| m.ifindex);
        self.active = match primary {
            Some(p) => p,
            None if self.active != 0 && up(self.active) => self.active,
            None => self.members.iter().find(|m| m.up).map_or(0, |m| m.ifindex),
        };
    }

    /// The datapath's entry: usable members first.
    fn entry(&self) -> UplinkGroup {
        let mut e = UplinkGroup {
            mode: match self.spec.mode {
                UplinkMode::ActiveBackup => UPLINK_MODE_ACTIVE_BACKUP,
                UplinkMode::BalanceXor => UPLINK_MODE_BALANCE_XOR,
                UplinkMode::BalanceRr => UPLINK_MODE_BALANCE_RR,
                UplinkMode::Broadcast => UPLINK_MODE_BROADCAST,
                UplinkMode::Lacp => UPLINK_MODE_LACP,
            },
            hash: match self.spec.hash.unwrap_or_default() {
                UplinkHash::L2 => UPLINK_HASH_L2,
                UplinkHash::L3l4 => UPLINK_HASH_L3L4,
            },
            active: self.active,
            ..Default::default()
        };
        for m in self
            .members
            .iter()
            .filter(|m| m.up && m.aggregated)
            .take(MAX_UPLINK_MEMBERS)
        {
            e.members[e.count as usize] = m.ifindex;
            e.count += 1;
        }
        e
    }

    fn write(&self, dp: &mut Datapath) -> Result<()> {
        dp.uplink_groups()?
            .insert(self.ifindex, self.entry(), 0)
            .context("writing the uplink group map")
    }

    /// The device, the members' MACs, the maps, the programs.
    fn build(&mut self, dp: &mut Datapath, adopting: bool) -> Result<()> {
        let name = self.spec.name.clone();
        if !adopting {
            rtnl::link_add_veth(&name, &self.peer)?;
        }
        self.ifindex = netdev::ifindex(&name)?;
        link::set_mac(&name, self.mac)?;
        for m in &self.members {
            m.dress(self.mac)?;
        }
        let links = link::states();
        let now = std::time::Instant::now();
        for (i, m) in self.members.iter_mut().enumerate() {
            m.up = usable(&links, &m.name, self.spec.mode);
            m.monitors(&self.spec, i as u16 + 1, arpmon::probe_mac(self.mac, i))?;
        }
        self.arp_round(&links, now);
        self.choose_active();
        // The maps before the programs: a member's first frame already
        // belongs to the group.
        self.write(dp)?;
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(&name) {
            let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
                if n.raw_os_error() == Some(libc::EEXIST));
            if !exists {
                return Err(e).with_context(|| format!("adding the clsact qdisc to '{name}'"));
            }
        }
        dp.attach_group_egress(&name, self.ifindex)?;
        for m in &self.members {
            m.enlist(dp, self.ifindex)?;
        }
        rtnl::link_set_up(&self.peer)?;
        rtnl::link_set_up(&name)?;
        Ok(())
    }

    /// Undoes `build` as far as it got (errors ignored: best effort).
    fn destroy(&self, dp: &mut Datapath) {
        for m in &self.members {
            m.leave(dp);
        }
        if self.ifindex != 0 {
            dp.detach_group_egress(self.ifindex);
            if let Ok(mut map) = dp.uplink_groups() {
                let _ = map.remove(&self.ifindex);
            }
        }
        if netdev::ifindex(&self.spec.name).is_ok() {
            let _ = rtnl::link_del(&self.spec.name);
        }
    }
}
