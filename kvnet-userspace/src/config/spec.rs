//! What a config file wants, as specs comparable with the running state,
//! and the plan (the difference) the daemon shows and applies.
use std::fmt;

use serde::{Deserialize, Serialize};

use super::*;
use crate::{
    control::{Hook, NetOpts, VlanArgs, DEFAULT_AGEING},
    gateway::{Cidr, Gateway},
    policy::PolicyArgs,
    security::SecurityArgs,
    vlan::{self, VlanCfg},
};

/// A network as the switch builds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetSpec {
    pub mode: String,
    pub gateway: Option<String>,
    pub gateway_iface: Option<String>,
    pub uplink: Option<String>,
    pub ageing: u64,
    /// DHCP settings (from the options the network was created with).
    pub dhcp: Option<DhcpSection>,
    /// The gateway interface's MTU (None: the kernel's default).
    pub mtu: Option<u16>,
    /// Whether the gateway serves DNS (with DHCP).
    pub dns: bool,
    pub dns_hosts: Vec<DnsHostSection>,
    pub ipv6: Option<Ipv6Section>,
    /// NAT networks: the source port range (default filled in).
    pub nat_ports: Option<[u16; 2]>,
    /// NAT networks: how UDP is mapped (default filled in).
    pub nat_udp: Option<crate::control::NatUdp>,
    /// NAT networks: port forwards.
    pub forwards: Forwards,
    /// Defaults for the guest ports: isolation, rate limits.
    pub port_policy: PolicyArgs,
    pub storm_pps: Option<u32>,
    pub vxlan: Option<crate::vxlan::VxlanOpts>,
}

impl NetSpec {
    pub fn of(name: &str, s: &NetSection) -> NetSpec {
        let gateway = s
            .gateway
            .as_deref()
            .and_then(|g| g.parse::<Cidr>().ok())
            .map(|c| c.to_string());
        NetSpec {
            mode: s.mode.clone(),
            gateway_iface: match &gateway {
                Some(_) => s
                    .gateway_iface
                    .clone()
                    .or_else(|| Gateway::default_name(name).ok()),
                None => None,
            },
            gateway,
            uplink: s.uplink.clone(),
            ageing: s.ageing.unwrap_or(DEFAULT_AGEING.as_secs()),
            dhcp: s.dhcp.clone(),
            // A VXLAN network's guests get the underlay's MTU less the
            // headers unless the file says otherwise (as the switch does).
            mtu: s
                .mtu
                .or_else(|| s.vxlan.as_ref().and_then(|v| v.default_mtu().ok())),
            vxlan: s.vxlan.clone(),
            dns: s.dns.unwrap_or(true),
            dns_hosts: s.dns_hosts.clone(),
            ipv6: s.ipv6.clone(),
            nat_ports: (s.mode == "nat").then(|| {
                s.nat.as_ref().and_then(|n| n.port_range).unwrap_or([
                    crate::control::DEFAULT_NAT_PORTS.0,
                    crate::control::DEFAULT_NAT_PORTS.1,
                ])
            }),
            nat_udp: (s.mode == "nat")
                .then(|| s.nat.as_ref().and_then(|n| n.udp).unwrap_or_default()),
            forwards: s
                .forwards
                .iter()
                .map(|f| (forward_key(&f.proto, f.port), f.to.clone()))
                .collect(),
            port_policy: s.port_policy(),
            storm_pps: s.storm_pps,
        }
    }

    pub fn opts(&self) -> Option<NetOpts> {
        Some(NetOpts {
            mode: mode_of(&self.mode)?,
            gateway: self.gateway.clone(),
            gateway_iface: self.gateway_iface.clone(),
            uplink: self.uplink.clone(),
            dhcp_range: self.dhcp.as_ref().map(|d| format!("{},{}", d.start, d.end)),
            dhcp_hosts: self
                .dhcp
                .iter()
                .flat_map(|d| &d.hosts)
                .map(|h| match &h.name {
                    Some(n) => format!("{},{},{n}", h.mac, h.ip),
                    None => format!("{},{}", h.mac, h.ip),
                })
                .collect(),
            domain: self.dhcp.as_ref().and_then(|d| d.domain.clone()),
            dhcp_lease: self.dhcp.as_ref().and_then(|d| d.lease_secs),
            nat_ports: self.nat_ports.map(|[a, b]| format!("{a}-{b}")),
            nat_udp: self.nat_udp,
            port_policy: self.port_policy.clone(),
            storm_pps: self.storm_pps,
            mtu: self.mtu,
            no_dns: !self.dns,
            dns_hosts: self
                .dns_hosts
                .iter()
                .map(|h| format!("{},{}", h.ip, h.names.join(",")))
                .collect(),
            gateway6: self.ipv6.iter().flat_map(|v| v.gateways.clone()).collect(),
            dhcp6_range: self.ipv6.as_ref().and_then(|v| v.dhcp_range.clone()),
            dhcp6_hosts: self.ipv6.iter().flat_map(|v| v.hosts.clone()).collect(),
            nat6: self.ipv6.as_ref().is_some_and(|v| v.nat6),
            vxlan: self.vxlan.clone(),
        })
    }

    /// Whether the DHCP/DNS servers' settings differ (changed live: the
    /// servers restart).
    pub fn services_differ(&self, new: &NetSpec) -> bool {
        self.dhcp != new.dhcp || self.dns != new.dns || self.dns_hosts != new.dns_hosts
    }

    /// What differs, and whether only live-changeable settings do.
    pub fn changes(&self, new: &NetSpec) -> (Vec<String>, bool) {
        let mut c = Vec::new();
        let f = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        if self.mode != new.mode {
            c.push(format!("mode {} -> {}", self.mode, new.mode));
        }
        if self.gateway != new.gateway {
            c.push(format!(
                "gateway {} -> {}",
                f(&self.gateway),
                f(&new.gateway)
            ));
        }
        if self.gateway_iface != new.gateway_iface {
            c.push(format!(
                "gateway_iface {} -> {}",
                f(&self.gateway_iface),
                f(&new.gateway_iface)
            ));
        }
        if self.uplink != new.uplink {
            c.push(format!("uplink {} -> {}", f(&self.uplink), f(&new.uplink)));
        }
        // Port defaults: the network is rebuilt, its ports attached anew.
        if self.port_policy != new.port_policy || self.storm_pps != new.storm_pps {
            c.push("port defaults (isolated_ports, port rates, storm_pps)".into());
        }
        if self.mtu != new.mtu {
            let f = |m: Option<u16>| m.map_or("-".into(), |m| m.to_string());
            c.push(format!("mtu {} -> {}", f(self.mtu), f(new.mtu)));
        }
        if self.ipv6 != new.ipv6 {
            c.push("ipv6 settings".into());
        }
        let live = c.is_empty();
        // The NAT port range and UDP mapping change live too (flows keep
        // their ports).
        if self.nat_ports != new.nat_ports {
            let f = |p: Option<[u16; 2]>| p.map_or("-".into(), |[a, b]| format!("{a}-{b}"));
            c.push(format!(
                "nat ports {} -> {}",
                f(self.nat_ports),
                f(new.nat_ports)
            ));
        }
        if self.nat_udp != new.nat_udp {
            let f = |u: Option<crate::control::NatUdp>| u.map_or("-".into(), |u| u.to_string());
            c.push(format!("nat udp {} -> {}", f(self.nat_udp), f(new.nat_udp)));
        }
        // DHCP settings change live: the servers restart, nothing else.
        if self.dhcp != new.dhcp {
            c.push("dhcp settings".into());
        }
        if self.dns != new.dns || self.dns_hosts != new.dns_hosts {
            c.push("dns settings".into());
        }
        if self.ageing != new.ageing {
            c.push(format!("ageing {} -> {}", self.ageing, new.ageing));
        }
        // Forwards change live (a recreated network gets all of them anew).
        for (k, old) in &self.forwards {
            if new.forwards.get(k) != Some(old) {
                c.push(format!("- forward {k} -> {old}"));
            }
        }
        for (k, to) in &new.forwards {
            if self.forwards.get(k) != Some(to) {
                c.push(format!("+ forward {k} -> {to}"));
            }
        }
        (c, live)
    }
}

/// Whether two ways of writing port security mean the same (MAC case and
/// separators, a default limit spelled out): a rewrite that changes nothing
/// must not re-attach the port and lose what it learned.
pub fn same_security(a: &SecurityArgs, b: &SecurityArgs) -> bool {
    match (a.validate(), b.validate()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A guest port as the switch attaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub net: String,
    pub hook: Hook,
    pub hairpin: bool,
    pub trusted: bool,
    pub vlan: VlanCfg,
    pub security: SecurityArgs,
    pub policy: PolicyArgs,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        if self.vlan != VlanCfg::None {
            write!(f, " ({})", self.vlan)?;
        }
        if self.hook != Hook::Auto {
            write!(f, " hook {:?}", self.hook)?;
        }
        if self.hairpin {
            f.write_str(" hairpin")?;
        }
        if self.trusted {
            f.write_str(" trusted")?;
        }
        if self.security.no_port_security {
            f.write_str(" no-port-security")?;
        }
        if self.policy.isolated {
            f.write_str(" isolated")?;
        }
        if let Some(r) = self.policy.rate_in {
            write!(f, " rate-in {r}")?;
        }
        if let Some(r) = self.policy.rate_out {
            write!(f, " rate-out {r}")?;
        }
        Ok(())
    }
}

impl PortSpec {
    /// Whether `other` differs from this at most in VLAN membership: what
    /// `port set` changes live, without re-attaching the port.
    pub fn only_vlan_differs(&self, other: &PortSpec) -> bool {
        self.net == other.net
            && self.hook == other.hook
            && self.hairpin == other.hairpin
            && self.trusted == other.trusted
            && same_security(&self.security, &other.security)
            && self.policy == other.policy
    }

    pub fn vlan_args(&self) -> VlanArgs {
        let mut a = VlanArgs::default();
        match &self.vlan {
            VlanCfg::None => {}
            VlanCfg::Access { vid } => a.vlan = Some(vid.to_string()),
            VlanCfg::Trunk { vids, native } => {
                a.trunk = Some(vlan::format_vid_list(vids));
                a.native = native.map(|n| n.to_string());
            }
        }
        a
    }
    pub(crate) fn attach(&self) -> Attach {
        let a = self.vlan_args();
        Attach {
            net: self.net.clone(),
            hook: (self.hook != Hook::Auto).then_some(self.hook),
            hairpin: self.hairpin,
            trusted: self.trusted,
            vlan: a.vlan.and_then(|v| v.parse().ok()),
            trunk: a.trunk,
            native: a.native.and_then(|v| v.parse().ok()),
            security: self.security.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// How `iface` should be attached under `cfg`: a static port first, then
/// the first rule whose glob matches.
///
/// A port that sets no VLAN of its own takes its network's `port_vlan` /
/// `port_trunk` (libvirt's network-wide `<vlan>`).
pub fn wanted(cfg: &Config, iface: &str) -> Option<(PortSpec, bool)> {
    let (mut spec, by_rule) = match cfg.ports.iter().find(|p| p.iface == iface) {
        Some(p) => (p.attach().spec(), false),
        None => (
            cfg.rules
                .iter()
                .find(|r| glob_match(&r.pattern, iface))?
                .attach()
                .spec(),
            true,
        ),
    };
    if spec.vlan == VlanCfg::None {
        if let Some(n) = cfg.networks.get(&spec.net) {
            spec.vlan = n.port_vlan_args().to_cfg().unwrap_or_default();
        }
    }
    Some((spec, by_rule))
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NetChange {
    pub name: String,
    pub changes: Vec<String>,
    /// Rebuilt (deleted and added again), or changed live.
    pub recreate: bool,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PortChange {
    pub iface: String,
    pub from: String,
    pub to: String,
    /// VLAN change done live (`port set`), or re-attached.
    pub live: bool,
}

/// A port the plan attaches.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PortAdded {
    pub iface: String,
    /// Its network and settings, as `apply` prints them.
    pub to: String,
}

/// An uplink group the file changes (in place: the device and the
/// networks on it stay).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UplinkChange {
    pub name: String,
    pub changes: Vec<String>,
}

/// The diff between the running daemon and a file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub networks_added: Vec<String>,
    pub networks_removed: Vec<String>,
    pub networks_changed: Vec<NetChange>,
    pub ports_added: Vec<PortAdded>,
    pub ports_removed: Vec<String>,
    pub ports_changed: Vec<PortChange>,
    /// Static ports whose interface does not exist yet: attached when it appears.
    pub ports_pending: Vec<String>,
    pub rules_added: Vec<String>,
    pub rules_removed: Vec<String>,
    /// Uplink groups; a changed one is changed in place.
    #[serde(default)]
    pub uplinks_added: Vec<String>,
    #[serde(default)]
    pub uplinks_removed: Vec<String>,
    #[serde(default)]
    pub uplinks_changed: Vec<UplinkChange>,
    pub warnings: Vec<String>,
    pub applied: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.networks_added.is_empty()
            && self.networks_removed.is_empty()
            && self.networks_changed.is_empty()
            && self.ports_added.is_empty()
            && self.ports_removed.is_empty()
            && self.ports_changed.is_empty()
            && self.rules_added.is_empty()
            && self.rules_removed.is_empty()
            && self.uplinks_added.is_empty()
            && self.uplinks_removed.is_empty()
            && self.uplinks_changed.is_empty()
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        for u in &self.uplinks_removed {
            o += &format!("- uplink {u}\n");
        }
        for u in &self.uplinks_added {
            o += &format!("+ uplink {u}\n");
        }
        for c in &self.uplinks_changed {
            o += &format!("~ uplink {}: {} (live)\n", c.name, c.changes.join(", "));
        }
        for n in &self.networks_added {
            o += &format!("+ network {n}\n");
        }
        for n in &self.networks_removed {
            o += &format!("- network {n}\n");
        }
        for c in &self.networks_changed {
            let how = if c.recreate { "recreated" } else { "live" };
            o += &format!("~ network {}: {} ({how})\n", c.name, c.changes.join(", "));
        }
        for PortAdded { iface, to } in &self.ports_added {
            o += &format!("+ port {iface} -> {to}\n");
        }
        for i in &self.ports_removed {
            o += &format!("- port {i}\n");
        }
        for c in &self.ports_changed {
            let how = if c.live { "live" } else { "re-attached" };
            o += &format!("~ port {}: {} -> {} ({how})\n", c.iface, c.from, c.to);
        }
        for i in &self.ports_pending {
            o += &format!("  port {i}: interface absent, attached when it appears\n");
        }
        for r in &self.rules_added {
            o += &format!("+ rule {r}\n");
        }
        for r in &self.rules_removed {
            o += &format!("- rule {r}\n");
        }
        if self.is_empty() {
            o += "no changes\n";
        }
        o
    }
}

/// A network's DHCP settings as a config section, from its options.
pub fn dhcp_of(o: &NetOpts) -> Option<DhcpSection> {
    let (a, b) = o.dhcp_range.as_deref()?.split_once(',')?;
    Some(DhcpSection {
        start: a.trim().parse().ok()?,
        end: b.trim().parse().ok()?,
        lease_secs: o.dhcp_lease,
        domain: o.domain.clone(),
        hosts: o
            .dhcp_hosts
            .iter()
            .filter_map(|h| {
                let mut it = h.split(',').map(str::trim);
                Some(DhcpHost {
                    mac: it.next()?.to_ascii_lowercase(),
                    ip: it.next()?.parse().ok()?,
                    name: it.next().filter(|n| !n.is_empty()).map(Into::into),
                })
            })
            .collect(),
    })
}

/// A network's static DNS names as config sections, from its options.
pub fn dns_hosts_of(o: &NetOpts) -> Vec<DnsHostSection> {
    o.dns_hosts
        .iter()
        .filter_map(|h| {
            let mut it = h.split(',').map(str::trim);
            Some(DnsHostSection {
                ip: it.next()?.parse().ok()?,
                names: it.map(String::from).collect(),
            })
        })
        .collect()
}

pub fn rule_label(r: &RuleSection) -> String {
    format!("{} -> {}", r.pattern, r.attach().spec())
}
