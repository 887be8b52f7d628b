//! Desired state (networks, ports, static FDB entries) and its reflection in
//! the datapath maps. Every operation validates first and changes the maps
//! only when it can finish, undoing its own steps when a later one fails.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{bail, Context, Result};
use kvnet_common::{
    FdbEntry, FdbKey, FloodKey, FloodSet, PortConfig, DROP_REASON_NAMES, FDB_F_STATIC,
    MAX_FLOOD_PORTS, PORT_F_HAIRPIN, PORT_F_XDP, PORT_F_XDP_TX,
};

use crate::{
    control::{FdbRow, Hook, NetInfo, PortInfo, PortStatsRow},
    datapath::Datapath,
    mac::Mac,
    netdev,
};

pub const DEFAULT_AGEING: Duration = Duration::from_secs(300);

pub struct Network {
    pub id: u32,
    pub ageing: Duration,
}

pub struct Port {
    pub ifindex: u32,
    pub net: String,
    pub driver: String,
    pub hook: Hook,
    pub xdp: bool,
    pub hairpin: bool,
}

pub struct Switch {
    dp: Datapath,
    nets: BTreeMap<String, Network>,
    /// Keyed by interface name.
    ports: BTreeMap<String, Port>,
}

/// Network names end up in logs, JSON and file names: keep them plain.
pub fn validate_net_name(name: &str) -> Result<()> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    let starts_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric());
    if name.is_empty() || name.len() > 32 || !ok_chars || !starts_ok {
        bail!(
            "invalid network name '{name}': use 1-32 letters, digits, '-', '_' or '.', starting with a letter or digit"
        );
    }
    Ok(())
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

fn monotonic_ns() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always available");
    ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
}

impl Switch {
    pub fn new(dp: Datapath) -> Self {
        Self {
            dp,
            nets: BTreeMap::new(),
            ports: BTreeMap::new(),
        }
    }

    fn net(&self, name: &str) -> Result<&Network> {
        self.nets
            .get(name)
            .with_context(|| format!("no network named '{name}'"))
    }

    pub fn net_add(&mut self, name: &str, ageing: Option<u64>) -> Result<()> {
        validate_net_name(name)?;
        if self.nets.contains_key(name) {
            bail!("network '{name}' already exists");
        }
        let ageing = match ageing {
            Some(0) => bail!("ageing must be at least 1 second"),
            Some(s) => Duration::from_secs(s),
            None => DEFAULT_AGEING,
        };
        let id = (1..)
            .find(|id| self.nets.values().all(|n| n.id != *id))
            .unwrap_or(1);
        self.write_flood(id, &[])?;
        self.nets.insert(name.to_string(), Network { id, ageing });
        Ok(())
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
            self.port_del(&iface)?;
        }
        self.flush_fdb(|k, _| k.net_id == id)?;
        let _ = self.dp.flood()?.remove(&FloodKey {
            net_id: id,
            vid: 0,
            _pad: 0,
        });
        self.nets.remove(name);
        Ok(())
    }

    pub fn net_list(&self) -> Vec<NetInfo> {
        self.nets
            .iter()
            .map(|(name, n)| NetInfo {
                name: name.clone(),
                id: n.id,
                mode: "isolated".into(),
                ageing_secs: n.ageing.as_secs(),
                ports: self
                    .ports
                    .iter()
                    .filter(|(_, p)| &p.net == name)
                    .map(|(i, _)| i.clone())
                    .collect(),
            })
            .collect()
    }

    fn members(&self, net: &str) -> Vec<u32> {
        self.ports
            .values()
            .filter(|p| p.net == net)
            .map(|p| p.ifindex)
            .collect()
    }

    fn write_flood(&mut self, net_id: u32, members: &[u32]) -> Result<()> {
        let mut set = FloodSet::default();
        for (slot, ifindex) in set.ifindex.iter_mut().zip(members) {
            *slot = *ifindex;
        }
        set.count = members.len().min(MAX_FLOOD_PORTS) as u32;
        self.dp
            .flood()?
            .insert(
                FloodKey {
                    net_id,
                    vid: 0,
                    _pad: 0,
                },
                set,
                0,
            )
            .context("writing the network's flood set")?;
        Ok(())
    }

    pub fn port_add(&mut self, net: &str, iface: &str, hairpin: bool, hook: Hook) -> Result<()> {
        let net_id = self.net(net)?.id;
        if let Some(p) = self.ports.get(iface) {
            bail!(
                "interface '{iface}' is already a port of network '{}'",
                p.net
            );
        }
        let ifindex = netdev::ifindex(iface)?;
        if ifindex == 1 {
            bail!("the loopback interface cannot be a switch port");
        }
        let mut members = self.members(net);
        if members.len() >= MAX_FLOOD_PORTS {
            bail!("network '{net}' already has the maximum of {MAX_FLOOD_PORTS} ports");
        }
        let driver = netdev::driver(iface).unwrap_or_else(|_| "unknown".into());
        let xdp = resolve_hook(hook, &driver);
        let mut flags = 0;
        if hairpin {
            flags |= PORT_F_HAIRPIN;
        }
        if xdp {
            flags |= PORT_F_XDP;
        }
        if driver != "veth" {
            flags |= PORT_F_XDP_TX;
        }
        let cfg = PortConfig {
            net_id,
            flags,
            ..Default::default()
        };
        self.dp.reset_stats(ifindex)?;
        self.dp
            .ports()?
            .insert(ifindex, cfg, 0)
            .context("writing the port map")?;
        members.push(ifindex);
        let applied = self
            .write_flood(net_id, &members)
            .and_then(|_| self.dp.attach(iface, ifindex, xdp));
        if let Err(e) = applied {
            members.pop();
            let _ = self.write_flood(net_id, &members);
            let _ = self.dp.ports()?.remove(&ifindex);
            let _ = self.dp.port_stats()?.remove(&ifindex);
            return Err(e);
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
            },
        );
        Ok(())
    }

    pub fn port_del(&mut self, iface: &str) -> Result<()> {
        let port = self
            .ports
            .remove(iface)
            .with_context(|| format!("interface '{iface}' is not a kvnet port"))?;
        self.dp.detach(port.ifindex);
        let net_id = self.net(&port.net)?.id;
        let members = self.members(&port.net);
        self.write_flood(net_id, &members)?;
        let _ = self.dp.ports()?.remove(&port.ifindex);
        let _ = self.dp.port_stats()?.remove(&port.ifindex);
        self.flush_fdb(|_, e| e.ifindex == port.ifindex)?;
        Ok(())
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
            })
            .collect()
    }

    fn flush_fdb(&mut self, doomed: impl Fn(&FdbKey, &FdbEntry) -> bool) -> Result<usize> {
        let mut fdb = self.dp.fdb()?;
        let keys: Vec<FdbKey> = fdb
            .iter()
            .filter_map(|r| r.ok())
            .filter(|(k, e)| doomed(k, e))
            .map(|(k, _)| k)
            .collect();
        for k in &keys {
            let _ = fdb.remove(k);
        }
        Ok(keys.len())
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
            .filter(|(k, _)| k.net_id == id)
            .collect();
        let mut rows: Vec<FdbRow> = entries
            .into_iter()
            .map(|(k, e)| {
                let is_static = e.flags & FDB_F_STATIC != 0;
                FdbRow {
                    mac: Mac(k.mac).to_string(),
                    vlan: k.vid,
                    port: self.port_name(e.ifindex),
                    ifindex: e.ifindex,
                    kind: if is_static { "static" } else { "learned" }.into(),
                    age_secs: (!is_static).then(|| now.saturating_sub(e.last_seen_ns) as f64 / 1e9),
                }
            })
            .collect();
        rows.sort_by(|a, b| (a.vlan, &a.mac).cmp(&(b.vlan, &b.mac)));
        Ok(rows)
    }

    pub fn fdb_add(&mut self, net: &str, mac: &str, port: &str) -> Result<()> {
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
                    vid: 0,
                    mac: mac.0,
                },
                entry,
                0,
            )
            .context("writing the FDB")?;
        Ok(())
    }

    pub fn fdb_del(&mut self, net: &str, mac: &str) -> Result<()> {
        let id = self.net(net)?.id;
        let mac: Mac = mac.parse()?;
        self.dp
            .fdb()?
            .remove(&FdbKey {
                net_id: id,
                vid: 0,
                mac: mac.0,
            })
            .map_err(|_| anyhow::anyhow!("no FDB entry for {mac} in network '{net}'"))
    }

    /// Removes learned entries idle longer than their network's ageing.
    pub fn age_fdb(&mut self) -> Result<usize> {
        let now = monotonic_ns();
        let ageing: BTreeMap<u32, u64> = self
            .nets
            .values()
            .map(|n| (n.id, n.ageing.as_nanos() as u64))
            .collect();
        self.flush_fdb(|k, e| {
            e.flags & FDB_F_STATIC == 0
                && ageing
                    .get(&k.net_id)
                    .is_none_or(|max| now.saturating_sub(e.last_seen_ns) > *max)
        })
    }

    pub fn flush_log(&mut self) {
        self.dp.flush_log();
    }

    /// Drops ports whose interface vanished (guest shut down, veth deleted).
    pub fn reap_vanished_ports(&mut self) -> Vec<String> {
        let gone: Vec<String> = self
            .ports
            .iter()
            .filter(|(name, p)| netdev::name_of(p.ifindex).as_deref() != Some(name.as_str()))
            .map(|(n, _)| n.clone())
            .collect();
        for iface in &gone {
            if let Err(e) = self.port_del(iface) {
                log::warn!("removing vanished port {iface}: {e:#}");
            }
        }
        gone
    }

    pub fn stats(&mut self) -> Result<Vec<PortStatsRow>> {
        let ports: Vec<(String, u32, String)> = self
            .ports
            .iter()
            .map(|(n, p)| (n.clone(), p.ifindex, p.net.clone()))
            .collect();
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
        let ports: Vec<String> = self.ports.keys().cloned().collect();
        for p in ports {
            let _ = self.port_del(&p);
        }
        log::info!(
            "detached all ports; pins under {} removed",
            self.dp.pin_dir().display()
        );
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
