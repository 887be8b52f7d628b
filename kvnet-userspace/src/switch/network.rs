//! Network models beyond "isolated": a gateway interface for host-only and
//! routed networks, the routed fast path's uplink, and bridged networks
//! whose uplink NIC becomes a switch port while the host keeps its address.
use std::{collections::BTreeSet, fmt};

use anyhow::{bail, Context, Result};
use kvnet_common::{
    FdbEntry, FdbKey, PortConfig, FDB_F_HOST, FDB_F_STATIC, NET_F_CLOSED, PORT_F_BRIDGED_NET,
    PORT_F_ROUTED_NET, PORT_F_TRUSTED, PORT_F_UPLINK_BRIDGED, PORT_F_UPLINK_ROUTED,
};

use crate::{
    control::{AddrRange, DhcpHostInfo, DhcpInfo, Hook, Mode, NetDetail, NetOpts, VlanArgs},
    gateway::{self, Cidr, Gateway},
    netdev,
    security::Security,
    switch::{validate_net_name, Network, Switch, DEFAULT_AGEING},
};

/// Why a port is in a network: the admin added it, or the network owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortRole {
    Guest,
    /// The switch end of the network's gateway interface.
    Gateway,
    /// A bridged network's uplink NIC.
    Uplink,
}

impl fmt::Display for PortRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PortRole::Guest => "guest",
            PortRole::Gateway => "gateway",
            PortRole::Uplink => "uplink",
        })
    }
}

/// A host setting kvnet changed, with what it was (kept in the daemon's
/// state file, so `kvnet down` after a restart still restores it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Restore {
    Sysctl {
        path: String,
        old: String,
    },
    Promisc {
        iface: String,
    },
    /// A policy rule (and its table) that keeps a host-only network's
    /// traffic from being forwarded, whatever ip_forward says.
    NoForward {
        table: String,
        pref: String,
    },
    /// A policy rule of its own (no table behind it).
    Rule {
        pref: String,
    },
}

impl Restore {
    /// What it restores, for the log.
    pub fn describe(&self) -> String {
        match self {
            Restore::Sysctl { path, old } => format!("{path} = {old}"),
            Restore::Promisc { iface } => format!("promiscuous mode of {iface}"),
            Restore::NoForward { table, pref } => format!("rule {pref} and table {table}"),
            Restore::Rule { pref } => format!("rule {pref}"),
        }
    }

    pub(crate) fn undo(&self) {
        let r = match self {
            Restore::Sysctl { path, old } => gateway::write_sysctl(path, old),
            Restore::Promisc { iface } => rtnl::link_set_promisc(iface, false).map_err(Into::into),
            Restore::NoForward { table, pref } => number(pref).and_then(|pref| {
                let rule = rtnl::rule_del(pref);
                let flushed = number(table).and_then(|t| Ok(rtnl::route_flush_table(t)?));
                rule.map_err(anyhow::Error::from).and(flushed)
            }),
            Restore::Rule { pref } => number(pref).and_then(|p| Ok(rtnl::rule_del(p)?)),
        };
        if let Err(e) = r {
            log::warn!("restoring {self:?}: {e:#}");
        }
    }
}

/// A routed network's uplink: tc routes return traffic for guest subnets
/// straight to the guests; shared by every routed network that names it.
pub struct RoutedUplink {
    pub ifindex: u32,
    pub users: BTreeSet<String>,
    pub(crate) restore: Vec<Restore>,
}

use crate::rtnl;
use crate::switch::journal::{self, Undo};

/// A rule preference or table number as the state file keeps it.
fn number(s: &str) -> Result<u32> {
    s.parse()
        .with_context(|| format!("'{s}' is not a rule preference or table number"))
}

/// Routing table and rule preference kvnet uses for network `id`.
const NO_FORWARD_BASE: u32 = 27000;
/// Policy rule preferences of NAT networks' "nothing forwarded in" rules:
/// three per network (two exceptions, then the block), below the above.
const NAT_IN_BASE: u32 = 14000;

/// Sets an IPv4 per-interface sysctl, remembering the old value.
fn set_sysctl(iface: &str, key: &str, value: &str, restore: &mut Vec<Restore>) -> Result<()> {
    set_sysctl_path(
        &format!("/proc/sys/net/ipv4/conf/{iface}/{key}"),
        value,
        restore,
    )
}

/// Sets the sysctl at `path`, journaled and remembering the old value.
pub(crate) fn set_sysctl_path(path: &str, value: &str, restore: &mut Vec<Restore>) -> Result<()> {
    let path = path.to_string();
    let old = gateway::read_sysctl(&path)?;
    if old != value {
        let r = Restore::Sysctl {
            path: path.clone(),
            old,
        };
        journal::record(Undo::Setting(r.clone()))?;
        gateway::write_sysctl(&path, value)?;
        restore.push(r);
    }
    Ok(())
}

impl Switch {
    /// Port flags every guest port of a network in `mode` carries.
    pub(crate) fn mode_port_flags(&self, mode: Mode) -> u32 {
        match mode {
            Mode::Routed | Mode::Nat => PORT_F_ROUTED_NET,
            Mode::Bridged => PORT_F_BRIDGED_NET,
            Mode::Isolated | Mode::HostOnly => 0,
        }
    }

    /// Checks everything first; then builds, and on any failure removes
    /// whatever it built, so a refused network leaves nothing behind.
    pub fn net_add(&mut self, name: &str, ageing: Option<u64>, opts: &NetOpts) -> Result<()> {
        validate_net_name(name)?;
        if self.nets.contains_key(name) {
            bail!("network '{name}' already exists");
        }
        let ageing = match ageing {
            Some(0) => bail!("ageing must be at least 1 second"),
            Some(s) => std::time::Duration::from_secs(s),
            None => DEFAULT_AGEING,
        };
        // VXLAN: checked first; the guests' MTU leaves the outer headers room.
        let (vxlan, opts) = self.vxlan_plan(name, opts)?;
        let opts = &opts;
        let mode = opts.mode;
        let gateway: Option<Cidr> = opts.gateway.as_deref().map(str::parse).transpose()?;
        match (mode, &gateway, &opts.uplink) {
            (Mode::Isolated, Some(_), _) | (Mode::Bridged, Some(_), _) => {
                bail!("a {mode} network has no gateway; drop --gateway")
            }
            (Mode::Isolated, _, Some(_)) | (Mode::HostOnly, _, Some(_)) => {
                bail!("a {mode} network has no uplink; drop --uplink")
            }
            (Mode::Nat, _, None) => {
                bail!("--mode nat needs --uplink IFACE (the NIC to masquerade behind)")
            }
            (Mode::HostOnly | Mode::Routed | Mode::Nat, None, _) => {
                bail!("--mode {mode} needs --gateway ADDRESS/PREFIX")
            }
            (Mode::Bridged, _, None) => {
                bail!("--mode bridged needs --uplink IFACE (the NIC the guests share)")
            }
            _ => {}
        }
        if let Some(up) = &opts.uplink {
            netdev::ifindex(up)?;
            self.refuse_uplink_member(up)?;
            if let Some(p) = self.ports.get(up) {
                bail!("uplink '{up}' is already a port of network '{}'", p.net);
            }
            if mode == Mode::Bridged && self.routed_uplinks.contains_key(up) {
                bail!("uplink '{up}' already carries routed networks; it cannot also be bridged");
            }
        }
        let gw_name = match (&gateway, &opts.gateway_iface) {
            (Some(_), Some(n)) => {
                netdev::check_ifname(n).context("--gateway-iface")?;
                Some(n.clone())
            }
            (Some(_), None) => Some(Gateway::default_name(name)?),
            (None, Some(_)) => bail!("--gateway-iface needs --gateway"),
            (None, None) => None,
        };
        if let (Some(n), Some(cidr)) = (&gw_name, &gateway) {
            // (A restarted daemon adopts its own gateway interface.)
            if netdev::ifindex(n).is_ok() && !self.dp.adopting {
                bail!("gateway interface '{n}' already exists; pick another with --gateway-iface");
            }
            for (other, net) in &self.nets {
                if let Some(g) = &net.gateway {
                    if g.cidr.contains(cidr.addr) || cidr.contains(g.cidr.addr) {
                        bail!("gateway {cidr} overlaps network '{other}' ({})", g.cidr);
                    }
                }
            }
        }
        // DHCP/DNS: checked whole before anything is built.
        let dhcp = crate::dhcp::service::plan(opts, gateway.as_ref(), gw_name.as_deref())?;
        let v6 = crate::ipv6::plan(name, opts, mode, gw_name.as_deref())?;
        let nat = self.nat_plan(opts, opts.uplink.as_deref())?;
        let nat6 = self.nat6_plan(opts)?;
        // A restarted daemon gives networks back their ids (the datapath's
        // maps are keyed by them); new networks skip those ids.
        let id = self
            .adopt_ids
            .get(name)
            .copied()
            .filter(|id| self.nets.values().all(|n| n.id != *id))
            .or_else(|| {
                (1..).find(|id| {
                    self.nets.values().all(|n| n.id != *id)
                        && !self.adopt_ids.values().any(|a| a == id)
                })
            })
            .unwrap_or(1);
        self.nets.insert(
            name.to_string(),
            Network {
                id,
                ageing,
                mode,
                gateway: None,
                uplink: opts.uplink.clone(),
                restore: Vec::new(),
                nat: None,
                opts: opts.clone(),
            },
        );
        let built = match mode {
            Mode::Isolated => Ok(()),
            Mode::HostOnly | Mode::Routed | Mode::Nat => self
                .build_gateway(
                    name,
                    id,
                    gw_name.as_deref().unwrap_or_default(),
                    gateway.expect("checked"),
                )
                .and_then(|_| match nat {
                    Some(state) => self.build_nat(name, id, state),
                    None => Ok(()),
                }),
            Mode::Bridged => {
                self.build_bridged(name, id, opts.uplink.as_deref().unwrap_or_default())
            }
        };
        let built = built.and_then(|_| match &vxlan {
            Some(plan) => self.build_vxlan(name, id, plan),
            None => Ok(()),
        });
        let built = built.and_then(|_| match dhcp {
            Some(cfg) => self.services.start(name, cfg),
            None => Ok(()),
        });
        let built = built.and_then(|_| match v6 {
            Some(plan) => self.build_v6(name, &plan).and_then(|_| {
                let binder = crate::ipv6::savi::LeaseBinder::open(self.dp.pin_dir(), id)?;
                self.services.start_v6(name, plan, Some(binder))
            }),
            None => Ok(()),
        });
        let built = built.and_then(|_| match nat6 {
            Some(state) => self.build_nat6(name, id, state),
            None => Ok(()),
        });
        if let Err(e) = built {
            // An upgrade that fails leaves what it adopted (gateway, host
            // settings) to the older datapath, which still uses it.
            if self.dp.upgrading_from().is_none() {
                if let Err(e2) = self.net_del(name) {
                    log::warn!("cleaning up the refused network {name}: {e2:#}");
                }
            }
            self.nets.remove(name);
            return Err(e);
        }
        Ok(())
    }

    fn build_gateway(&mut self, name: &str, id: u32, host_if: &str, cidr: Cidr) -> Result<()> {
        // NAT networks route like routed ones (plus translation).
        let routed = matches!(self.net(name)?.mode, Mode::Routed | Mode::Nat);
        let mtu = self.net(name)?.opts.mtu;
        let gw = if self.dp.adopting && netdev::ifindex(host_if).is_ok() {
            Gateway::adopt(host_if, id, cidr, routed, mtu)?
        } else {
            journal::record(Undo::Link {
                iface: host_if.to_string(),
            })?;
            Gateway::create(host_if, id, cidr, routed, mtu)?
        };
        let port_if = gw.port_if.clone();
        let gw_mac = netdev::mac(host_if)?;
        let gw_host = netdev::ifindex(host_if)?;
        if let Some(n) = self.nets.get_mut(name) {
            n.gateway = Some(gw);
        }
        // The gateway port carries kvnet's own DHCP server: trusted.
        let extra = self.mode_port_flags(self.net(name)?.mode) | PORT_F_TRUSTED;
        self.port_add_inner(
            name,
            &port_if,
            false,
            Hook::Tc,
            &VlanArgs::default(),
            extra,
            PortRole::Gateway,
            // Owned: no guest may take the gateway's MAC.
            Security {
                macs: vec![gw_mac],
                ..Security::default()
            },
            Default::default(),
        )?;
        let gw_port = netdev::ifindex(&port_if)?;
        let uplink = self.net(name)?.uplink.clone();
        let uplink_ifindex = match &uplink {
            Some(u) => netdev::ifindex(u)?,
            None => 0,
        };
        // Kept: what a running datapath already has (NAT settings of an
        // adopted network); new networks start from zero.
        let mut cfg = self.dp.nets()?.get(&id, 0).unwrap_or_default();
        (cfg.gw_host, cfg.gw_port, cfg.uplink, cfg.gw_mac) =
            (gw_host, gw_port, uplink_ifindex, gw_mac.0);
        cfg.gw_ip = u32::from(cidr.addr).to_be();
        // The guests' subnet: NAT keeps it untranslated, isolation keeps
        // isolated ports from reaching each other through the gateway.
        cfg.subnet = u32::from(cidr.network()).to_be();
        cfg.mask = cidr.mask().to_be();
        if !matches!(self.net(name)?.mode, Mode::Routed) {
            // NAT and host-only: no new connections in from other networks
            // or the outside (libvirt's FORWARD rules).
            cfg.flags |= NET_F_CLOSED;
        }
        self.dp
            .nets()?
            .insert(id, cfg, 0)
            .context("writing the network map")?;
        self.dp
            .gw_hosts()?
            .insert(gw_host, id, 0)
            .context("writing the gateway map")?;
        // Guests' ARP for the gateway is answered without a flood.
        self.neigh_add(id, cfg.gw_vid, cidr.addr, gw_mac, gw_port)?;
        if routed {
            if let Some(u) = uplink {
                self.routed_uplink_acquire(&u, name)?;
            }
            if self.net(name)?.mode == Mode::Nat {
                self.close_nat_subnet(name, id, host_if, &cidr)?;
            }
        } else {
            // host-only: anything arriving on the gateway that is not for a
            // host address is unreachable, even with ip_forward on.
            let (table, pref) = (NO_FORWARD_BASE + id, NO_FORWARD_BASE + id);
            if !self.dp.adopting {
                journal::record(Undo::Table {
                    table: table.to_string(),
                })?;
            }
            rtnl::route_replace_unreachable_default(table)?;
            if let Some(n) = self.nets.get_mut(name) {
                n.restore.push(Restore::NoForward {
                    table: table.to_string(),
                    pref: pref.to_string(),
                });
            }
            self.rule_add(rtnl::Rule {
                pref,
                iif: Some(host_if.to_string()),
                to: None,
                table,
            })?;
        }
        Ok(())
    }

    /// What the fast path hands the host stack must not reach a NAT
    /// network's guests either: the host forwards nothing into its subnet
    /// but what it sends itself or what comes from that network (libvirt's
    /// FORWARD rules). Replies and port forwards never take this path.
    fn close_nat_subnet(&mut self, name: &str, id: u32, host_if: &str, cidr: &Cidr) -> Result<()> {
        let subnet = Cidr {
            addr: cidr.network(),
            prefix: cidr.prefix,
        };
        let table = NO_FORWARD_BASE + id;
        if !self.dp.adopting {
            journal::record(Undo::Table {
                table: table.to_string(),
            })?;
        }
        rtnl::route_replace_unreachable_default(table)?;
        let base = NAT_IN_BASE + 3 * id;
        let rules = [
            (base, Some("lo"), rtnl::TABLE_MAIN),
            (base + 1, Some(host_if), rtnl::TABLE_MAIN),
            (base + 2, None, table),
        ];
        for (pref, iif, lookup) in rules {
            if let Some(n) = self.nets.get_mut(name) {
                n.restore.push(if lookup == rtnl::TABLE_MAIN {
                    Restore::Rule {
                        pref: pref.to_string(),
                    }
                } else {
                    Restore::NoForward {
                        table: table.to_string(),
                        pref: pref.to_string(),
                    }
                });
            }
            self.rule_add(rtnl::Rule {
                pref,
                iif: iif.map(Into::into),
                to: Some(subnet),
                table: lookup,
            })?;
        }
        Ok(())
    }

    /// Adds a policy rule, journaled; an adopted network keeps the rule its
    /// first daemon added.
    fn rule_add(&self, rule: rtnl::Rule) -> Result<()> {
        if self.dp.adopting && rtnl::rule_exists(rule.pref)? {
            return Ok(());
        }
        journal::record(Undo::Setting(Restore::Rule {
            pref: rule.pref.to_string(),
        }))?;
        Ok(rtnl::rule_add(&rule)?)
    }

    fn build_bridged(&mut self, name: &str, id: u32, uplink: &str) -> Result<()> {
        // The host's own MAC first: from the moment the uplink is a port,
        // frames for the host must go up its stack, not be flooded.
        let ifindex = netdev::ifindex(uplink)?;
        let host_mac = netdev::mac(uplink)?;
        let host = FdbEntry {
            ifindex,
            flags: FDB_F_STATIC | FDB_F_HOST,
            last_seen_ns: 0,
        };
        self.dp
            .fdb()?
            .insert(
                FdbKey {
                    net_id: id,
                    vid: 0,
                    mac: host_mac.0,
                },
                host,
                0,
            )
            .context("writing the FDB")?;
        self.port_add_inner(
            name,
            uplink,
            false,
            Hook::Auto,
            &VlanArgs::default(),
            PORT_F_UPLINK_BRIDGED,
            PortRole::Uplink,
            Security {
                guarded: false,
                ..Security::default()
            },
            Default::default(),
        )?;
        let mut cfg = self.dp.nets()?.get(&id, 0).unwrap_or_default();
        cfg.uplink = ifindex;
        self.dp
            .nets()?
            .insert(id, cfg, 0)
            .context("writing the network map")?;
        self.dp.attach_egress(uplink, ifindex)?;
        // Frames for guests' MACs must reach us from the LAN.
        journal::record(Undo::Setting(Restore::Promisc {
            iface: uplink.to_string(),
        }))?;
        rtnl::link_set_promisc(uplink, true)?;
        if let Some(n) = self.nets.get_mut(name) {
            n.restore.push(Restore::Promisc {
                iface: uplink.to_string(),
            });
        }
        Ok(())
    }

    fn routed_uplink_acquire(&mut self, uplink: &str, net: &str) -> Result<()> {
        if let Some(u) = self.routed_uplinks.get_mut(uplink) {
            u.users.insert(net.to_string());
            return Ok(());
        }
        let ifindex = netdev::ifindex(uplink)?;
        let mut restore = Vec::new();
        // The host routes the first packets of a flow (and everything the
        // fast path hands it) between the uplink and the gateway.
        set_sysctl(uplink, "forwarding", "1", &mut restore)?;
        // An adopted uplink keeps its NAT mark: without it, replies of
        // running NAT flows would meet the host stack (and a reset).
        let nat_mark = self
            .dp
            .ports()?
            .get(&ifindex, 0)
            .map_or(0, |p| p.flags & kvnet_common::PORT_F_UPLINK_NAT);
        let cfg = PortConfig {
            net_id: 0,
            flags: PORT_F_UPLINK_ROUTED | nat_mark,
            ..Default::default()
        };
        if !self.dp.adopting {
            journal::record(Undo::Programs {
                iface: uplink.to_string(),
                ifindex,
            })?;
        }
        let applied = self
            .dp
            .reset_stats(ifindex)
            .and_then(|_| {
                self.dp
                    .ports()?
                    .insert(ifindex, cfg, 0)
                    .context("writing the port map")
            })
            .and_then(|_| self.dp.attach(uplink, ifindex, false));
        if let Err(e) = applied {
            let _ = self.dp.ports().map(|mut p| p.remove(&ifindex));
            restore.iter().for_each(Restore::undo);
            return Err(e);
        }
        self.routed_uplinks.insert(
            uplink.to_string(),
            RoutedUplink {
                ifindex,
                users: BTreeSet::from([net.to_string()]),
                restore,
            },
        );
        Ok(())
    }

    fn routed_uplink_release(&mut self, uplink: &str, net: &str) {
        let Some(u) = self.routed_uplinks.get_mut(uplink) else {
            return;
        };
        u.users.remove(net);
        if !u.users.is_empty() {
            return;
        }
        if let Some(u) = self.routed_uplinks.remove(uplink) {
            self.dp.detach(u.ifindex);
            let _ = self.dp.ports().map(|mut p| p.remove(&u.ifindex));
            let _ = self.dp.port_stats().map(|mut p| p.remove(&u.ifindex));
            u.restore.iter().for_each(Restore::undo);
        }
    }

    /// Undoes what `net_add` built beyond the ports (already removed).
    pub(crate) fn teardown_net(&mut self, name: &str, id: u32) {
        self.services.stop(name);
        self.services.stop_v6(name);
        self.teardown_nat(name, id);
        let Some(net) = self.nets.get_mut(name) else {
            return;
        };
        let gateway = net.gateway.take();
        let restore = std::mem::take(&mut net.restore);
        let (mode, uplink) = (net.mode, net.uplink.clone());
        if let Some(g) = gateway {
            if let Ok(ifindex) = netdev::ifindex(&g.host_if) {
                let _ = self.dp.gw_hosts().map(|mut m| m.remove(&ifindex));
            }
            g.destroy();
        }
        let _ = self.dp.nets().map(|mut m| m.remove(&id));
        if let Some(u) = uplink {
            match mode {
                Mode::Routed | Mode::Nat => self.routed_uplink_release(&u, name),
                Mode::Bridged => {
                    if let Ok(ifindex) = netdev::ifindex(&u) {
                        self.dp.detach_egress(ifindex);
                    }
                }
                _ => {}
            }
        }
        restore.iter().rev().for_each(Restore::undo);
    }

    /// `kvnet net show`; the config's port defaults (`policy`) are the
    /// daemon's to fill in.
    pub fn net_show(&self, name: &str) -> Result<NetDetail> {
        let opts = &self.net(name)?.opts;
        let net = self
            .net_list()
            .into_iter()
            .find(|n| n.name == name)
            .context("network vanished")?;
        let port_details = self
            .port_list()
            .into_iter()
            .filter(|p| p.net == name)
            .collect();
        let forwards = match &net.nat {
            Some(_) => self.forward_list(name)?,
            None => Vec::new(),
        };
        // DNS runs beside a network's DHCP server.
        let dns = self
            .services
            .stats()
            .iter()
            .any(|s| s.net == name && !s.dns.is_null());
        Ok(NetDetail {
            vxlan: self.vxlan_info(name),
            ipv6: self.ipv6_info(name),
            dhcp: self.dhcp_info(name, opts),
            dns,
            forwards,
            policy: Default::default(),
            net,
            port_details,
        })
    }

    /// A network's DHCP settings as `net show` lists them (checked when
    /// the network took them), None without a `--dhcp-range`.
    fn dhcp_info(&self, name: &str, opts: &NetOpts) -> Option<DhcpInfo> {
        use crate::dhcp::config::{parse_host, parse_range, DEFAULT_LEASE};
        let leases = self.services.leases(name).map_or(0, |l| l.len());
        let (first, last) = parse_range(opts.dhcp_range.as_deref()?).ok()?;
        let hosts = opts
            .dhcp_hosts
            .iter()
            .filter_map(|h| parse_host(h).ok())
            .map(|h| DhcpHostInfo {
                mac: h.mac.to_string(),
                ip: h.ip,
                name: h.name,
            })
            .collect();
        Some(DhcpInfo {
            range: AddrRange { first, last },
            lease_secs: opts.dhcp_lease.unwrap_or(DEFAULT_LEASE.as_secs()),
            domain: opts.domain.clone(),
            hosts,
            leases,
        })
    }
}

impl Switch {
    /// Changes a network's DHCP settings (range, static hosts, domain,
    /// lease time: those of `from`) live. Its DHCP and DNS servers restart
    /// with the new settings and the leases they hold on disk; the gateway,
    /// ports, FDB and conntrack are untouched. A refused change leaves the
    /// old settings and servers as they were.
    pub fn net_set_dhcp(&mut self, name: &str, from: &NetOpts) -> Result<()> {
        let net = self.net(name)?;
        let mut opts = net.opts.clone();
        opts.dhcp_range = from.dhcp_range.clone();
        opts.dhcp_hosts = from.dhcp_hosts.clone();
        opts.domain = from.domain.clone();
        opts.dhcp_lease = from.dhcp_lease;
        opts.no_dns = from.no_dns;
        opts.dns_hosts = from.dns_hosts.clone();
        let cidr = net.gateway.as_ref().map(|g| g.cidr);
        let host_if = net.gateway.as_ref().map(|g| g.host_if.clone());
        let new = crate::dhcp::service::plan(&opts, cidr.as_ref(), host_if.as_deref())
            .with_context(|| format!("network '{name}'"))?;
        let old = crate::dhcp::service::plan(&net.opts, cidr.as_ref(), host_if.as_deref())
            .ok()
            .flatten();
        self.services.stop(name);
        if let Some(cfg) = new {
            if let Err(e) = self.services.start(name, cfg) {
                if let Some(old) = old {
                    if let Err(e2) = self.services.start(name, old) {
                        log::warn!("network {name}: restoring its DHCP server: {e2:#}");
                    }
                }
                return Err(e.context(format!(
                    "network '{name}': starting DHCP with the new settings (the old ones stay)"
                )));
            }
        }
        if let Some(n) = self.nets.get_mut(name) {
            n.opts = opts;
        }
        Ok(())
    }

    /// `kvnet net set --dhcp-*` and `kvnet dhcp host add|del`: the
    /// network's DHCP settings with what is given replaced, changed live.
    pub fn dhcp_set(
        &mut self,
        name: &str,
        range: Option<String>,
        domain: Option<String>,
        lease_secs: Option<u64>,
        host_add: Option<String>,
        host_del: Option<String>,
    ) -> Result<()> {
        let mut opts = self.net(name)?.opts.clone();
        if range.is_some() {
            opts.dhcp_range = range;
        }
        if domain.is_some() {
            opts.domain = domain;
        }
        if lease_secs.is_some() {
            opts.dhcp_lease = lease_secs;
        }
        let mac_of = |h: &str| {
            h.split(',')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        };
        if let Some(mac) = host_del {
            let mac = mac.trim().to_ascii_lowercase();
            let before = opts.dhcp_hosts.len();
            opts.dhcp_hosts.retain(|h| mac_of(h) != mac);
            if opts.dhcp_hosts.len() == before {
                bail!("network '{name}' has no static DHCP host {mac}");
            }
        }
        if let Some(h) = host_add {
            let mac = mac_of(&h);
            opts.dhcp_hosts.retain(|x| mac_of(x) != mac);
            opts.dhcp_hosts.push(h);
        }
        self.net_set_dhcp(name, &opts)
    }

    /// `kvnet dhcp leases NET`: the leases of a network's DHCP server.
    pub fn dhcp_leases(&self, net: &str) -> Result<Vec<crate::dhcp::leases::LeaseInfo>> {
        self.net(net)?;
        self.services.leases(net).with_context(|| {
            format!("network '{net}' has no DHCP server (create it with --dhcp-range FIRST,LAST)")
        })
    }
}
