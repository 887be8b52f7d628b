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
                    mtu: n.opts.mtu,
                    dns: !n.opts.no_dns,
                    dns_hosts: dns_hosts_of(&n.opts),
                    ipv6: (!n.opts.gateway6.is_empty()).then(|| crate::config::Ipv6Section {
                        gateways: n.opts.gateway6.clone(),
                        dhcp_range: n.opts.dhcp6_range.clone(),
                        hosts: n.opts.dhcp6_hosts.clone(),
                        nat6: n.opts.nat6,
                    }),
                    nat_ports: n.nat.as_ref().map(|s| [s.ports.0, s.ports.1]),
                    nat_udp: n.nat.as_ref().map(|s| s.udp),
                    forwards: n
                        .nat
                        .iter()
                        .flat_map(|s| &s.forwards)
                        .map(|((p, port), (a, to))| {
                            (forward_key(proto(*p), *port), format!("{a}:{to}"))
                        })
                        .chain(
                            n.nat
                                .iter()
                                .filter_map(|s| s.nat6.as_ref())
                                .flat_map(|s| &s.forwards)
                                .map(|((p, port), (a, to))| {
                                    (forward_key(proto(*p), *port), format!("[{a}]:{to}"))
                                }),
                        )
                        .collect(),
                    port_policy: n.opts.port_policy.clone(),
                    storm_pps: n.opts.storm_pps,
                    vxlan: n.opts.vxlan.clone(),
                },
            )
        })
        .collect()
}

pub(crate) fn running_ports(sw: &Switch) -> BTreeMap<String, PortSpec> {
    guest_ports(sw)
        .map(|(i, p)| (i.clone(), spec_of(p)))
        .collect()
}

/// The running spec of guest port `iface`, if it is one.
pub(crate) fn running_port(sw: &Switch, iface: &str) -> Option<PortSpec> {
    sw.ports
        .get(iface)
        .filter(|p| p.role == PortRole::Guest)
        .map(spec_of)
}

pub(crate) fn guest_ports(sw: &Switch) -> impl Iterator<Item = (&String, &crate::switch::Port)> {
    sw.ports.iter().filter(|(_, p)| p.role == PortRole::Guest)
}

pub(crate) fn spec_of(p: &crate::switch::Port) -> PortSpec {
    PortSpec {
        net: p.net.clone(),
        hook: p.hook,
        hairpin: p.hairpin,
        trusted: p.trusted,
        vlan: p.vlan.clone(),
        security: p.security.args(),
        policy: p.policy.clone(),
    }
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
            // (with the network's default VLAN)
            let spec = wanted(cfg, &p.iface).map_or_else(|| p.attach().spec(), |(s, _)| s);
            want.insert(p.iface.clone(), spec);
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
            None => p.ports_added.push(PortAdded {
                iface: i.clone(),
                to: w.to_string(),
            }),
            Some(h) if h != w || recreated.contains(&w.net) => {
                let live = h.only_vlan_differs(w) && !recreated.contains(&w.net);
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
    (p.uplinks_added, p.uplinks_removed, p.uplinks_changed) = sw.uplinks_plan(&cfg.uplinks);
    p
}

/// Checks against the host what the file alone cannot tell (uplinks exist).
/// A config checked as `net add` checks each network's options (DHCP
/// range, hosts, domain, lease time; NAT ports), before anything changes.
/// `kvnet check` runs exactly this, without a daemon; `apply` runs it
/// first. What depends on this host's interfaces is checked by `apply`
/// alone (its preflight).
pub fn validate(cfg: &Config) -> Result<()> {
    for (i, g) in cfg.uplinks.iter().enumerate() {
        g.check()?;
        if cfg.uplinks[..i].iter().any(|o| o.name == g.name) {
            bail!("uplink group '{}' is defined twice", g.name);
        }
    }
    for (name, s) in &cfg.networks {
        let spec = NetSpec::of(name, s);
        let Some(opts) = spec.opts() else {
            // An unknown mode: a warning, the network is skipped.
            continue;
        };
        let gateway = spec
            .gateway
            .as_deref()
            .map(|g| g.parse::<crate::gateway::Cidr>())
            .transpose()
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("network '{name}'"))?;
        crate::dhcp::service::plan(&opts, gateway.as_ref(), spec.gateway_iface.as_deref())
            .with_context(|| format!("network '{name}': dhcp"))?;
        if let Some(r) = &opts.nat_ports {
            let range = crate::switch::nat::parse_port_range(r)?;
            crate::switch::nat::effective_ports(range, crate::switch::nat::host_ephemeral_range())
                .with_context(|| format!("network '{name}': nat port_range"))?;
        }
    }
    Ok(())
}

/// Whether `cfg` defines nothing at all: applied, it would remove every
/// network and port.
pub fn is_empty(cfg: &Config) -> bool {
    cfg.networks.is_empty()
        && cfg.ports.is_empty()
        && cfg.rules.is_empty()
        && cfg.uplinks.is_empty()
}

fn preflight(cfg: &Config, plan: &Plan) -> Result<()> {
    for n in plan.networks_added.iter().chain(
        plan.networks_changed
            .iter()
            .filter(|c| c.recreate)
            .map(|c| &c.name),
    ) {
        if let Some(u) = cfg.networks.get(n).and_then(|s| s.uplink.as_deref()) {
            if cfg.uplinks.iter().any(|g| g.name == u) {
                // An uplink group of the file: created by the apply itself.
                continue;
            }
            netdev::ifindex(u).with_context(|| format!("network '{n}': uplink '{u}'"))?;
            if cfg.networks[n].mode == "nat" && netdev::ipv4(u)?.is_none() {
                bail!("network '{n}': uplink '{u}' has no IPv4 address to masquerade behind");
            }
        }
    }
    Ok(())
}

/// Makes the running state what `cfg` says, touching only the differences:
/// all of it, or, when a step fails, none of it (what was done is rolled
/// back to the running state as it was).
pub fn apply(sw: &mut Switch, cfg: &Config, dry_run: bool) -> Result<Plan> {
    validate(cfg)?;
    if is_empty(cfg) && !sw.nets.is_empty() {
        bail!(
            "the file defines no networks, ports or rules: applying it would remove all {} running networks; remove them with `kvnet net del`, or everything with `kvnet down`",
            sw.nets.len()
        );
    }
    let plan = with_rt(|rt| plan(sw, rt, cfg));
    preflight(cfg, &plan)?;
    if dry_run {
        return Ok(plan);
    }
    // An upgrade or adoption takes over whatever it can: no rollback there
    // (the caller decides), and nothing ran before it to roll back to.
    if sw.dp.adopting {
        return execute(sw, cfg, plan);
    }
    let before = running_config(sw);
    let before_rt = with_rt(|rt| (rt.applied.clone(), rt.dynamic.clone()));
    match execute(sw, cfg, plan) {
        Ok(plan) => Ok(plan),
        Err(e) => {
            with_rt(|rt| (rt.applied, rt.dynamic) = before_rt.clone());
            let back = with_rt(|rt| self::plan(sw, rt, &before));
            match execute(sw, &before, back) {
                Ok(_) => {
                    with_rt(|rt| (rt.applied, rt.dynamic) = before_rt);
                    Err(e.context("nothing applied: the running state was rolled back"))
                }
                Err(e2) => Err(e.context(format!(
                    "rolling back to the running state failed too ({e2:#}); `kvnet apply` the previous file again or `kvnet save` to see what runs"
                ))),
            }
        }
    }
}

/// Runs a plan, step by step; the first failing step ends it.
fn execute(sw: &mut Switch, cfg: &Config, mut plan: Plan) -> Result<Plan> {
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
    for u in &plan.uplinks_removed {
        sw.uplink_del(u)
            .with_context(|| format!("removing uplink group '{u}'"))?;
    }
    for c in &plan.uplinks_changed {
        let spec = cfg
            .uplinks
            .iter()
            .find(|g| g.name == c.name)
            .context("uplink group")?;
        sw.uplink_update(spec)
            .with_context(|| format!("changing uplink group '{}'", c.name))?;
    }
    for u in &plan.uplinks_added {
        let spec = cfg
            .uplinks
            .iter()
            .find(|g| &g.name == u)
            .context("uplink group")?;
        sw.uplink_add(spec)
            .with_context(|| format!("adding uplink group '{u}'"))?;
    }
    for c in &plan.networks_changed {
        if c.recreate {
            sw.net_del(&c.name)
                .with_context(|| format!("removing network '{}'", c.name))?;
            add_net(sw, &c.name)?;
        } else {
            sw.net_set(&c.name, Some(want[&c.name].ageing))?;
            let (h, w) = (&have_nets[&c.name], &want[&c.name]);
            if h.nat_ports != w.nat_ports || h.nat_udp != w.nat_udp {
                let ports = w.nat_ports.map(|[a, b]| format!("{a}-{b}"));
                sw.net_set_nat(&c.name, ports.as_deref(), w.nat_udp)
                    .with_context(|| format!("network '{}': nat settings", c.name))?;
            }
            if have_nets[&c.name].services_differ(&want[&c.name]) {
                let opts = want[&c.name].opts().context("mode unavailable")?;
                sw.net_set_dhcp(&c.name, &opts)
                    .with_context(|| format!("network '{}': dhcp settings", c.name))?;
            }
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
    for i in plan.ports_added.iter().map(|a| &a.iface).chain(
        plan.ports_changed
            .iter()
            .filter(|c| !c.live)
            .map(|c| &c.iface),
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
            &s.policy,
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
/// Applies a config's text; `path` names it in errors and, with
/// `adopt_path`, becomes the daemon's file (where `save` and SIGHUP go).
pub fn apply_text(
    sw: &mut Switch,
    path: Option<&Path>,
    text: &str,
    dry_run: bool,
    adopt_path: bool,
) -> Result<Plan> {
    let label = path.map(|p| p.display().to_string());
    let cfg = parse(label.as_deref().unwrap_or("<config>"), text)?;
    let plan = apply(sw, &cfg, dry_run)?;
    if !dry_run && adopt_path {
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
    apply_text(sw, Some(&path), &text, false, true)
}

/// The running state as a config file: networks (with the pass-through
/// settings of the last applied file), static ports, rules.
pub fn running_config(sw: &Switch) -> Config {
    config_of(sw, Listed::Static)
}

/// Which ports a config of the running state lists.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Listed {
    /// The running ports not attached by a rule or `kvnet ifup`, and the
    /// file's static ports whose interface is absent (`kvnet save`).
    Static,
    /// Only those absent static ports: the daemon's state file writes the
    /// running ports itself.
    Absent,
}

pub(crate) fn config_of(sw: &Switch, listed: Listed) -> Config {
    with_rt(|rt| {
        let mut cfg = Config {
            uplinks: sw.uplinks.groups.values().map(|g| g.spec.clone()).collect(),
            ..Config::default()
        };
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
            sec.isolated_ports = s.port_policy.isolated;
            sec.port_rate_in = s.port_policy.rate_in;
            sec.port_rate_out = s.port_policy.rate_out;
            sec.storm_pps = s.storm_pps;
            sec.mtu = s.mtu;
            sec.dns = (!s.dns).then_some(false);
            sec.dns_hosts = s.dns_hosts.clone();
            sec.ipv6 = s.ipv6.clone();
            sec.vxlan = s.vxlan.clone();
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
        for (i, p) in guest_ports(sw) {
            if listed == Listed::Absent || rt.dynamic.contains_key(i) {
                continue;
            }
            cfg.ports
                .push(Checked(spec_of(p).attach().port_section(i.clone())));
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

/// `kvnet net dump NET`: the network, its static ports and its rules as
/// config TOML (what `kvnet save` writes for it), valid for `kvnet check`.
pub fn net_dump(sw: &Switch, name: &str) -> Result<String> {
    sw.net(name)?;
    let mut cfg = running_config(sw);
    cfg.networks.retain(|n, _| n == name);
    cfg.ports.retain(|p| p.net == name);
    cfg.rules.retain(|r| r.attach().net == name);
    Ok(format!(
        "# network '{name}', written by `kvnet net dump`\n{}",
        to_toml(&cfg)?
    ))
}

/// Where `kvnet save` writes without `--force`: /etc/kvnet and the folder
/// of the daemon's file (the one it started from or last applied).
pub fn config_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Path::new(DEFAULT_CONFIG)
        .parent()
        .map(Path::to_path_buf)
        .into_iter()
        .collect();
    let source = with_rt(|rt| rt.source.clone());
    if let Some(d) = source.as_deref().and_then(Path::parent) {
        if !dirs.iter().any(|x| x == d) {
            dirs.push(d.to_path_buf());
        }
    }
    dirs
}

/// The path with symlinks resolved as far as it exists, the rest appended:
/// a link inside a config folder must not lead out of it.
fn resolved(path: &Path) -> PathBuf {
    let mut rest = Vec::new();
    let mut p = path;
    loop {
        if let Ok(real) = p.canonicalize() {
            return rest.iter().rev().fold(real, |acc, c| acc.join(c));
        }
        match (p.parent(), p.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_os_string());
                p = parent;
            }
            _ => return path.to_path_buf(),
        }
    }
}

/// A save without `--force` stays inside a config folder: the daemon is
/// root, and a client in the kvnet group must not make it write just any
/// file.
pub fn check_save_path(path: &Path, dirs: &[PathBuf]) -> Result<()> {
    let shown = dirs
        .iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let how = format!(
        "save into the config directory ({shown}), or pass --force (`kvnet save PATH --force`) to write it anyway"
    );
    if !path.is_absolute() {
        bail!(
            "refusing to save to {}: not an absolute path; {how}",
            path.display()
        );
    }
    if path
        .components()
        .any(|c| matches!(c, std::path::Component::ParentDir))
    {
        bail!(
            "refusing to save to {}: the path has '..' in it; {how}",
            path.display()
        );
    }
    let inside = |d: &PathBuf| {
        path.parent().is_some_and(|p| p.starts_with(d))
            && path
                .parent()
                .is_some_and(|p| resolved(p).starts_with(resolved(d)))
    };
    if !dirs.iter().any(inside) {
        bail!(
            "refusing to save to {}: it is outside the config directory; {how}",
            path.display()
        );
    }
    Ok(())
}

/// `kvnet save [FILE] [--force]`: writes the running state; returns the
/// path. Without `force`, only into the config directory.
pub fn save(sw: &Switch, path: Option<&Path>, force: bool) -> Result<PathBuf> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => with_rt(|rt| rt.source.clone()).unwrap_or_else(|| DEFAULT_CONFIG.into()),
    };
    if !force {
        check_save_path(&path, &config_dirs())?;
    }
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
    // A fresh file, never through a link someone left at its name.
    let _ = std::fs::remove_file(&tmp);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    written.with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    with_rt(|rt| rt.source = Some(path.clone()));
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_stay_in_the_config_directory() {
        /// Removes the scratch folder even when an assertion fails.
        struct Scratch(PathBuf);
        impl Drop for Scratch {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
        let base = std::env::temp_dir().join(format!("kvnet-save-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let _scratch = Scratch(base.clone());
        let conf = base.join("conf");
        let other = base.join("other");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        std::os::unix::fs::symlink(&other, conf.join("link")).unwrap();
        let dirs = vec![PathBuf::from("/etc/kvnet"), conf.clone()];
        let ok = |p: &Path| check_save_path(p, &dirs);
        // Inside: the folder itself, a subfolder yet to be made, /etc/kvnet.
        assert!(ok(&conf.join("kvnet.toml")).is_ok());
        assert!(ok(&conf.join("new/sub/kvnet.toml")).is_ok());
        assert!(ok(Path::new("/etc/kvnet/kvnet.toml")).is_ok());
        // Outside, by name, by '..', by a link, relative, a prefix that is
        // not a folder of it.
        let outside = [
            other.join("x.toml"),
            PathBuf::from("/etc/shadow"),
            conf.join("../other/x.toml"),
            conf.join("link/x.toml"),
            conf.join("link/new/x.toml"),
            PathBuf::from("kvnet.toml"),
            PathBuf::from(format!("{}-evil/x.toml", conf.display())),
        ];
        for p in &outside {
            let e = ok(p).expect_err(&p.display().to_string()).to_string();
            assert!(e.contains("--force"), "{e}");
            assert!(e.contains(&conf.display().to_string()), "{e}");
        }
        let e = ok(&other.join("x.toml")).unwrap_err().to_string();
        assert!(e.contains("outside the config directory"), "{e}");
    }
}
