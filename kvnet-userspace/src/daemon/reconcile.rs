//! Making the running switch what a config file wants: the running state
//! as specs, the plan, applying only the difference, `kvnet save`.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{bail, Context, Result};

use crate::{
    config::*,
    gateway::Gateway,
    netdev,
    switch::{network::PortRole, Switch, DEFAULT_AGEING},
};

/// What the daemon remembers besides the switch: where its file is, the
/// last applied file (pass-through settings, rules) and which ports joined
/// dynamically (by rule or `kvnet ifup`).
#[derive(Default)]
pub struct Runtime {
    pub source: Option<PathBuf>,
    pub applied: Config,
    /// Ports attached by a rule or ifup; `None`: by a rule (follows it),
    /// `Some`: by `kvnet ifup` with explicit settings (kept as they are).
    pub dynamic: BTreeMap<String, Option<PortSpec>>,
}

pub static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

pub(crate) fn with_rt<T>(f: impl FnOnce(&mut Runtime) -> T) -> T {
    let mut g = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Runtime::default))
}

fn running_nets(sw: &Switch, _rt: &Runtime) -> BTreeMap<String, NetSpec> {
    sw.nets
        .iter()
        .map(|(name, n)| {
            let proto = |p: u8| {
                if p == kvnet_common::IPPROTO_UDP {
                    "udp"
                } else {
                    "tcp"
                }
            };
            (
                name.clone(),
                NetSpec {
                    mode: n.mode.to_string(),
                    gateway: n.gateway.as_ref().map(|g| g.cidr.to_string()),
                    gateway_iface: n.gateway.as_ref().map(|g| g.host_if.clone()),
                    uplink: n.uplink.clone(),
                    ageing: n.ageing.as_secs(),
                    dhcp: dhcp_of(&n.opts),
                    nat_ports: n.nat.as_ref().map(|s| [s.ports.0, s.ports.1]),
                    nat_udp: n.nat.as_ref().map(|s| s.udp),
                    forwards: n
                        .nat
                        .iter()
                        .flat_map(|s| &s.forwards)
                        .map(|((p, port), (a, to))| {
                            (forward_key(proto(*p), *port), format!("{a}:{to}"))
                        })
                        .collect(),
                },
            )
        })
        .collect()
}

pub(crate) fn running_ports(sw: &Switch) -> BTreeMap<String, PortSpec> {
    sw.ports
        .iter()
        .filter(|(_, p)| p.role == PortRole::Guest)
        .map(|(i, p)| {
            (
                i.clone(),
                PortSpec {
                    net: p.net.clone(),
                    hook: p.hook,
                    hairpin: p.hairpin,
                    trusted: p.trusted,
                    vlan: p.vlan.clone(),
                    security: p.security.args(),
                },
            )
        })
        .collect()
}

/// The file's ports, for the interfaces that exist: static ones and those a
/// rule matches; plus ports that joined by `kvnet ifup` with explicit settings.
fn desired_ports(
    cfg: &Config,
    rt: &Runtime,
    nets: &BTreeMap<String, NetSpec>,
) -> (BTreeMap<String, PortSpec>, Vec<String>) {
    let present: BTreeSet<String> = netdev::interfaces().into_iter().collect();
    let mut want = BTreeMap::new();
    let mut pending = Vec::new();
    for p in &cfg.ports {
        if present.contains(&p.iface) {
            want.insert(p.iface.clone(), p.attach().spec());
        } else {
            pending.push(p.iface.clone());
        }
    }
    let owned: BTreeSet<String> = nets
        .values()
        .flat_map(|n| n.gateway_iface.iter().chain(n.uplink.iter()).cloned())
        .collect();
    for iface in &present {
        if want.contains_key(iface) || owned.contains(iface) || iface.starts_with("kvnet") {
            continue;
        }
        if let Some((spec, _)) = wanted(cfg, iface) {
            want.insert(iface.clone(), spec);
        }
    }
    for (iface, spec) in &rt.dynamic {
        if let Some(s) = spec {
            if !want.contains_key(iface) && nets.contains_key(&s.net) && present.contains(iface) {
                want.insert(iface.clone(), s.clone());
            }
        }
    }
    (want, pending)
}

/// The diff from the running state to `cfg`.
pub fn plan(sw: &Switch, rt: &Runtime, cfg: &Config) -> Plan {
    let mut p = Plan {
        warnings: warnings(cfg),
        ..Default::default()
    };
    let have_nets = running_nets(sw, rt);
    let want_nets: BTreeMap<String, NetSpec> = cfg
        .networks
        .iter()
        .filter(|(_, s)| mode_of(&s.mode).is_some())
        .map(|(n, s)| (n.clone(), NetSpec::of(n, s)))
        .collect();
    let mut recreated = BTreeSet::new();
    for (n, w) in &want_nets {
        match have_nets.get(n) {
            None => p.networks_added.push(n.clone()),
            Some(h) => {
                let (changes, live) = h.changes(w);
                if !changes.is_empty() {
                    if !live {
                        recreated.insert(n.clone());
                    }
                    p.networks_changed.push(NetChange {
                        name: n.clone(),
                        changes,
                        recreate: !live,
                    });
                }
            }
        }
    }
    for n in have_nets.keys() {
        if !want_nets.contains_key(n) {
            p.networks_removed.push(n.clone());
        }
    }
    let have_ports = running_ports(sw);
    let (want_ports, pending) = desired_ports(cfg, rt, &want_nets);
    p.ports_pending = pending;
    for (i, w) in &want_ports {
        match have_ports.get(i) {
            None => p.ports_added.push((i.clone(), w.to_string())),
            Some(h) if h != w || recreated.contains(&w.net) => {
                let live = h.net == w.net
                    && h.hook == w.hook
                    && h.hairpin == w.hairpin
                    && h.trusted == w.trusted
                    && same_security(&h.security, &w.security)
                    && !recreated.contains(&w.net);
                p.ports_changed.push(PortChange {
                    iface: i.clone(),
                    from: h.to_string(),
                    to: w.to_string(),
                    live,
                });
            }
            Some(_) => {}
        }
    }
    for i in have_ports.keys() {
        if !want_ports.contains_key(i) {
            p.ports_removed.push(i.clone());
        }
    }
    let old_rules: BTreeSet<String> = rt.applied.rules.iter().map(|r| rule_label(r)).collect();
    let new_rules: BTreeSet<String> = cfg.rules.iter().map(|r| rule_label(r)).collect();
    p.rules_added = new_rules.difference(&old_rules).cloned().collect();
    p.rules_removed = old_rules.difference(&new_rules).cloned().collect();
    p
}

/// Checks against the host what the file alone cannot tell (uplinks exist).
fn preflight(cfg: &Config, plan: &Plan) -> Result<()> {
    for n in plan.networks_added.iter().chain(
        plan.networks_changed
            .iter()
            .filter(|c| c.recreate)
            .map(|c| &c.name),
    ) {
        if let Some(u) = cfg.networks.get(n).and_then(|s| s.uplink.as_deref()) {
            netdev::ifindex(u).with_context(|| format!("network '{n}': uplink '{u}'"))?;
            if cfg.networks[n].mode == "nat" && netdev::ipv4(u)?.is_none() {
                bail!("network '{n}': uplink '{u}' has no IPv4 address to masquerade behind");
            }
        }
    }
    Ok(())
}

/// Makes the running state what `cfg` says, touching only the differences.
pub fn apply(sw: &mut Switch, cfg: &Config, dry_run: bool) -> Result<Plan> {
    let mut plan = with_rt(|rt| plan(sw, rt, cfg));
    preflight(cfg, &plan)?;
    if dry_run {
        return Ok(plan);
    }
    let have_nets = with_rt(|rt| running_nets(sw, rt));
    let want: BTreeMap<String, NetSpec> = cfg
        .networks
        .iter()
        .filter(|(_, s)| mode_of(&s.mode).is_some())
        .map(|(n, s)| (n.clone(), NetSpec::of(n, s)))
        .collect();
    let add_forwards = |sw: &mut Switch, n: &str, fw: &Forwards| -> Result<()> {
        for (k, to) in fw {
            let (proto, port) = k.split_once('/').context("forward key")?;
            sw.forward_add(n, proto, port.parse()?, to)
                .with_context(|| format!("network '{n}': forward {k} -> {to}"))?;
        }
        Ok(())
    };
    let add_net = |sw: &mut Switch, n: &str| -> Result<()> {
        let s = &want[n];
        let opts = s.opts().context("mode unavailable")?;
        sw.net_add(n, Some(s.ageing), &opts)
            .with_context(|| format!("adding network '{n}'"))?;
        add_forwards(sw, n, &s.forwards)
    };
    // Removals first (ports, then networks), so names and addresses free up.
    for i in &plan.ports_removed {
        sw.port_del(i)
            .with_context(|| format!("removing port '{i}'"))?;
    }
    for c in plan.ports_changed.iter().filter(|c| !c.live) {
        if sw.ports.contains_key(&c.iface) {
            sw.port_del(&c.iface)
                .with_context(|| format!("re-attaching port '{}'", c.iface))?;
        }
    }
    for n in &plan.networks_removed {
        sw.net_del(n)
            .with_context(|| format!("removing network '{n}'"))?;
    }
    for c in &plan.networks_changed {
        if c.recreate {
            sw.net_del(&c.name)
                .with_context(|| format!("removing network '{}'", c.name))?;
            add_net(sw, &c.name)?;
        } else {
            sw.net_set(&c.name, Some(want[&c.name].ageing))?;
            let (old, new) = (&have_nets[&c.name].forwards, &want[&c.name].forwards);
            for (k, to) in old {
                if new.get(k) != Some(to) {
                    let (proto, port) = k.split_once('/').context("forward key")?;
                    sw.forward_del(&c.name, proto, port.parse()?)
                        .with_context(|| format!("network '{}': removing forward {k}", c.name))?;
                }
            }
            let added: Forwards = new
                .iter()
                .filter(|(k, to)| old.get(*k) != Some(*to))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            add_forwards(sw, &c.name, &added)?;
        }
    }
    for n in &plan.networks_added {
        add_net(sw, n)?;
    }
    let (ports, _) = with_rt(|rt| desired_ports(cfg, rt, &want));
    for (i, _) in plan.ports_added.iter().map(|(i, t)| (i, t)).chain(
        plan.ports_changed
            .iter()
            .filter(|c| !c.live)
            .map(|c| (&c.iface, &c.to)),
    ) {
        let s = &ports[i];
        sw.port_add(
            &s.net,
            i,
            s.hairpin,
            s.hook,
            &s.vlan_args(),
            s.trusted,
            &s.security,
        )
        .with_context(|| format!("attaching port '{i}'"))?;
    }
    for c in plan.ports_changed.iter().filter(|c| c.live) {
        let mut a = ports[&c.iface].vlan_args();
        if a.is_empty() {
            a.no_vlan = true;
        }
        sw.port_set(&c.iface, &a)
            .with_context(|| format!("changing port '{}'", c.iface))?;
    }
    with_rt(|rt| {
        rt.applied = cfg.clone();
        let statics: BTreeSet<&String> = cfg.ports.iter().map(|p| &p.0.iface).collect();
        let mut dynamic = BTreeMap::new();
        for i in sw.ports.keys() {
            if statics.contains(i) {
                continue;
            }
            match rt.dynamic.get(i) {
                Some(Some(s)) => {
                    dynamic.insert(i.clone(), Some(s.clone()));
                }
                _ if wanted(cfg, i).is_some_and(|(_, rule)| rule) => {
                    dynamic.insert(i.clone(), None);
                }
                _ => {}
            }
        }
        rt.dynamic = dynamic;
    });
    plan.applied = true;
    Ok(plan)
}

/// Parses `text` and applies it; remembers `path` as the daemon's file.
pub fn apply_text(sw: &mut Switch, path: Option<&Path>, text: &str, dry_run: bool) -> Result<Plan> {
    let label = path.map(|p| p.display().to_string());
    let cfg = parse(label.as_deref().unwrap_or("<config>"), text)?;
    let plan = apply(sw, &cfg, dry_run)?;
    if !dry_run {
        if let Some(p) = path {
            with_rt(|rt| rt.source = Some(p.to_path_buf()));
        }
    }
    Ok(plan)
}

/// SIGHUP: re-reads the daemon's file and applies it.
pub fn reload(sw: &mut Switch) -> Result<Plan> {
    let path = with_rt(|rt| rt.source.clone()).context("the daemon has no config file")?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    apply_text(sw, Some(&path), &text, false)
}

/// The running state as a config file: networks (with the pass-through
/// settings of the last applied file), static ports, rules.
pub fn running_config(sw: &Switch) -> Config {
    with_rt(|rt| {
        let mut cfg = Config::default();
        for (n, s) in running_nets(sw, rt) {
            let old = rt.applied.networks.get(&n).map(|c| c.0.clone());
            let mut sec = old.clone().unwrap_or_default();
            sec.mode = s.mode.clone();
            sec.gateway = s.gateway.clone();
            sec.gateway_iface = s
                .gateway_iface
                .clone()
                .filter(|i| Some(i.as_str()) != Gateway::default_name(&n).ok().as_deref());
            sec.uplink = s.uplink.clone();
            sec.ageing = (s.ageing != DEFAULT_AGEING.as_secs()).then_some(s.ageing);
            sec.dhcp = s.dhcp.clone();
            let default_ports = [
                crate::control::DEFAULT_NAT_PORTS.0,
                crate::control::DEFAULT_NAT_PORTS.1,
            ];
            let old_ports = sec.nat.as_ref().and_then(|n| n.port_range);
            let old_udp = sec.nat.as_ref().and_then(|n| n.udp);
            if s.nat_ports.is_none() {
                sec.nat = None;
            } else if s.nat_ports != Some(old_ports.unwrap_or(default_ports))
                || s.nat_udp != Some(old_udp.unwrap_or_default())
            {
                sec.nat = Some(NatSection {
                    port_range: s.nat_ports,
                    udp: s.nat_udp.filter(|u| *u != Default::default()),
                });
            }
            let same_forwards = NetSpec::of(&n, &sec).forwards == s.forwards;
            if !same_forwards {
                sec.forwards = s
                    .forwards
                    .iter()
                    .filter_map(|(k, to)| {
                        let (proto, port) = k.split_once('/')?;
                        Some(ForwardSection {
                            proto: proto.into(),
                            port: port.parse().ok()?,
                            to: to.clone(),
                        })
                    })
                    .collect();
            }
            cfg.networks.insert(n, Checked(sec));
        }
        for (n, s) in &rt.applied.networks {
            if mode_of(&s.mode).is_none() {
                cfg.networks.insert(n.clone(), s.clone());
            }
        }
        for (i, p) in running_ports(sw) {
            if rt.dynamic.contains_key(&i) {
                continue;
            }
            let a = p.attach();
            cfg.ports.push(Checked(PortSection {
                iface: i,
                net: a.net,
                hook: a.hook,
                hairpin: a.hairpin,
                trusted: a.trusted,
                vlan: a.vlan,
                trunk: a.trunk,
                native: a.native,
                mac: a.security.mac,
                ip: a.security.ip,
                max_macs: a.security.max_macs,
                no_port_security: a.security.no_port_security,
            }));
        }
        // Static ports of the file whose interface is absent stay.
        for p in &rt.applied.ports {
            if !sw.ports.contains_key(&p.iface) && cfg.networks.contains_key(&p.attach().net) {
                cfg.ports.push(p.clone());
            }
        }
        cfg.rules = rt
            .applied
            .rules
            .iter()
            .filter(|r| cfg.networks.contains_key(&r.attach().net))
            .cloned()
            .collect();
        cfg
    })
}

/// `kvnet save [FILE]`: writes the running state; returns the path.
pub fn save(sw: &Switch, path: Option<&Path>) -> Result<PathBuf> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => with_rt(|rt| rt.source.clone()).unwrap_or_else(|| DEFAULT_CONFIG.into()),
    };
    let text = format!(
        "# kvnet configuration, written by `kvnet save`\n{}",
        to_toml(&running_config(sw))?
    );
    // Never write what would not load back.
    parse(&path.display().to_string(), &text).context("the saved state does not validate")?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    with_rt(|rt| rt.source = Some(path.clone()));
    Ok(path)
}
