//! A network's IPv6 side on the switch: the gateway's addresses and
//! forwarding, the routed uplink's IPv6 forwarding, the RA/DHCPv6/DNS
//! servers, and what `net show` says about them.
use anyhow::Result;

use crate::{
    control::Ipv6Info,
    ipv6::{self, V6Plan},
    switch::{network::set_sysctl_path, Switch},
};

impl Switch {
    /// Puts `plan` on the network's gateway interface; a routed network's
    /// uplink forwards IPv6 (restored when its last network goes): through
    /// the host (`force_forwarding`) and in the fast path (the FIB helper
    /// wants `forwarding` on the interface a packet came in on). The host
    /// keeps taking router advertisements on it (`accept_ra` 1 -> 2).
    pub(crate) fn build_v6(&mut self, name: &str, plan: &V6Plan) -> Result<()> {
        ipv6::setup_gateway(plan)?;
        let uplink = self.net(name)?.uplink.clone();
        let (true, Some(u)) = (plan.router, uplink) else {
            return Ok(());
        };
        let Some(up) = self.routed_uplinks.get_mut(&u) else {
            return Ok(());
        };
        let conf = |key: &str| format!("/proc/sys/net/ipv6/conf/{u}/{key}");
        if crate::host::read_sysctl(&conf("accept_ra"))? == "1" {
            set_sysctl_path(&conf("accept_ra"), "2", &mut up.restore)?;
        }
        set_sysctl_path(&conf("forwarding"), "1", &mut up.restore)?;
        if let Some(path) = ipv6::uplink_forwarding_path(&u) {
            set_sysctl_path(&path, "1", &mut up.restore)?;
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
