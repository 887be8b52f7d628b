//! What an uplink group is (`kvnet uplink add`, `[[uplinks]]`): a pure
//! model (it reads no host state), shared by the control protocol and the
//! config file.
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How a group spreads its traffic over its members (bonding's modes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum UplinkMode {
    /// One member carries everything; another takes over when it fails.
    ActiveBackup,
    /// A flow hash picks the member (see --hash).
    BalanceXor,
    /// Members in turn, packet by packet.
    BalanceRr,
    /// Every frame out of every member.
    Broadcast,
    /// LACP (802.3ad, fast rate) with the switch: as balance-xor over the
    /// members the partner aggregates.
    #[serde(rename = "802.3ad")]
    #[value(name = "802.3ad")]
    Lacp,
}

impl UplinkMode {
    pub fn name(self) -> &'static str {
        match self {
            UplinkMode::ActiveBackup => "active-backup",
            UplinkMode::BalanceXor => "balance-xor",
            UplinkMode::BalanceRr => "balance-rr",
            UplinkMode::Broadcast => "broadcast",
            UplinkMode::Lacp => "802.3ad",
        }
    }
}

/// balance-xor's flow hash.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum UplinkHash {
    /// Source and destination MACs.
    #[default]
    L2,
    /// IPv4 addresses and TCP/UDP ports (MACs for other frames).
    L3l4,
}

/// Most members a group takes (the datapath's table).
pub const MAX_MEMBERS: usize = kvnet_common::MAX_UPLINK_MEMBERS;

/// `kvnet uplink add` and a config file's `[[uplinks]]` entry alike.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct UplinkSpec {
    /// The group's name: the interface networks name as `--uplink`.
    pub name: String,
    /// Member NICs, comma-separated (at most 8).
    #[arg(long, value_delimiter = ',', required = true)]
    pub members: Vec<String>,
    /// How traffic is spread over the members.
    #[arg(long)]
    pub mode: UplinkMode,
    /// balance-xor's flow hash (default l2).
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<UplinkHash>,
    /// active-backup: the member that carries traffic whenever it is up.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
    /// Also poll the members' carrier every MS milliseconds (netlink link
    /// events are followed anyway).
    #[arg(long, value_name = "MS")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub miimon: Option<u64>,
    /// ARP monitoring: probe these IPv4 addresses out of every member; a
    /// member whose link is up but hears no answer is out (comma-separated).
    #[arg(long, value_delimiter = ',', value_name = "IP")]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub arp_target: Vec<std::net::Ipv4Addr>,
    /// How often the ARP targets are probed (default 1000 ms); a member
    /// without an answer for 3 intervals is out.
    #[arg(long, value_name = "MS", requires = "arp_target")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arp_interval: Option<u64>,
}

impl UplinkSpec {
    /// What can be checked without looking at the host.
    pub fn check(&self) -> Result<()> {
        let n = &self.name;
        crate::netdev::check_ifname(n).context("uplink group name")?;
        if self.members.is_empty() {
            bail!("uplink group '{n}' needs at least one member (--members A,B)");
        }
        if self.members.len() > MAX_MEMBERS {
            bail!(
                "uplink group '{n}' has {} members; at most {MAX_MEMBERS}",
                self.members.len()
            );
        }
        for (i, m) in self.members.iter().enumerate() {
            if self.members[..i].contains(m) {
                bail!("uplink group '{n}': member '{m}' is listed twice");
            }
            if m == n {
                bail!("uplink group '{n}' cannot be its own member");
            }
        }
        if let Some(p) = &self.primary {
            if !self.members.contains(p) {
                bail!("uplink group '{n}': primary '{p}' is not one of its members");
            }
            if self.mode != UplinkMode::ActiveBackup {
                bail!("uplink group '{n}': --primary is for active-backup only");
            }
        }
        if self.hash.is_some() && !matches!(self.mode, UplinkMode::BalanceXor | UplinkMode::Lacp) {
            bail!("uplink group '{n}': --hash is for balance-xor and 802.3ad only");
        }
        if self.miimon == Some(0) {
            bail!("uplink group '{n}': miimon must be at least 1 ms");
        }
        if self.arp_interval == Some(0) {
            bail!("uplink group '{n}': arp-interval must be at least 1 ms");
        }
        if self.arp_interval.is_some() && self.arp_target.is_empty() {
            bail!("uplink group '{n}': arp-interval without arp-target");
        }
        if !self.arp_target.is_empty() && self.mode == UplinkMode::Lacp {
            bail!("uplink group '{n}': 802.3ad monitors its members by LACP; drop arp-target");
        }
        if self.arp_target.len() > MAX_ARP_TARGETS {
            bail!("uplink group '{n}': at most {MAX_ARP_TARGETS} arp targets");
        }
        Ok(())
    }

    /// How often the ARP targets are probed.
    pub fn arp_every(&self) -> Option<std::time::Duration> {
        (!self.arp_target.is_empty())
            .then(|| std::time::Duration::from_millis(self.arp_interval.unwrap_or(1000)))
    }
}

impl UplinkSpec {
    /// What changes from `self` to `new`, for `apply`'s plan.
    pub fn changes_to(&self, new: &UplinkSpec) -> Vec<String> {
        fn show<T: std::fmt::Debug>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or("-".into(), |v| format!("{v:?}").to_lowercase())
        }
        let mut c = Vec::new();
        if self.members != new.members {
            c.push(format!(
                "members {} -> {}",
                self.members.join(","),
                new.members.join(",")
            ));
        }
        if self.mode != new.mode {
            c.push(format!("mode {} -> {}", self.mode.name(), new.mode.name()));
        }
        if self.hash != new.hash {
            c.push(format!("hash {} -> {}", show(&self.hash), show(&new.hash)));
        }
        if self.primary != new.primary {
            c.push(format!(
                "primary {} -> {}",
                show(&self.primary),
                show(&new.primary)
            ));
        }
        if self.miimon != new.miimon {
            c.push(format!(
                "miimon {} -> {}",
                show(&self.miimon),
                show(&new.miimon)
            ));
        }
        if self.arp_target != new.arp_target || self.arp_interval != new.arp_interval {
            c.push("arp monitoring".into());
        }
        c
    }
}

/// As bonding's `arp_ip_target`.
pub const MAX_ARP_TARGETS: usize = 16;

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(members: &[&str]) -> UplinkSpec {
        UplinkSpec {
            name: "up0".into(),
            members: members.iter().map(|s| s.to_string()).collect(),
            mode: UplinkMode::ActiveBackup,
            hash: None,
            primary: None,
            miimon: None,
            arp_target: Vec::new(),
            arp_interval: None,
        }
    }

    #[test]
    fn uplink_spec_errors_name_the_problem() {
        assert!(spec(&["a", "b"]).check().is_ok());
        let e = spec(&[]).check().unwrap_err().to_string();
        assert!(e.contains("at least one member"), "{e}");
        let e = spec(&["a", "a"]).check().unwrap_err().to_string();
        assert!(e.contains("listed twice"), "{e}");
        let mut s = spec(&["a", "b"]);
        s.primary = Some("c".into());
        assert!(s
            .check()
            .unwrap_err()
            .to_string()
            .contains("not one of its members"));
        let mut s = spec(&["a", "b"]);
        s.hash = Some(UplinkHash::L3l4);
        assert!(s
            .check()
            .unwrap_err()
            .to_string()
            .contains("balance-xor and 802.3ad only"));
        let e = toml::from_str::<UplinkSpec>("name='u'\nmembers=['a']\nmode='lacp-ish'")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown variant"), "{e}");
        let s: UplinkSpec = toml::from_str(
            "name='u'\nmembers=['a','b']\nmode='active-backup'\narp_target=['192.0.2.100']\narp_interval=100",
        )
        .unwrap();
        assert!(s.check().is_ok());
        assert_eq!(s.arp_every(), Some(std::time::Duration::from_millis(100)));
        assert_eq!(
            toml::from_str::<UplinkSpec>(&toml::to_string(&s).unwrap()).unwrap(),
            s
        );
        let mut s = spec(&["a", "b"]);
        s.arp_interval = Some(100);
        assert!(s
            .check()
            .unwrap_err()
            .to_string()
            .contains("without arp-target"));
        s.arp_target = vec!["192.0.2.1".parse().unwrap()];
        s.mode = UplinkMode::Lacp;
        assert!(s.check().unwrap_err().to_string().contains("by LACP"));
    }
}
