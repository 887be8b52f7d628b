//! Port policy in the maps: isolation (a port flag and a flood-set bit),
//! storm control and rate limits (map `port_policy`), and the addresses ARP
//! suppression answers for (map `neigh`).
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use kvnet_common::{
    burst_for, ByteBucket, NeighEntry, NeighKey, PortPolicy, DEFAULT_STORM_PPS, PORT_F_ISOLATED,
    PORT_F_RATE_LIMITED, PORT_F_XDP_TX,
};

use super::{network::PortRole, Switch};
use crate::{control::Hook, mac::Mac, policy::PolicyArgs, rate::Rate};

/// What a port gets once its network's defaults are filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Effective {
    pub isolated: bool,
    pub rate_in: Option<Rate>,
    pub rate_out: Option<Rate>,
    /// Floods a second (0: no limit).
    pub storm_pps: u32,
}

impl Effective {
    pub fn limited(&self) -> bool {
        self.rate_in.is_some() || self.rate_out.is_some()
    }

    /// The port flags this policy sets on `flags`: isolation, rate limits
    /// (which also keep XDP from redirecting into the port past the egress
    /// program).
    pub fn flags(&self, mut flags: u32) -> u32 {
        if self.isolated {
            flags |= PORT_F_ISOLATED;
        }
        if self.rate_in.is_some() {
            flags &= !PORT_F_XDP_TX;
        }
        if self.limited() {
            flags |= PORT_F_RATE_LIMITED;
        }
        flags
    }

    fn entry(&self) -> PortPolicy {
        let bucket = |r: Option<Rate>| {
            r.map_or(ByteBucket::default(), |r| {
                let rate = r.bytes_per_sec();
                let burst = burst_for(rate);
                ByteBucket {
                    rate,
                    burst,
                    tokens: burst,
                    last_ns: 0,
                }
            })
        };
        PortPolicy {
            storm_pps: self.storm_pps,
            storm_tokens: self.storm_pps,
            storm_last_ns: 0,
            rate_out: bucket(self.rate_out),
            rate_in: bucket(self.rate_in),
        }
    }
}

impl Switch {
    /// The port's own policy over its network's defaults. Only guest ports
    /// are isolated, limited and storm-controlled: the gateway and uplinks
    /// carry everyone's traffic.
    pub(crate) fn effective_policy(
        &self,
        net: &str,
        role: PortRole,
        own: &PolicyArgs,
        hook: Hook,
    ) -> Result<Effective> {
        if role != PortRole::Guest {
            return Ok(Effective::default());
        }
        let opts = &self.net(net)?.opts;
        let defaults = &opts.port_policy;
        let e = Effective {
            isolated: own.isolated || defaults.isolated,
            rate_in: own.rate_in.or(defaults.rate_in),
            rate_out: own.rate_out.or(defaults.rate_out),
            storm_pps: opts.storm_pps.unwrap_or(DEFAULT_STORM_PPS),
        };
        if e.limited() && hook == Hook::Xdp {
            bail!("rate limits are enforced by the tc hook: drop --hook xdp or the rate limits");
        }
        Ok(e)
    }

    pub(crate) fn write_policy(&mut self, ifindex: u32, e: &Effective) -> Result<()> {
        if *e == Effective::default() {
            let _ = self.dp.port_policy()?.remove(&ifindex);
            return Ok(());
        }
        self.dp
            .port_policy()?
            .insert(ifindex, e.entry(), 0)
            .context("writing the port policy map")
    }

    pub(crate) fn remove_policy(&mut self, ifindex: u32) {
        if let Ok(mut m) = self.dp.port_policy() {
            let _ = m.remove(&ifindex);
        }
    }

    /// ARP suppression answers `ip` in (network, VLAN) with `mac`, owned by
    /// the port `ifindex`.
    pub(crate) fn neigh_add(
        &mut self,
        net_id: u32,
        vid: u16,
        ip: Ipv4Addr,
        mac: Mac,
        ifindex: u32,
    ) -> Result<()> {
        self.dp
            .neigh()?
            .insert(
                NeighKey {
                    net_id,
                    vid,
                    _pad: 0,
                    ip: u32::from(ip).to_be(),
                },
                NeighEntry {
                    mac: mac.0,
                    _pad: 0,
                    ifindex,
                },
                0,
            )
            .context("writing the neighbour map")
    }

    /// Forgets the addresses `doomed` picks (a port's, a network's).
    pub(crate) fn neigh_flush(&mut self, doomed: impl Fn(&NeighKey, &NeighEntry) -> bool) {
        if let Ok(mut m) = self.dp.neigh() {
            super::remove_where(&mut m, doomed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_flags_and_buckets() {
        let e = Effective {
            isolated: true,
            rate_in: Some(Rate(8_000_000)),
            rate_out: None,
            storm_pps: 100,
        };
        let f = e.flags(PORT_F_XDP_TX);
        assert_eq!(
            f & PORT_F_XDP_TX,
            0,
            "no XDP redirects past the egress limit"
        );
        assert_ne!(f & PORT_F_ISOLATED, 0);
        assert_ne!(f & PORT_F_RATE_LIMITED, 0);
        let p = e.entry();
        assert_eq!(p.rate_in.rate, 1_000_000);
        assert_eq!(p.rate_in.tokens, p.rate_in.burst, "starts full");
        assert_eq!(p.rate_out.rate, 0, "no limit out");
        assert_eq!((p.storm_pps, p.storm_tokens), (100, 100));
        assert_eq!(Effective::default().flags(0), 0);
    }
}
