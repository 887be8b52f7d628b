//! Reading a config file: TOML with file:line:col errors, globs, warnings.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
};

use anyhow::{anyhow, bail, Context, Result};

use super::*;
use crate::{
    control::validate_net_name,
    gateway::{Cidr, Gateway},
};

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

pub fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, col)
}

/// The line of the first line of `text` that starts with `prefix`.
pub fn line_of(text: &str, needle: &str) -> Option<usize> {
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
            // The daemon would fail to create a longer name (IFNAMSIZ):
            // refuse it here, where the file and line are known.
            (Some(_), None) => Some(Gateway::default_name(n).map_err(|_| {
                anyhow!(
                    "{}: network '{n}': its default gateway interface name 'kvnet-{n}' is longer than 15 characters (the kernel's limit): set `gateway_iface = \"NAME\"`",
                    at(net_header(n))
                )
            })?),
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

pub fn net_header(name: &str) -> String {
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
        if let Some(v6) = &s.ipv6 {
            for x in crate::ipv6::section_warnings(&v6.gateways, v6.dhcp_range.as_deref()) {
                w.push(format!("network '{n}': {x}"));
            }
        }
    }
    w
}

/// "tcp/8080" -> "192.168.122.13:80": a network's forwards, comparable.
pub type Forwards = BTreeMap<String, String>;

pub fn forward_key(proto: &str, port: u16) -> String {
    format!("{proto}/{port}")
}

pub fn to_toml(cfg: &Config) -> Result<String> {
    toml::to_string(cfg).context("writing TOML")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{security::SecurityArgs, vlan::VlanCfg};

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

    /// `[networks.NAME.ipv6]`: carried to the daemon's options and back;
    /// wrong values pointed at.
    #[test]
    fn ipv6_section() {
        let text = r#"
[networks.lab]
mode = "routed"
gateway = "10.9.0.1/24"
uplink = "eth0"

[networks.lab.ipv6]
gateways = ["2001:db8:1::1/64", "2001:db8:2::1/64"]
dhcp_range = "2001:db8:1::100-2001:db8:1::1ff"
hosts = ["52:54:00:00:00:05,2001:db8:1::5,web"]
"#;
        let c = parse("k.toml", text).unwrap();
        let o = NetSpec::of("lab", &c.networks["lab"]).opts().unwrap();
        assert_eq!(o.gateway6, ["2001:db8:1::1/64", "2001:db8:2::1/64"]);
        assert_eq!(
            o.dhcp6_range.as_deref(),
            Some("2001:db8:1::100-2001:db8:1::1ff")
        );
        assert_eq!(o.dhcp6_hosts.len(), 1);
        let back = parse("k2.toml", &to_toml(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let e = err("[networks.a]\n[networks.a.ipv6]\ngateways = [\"2001:db8::1/64\"]\n");
        assert!(e.contains("`ipv6` needs a gateway"), "{e}");
        let net = "[networks.a]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\n";
        let e = err(&format!(
            "{net}[networks.a.ipv6]\ngateways = [\"fe80::1/64\"]\n"
        ));
        assert!(e.contains("link-local"), "{e}");
        let e = err(&format!("{net}[networks.a.ipv6]\ngateways = []\n"));
        assert!(e.contains("needs `gateways"), "{e}");
        // Static AAAA names on an IPv6-only resolver.
        let v6_names = format!(
            "{net}[networks.a.ipv6]\ngateways = [\"2001:db8::1/64\"]\n[[networks.a.dns_hosts]]\nip = \"2001:db8::7\"\nnames = [\"db\"]\n"
        );
        parse("f.toml", &v6_names).unwrap();
    }

    /// `nat6 = true` and IPv6 forwards: carried to the daemon's options and
    /// back; refused outside mode nat, or to an address off the prefixes.
    #[test]
    fn nat6_and_ipv6_forwards() {
        let net = "[networks.n]\nmode = \"nat\"\ngateway = \"10.9.0.1/24\"\nuplink = \"eth0\"\n";
        let v6 = "[networks.n.ipv6]\ngateways = [\"2001:db8:1::1/64\"]\nnat6 = true\n";
        let fwd = |to: &str| {
            format!("[[networks.n.forwards]]\nproto = \"tcp\"\nport = 2222\nto = \"{to}\"\n")
        };
        let text = format!("{net}{}{v6}", fwd("[2001:db8:1::5]:22"));
        let c = parse("k.toml", &text).unwrap();
        let spec = NetSpec::of("n", &c.networks["n"]);
        assert!(spec.opts().unwrap().nat6);
        assert_eq!(spec.forwards["tcp/2222"], "[2001:db8:1::5]:22");
        assert_eq!(parse("k2.toml", &to_toml(&c).unwrap()).unwrap(), c);
        let e = err(&format!("{net}{}{v6}", fwd("[2001:db8:9::5]:22")));
        assert!(e.contains("not a guest address"), "{e}");
        let e = err(&format!("{net}{}", fwd("[2001:db8:1::5]:22")));
        assert!(e.contains("need `ipv6.nat6`"), "{e}");
        let routed = net.replace("\"nat\"", "\"routed\"");
        let e = err(&format!("{routed}{v6}"));
        assert!(e.contains("needs mode nat"), "{e}");
    }

    /// The network keys libvirt's `<mtu>`, `<dns>` and `<vlan>` import to:
    /// parsed, carried to the daemon's options, wrong values pointed at.
    #[test]
    fn mtu_dns_and_port_vlan_keys() {
        let text = r#"
[networks.lab]
mode = "host-only"
gateway = "10.9.0.1/24"
mtu = 1400
port_trunk = [10, 20]
port_native = 10

[networks.lab.dhcp]
start = "10.9.0.100"
end = "10.9.0.200"

[[networks.lab.dns_hosts]]
ip = "10.9.0.7"
names = ["DB", "db.static.example."]

[networks.quiet]
mode = "host-only"
gateway = "10.8.0.1/24"
dns = false

[[ports]]
iface = "p1"
net = "lab"

[[ports]]
iface = "p2"
net = "lab"
vlan = 5
"#;
        let c = parse("k.toml", text).unwrap();
        let lab = &c.networks["lab"];
        assert_eq!(lab.mtu, Some(1400));
        assert_eq!(lab.dns_hosts[0].names, ["db", "db.static.example"]);
        assert_eq!(c.networks["quiet"].dns, Some(false));
        // A port without a VLAN takes the network's; one with its own keeps it.
        let vids = |i| wanted(&c, i).unwrap().0.vlan;
        assert_eq!(
            vids("p1"),
            VlanCfg::Trunk {
                vids: [10, 20].into(),
                native: Some(10)
            }
        );
        assert_eq!(vids("p2"), VlanCfg::Access { vid: 5 });
        let o = NetSpec::of("lab", lab).opts().unwrap();
        assert_eq!(
            (o.mtu, o.no_dns, o.dns_hosts.clone()),
            (
                Some(1400),
                false,
                vec!["10.9.0.7,db,db.static.example".to_string()]
            )
        );
        assert_eq!(dns_hosts_of(&o), lab.dns_hosts);
        assert!(
            NetSpec::of("quiet", &c.networks["quiet"])
                .opts()
                .unwrap()
                .no_dns
        );
        let back = parse("k2.toml", &to_toml(&c).unwrap()).unwrap();
        assert_eq!(back, c);

        let net = "[networks.a]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\n";
        let e = err(&format!("{net}mtu = 100\n"));
        assert!(e.starts_with("f.toml:4:7:") && e.contains("576"), "{e}");
        let e = err("[networks.a]\nmtu = 1400\n");
        assert!(e.starts_with("f.toml:1:") && e.contains("`mtu`"), "{e}");
        let dns_host = "[[networks.a.dns_hosts]]\nip = \"10.0.0.7\"\nnames = [\"a_b\"]\n";
        let e = err(&format!("{net}{dns_host}"));
        assert!(e.starts_with("f.toml:6:") && e.contains("'a_b'"), "{e}");
        let e = err(&format!(
            "{net}[[networks.a.dns_hosts]]\nip = \"10.0.0.7\"\nnames = [\"db\"]\n"
        ));
        assert!(e.contains("`dns_hosts` need `dhcp`"), "{e}");
        let e = err(&format!("{net}port_vlan = 5\nport_trunk = \"7\"\n"));
        assert!(e.starts_with("f.toml:1:") && e.contains("port_vlan"), "{e}");
        let e = err(&format!("{net}port_native = 5\n"));
        assert!(e.contains("port_native only applies to a trunk"), "{e}");
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
        let e = err("[networks.a]\nmode = \"nat\"\ngateway = \"10.0.0.1/24\"\nuplink = \"up0\"\n[networks.a.nat]\nudp = \"cone\"\n");
        assert!(
            e.starts_with("f.toml:6:") && e.contains("eim") && e.contains("symmetric"),
            "{e}"
        );
    }

    #[test]
    fn gateway_iface_names_fit_ifnamsiz() {
        // The default name kvnet-NAME is 21 characters here.
        let e =
            err("[networks.fifteen-chars-x]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\n");
        assert!(
            e.starts_with("f.toml:1:1:")
                && e.contains("'kvnet-fifteen-chars-x'")
                && e.contains("gateway_iface"),
            "{e}"
        );
        let ok = "[networks.fifteen-chars-x]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\ngateway_iface = \"virbr7\"\n";
        parse("f.toml", ok).unwrap();
        // No gateway, no interface: a long name is fine.
        parse(
            "f.toml",
            "[networks.fifteen-chars-x]\nmode = \"isolated\"\n",
        )
        .unwrap();
        let e = err("[networks.a]\nmode = \"host-only\"\ngateway = \"10.0.0.1/24\"\ngateway_iface = \"sixteen-chars-xx\"\n");
        assert!(
            e.starts_with("f.toml:4:") && e.contains("1-15 characters"),
            "{e}"
        );
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
}
