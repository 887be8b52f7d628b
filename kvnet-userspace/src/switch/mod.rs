//! Desired state (networks, ports, static FDB entries) and its reflection in
//! the datapath maps. Every operation validates first and changes the maps
//! only when it can finish, undoing its own steps when a later one fails.

pub mod bindings;
mod ipv6;
pub mod journal;
pub mod nat;
pub mod nat6;
pub mod network;
pub mod policy;
pub mod uplinks;
pub mod vxlan;
use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use anyhow::{bail, Context, Result};
use kvnet_common::{
    FdbEntry, FdbKey, FloodKey, FloodSet, PortConfig, VlanMember, VlanMemberKey, DROP_REASON_NAMES,
    FDB_F_STATIC, FDB_VID_ANY, FLOOD_M_IFINDEX, FLOOD_M_ISOLATED, MAX_FLOOD_PORTS, PORT_F_HAIRPIN,
    PORT_F_RX_VLAN_STRIPPED, PORT_F_TRUSTED, PORT_F_XDP, PORT_F_XDP_TX, VLAN_M_TAGGED,
};

use crate::{
    control::{
        FdbRow, GatewayInfo, Hook, Mode, NetInfo, PortInfo, PortStatsRow, VlanInfo, VlanPortRow,
    },
    datapath::Datapath,
    gateway::Gateway,
    mac::Mac,
    netdev,
    policy::PolicyArgs,
    security::{PortSecurityInfo, Security, SecurityArgs},
    vlan::{self, Tagging, VlanArgs, VlanCfg},
};
use network::{PortRole, Restore, RoutedUplink};

pub use crate::control::{validate_net_name, DEFAULT_AGEING};

pub struct Network {
    pub id: u32,
    pub ageing: Duration,
    pub mode: Mode,
    pub gateway: Option<Gateway>,
    pub uplink: Option<String>,
    /// What creating the network changed on the host, undone on delete.
    pub restore: Vec<Restore>,
    /// NAT networks: port range, uplink address, port forwards.
    pub nat: Option<self::nat::NatState>,
    /// The options it was created with (DHCP settings for save/restart).
    pub opts: crate::control::NetOpts,
}

pub struct Port {
    pub ifindex: u32,
    pub net: String,
    pub driver: String,
    pub hook: Hook,
    pub xdp: bool,
    pub hairpin: bool,
    pub vlan: VlanCfg,
    pub role: PortRole,
    /// May act as a DHCP server (PORT_F_TRUSTED).
    pub trusted: bool,
    /// Port security as configured (the datapath adds sticky MACs and
    /// snooped addresses to the map entry).
    pub security: Security,
    /// Isolation and rate limits as configured.
    pub policy: PolicyArgs,
    /// Isolated in effect: its own setting or its network's default.
    pub isolated: bool,
}

/// Removes the entries of `map` that `doomed` picks; how many it picked.
pub(crate) fn remove_where<K: aya::Pod, V: aya::Pod>(
    map: &mut aya::maps::HashMap<&mut aya::maps::MapData, K, V>,
    doomed: impl Fn(&K, &V) -> bool,
) -> usize {
    let keys: Vec<K> = map
        .iter()
        .filter_map(|r| r.ok())
        .filter(|(k, v)| doomed(k, v))
        .map(|(k, _)| k)
        .collect();
    for k in &keys {
        let _ = map.remove(k);
    }
    keys.len()
}

/// A port's word in a flood set.
fn flood_member(ifindex: u32, isolated: bool) -> u32 {
    if isolated {
        ifindex | FLOOD_M_ISOLATED
    } else {
        ifindex
    }
}

pub struct Switch {
    pub(crate) dp: Datapath,
    pub(crate) nets: BTreeMap<String, Network>,
    /// Keyed by interface name.
    pub(crate) ports: BTreeMap<String, Port>,
    /// Uplinks of routed networks, shared by those networks.
    pub(crate) routed_uplinks: BTreeMap<String, RoutedUplink>,
    /// DHCP and DNS servers of networks with a `--dhcp-range`.
    pub(crate) services: crate::dhcp::service::Services,
    /// Network ids of a running datapath being adopted (daemon restart).
    pub(crate) adopt_ids: BTreeMap<String, u32>,
    /// Snooped bindings (port ifindex, address) -> what the sweep saw of
    /// their lease (`security::sweep_bindings`).
    pub(crate) binding_leases: BTreeMap<(u32, u32), crate::switch::bindings::LeaseSeen>,
    /// Uplink groups (`kvnet uplink`).
    pub(crate) uplinks: crate::uplink::Groups,
    /// The VTEP device of VXLAN networks, while there are any.
    pub(crate) vtep: Option<vxlan::Vtep>,
}

/// Which hook `auto` picks: tc for veth and tap (XDP on a veth turns TSO
/// off on its peer, and both carry checksum-offloaded and GSO frames that
/// only an skb keeps intact), XDP in front of tc for other (physical) NICs.
pub fn resolve_hook(hook: Hook, driver: &str) -> bool {
    match hook {
        Hook::Xdp => true,
        Hook::Tc => false,
        Hook::Auto => !matches!(driver, "veth" | "tun"),
    }
}

use crate::host::monotonic_ns;

impl Switch {
    pub fn new(dp: Datapath) -> Self {
        Self {
            dp,
            nets: BTreeMap::new(),
            ports: BTreeMap::new(),
            routed_uplinks: BTreeMap::new(),
            services: Default::default(),
            adopt_ids: BTreeMap::new(),
            binding_leases: BTreeMap::new(),
            uplinks: Default::default(),
            vtep: None,
        }
    }

    pub(crate) fn net(&self, name: &str) -> Result<&Network> {
        self.nets
            .get(name)
            .with_context(|| format!("no network named '{name}'"))
    }

    pub fn net_set(&mut self, name: &str, ageing: Option<u64>) -> Result<()> {
        if ageing == Some(0) {
            bail!("ageing must be at least 1 second");
        }
        let net = self
            .nets
            .get_mut(name)
            .with_context(|| format!("no network named '{name}'"))?;
        if let Some(s) = ageing {
            net.ageing = Duration::from_secs(s);
        }
        Ok(())
    }

    pub fn net_del(&mut self, name: &str) -> Result<()> {
        let id = self.net(name)?.id;
        let members: Vec<String> = self
            .ports
            .iter()
            .filter(|(_, p)| p.net == name)
            .map(|(n, _)| n.clone())
            .collect();
        for iface in members {
            self.port_remove(&iface)?;
        }
        self.teardown_net(name, id);
        self.vxlan_teardown(name, id);
        self.flush_fdb(|k, _| k.net_id == id)?;
        self.neigh_flush(|k, _| k.net_id == id);
        let mut flood = self.dp.flood()?;
        let keys: Vec<FloodKey> = flood
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| k.net_id == id)
            .collect();
        for k in keys {
            let _ = flood.remove(&k);
        }
        self.nets.remove(name);
        Ok(())
    }

    pub fn net_list(&self) -> Vec<NetInfo> {
        self.nets
            .iter()
            .map(|(name, n)| NetInfo {
                name: name.clone(),
                id: n.id,
                mode: n.mode,
                gateway: n.gateway.as_ref().map(|g| {
                    let vlan = self.ports.get(&g.port_if).map(|p| p.vlan.clone());
                    GatewayInfo::of(g, vlan.unwrap_or_default())
                }),
                uplink: n.uplink.clone(),
                ageing_secs: n.ageing.as_secs(),
                nat: n.nat.as_ref().map(|s| s.info()),
                ports: self
                    .ports
                    .iter()
                    .filter(|(_, p)| &p.net == name)
                    .map(|(i, _)| i.clone())
                    .collect(),
            })
            .collect()
    }

    /// (flood set member, VLAN config) of the network's ports: the member
    /// is the ifindex, with FLOOD_M_ISOLATED for isolated ports.
    pub(crate) fn members(&self, net: &str) -> Vec<(u32, VlanCfg)> {
        self.ports
            .values()
            .filter(|p| p.net == net)
            .map(|p| (flood_member(p.ifindex, p.isolated), p.vlan.clone()))
            .collect()
    }

    /// Rewrites the flood sets of `vids` in network `net_id` from
    /// `members`: untagged members first, then the tagged ones.
    /// A VLAN without members loses its flood set.
    pub(crate) fn write_floods(
        &mut self,
        net_id: u32,
        members: &[(u32, VlanCfg)],
        vids: &BTreeSet<u16>,
    ) -> Result<()> {
        if self.dp.adopting {
            // The pinned sets are complete; partial rewrites while ports
            // are adopted one by one would drop floods for a moment.
            // `state::finish_adoption` writes them once at the end.
            return Ok(());
        }
        let mut flood = self.dp.flood()?;
        for &vid in vids {
            let mut untagged = Vec::new();
            let mut tagged = Vec::new();
            for (ifindex, cfg) in members {
                match cfg.memberships().get(&vid) {
                    Some(Tagging::Untagged) => untagged.push(*ifindex),
                    Some(Tagging::Tagged) => tagged.push(*ifindex),
                    None => {}
                }
            }
            let key = FloodKey {
                net_id,
                vid,
                _pad: 0,
            };
            if untagged.is_empty() && tagged.is_empty() {
                let _ = flood.remove(&key);
                continue;
            }
            // 16 KiB: on the heap, not a worker's stack.
            let mut set = Box::new(FloodSet::default());
            let all: Vec<u32> = untagged.iter().chain(&tagged).copied().collect();
            for (slot, member) in set.members.iter_mut().zip(&all) {
                *slot = *member;
            }
            set.count = all.len().min(MAX_FLOOD_PORTS) as u32;
            set.tagged = set.count - untagged.len().min(MAX_FLOOD_PORTS) as u32;
            flood
                .insert(key, *set, 0)
                .with_context(|| format!("writing the flood set of VLAN {vid}"))?;
        }
        Ok(())
    }

    /// Refuses a configuration that would put more than MAX_FLOOD_PORTS
    /// ports into one VLAN of `net` (`except` is the port being changed).
    fn check_capacity(&self, net: &str, except: &str, cfg: &VlanCfg) -> Result<()> {
        for vid in cfg.memberships().keys() {
            let n = self
                .ports
                .iter()
                .filter(|(name, p)| {
                    p.net == net && name.as_str() != except && p.vlan.is_member(*vid)
                })
                .count();
            if n >= MAX_FLOOD_PORTS {
                bail!("VLAN {vid} of network '{net}' already has the maximum of {MAX_FLOOD_PORTS} ports");
            }
        }
        Ok(())
    }

    fn write_memberships(&mut self, ifindex: u32, cfg: &VlanCfg) -> Result<()> {
        let mut m = self.dp.vlan_members()?;
        for (vid, tagging) in cfg.memberships() {
            let flags = if tagging == Tagging::Tagged {
                VLAN_M_TAGGED
            } else {
                0
            };
            m.insert(
                VlanMemberKey {
                    ifindex,
                    vid,
                    _pad: 0,
                },
                VlanMember { flags },
                0,
            )
            .with_context(|| format!("writing the port's membership in VLAN {vid}"))?;
        }
        Ok(())
    }

    fn remove_memberships(&mut self, ifindex: u32, vids: impl IntoIterator<Item = u16>) {
        if let Ok(mut m) = self.dp.vlan_members() {
            for vid in vids {
                let _ = m.remove(&VlanMemberKey {
                    ifindex,
                    vid,
                    _pad: 0,
                });
            }
        }
    }

    /// `base` with the VLAN fields of `cfg` (the rest, port security's
    /// bindings included, stays as it was).
    fn port_config(base: PortConfig, cfg: &VlanCfg) -> PortConfig {
        let (vlan_mode, pvid, native_vid) = cfg.port_fields();
        PortConfig {
            vlan_mode,
            pvid,
            native_vid,
            ..base
        }
    }

    /// `trusted`: the guest may act as a DHCP server and learns any MAC.
    #[allow(clippy::too_many_arguments)]
    pub fn port_add(
        &mut self,
        net: &str,
        iface: &str,
        hairpin: bool,
        hook: Hook,
        vlan: &VlanArgs,
        trusted: bool,
        security: &SecurityArgs,
        policy: &PolicyArgs,
    ) -> Result<()> {
        let n = self.net(net)?;
        let mut extra = self.mode_port_flags(n.mode);
        if trusted {
            extra |= PORT_F_TRUSTED;
        }
        if self.routed_uplinks.contains_key(iface) {
            bail!("interface '{iface}' is the uplink of a routed network");
        }
        self.refuse_uplink_member(iface)?;
        let security = security
            .validate()
            .with_context(|| format!("port '{iface}'"))?;
        if !security.guarded {
            log::warn!("port '{iface}': PORT SECURITY OFF (--no-port-security): this guest may spoof MACs and addresses");
        }
        self.port_add_inner(
            net,
            iface,
            hairpin,
            hook,
            vlan,
            extra,
            PortRole::Guest,
            security,
            policy.clone(),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn port_add_inner(
        &mut self,
        net: &str,
        iface: &str,
        hairpin: bool,
        hook: Hook,
        vlan: &VlanArgs,
        extra_flags: u32,
        role: PortRole,
        security: Security,
        policy: PolicyArgs,
    ) -> Result<()> {
        let net_id = self.net(net)?.id;
        let dhcp = self.net(net)?.opts.dhcp_range.is_some();
        if let Some(p) = self.ports.get(iface) {
            bail!(
                "interface '{iface}' is already a port of network '{}'",
                p.net
            );
        }
        if vlan.no_vlan {
            bail!("--no-vlan is for `port set`; a new port without VLAN options has none");
        }
        let cfg = vlan.to_cfg()?;
        let ifindex = netdev::ifindex(iface)?;
        if ifindex == 1 {
            bail!("the loopback interface cannot be a switch port");
        }
        self.check_capacity(net, iface, &cfg)?;
        if self.ports.len() >= kvnet_common::MAX_PORTS as usize {
            bail!(
                "kvnet already holds the maximum of {} ports (all networks together)",
                kvnet_common::MAX_PORTS
            );
        }
        let eff = self
            .effective_policy(net, role, &policy, hook)
            .with_context(|| format!("port '{iface}'"))?;
        let driver = netdev::driver(iface).unwrap_or_else(|_| "unknown".into());
        // Rate-limited ports run tc only: XDP would forward past the policer.
        let xdp = resolve_hook(hook, &driver) && !eff.limited();
        let mut flags = extra_flags;
        if hairpin {
            flags |= PORT_F_HAIRPIN;
        }
        if xdp {
            flags |= PORT_F_XDP;
        }
        if takes_xdp_redirects(iface, ifindex, &driver) {
            flags |= PORT_F_XDP_TX;
        }
        // Only the XDP hook is blind to a stripped tag; tc reads it anyway.
        if xdp && strips_rx_vlan(iface, ifindex, &driver) {
            flags |= PORT_F_RX_VLAN_STRIPPED;
        }
        let flags = eff.flags(flags);
        let base = PortConfig {
            net_id,
            flags,
            ..Default::default()
        };
        let mut pcfg = Self::port_config(base, &cfg);
        // A running datapath being adopted keeps what it learned.
        let old = if self.dp.adopting {
            self.dp.ports()?.get(&ifindex, 0).ok()
        } else {
            None
        };
        // Upgraded from a datapath without port security: bind what the
        // guest was already using.
        let old = match (old, self.dp.upgrading_from()) {
            (Some(o), Some(_)) => Some(self.seed_bindings(net, net_id, ifindex, o)),
            (o, _) => o,
        };
        security.fill(&mut pcfg, old.as_ref(), dhcp);
        if !self.net(net)?.opts.gateway6.is_empty() {
            pcfg.flags |= kvnet_common::PORT_F_V6_SLAAC;
        }
        let vids: BTreeSet<u16> = cfg.memberships().keys().copied().collect();
        let mut members = self.members(net);
        let before = members.clone();
        members.push((flood_member(ifindex, eff.isolated), cfg.clone()));
        if !self.dp.adopting {
            journal::record(journal::Undo::Programs {
                iface: iface.to_string(),
                ifindex,
            })?;
        }
        let applied = self
            .dp
            .reset_stats(ifindex)
            .and_then(|_| self.write_memberships(ifindex, &cfg))
            .and_then(|_| self.write_policy(ifindex, &eff))
            .and_then(|_| {
                self.dp
                    .ports()?
                    .insert(ifindex, pcfg, 0)
                    .context("writing the port map")
            })
            .and_then(|_| self.sync_owners(ifindex, net_id, &security.macs))
            .and_then(|_| self.write_floods(net_id, &members, &vids))
            .and_then(|_| self.dp.attach(iface, ifindex, xdp))
            .and_then(|_| {
                if eff.rate_in.is_some() {
                    self.dp.attach_egress(iface, ifindex)?;
                }
                Ok(())
            });
        if let Err(e) = applied {
            self.dp.detach_egress(ifindex);
            self.remove_policy(ifindex);
            let _ = self.write_floods(net_id, &before, &vids);
            self.remove_memberships(ifindex, vids.iter().copied());
            let _ = self.dp.ports()?.remove(&ifindex);
            let _ = self.dp.port_stats()?.remove(&ifindex);
            self.drop_owners(ifindex);
            self.drop_v6_owners(ifindex);
            return Err(e);
        }
        // IPv6 addresses kvnet knows are this port's, bound before use.
        if let Err(e) = self.bind_v6_port(net, ifindex, &security.macs, role == PortRole::Gateway) {
            log::warn!("port {iface}: {e:#}");
        }
        // ARP suppression answers for the addresses given with a MAC.
        if let Some(mac) = security.macs.first().copied() {
            for ip in security.ips.clone() {
                self.neigh_add(net_id, pcfg.pvid, ip, mac, ifindex)?;
            }
        }
        self.ports.insert(
            iface.to_string(),
            Port {
                ifindex,
                net: net.to_string(),
                driver,
                hook,
                xdp,
                hairpin,
                vlan: cfg,
                role,
                trusted: flags & PORT_F_TRUSTED != 0,
                security,
                policy,
                isolated: eff.isolated,
            },
        );
        Ok(())
    }

    /// Makes `mac_owners` hold what the port's entry owns (network-wide,
    /// see `owner_key`). A MAC another port claimed on first sight goes to
    /// this one when the operator named it here (`given`); one named for
    /// another port stays there. Nothing is deleted here: the datapath may
    /// be claiming for this port right now (owner first, slot after).
    pub(crate) fn sync_owners(&mut self, ifindex: u32, net_id: u32, given: &[Mac]) -> Result<()> {
        let owned: Vec<[u8; 6]> = self
            .dp
            .ports()?
            .get(&ifindex, 0)
            .map(|p| p.owned_macs().to_vec())
            .unwrap_or_default();
        let mut owners = self.dp.mac_owners()?;
        let mut stolen = Vec::new();
        for mac in &owned {
            let key = kvnet_common::owner_key(net_id, *mac);
            match owners.get(&key, 0).ok() {
                Some(o) if o == ifindex => continue,
                Some(o) if given.contains(&Mac(*mac)) => {
                    let named_there = self
                        .ports
                        .values()
                        .any(|p| p.ifindex == o && p.security.macs.contains(&Mac(*mac)));
                    if named_there {
                        bail!(
                            "MAC {} is already given to port '{}'",
                            Mac(*mac),
                            self.port_name(o)
                        );
                    }
                    stolen.push((o, *mac));
                }
                Some(_) => continue,
                None => {}
            }
            owners
                .insert(key, ifindex, 0)
                .context("writing the MAC owner map")?;
        }
        // Off the port that took it on first sight.
        let mut ports = self.dp.ports()?;
        for (o, mac) in stolen {
            if let Ok(mut p) = ports.get(&o, 0) {
                let kept: Vec<[u8; 6]> = p
                    .owned_macs()
                    .iter()
                    .copied()
                    .filter(|m| *m != mac)
                    .collect();
                p.macs = [[0; 6]; kvnet_common::PORT_MACS];
                p.macs[..kept.len()].copy_from_slice(&kept);
                p.mac_count = kept.len() as u8;
                let _ = ports.insert(o, p, 0);
            }
        }
        Ok(())
    }

    /// Forgets every MAC the port owned.
    fn drop_owners(&mut self, ifindex: u32) {
        if let Ok(mut owners) = self.dp.mac_owners() {
            let mine: Vec<FdbKey> = owners
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(_, o)| *o == ifindex)
                .map(|(k, _)| k)
                .collect();
            for k in mine {
                let _ = owners.remove(&k);
            }
        }
    }

    /// `kvnet port show`: the port's protection and bindings.
    pub fn port_show(&mut self, iface: &str) -> Result<PortSecurityInfo> {
        let port = self
            .ports
            .get(iface)
            .with_context(|| format!("interface '{iface}' is not a kvnet port"))?;
        let (ifindex, net, role) = (port.ifindex, port.net.clone(), port.role);
        let pc = self
            .dp
            .ports()?
            .get(&ifindex, 0)
            .context("the port is missing from the port map")?;
        let mut info = PortSecurityInfo::of(iface, &net, &pc, role != PortRole::Guest);
        let mut owned: Vec<[u8; 6]> = self
            .dp
            .mac_owners()?
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(_, o)| *o == ifindex)
            .map(|(k, _)| k.mac)
            .collect();
        owned.sort();
        info.owned = owned.into_iter().map(|m| Mac(m).to_string()).collect();
        Ok(info)
    }

    /// Changes a port's VLAN membership live: new memberships and flood
    /// sets first, then the port's classification, then what it left
    /// (memberships, flood set entries, learned MACs of those VLANs).
    pub fn port_set(&mut self, iface: &str, vlan: &VlanArgs) -> Result<()> {
        let port = self
            .ports
            .get(iface)
            .with_context(|| format!("interface '{iface}' is not a kvnet port"))?;
        if vlan.is_empty() {
            bail!("nothing to change: give --vlan N, --trunk LIST [--native N] or --no-vlan");
        }
        let cfg = vlan.to_cfg()?;
        let gateway_port = port.role == PortRole::Gateway;
        if gateway_port && matches!(cfg, VlanCfg::Trunk { .. }) {
            bail!("the gateway port '{iface}' takes --vlan N (the VLAN its network's guests are on) or --no-vlan, not a trunk");
        }
        let (net, ifindex, old) = (port.net.clone(), port.ifindex, port.vlan.clone());
        let net_id = self.net(&net)?.id;
        self.check_capacity(&net, iface, &cfg)?;
        let old_pcfg = self
            .dp
            .ports()?
            .get(&ifindex, 0)
            .context("the port is missing from the port map")?;
        let pcfg = Self::port_config(old_pcfg, &cfg);
        let old_vids: BTreeSet<u16> = old.memberships().keys().copied().collect();
        let new_vids: BTreeSet<u16> = cfg.memberships().keys().copied().collect();
        let all: BTreeSet<u16> = old_vids.union(&new_vids).copied().collect();
        let left: Vec<u16> = old_vids.difference(&new_vids).copied().collect();
        let before = self.members(&net);
        let after: Vec<(u32, VlanCfg)> = before
            .iter()
            .map(|(i, c)| {
                (
                    *i,
                    if *i & FLOOD_M_IFINDEX == ifindex {
                        cfg.clone()
                    } else {
                        c.clone()
                    },
                )
            })
            .collect();
        let applied = self
            .write_memberships(ifindex, &cfg)
            .and_then(|_| self.write_floods(net_id, &after, &all))
            .and_then(|_| {
                self.dp
                    .ports()?
                    .insert(ifindex, pcfg, 0)
                    .context("writing the port map")
            });
        if let Err(e) = applied {
            // Back to the old state, as far as the maps let us.
            let _ = self.dp.ports().map(|mut p| p.insert(ifindex, old_pcfg, 0));
            let _ = self.write_floods(net_id, &before, &all);
            let joined: Vec<u16> = new_vids.difference(&old_vids).copied().collect();
            self.remove_memberships(ifindex, joined);
            let _ = self.write_memberships(ifindex, &old);
            return Err(e);
        }
        self.remove_memberships(ifindex, left.iter().copied());
        self.flush_fdb(|k, e| e.ifindex == ifindex && k.net_id == net_id && left.contains(&k.vid))?;
        if gateway_port {
            // Routing and NAT serve the guests of the gateway's VLAN.
            let vid = cfg.port_fields().1;
            let mut nets = self.dp.nets()?;
            if let Ok(mut n) = nets.get(&net_id, 0) {
                n.gw_vid = vid;
                nets.insert(net_id, n, 0)?;
            }
        }
        if let Some(p) = self.ports.get_mut(iface) {
            p.vlan = cfg;
        }
        Ok(())
    }

    pub fn port_del(&mut self, iface: &str) -> Result<()> {
        if let Some(p) = self.ports.get(iface) {
            if p.role != PortRole::Guest {
                bail!(
                    "'{iface}' is the {} of network '{}'; it goes with `kvnet net del {}`",
                    p.role,
                    p.net,
                    p.net
                );
            }
        }
        self.port_remove(iface)
    }

    pub(crate) fn port_remove(&mut self, iface: &str) -> Result<()> {
        let port = self
            .ports
            .remove(iface)
            .with_context(|| format!("interface '{iface}' is not a kvnet port"))?;
        self.dp.detach(port.ifindex);
        self.dp.detach_egress(port.ifindex);
        self.remove_policy(port.ifindex);
        self.neigh_flush(|_, e| e.ifindex == port.ifindex);
        let net_id = self.net(&port.net)?.id;
        let members = self.members(&port.net);
        let vids: BTreeSet<u16> = port.vlan.memberships().keys().copied().collect();
        self.write_floods(net_id, &members, &vids)?;
        let _ = self.dp.ports()?.remove(&port.ifindex);
        let _ = self.dp.port_stats()?.remove(&port.ifindex);
        self.remove_memberships(port.ifindex, vids);
        self.flush_fdb(|_, e| e.ifindex == port.ifindex)?;
        // Its MACs are free again (a guest moving elsewhere takes them along),
        // and a later port with its ifindex starts with no flows counted.
        self.drop_owners(port.ifindex);
        self.drop_v6_owners(port.ifindex);
        let _ = self.dp.ct_quota().map(|mut q| q.remove(&port.ifindex));
        Ok(())
    }

    /// The network's VLANs and, for each, its ports and how they carry it.
    pub fn vlan_show(&self, net: &str) -> Result<Vec<VlanInfo>> {
        self.net(net)?;
        let mut vlans: BTreeMap<u16, Vec<VlanPortRow>> = BTreeMap::new();
        for (name, p) in self.ports.iter().filter(|(_, p)| p.net == net) {
            for (vid, tagging) in p.vlan.memberships() {
                vlans.entry(vid).or_default().push(VlanPortRow {
                    port: name.clone(),
                    mode: p.vlan.mode_name().into(),
                    tagging: tagging.to_string(),
                });
            }
        }
        Ok(vlans
            .into_iter()
            .map(|(vid, ports)| VlanInfo { vid, ports })
            .collect())
    }

    pub fn port_list(&self) -> Vec<PortInfo> {
        self.ports
            .iter()
            .map(|(iface, p)| PortInfo {
                iface: iface.clone(),
                ifindex: p.ifindex,
                net: p.net.clone(),
                driver: p.driver.clone(),
                hook: p.hook,
                attached: if p.xdp { "xdp+tc" } else { "tc" }.into(),
                hairpin: p.hairpin,
                vlan: p.vlan.clone(),
                role: p.role.to_string(),
                trusted: p.trusted,
            })
            .collect()
    }

    fn flush_fdb(&mut self, doomed: impl Fn(&FdbKey, &FdbEntry) -> bool) -> Result<usize> {
        Ok(remove_where(&mut self.dp.fdb()?, doomed))
    }

    fn port_name(&self, ifindex: u32) -> String {
        self.ports
            .iter()
            .find(|(_, p)| p.ifindex == ifindex)
            .map(|(n, _)| n.clone())
            .unwrap_or_else(|| format!("ifindex {ifindex}"))
    }

    pub fn fdb_show(&mut self, net: &str) -> Result<Vec<FdbRow>> {
        let id = self.net(net)?.id;
        let now = monotonic_ns();
        let entries: Vec<(FdbKey, FdbEntry)> = self
            .dp
            .fdb()?
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, _)| k.net_id == id && k.vid != FDB_VID_ANY)
            .collect();
        let mut rows: Vec<FdbRow> = entries
            .into_iter()
            .map(|(k, e)| {
                let is_static = e.flags & FDB_F_STATIC != 0;
                let vtep = self.vxlan_remote_of(&k, e.ifindex);
                FdbRow {
                    mac: Mac(k.mac).to_string(),
                    vlan: k.vid,
                    port: match vtep {
                        Some(_) => crate::vxlan::VTEP_IFACE.to_string(),
                        None => self.port_name(e.ifindex),
                    },
                    vtep,
                    ifindex: e.ifindex,
                    kind: if is_static { "static" } else { "learned" }.into(),
                    age_secs: (!is_static).then(|| now.saturating_sub(e.last_seen_ns) as f64 / 1e9),
                }
            })
            .collect();
        rows.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        Ok(rows)
    }

    pub fn fdb_add(&mut self, net: &str, mac: &str, port: &str, vlan: Option<&str>) -> Result<()> {
        let id = self.net(net)?.id;
        let mac: Mac = mac.parse()?;
        if mac.is_multicast() || mac.is_zero() {
            bail!("{mac} is a multicast or zero MAC; static entries take unicast addresses");
        }
        let p = self
            .ports
            .get(port)
            .with_context(|| format!("interface '{port}' is not a kvnet port"))?;
        if p.net != net {
            bail!("port '{port}' belongs to network '{}', not '{net}'", p.net);
        }
        // Default: the VLAN the port's untagged frames belong to.
        let vid = match vlan {
            Some(v) => vlan::parse_vid(v)?,
            None => match &p.vlan {
                VlanCfg::Trunk { native: None, .. } => {
                    bail!("port '{port}' is a trunk without a native VLAN: say which VLAN with --vlan")
                }
                c => c.port_fields().1,
            },
        };
        if !p.vlan.memberships().contains_key(&vid) {
            bail!("port '{port}' is not a member of VLAN {vid}");
        }
        let entry = FdbEntry {
            ifindex: p.ifindex,
            flags: FDB_F_STATIC,
            last_seen_ns: monotonic_ns(),
        };
        self.dp
            .fdb()?
            .insert(
                FdbKey {
                    net_id: id,
                    vid,
                    mac: mac.0,
                },
                entry,
                0,
            )
            .context("writing the FDB")?;
        Ok(())
    }

    /// Deletes `mac` from one VLAN, or from every VLAN without `vlan`.
    pub fn fdb_del(&mut self, net: &str, mac: &str, vlan: Option<&str>) -> Result<()> {
        let id = self.net(net)?.id;
        let mac: Mac = mac.parse()?;
        let vid = vlan.map(vlan::parse_vid).transpose()?;
        let n = self
            .flush_fdb(|k, _| k.net_id == id && k.mac == mac.0 && vid.is_none_or(|v| v == k.vid))?;
        if n == 0 {
            bail!("no FDB entry for {mac} in network '{net}'");
        }
        Ok(())
    }

    /// Removes learned entries idle longer than their network's ageing.
    pub fn age_fdb(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let ageing: BTreeMap<u32, u64> = self
            .nets
            .values()
            .map(|n| (n.id, n.ageing.as_nanos() as u64))
            .collect();
        let aged = self.flush_fdb(|k, e| {
            e.flags & FDB_F_STATIC == 0
                && ageing
                    .get(&k.net_id)
                    .is_none_or(|max| now.saturating_sub(e.last_seen_ns) > *max)
        })?;
        self.recount_learned()?;
        self.vxlan_age()?;
        Ok(aged)
    }

    /// Each network's learned MACs, recounted: the datapath only counts up
    /// (its bound for ports without port security), so what aged or was
    /// flushed comes off here.
    fn recount_learned(&mut self) -> Result<()> {
        let mut held: BTreeMap<u32, u32> = BTreeMap::new();
        for (k, e) in self.dp.fdb()?.iter().filter_map(|r| r.ok()) {
            if e.flags & FDB_F_STATIC == 0 && k.vid != FDB_VID_ANY {
                *held.entry(k.net_id).or_default() += 1;
            }
        }
        let mut count = self.dp.fdb_count()?;
        let counted: Vec<u32> = count.keys().filter_map(|k| k.ok()).collect();
        for net in counted.iter().filter(|n| !held.contains_key(n)) {
            let _ = count.remove(net);
        }
        for (net, n) in held {
            let _ = count.insert(net, n, 0);
        }
        Ok(())
    }

    pub fn flush_log(&mut self) {
        self.dp.flush_log();
    }

    /// Drops ports whose interface vanished (guest shut down, veth deleted).
    pub fn reap_vanished_ports(&mut self) -> Vec<String> {
        let names = netdev::names_of(self.ports.values().map(|p| p.ifindex));
        let gone: Vec<String> = self
            .ports
            .keys()
            .zip(names)
            .filter(|(name, now)| now.as_deref() != Some(name.as_str()))
            .map(|(n, _)| n.clone())
            .collect();
        for iface in &gone {
            if let Err(e) = self.port_remove(iface) {
                log::warn!("removing vanished port {iface}: {e:#}");
            }
        }
        gone
    }

    pub fn stats(&mut self) -> Result<Vec<PortStatsRow>> {
        let mut ports: Vec<(String, u32, String)> = self
            .ports
            .iter()
            .map(|(n, p)| (n.clone(), p.ifindex, p.net.clone()))
            .collect();
        for (name, u) in &self.routed_uplinks {
            ports.push((name.clone(), u.ifindex, "(routed uplink)".into()));
        }
        if let Some(v) = &self.vtep {
            // What came from and went to other hosts, all VNIs together.
            let iface = crate::vxlan::VTEP_IFACE.to_string();
            ports.push((iface, v.ifindex, "(vxlan vtep)".into()));
        }
        let mut rows = Vec::new();
        for (port, ifindex, net) in ports {
            let s = self.dp.stats(ifindex)?;
            rows.push(PortStatsRow {
                port,
                net,
                rx_packets: s.rx_packets,
                rx_bytes: s.rx_bytes,
                tx_packets: s.tx_packets,
                tx_bytes: s.tx_bytes,
                xdp_seen: s.xdp_seen,
                tc_seen: s.tc_seen,
                flooded: s.flooded,
                learned: s.learned,
                learn_refused: s.learn_refused,
                arp_answered: s.arp_answered,
                routed: s.routed,
                to_host: s.to_host,
                drops: DROP_REASON_NAMES
                    .iter()
                    .zip(s.drops)
                    .filter(|(name, n)| *n > 0 || !name.starts_with("reserved"))
                    .map(|(name, n)| (name.to_string(), n))
                    .collect(),
            });
        }
        Ok(rows)
    }

    pub fn shutdown(&mut self) {
        // Networks first: they undo their host changes (gateway interfaces,
        // sysctls, promiscuous mode).
        let nets: Vec<String> = self.nets.keys().cloned().collect();
        for n in nets {
            if let Err(e) = self.net_del(&n) {
                log::warn!("removing network {n}: {e:#}");
            }
        }
        let ports: Vec<String> = self.ports.keys().cloned().collect();
        for p in ports {
            let _ = self.port_remove(&p);
        }
        self.uplinks.destroy_all(&mut self.dp);
        log::info!(
            "detached all ports; pins under {} removed",
            self.dp.pin_dir().display()
        );
    }
}

/// Whether XDP may redirect frames to this port: its driver has
/// `ndo_xdp_xmit` (the kernel says so from 6.3 on; before, every driver is
/// assumed to), and it is no veth, whose `ndo_xdp_xmit` needs an XDP
/// program or GRO on the peer. Otherwise the XDP hook hands frames for
/// the port to tc, which can always send them.
fn takes_xdp_redirects(iface: &str, ifindex: u32, driver: &str) -> bool {
    if driver == "veth" {
        return false;
    }
    match crate::xdp_features::of(ifindex) {
        Ok(Some(features)) => features & crate::xdp_features::XDP_ACT_NDO_XMIT != 0,
        Ok(None) => true,
        Err(e) => {
            log::warn!("{iface}: XDP features unknown ({e:#}): frames for it go through tc");
            false
        }
    }
}

/// Whether a frame's VLAN tag may reach the port's XDP program in skb
/// metadata only, where XDP cannot see it (MEASURED.md, "rx VLAN tags and
/// XDP"): then untagged-looking frames must go on to tc. A veth passes on
/// the tag its peer's tx offload left in metadata, whatever its own
/// rx-vlan-hw-parse says; a macvlan (macvtap too) or ipvlan gets frames its
/// lower device has already untagged; other devices strip with rx VLAN
/// offload on. When unsure, assume so: tc is slower, never wrong.
fn strips_rx_vlan(iface: &str, ifindex: u32, driver: &str) -> bool {
    if matches!(driver, "veth" | "macvlan" | "ipvlan") {
        return true;
    }
    match crate::ethtool_features::strips_rx_vlan(ifindex) {
        Ok(Some(strips)) => strips,
        Ok(None) => {
            log::warn!("{iface}: rx VLAN offload unknown (no ethtool netlink): untagged frames go through tc");
            true
        }
        Err(e) => {
            log::warn!("{iface}: rx VLAN offload unknown ({e:#}): untagged frames go through tc");
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_names() {
        for ok in ["default", "net-1", "a", "lab_2.x"] {
            validate_net_name(ok).unwrap();
        }
        for bad in ["", "a b", "-x", "x/y", "é", &"n".repeat(33)] {
            assert!(validate_net_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn auto_hook_by_driver() {
        assert!(!resolve_hook(Hook::Auto, "veth"));
        assert!(!resolve_hook(Hook::Auto, "tun"));
        assert!(resolve_hook(Hook::Auto, "virtio_net"));
        assert!(resolve_hook(Hook::Xdp, "veth"));
        assert!(!resolve_hook(Hook::Tc, "ixgbe"));
    }
}
