//! A network's IPv6 side on the switch: the gateway's addresses and
//! forwarding, the routed uplink's IPv6 forwarding, the RA/DHCPv6/DNS
//! servers, and what `net show` says about them.
use anyhow::Result;

use crate::{
    control::Ipv6Info,
    ipv6::{self, V6Plan},
    switch::{
        journal::{self, Undo},
        network::Restore,
        Switch,
    },
};

impl Switch {
    /// Puts `plan` on the network's gateway interface; a routed network's
    /// uplink forwards IPv6 to it (restored when its last network goes).
    pub(crate) fn build_v6(&mut self, name: &str, plan: &V6Plan) -> Result<()> {
        ipv6::setup_gateway(plan)?;
        let uplink = self.net(name)?.uplink.clone();
        if let (true, Some(u)) = (plan.router, uplink) {
            if let (Some(path), Some(up)) = (
                ipv6::uplink_forwarding_path(&u),
                self.routed_uplinks.get_mut(&u),
            ) {
                let old = crate::host::read_sysctl(&path)?;
                if old != "1" {
                    let r = Restore::Sysctl {
                        path: path.clone(),
                        old,
                    };
                    journal::record(Undo::Setting(r.clone()))?;
                    crate::host::write_sysctl(&path, "1")?;
                    up.restore.push(r);
                }
            }
        }
        Ok(())
    }

    /// `net show`'s IPv6 part (None without `--gateway6`).
    pub(crate) fn ipv6_info(&self, name: &str) -> Option<Ipv6Info> {
        let opts = &self.net(name).ok()?.opts;
        if opts.gateway6.is_empty() {
            return None;
        }
        Some(Ipv6Info {
            gateways: opts.gateway6.clone(),
            dhcp6_range: opts.dhcp6_range.clone(),
            dhcp6_hosts: opts.dhcp6_hosts.clone(),
            leases: self.services.leases6(name).unwrap_or_default(),
            servers: self.services.stats6(name).unwrap_or_default(),
        })
    }
}
