//! The config file's schema: sections, their checks and deserializers.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use anyhow::Result;
use serde::{de::Error as _, Deserialize, Deserializer, Serialize};

use super::*;
use crate::{
    control::{Hook, Mode, VlanArgs},
    gateway::Cidr,
    mac::Mac,
    policy::PolicyArgs,
    rate::Rate,
    security::SecurityArgs,
    vlan::{self},
};

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
    /// Uplink groups (like `kvnet uplink add`), created before the
    /// networks that name them as their uplink.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks: Vec<crate::uplink_spec::UplinkSpec>,
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
    /// The MTU of the gateway interface, handed to guests by DHCP (option
    /// 26): libvirt's `<mtu size>`.
    #[serde(
        default,
        deserialize_with = "de_mtu",
        skip_serializing_if = "Option::is_none"
    )]
    pub mtu: Option<u16>,
    /// `dns = false`: no DNS server on the gateway, and DHCP names none
    /// (libvirt's `<dns enable='no'/>`). On by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<bool>,
    /// Static names the gateway's DNS answers (A and PTR), libvirt's
    /// `<dns><host>`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_hosts: Vec<DnsHostSection>,
    /// The VLAN of guest ports that set none of their own (libvirt's
    /// `<vlan>` on the network or its default portgroup): access VLAN, or
    /// trunk VLANs with an untagged native one.
    #[serde(
        default,
        deserialize_with = "de_vid",
        skip_serializing_if = "Option::is_none"
    )]
    pub port_vlan: Option<u16>,
    #[serde(
        default,
        deserialize_with = "de_vid_list",
        skip_serializing_if = "Option::is_none"
    )]
    pub port_trunk: Option<String>,
    #[serde(
        default,
        deserialize_with = "de_vid",
        skip_serializing_if = "Option::is_none"
    )]
    pub port_native: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp: Option<DhcpSection>,
    /// IPv6 on the gateway: `--gateway6`, `--dhcp6-range`, `--dhcp6-host`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Section>,
    /// A VXLAN overlay: `vni`, `vtep_local`, `vtep_dev`, `remotes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan: Option<crate::vxlan::VxlanOpts>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nat: Option<NatSection>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<ForwardSection>,
    /// Every guest port of the network is isolated (libvirt's `<port
    /// isolated='yes'/>`): isolated ports reach the gateway, the uplink and
    /// non-isolated ports, never each other.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated_ports: bool,
    /// Rate limit into each guest port (to the guest), unless the port
    /// sets its own: "10mbit".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_rate_in: Option<Rate>,
    /// Rate limit out of each guest port (from the guest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_rate_out: Option<Rate>,
    /// Broadcast, multicast and unknown-unicast frames a second each port
    /// may flood (storm control); 0 turns it off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm_pps: Option<u32>,
}

impl NetSection {
    /// The defaults this network gives its guest ports.
    pub fn port_policy(&self) -> PolicyArgs {
        PolicyArgs {
            isolated: self.isolated_ports,
            rate_in: self.port_rate_in,
            rate_out: self.port_rate_out,
        }
    }
}

pub fn isolated() -> String {
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

/// `[networks.NAME.ipv6]`: the gateway's IPv6 addresses (router
/// advertisements, DNS) and DHCPv6.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ipv6Section {
    /// ADDRESS/PREFIX, e.g. "2001:db8:1::1/64".
    pub gateways: Vec<String>,
    /// Stateful DHCPv6: "FIRST-LAST".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dhcp_range: Option<String>,
    /// "MAC,IPV6[,NAME]".
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// NAT66: the guests' IPv6 masqueraded behind the uplink's (mode nat).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nat6: bool,
}

/// `[[networks.NAME.dns_hosts]]`: names for one address.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsHostSection {
    /// IPv4 (A) or IPv6 (AAAA).
    pub ip: std::net::IpAddr,
    /// Host names ("db") or full names ("db.example.com").
    #[serde(deserialize_with = "de_dns_names")]
    pub names: Vec<String>,
}

#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatSection {
    /// Source ports used for translated flows: [first, last].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<[u16; 2]>,
    /// UDP mapping: "eim" (endpoint-independent, the default) or "symmetric".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<crate::control::NatUdp>,
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
    /// Isolated from the network's other isolated ports.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// Rate limit into the guest (libvirt's `<bandwidth><inbound>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in: Option<Rate>,
    /// Rate limit out of the guest (`<bandwidth><outbound>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out: Option<Rate>,
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
    /// Isolated from the network's other isolated ports.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// Rate limit into the guest (libvirt's `<bandwidth><inbound>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in: Option<Rate>,
    /// Rate limit out of the guest (`<bandwidth><outbound>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out: Option<Rate>,
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
                    policy: PolicyArgs {
                        isolated: self.isolated,
                        rate_in: self.rate_in,
                        rate_out: self.rate_out,
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
    pub policy: PolicyArgs,
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
            policy: self.policy.clone(),
        }
    }

    /// The `[[ports]]` section that attaches `iface` this way.
    pub fn port_section(self, iface: String) -> PortSection {
        PortSection {
            iface,
            net: self.net,
            hook: self.hook,
            hairpin: self.hairpin,
            trusted: self.trusted,
            vlan: self.vlan,
            trunk: self.trunk,
            native: self.native,
            mac: self.security.mac,
            ip: self.security.ip,
            max_macs: self.security.max_macs,
            no_port_security: self.security.no_port_security,
            isolated: self.policy.isolated,
            rate_in: self.policy.rate_in,
            rate_out: self.policy.rate_out,
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

pub fn mode_of(s: &str) -> Option<Mode> {
    <Mode as clap::ValueEnum>::from_str(s, false).ok()
}

impl NetSection {
    /// The VLAN options of guest ports that give none of their own.
    pub fn port_vlan_args(&self) -> VlanArgs {
        VlanArgs {
            vlan: self.port_vlan.map(|v| v.to_string()),
            trunk: self.port_trunk.clone(),
            native: self.port_native.map(|v| v.to_string()),
            no_vlan: false,
        }
    }
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
        if let Some(v6) = &self.ipv6 {
            if !routes {
                return Err(format!("`ipv6` needs a gateway: a {m} network has none"));
            }
            if v6.gateways.is_empty() {
                return Err("`ipv6` needs `gateways = [\"ADDRESS/PREFIX\"]`".into());
            }
            crate::ipv6::check_section(&v6.gateways, v6.dhcp_range.as_deref(), &v6.hosts)?;
            if v6.nat6 && m != "nat" {
                return Err(format!("`ipv6.nat6` needs mode nat, not {m}"));
            }
        }
        if self.mtu.is_some() && !gw {
            return Err(format!(
                "`mtu` is the gateway interface's: a {m} network has none"
            ));
        }
        if !self.dns_hosts.is_empty() {
            if self.dns == Some(false) {
                return Err("`dns_hosts` need the DNS server that `dns = false` turns off".into());
            }
            // (The IPv6 resolver runs with the router advertisements.)
            if self.dhcp.is_none() && self.ipv6.is_none() {
                return Err(
                    "`dns_hosts` need `dhcp` or `ipv6`: kvnet's DNS server runs with the network's DHCP server or router advertisements"
                        .into(),
                );
            }
        }
        self.port_vlan_args().to_cfg().map_err(|e| {
            format!("port_vlan/port_trunk/port_native: {e:#}")
                .replace("--vlan", "port_vlan")
                .replace("--trunk", "port_trunk")
                .replace("--native", "port_native")
        })?;
        if (self.nat.is_some() || !self.forwards.is_empty()) && m != "nat" {
            return Err(format!("`nat` and `forwards` need mode nat, not {m}"));
        }
        if let Some(NatSection {
            port_range: Some([a, b]),
            ..
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
            let to = match f.to.parse::<std::net::SocketAddr>() {
                Ok(std::net::SocketAddr::V4(to)) => to,
                Ok(std::net::SocketAddr::V6(to)) => {
                    // NAT66: a guest of the network's IPv6 prefixes.
                    if !self.ipv6.as_ref().is_some_and(|v| v.nat6) {
                        return Err(format!(
                            "forward to '{}': IPv6 forwards need `ipv6.nat6`",
                            f.to
                        ));
                    }
                    let prefixes = self.ipv6.iter().flat_map(|v| &v.gateways);
                    let inside = prefixes
                        .filter_map(|g| g.parse::<crate::ipv6::Prefix6>().ok())
                        .any(|p| p.contains(*to.ip()) && p.addr != *to.ip());
                    if !inside || to.port() == 0 {
                        return Err(format!(
                            "forward to '{}': not a guest address and port of the network's ipv6 gateways",
                            f.to
                        ));
                    }
                    if !keys.insert((f.proto.clone(), f.port)) {
                        return Err(format!("{} port {} is forwarded twice", f.proto, f.port));
                    }
                    continue;
                }
                Err(_) => {
                    return Err(format!(
                        "forward to '{}': use GUEST-IP:PORT or [GUEST-IPV6]:PORT",
                        f.to
                    ))
                }
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

pub fn de_mode<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if mode_of(&s).is_some() || s == "nat" {
        return Ok(s);
    }
    Err(D::Error::custom(format!(
        "unknown mode '{s}': use isolated, host-only, routed, bridged or nat"
    )))
}

pub fn de_cidr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<Cidr>()
        .map_err(|e| D::Error::custom(format!("{e:#}")))?;
    Ok(Some(s))
}

pub fn check_ifname(s: &str) -> Result<(), String> {
    let odd = |c: char| c == '/' || c == ':' || c.is_whitespace() || c.is_control();
    if s.is_empty() || s.len() > 15 || s.contains(odd) || s == "." || s == ".." {
        return Err(format!(
            "invalid interface name {s:?}: 1-15 characters, no '/', ':', spaces or control characters"
        ));
    }
    Ok(())
}

pub fn de_ifname_req<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    check_ifname(&s).map_err(D::Error::custom)?;
    Ok(s)
}

pub fn de_ifname<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    de_ifname_req(d).map(Some)
}

pub fn de_glob<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    if s.is_empty() || s.len() > 64 || s.contains(['/', ' ']) {
        return Err(D::Error::custom(format!(
            "invalid rule pattern '{s}': a glob on interface names, like vnet* or tap-web-?"
        )));
    }
    Ok(s)
}

pub fn de_ageing<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    match u64::deserialize(d)? {
        0 => Err(D::Error::custom("ageing must be at least 1 second")),
        s => Ok(Some(s)),
    }
}

pub fn de_mtu<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    match u32::deserialize(d)? {
        n @ 576..=65535 => Ok(Some(n as u16)),
        n => Err(D::Error::custom(format!(
            "mtu {n}: use 576 (the least an IPv4 host must take) to 65535"
        ))),
    }
}

pub fn de_dns_names<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let names = Vec::<String>::deserialize(d)?;
    if names.is_empty() {
        return Err(D::Error::custom("a DNS host needs at least one name"));
    }
    names
        .into_iter()
        .map(|n| {
            let lower = n.trim_end_matches('.').to_ascii_lowercase();
            if crate::dnsname::valid_domain(&lower) {
                Ok(lower)
            } else {
                Err(D::Error::custom(format!(
                    "'{n}' is not a DNS name (labels of letters, digits and '-', dot-separated)"
                )))
            }
        })
        .collect()
}

pub fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    s.parse::<Mac>()
        .map_err(|e| D::Error::custom(format!("{e:#}")))?;
    Ok(s.to_ascii_lowercase())
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum NumOrStr {
    Num(i64),
    Str(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
pub enum ListOrStr {
    List(Vec<i64>),
    Str(String),
}

pub fn de_vid<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
    let s = match NumOrStr::deserialize(d)? {
        NumOrStr::Num(n) => n.to_string(),
        NumOrStr::Str(s) => s,
    };
    vlan::parse_vid(&s)
        .map(Some)
        .map_err(|e| D::Error::custom(format!("{e:#}")))
}

pub fn de_vid_list<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
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
