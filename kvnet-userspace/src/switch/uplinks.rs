//! The switch's side of uplink groups: what uses an interface, which
//! networks ride a group, and the announcements after a failover.
use std::net::Ipv4Addr;

use anyhow::{bail, Result};
use kvnet_common::FDB_F_HOST;

use super::Switch;
use crate::{
    netdev,
    uplink::{announce::Announce, Failover, UplinkInfo},
    uplink_spec::UplinkSpec,
};

impl Switch {
    /// A group's member carries nothing but the group.
    pub(crate) fn refuse_uplink_member(&self, iface: &str) -> Result<()> {
        if let Some(g) = self.uplinks.group_of_member(iface) {
            bail!("'{iface}' is a member of uplink group '{g}'; use the group ('{g}') instead");
        }
        Ok(())
    }

    /// What else uses `iface`, if anything.
    fn iface_user(&self, iface: &str) -> Option<String> {
        if let Some(p) = self.ports.get(iface) {
            return Some(format!("a port of network '{}'", p.net));
        }
        if let Some((n, _)) = self
            .nets
            .iter()
            .find(|(_, n)| n.uplink.as_deref() == Some(iface))
        {
            return Some(format!("the uplink of network '{n}'"));
        }
        None
    }

    /// Networks whose uplink is `group`.
    fn riders(&self, group: &str) -> Vec<String> {
        self.nets
            .iter()
            .filter(|(_, n)| n.uplink.as_deref() == Some(group))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// What else uses each of `spec`'s members (those used at all).
    fn member_users(&self, spec: &UplinkSpec) -> std::collections::BTreeMap<String, String> {
        spec.members
            .iter()
            .filter_map(|m| self.iface_user(m).map(|u| (m.clone(), u)))
            .collect()
    }

    pub fn uplink_add(&mut self, spec: &UplinkSpec) -> Result<()> {
        let users = self.member_users(spec);
        self.uplinks
            .add(&mut self.dp, spec, &|m: &str| users.get(m).cloned())
    }

    pub fn uplink_del(&mut self, name: &str) -> Result<()> {
        let riders = self.riders(name);
        self.uplinks.del(&mut self.dp, name, &riders)
    }

    /// What applying `want` changes: groups to add, to remove, to change
    /// in place.
    pub fn uplinks_plan(
        &self,
        want: &[UplinkSpec],
    ) -> (Vec<String>, Vec<String>, Vec<crate::config::UplinkChange>) {
        let have = &self.uplinks.groups;
        let added = want
            .iter()
            .filter(|w| !have.contains_key(&w.name))
            .map(|w| w.name.clone())
            .collect();
        let removed = have
            .keys()
            .filter(|n| !want.iter().any(|w| &w.name == *n))
            .cloned()
            .collect();
        let changed = want
            .iter()
            .filter_map(|w| {
                let g = have.get(&w.name)?;
                (g.spec != *w).then(|| crate::config::UplinkChange {
                    name: w.name.clone(),
                    changes: g.spec.changes_to(w),
                })
            })
            .collect();
        (added, removed, changed)
    }

    /// A group changed in place (`apply`): networks on it stay.
    pub fn uplink_update(&mut self, spec: &UplinkSpec) -> Result<()> {
        let users = self.member_users(spec);
        self.uplinks
            .update(&mut self.dp, spec, &|m: &str| users.get(m).cloned())
    }

    pub fn uplink_show(&self) -> Vec<UplinkInfo> {
        self.uplinks.show(&|g: &str| self.riders(g))
    }

    /// A link changed (or the poll came round): groups follow their
    /// members' carrier; each failover is logged and announced.
    pub fn uplinks_follow_carrier(&mut self) {
        if self.uplinks.groups.is_empty() {
            return;
        }
        for f in self.uplinks.follow_carrier(&mut self.dp) {
            let all = self.announcements(&f);
            let nas = self.neighbour_advertisements(&f);
            let mut sent = 0;
            for &m in &f.carriers {
                match crate::uplink::announce::send(m, &all, &nas) {
                    Ok(n) => sent += n,
                    Err(e) => log::warn!("uplink {}: announcing: {e:#}", f.group),
                }
            }
            eprintln!(
                "uplink {}: {}; announced {} MAC(s), {} IPv6 address(es) ({sent} frames)",
                f.group,
                f.what,
                all.len(),
                nas.len()
            );
        }
    }

    /// An unsolicited NA for each of the host's IPv6 addresses on the
    /// group (global and link-local). Guests' IPv6 addresses are not
    /// known to kvnet on a bridged network (no ND table); their MACs'
    /// announcements move them in the LAN's switch all the same.
    fn neighbour_advertisements(&self, f: &Failover) -> Vec<Vec<u8>> {
        let Some(g) = self.uplinks.groups.get(&f.group) else {
            return Vec::new();
        };
        crate::uplink::announce::ipv6_of(&f.group)
            .into_iter()
            .map(|a| crate::uplink::announce::unsolicited_na(g.mac, a))
            .collect()
    }

    /// The group's own MAC (with the host's address on it) and every MAC
    /// learned behind the networks riding it (with its address where kvnet
    /// knows it from ARP suppression's table).
    fn announcements(&mut self, f: &Failover) -> Vec<Announce> {
        let Some(g) = self.uplinks.groups.get(&f.group) else {
            return Vec::new();
        };
        let (group_ifindex, group_mac) = (g.ifindex, g.mac);
        let mut all = vec![Announce {
            mac: group_mac,
            ip: netdev::ipv4(&f.group).ok().flatten(),
        }];
        let ids: Vec<u32> = self
            .riders(&f.group)
            .iter()
            .filter_map(|n| self.nets.get(n).map(|n| n.id))
            .collect();
        if ids.is_empty() {
            return all;
        }
        let ips: Vec<([u8; 6], Ipv4Addr)> = self
            .dp
            .neigh()
            .map(|m| {
                m.iter()
                    .filter_map(|r| r.ok())
                    .filter(|(k, _)| ids.contains(&k.net_id))
                    .map(|(k, e)| (e.mac, Ipv4Addr::from(u32::from_be(k.ip))))
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(fdb) = self.dp.fdb() {
            for (k, e) in fdb.iter().filter_map(|r| r.ok()) {
                if !ids.contains(&k.net_id)
                    || e.ifindex == group_ifindex
                    || e.flags & FDB_F_HOST != 0
                {
                    continue;
                }
                let mac = crate::mac::Mac(k.mac);
                if all.iter().any(|a| a.mac == mac) {
                    continue;
                }
                let ip = ips.iter().find(|(m, _)| *m == k.mac).map(|(_, ip)| *ip);
                all.push(Announce { mac, ip });
            }
        }
        all
    }
}
