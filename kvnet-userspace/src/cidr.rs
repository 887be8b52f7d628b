//! An IPv4 interface address with its prefix: what a gateway carries and
//! netlink writes (below both, so neither imports the other).
use std::{fmt, net::Ipv4Addr, str::FromStr};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// An IPv4 interface address with prefix, e.g. 192.168.122.1/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cidr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    pub fn mask(&self) -> u32 {
        if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - self.prefix)
        }
    }
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & self.mask())
    }
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) | !self.mask())
    }
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = anyhow::Error;
    /// A gateway address: a usable host address of a subnet between /8 and
    /// /30 (a /0 or /32 "gateway" serves nobody).
    fn from_str(s: &str) -> Result<Self> {
        let (a, p) = s
            .split_once('/')
            .with_context(|| format!("gateway '{s}' needs a prefix, like 192.168.122.1/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .with_context(|| format!("gateway '{s}': '{a}' is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .with_context(|| format!("gateway '{s}': '{p}' is not a prefix length"))?;
        if !(8..=30).contains(&prefix) {
            bail!("gateway '{s}': prefix /{prefix} is out of range (use /8 to /30)");
        }
        let c = Cidr { addr, prefix };
        if addr.is_multicast() || addr.is_loopback() || addr.is_unspecified() || addr.is_broadcast()
        {
            bail!("gateway '{s}': {addr} cannot be a gateway address");
        }
        if addr == c.network() || addr == c.broadcast() {
            bail!("gateway '{s}': {addr} is the subnet's network or broadcast address");
        }
        Ok(c)
    }
}
