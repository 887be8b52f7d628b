//! Restart without loss: the daemon's running state,
//! written to `<state-dir>` on every change, and its adoption by the next
//! daemon.
//!
//! - `running.toml`: the running networks and ports in the config format
//!   (what `kvnet save` writes, plus the ports that joined by a rule or
//!   `kvnet ifup`), readable by `kvnet check` / `kvnet daemon --config`.
//! - `adopt.json`: what the config format does not say: network ids (the
//!   datapath's maps are keyed by them), the host settings to restore on
//!   `kvnet down`, the config file and rules last applied, which ports are
//!   dynamic.
//!
//! A daemon that starts while kvnet's programs are still pinned and these
//! files exist adopts the running datapath: pinned maps (FDB, conntrack,
//! NAT counters, ...) are reused untouched, the gateway interfaces, filters
//! and links stay and get the new programs swapped in atomically.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Checked, Config, PortSection},
    daemon::reconcile::Listed,
    switch::network::Restore,
    switch::Port,
    switch::Switch,
};

pub const RUNNING: &str = "running.toml";
pub const ADOPT: &str = "adopt.json";

/// `D` is how the dynamic ports are held: owned when read back, a view of
/// the daemon's own map when written (no copy per port on every change).
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Saved<D = BTreeMap<String, Option<PortSection>>> {
    /// The daemon's config file (`kvnet save`/SIGHUP use it).
    pub source: Option<PathBuf>,
    /// The last applied config file (its rules and static ports), as TOML.
    pub applied: String,
    /// Ports that joined by a rule (None) or by `kvnet ifup` with explicit
    /// settings (Some).
    pub dynamic: D,
    pub nets: BTreeMap<String, SavedNet>,
    /// Routed uplinks: the host settings to restore when the last user goes.
    pub routed_uplinks: BTreeMap<String, Vec<Restore>>,
    /// Uplink groups: their members' own MACs.
    #[serde(default)]
    pub uplink_groups: BTreeMap<String, crate::uplink::SavedGroup>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct SavedNet {
    pub id: u32,
    pub restore: Vec<Restore>,
}

struct Persist {
    dir: PathBuf,
    last: String,
    enabled: bool,
    text: TextCache,
}

/// TOML already written, by what it says: with thousands of ports,
/// building and serializing every one of them on every change was most of
/// a `port add`.
#[derive(Default)]
struct TextCache {
    ports: HashMap<String, (Written, String)>,
    applied: Option<(Config, String)>,
}

/// What a port's `[[ports]]` table was written from.
#[derive(Clone, PartialEq)]
struct Written {
    net: String,
    hook: crate::control::Hook,
    hairpin: bool,
    trusted: bool,
    vlan: crate::vlan::VlanCfg,
    security: crate::security::Security,
    policy: crate::policy::PolicyArgs,
}

impl Written {
    fn of(p: &Port) -> Written {
        Written {
            net: p.net.clone(),
            hook: p.hook,
            hairpin: p.hairpin,
            trusted: p.trusted,
            vlan: p.vlan.clone(),
            security: p.security.clone(),
            policy: p.policy.clone(),
        }
    }

    /// Field by field, so an unchanged port costs no allocation.
    fn still(&self, p: &Port) -> bool {
        self.net == p.net
            && self.hook == p.hook
            && self.hairpin == p.hairpin
            && self.trusted == p.trusted
            && self.vlan == p.vlan
            && self.security == p.security
            && self.policy == p.policy
    }
}

impl TextCache {
    /// `[[ports]]` tables for the running guest ports, in name order;
    /// entries of ports gone are dropped.
    fn ports(&mut self, sw: &Switch) -> Result<String> {
        let mut text = String::with_capacity(64 * sw.ports.len());
        let mut listed = 0;
        for (iface, p) in crate::daemon::reconcile::guest_ports(sw) {
            listed += 1;
            text += "\n";
            match self.ports.get(iface) {
                Some((w, t)) if w.still(p) => text += t,
                _ => {
                    let section = crate::daemon::reconcile::spec_of(p)
                        .attach()
                        .port_section(iface.clone());
                    let one = Config {
                        ports: vec![Checked(section)],
                        ..Default::default()
                    };
                    let t = config::to_toml(&one)?;
                    text += &t;
                    self.ports.insert(iface.clone(), (Written::of(p), t));
                }
            }
        }
        if self.ports.len() > listed {
            self.ports.retain(|iface, _| {
                sw.ports
                    .get(iface)
                    .is_some_and(|p| p.role == crate::switch::network::PortRole::Guest)
            });
        }
        Ok(text)
    }

    fn applied(&mut self, applied: &Config) -> Result<String> {
        match &self.applied {
            Some((c, t)) if c == applied => Ok(t.clone()),
            _ => {
                let t = config::to_toml(applied)?;
                self.applied = Some((applied.clone(), t.clone()));
                Ok(t)
            }
        }
    }
}

static PERSIST: Mutex<Option<Persist>> = Mutex::new(None);

/// Where `persist` writes; nothing is written before this.
pub fn enable(state_dir: &Path) {
    *PERSIST.lock().unwrap_or_else(|e| e.into_inner()) = Some(Persist {
        dir: state_dir.to_path_buf(),
        last: String::new(),
        enabled: true,
        text: TextCache::default(),
    });
}

/// No more writes (`kvnet down` is removing everything).
pub fn disable() {
    if let Some(p) = PERSIST.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
        p.enabled = false;
    }
}

pub fn exists(state_dir: &Path) -> bool {
    state_dir.join(RUNNING).exists() && state_dir.join(ADOPT).exists()
}

pub fn remove(state_dir: &Path) {
    let _ = std::fs::remove_file(state_dir.join(RUNNING));
    let _ = std::fs::remove_file(state_dir.join(ADOPT));
    let _ = std::fs::remove_file(state_dir.join(crate::switch::journal::JOURNAL));
}

/// The dynamic ports for adopt.json, serialized straight from the
/// daemon's map.
struct DynamicView<'a>(&'a BTreeMap<String, Option<config::PortSpec>>);

impl Serialize for DynamicView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_map(
            self.0
                .iter()
                .map(|(i, spec)| (i, spec.as_ref().map(|spec| section(i, spec)))),
        )
    }
}

/// The running state, in full: every guest port is listed.
fn running(sw: &Switch, cache: &mut TextCache) -> Result<(String, String)> {
    // Networks, then ports, then rules: each `[[...]]` header opens its
    // own table, so the parts are written apart and the running ports'
    // tables come from the cache.
    let mut cfg = crate::daemon::reconcile::config_of(sw, Listed::Absent);
    let absent = Config {
        ports: std::mem::take(&mut cfg.ports),
        ..Default::default()
    };
    let rules = Config {
        rules: std::mem::take(&mut cfg.rules),
        ..Default::default()
    };
    let toml = format!(
        "# kvnet's running state, written by the daemon on every change\n{}{}\n{}\n{}",
        config::to_toml(&cfg)?,
        cache.ports(sw)?,
        config::to_toml(&absent)?,
        config::to_toml(&rules)?
    );
    let json = crate::daemon::reconcile::with_rt(|rt| -> Result<String> {
        let saved = Saved {
            source: rt.source.clone(),
            applied: cache.applied(&rt.applied)?,
            dynamic: DynamicView(&rt.dynamic),
            nets: sw
                .nets
                .iter()
                .map(|(n, net)| {
                    (
                        n.clone(),
                        SavedNet {
                            id: net.id,
                            restore: net.restore.clone(),
                        },
                    )
                })
                .collect(),
            routed_uplinks: sw
                .routed_uplinks
                .iter()
                .map(|(n, u)| (n.clone(), u.restore.clone()))
                .collect(),
            uplink_groups: sw.uplinks.saved(),
        };
        Ok(serde_json::to_string(&saved)?)
    })?;
    Ok((toml, json))
}

fn section(iface: &str, spec: &config::PortSpec) -> PortSection {
    spec.attach().port_section(iface.to_string())
}

/// Replaced whole (write, then rename), never fsynced: every state file
/// describes pins in bpffs, which a crash of the host takes with it (a
/// daemon finding state files without pins starts from its config), and
/// what a killed daemon wrote is in the page cache. A sync per change was
/// most of a `port add`.
fn write_atomic(path: &Path, text: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Writes the state files if the running state changed since the last
/// write. Called after every request, link event and reload.
pub fn persist(sw: &Switch) {
    let mut g = PERSIST.lock().unwrap_or_else(|e| e.into_inner());
    let Some(p) = g.as_mut().filter(|p| p.enabled) else {
        return;
    };
    let r = running(sw, &mut p.text).and_then(|(toml, json)| {
        let both = format!("{toml}\n{json}");
        if both == p.last {
            crate::switch::journal::close();
            return Ok(());
        }
        std::fs::create_dir_all(&p.dir).with_context(|| format!("creating {}", p.dir.display()))?;
        // adopt.json first: a running.toml never names networks whose ids
        // were not written.
        write_atomic(&p.dir.join(ADOPT), &json)?;
        write_atomic(&p.dir.join(RUNNING), &toml)?;
        p.last = both;
        // What the journal held is in the state files now, or undone.
        crate::switch::journal::close();
        Ok(())
    });
    if let Err(e) = r {
        log::warn!("writing the state file: {e:#}");
        eprintln!("kvnet: writing the state file: {e:#}");
    }
}

/// Rebuilds the switch's state over a running datapath (`sw.dp` loaded
/// with `Datapath::adopt`) from the state files. Networks or ports that can
/// no longer be built (an uplink or tap gone while the daemon was down) are
/// reported and left out; their datapath entries are swept.
pub fn adopt(sw: &mut Switch, state_dir: &Path) -> Result<config::Plan> {
    let running_path = state_dir.join(RUNNING);
    let cfg = config::load(&running_path)?;
    let text = std::fs::read_to_string(state_dir.join(ADOPT))
        .with_context(|| format!("reading {}", state_dir.join(ADOPT).display()))?;
    let saved: Saved = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", state_dir.join(ADOPT).display()))?;
    sw.adopt_ids = saved.nets.iter().map(|(n, s)| (n.clone(), s.id)).collect();
    let applied = if saved.applied.trim().is_empty() {
        Config::default()
    } else {
        config::parse("<applied config>", &saved.applied).unwrap_or_default()
    };
    // Explicit `kvnet ifup` ports are wanted by the plan like static ones.
    crate::daemon::reconcile::with_rt(|rt| {
        rt.dynamic = saved
            .dynamic
            .iter()
            .map(|(i, s)| (i.clone(), s.as_ref().map(|s| s.attach().spec())))
            .collect();
    });
    let plan = crate::daemon::reconcile::apply(sw, &cfg, false);
    if let (Err(e), Some(_)) = (&plan, sw.dp.upgrading_from()) {
        // An upgrade takes everything over or nothing.
        return Err(anyhow::anyhow!("step 'swap': {e:#}"));
    }
    if let Err(e) = &plan {
        eprintln!(
            "kvnet: adopting {}: {e:#} (continuing with what could be adopted)",
            running_path.display()
        );
    }
    // What to restore on `kvnet down`: the previous daemon's list (it
    // holds the host's original values), plus what this daemon added (an
    // upgrade's new settings).
    for (n, s) in &saved.nets {
        if let Some(net) = sw.nets.get_mut(n) {
            net.restore = merged(&s.restore, &net.restore);
        }
    }
    for (n, r) in &saved.routed_uplinks {
        if let Some(u) = sw.routed_uplinks.get_mut(n) {
            u.restore = merged(r, &u.restore);
        }
    }
    sw.uplinks.adopt_saved(&saved.uplink_groups);
    crate::daemon::reconcile::with_rt(|rt| {
        rt.source = saved.source.clone();
        rt.applied = applied;
        // Keep only what is attached now.
        let dynamic = saved
            .dynamic
            .iter()
            .filter(|(i, _)| sw.ports.contains_key(*i))
            .map(|(i, s)| (i.clone(), s.as_ref().map(|s| s.attach().spec())))
            .collect();
        rt.dynamic = dynamic;
    });
    finish(sw);
    plan.or_else(|_| Ok(config::Plan::default()))
}

fn merged(saved: &[Restore], now: &[Restore]) -> Vec<Restore> {
    let mut all = saved.to_vec();
    all.extend(now.iter().filter(|r| !saved.contains(r)).cloned());
    all
}

/// Host settings this daemon made that the state files do not list: what
/// an upgrade that rolls back must undo (the older datapath never had them).
pub fn added_host_settings(sw: &Switch, state_dir: &Path) -> Vec<Restore> {
    let saved: Saved = std::fs::read_to_string(state_dir.join(ADOPT))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let known: Vec<&Restore> = saved
        .nets
        .values()
        .flat_map(|n| &n.restore)
        .chain(saved.routed_uplinks.values().flatten())
        .collect();
    sw.nets
        .values()
        .flat_map(|n| &n.restore)
        .chain(sw.routed_uplinks.values().flat_map(|u| &u.restore))
        .filter(|r| !known.contains(r))
        .cloned()
        .collect()
}

/// Ends an adoption: writes the flood sets once, whole, and sweeps the
/// maps of whatever belongs to no adopted network or port.
fn finish(sw: &mut Switch) {
    sw.dp.adopting = false;
    sw.adopt_ids.clear();
    let nets: Vec<(String, u32)> = sw.nets.iter().map(|(n, x)| (n.clone(), x.id)).collect();
    let ids: BTreeSet<u32> = nets.iter().map(|(_, id)| *id).collect();
    let mut ifindexes: BTreeSet<u32> = sw.ports.values().map(|p| p.ifindex).collect();
    ifindexes.extend(sw.routed_uplinks.values().map(|u| u.ifindex));
    // Flood sets: every VLAN of every network, from its members; stale
    // sets (VLANs without members, gone networks) go.
    let stale_floods: Vec<kvnet_common::FloodKey> = sw
        .dp
        .flood()
        .map(|f| f.keys().filter_map(|k| k.ok()).collect())
        .unwrap_or_default();
    for (name, id) in &nets {
        let members = sw.members(name);
        let mut vids: BTreeSet<u16> = members
            .iter()
            .flat_map(|(_, c)| c.memberships().into_keys())
            .collect();
        vids.extend(
            stale_floods
                .iter()
                .filter(|k| k.net_id == *id)
                .map(|k| k.vid),
        );
        if let Err(e) = sw.write_floods(*id, &members, &vids) {
            eprintln!("kvnet: adopting network {name}: flood sets: {e:#}");
        }
    }
    if let Ok(mut f) = sw.dp.flood() {
        for k in stale_floods.iter().filter(|k| !ids.contains(&k.net_id)) {
            let _ = f.remove(k);
        }
    }
    let live_port = |i: &u32| ifindexes.contains(i);
    let live_net = |n: &u32| ids.contains(n);
    let gone_ports = sweep(sw.dp.ports(), |k, _| !live_port(k));
    if let Ok(mut st) = sw.dp.port_stats() {
        for k in &gone_ports {
            let _ = st.remove(k);
        }
    }
    // MACs owned by ports that vanished while no daemon ran are free again
    // (a guest coming back on a new tap would otherwise be refused).
    let swept = gone_ports.len()
        + sweep(sw.dp.mac_owners(), |k, o| {
            !live_port(o) || !live_net(&k.net_id)
        })
        .len()
        + sweep(sw.dp.v6_owners(), |k, o| {
            !live_port(&o.ifindex) || !live_net(&k.net_id)
        })
        .len()
        + sweep(sw.dp.fdb(), |k, e| {
            !live_port(&e.ifindex) || !live_net(&k.net_id)
        })
        .len();
    sweep(sw.dp.vlan_members(), |k, _| !live_port(&k.ifindex));
    sweep(sw.dp.nets(), |k, _| !live_net(k));
    sweep(sw.dp.gw_hosts(), |_, id| !live_net(id));
    // XDP links of ports that are no longer XDP ports.
    let xdp: BTreeSet<u32> = sw
        .ports
        .values()
        .filter(|p| p.xdp)
        .map(|p| p.ifindex)
        .collect();
    if let Ok(dir) = std::fs::read_dir(sw.dp.pin_dir().join("links")) {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let keep = name
                .strip_prefix("xdp_")
                .and_then(|i| i.parse::<u32>().ok())
                .is_some_and(|i| xdp.contains(&i));
            if !keep {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    if swept > 0 {
        eprintln!("kvnet: adoption swept {swept} stale datapath entries");
    }
}

/// Removes the entries of `map` that `stale` picks; returns their keys.
fn sweep<K: aya::Pod, V: aya::Pod>(
    map: Result<aya::maps::HashMap<&mut aya::maps::MapData, K, V>>,
    stale: impl Fn(&K, &V) -> bool,
) -> Vec<K> {
    let Ok(mut m) = map else {
        return Vec::new();
    };
    let gone: Vec<K> = m
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, v)| stale(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &gone {
        let _ = m.remove(k);
    }
    gone
}
