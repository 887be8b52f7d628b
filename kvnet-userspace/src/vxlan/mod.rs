//! VXLAN overlays: a network's `--vxlan VNI --vtep-local ADDR [--vtep-dev
//! IF] [--remote A,B]` options, checked into a plan, and what `net show`
//! and `fdb show` say of them. The switch builds them (`switch/vxlan.rs`).
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use kvnet_common::{MAX_VTEPS, VXLAN_OVERHEAD};
use serde::{Deserialize, Serialize};

/// The host's VTEP device, shared by every VXLAN network.
pub const VTEP_IFACE: &str = "kvnet-vtep";
/// VNIs are 24 bits.
pub const MAX_VNI: u32 = (1 << 24) - 1;
/// The underlay MTU assumed when no `--vtep-dev` names the NIC.
pub const DEFAULT_UNDERLAY_MTU: u16 = 1500;

/// A network's VXLAN settings, as given (CLI, config file
/// `[networks.NAME.vxlan]`, state).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VxlanOpts {
    pub vni: u32,
    /// This host's VTEP address (the outer source).
    pub vtep_local: String,
    /// The underlay NIC (optional: the route to each remote decides).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vtep_dev: Option<String>,
    /// Static peers: remote VTEP addresses floods are replicated to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<String>,
}

/// [`VxlanOpts`] checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub vni: u32,
    pub local: Ipv4Addr,
    pub dev: Option<String>,
    pub remotes: Vec<Ipv4Addr>,
}

impl VxlanOpts {
    pub fn plan(&self) -> Result<Plan> {
        if self.vni == 0 || self.vni > MAX_VNI {
            bail!("VNI {} is out of range (1-{MAX_VNI})", self.vni);
        }
        let local: Ipv4Addr = self.vtep_local.parse().with_context(|| {
            format!("--vtep-local '{}' is not an IPv4 address", self.vtep_local)
        })?;
        if local.is_unspecified() || local.is_multicast() || local.is_broadcast() {
            bail!("--vtep-local {local} is not a unicast address");
        }
        let mut remotes: Vec<Ipv4Addr> = Vec::new();
        for r in &self.remotes {
            let ip: Ipv4Addr = r
                .trim()
                .parse()
                .with_context(|| format!("--remote '{r}' is not an IPv4 address"))?;
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                bail!("--remote {ip} is not a unicast address");
            }
            if ip == local {
                bail!("--remote {ip} is this host's own VTEP (--vtep-local)");
            }
            if !remotes.contains(&ip) {
                remotes.push(ip);
            }
        }
        if remotes.len() > MAX_VTEPS {
            bail!("at most {MAX_VTEPS} remote VTEPs per network");
        }
        if let Some(d) = &self.vtep_dev {
            crate::netdev::check_ifname(d).context("--vtep-dev")?;
        }
        Ok(Plan {
            vni: self.vni,
            local,
            dev: self.vtep_dev.clone(),
            remotes,
        })
    }
}

impl VxlanOpts {
    /// The MTU guests get when the network names none: the underlay's
    /// (`vtep_dev`'s, else 1500) less the VXLAN headers.
    pub fn default_mtu(&self) -> Result<u16> {
        let underlay = match &self.vtep_dev {
            Some(d) => crate::netdev::mtu(d)?,
            None => DEFAULT_UNDERLAY_MTU,
        };
        Ok(overlay_mtu(underlay))
    }
}

/// The guests' MTU on an overlay whose underlay carries `underlay` bytes:
/// the outer headers must fit, the outer packet is never fragmented.
pub fn overlay_mtu(underlay: u16) -> u16 {
    underlay.saturating_sub(VXLAN_OVERHEAD)
}

/// `net show`'s VXLAN part.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VxlanInfo {
    pub vni: u32,
    pub vtep_local: Ipv4Addr,
    pub vtep_dev: Option<String>,
    /// The VTEP device (kvnet-vtep).
    pub vtep_iface: String,
    /// Static peers floods are replicated to.
    pub remotes: Vec<Ipv4Addr>,
    /// The MTU guests must keep to (DHCP option 26 when kvnet serves DHCP).
    pub mtu: Option<u16>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(vni: u32, local: &str, remotes: &[&str]) -> VxlanOpts {
        VxlanOpts {
            vni,
            vtep_local: local.into(),
            vtep_dev: None,
            remotes: remotes.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn vxlan_plans_check_vni_addresses_and_peers() {
        let p = opts(100, "10.0.0.1", &["10.0.0.2", " 10.0.0.3", "10.0.0.2"])
            .plan()
            .unwrap();
        assert_eq!(
            p.remotes,
            [
                "10.0.0.2".parse::<Ipv4Addr>().unwrap(),
                "10.0.0.3".parse().unwrap()
            ]
        );
        assert!(opts(0, "10.0.0.1", &[]).plan().is_err());
        assert!(opts(MAX_VNI + 1, "10.0.0.1", &[]).plan().is_err());
        assert!(opts(1, "nope", &[]).plan().is_err());
        assert!(opts(1, "10.0.0.1", &["10.0.0.1"]).plan().is_err());
        assert!(opts(1, "10.0.0.1", &["224.0.0.1"]).plan().is_err());
        assert_eq!(overlay_mtu(1500), 1450);
    }
}
