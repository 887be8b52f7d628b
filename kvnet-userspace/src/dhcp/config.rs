//! DHCP server configuration and the validation of `--dhcp-range` /
//! `--dhcp-host` values.
use std::net::Ipv4Addr;
use std::time::Duration;

use crate::mac::Mac;

/// A fixed MAC-to-address binding (libvirt's `<host mac= ip= name=/>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticHost {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub name: Option<String>,
}

/// One network's DHCP server.
#[derive(Debug, Clone)]
pub struct DhcpConfig {
    /// The gateway interface the server binds to (SO_BINDTODEVICE).
    pub iface: String,
    /// The gateway address: server identifier, router and DNS server.
    pub server_ip: Ipv4Addr,
    pub prefix: u8,
    /// First and last address handed out dynamically (inclusive).
    pub range: (Ipv4Addr, Ipv4Addr),
    pub hosts: Vec<StaticHost>,
    pub lease_time: Duration,
    pub domain: Option<String>,
    pub mtu: Option<u16>,
    /// The gateway serves DNS (and DHCP names it, option 6).
    pub dns: bool,
    /// Static DNS names (name, address) answered besides the leases'.
    /// Static DNS names (IPv4: A, IPv6: AAAA).
    pub dns_hosts: Vec<(String, std::net::IpAddr)>,
    /// Any further option by number, sent as given (replaces a built-in one
    /// with the same number).
    pub extra_options: Vec<(u8, Vec<u8>)>,
}

pub const DEFAULT_LEASE: Duration = Duration::from_secs(3600);

/// The netmask of a prefix length (0..=32).
pub fn netmask(prefix: u8) -> Ipv4Addr {
    if prefix == 0 {
        Ipv4Addr::UNSPECIFIED
    } else {
        Ipv4Addr::from(u32::MAX << (32 - u32::from(prefix.min(32))))
    }
}

pub fn network(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & u32::from(netmask(prefix)))
}

pub fn broadcast(ip: Ipv4Addr, prefix: u8) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) | !u32::from(netmask(prefix)))
}

pub fn in_subnet(ip: Ipv4Addr, net_ip: Ipv4Addr, prefix: u8) -> bool {
    network(ip, prefix) == network(net_ip, prefix)
}

/// `192.168.122.1/24` -> (address, prefix).
pub fn parse_cidr(s: &str) -> Result<(Ipv4Addr, u8), String> {
    let (ip, prefix) = s.split_once('/').ok_or_else(|| {
        format!("invalid address '{s}': expected IPv4/PREFIX like 192.168.122.1/24")
    })?;
    let ip: Ipv4Addr = ip
        .trim()
        .parse()
        .map_err(|_| format!("invalid address '{s}': '{ip}' is not an IPv4 address"))?;
    let prefix: u8 = prefix
        .trim()
        .parse()
        .ok()
        .filter(|p| (8..=30).contains(p))
        .ok_or_else(|| {
            format!("invalid address '{s}': prefix '{prefix}' must be a number from 8 to 30")
        })?;
    Ok((ip, prefix))
}

fn parse_ip(what: &str, whole: &str, s: &str) -> Result<Ipv4Addr, String> {
    s.trim()
        .parse()
        .map_err(|_| format!("invalid {what} '{whole}': '{s}' is not an IPv4 address"))
}

/// `--dhcp-range A,B`.
pub fn parse_range(s: &str) -> Result<(Ipv4Addr, Ipv4Addr), String> {
    let (a, b) = s.split_once(',').ok_or_else(|| {
        format!(
            "invalid --dhcp-range '{s}': expected FIRST,LAST like 192.168.122.2,192.168.122.254"
        )
    })?;
    let a = parse_ip("--dhcp-range", s, a)?;
    let b = parse_ip("--dhcp-range", s, b)?;
    if u32::from(a) > u32::from(b) {
        return Err(format!(
            "invalid --dhcp-range '{s}': the first address {a} is above the last {b}"
        ));
    }
    Ok((a, b))
}

pub use crate::dnsname::{valid_domain, valid_hostname};

/// `--dhcp-host MAC,IP[,NAME]`.
pub fn parse_host(s: &str) -> Result<StaticHost, String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if !(2..=3).contains(&parts.len()) {
        return Err(format!(
            "invalid --dhcp-host '{s}': expected MAC,IP[,NAME] like 52:54:00:00:00:05,192.168.122.5,web"
        ));
    }
    let mac: Mac = parts[0]
        .parse()
        .map_err(|e| format!("invalid --dhcp-host '{s}': {e}"))?;
    if mac.is_multicast() || mac.is_zero() {
        return Err(format!(
            "invalid --dhcp-host '{s}': {mac} is not a unicast MAC address"
        ));
    }
    let ip = parse_ip("--dhcp-host", s, parts[1])?;
    let name = match parts.get(2) {
        None => None,
        Some(n) if valid_hostname(n) => Some(n.to_ascii_lowercase()),
        Some(n) => {
            return Err(format!(
                "invalid --dhcp-host '{s}': name '{n}' must be 1-63 letters, digits or '-' (no dots, not starting or ending with '-')"
            ))
        }
    };
    Ok(StaticHost { mac, ip, name })
}

/// Is `ip` a usable host address of the gateway's subnet other than the
/// gateway itself? `what` names the value in the error.
fn check_host_addr(what: &str, ip: Ipv4Addr, gw: Ipv4Addr, prefix: u8) -> Result<(), String> {
    let net = network(gw, prefix);
    if !in_subnet(ip, gw, prefix) {
        return Err(format!(
            "{what}: {ip} is outside the network {net}/{prefix}"
        ));
    }
    if ip == net {
        return Err(format!(
            "{what}: {ip} is the network address of {net}/{prefix}"
        ));
    }
    if ip == broadcast(gw, prefix) {
        return Err(format!(
            "{what}: {ip} is the broadcast address of {net}/{prefix}"
        ));
    }
    if ip == gw {
        return Err(format!("{what}: {ip} is the gateway's own address"));
    }
    Ok(())
}

/// The range lies in the gateway's subnet and holds neither the network,
/// broadcast nor gateway address.
pub fn validate_range(range: (Ipv4Addr, Ipv4Addr), gw: Ipv4Addr, prefix: u8) -> Result<(), String> {
    let (a, b) = range;
    let what = format!("--dhcp-range {a},{b}");
    if u32::from(a) > u32::from(b) {
        return Err(format!("{what}: the first address is above the last"));
    }
    check_host_addr(&what, a, gw, prefix)?;
    check_host_addr(&what, b, gw, prefix)?;
    if (u32::from(a)..=u32::from(b)).contains(&u32::from(gw)) {
        return Err(format!(
            "{what}: the range contains the gateway's address {gw}"
        ));
    }
    Ok(())
}

impl DhcpConfig {
    /// A config with defaults for everything but the interface, gateway
    /// address and range.
    pub fn new(iface: &str, server_ip: Ipv4Addr, prefix: u8, range: (Ipv4Addr, Ipv4Addr)) -> Self {
        DhcpConfig {
            iface: iface.to_string(),
            server_ip,
            prefix,
            range,
            hosts: Vec::new(),
            lease_time: DEFAULT_LEASE,
            domain: None,
            mtu: None,
            dns: true,
            dns_hosts: Vec::new(),
            extra_options: Vec::new(),
        }
    }

    /// Check the whole config; the error says which value is wrong and why.
    pub fn validate(&self) -> Result<(), String> {
        if self.iface.is_empty() || self.iface.len() > 15 {
            return Err(format!(
                "interface name '{}' must be 1-15 characters",
                self.iface
            ));
        }
        if !(8..=30).contains(&self.prefix) {
            return Err(format!("prefix /{} must be from 8 to 30", self.prefix));
        }
        let gw = self.server_ip;
        let net = network(gw, self.prefix);
        if gw == net || gw == broadcast(gw, self.prefix) {
            return Err(format!(
                "gateway address {gw} is the network or broadcast address of {net}/{}",
                self.prefix
            ));
        }
        validate_range(self.range, gw, self.prefix)?;
        for (i, h) in self.hosts.iter().enumerate() {
            let what = format!("--dhcp-host {},{}", h.mac, h.ip);
            check_host_addr(&what, h.ip, gw, self.prefix)?;
            for o in &self.hosts[..i] {
                if o.mac == h.mac {
                    return Err(format!("{what}: MAC {} is given twice", h.mac));
                }
                if o.ip == h.ip {
                    return Err(format!("{what}: address {} is given twice", h.ip));
                }
                if h.name.is_some() && o.name == h.name {
                    return Err(format!(
                        "{what}: name '{}' is given twice",
                        h.name.as_deref().unwrap_or_default()
                    ));
                }
            }
        }
        if self.lease_time < Duration::from_secs(4)
            || self.lease_time.as_secs() > u64::from(u32::MAX - 1)
        {
            return Err(format!(
                "lease time {}s must be from 4 seconds to about 136 years",
                self.lease_time.as_secs()
            ));
        }
        if let Some(d) = &self.domain {
            if !valid_domain(d) {
                return Err(format!("--domain '{d}' is not a valid DNS domain"));
            }
        }
        if let Some(m) = self.mtu {
            if m < 576 {
                return Err(format!("MTU {m} is below the minimum of 576"));
            }
        }
        for (code, data) in &self.extra_options {
            if matches!(code, 0 | 50..=55 | 255) {
                return Err(format!(
                    "option {code} is managed by the server and cannot be set"
                ));
            }
            if data.len() > 255 {
                return Err(format!(
                    "option {code}: value of {} bytes is over 255",
                    data.len()
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn dhcp_parse_range() {
        assert_eq!(
            parse_range("192.168.122.2,192.168.122.254").unwrap(),
            (ip("192.168.122.2"), ip("192.168.122.254"))
        );
        assert_eq!(
            parse_range(" 10.0.0.5 , 10.0.0.5 ").unwrap(),
            (ip("10.0.0.5"), ip("10.0.0.5"))
        );
        let e = parse_range("10.0.0.5").unwrap_err();
        assert!(e.contains("'10.0.0.5'") && e.contains("FIRST,LAST"), "{e}");
        let e = parse_range("10.0.0.5,10.0.0.300").unwrap_err();
        assert!(e.contains("'10.0.0.300' is not an IPv4 address"), "{e}");
        let e = parse_range("10.0.0.9,10.0.0.5").unwrap_err();
        assert!(e.contains("above the last"), "{e}");
    }

    #[test]
    fn dhcp_parse_host() {
        let h = parse_host("52:54:00:AA:bb:01,192.168.122.5,Web-1").unwrap();
        assert_eq!(h.mac.to_string(), "52:54:00:aa:bb:01");
        assert_eq!(h.ip, ip("192.168.122.5"));
        assert_eq!(h.name.as_deref(), Some("web-1"));
        assert_eq!(
            parse_host("52:54:00:aa:bb:01,192.168.122.5").unwrap().name,
            None
        );
        for (bad, why) in [
            ("52:54:00:aa:bb:01", "MAC,IP[,NAME]"),
            ("52:54:00:aa:bb,192.168.122.5", "invalid MAC"),
            ("ff:ff:ff:ff:ff:ff,192.168.122.5", "not a unicast"),
            (
                "52:54:00:aa:bb:01,192.168.122",
                "'192.168.122' is not an IPv4",
            ),
            ("52:54:00:aa:bb:01,192.168.122.5,a.b", "name 'a.b'"),
            ("52:54:00:aa:bb:01,192.168.122.5,-x", "name '-x'"),
            ("52:54:00:aa:bb:01,192.168.122.5,x,y", "MAC,IP[,NAME]"),
        ] {
            let e = parse_host(bad).unwrap_err();
            assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn dhcp_range_in_subnet() {
        let gw = ip("192.168.122.1");
        assert!(validate_range((ip("192.168.122.2"), ip("192.168.122.254")), gw, 24).is_ok());
        for (a, b, why) in [
            ("192.168.122.0", "192.168.122.10", "network address"),
            ("192.168.122.2", "192.168.122.255", "broadcast address"),
            ("192.168.122.1", "192.168.122.10", "gateway's own"),
            (
                "192.168.121.2",
                "192.168.122.10",
                "outside the network 192.168.122.0/24",
            ),
            ("192.168.122.2", "192.168.123.10", "outside"),
        ] {
            let e = validate_range((ip(a), ip(b)), gw, 24).unwrap_err();
            assert!(e.contains(why), "{a},{b}: {e}");
        }
        let e = validate_range((ip("10.0.0.2"), ip("10.0.0.20")), ip("10.0.0.10"), 24).unwrap_err();
        assert!(
            e.contains("contains the gateway's address 10.0.0.10"),
            "{e}"
        );
    }

    #[test]
    fn dhcp_config_validate() {
        let mut c = DhcpConfig::new(
            "kvnet-default",
            ip("192.168.122.1"),
            24,
            (ip("192.168.122.2"), ip("192.168.122.254")),
        );
        c.domain = Some("lab.test".into());
        c.hosts
            .push(parse_host("52:54:00:00:00:01,192.168.122.5,a").unwrap());
        assert!(c.validate().is_ok());
        c.hosts
            .push(parse_host("52:54:00:00:00:02,192.168.122.5,b").unwrap());
        assert!(c.validate().unwrap_err().contains("given twice"));
        c.hosts.pop();
        c.hosts
            .push(parse_host("52:54:00:00:00:02,10.0.0.5").unwrap());
        assert!(c.validate().unwrap_err().contains("outside the network"));
        c.hosts.pop();
        c.domain = Some("bad_domain".into());
        assert!(c.validate().unwrap_err().contains("--domain"));
        c.domain = None;
        c.extra_options.push((53, vec![1]));
        assert!(c.validate().unwrap_err().contains("option 53"));
    }

    #[test]
    fn dhcp_masks() {
        assert_eq!(netmask(24), ip("255.255.255.0"));
        assert_eq!(netmask(30), ip("255.255.255.252"));
        assert_eq!(broadcast(ip("10.1.2.3"), 16), ip("10.1.255.255"));
        assert_eq!(
            parse_cidr("192.168.122.1/24").unwrap(),
            (ip("192.168.122.1"), 24)
        );
        assert!(parse_cidr("192.168.122.1")
            .unwrap_err()
            .contains("IPv4/PREFIX"));
        assert!(parse_cidr("192.168.122.1/31")
            .unwrap_err()
            .contains("prefix '31'"));
    }
}
