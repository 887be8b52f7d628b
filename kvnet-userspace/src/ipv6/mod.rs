//! IPv6 on a network's gateway, as libvirt's `<ip family='ipv6'>` with
//! dnsmasq: addresses on the gateway interface (`--gateway6`, several
//! allowed), router advertisements ([`ra`]), DHCPv6 ([`dhcp6`]: stateful
//! with `--dhcp6-range`, else information only) and DNS on the first
//! gateway address, the resolver the advertisements name.
pub mod dhcp6;
pub mod ra;
pub mod savi;

use std::net::{IpAddr, Ipv6Addr};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::{control::NetOpts, mac::Mac};

/// Valid lifetime of a DHCPv6 address and of the advertised prefixes.
pub const DEFAULT_LEASE6: Duration = Duration::from_secs(3600);

/// An IPv6 address with its prefix length, e.g. 2001:db8:1::1/64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Prefix6 {
    pub addr: Ipv6Addr,
    pub len: u8,
}

impl Prefix6 {
    fn mask(&self) -> u128 {
        if self.len == 0 {
            0
        } else {
            u128::MAX << (128 - u32::from(self.len))
        }
    }

    /// The prefix itself (host bits zero).
    pub fn network(&self) -> Ipv6Addr {
        Ipv6Addr::from(u128::from(self.addr) & self.mask())
    }

    pub fn contains(&self, a: Ipv6Addr) -> bool {
        u128::from(a) & self.mask() == u128::from(self.network())
    }

    /// SLAAC works on /64 prefixes only (64-bit interface identifiers).
    pub fn slaac(&self) -> bool {
        self.len == 64
    }
}

impl std::fmt::Display for Prefix6 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix6 {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (a, l) = s
            .split_once('/')
            .with_context(|| format!("IPv6 gateway '{s}' needs a prefix, like 2001:db8:1::1/64"))?;
        let addr: Ipv6Addr = a
            .parse()
            .with_context(|| format!("'{a}' is not an IPv6 address"))?;
        let len: u8 = l
            .parse()
            .ok()
            .filter(|l| (8..=127).contains(l))
            .with_context(|| {
                format!("IPv6 gateway '{s}': prefix length '{l}' out of range 8-127")
            })?;
        let p = Prefix6 { addr, len };
        let seg0 = addr.segments()[0];
        if addr.is_multicast()
            || addr.is_loopback()
            || addr.is_unspecified()
            || seg0 & 0xffc0 == 0xfe80
            || addr.to_ipv4_mapped().is_some()
        {
            bail!("IPv6 gateway '{s}': {addr} cannot be a gateway (multicast, loopback, link-local or mapped)");
        }
        if addr == p.network() {
            bail!("IPv6 gateway '{s}': {addr} is the subnet-router anycast address; pick a host address");
        }
        Ok(p)
    }
}

/// A static DHCPv6 host: the MAC in its DUID gets this address (and name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host6 {
    pub mac: Mac,
    pub ip: Ipv6Addr,
    pub name: Option<String>,
}

/// A network's IPv6 settings, checked whole before anything is built.
#[derive(Debug, Clone)]
pub struct V6Plan {
    pub net: String,
    /// The gateway interface (kvnet-NET).
    pub iface: String,
    pub gateways: Vec<Prefix6>,
    /// Routed and NAT networks route: their RAs give guests a default
    /// route; host-only ones advertise the prefixes only.
    pub router: bool,
    pub mtu: Option<u16>,
    pub dns: bool,
    pub domain: Option<String>,
    /// Stateful DHCPv6 hands out FIRST..=LAST.
    pub range: Option<(Ipv6Addr, Ipv6Addr)>,
    pub hosts: Vec<Host6>,
    /// `--dns-host` names (IPv4 and IPv6), answered on the IPv6 resolver too.
    pub dns_hosts: Vec<(String, IpAddr)>,
    pub lease_time: Duration,
}

impl V6Plan {
    /// The resolver RAs and DHCPv6 name: the first gateway address.
    pub fn resolver(&self) -> Option<Ipv6Addr> {
        self.dns.then(|| self.gateways[0].addr)
    }

    fn within(&self, a: Ipv6Addr) -> bool {
        self.gateways.iter().any(|g| g.contains(a))
    }
}

/// Does `opts` ask for IPv6 at all?
pub fn wanted(opts: &NetOpts) -> bool {
    !opts.gateway6.is_empty() || opts.dhcp6_range.is_some() || !opts.dhcp6_hosts.is_empty()
}

/// `--dhcp6-range FIRST-LAST` (a comma works too).
pub fn parse_range6(s: &str) -> Result<(Ipv6Addr, Ipv6Addr)> {
    let (a, b) = s
        .split_once(['-', ','])
        .with_context(|| format!("--dhcp6-range '{s}': expected FIRST-LAST"))?;
    let p = |x: &str| -> Result<Ipv6Addr> {
        x.trim()
            .parse()
            .with_context(|| format!("--dhcp6-range '{s}': '{x}' is not an IPv6 address"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if u128::from(a) > u128::from(b) {
        bail!("--dhcp6-range '{s}' runs backwards");
    }
    Ok((a, b))
}

/// `--dhcp6-host MAC,IPV6[,NAME]`.
pub fn parse_host6(s: &str) -> Result<Host6> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if !(2..=3).contains(&parts.len()) {
        bail!(
            "--dhcp6-host '{s}': expected MAC,IPV6[,NAME] like 52:54:00:00:00:05,2001:db8:1::5,web"
        );
    }
    let mac: Mac = parts[0]
        .parse()
        .map_err(|e| anyhow::anyhow!("--dhcp6-host '{s}': {e}"))?;
    let ip: Ipv6Addr = parts[1]
        .parse()
        .with_context(|| format!("--dhcp6-host '{s}': '{}' is not an IPv6 address", parts[1]))?;
    let name = match parts.get(2) {
        None => None,
        Some(n) if crate::dnsname::valid_hostname(n) => Some(n.to_ascii_lowercase()),
        Some(n) => bail!("--dhcp6-host '{s}': '{n}' is not a host name"),
    };
    Ok(Host6 { mac, ip, name })
}

/// What `[networks.N.ipv6]` leaves unserved: gateways that are no /64
/// (guests form SLAAC addresses in /64s only) with no DHCPv6 range in
/// them. A warning, not an error: the prefix is still on-link.
pub fn section_warnings(gateways: &[String], dhcp_range: Option<&str>) -> Vec<String> {
    let range = dhcp_range.and_then(|r| parse_range6(r).ok());
    gateways
        .iter()
        .enumerate()
        .filter_map(|(i, g)| {
            let g: Prefix6 = g.parse().ok()?;
            let served = range.is_some_and(|(a, _)| g.contains(a));
            (!g.slaac() && !served).then(|| {
                format!(
                    "ipv6 gateways[{i}]: {g} is a /{}: no SLAAC address in it (SLAAC needs a /64), and no dhcp_range",
                    g.len
                )
            })
        })
        .collect()
}

/// `[networks.N.ipv6]` checked whole (`kvnet check`, `config apply`):
/// the error names the field at fault (`gateways[1]`, `dhcp_range`,
/// `hosts[0]`).
pub fn check_section(
    gateways: &[String],
    dhcp_range: Option<&str>,
    hosts: &[String],
) -> std::result::Result<(), String> {
    let mut gws: Vec<Prefix6> = Vec::new();
    for (i, g) in gateways.iter().enumerate() {
        let p: Prefix6 = g
            .parse()
            .map_err(|e| format!("ipv6 gateways[{i}]: {e:#}"))?;
        if let Some(o) = gws
            .iter()
            .find(|o| o.contains(p.addr) || p.contains(o.addr))
        {
            return Err(format!("ipv6 gateways[{i}]: {p} overlaps {o}"));
        }
        gws.push(p);
    }
    match dhcp_range {
        Some(r) => {
            let (a, b) = parse_range6(r)
                .map_err(|e| format!("ipv6 dhcp_range: {e:#}").replace("--dhcp6-range", "range"))?;
            let Some(g) = gws.iter().find(|g| g.contains(a) && g.contains(b)) else {
                return Err(format!(
                    "ipv6 dhcp_range '{r}': not inside one of the gateways' prefixes"
                ));
            };
            if (u128::from(a)..=u128::from(b)).contains(&u128::from(g.addr)) {
                return Err(format!(
                    "ipv6 dhcp_range '{r}' holds the gateway's own address {}",
                    g.addr
                ));
            }
        }
        None => {}
    }
    let mut seen: Vec<Host6> = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let host = parse_host6(h)
            .map_err(|e| format!("ipv6 hosts[{i}]: {e:#}").replace("--dhcp6-host ", ""))?;
        if !gws.iter().any(|g| g.contains(host.ip)) || gws.iter().any(|g| g.addr == host.ip) {
            return Err(format!(
                "ipv6 hosts[{i}]: {} is not a guest address of the gateways' prefixes",
                host.ip
            ));
        }
        if let Some(j) = seen.iter().position(|o| o.mac == host.mac) {
            return Err(format!(
                "ipv6 hosts[{i}]: MAC {} is hosts[{j}]'s already",
                host.mac
            ));
        }
        if let Some(j) = seen.iter().position(|o| o.ip == host.ip) {
            return Err(format!(
                "ipv6 hosts[{i}]: {} is hosts[{j}]'s already",
                host.ip
            ));
        }
        seen.push(host);
    }
    Ok(())
}

/// The IPv6 plan of a network in `mode` (None without `--gateway6`).
/// Nothing is created here.
pub fn plan(
    net: &str,
    opts: &NetOpts,
    mode: crate::control::Mode,
    host_if: Option<&str>,
) -> Result<Option<V6Plan>> {
    use crate::control::Mode;
    if !wanted(opts) {
        return Ok(None);
    }
    if opts.gateway6.is_empty() {
        bail!("--dhcp6-range and --dhcp6-host need --gateway6 ADDRESS/PREFIX");
    }
    let Some(iface) = host_if.filter(|_| matches!(mode, Mode::HostOnly | Mode::Routed | Mode::Nat))
    else {
        bail!(
            "--gateway6 needs a network with a gateway (--mode host-only|routed|nat --gateway ...)"
        );
    };
    let mut gateways: Vec<Prefix6> = Vec::new();
    for g in &opts.gateway6 {
        let p: Prefix6 = g.parse()?;
        if let Some(o) = gateways
            .iter()
            .find(|o| o.contains(p.addr) || p.contains(o.addr))
        {
            bail!("IPv6 gateway {p} overlaps {o}");
        }
        gateways.push(p);
    }
    let mut plan = V6Plan {
        net: net.to_string(),
        iface: iface.to_string(),
        gateways,
        router: matches!(mode, Mode::Routed | Mode::Nat),
        mtu: opts.mtu,
        dns: !opts.no_dns,
        domain: opts.domain.clone(),
        range: None,
        hosts: Vec::new(),
        dns_hosts: Vec::new(),
        lease_time: opts.dhcp_lease.map_or(DEFAULT_LEASE6, Duration::from_secs),
    };
    let is_gateway = |a: Ipv6Addr, p: &V6Plan| p.gateways.iter().any(|g| g.addr == a);
    if let Some(r) = &opts.dhcp6_range {
        let (a, b) = parse_range6(r)?;
        let Some(g) = plan.gateways.iter().find(|g| g.contains(a)) else {
            bail!("--dhcp6-range '{r}': {a} is outside every --gateway6 prefix");
        };
        if !g.contains(b) {
            bail!("--dhcp6-range '{r}': {b} is outside {g}");
        }
        if (u128::from(a)..=u128::from(b)).contains(&u128::from(g.addr)) {
            bail!(
                "--dhcp6-range '{r}' holds the gateway's own address {}",
                g.addr
            );
        }
        plan.range = Some((a, b));
    }
    for h in &opts.dhcp6_hosts {
        let host = parse_host6(h)?;
        if !plan.within(host.ip) || is_gateway(host.ip, &plan) {
            bail!(
                "--dhcp6-host '{h}': {} is not a guest address of any --gateway6 prefix",
                host.ip
            );
        }
        plan.hosts.push(host);
    }
    for h in &opts.dns_hosts {
        let mut it = h.split(',').map(str::trim);
        let Some(Ok(ip)) = it.next().map(str::parse::<IpAddr>) else {
            continue; // checked (and refused) by the IPv4 plan
        };
        for name in it {
            plan.dns_hosts
                .push((name.trim_end_matches('.').to_ascii_lowercase(), ip));
        }
    }
    Ok(Some(plan))
}

/// Per-interface IPv6 sysctl path.
fn conf(iface: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv6/conf/{iface}/{key}")
}

/// Puts the plan on the gateway interface: IPv6 on, no DAD (the addresses
/// are ours; DNS binds to them at once), no RAs taken from guests, the
/// addresses, and forwarding for routed networks. The settings belong to
/// kvnet's own interface and go with it.
pub fn setup_gateway(plan: &V6Plan) -> Result<()> {
    let i = &plan.iface;
    for (key, v) in [
        ("disable_ipv6", "0"),
        ("accept_dad", "0"),
        ("accept_ra", "0"),
        ("forwarding", if plan.router { "1" } else { "0" }),
    ] {
        crate::host::write_sysctl(&conf(i, key), v)
            .with_context(|| format!("IPv6 on gateway {i}"))?;
    }
    // Linux forwards IPv6 only with all.forwarding unless the incoming
    // interface has force_forwarding (6.17+): kvnet's own links only.
    let ff = conf(i, "force_forwarding");
    if std::path::Path::new(&ff).exists() {
        crate::host::write_sysctl(&ff, if plan.router { "1" } else { "0" })?;
    } else if plan.router
        && crate::host::read_sysctl("/proc/sys/net/ipv6/conf/all/forwarding")? != "1"
    {
        log::warn!(
            "network {}: this kernel has no per-interface IPv6 forwarding (force_forwarding); set net.ipv6.conf.all.forwarding=1 to route IPv6",
            plan.net
        );
    }
    for g in &plan.gateways {
        crate::rtnl::addr6_add(i, g.addr, g.len)?;
    }
    Ok(())
}

/// The sysctl that lets IPv6 from the outside arrive on a routed uplink
/// be forwarded to guests (None on kernels without it).
pub fn uplink_forwarding_path(uplink: &str) -> Option<String> {
    let p = conf(uplink, "force_forwarding");
    std::path::Path::new(&p).exists().then_some(p)
}

/// The IPv6 servers of one network.
pub struct V6Servers {
    ra: ra::RaHandle,
    dhcp: Option<dhcp6::Dhcp6Handle>,
    dns: Option<crate::dns::DnsHandle>,
}

impl V6Servers {
    /// RAs, DHCPv6 and (unless off) DNS on the first gateway address;
    /// `names` are what the DNS answers besides DHCPv6's leases.
    pub async fn start(
        plan: V6Plan,
        names: crate::dns::Names,
        upstream: crate::dns::Upstream,
        binder: Option<savi::LeaseBinder>,
        store: Option<dhcp6::LeaseStore6>,
    ) -> Result<(V6Servers, crate::dns::Names)> {
        let dhcp = dhcp6::Dhcp6Server::start(&plan, binder, store).await?;
        let leases = dhcp.names();
        let own = plan.dns_hosts.clone();
        let v6_names: crate::dns::Names = std::sync::Arc::new(move || {
            let mut v = own.clone();
            v.extend(leases());
            v
        });
        let dns = match plan.resolver() {
            Some(addr) => {
                let cfg = crate::dns::DnsConfig {
                    net: plan.net.clone(),
                    listen: IpAddr::V6(addr),
                    iface: plan.iface.clone(),
                    domain: plan.domain.clone(),
                    upstream,
                };
                let (a, b) = (names, v6_names.clone());
                let all: crate::dns::Names = std::sync::Arc::new(move || {
                    let mut v = a();
                    v.extend(b());
                    v
                });
                match crate::dns::DnsServer::start(cfg, all).await {
                    Ok(d) => Some(d),
                    Err(e) => {
                        dhcp.stop().await;
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let ra = ra::RaHandle::start(&plan)?;
        Ok((
            V6Servers {
                ra,
                dhcp: Some(dhcp),
                dns,
            },
            v6_names,
        ))
    }

    pub async fn stop(self) {
        self.ra.stop().await;
        if let Some(d) = self.dhcp {
            d.stop().await;
        }
        if let Some(d) = self.dns {
            d.stop().await;
        }
    }

    pub fn leases(&self) -> Vec<dhcp6::Lease6Info> {
        self.dhcp.as_ref().map(|d| d.leases()).unwrap_or_default()
    }

    pub fn counters(&self) -> serde_json::Value {
        serde_json::json!({
            "ra": self.ra.counters(),
            "dhcp6": self.dhcp.as_ref().map(|d| d.counters()),
            "dns6": self.dns.as_ref().map(|d| d.counters()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::Mode;

    #[test]
    fn ipv6_sections_are_checked_field_by_field() {
        let gws = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let ok = gws(&["2001:db8:1::1/64", "fd00:1::1/64"]);
        let hosts = gws(&["52:54:00:00:00:05,2001:db8:1::5,web"]);
        assert_eq!(
            check_section(&ok, Some("2001:db8:1::100-2001:db8:1::1ff"), &hosts),
            Ok(())
        );
        let e = |g: &[&str], r: Option<&str>, h: &[&str]| {
            check_section(&gws(g), r, &gws(h)).unwrap_err()
        };
        let one = ["2001:db8:1::1/64"];
        for (err, want) in [
            (
                e(&["2001:db8:1::1"], None, &[]),
                "gateways[0]: IPv6 gateway '2001:db8:1::1' needs a prefix",
            ),
            (
                e(&["2001:db8:1::1/64", "2001:db8:1::2/48"], None, &[]),
                "gateways[1]: 2001:db8:1::2/48 overlaps",
            ),
            (
                e(&one, Some("2001:db8:9::1-2001:db8:9::9"), &[]),
                "dhcp_range '2001:db8:9::1-2001:db8:9::9': not inside",
            ),
            (
                e(&one, Some("2001:db8:1::9-2001:db8:1::1"), &[]),
                "dhcp_range: range '2001:db8:1::9-2001:db8:1::1' runs backwards",
            ),
            (
                e(&one, Some("2001:db8:1::1-2001:db8:1::9"), &[]),
                "holds the gateway's own address",
            ),
            (
                e(&one, None, &["52:54:00:00:00:05,2001:db8:7::5"]),
                "hosts[0]: 2001:db8:7::5 is not a guest address",
            ),
            (
                e(&one, None, &["52:54:00:00:00:05,2001:db8:1::1"]),
                "hosts[0]: 2001:db8:1::1 is not a guest address",
            ),
            (
                e(&one, None, &["52:54:00:00:00:05"]),
                "hosts[0]: '52:54:00:00:00:05': expected MAC,IPV6[,NAME]",
            ),
            (
                e(
                    &one,
                    None,
                    &[
                        "52:54:00:00:00:05,2001:db8:1::5",
                        "52:54:00:00:00:05,2001:db8:1::6",
                    ],
                ),
                "hosts[1]: MAC 52:54:00:00:00:05 is hosts[0]'s already",
            ),
            (
                e(
                    &one,
                    None,
                    &[
                        "52:54:00:00:00:05,2001:db8:1::5",
                        "52:54:00:00:00:06,2001:db8:1::5",
                    ],
                ),
                "hosts[1]: 2001:db8:1::5 is hosts[0]'s already",
            ),
        ] {
            assert!(err.contains(want), "{err} (wanted {want})");
        }
        // A /80: no SLAAC in it, a warning unless DHCPv6 serves it.
        let w = section_warnings(&gws(&["2001:db8:1::1/64", "2001:db8:2::1/80"]), None);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("gateways[1]: 2001:db8:2::1/80 is a /80: no SLAAC"),
            "{w:?}"
        );
        let served = Some("2001:db8:2::100-2001:db8:2::1ff");
        assert!(section_warnings(&gws(&["2001:db8:2::1/80"]), served).is_empty());
    }

    #[test]
    fn ipv6_gateways_parse_and_refuse() {
        let p: Prefix6 = "2001:db8:1::1/64".parse().unwrap();
        assert_eq!(p.network(), "2001:db8:1::".parse::<Ipv6Addr>().unwrap());
        assert!(p.contains("2001:db8:1::ffff".parse().unwrap()));
        assert!(!p.contains("2001:db8:2::1".parse().unwrap()));
        for (bad, why) in [
            ("2001:db8:1::1", "needs a prefix"),
            ("2001:db8:1::/64", "anycast"),
            ("fe80::1/64", "link-local"),
            ("ff02::1/64", "multicast"),
            ("2001:db8::1/130", "out of range"),
            ("10.0.0.1/24", "not an IPv6"),
        ] {
            let e = bad.parse::<Prefix6>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn ipv6_plan_checks_everything() {
        let mut o = NetOpts {
            gateway6: vec!["2001:db8:1::1/64".into(), "fd00:1::1/64".into()],
            dhcp6_range: Some("2001:db8:1::100-2001:db8:1::1ff".into()),
            dhcp6_hosts: vec!["52:54:00:00:00:05,2001:db8:1::5,web".into()],
            dns_hosts: vec!["2001:db8:1::50,db".into(), "10.0.0.5,v4".into()],
            ..Default::default()
        };
        let p = plan("n", &o, Mode::Routed, Some("kvnet-n"))
            .unwrap()
            .unwrap();
        assert!(p.router);
        assert_eq!(p.gateways.len(), 2);
        assert_eq!(p.hosts[0].name.as_deref(), Some("web"));
        assert_eq!(p.resolver(), Some("2001:db8:1::1".parse().unwrap()));
        assert_eq!(p.dns_hosts.len(), 2);
        let ho = plan("n", &o, Mode::HostOnly, Some("kvnet-n"))
            .unwrap()
            .unwrap();
        assert!(!ho.router);
        let e = plan("n", &o, Mode::Isolated, None).unwrap_err().to_string();
        assert!(e.contains("needs a network with a gateway"), "{e}");
        for (range, why) in [
            ("2001:db8:1::1-2001:db8:1::9", "gateway's own"),
            ("2001:db8:9::1-2001:db8:9::9", "outside"),
            ("2001:db8:1::9-2001:db8:1::1", "backwards"),
            ("2001:db8:1::9", "FIRST-LAST"),
        ] {
            o.dhcp6_range = Some(range.into());
            let e = plan("n", &o, Mode::Routed, Some("k"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{range}: {e}");
        }
        o.dhcp6_range = None;
        o.gateway6.push("2001:db8:1::2/48".into());
        let e = plan("n", &o, Mode::Routed, Some("k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlaps"), "{e}");
        let o = NetOpts {
            dhcp6_range: Some("2001:db8:1::100-2001:db8:1::1ff".into()),
            ..Default::default()
        };
        let e = plan("n", &o, Mode::Routed, Some("k"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("need --gateway6"), "{e}");
    }
}
