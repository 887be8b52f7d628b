//! Port VLAN configuration: parsing and validating VIDs and VID lists, and
//! what a configuration means for the datapath (memberships, tagging).
use std::{collections::BTreeMap, collections::BTreeSet, fmt};

use anyhow::{bail, Context, Result};
use kvnet_common::{VID_MAX, VID_MIN, VLAN_MODE_ACCESS, VLAN_MODE_NONE, VLAN_MODE_TRUNK};
use serde::{Deserialize, Serialize};

/// A port's VLAN configuration.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "lowercase")]
pub enum VlanCfg {
    /// No VLAN config: untagged frames only, VLAN 0.
    #[default]
    None,
    /// Untagged on the wire, member of one VLAN.
    Access { vid: u16 },
    /// 802.1Q-tagged frames of `vids`; untagged ones belong to `native`.
    Trunk {
        vids: BTreeSet<u16>,
        native: Option<u16>,
    },
}

/// How a port carries one VLAN's frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tagging {
    Untagged,
    Tagged,
}

impl fmt::Display for Tagging {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tagging::Untagged => "untagged",
            Tagging::Tagged => "tagged",
        })
    }
}

/// One VID, 1-4094.
pub fn parse_vid(s: &str) -> Result<u16> {
    let t = s.trim();
    let v: u32 = t
        .parse()
        .ok()
        .filter(|_| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit()))
        .with_context(|| format!("invalid VLAN id '{s}': expected a number from 1 to 4094"))?;
    check_vid(v)
}

fn check_vid(v: u32) -> Result<u16> {
    match v {
        0 => bail!("VLAN id 0 is not a VLAN (it marks priority-tagged frames): use 1-4094"),
        4095 => bail!("VLAN id 4095 is reserved: use 1-4094"),
        v if v < VID_MIN as u32 || v > VID_MAX as u32 => {
            bail!("VLAN id {v} is out of range: use 1-4094")
        }
        v => Ok(v as u16),
    }
}

/// A list of VIDs and ranges: `10,20,100-199`. Duplicates and overlapping
/// ranges are fine; an empty list, a reversed range or a bad VID is not.
pub fn parse_vid_list(s: &str) -> Result<BTreeSet<u16>> {
    let mut out = BTreeSet::new();
    if s.trim().is_empty() {
        bail!("empty VLAN list: give VLAN ids and ranges like 10,20,100-199");
    }
    for item in s.split(',') {
        let item = item.trim();
        if item.is_empty() {
            bail!("malformed VLAN list '{s}': empty item (use 10,20,100-199)");
        }
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (
                    parse_vid(a).with_context(|| format!("in VLAN list '{s}'"))?,
                    parse_vid(b).with_context(|| format!("in VLAN list '{s}'"))?,
                );
                if a > b {
                    bail!("malformed VLAN list '{s}': range {a}-{b} runs backwards");
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(parse_vid(item).with_context(|| format!("in VLAN list '{s}'"))?);
            }
        }
    }
    Ok(out)
}

/// `10,20,100-199` back from a set.
pub fn format_vid_list(vids: &BTreeSet<u16>) -> String {
    let mut parts = Vec::new();
    let mut it = vids.iter().copied().peekable();
    while let Some(start) = it.next() {
        let mut end = start;
        while it.peek() == Some(&(end + 1)) {
            end = it.next().unwrap();
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
    }
    parts.join(",")
}

/// The VLAN options of `port add` / `port set`, as given.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VlanArgs {
    #[serde(default)]
    pub vlan: Option<String>,
    #[serde(default)]
    pub trunk: Option<String>,
    #[serde(default)]
    pub native: Option<String>,
    /// Back to "no VLAN config".
    #[serde(default)]
    pub no_vlan: bool,
}

impl VlanArgs {
    pub fn is_empty(&self) -> bool {
        self.vlan.is_none() && self.trunk.is_none() && self.native.is_none() && !self.no_vlan
    }

    /// The configuration these options ask for.
    pub fn to_cfg(&self) -> Result<VlanCfg> {
        let given = [self.vlan.is_some(), self.trunk.is_some(), self.no_vlan];
        if given.iter().filter(|g| **g).count() > 1 {
            bail!("--vlan, --trunk and --no-vlan exclude each other: a port is an access port, a trunk, or neither");
        }
        if self.native.is_some() && self.trunk.is_none() {
            bail!("--native only applies to a trunk: give it with --trunk");
        }
        if let Some(v) = &self.vlan {
            return Ok(VlanCfg::Access { vid: parse_vid(v)? });
        }
        if let Some(t) = &self.trunk {
            let vids = parse_vid_list(t)?;
            let native = self
                .native
                .as_deref()
                .map(|n| parse_vid(n).context("native VLAN"))
                .transpose()?;
            return Ok(VlanCfg::Trunk { vids, native });
        }
        Ok(VlanCfg::None)
    }
}

impl VlanCfg {
    /// (vlan_mode, pvid, native_vid) for `PortConfig`.
    pub fn port_fields(&self) -> (u16, u16, u16) {
        match self {
            VlanCfg::None => (VLAN_MODE_NONE, 0, 0),
            VlanCfg::Access { vid } => (VLAN_MODE_ACCESS, *vid, 0),
            VlanCfg::Trunk { native, .. } => {
                (VLAN_MODE_TRUNK, native.unwrap_or(0), native.unwrap_or(0))
            }
        }
    }

    /// Every VLAN the port is in and how it carries it. The native VLAN
    /// goes untagged even when it is also in the trunk list.
    pub fn memberships(&self) -> BTreeMap<u16, Tagging> {
        let mut m = BTreeMap::new();
        match self {
            VlanCfg::None => {
                m.insert(0, Tagging::Untagged);
            }
            VlanCfg::Access { vid } => {
                m.insert(*vid, Tagging::Untagged);
            }
            VlanCfg::Trunk { vids, native } => {
                for v in vids {
                    m.insert(*v, Tagging::Tagged);
                }
                if let Some(n) = native {
                    m.insert(*n, Tagging::Untagged);
                }
            }
        }
        m
    }

    /// Whether the port is in VLAN `vid` (`memberships` without building
    /// the map: checked across every port of a network on each add).
    pub fn is_member(&self, vid: u16) -> bool {
        match self {
            VlanCfg::None => vid == 0,
            VlanCfg::Access { vid: v } => *v == vid,
            VlanCfg::Trunk { vids, native } => vids.contains(&vid) || *native == Some(vid),
        }
    }

    pub fn mode_name(&self) -> &'static str {
        match self {
            VlanCfg::None => "none",
            VlanCfg::Access { .. } => "access",
            VlanCfg::Trunk { .. } => "trunk",
        }
    }
}

impl fmt::Display for VlanCfg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VlanCfg::None => f.write_str("-"),
            VlanCfg::Access { vid } => write!(f, "access {vid}"),
            VlanCfg::Trunk { vids, native } => {
                write!(f, "trunk {}", format_vid_list(vids))?;
                if let Some(n) = native {
                    write!(f, " native {n}")?;
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vids() {
        assert_eq!(parse_vid("1").unwrap(), 1);
        assert_eq!(parse_vid(" 4094 ").unwrap(), 4094);
        for (bad, why) in [
            ("0", "priority-tagged"),
            ("4095", "reserved"),
            ("5000", "out of range"),
            ("99999999999", "invalid VLAN id"),
            ("-1", "invalid VLAN id"),
            ("+5", "invalid VLAN id"),
            ("ten", "invalid VLAN id"),
            ("", "invalid VLAN id"),
        ] {
            let e = format!("{:#}", parse_vid(bad).unwrap_err());
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn is_member_agrees_with_memberships() {
        let cfgs = [
            VlanCfg::None,
            VlanCfg::Access { vid: 10 },
            VlanCfg::Trunk {
                vids: [20, 30].into(),
                native: Some(5),
            },
            VlanCfg::Trunk {
                vids: [20].into(),
                native: None,
            },
        ];
        for cfg in &cfgs {
            for vid in [0, 5, 10, 20, 30, 40] {
                assert_eq!(
                    cfg.is_member(vid),
                    cfg.memberships().contains_key(&vid),
                    "{cfg:?} {vid}"
                );
            }
        }
    }

    #[test]
    fn lists_and_ranges() {
        let l = parse_vid_list("10,20,100-199").unwrap();
        assert_eq!(l.len(), 102);
        assert!(l.contains(&10) && l.contains(&100) && l.contains(&199) && !l.contains(&200));
        assert_eq!(format_vid_list(&l), "10,20,100-199");
        assert_eq!(
            parse_vid_list(" 5 , 3-4,4,1-1").unwrap(),
            [1, 3, 4, 5].into()
        );
        assert_eq!(format_vid_list(&[1, 3, 4, 5].into()), "1,3-5");
        assert_eq!(parse_vid_list("1-4094").unwrap().len(), 4094);
        for bad in [
            "",
            "10,",
            ",10",
            "10,,20",
            "10-",
            "-10",
            "20-10",
            "0-5",
            "4090-4095",
            "1-2-3",
            "10;20",
            "a-b",
            "5000",
        ] {
            assert!(parse_vid_list(bad).is_err(), "{bad:?} accepted");
        }
        let e = format!("{:#}", parse_vid_list("10,4095").unwrap_err());
        assert!(e.contains("4095") && e.contains("'10,4095'"), "{e}");
    }

    #[test]
    fn args_to_cfg() {
        let a = |vlan: Option<&str>, trunk: Option<&str>, native: Option<&str>| VlanArgs {
            vlan: vlan.map(Into::into),
            trunk: trunk.map(Into::into),
            native: native.map(Into::into),
            no_vlan: false,
        };
        assert_eq!(
            a(Some("10"), None, None).to_cfg().unwrap(),
            VlanCfg::Access { vid: 10 }
        );
        assert_eq!(a(None, None, None).to_cfg().unwrap(), VlanCfg::None);
        let t = a(None, Some("10,20"), Some("1")).to_cfg().unwrap();
        assert_eq!(
            t,
            VlanCfg::Trunk {
                vids: [10, 20].into(),
                native: Some(1)
            }
        );
        assert_eq!(t.to_string(), "trunk 10,20 native 1");
        assert_eq!(t.port_fields(), (VLAN_MODE_TRUNK, 1, 1));
        let m = t.memberships();
        assert_eq!(m[&1], Tagging::Untagged);
        assert_eq!(m[&10], Tagging::Tagged);
        assert!(a(Some("10"), Some("20"), None).to_cfg().is_err());
        assert!(a(Some("10"), None, Some("1")).to_cfg().is_err());
        assert!(a(None, None, Some("1")).to_cfg().is_err());
        assert!(a(None, Some("10"), Some("0")).to_cfg().is_err());
        let mut n = a(Some("10"), None, None);
        n.no_vlan = true;
        assert!(n.to_cfg().is_err());
        assert_eq!(VlanCfg::None.memberships(), [(0, Tagging::Untagged)].into());
    }
}
