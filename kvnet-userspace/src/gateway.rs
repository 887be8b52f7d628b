//! A network's gateway interface: a veth pair in the daemon's namespace.
//! The host end (`kvnet-NET`) carries the gateway address, so routes,
//! sockets and the DHCP/DNS servers see an ordinary interface; the other end
//! is an internal switch port, so the host is just another station on the
//! network's L2 segment.

use anyhow::{bail, Context, Result};

pub use crate::cidr::Cidr;

/// Per-interface IPv4 sysctl of the daemon's network namespace.
fn sysctl_path(iface: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{iface}/{key}")
}

pub use crate::host::{read_sysctl, write_sysctl};
use crate::rtnl;

#[derive(Debug)]
pub struct Gateway {
    pub host_if: String,
    pub port_if: String,
    pub cidr: Cidr,
}

impl Gateway {
    /// The default host interface name, if `kvnet-NET` fits IFNAMSIZ.
    pub fn default_name(net: &str) -> Result<String> {
        let name = format!("kvnet-{net}");
        if name.len() > 15 {
            bail!("gateway interface name '{name}' is longer than 15 characters: pick one with --gateway-iface");
        }
        Ok(name)
    }

    /// Creates the pair, addresses and brings it up; undoes itself on error.
    pub fn create(
        host_if: &str,
        net_id: u32,
        cidr: Cidr,
        forwarding: bool,
        mtu: Option<u16>,
    ) -> Result<Gateway> {
        if crate::netdev::ifindex(host_if).is_ok() {
            bail!("interface '{host_if}' already exists; choose another gateway interface name");
        }
        let port_if = format!("kvgw{net_id}");
        rtnl::link_add_veth(host_if, &port_if)
            .with_context(|| format!("creating the gateway interface {host_if}"))?;
        let gw = Gateway {
            host_if: host_if.to_string(),
            port_if,
            cidr,
        };
        let setup = (|| -> Result<()> {
            gw.set_mtu(mtu)?;
            rtnl::addr_add(host_if, cidr, false)?;
            rtnl::link_set_up(&gw.port_if)?;
            rtnl::link_set_up(host_if)?;
            gw.set_forwarding(forwarding)
        })();
        if let Err(e) = setup {
            gw.destroy();
            return Err(e);
        }
        Ok(gw)
    }

    /// Takes over an existing pair (a restarted daemon): makes sure of the
    /// address, links up and forwarding, without recreating anything.
    pub fn adopt(
        host_if: &str,
        net_id: u32,
        cidr: Cidr,
        forwarding: bool,
        mtu: Option<u16>,
    ) -> Result<Gateway> {
        let gw = Gateway {
            host_if: host_if.to_string(),
            port_if: format!("kvgw{net_id}"),
            cidr,
        };
        crate::netdev::ifindex(&gw.port_if)
            .with_context(|| format!("adopting gateway {host_if}: its peer is gone"))?;
        gw.set_mtu(mtu)?;
        rtnl::addr_add(host_if, cidr, true)?;
        rtnl::link_set_up(&gw.port_if)?;
        rtnl::link_set_up(host_if)?;
        gw.set_forwarding(forwarding)?;
        Ok(gw)
    }

    /// Both ends get the network's MTU (libvirt's `<mtu>`), so the host's
    /// packets to guests and the switch port agree on it; None leaves the
    /// kernel's default.
    fn set_mtu(&self, mtu: Option<u16>) -> Result<()> {
        if let Some(m) = mtu {
            for i in [&self.port_if, &self.host_if] {
                rtnl::link_set_mtu(i, m)?;
            }
        }
        Ok(())
    }

    /// Whether the host routes between this network and others (routed
    /// mode) or not (host-only).
    pub fn set_forwarding(&self, on: bool) -> Result<()> {
        write_sysctl(
            &sysctl_path(&self.host_if, "forwarding"),
            if on { "1" } else { "0" },
        )
    }

    /// Deleting one end deletes the pair, its address and routes.
    pub fn destroy(&self) {
        Self::remove(&self.host_if);
    }

    /// Deletes the gateway interface `host_if` (and its peer, the port).
    pub fn remove(host_if: &str) {
        // Gone already is fine: removal is best effort on teardown paths.
        if let Err(e) = rtnl::link_del(host_if) {
            if e.errno() != Some(nix::errno::Errno::ENODEV) {
                log::warn!("{e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn gateway_cidrs() {
        let c: Cidr = "192.168.122.1/24".parse().unwrap();
        assert_eq!(c.network(), Ipv4Addr::new(192, 168, 122, 0));
        assert_eq!(c.broadcast(), Ipv4Addr::new(192, 168, 122, 255));
        assert!(c.contains(Ipv4Addr::new(192, 168, 122, 200)));
        assert!(!c.contains(Ipv4Addr::new(192, 168, 123, 1)));
        for (bad, why) in [
            ("192.168.122.1", "needs a prefix"),
            ("192.168.122.1/0", "out of range"),
            ("192.168.122.1/32", "out of range"),
            ("192.168.122.0/24", "network or broadcast"),
            ("192.168.122.255/24", "network or broadcast"),
            ("300.1.1.1/24", "not an IPv4 address"),
            ("224.0.0.1/24", "cannot be a gateway"),
            ("10.0.0.1/x", "not a prefix"),
        ] {
            let e = bad.parse::<Cidr>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn default_names_fit_ifnamsiz() {
        assert_eq!(Gateway::default_name("default").unwrap(), "kvnet-default");
        assert!(Gateway::default_name("averyverylongname").is_err());
    }
}
