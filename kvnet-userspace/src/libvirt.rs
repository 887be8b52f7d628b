//! `kvnet import-libvirt FILE.xml`: a libvirt network definition turned
//! into kvnet config, with a warning for each thing that does not carry over.
use std::net::Ipv4Addr;

use anyhow::{bail, Context, Result};

use crate::config::{
    Checked, Config, DhcpHost, DhcpSection, ForwardSection, NatSection, NetSection,
};
use crate::gateway::Cidr;

/// The interface of the host's IPv4 default route, if any.
pub fn default_route_iface() -> Option<String> {
    let t = std::fs::read_to_string("/proc/net/route").ok()?;
    t.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 7 && f[1] == "00000000" && f[7] == "00000000").then(|| f[0].to_string())
    })
}

/// The kvnet config for one libvirt `<network>`, and the warnings.
///
/// `uplink`: the NIC for a nat or routed network (`--uplink`); it wins over
/// the XML's `<forward dev>`. libvirt NATs out of whichever interface routes
/// a packet; kvnet masquerades behind one uplink, so a nat network without
/// either gets the interface of the host's default route (`default_uplink`),
/// with a warning saying so.
pub fn import_with(
    xml: &str,
    uplink: Option<&str>,
    default_uplink: Option<String>,
) -> Result<(Config, Vec<String>)> {
    let doc = roxmltree::Document::parse(xml).context("parsing the network XML")?;
    let net = doc.root_element();
    if net.tag_name().name() != "network" {
        bail!(
            "expected a libvirt <network> definition, found <{}>",
            net.tag_name().name()
        );
    }
    let mut warn = Vec::new();
    fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
        n.children()
            .find(|c| c.is_element() && c.tag_name().name() == tag)
    }
    let name = child(net, "name")
        .and_then(|n| n.text())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .context("the network has no <name>")?
        .to_string();
    crate::switch::validate_net_name(&name)?;

    let mut sec = NetSection {
        mode: "isolated".into(),
        ..Default::default()
    };
    let forward = child(net, "forward");
    let fmode = forward.map(|f| f.attribute("mode").unwrap_or("nat"));
    sec.mode = match fmode {
        None => "isolated".into(), // host-only once it has an <ip>
        Some("nat") => "nat".into(),
        Some("route") => "routed".into(),
        Some("open") => {
            warn.push(
                "forward mode 'open' (no firewall rules) becomes mode routed; kvnet installs no firewall rules either"
                    .into(),
            );
            "routed".into()
        }
        Some("bridge") => "bridged".into(),
        Some(m) => {
            warn.push(format!(
                "forward mode '{m}' has no kvnet equivalent: the network is imported as isolated"
            ));
            "isolated".into()
        }
    };
    if let Some(f) = forward {
        if let Some(dev) = f.attribute("dev") {
            sec.uplink = Some(dev.to_string());
        }
        let ifaces: Vec<&str> = f
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == "interface")
            .filter_map(|c| c.attribute("dev"))
            .collect();
        if sec.uplink.is_none() {
            sec.uplink = ifaces.first().map(|s| s.to_string());
        }
        if ifaces.len() > 1 {
            warn.push(format!(
                "forward interface pool ({}): kvnet takes one uplink, '{}'",
                ifaces.join(", "),
                ifaces[0]
            ));
        }
        if let Some(nat) = child(f, "nat") {
            if let Some(p) = child(nat, "port") {
                let start: u16 = p.attribute("start").unwrap_or("1024").parse()?;
                let end: u16 = p.attribute("end").unwrap_or("65535").parse()?;
                sec.nat = Some(NatSection {
                    port_range: Some([start, end]),
                    udp: None,
                });
            }
            if child(nat, "address").is_some() {
                warn.push("<nat><address> (SNAT address range) is not carried over: kvnet NATs to the uplink's address".into());
            }
        }
    }
    if sec.mode == "bridged" && sec.uplink.is_none() {
        if let Some(b) = child(net, "bridge").and_then(|b| b.attribute("name")) {
            warn.push(format!(
                "forward mode bridge onto the existing host bridge '{b}': kvnet needs the NIC itself; uplink set to '{b}', change it to the physical NIC"
            ));
            sec.uplink = Some(b.to_string());
        } else {
            bail!("forward mode bridge without a dev or bridge name: no uplink to use");
        }
    }
    if matches!(sec.mode.as_str(), "isolated" | "host-only") {
        sec.uplink = None;
    }
    if let Some(b) = child(net, "bridge") {
        if sec.mode != "bridged" {
            if let Some(n) = b.attribute("name") {
                sec.gateway_iface = Some(n.to_string());
            }
        }
        for attr in ["stp", "delay", "macTableManager", "zone"] {
            if let Some(v) = b.attribute(attr) {
                warn.push(format!(
                    "<bridge {attr}='{v}'> is not carried over: kvnet has no Linux bridge"
                ));
            }
        }
    }
    if let Some(m) = child(net, "mac").and_then(|m| m.attribute("address")) {
        warn.push(format!(
            "bridge MAC address {m} is not carried over: the gateway interface gets a random MAC"
        ));
    }
    for tag in [
        "uuid",
        "domain",
        "dns",
        "mtu",
        "bandwidth",
        "vlan",
        "portgroup",
        "route",
        "virtualport",
    ] {
        for n in net
            .children()
            .filter(|c| c.is_element() && c.tag_name().name() == tag)
        {
            let detail = match tag {
                "uuid" => continue,
                "domain" => format!(
                    "<domain name='{}'> is not carried over (no DNS domain setting in kvnet yet)",
                    n.attribute("name").unwrap_or("")
                ),
                "dns" => "<dns> entries (hosts, forwarders, srv, txt) are not carried over".into(),
                t => format!("<{t}> is not carried over"),
            };
            warn.push(detail);
        }
    }
    let ips: Vec<roxmltree::Node<'_, '_>> = net
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "ip")
        .collect();
    let mut v4 = ips
        .iter()
        .filter(|ip| ip.attribute("family").unwrap_or("ipv4") == "ipv4");
    for ip in ips
        .iter()
        .filter(|ip| ip.attribute("family").unwrap_or("ipv4") != "ipv4")
    {
        warn.push(format!(
            "<ip family='{}' address='{}'> is not carried over: kvnet networks are IPv4",
            ip.attribute("family").unwrap_or(""),
            ip.attribute("address").unwrap_or("")
        ));
    }
    if let Some(ip) = v4.next() {
        let addr: Ipv4Addr = ip
            .attribute("address")
            .context("<ip> without address")?
            .parse()
            .context("<ip address>")?;
        let prefix = match (ip.attribute("prefix"), ip.attribute("netmask")) {
            (Some(p), _) => p.parse::<u8>().context("<ip prefix>")?,
            (None, Some(m)) => {
                let m = u32::from(m.parse::<Ipv4Addr>().context("<ip netmask>")?);
                if m.leading_ones() + m.trailing_zeros() != 32 {
                    bail!("<ip netmask> is not a contiguous mask");
                }
                m.leading_ones() as u8
            }
            (None, None) => 24,
        };
        let cidr = format!("{addr}/{prefix}");
        cidr.parse::<Cidr>()?;
        if sec.mode == "bridged" {
            warn.push(format!(
                "<ip address='{addr}'> is ignored: a bridged network has no gateway"
            ));
        } else if sec.mode == "isolated" {
            sec.mode = "host-only".into();
            sec.gateway = Some(cidr);
        } else {
            sec.gateway = Some(cidr);
        }
        if let Some(d) = child(*ip, "dhcp") {
            let range = child(d, "range");
            let hosts: Vec<DhcpHost> = d
                .children()
                .filter(|c| c.is_element() && c.tag_name().name() == "host")
                .map(|h| -> Result<DhcpHost> {
                    Ok(DhcpHost {
                        mac: h
                            .attribute("mac")
                            .context("<host> without mac (id-only hosts are not supported)")?
                            .to_ascii_lowercase(),
                        ip: h.attribute("ip").context("<host> without ip")?.parse()?,
                        name: h.attribute("name").map(Into::into),
                    })
                })
                .collect::<Result<_>>()?;
            if d.children()
                .filter(|c| c.is_element() && c.tag_name().name() == "range")
                .count()
                > 1
            {
                warn.push("several <dhcp><range>s: only the first is carried over".into());
            }
            if child(d, "bootp").is_some() {
                warn.push("<dhcp><bootp> (PXE boot) is not carried over".into());
            }
            match range {
                Some(r) => {
                    sec.dhcp = Some(DhcpSection {
                        start: r
                            .attribute("start")
                            .context("<range> without start")?
                            .parse()?,
                        end: r.attribute("end").context("<range> without end")?.parse()?,
                        hosts,
                        lease_secs: None,
                        domain: None,
                    });
                    if sec.mode == "bridged" {
                        warn.push("DHCP on a bridged network is dropped".into());
                        sec.dhcp = None;
                    }
                }
                None => warn.push("<dhcp> without <range> is not carried over".into()),
            }
        }
        if let Some(t) = child(*ip, "tftp") {
            warn.push(format!(
                "<tftp root='{}'> is not carried over",
                t.attribute("root").unwrap_or("")
            ));
        }
    } else if matches!(sec.mode.as_str(), "nat" | "routed") {
        bail!("forward mode {} needs an <ip address>", sec.mode);
    }
    for ip in v4 {
        warn.push(format!(
            "extra <ip address='{}'> is not carried over: kvnet takes one gateway per network",
            ip.attribute("address").unwrap_or("")
        ));
    }
    if sec.mode != "nat" {
        sec.nat = None;
    }
    if let Some(u) = uplink {
        if matches!(sec.mode.as_str(), "nat" | "routed" | "bridged") {
            sec.uplink = Some(u.to_string());
        } else {
            warn.push(format!(
                "--uplink {u} is ignored: a {} network has no uplink",
                sec.mode
            ));
        }
    }
    if sec.mode == "nat" && sec.uplink.is_none() {
        match default_uplink {
            Some(u) => {
                warn.push(format!(
                    "no <forward dev>: uplink set to '{u}' (the host's default route); pass --uplink IFACE to choose the NIC to masquerade behind"
                ));
                sec.uplink = Some(u);
            }
            None => bail!(
                "forward mode nat without <forward dev> and the host has no default route: pass --uplink IFACE (the NIC to masquerade behind)"
            ),
        }
    }
    // libvirt has no port forwards in a network definition.
    let forwards: Vec<ForwardSection> = Vec::new();
    sec.forwards = forwards;
    let mut cfg = Config::default();
    cfg.networks.insert(name, Checked(sec));
    Ok((cfg, warn))
}

/// [`import_with`] with the host's default route as the fallback uplink.
pub fn import(xml: &str, uplink: Option<&str>) -> Result<(Config, Vec<String>)> {
    import_with(xml, uplink, default_route_iface())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn import(xml: &str) -> Result<(Config, Vec<String>)> {
        import_with(xml, None, Some("eth9".into()))
    }

    const DEFAULT_NET: &str = "<network><name>default</name><forward mode='nat'><nat><port start='1024' end='65535'/></nat>
   </forward><bridge name='virbr0' stp='on' delay='0'/><ip address='192.168.122.1'
   netmask='255.255.255.0'><dhcp><range start='192.168.122.2' end='192.168.122.254'/><host
   mac='00:25:90:eb:4b:bb' name='guest1' ip='192.168.122.13'/></dhcp></ip></network>";

    fn roundtrip(cfg: &Config) -> Config {
        let text = crate::config::to_toml(cfg).unwrap();
        crate::config::parse("imported.toml", &text).unwrap()
    }

    #[test]
    fn default_network() {
        let (cfg, warn) = import(DEFAULT_NET).unwrap();
        let n = &cfg.networks["default"];
        assert_eq!(n.mode, "nat");
        assert_eq!(n.uplink.as_deref(), Some("eth9"));
        assert!(warn.iter().any(|w| w.contains("--uplink")), "{warn:?}");
        let (c2, w2) = import_with(DEFAULT_NET, Some("up0"), None).unwrap();
        assert_eq!(c2.networks["default"].uplink.as_deref(), Some("up0"));
        assert!(!w2.iter().any(|w| w.contains("default route")), "{w2:?}");
        assert!(import_with(DEFAULT_NET, None, None)
            .unwrap_err()
            .to_string()
            .contains("--uplink"));
        assert_eq!(n.gateway.as_deref(), Some("192.168.122.1/24"));
        assert_eq!(n.gateway_iface.as_deref(), Some("virbr0"));
        assert_eq!(n.nat.as_ref().unwrap().port_range, Some([1024, 65535]));
        let d = n.dhcp.as_ref().unwrap();
        assert_eq!(d.start.to_string(), "192.168.122.2");
        assert_eq!(d.end.to_string(), "192.168.122.254");
        assert_eq!(d.hosts.len(), 1);
        assert_eq!(d.hosts[0].mac, "00:25:90:eb:4b:bb");
        assert_eq!(d.hosts[0].ip.to_string(), "192.168.122.13");
        assert_eq!(d.hosts[0].name.as_deref(), Some("guest1"));
        assert!(warn.iter().any(|w| w.contains("stp")), "{warn:?}");
        assert!(warn.iter().any(|w| w.contains("delay")), "{warn:?}");
        assert_eq!(roundtrip(&cfg), cfg);
    }

    #[test]
    fn routed_with_dev_and_extras() {
        let xml = r#"<network>
  <name>r1</name>
  <uuid>0f7b6a43-5e3a-4f1b-9a3c-4d5c9f0b3c11</uuid>
  <forward mode="route" dev="eth1"/>
  <bridge name="virbr5" stp="off"/>
  <mac address="52:54:00:aa:bb:cc"/>
  <domain name="lab.example"/>
  <dns><host ip="10.20.0.9"><hostname>x</hostname></host></dns>
  <ip address="10.20.0.1" prefix="24"/>
  <ip family="ipv6" address="fd00::1" prefix="64"/>
</network>"#;
        let (cfg, warn) = import(xml).unwrap();
        let n = &cfg.networks["r1"];
        assert_eq!(n.mode, "routed");
        assert_eq!(n.uplink.as_deref(), Some("eth1"));
        assert_eq!(n.gateway.as_deref(), Some("10.20.0.1/24"));
        assert_eq!(n.gateway_iface.as_deref(), Some("virbr5"));
        for w in ["52:54:00:aa:bb:cc", "lab.example", "<dns>", "ipv6", "stp"] {
            assert!(warn.iter().any(|x| x.contains(w)), "{w} not in {warn:?}");
        }
        assert_eq!(roundtrip(&cfg), cfg);
    }

    #[test]
    fn isolated_host_only_and_bridge() {
        // No <forward>: libvirt's "isolated" network (guests and host).
        let (cfg, _) = import(
            "<network><name>iso</name><bridge name='virbr9'/><ip address='10.30.0.1' netmask='255.255.0.0'/></network>",
        )
        .unwrap();
        let n = &cfg.networks["iso"];
        assert_eq!(n.mode, "host-only");
        assert_eq!(n.gateway.as_deref(), Some("10.30.0.1/16"));
        assert!(n.uplink.is_none());
        roundtrip(&cfg);
        // No address at all: guests only.
        let (cfg, _) = import("<network><name>l2</name></network>").unwrap();
        assert_eq!(cfg.networks["l2"].mode, "isolated");
        roundtrip(&cfg);
        // Bridge mode onto a NIC.
        let (cfg, warn) = import(
            "<network><name>br</name><forward mode='bridge'><interface dev='eno1'/><interface dev='eno2'/></forward></network>",
        )
        .unwrap();
        let n = &cfg.networks["br"];
        assert_eq!(n.mode, "bridged");
        assert_eq!(n.uplink.as_deref(), Some("eno1"));
        assert!(warn.iter().any(|w| w.contains("eno2")), "{warn:?}");
        roundtrip(&cfg);
        // Bridge mode onto a host bridge: imported, with a warning.
        let (cfg, warn) = import(
            "<network><name>hb</name><forward mode='bridge'/><bridge name='br0'/></network>",
        )
        .unwrap();
        assert_eq!(cfg.networks["hb"].uplink.as_deref(), Some("br0"));
        assert!(warn.iter().any(|w| w.contains("br0")), "{warn:?}");
        // Modes without an equivalent.
        let (cfg, warn) =
            import("<network><name>h</name><forward mode='hostdev'/></network>").unwrap();
        assert_eq!(cfg.networks["h"].mode, "isolated");
        assert!(warn.iter().any(|w| w.contains("hostdev")));
    }

    #[test]
    fn bad_input() {
        assert!(import("<domain/>").is_err());
        assert!(import("<network>").is_err());
        assert!(import("<network><forward mode='nat'/></network>").is_err());
        assert!(import("<network><name>x</name><forward mode='nat'/></network>").is_err());
        assert!(import(
            "<network><name>x</name><ip address='10.0.0.1' netmask='255.0.255.0'/></network>"
        )
        .is_err());
    }
}
