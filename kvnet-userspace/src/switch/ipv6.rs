//! A network's IPv6 side on the switch: the gateway's addresses and
//! forwarding, the routed uplink's IPv6 forwarding, the RA/DHCPv6/DNS
//! servers, and what `net show` says about them.
use anyhow::{Context, Result};
use kvnet_common::{V6Owner, V6OwnerKey};

use crate::{
    control::Ipv6Info,
    ipv6::{self, savi, V6Plan},
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

/// FCFS SAVI, the daemon's part (see `ipv6::savi`).
impl Switch {
    /// Binds to a port of a SLAAC network what is its before it sends
    /// anything: the EUI-64 addresses of its configured MACs, the static
    /// DHCPv6 hosts of those MACs and, on the gateway port, the gateway's
    /// addresses. A binding a guest claimed by use goes to this port.
    pub(crate) fn bind_v6_port(
        &mut self,
        net: &str,
        ifindex: u32,
        macs: &[crate::mac::Mac],
        gateway: bool,
    ) -> Result<()> {
        let n = self.net(net)?;
        let (net_id, opts) = (n.id, n.opts.clone());
        if opts.gateway6.is_empty() {
            return Ok(());
        }
        let gateways: Vec<ipv6::Prefix6> = opts
            .gateway6
            .iter()
            .filter_map(|g| g.parse().ok())
            .collect();
        let mut addrs = Vec::new();
        for m in macs {
            addrs.extend(savi::eui64_addresses(&gateways, m.0));
            for h in opts
                .dhcp6_hosts
                .iter()
                .filter_map(|h| ipv6::parse_host6(h).ok())
            {
                if h.mac == *m {
                    addrs.push(h.ip);
                }
            }
        }
        if gateway {
            addrs.extend(gateways.iter().map(|g| g.addr));
        }
        let mut owners = self.dp.v6_owners()?;
        for a in addrs {
            let key = V6OwnerKey {
                net_id,
                addr: a.octets(),
            };
            owners
                .insert(key, savi::daemon_binding(ifindex), 0)
                .with_context(|| format!("binding {a} to its port"))?;
        }
        Ok(())
    }

    /// Forgets every IPv6 address the port owned (with the port).
    pub(crate) fn drop_v6_owners(&mut self, ifindex: u32) {
        if let Ok(mut owners) = self.dp.v6_owners() {
            let mine: Vec<V6OwnerKey> = owners
                .iter()
                .filter_map(|r| r.ok())
                .filter(|(_, o)| o.ifindex == ifindex)
                .map(|(k, _)| k)
                .collect();
            for k in mine {
                let _ = owners.remove(&k);
            }
        }
        let _ = self.dp.v6_claims().map(|mut c| c.remove(&ifindex));
    }

    /// Releases claims idle for `V6_OWNER_IDLE_NS` (privacy addresses
    /// rotate) and recounts each port's claims (the datapath only counts
    /// up). How many were released.
    pub fn age_v6_owners(&mut self) -> Result<usize> {
        let now = crate::host::monotonic_ns();
        let mut owners = self.dp.v6_owners()?;
        let all: Vec<(V6OwnerKey, V6Owner)> = owners.iter().filter_map(|r| r.ok()).collect();
        let mut released = 0;
        for (k, o) in &all {
            if savi::idle(o, now) && owners.remove(k).is_ok() {
                released += 1;
            }
        }
        let counts = savi::claims(
            all.iter()
                .filter(|(_, o)| !savi::idle(o, now))
                .map(|(_, o)| o),
        );
        let mut claims = self.dp.v6_claims()?;
        let counted: Vec<u32> = claims.keys().filter_map(|k| k.ok()).collect();
        for p in counted.iter().filter(|p| !counts.contains_key(p)) {
            let _ = claims.remove(p);
        }
        for (p, n) in counts {
            let _ = claims.insert(p, n, 0);
        }
        Ok(released)
    }
}
