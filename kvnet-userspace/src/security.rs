//! Port security as the operator states it (`--mac`, `--ip`, `--max-macs`,
//! `--no-port-security`) and as the datapath holds it: the bindings in the
//! port's map entry, which the datapath extends (sticky MACs, addresses
//! snooped from DHCP replies) and the daemon keeps across rewrites.
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};
use kvnet_common::{
    PortConfig, DEFAULT_MAX_MACS, PORT_F_GUARDED, PORT_F_IP_GUARD, PORT_F_TRUSTED, PORT_IPS,
    PORT_MACS,
};
use serde::{Deserialize, Serialize};

use crate::mac::Mac;

/// What `port add` (and a config file's port) says about port security.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
pub struct SecurityArgs {
    /// The guest's MAC(s), comma-separated; without it the first MAC the
    /// port sends from becomes its own (sticky).
    #[arg(long, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac: Vec<String>,
    /// IPv4 addresses the guest may send from, besides what kvnet's DHCP
    /// hands it.
    #[arg(long, value_delimiter = ',')]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip: Vec<String>,
    /// How many source MACs the port may own (default 1, at most 4).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_macs: Option<u8>,
    /// Turn port security off for this port: it may send from any MAC and
    /// address (DHCP server messages stay refused unless --trusted).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_port_security: bool,
}

/// Validated [`SecurityArgs`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Security {
    pub guarded: bool,
    pub macs: Vec<Mac>,
    pub ips: Vec<Ipv4Addr>,
    pub max_macs: u8,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            guarded: true,
            macs: Vec::new(),
            ips: Vec::new(),
            max_macs: DEFAULT_MAX_MACS,
        }
    }
}

impl SecurityArgs {
    pub fn validate(&self) -> Result<Security> {
        if self.no_port_security {
            if !self.mac.is_empty() || !self.ip.is_empty() || self.max_macs.is_some() {
                bail!("--no-port-security turns the guard off; drop --mac, --ip and --max-macs");
            }
            return Ok(Security {
                guarded: false,
                ..Security::default()
            });
        }
        let mut macs: Vec<Mac> = Vec::new();
        for s in &self.mac {
            let m: Mac = s.trim().parse()?;
            if m.0[0] & 1 != 0 || m.0 == [0; 6] {
                bail!("--mac {m}: a guest's MAC is unicast and not zero");
            }
            if !macs.contains(&m) {
                macs.push(m);
            }
        }
        let mut ips: Vec<Ipv4Addr> = Vec::new();
        for s in &self.ip {
            let ip: Ipv4Addr = s.trim().parse().with_context(|| {
                format!("invalid --ip '{s}': expected an IPv4 address like 192.0.2.10")
            })?;
            if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
                bail!("--ip {ip}: a guest's address is a unicast address");
            }
            if !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        if macs.len() > PORT_MACS {
            bail!("--mac: at most {PORT_MACS} MACs per port");
        }
        if ips.len() > PORT_IPS {
            bail!("--ip: at most {PORT_IPS} addresses per port");
        }
        let max_macs = match self.max_macs {
            Some(0) => bail!("--max-macs 0 would refuse every frame; use 1-{PORT_MACS}"),
            Some(n) if n as usize > PORT_MACS => {
                bail!("--max-macs {n}: at most {PORT_MACS} (or --no-port-security)")
            }
            Some(n) if (n as usize) < macs.len() => {
                bail!("--max-macs {n} is less than the {} MACs given", macs.len())
            }
            Some(n) => n,
            None => DEFAULT_MAX_MACS.max(macs.len() as u8),
        };
        Ok(Security {
            guarded: true,
            macs,
            ips,
            max_macs,
        })
    }
}

impl Security {
    /// Back to what an operator writes (for save and restart).
    pub fn args(&self) -> SecurityArgs {
        SecurityArgs {
            mac: self.macs.iter().map(|m| m.to_string()).collect(),
            ip: self.ips.iter().map(|ip| ip.to_string()).collect(),
            max_macs: (self.guarded
                && self.max_macs != DEFAULT_MAX_MACS.max(self.macs.len() as u8))
            .then_some(self.max_macs),
            no_port_security: !self.guarded,
        }
    }

    /// Writes the security part of `pc`: flags, limits and bindings. What
    /// the datapath added to `old` (sticky MACs, snooped addresses) is kept
    /// as far as the new limits allow. `dhcp`: kvnet serves DHCP on the
    /// port's network, so every address a guest may use is known.
    pub fn fill(&self, pc: &mut PortConfig, old: Option<&PortConfig>, dhcp: bool) {
        pc.flags &= !(PORT_F_GUARDED | PORT_F_IP_GUARD);
        pc.max_macs = 0;
        pc.mac_count = 0;
        pc.macs = [[0; 6]; PORT_MACS];
        pc.ips = [0; PORT_IPS];
        (pc.ip_count, pc.ip_next, pc.ip_fixed) = (0, 0, 0);
        if !self.guarded {
            return;
        }
        // A trusted port (the gateway) keeps its MACs owned, unguarded.
        let trusted = pc.flags & PORT_F_TRUSTED != 0;
        if !trusted {
            pc.flags |= PORT_F_GUARDED;
        }
        if !trusted && (dhcp || !self.ips.is_empty()) {
            pc.flags |= PORT_F_IP_GUARD;
        }
        pc.max_macs = self.max_macs;
        let given = self.macs.iter().map(|m| m.0);
        let sticky = old.into_iter().flat_map(|o| o.owned_macs().iter().copied());
        let mut n = 0;
        for m in given.chain(sticky) {
            if n < self.max_macs as usize && n < PORT_MACS && !pc.macs[..n].contains(&m) {
                pc.macs[n] = m;
                n += 1;
            }
        }
        pc.mac_count = n as u8;
        let fixed = self.ips.iter().map(|ip| u32::from(*ip).to_be());
        let snooped = old.into_iter().flat_map(|o| {
            o.bound_ips()
                .iter()
                .enumerate()
                .filter(|(i, _)| *i >= o.ip_fixed as usize)
                .map(|(_, ip)| *ip)
        });
        let mut n = 0;
        for (i, ip) in fixed
            .map(|ip| (true, ip))
            .chain(snooped.map(|ip| (false, ip)))
        {
            if n < PORT_IPS && !pc.ips[..n].contains(&ip) {
                pc.ips[n] = ip;
                n += 1;
                if i {
                    pc.ip_fixed = n as u8;
                }
            }
        }
        pc.ip_count = n as u8;
        pc.ip_next = n as u8;
    }
}

/// `kvnet port show`: a port's protection and what it is bound to.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PortSecurityInfo {
    pub iface: String,
    pub net: String,
    /// "mac+ip", "mac", "off" or "trusted".
    pub security: String,
    pub max_macs: u8,
    pub macs: Vec<String>,
    pub ips: Vec<String>,
    /// The MACs map `mac_owners` gives this port (network-wide).
    #[serde(default)]
    pub owned: Vec<String>,
    /// Why the protection is what it is, in a sentence.
    pub note: String,
}

impl PortSecurityInfo {
    pub fn of(iface: &str, net: &str, pc: &PortConfig, role_trusted: bool) -> Self {
        let macs = pc
            .owned_macs()
            .iter()
            .map(|m| Mac(*m).to_string())
            .collect();
        let ips = pc
            .bound_ips()
            .iter()
            .map(|ip| Ipv4Addr::from(u32::from_be(*ip)).to_string())
            .collect();
        let (security, note) = if role_trusted || pc.flags & PORT_F_TRUSTED != 0 {
            (
                "trusted",
                "trusted port (uplink, gateway or --trusted): learns any MAC, may serve DHCP",
            )
        } else if pc.flags & PORT_F_GUARDED == 0 {
            (
                "off",
                "PORT SECURITY OFF (--no-port-security): this guest may spoof MACs and addresses",
            )
        } else if pc.flags & PORT_F_IP_GUARD != 0 || pc.ip_count != 0 {
            (
                "mac+ip",
                "MACs and IPv4 sources bound (from --mac/--ip, first sight and DHCP)",
            )
        } else {
            ("mac", "MAC guard only: kvnet has no source of this guest's addresses (no kvnet DHCP, no --ip)")
        };
        PortSecurityInfo {
            iface: iface.to_string(),
            net: net.to_string(),
            security: security.into(),
            max_macs: pc.max_macs,
            macs,
            ips,
            owned: Vec::new(),
            note: note.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(mac: &[&str], ip: &[&str], max: Option<u8>) -> SecurityArgs {
        SecurityArgs {
            mac: mac.iter().map(|s| s.to_string()).collect(),
            ip: ip.iter().map(|s| s.to_string()).collect(),
            max_macs: max,
            no_port_security: false,
        }
    }

    #[test]
    fn bad_input_is_refused_with_the_reason() {
        let e = |a: SecurityArgs| format!("{:#}", a.validate().unwrap_err());
        assert!(e(args(&["01:00:5e:00:00:01"], &[], None)).contains("unicast"));
        assert!(e(args(&["52:54:00"], &[], None)).contains("invalid MAC"));
        assert!(e(args(&[], &["10.0.0.300"], None)).contains("invalid --ip"));
        assert!(e(args(&[], &[], Some(0))).contains("--max-macs 0"));
        assert!(e(args(&[], &[], Some(9))).contains("at most 4"));
        assert!(e(args(
            &["52:54:00:00:00:01", "52:54:00:00:00:02"],
            &[],
            Some(1)
        ))
        .contains("less than"));
        let mut off = args(&["52:54:00:00:00:01"], &[], None);
        off.no_port_security = true;
        assert!(e(off).contains("--no-port-security"));
    }

    #[test]
    fn fill_keeps_what_the_datapath_learned_within_the_limits() {
        let sec = args(&["52:54:00:00:00:01"], &["192.0.2.5"], Some(2))
            .validate()
            .unwrap();
        let mut old = PortConfig::default();
        old.macs[0] = [2, 0, 0, 0, 0, 9];
        old.macs[1] = [2, 0, 0, 0, 0, 8];
        old.mac_count = 2;
        old.ips[0] = u32::from(Ipv4Addr::new(192, 0, 2, 5)).to_be();
        old.ips[1] = u32::from(Ipv4Addr::new(192, 0, 2, 77)).to_be();
        (old.ip_count, old.ip_fixed) = (2, 1);
        let mut pc = PortConfig::default();
        sec.fill(&mut pc, Some(&old), false);
        assert_eq!(pc.flags, PORT_F_GUARDED | PORT_F_IP_GUARD);
        assert_eq!(
            pc.owned_macs(),
            &[[0x52, 0x54, 0, 0, 0, 1], [2, 0, 0, 0, 0, 9]]
        );
        assert_eq!(pc.bound_ips().len(), 2);
        assert_eq!((pc.ip_fixed, pc.ip_next), (1, 2));
        // No port security: no flags, no bindings.
        let mut pc = PortConfig::default();
        Security {
            guarded: false,
            ..Security::default()
        }
        .fill(&mut pc, Some(&old), true);
        assert_eq!((pc.flags, pc.mac_count, pc.ip_count), (0, 0, 0));
        // kvnet's DHCP: the IP guard holds before the first lease.
        let mut pc = PortConfig::default();
        Security::default().fill(&mut pc, None, true);
        assert_eq!(pc.flags, PORT_F_GUARDED | PORT_F_IP_GUARD);
        assert_eq!(pc.max_macs, 1);
    }
}
