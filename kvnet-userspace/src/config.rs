//! Networks as configuration: the TOML file (`/etc/kvnet/kvnet.toml`), its
//! validation (errors name file, line and column), the diff between a file
//! and the running daemon, and applying only that diff. Also the port rules
//! that let hypervisor taps join by name (`vnet*`, `tap-web-*`), used by
//! `kvnet ifup` and by the daemon's netlink watcher.
//!
//! How the file and the CLI relate (as `virsh net-define` vs `net-start`):
//! the file is the definition; `kvnet daemon` starts from it and `kvnet
//! apply FILE` (or SIGHUP) makes the running state what the file says,
//! touching only what differs. CLI changes (`net add`, `port add`, ...) are
//! runtime-only until `kvnet save` writes the running state back to the
//! file the daemon last started from or applied.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{anyhow, bail, Context, Result};
use serde::{de::Error as _, Deserialize, Deserializer, Serialize};

use crate::{
    control::{Hook, Mode, NetOpts, VlanArgs},
    gateway::{Cidr, Gateway},
    mac::Mac,
    netdev,
    network::PortRole,
    security::SecurityArgs,
    switch::{validate_net_name, Switch, DEFAULT_AGEING},
    vlan::{self, VlanCfg},
};

pub const DEFAULT_CONFIG: &str = "/etc/kvnet/kvnet.toml";

// ---------------------------------------------------------------- schema

/// The whole file.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub networks: BTreeMap<String, Checked<NetSection>>,
    /// Interfaces attached by name (like `kvnet port add`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<Checked<PortSection>>,
    /// Interfaces attached when they appear, by a glob on their name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Checked<RuleSection>>,
}

/// A section checked as a whole after it parsed (so the error carries
/// the section's position).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(transparent)]
pub struct Checked<T>(pub T);

pub trait Check {
    fn check(&self) -> Result<(), String>;
}

impl<'de, T: Deserialize<'de> + Check> Deserialize<'de> for Checked<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = T::deserialize(d)?;
        v.check().map_err(D::Error::custom)?;
        Ok(Checked(v))
    }
}

impl<T> std::ops::Deref for Checked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSection {
    /// isolated, host-only, routed, bridged (nat once the datapath has it).
    #[serde(default = "isolated", deserialize_with = "de_mode")]
    pub mode: String,
    /// Gateway address with prefix, e.g. 192.168.122.1/24.
    #[serde(
        default,
        deserialize_with = "de_cidr",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_ifname",
        skip_serializing_if = "Option::is_none"
    )]
    pub gateway_iface: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_ifname",
        skip_serializing_if = "Option::is_none"
    )]
    pub uplink: Option<String>,
    /// Seconds before an idle learned MAC is forgotten.
    #[serde(
        default,
        deserialize_with = "de_ageing",
        skip_serializing_if = "Option::is_none"
    )]
    pub ageing: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpSection>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatSection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<ForwardSection>,
}

fn isolated() -> String {
    "isolated".into()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpSection {
    /// First and last address handed out.
    pub start: Ipv4Addr,
    pub end: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<DhcpHost>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DhcpHost {
    #[serde(deserialize_with = "de_mac")]
    pub mac: String,
    pub ip: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// Source ports used for translated flows: [first, last].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<[u16; 2]>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardSection {
    /// tcp or udp.
    pub proto: String,
    /// The host port.
    pub port: u16,
    /// GUEST-IP:PORT.
    pub to: String,
}

/// `[[ports]]`: one interface attached by name.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSection {
    #[serde(deserialize_with = "de_ifname_req")]
    pub iface: String,
    // (not a flattened Attach: flattening loses the values' positions)
    pub net: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hairpin: bool,
    /// May answer DHCP (a DHCP server guest).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted: bool,
    /// Port security: the guest's MAC(s), extra IPv4 sources, MAC limit,
    /// or off (see `kvnet port add --help`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_macs: Option<u8>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_port_security: bool,
    /// Access VLAN.
    #[serde(
        default,
        deserialize_with = "de_vid",
        skip_serializing_if = "Option::is_none"
    )]
    pub vlan: Option<u16>,
    /// Trunk VLANs: "10,20,100-199" or [10, 20].
    #[serde(
        default,
        deserialize_with = "de_vid_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub trunk: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_vid",
        skip_serializing_if = "Option::is_none"
    )]
    pub native: Option<u16>,
}

/// `[[rules]]`: interfaces whose name matches `match` (a glob).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSection {
    #[serde(rename = "match", deserialize_with = "de_glob")]
    pub pattern: String,
    pub net: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hook: Option<Hook>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub hairpin: bool,
    /// May answer DHCP (a DHCP server guest).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub trusted: bool,
    /// Port security: the guest's MAC(s), extra IPv4 sources, MAC limit,
    /// or off (see `kvnet port add --help`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mac: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_macs: Option<u8>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub no_port_security: bool,
    /// Access VLAN.
    #[serde(
        default,
        deserialize_with = "de_vid",
        skip_serializing_if = "Option::is_none"
    )]
    pub vlan: Option<u16>,
    /// Trunk VLANs: "10,20,100-199" or [10, 20].
    #[serde(
        default,
        deserialize_with = "de_vid_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub trunk: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_vid",
        skip_serializing_if = "Option::is_none"
    )]
    pub native: Option<u16>,
}

macro_rules! attach_of {
    ($t:ty) => {
        impl $t {
            pub fn attach(&self) -> Attach {
                Attach {
                    net: self.net.clone(),
                    hook: self.hook,
                    hairpin: self.hairpin,
                    trusted: self.trusted,
                    vlan: self.vlan,
                    trunk: self.trunk.clone(),
                    native: self.native,
                    security: SecurityArgs {
                        mac: self.mac.clone(),
                        ip: self.ip.clone(),
                        max_macs: self.max_macs,
                        no_port_security: self.no_port_security,
                    },
                }
            }
        }
    };
}
attach_of!(PortSection);
attach_of!(RuleSection);

/// Where and how an interface joins.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Attach {
    pub net: String,
    pub hook: Option<Hook>,
    pub hairpin: bool,
    pub trusted: bool,
    /// Access VLAN.
    pub vlan: Option<u16>,
    /// Trunk VLANs: "10,20,100-199" or [10, 20].
    pub trunk: Option<String>,
    pub native: Option<u16>,
    pub security: SecurityArgs,
}

impl Attach {
    pub fn vlan_args(&self) -> VlanArgs {
        VlanArgs {
            vlan: self.vlan.map(|v| v.to_string()),
            trunk: self.trunk.clone(),
            native: self.native.map(|v| v.to_string()),
            no_vlan: false,
        }
    }
    pub(crate) fn spec(&self) -> PortSpec {
        PortSpec {
            net: self.net.clone(),
            hook: self.hook.unwrap_or(Hook::Auto),
            hairpin: self.hairpin,
            trusted: self.trusted,
            vlan: self.vlan_args().to_cfg().unwrap_or_default(),
            security: self.security.clone(),
        }
    }
}

impl Attach {
    fn check(&self) -> Result<()> {
        self.vlan_args().to_cfg()?;
        self.security.validate()?;
        Ok(())
    }
}

impl Check for PortSection {
    fn check(&self) -> Result<(), String> {
        self.attach()
            .check()
            .map_err(|e| format!("port '{}': {e:#}", self.iface))
    }
}

impl Check for RuleSection {
    fn check(&self) -> Result<(), String> {
        self.attach()
            .check()
            .map_err(|e| format!("rule '{}': {e:#}", self.pattern))
    }
}

fn mode_of(s: &str) -> Option<Mode> {
    <Mode as clap::ValueEnum>::from_str(s, false).ok()
}

impl Check for NetSection {
    fn check(&self) -> Result<(), String> {
        let m = self.mode.as_str();
        let gw = self.gateway.is_some();
        let routes = matches!(m, "host-only" | "routed" | "nat");
        if !routes && gw {
            return Err(format!("a {m} network has no gateway; drop `gateway`"));
        }
        if routes && !gw {
            return Err(format!("mode {m} needs `gateway = \"ADDRESS/PREFIX\"`"));
        }
        if m == "nat" && self.uplink.is_none() {
            return Err(
                "mode nat needs `uplink = \"IFACE\"` (the NIC to masquerade behind)".into(),
            );
        }
        if matches!(m, "isolated" | "host-only") && self.uplink.is_some() {
            return Err(format!("a {m} network has no uplink; drop `uplink`"));
        }
        if m == "bridged" && self.uplink.is_none() {
            return Err("mode bridged needs `uplink` (the NIC the guests share)".into());
        }
        if self.gateway_iface.is_some() && !gw {
            return Err("`gateway_iface` needs `gateway`".into());
        }
        if let Some(d) = &self.dhcp {
            let Some(cidr) = self.gateway.as_deref().and_then(|g| g.parse::<Cidr>().ok()) else {
                return Err("`dhcp` needs a gateway (mode host-only, routed or nat)".into());
            };
            for (what, ip) in [("start", d.start), ("end", d.end)] {
                if !cidr.contains(ip) {
                    return Err(format!(
                        "dhcp {what} {ip} is outside the gateway's subnet {cidr}"
                    ));
                }
            }
            if u32::from(d.start) > u32::from(d.end) {
                return Err(format!("dhcp range {}-{} runs backwards", d.start, d.end));
            }
            for h in &d.hosts {
                if !cidr.contains(h.ip) {
                    return Err(format!(
                        "dhcp host {} ({}) is outside the gateway's subnet {cidr}",
                        h.ip, h.mac
                    ));
                }
            }
        }
        if (self.nat.is_some() || !self.forwards.is_empty()) && m != "nat" {
            return Err(format!("`nat` and `forwards` need mode nat, not {m}"));
        }
        if let Some(NatSection {
            port_range: Some([a, b]),
        }) = &self.nat
        {
            if a > b || *a == 0 {
                return Err(format!("nat port_range [{a}, {b}] is not a range of ports"));
            }
        }
        let mut keys = BTreeSet::new();
        for f in &self.forwards {
            if !matches!(f.proto.as_str(), "tcp" | "udp") {
                return Err(format!("forward proto '{}': use tcp or udp", f.proto));
            }
            if f.port == 0 {
                return Err("forward port 0 cannot be forwarded".into());
            }
            let Ok(to) = f.to.parse::<std::net::SocketAddrV4>() else {
                return Err(format!("forward to '{}': use GUEST-IP:PORT", f.to));
            };
            if to.port() == 0 {
                return Err(format!("forward to '{}': port 0", f.to));
            }
            if let Some(cidr) = self.gateway.as_deref().and_then(|g| g.parse::<Cidr>().ok()) {
                let a = *to.ip();
                if !cidr.contains(a)
                    || a == cidr.addr
                    || a == cidr.network()
                    || a == cidr.broadcast()
                {
                    return Err(format!(
                        "forward to '{}': {a} is not a guest address of {cidr}",
                        f.to
                    ));
                }
            }
            if !keys.insert((f.proto.clone(), f.port)) {
                return Err(format!("{} port {} is forwarded twice", f.proto, f.port));
            }
        }
        Ok(())
    }
}

fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if mode_of(&s).is_some() || s == "nat" {
        return Ok(s);
    }
    Err(D::Error::custom(format!(
        "unknown mode '{s}': use isolated, host-only, routed, bridged or nat"
    )))
}

fn de_cidr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<Cidr>()
        .map_err(|e| D::Error::custom(format!("{e:#}")))?;
    Ok(Some(s))
}

fn check_ifname(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 15 || s.contains(['/', ' ', ':']) || s == "." || s == ".." {
        return Err(format!(
            "invalid interface name '{s}': 1-15 characters, no '/', ':' or spaces"
        ));
    }
    Ok(())
}

fn de_ifname_req<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_ifname(&s).map_err(D::Error::custom)?;
    Ok(s)
}

fn de_ifname<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    de_ifname_req(d).map(Some)
}

fn de_glob<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() || s.len() > 64 || s.contains(['/', ' ']) {
        return Err(D::Error::custom(format!(
            "invalid rule pattern '{s}': a glob on interface names, like vnet* or tap-web-?"
        )));
    }
    Ok(s)
}

fn de_ageing<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(D::Error::custom("ageing must be at least 1 second")),
        s => Ok(Some(s)),
    }
}

fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<Mac>()
        .map_err(|e| D::Error::custom(format!("{e:#}")))?;
    Ok(s.to_ascii_lowercase())
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumOrStr {
    Num(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ListOrStr {
    List(Vec<i64>),
    Str(String),
}

fn de_vid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let s = match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => n.to_string(),
        NumOrStr::Str(s) => s,
    };
    vlan::parse_vid(&s)
        .map(Some)
        .map_err(|e| D::Error::custom(format!("{e:#}")))
}

fn de_vid_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = match ListOrStr::deserialize(d)? {
        ListOrStr::List(l) => l
            .iter()
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join(","),
        ListOrStr::Str(s) => s,
    };
    let set = vlan::parse_vid_list(&s).map_err(|e| D::Error::custom(format!("{e:#}")))?;
    Ok(Some(vlan::format_vid_list(&set)))
}

// ------------------------------------------------------------ parsing

/// A shell-style glob: `*`, `?` and `[abc]`/`[a-z]` classes.
pub fn glob_match(pat: &str, s: &str) -> bool {
    fn m(p: &[char], s: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('*') => (0..=s.len()).any(|i| m(&p[1..], &s[i..])),
            Some('?') => !s.is_empty() && m(&p[1..], &s[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|c| *c == ']').map(|i| i + 2) else {
                    return s.first() == Some(&'[') && m(&p[1..], &s[1..]);
                };
                let Some(c) = s.first() else { return false };
                let class = &p[1..close];
                let (neg, class) = match class.first() {
                    Some('!') | Some('^') => (true, &class[1..]),
                    _ => (false, class),
                };
                let mut hit = false;
                let mut i = 0;
                while i < class.len() {
                    if i + 2 < class.len() && class[i + 1] == '-' {
                        hit |= class[i] <= *c && *c <= class[i + 2];
                        i += 3;
                    } else {
                        hit |= class[i] == *c;
                        i += 1;
                    }
                }
                hit != neg && m(&p[close + 1..], &s[1..])
            }
            Some(c) => s.first() == Some(c) && m(&p[1..], &s[1..]),
        }
    }
    let p: Vec<char> = pat.chars().collect();
    let s: Vec<char> = s.chars().collect();
    m(&p, &s)
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// The line of the first line of `text` that starts with `prefix`.
fn line_of(text: &str, needle: &str) -> Option<usize> {
    text.lines()
        .position(|l| l.trim_start().starts_with(needle))
        .map(|i| i + 1)
}

/// Parses and validates a config file's text. Errors read
/// `FILE:LINE:COLUMN: reason`.
pub fn parse(file: &str, text: &str) -> Result<Config> {
    let cfg: Config = toml::from_str(text).map_err(|e| {
        let reason = e.message().trim().to_string();
        match e.span() {
            Some(span) => {
                let (l, c) = line_col(text, span.start);
                anyhow!("{file}:{l}:{c}: {reason}")
            }
            None => anyhow!("{file}: {reason}"),
        }
    })?;
    let at = |needle: String| match line_of(text, &needle)
        .or_else(|| line_of(text, &needle.replacen("[networks.", "[networks.\"", 1)))
    {
        Some(l) => format!("{file}:{l}:1"),
        None => file.to_string(),
    };
    for name in cfg.networks.keys() {
        validate_net_name(name).map_err(|e| anyhow!("{}: {e:#}", at(net_header(name))))?;
    }
    // Across sections: overlaps, references, duplicates.
    let nets: Vec<(&String, Cidr)> = cfg
        .networks
        .iter()
        .filter_map(|(n, s)| Some((n, s.gateway.as_deref()?.parse::<Cidr>().ok()?)))
        .collect();
    for (i, (a, ca)) in nets.iter().enumerate() {
        for (b, cb) in &nets[i + 1..] {
            if ca.contains(cb.addr) || cb.contains(ca.addr) {
                bail!(
                    "{}: gateway {cb} of network '{b}' overlaps network '{a}' ({ca})",
                    at(net_header(b))
                );
            }
        }
    }
    let mut owned: BTreeMap<String, String> = BTreeMap::new();
    for (n, s) in &cfg.networks {
        let gw_if = match (&s.gateway, &s.gateway_iface) {
            (Some(_), Some(i)) => Some(i.clone()),
            (Some(_), None) => Gateway::default_name(n).ok(),
            _ => None,
        };
        for i in gw_if.into_iter().chain(s.uplink.clone()) {
            if s.mode == "routed" && Some(&i) == s.uplink.as_ref() {
                continue; // routed networks may share an uplink
            }
            if let Some(other) = owned.insert(i.clone(), n.clone()) {
                bail!(
                    "{}: interface '{i}' is used by networks '{other}' and '{n}'",
                    at(net_header(n))
                );
            }
        }
    }
    let mut seen = BTreeSet::new();
    for p in &cfg.ports {
        let here = at(format!("iface = \"{}\"", p.iface));
        if !cfg.networks.contains_key(&p.attach().net) {
            bail!(
                "{here}: port '{}' names network '{}', which the file does not define",
                p.iface,
                p.attach().net
            );
        }
        if !seen.insert(p.iface.clone()) {
            bail!("{here}: port '{}' is listed twice", p.iface);
        }
        if let Some(n) = owned.get(&p.iface) {
            bail!(
                "{here}: '{}' is an interface of network '{n}', not a guest port",
                p.iface
            );
        }
    }
    for r in &cfg.rules {
        if !cfg.networks.contains_key(&r.attach().net) {
            bail!(
                "{}: rule '{}' names network '{}', which the file does not define",
                at(format!("match = \"{}\"", r.pattern)),
                r.pattern,
                r.attach().net
            );
        }
    }
    Ok(cfg)
}

fn net_header(name: &str) -> String {
    format!("[networks.{name}")
}

pub fn load(path: &Path) -> Result<Config> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse(&path.display().to_string(), &text)
}

/// What the daemon cannot apply from a valid file (nothing, today: NAT
/// port ranges and forwards are applied too).
pub fn warnings(cfg: &Config) -> Vec<String> {
    let mut w = Vec::new();
    for (n, s) in &cfg.networks {
        if mode_of(&s.mode).is_none() {
            w.push(format!(
                "network '{n}': mode {} is not in this kvnet build; the network is skipped",
                s.mode
            ));
        }
    }
    w
}

/// "tcp/8080" -> "192.168.122.13:80": a network's forwards, comparable.
type Forwards = BTreeMap<String, String>;

fn forward_key(proto: &str, port: u16) -> String {
    format!("{proto}/{port}")
}

// ---------------------------------------------------- desired vs running

/// A network as the switch builds it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetSpec {
    pub mode: String,
    pub gateway: Option<String>,
    pub gateway_iface: Option<String>,
    pub uplink: Option<String>,
    pub ageing: u64,
    /// DHCP settings (from the options the network was created with).
    pub dhcp: Option<DhcpSection>,
    /// NAT networks: the source port range (default filled in).
    pub nat_ports: Option<[u16; 2]>,
    /// NAT networks: port forwards.
    pub forwards: Forwards,
}

impl NetSpec {
    fn of(name: &str, s: &NetSection) -> NetSpec {
        let gateway = s
            .gateway
            .as_deref()
            .and_then(|g| g.parse::<Cidr>().ok())
            .map(|c| c.to_string());
        NetSpec {
            mode: s.mode.clone(),
            gateway_iface: match &gateway {
                Some(_) => s
                    .gateway_iface
                    .clone()
                    .or_else(|| Gateway::default_name(name).ok()),
                None => None,
            },
            gateway,
            uplink: s.uplink.clone(),
            ageing: s.ageing.unwrap_or(DEFAULT_AGEING.as_secs()),
            dhcp: s.dhcp.clone(),
            nat_ports: (s.mode == "nat").then(|| {
                s.nat
                    .as_ref()
                    .and_then(|n| n.port_range)
                    .unwrap_or([crate::nat::DEFAULT_PORTS.0, crate::nat::DEFAULT_PORTS.1])
            }),
            forwards: s
                .forwards
                .iter()
                .map(|f| (forward_key(&f.proto, f.port), f.to.clone()))
                .collect(),
        }
    }

    fn opts(&self) -> Option<NetOpts> {
        Some(NetOpts {
            mode: mode_of(&self.mode)?,
            gateway: self.gateway.clone(),
            gateway_iface: self.gateway_iface.clone(),
            uplink: self.uplink.clone(),
            dhcp_range: self.dhcp.as_ref().map(|d| format!("{},{}", d.start, d.end)),
            dhcp_hosts: self
                .dhcp
                .iter()
                .flat_map(|d| &d.hosts)
                .map(|h| match &h.name {
                    Some(n) => format!("{},{},{n}", h.mac, h.ip),
                    None => format!("{},{}", h.mac, h.ip),
                })
                .collect(),
            domain: self.dhcp.as_ref().and_then(|d| d.domain.clone()),
            dhcp_lease: self.dhcp.as_ref().and_then(|d| d.lease_secs),
            nat_ports: self.nat_ports.map(|[a, b]| format!("{a}-{b}")),
        })
    }

    /// What differs, and whether only live-changeable settings do.
    fn changes(&self, new: &NetSpec) -> (Vec<String>, bool) {
        let mut c = Vec::new();
        let f = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        if self.mode != new.mode {
            c.push(format!("mode {} -> {}", self.mode, new.mode));
        }
        if self.gateway != new.gateway {
            c.push(format!(
                "gateway {} -> {}",
                f(&self.gateway),
                f(&new.gateway)
            ));
        }
        if self.gateway_iface != new.gateway_iface {
            c.push(format!(
                "gateway_iface {} -> {}",
                f(&self.gateway_iface),
                f(&new.gateway_iface)
            ));
        }
        if self.uplink != new.uplink {
            c.push(format!("uplink {} -> {}", f(&self.uplink), f(&new.uplink)));
        }
        if self.dhcp != new.dhcp {
            c.push("dhcp settings".into());
        }
        if self.nat_ports != new.nat_ports {
            let f = |p: Option<[u16; 2]>| p.map_or("-".into(), |[a, b]| format!("{a}-{b}"));
            c.push(format!(
                "nat ports {} -> {}",
                f(self.nat_ports),
                f(new.nat_ports)
            ));
        }
        let live = c.is_empty();
        if self.ageing != new.ageing {
            c.push(format!("ageing {} -> {}", self.ageing, new.ageing));
        }
        // Forwards change live (a recreated network gets all of them anew).
        for (k, old) in &self.forwards {
            if new.forwards.get(k) != Some(old) {
                c.push(format!("- forward {k} -> {old}"));
            }
        }
        for (k, to) in &new.forwards {
            if self.forwards.get(k) != Some(to) {
                c.push(format!("+ forward {k} -> {to}"));
            }
        }
        (c, live)
    }
}

/// Whether two ways of writing port security mean the same (MAC case and
/// separators, a default limit spelled out): a rewrite that changes nothing
/// must not re-attach the port and lose what it learned.
fn same_security(a: &SecurityArgs, b: &SecurityArgs) -> bool {
    match (a.validate(), b.validate()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// A guest port as the switch attaches it.
#[derive(Debug, Clone, PartialEq)]
pub struct PortSpec {
    pub net: String,
    pub hook: Hook,
    pub hairpin: bool,
    pub trusted: bool,
    pub vlan: VlanCfg,
    pub security: SecurityArgs,
}

impl fmt::Display for PortSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.net)?;
        if self.vlan != VlanCfg::None {
            write!(f, " ({})", self.vlan)?;
        }
        if self.hook != Hook::Auto {
            write!(f, " hook {:?}", self.hook)?;
        }
        if self.hairpin {
            f.write_str(" hairpin")?;
        }
        if self.trusted {
            f.write_str(" trusted")?;
        }
        if self.security.no_port_security {
            f.write_str(" no-port-security")?;
        }
        Ok(())
    }
}

impl PortSpec {
    fn vlan_args(&self) -> VlanArgs {
        let mut a = VlanArgs::default();
        match &self.vlan {
            VlanCfg::None => {}
            VlanCfg::Access { vid } => a.vlan = Some(vid.to_string()),
            VlanCfg::Trunk { vids, native } => {
                a.trunk = Some(vlan::format_vid_list(vids));
                a.native = native.map(|n| n.to_string());
            }
        }
        a
    }
    pub(crate) fn attach(&self) -> Attach {
        let a = self.vlan_args();
        Attach {
            net: self.net.clone(),
            hook: (self.hook != Hook::Auto).then_some(self.hook),
            hairpin: self.hairpin,
            trusted: self.trusted,
            vlan: a.vlan.and_then(|v| v.parse().ok()),
            trunk: a.trunk,
            native: a.native.and_then(|v| v.parse().ok()),
            security: self.security.clone(),
        }
    }
}

/// What the daemon remembers besides the switch: where its file is, the
/// last applied file (pass-through settings, rules) and which ports joined
/// dynamically (by rule or `kvnet ifup`).
#[derive(Default)]
pub struct Runtime {
    pub source: Option<PathBuf>,
    pub applied: Config,
    /// Ports attached by a rule or ifup; `None`: by a rule (follows it),
    /// `Some`: by `kvnet ifup` with explicit settings (kept as they are).
    pub dynamic: BTreeMap<String, Option<PortSpec>>,
}

pub static RUNTIME: Mutex<Option<Runtime>> = Mutex::new(None);

pub(crate) fn with_rt<T>(f: impl FnOnce(&mut Runtime) -> T) -> T {
    let mut g = RUNTIME.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(Runtime::default))
}

/// The interfaces of the daemon's network namespace (via netlink, so the
/// namespace of the process, not of the mounted /sys).
fn interfaces() -> Vec<String> {
    nix::net::if_::if_nameindex()
        .map(|l| {
            l.iter()
                .map(|i| i.name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// How `iface` should be attached under `cfg`: a static port first, then
/// the first rule whose glob matches.
pub fn wanted(cfg: &Config, iface: &str) -> Option<(PortSpec, bool)> {
    if let Some(p) = cfg.ports.iter().find(|p| p.iface == iface) {
        return Some((p.attach().spec(), false));
    }
    cfg.rules
        .iter()
        .find(|r| glob_match(&r.pattern, iface))
        .map(|r| (r.attach().spec(), true))
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct NetChange {
    pub name: String,
    pub changes: Vec<String>,
    /// Rebuilt (deleted and added again), or changed live.
    pub recreate: bool,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PortChange {
    pub iface: String,
    pub from: String,
    pub to: String,
    /// VLAN change done live (`port set`), or re-attached.
    pub live: bool,
}

/// The diff between the running daemon and a file.
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Plan {
    pub networks_added: Vec<String>,
    pub networks_removed: Vec<String>,
    pub networks_changed: Vec<NetChange>,
    /// (iface, "net (vlan)")
    pub ports_added: Vec<(String, String)>,
    pub ports_removed: Vec<String>,
    pub ports_changed: Vec<PortChange>,
    /// Static ports whose interface does not exist yet: attached when it appears.
    pub ports_pending: Vec<String>,
    pub rules_added: Vec<String>,
    pub rules_removed: Vec<String>,
    pub warnings: Vec<String>,
    pub applied: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.networks_added.is_empty()
            && self.networks_removed.is_empty()
            && self.networks_changed.is_empty()
            && self.ports_added.is_empty()
            && self.ports_removed.is_empty()
            && self.ports_changed.is_empty()
            && self.rules_added.is_empty()
            && self.rules_removed.is_empty()
    }

    pub fn render(&self) -> String {
        let mut o = String::new();
        for n in &self.networks_added {
            o += &format!("+ network {n}\n");
        }
        for n in &self.networks_removed {
            o += &format!("- network {n}\n");
        }
        for c in &self.networks_changed {
            let how = if c.recreate { "recreated" } else { "live" };
            o += &format!("~ network {}: {} ({how})\n", c.name, c.changes.join(", "));
        }
        for (i, to) in &self.ports_added {
            o += &format!("+ port {i} -> {to}\n");
        }
        for i in &self.ports_removed {
            o += &format!("- port {i}\n");
        }
        for c in &self.ports_changed {
            let how = if c.live { "live" } else { "re-attached" };
            o += &format!("~ port {}: {} -> {} ({how})\n", c.iface, c.from, c.to);
        }
        for i in &self.ports_pending {
            o += &format!("  port {i}: interface absent, attached when it appears\n");
        }
        for r in &self.rules_added {
            o += &format!("+ rule {r}\n");
        }
        for r in &self.rules_removed {
            o += &format!("- rule {r}\n");
        }
        if self.is_empty() {
            o += "no changes\n";
        }
        o
    }
}

/// A network's DHCP settings as a config section, from its options.
fn dhcp_of(o: &NetOpts) -> Option<DhcpSection> {
    let (a, b) = o.dhcp_range.as_deref()?.split_once(',')?;
    Some(DhcpSection {
        start: a.trim().parse().ok()?,
        end: b.trim().parse().ok()?,
        lease_secs: o.dhcp_lease,
        domain: o.domain.clone(),
        hosts: o
            .dhcp_hosts
            .iter()
            .filter_map(|h| {
                let mut it = h.split(',').map(str::trim);
                Some(DhcpHost {
                    mac: it.next()?.to_ascii_lowercase(),
                    ip: it.next()?.parse().ok()?,
                    name: it.next().filter(|n| !n.is_empty()).map(Into::into),
                })
            })
            .collect(),
    })
}

fn running_nets(sw: &Switch, _rt: &Runtime) -> BTreeMap<String, NetSpec> {
    sw.nets
        .iter()
        .map(|(name, n)| {
            let proto = |p: u8| {
                if p == kvnet_common::IPPROTO_UDP {
                    "udp"
                } else {
                    "tcp"
                }
            };
            (
                name.clone(),
                NetSpec {
                    mode: n.mode.to_string(),
                    gateway: n.gateway.as_ref().map(|g| g.cidr.to_string()),
                    gateway_iface: n.gateway.as_ref().map(|g| g.host_if.clone()),
                    uplink: n.uplink.clone(),
                    ageing: n.ageing.as_secs(),
                    dhcp: dhcp_of(&n.opts),
                    nat_ports: n.nat.as_ref().map(|s| [s.ports.0, s.ports.1]),
                    forwards: n
                        .nat
                        .iter()
                        .flat_map(|s| &s.forwards)
                        .map(|((p, port), (a, to))| {
                            (forward_key(proto(*p), *port), format!("{a}:{to}"))
                        })
                        .collect(),
                },
            )
        })
        .collect()
}

pub(crate) fn running_ports(sw: &Switch) -> BTreeMap<String, PortSpec> {
    sw.ports
        .iter()
        .filter(|(_, p)| p.role == PortRole::Guest)
        .map(|(i, p)| {
            (
                i.clone(),
                PortSpec {
                    net: p.net.clone(),
                    hook: p.hook,
                    hairpin: p.hairpin,
                    trusted: p.trusted,
                    vlan: p.vlan.clone(),
                    security: p.security.args(),
                },
            )
        })
        .collect()
}

fn rule_label(r: &RuleSection) -> String {
    format!("{} -> {}", r.pattern, r.attach().spec())
}

/// The file's ports, for the interfaces that exist: static ones and those a
/// rule matches; plus ports that joined by `kvnet ifup` with explicit settings.
fn desired_ports(
    cfg: &Config,
    rt: &Runtime,
    nets: &BTreeMap<String, NetSpec>,
) -> (BTreeMap<String, PortSpec>, Vec<String>) {
    let present: BTreeSet<String> = interfaces().into_iter().collect();
    let mut want = BTreeMap::new();
    let mut pending = Vec::new();
    for p in &cfg.ports {
        if present.contains(&p.iface) {
            want.insert(p.iface.clone(), p.attach().spec());
        } else {
            pending.push(p.iface.clone());
        }
    }
    let owned: BTreeSet<String> = nets
        .values()
        .flat_map(|n| n.gateway_iface.iter().chain(n.uplink.iter()).cloned())
        .collect();
    for iface in &present {
        if want.contains_key(iface) || owned.contains(iface) || iface.starts_with("kvnet") {
            continue;
        }
        if let Some((spec, _)) = wanted(cfg, iface) {
            want.insert(iface.clone(), spec);
        }
    }
    for (iface, spec) in &rt.dynamic {
        if let Some(s) = spec {
            if !want.contains_key(iface) && nets.contains_key(&s.net) && present.contains(iface) {
                want.insert(iface.clone(), s.clone());
            }
        }
    }
    (want, pending)
}

/// The diff from the running state to `cfg`.
pub fn plan(sw: &Switch, rt: &Runtime, cfg: &Config) -> Plan {
    let mut p = Plan {
        warnings: warnings(cfg),
        ..Default::default()
    };
    let have_nets = running_nets(sw, rt);
    let want_nets: BTreeMap<String, NetSpec> = cfg
        .networks
        .iter()
        .filter(|(_, s)| mode_of(&s.mode).is_some())
        .map(|(n, s)| (n.clone(), NetSpec::of(n, s)))
        .collect();
    let mut recreated = BTreeSet::new();
    for (n, w) in &want_nets {
        match have_nets.get(n) {
            None => p.networks_added.push(n.clone()),
            Some(h) => {
                let (changes, live) = h.changes(w);
                if !changes.is_empty() {
                    if !live {
                        recreated.insert(n.clone());
                    }
                    p.networks_changed.push(NetChange {
                        name: n.clone(),
                        changes,
                        recreate: !live,
                    });
                }
            }
        }
    }
    for n in have_nets.keys() {
        if !want_nets.contains_key(n) {
            p.networks_removed.push(n.clone());
        }
    }
    let have_ports = running_ports(sw);
    let (want_ports, pending) = desired_ports(cfg, rt, &want_nets);
    p.ports_pending = pending;
    for (i, w) in &want_ports {
        match have_ports.get(i) {
            None => p.ports_added.push((i.clone(), w.to_string())),
            Some(h) if h != w || recreated.contains(&w.net) => {
                let live = h.net == w.net
                    && h.hook == w.hook
                    && h.hairpin == w.hairpin
                    && h.trusted == w.trusted
                    && same_security(&h.security, &w.security)
                    && !recreated.contains(&w.net);
                p.ports_changed.push(PortChange {
                    iface: i.clone(),
                    from: h.to_string(),
                    to: w.to_string(),
                    live,
                });
            }
            Some(_) => {}
        }
    }
    for i in have_ports.keys() {
        if !want_ports.contains_key(i) {
            p.ports_removed.push(i.clone());
        }
    }
    let old_rules: BTreeSet<String> = rt.applied.rules.iter().map(|r| rule_label(r)).collect();
    let new_rules: BTreeSet<String> = cfg.rules.iter().map(|r| rule_label(r)).collect();
    p.rules_added = new_rules.difference(&old_rules).cloned().collect();
    p.rules_removed = old_rules.difference(&new_rules).cloned().collect();
    p
}

/// Checks against the host what the file alone cannot tell (uplinks exist).
fn preflight(cfg: &Config, plan: &Plan) -> Result<()> {
    for n in plan.networks_added.iter().chain(
        plan.networks_changed
            .iter()
            .filter(|c| c.recreate)
            .map(|c| &c.name),
    ) {
        if let Some(u) = cfg.networks.get(n).and_then(|s| s.uplink.as_deref()) {
            netdev::ifindex(u).with_context(|| format!("network '{n}': uplink '{u}'"))?;
            if cfg.networks[n].mode == "nat" && netdev::ipv4(u)?.is_none() {
                bail!("network '{n}': uplink '{u}' has no IPv4 address to masquerade behind");
            }
        }
    }
    Ok(())
}

/// Makes the running state what `cfg` says, touching only the differences.
pub fn apply(sw: &mut Switch, cfg: &Config, dry_run: bool) -> Result<Plan> {
    let mut plan = with_rt(|rt| plan(sw, rt, cfg));
    preflight(cfg, &plan)?;
    if dry_run {
        return Ok(plan);
    }
    let have_nets = with_rt(|rt| running_nets(sw, rt));
    let want: BTreeMap<String, NetSpec> = cfg
        .networks
        .iter()
        .filter(|(_, s)| mode_of(&s.mode).is_some())
        .map(|(n, s)| (n.clone(), NetSpec::of(n, s)))
        .collect();
    let add_forwards = |sw: &mut Switch, n: &str, fw: &Forwards| -> Result<()> {
        for (k, to) in fw {
            let (proto, port) = k.split_once('/').context("forward key")?;
            sw.forward_add(n, proto, port.parse()?, to)
                .with_context(|| format!("network '{n}': forward {k} -> {to}"))?;
        }
        Ok(())
    };
    let add_net = |sw: &mut Switch, n: &str| -> Result<()> {
        let s = &want[n];
        let opts = s.opts().context("mode unavailable")?;
        sw.net_add(n, Some(s.ageing), &opts)
            .with_context(|| format!("adding network '{n}'"))?;
        add_forwards(sw, n, &s.forwards)
    };
    // Removals first (ports, then networks), so names and addresses free up.
    for i in &plan.ports_removed {
        sw.port_del(i)
            .with_context(|| format!("removing port '{i}'"))?;
    }
    for c in plan.ports_changed.iter().filter(|c| !c.live) {
        if sw.ports.contains_key(&c.iface) {
            sw.port_del(&c.iface)
                .with_context(|| format!("re-attaching port '{}'", c.iface))?;
        }
    }
    for n in &plan.networks_removed {
        sw.net_del(n)
            .with_context(|| format!("removing network '{n}'"))?;
    }
    for c in &plan.networks_changed {
        if c.recreate {
            sw.net_del(&c.name)
                .with_context(|| format!("removing network '{}'", c.name))?;
            add_net(sw, &c.name)?;
        } else {
            sw.net_set(&c.name, Some(want[&c.name].ageing))?;
            let (old, new) = (&have_nets[&c.name].forwards, &want[&c.name].forwards);
            for (k, to) in old {
                if new.get(k) != Some(to) {
                    let (proto, port) = k.split_once('/').context("forward key")?;
                    sw.forward_del(&c.name, proto, port.parse()?)
                        .with_context(|| format!("network '{}': removing forward {k}", c.name))?;
                }
            }
            let added: Forwards = new
                .iter()
                .filter(|(k, to)| old.get(*k) != Some(*to))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            add_forwards(sw, &c.name, &added)?;
        }
    }
    for n in &plan.networks_added {
        add_net(sw, n)?;
    }
    let (ports, _) = with_rt(|rt| desired_ports(cfg, rt, &want));
    for (i, _) in plan.ports_added.iter().map(|(i, t)| (i, t)).chain(
        plan.ports_changed
            .iter()
            .filter(|c| !c.live)
            .map(|c| (&c.iface, &c.to)),
    ) {
        let s = &ports[i];
        sw.port_add(
            &s.net,
            i,
            s.hairpin,
            s.hook,
            &s.vlan_args(),
            s.trusted,
            &s.security,
        )
        .with_context(|| format!("attaching port '{i}'"))?;
    }
    for c in plan.ports_changed.iter().filter(|c| c.live) {
        let mut a = ports[&c.iface].vlan_args();
        if a.is_empty() {
            a.no_vlan = true;
        }
        sw.port_set(&c.iface, &a)
            .with_context(|| format!("changing port '{}'", c.iface))?;
    }
    with_rt(|rt| {
        rt.applied = cfg.clone();
        let statics: BTreeSet<&String> = cfg.ports.iter().map(|p| &p.0.iface).collect();
        let mut dynamic = BTreeMap::new();
        for i in sw.ports.keys() {
            if statics.contains(i) {
                continue;
            }
            match rt.dynamic.get(i) {
                Some(Some(s)) => {
                    dynamic.insert(i.clone(), Some(s.clone()));
                }
                _ if wanted(cfg, i).is_some_and(|(_, rule)| rule) => {
                    dynamic.insert(i.clone(), None);
                }
                _ => {}
            }
        }
        rt.dynamic = dynamic;
    });
    plan.applied = true;
    Ok(plan)
}

/// Parses `text` and applies it; remembers `path` as the daemon's file.
pub fn apply_text(sw: &mut Switch, path: Option<&Path>, text: &str, dry_run: bool) -> Result<Plan> {
    let label = path.map(|p| p.display().to_string());
    let cfg = parse(label.as_deref().unwrap_or("<config>"), text)?;
    let plan = apply(sw, &cfg, dry_run)?;
    if !dry_run {
        if let Some(p) = path {
            with_rt(|rt| rt.source = Some(p.to_path_buf()));
        }
    }
    Ok(plan)
}

/// SIGHUP: re-reads the daemon's file and applies it.
pub fn reload(sw: &mut Switch) -> Result<Plan> {
    let path = with_rt(|rt| rt.source.clone()).context("the daemon has no config file")?;
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    apply_text(sw, Some(&path), &text, false)
}

/// The running state as a config file: networks (with the pass-through
/// settings of the last applied file), static ports, rules.
pub fn running_config(sw: &Switch) -> Config {
    with_rt(|rt| {
        let mut cfg = Config::default();
        for (n, s) in running_nets(sw, rt) {
            let old = rt.applied.networks.get(&n).map(|c| c.0.clone());
            let mut sec = old.clone().unwrap_or_default();
            sec.mode = s.mode.clone();
            sec.gateway = s.gateway.clone();
            sec.gateway_iface = s
                .gateway_iface
                .clone()
                .filter(|i| Some(i.as_str()) != Gateway::default_name(&n).ok().as_deref());
            sec.uplink = s.uplink.clone();
            sec.ageing = (s.ageing != DEFAULT_AGEING.as_secs()).then_some(s.ageing);
            sec.dhcp = s.dhcp.clone();
            let default_ports = [crate::nat::DEFAULT_PORTS.0, crate::nat::DEFAULT_PORTS.1];
            let old_ports = sec.nat.as_ref().and_then(|n| n.port_range);
            if s.nat_ports.is_none() {
                sec.nat = None;
            } else if s.nat_ports != Some(old_ports.unwrap_or(default_ports)) {
                sec.nat = Some(NatSection {
                    port_range: s.nat_ports,
                });
            }
            let same_forwards = NetSpec::of(&n, &sec).forwards == s.forwards;
            if !same_forwards {
                sec.forwards = s
                    .forwards
                    .iter()
                    .filter_map(|(k, to)| {
                        let (proto, port) = k.split_once('/')?;
                        Some(ForwardSection {
                            proto: proto.into(),
                            port: port.parse().ok()?,
                            to: to.clone(),
                        })
                    })
                    .collect();
            }
            cfg.networks.insert(n, Checked(sec));
        }
        for (n, s) in &rt.applied.networks {
            if mode_of(&s.mode).is_none() {
                cfg.networks.insert(n.clone(), s.clone());
            }
        }
        for (i, p) in running_ports(sw) {
            if rt.dynamic.contains_key(&i) {
                continue;
            }
            let a = p.attach();
            cfg.ports.push(Checked(PortSection {
                iface: i,
                net: a.net,
                hook: a.hook,
                hairpin: a.hairpin,
                trusted: a.trusted,
                vlan: a.vlan,
                trunk: a.trunk,
                native: a.native,
                mac: a.security.mac,
                ip: a.security.ip,
                max_macs: a.security.max_macs,
                no_port_security: a.security.no_port_security,
            }));
        }
        // Static ports of the file whose interface is absent stay.
        for p in &rt.applied.ports {
            if !sw.ports.contains_key(&p.iface) && cfg.networks.contains_key(&p.attach().net) {
                cfg.ports.push(p.clone());
            }
        }
        cfg.rules = rt
            .applied
            .rules
            .iter()
            .filter(|r| cfg.networks.contains_key(&r.attach().net))
            .cloned()
            .collect();
        cfg
    })
}

pub fn to_toml(cfg: &Config) -> Result<String> {
    toml::to_string(cfg).context("writing TOML")
}

/// `kvnet save [FILE]`: writes the running state; returns the path.
pub fn save(sw: &Switch, path: Option<&Path>) -> Result<PathBuf> {
    let path = match path {
        Some(p) => p.to_path_buf(),
        None => with_rt(|rt| rt.source.clone()).unwrap_or_else(|| DEFAULT_CONFIG.into()),
    };
    let text = format!(
        "# kvnet configuration, written by `kvnet save`\n{}",
        to_toml(&running_config(sw))?
    );
    // Never write what would not load back.
    parse(&path.display().to_string(), &text).context("the saved state does not validate")?;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let tmp = path.with_extension("toml.tmp");
    std::fs::write(&tmp, &text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    with_rt(|rt| rt.source = Some(path.clone()));
    Ok(path)
}

// ------------------------------------------------------ taps that join

/// `kvnet ifup TAP`: attach by explicit settings (env) or by rule.
pub fn ifup(sw: &mut Switch, iface: &str, net: Option<&str>, vlan: Option<&str>) -> Result<String> {
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "dev", iface, "up"])
        .status();
    let (spec, explicit) = match net {
        Some(n) => {
            let vlan = VlanArgs {
                vlan: vlan.map(Into::into),
                ..Default::default()
            };
            (
                PortSpec {
                    net: n.to_string(),
                    hook: Hook::Auto,
                    hairpin: false,
                    trusted: false,
                    vlan: vlan.to_cfg()?,
                    security: SecurityArgs::default(),
                },
                true,
            )
        }
        None => {
            let (mut spec, _) = with_rt(|rt| wanted(&rt.applied, iface)).with_context(|| {
                format!("no port or rule of the config matches '{iface}' (set KVNET_NET)")
            })?;
            if let Some(v) = vlan {
                spec.vlan = VlanCfg::Access {
                    vid: vlan::parse_vid(v)?,
                };
            }
            (spec, vlan.is_some())
        }
    };
    attach(sw, iface, &spec)?;
    with_rt(|rt| {
        let is_static = rt.applied.ports.iter().any(|p| p.iface == iface);
        if !is_static || explicit {
            rt.dynamic
                .insert(iface.to_string(), explicit.then(|| spec.clone()));
        }
    });
    Ok(spec.to_string())
}

/// Attaches `iface` as `spec` says; already attached the same way is fine.
fn attach(sw: &mut Switch, iface: &str, spec: &PortSpec) -> Result<()> {
    let have = running_ports(sw).remove(iface);
    match have {
        Some(h) if &h == spec => Ok(()),
        Some(h)
            if h.net == spec.net
                && h.hook == spec.hook
                && h.hairpin == spec.hairpin
                && h.trusted == spec.trusted
                && same_security(&h.security, &spec.security) =>
        {
            let mut a = spec.vlan_args();
            a.no_vlan = a.is_empty();
            sw.port_set(iface, &a)
        }
        Some(_) => {
            sw.port_del(iface)?;
            sw.port_add(
                &spec.net,
                iface,
                spec.hairpin,
                spec.hook,
                &spec.vlan_args(),
                spec.trusted,
                &spec.security,
            )
        }
        None => sw.port_add(
            &spec.net,
            iface,
            spec.hairpin,
            spec.hook,
            &spec.vlan_args(),
            spec.trusted,
            &spec.security,
        ),
    }
}

pub fn ifdown(sw: &mut Switch, iface: &str) -> Result<()> {
    with_rt(|rt| rt.dynamic.remove(iface));
    if sw.ports.contains_key(iface) {
        sw.port_del(iface)?;
    }
    Ok(())
}

/// A link appeared or changed: attach it if a static port or rule wants it.
pub fn link_added(sw: &mut Switch, iface: &str) -> Option<String> {
    if sw.ports.contains_key(iface) || sw.nets.is_empty() {
        return None;
    }
    let (spec, rule) = with_rt(|rt| wanted(&rt.applied, iface))?;
    if !sw.nets.contains_key(&spec.net) {
        return None;
    }
    match sw.port_add(
        &spec.net,
        iface,
        spec.hairpin,
        spec.hook,
        &spec.vlan_args(),
        spec.trusted,
        &spec.security,
    ) {
        Ok(()) => {
            if rule {
                with_rt(|rt| rt.dynamic.insert(iface.to_string(), None));
            }
            Some(format!("{iface} -> {spec}"))
        }
        Err(e) => {
            log::warn!("attaching {iface}: {e:#}");
            None
        }
    }
}

/// A link went away: drop its port now (the poller would in half a second).
pub fn link_removed(sw: &mut Switch, iface: &str) -> bool {
    with_rt(|rt| rt.dynamic.remove(iface));
    if sw.ports.contains_key(iface) && netdev::ifindex(iface).is_err() {
        return sw.port_remove(iface).is_ok();
    }
    !sw.reap_vanished_ports().is_empty()
}

/// Follows RTM_NEWLINK/RTM_DELLINK on a netlink socket (RTMGRP_LINK) and
/// attaches/detaches ports; runs on its own thread for the daemon's life.
pub fn watch_links(switch: std::sync::Arc<Mutex<Switch>>) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2)/bind(2) on a fresh fd we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a netlink socket");
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("binding to RTMGRP_LINK");
    }
    // Weak: the daemon's exit drops the switch (and with it the pins).
    let switch = std::sync::Arc::downgrade(&switch);
    std::thread::Builder::new()
        .name("kvnet-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        // Missed events: catch up with a full scan.
                        let Some(switch) = switch.upgrade() else {
                            return;
                        };
                        if let Ok(mut sw) = switch.lock() {
                            for i in interfaces() {
                                link_added(&mut sw, &i);
                            }
                        }
                        continue;
                    }
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    log::warn!("netlink watcher stopped: {e}");
                    return;
                }
                let Some(switch) = switch.upgrade() else {
                    return;
                };
                for (ty, name) in parse_link_msgs(&buf[..n as usize]) {
                    let Ok(mut sw) = switch.lock() else { return };
                    if ty == libc::RTM_NEWLINK {
                        if let Some(what) = link_added(&mut sw, &name) {
                            eprintln!("port {what}: attached (interface appeared)");
                            crate::state::persist(&sw);
                        }
                    } else if ty == libc::RTM_DELLINK && link_removed(&mut sw, &name) {
                        eprintln!("port {name} vanished: removed");
                        crate::state::persist(&sw);
                    }
                }
            }
        })
        .context("starting the netlink watcher")?;
    Ok(())
}

/// (message type, IFLA_IFNAME) of each link message in a netlink datagram.
fn parse_link_msgs(mut b: &[u8]) -> Vec<(u16, String)> {
    const NLMSG_HDR: usize = 16;
    const IFINFO: usize = 16;
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        if ty == libc::RTM_NEWLINK || ty == libc::RTM_DELLINK {
            let msg = &b[..len];
            let mut off = NLMSG_HDR + IFINFO;
            while off + 4 <= len {
                let alen = u16::from_ne_bytes([msg[off], msg[off + 1]]) as usize;
                let aty = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]);
                if alen < 4 || off + alen > len {
                    break;
                }
                if aty == libc::IFLA_IFNAME {
                    let v = &msg[off + 4..off + alen];
                    let v = v.split(|c| *c == 0).next().unwrap_or_default();
                    out.push((ty, String::from_utf8_lossy(v).into_owned()));
                }
                off += (alen + 3) & !3;
            }
        }
        let step = (len + 3) & !3;
        if step >= b.len() {
            break;
        }
        b = &b[step..];
    }
    out
}

// ------------------------------------------------------------- status

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub daemon: String,
    pub pid: u32,
    pub pin_dir: String,
    pub programs: Vec<String>,
    pub config: Option<String>,
    pub networks: Vec<String>,
    pub ports: usize,
    pub rules: usize,
    pub fdb_entries: usize,
    pub fdb_capacity: u32,
}

pub fn status(sw: &mut Switch) -> Result<Status> {
    let pin_dir = sw.dp.pin_dir().to_path_buf();
    let programs = [
        kvnet_common::names::PROG_XDP,
        kvnet_common::names::PROG_TC,
        kvnet_common::names::PROG_TC_OUT,
    ]
    .iter()
    .filter(|p| pin_dir.join(p).exists())
    .map(|p| p.to_string())
    .collect();
    let fdb_entries = sw.dp.fdb()?.keys().filter(|k| k.is_ok()).count();
    let (config, rules) = with_rt(|rt| {
        (
            rt.source.as_ref().map(|p| p.display().to_string()),
            rt.applied.rules.len(),
        )
    });
    Ok(Status {
        daemon: "running".into(),
        pid: std::process::id(),
        pin_dir: pin_dir.display().to_string(),
        programs,
        config,
        networks: sw.nets.keys().cloned().collect(),
        ports: sw.ports.len(),
        rules,
        fdb_entries,
        fdb_capacity: kvnet_common::MAX_FDB_ENTRIES,
    })
}

/// Set by `kvnet down`: the daemon removes everything and exits.
pub static DOWN: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_port_security_written_two_ways_is_the_same() {
        let args = |mac: &str, max: Option<u8>| SecurityArgs {
            mac: vec![mac.to_string()],
            max_macs: max,
            ..Default::default()
        };
        assert!(same_security(
            &args("52:54:00:AA:BB:CC", None),
            &args("52-54-00-aa-bb-cc", Some(1))
        ));
        assert!(!same_security(
            &args("52:54:00:aa:bb:cc", None),
            &args("52:54:00:aa:bb:cc", Some(2))
        ));
    }

    const GOOD: &str = r#"
[networks.lab]
mode = "host-only"
gateway = "10.9.0.1/24"
ageing = 60

[networks.lab.dhcp]
start = "10.9.0.100"
end = "10.9.0.200"
hosts = [{ mac = "52:54:00:00:00:01", ip = "10.9.0.5", name = "a" }]

[networks.iso]

[[ports]]
iface = "p1"
net = "lab"
vlan = 10

[[ports]]
iface = "p2"
net = "iso"
trunk = [10, 20]
native = 1

[[rules]]
match = "tap-v10-*"
net = "lab"
vlan = "10"
"#;

    #[test]
    fn parses_a_full_file() {
        let c = parse("k.toml", GOOD).unwrap();
        assert_eq!(c.networks.len(), 2);
        assert_eq!(c.networks["lab"].ageing, Some(60));
        assert_eq!(c.networks["iso"].mode, "isolated");
        assert_eq!(c.ports[1].attach().trunk.as_deref(), Some("10,20"));
        assert_eq!(c.rules[0].attach().vlan, Some(10));
        let (spec, rule) = wanted(&c, "tap-v10-abc").unwrap();
        assert!(rule);
        assert_eq!(spec.vlan, VlanCfg::Access { vid: 10 });
        assert!(wanted(&c, "tap-v20-abc").is_none());
        assert!(!wanted(&c, "p1").unwrap().1);
        // Round trip through the writer.
        let back = parse("k2.toml", &to_toml(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    fn err(text: &str) -> String {
        format!("{:#}", parse("f.toml", text).unwrap_err())
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let bad = "\n\n[networks.a]\nmode = \"host-only\"\n\n\ngateway = \"10.0.0.1/33\"\n";
        let e = err(bad);
        assert!(e.starts_with("f.toml:7:11:"), "{e}");
        assert!(e.contains("/33"), "{e}");
        let e = err("[networks.a]\nmode = \"nated\"\n");
        assert!(
            e.starts_with("f.toml:2:8:") && e.contains("unknown mode"),
            "{e}"
        );
        let e = err("[networks.a]\nmode = \"isolated\"\nfoo = 1\n");
        assert!(e.starts_with("f.toml:3:") && e.contains("foo"), "{e}");
        let e = err("[networks.a]\n[[ports]]\niface = \"p1\"\nnet = \"a\"\nvlan = 4095\n");
        assert!(
            e.starts_with("f.toml:5:8:") && e.contains("reserved"),
            "{e}"
        );
        let e = err("[networks.a]\n[[ports]]\niface = \"p1\"\nnet = \"b\"\n");
        assert!(e.starts_with("f.toml:3:1:") && e.contains("'b'"), "{e}");
        let e = err("[networks.a]\nmode = \"routed\"\n");
        assert!(
            e.starts_with("f.toml:1:") && e.contains("needs `gateway"),
            "{e}"
        );
        let e = err("[networks.a]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\n[networks.b]\nmode = \"host-only\"\ngateway = \"10.0.0.2/16\"\n");
        assert!(
            e.starts_with("f.toml:4:1:") && e.contains("overlaps"),
            "{e}"
        );
        let e =
            err("[networks.a]\n[[ports]]\niface = \"p1\"\nnet = \"a\"\nvlan = 5\ntrunk = \"6\"\n");
        assert!(e.contains("exclude each other"), "{e}");
        let e = err("[networks.\"a b\"]\n");
        assert!(
            e.starts_with("f.toml:1:1:") && e.contains("invalid network name"),
            "{e}"
        );
        let e = err("[networks.a]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\n[networks.a.dhcp]\nstart = \"10.0.1.2\"\nend = \"10.0.0.9\"\n");
        assert!(e.contains("outside the gateway's subnet"), "{e}");
        let e = err(
            "[networks.a]\nmode = \"isolated\"\n[networks.a.nat]\nport_range = [1024, 65535]\n",
        );
        assert!(e.contains("need mode nat"), "{e}");
    }

    #[test]
    fn globs() {
        assert!(glob_match("vnet*", "vnet0"));
        assert!(glob_match("vnet*", "vnet"));
        assert!(!glob_match("vnet*", "xvnet0"));
        assert!(glob_match("tap-web-?", "tap-web-1"));
        assert!(!glob_match("tap-web-?", "tap-web-12"));
        assert!(glob_match("tap[0-9]", "tap7"));
        assert!(!glob_match("tap[!0-9]", "tap7"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*b*c", "axxbyyc"));
    }

    #[test]
    fn netlink_link_messages() {
        // nlmsghdr(16) + ifinfomsg(16) + IFLA_IFNAME "tap0\0" padded.
        let mut m = Vec::new();
        let attr_len = 4 + 5;
        let total = 16 + 16 + ((attr_len + 3) & !3);
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 16]);
        m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        m.extend_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        m.extend_from_slice(b"tap0\0\0\0\0");
        let mut two = m.clone();
        two.extend_from_slice(&m);
        assert_eq!(
            parse_link_msgs(&two),
            vec![
                (libc::RTM_NEWLINK, "tap0".to_string()),
                (libc::RTM_NEWLINK, "tap0".to_string())
            ]
        );
    }
}
