//! Issue 20 point 2: libvirt network XML that `kvnet import-libvirt` turns
//! into config, applied and checked on the wire with clients nobody here
//! wrote (busybox udhcpc, dig): `<domain>` (DHCP option 15, NAME.DOMAIN in
//! DNS), `<dns><host>` (A and PTR), `<dns enable='no'>` (no DNS server, no
//! option 6), `<mtu>` (the gateway link and option 26), `<lease expiry>`
//! (option 51), a dotted `<dhcp><host name>`, and a network-wide `<vlan>`
//! (ports without one of their own are tagged with it); issue 17 point 4:
//! `<ip family='ipv6'>` (SLAAC from kvnet's RA, dhclient -6 gets a host
//! matched by the MAC in its DUID, AAAA). Run as root.
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use kvnet_tests::clients::{dhclient6, field, wait_first_event};
use kvnet_tests::{
    count_frames, eth_frame, inject, kvnet::Kvnet, lab::privileged, Capture, Frame, GuestPort, Lab,
};

const GW: &str = "10.79.0.1";
const DOMAIN: &str = "lab.example";
/// The MAC of the guest with a `<dhcp><host>` reservation.
const WEB_MAC: &str = "52:54:00:4c:00:02";

/// The network as libvirt has it; `dns` is the `<dns>` element.
fn network_xml(dns: &str) -> String {
    format!(
        "<network>
  <name>lv</name>
  <domain name='{DOMAIN}'/>
  <mtu size='1400'/>
  {dns}
  <ip address='{GW}' prefix='24'>
    <dhcp>
      <range start='10.79.0.10' end='10.79.0.50'><lease expiry='2' unit='hours'/></range>
      <host mac='{WEB_MAC}' name='web.{DOMAIN}' ip='10.79.0.20'/>
    </dhcp>
  </ip>
</network>
"
    )
}

const DNS_HOSTS: &str = "<dns><host ip='10.79.0.77'><hostname>db</hostname><hostname>db.static.example</hostname></host></dns>";

fn write(lab: &Lab, name: &str, text: &str) -> PathBuf {
    let p = lab.work_dir().join(name);
    fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `kvnet import-libvirt XML [ARGS]` (no daemon needed): the config text
/// and the warnings.
fn import(k: &Kvnet, xml: &Path, args: &[&str]) -> (String, String) {
    let o = Command::new(k.bin())
        .arg("import-libvirt")
        .arg(xml)
        .args(args)
        .output()
        .unwrap();
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    );
    assert!(
        o.status.success(),
        "import-libvirt {}: {err}",
        xml.display()
    );
    (out, err)
}

/// Imports `xml_text`, checks and applies the result (plus `extra` config).
fn import_apply(lab: &Lab, k: &Kvnet, tag: &str, xml_text: &str, extra: &str) -> String {
    let xml = write(lab, &format!("{tag}.xml"), xml_text);
    let (toml, warnings) = import(k, &xml, &[]);
    let f = write(lab, &format!("{tag}.toml"), &format!("{toml}{extra}"));
    k.cli(&["check", s(&f)]).unwrap();
    k.cli(&["apply", s(&f)]).unwrap();
    warnings
}

/// udhcpc once (`-q`), asking for the MTU too; its `bound` line with what
/// the server handed out, as `key=value` fields.
fn udhcpc(lab: &Lab, g: &GuestPort, tag: &str, hostname: &str) -> String {
    let out = lab.work_dir().join(format!("udhcpc-{tag}.events"));
    let script = write(
        lab,
        &format!("udhcpc-{tag}.sh"),
        &format!(
            "#!/bin/sh\n\
             case \"$1\" in\n\
               deconfig) ip addr flush dev \"$interface\" ;;\n\
               bound) ip addr replace \"$ip/$mask\" dev \"$interface\"\n\
                 echo \"bound ip=$ip dns=$dns domain=$domain lease=$lease mtu=$mtu hostname=$hostname\" >> {} ;;\n\
             esac\n\
             exit 0\n",
            out.display()
        ),
    );
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let host = format!("hostname:{hostname}");
    let o = lab
        .exec_output(
            &g.ns,
            &[
                "busybox",
                "udhcpc",
                "-i",
                "eth0",
                "-f",
                "-q",
                "-n",
                "-t",
                "5",
                "-T",
                "1",
                "-A",
                "1",
                "-O",
                "mtu",
                "-x",
                &host,
                "-s",
                s(&script),
            ],
        )
        .unwrap();
    let events = fs::read_to_string(&out).unwrap_or_default();
    let bound = events.lines().rev().find(|l| l.starts_with("bound "));
    match bound {
        Some(l) if o.status.success() => l.to_string(),
        _ => panic!(
            "udhcpc {tag}: {}\n{}\n{events}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    }
}

/// `dig @GW +short` in the guest: the answer lines, or Err(dig's output).
fn dig(g: &GuestPort, q: &str) -> Result<String, String> {
    let o = g
        .exec(&["dig", &format!("@{GW}"), "+time=2", "+tries=1", "+short", q])
        .map_err(|e| format!("{e:#}"))?;
    let out = String::from_utf8_lossy(&o.stdout).trim().to_string();
    if o.status.success() && !out.starts_with(';') {
        Ok(out)
    } else {
        Err(format!("{out}{}", String::from_utf8_lossy(&o.stderr)))
    }
}

fn guest(lab: &Lab, name: &str, mac: Option<&str>) -> GuestPort {
    let mut g = lab.add_guest(name).unwrap();
    g.disable_ipv6().unwrap();
    if let Some(m) = mac {
        g.sh(&format!("ip link set eth0 address {m}")).unwrap();
        g.mac = kvnet_tests::lab::read_mac(&g.ns, "eth0").unwrap();
    }
    g
}

#[test]
fn domain_dns_hosts_mtu_lease_and_dns_off_from_libvirt_xml() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let g1 = guest(&lab, "p1", None);
    let g2 = guest(&lab, "p2", Some(WEB_MAC));
    // The guests' ports, next to the imported network in the file.
    let ports =
        "\n[[ports]]\niface = \"p1\"\nnet = \"lv\"\n\n[[ports]]\niface = \"p2\"\nnet = \"lv\"\n";
    let warnings = import_apply(&lab, &k, "lv", &network_xml(DNS_HOSTS), ports);
    // Everything in this XML carries over: nothing to warn about.
    assert_eq!(warnings.trim(), "", "{warnings}");

    // DHCP: domain (15), DNS server (6), lease (51) and MTU (26).
    let b1 = udhcpc(&lab, &g1, "g1", "guest1");
    let ip1 = field(&b1, "ip").to_string();
    assert!(ip1.starts_with("10.79.0."), "{b1}");
    for (key, want) in [
        ("domain", DOMAIN),
        ("dns", GW),
        ("lease", "7200"),
        ("mtu", "1400"),
    ] {
        assert_eq!(field(&b1, key), want, "{key}: {b1}");
    }
    // The dotted reservation name: the guest is web in the domain.
    let b2 = udhcpc(&lab, &g2, "g2", "whatever");
    assert_eq!(field(&b2, "ip"), "10.79.0.20", "{b2}");
    assert_eq!(field(&b2, "hostname"), "web", "{b2}");
    // The gateway link has the MTU (both ends of its pair).
    let links = lab.sh(lab.hv(), "ip -o link show").unwrap();
    let gw_links: Vec<&str> = links
        .lines()
        .filter(|l| l.contains(" kvnet-lv@") || l.contains(": kvgw"))
        .collect();
    assert_eq!(gw_links.len(), 2, "{links}");
    for l in gw_links {
        assert!(l.contains(" mtu 1400 "), "{l}");
    }

    // DNS: static hosts (short in the domain, full as given, PTR), the
    // reservation and the lease as NAME.DOMAIN.
    for (q, want) in [
        ("db.lab.example", "10.79.0.77"),
        ("db.static.example", "10.79.0.77"),
        ("web.lab.example", "10.79.0.20"),
        ("guest1.lab.example", ip1.as_str()),
    ] {
        assert_eq!(dig(&g2, q).unwrap(), want, "{q}");
    }
    let ptr = g2
        .sh(&format!("dig @{GW} +time=2 +tries=1 +short -x 10.79.0.77"))
        .unwrap();
    assert_eq!(ptr.trim(), "db.lab.example.");

    // <dns enable='no'/>: applied live; DHCP names no DNS server and the
    // gateway answers no query (it answered just above).
    let warnings = import_apply(
        &lab,
        &k,
        "lv-nodns",
        &network_xml("<dns enable='no'/>"),
        ports,
    );
    assert_eq!(warnings.trim(), "", "{warnings}");
    let b1 = udhcpc(&lab, &g1, "g1-nodns", "guest1");
    assert_eq!(field(&b1, "ip"), ip1, "{b1}");
    assert_eq!(field(&b1, "dns"), "", "{b1}");
    assert_eq!(field(&b1, "mtu"), "1400", "{b1}");
    let e = dig(&g1, "web.lab.example").unwrap_err();
    assert!(
        e.contains("timed out") || e.contains("refused") || e.contains("no servers"),
        "{e}"
    );
    // `net dump` keeps it off.
    let dump = k.cli(&["net", "dump", "lv"]).unwrap();
    assert!(
        dump.contains("dns = false") && dump.contains("mtu = 1400"),
        "{dump}"
    );
}

/// The 802.1Q VID of a captured frame, if tagged.
fn vid(f: &Frame) -> Option<u16> {
    let d = &f.data;
    (d.get(12..14)? == [0x81, 0x00]).then(|| u16::from_be_bytes([d[14], d[15]]) & 0x0fff)
}

#[test]
fn a_network_vlan_tags_ports_that_set_none() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    let mk = |name: &str| {
        let g = lab.add_guest(name).unwrap();
        g.disable_ipv6().unwrap();
        g
    };
    let (g1, g2, g3, t0) = (mk("g1"), mk("g2"), mk("g3"), mk("t0"));
    // An SR-IOV pool network with a VLAN: kvnet has no pool, so an
    // isolated network whose guest ports default to VLAN 42.
    let xml = "<network><name>vl</name><forward mode='passthrough' dev='eth1'/><vlan><tag id='42'/></vlan></network>";
    // g1 from the file without a VLAN, t0 a trunk to another switch.
    let extra = "\n[[ports]]\niface = \"g1\"\nnet = \"vl\"\n\n[[ports]]\niface = \"t0\"\nnet = \"vl\"\ntrunk = \"42\"\ntrusted = true\n";
    let warnings = import_apply(&lab, &k, "vl", xml, extra);
    assert!(warnings.contains("passthrough"), "{warnings}");
    assert!(!warnings.contains("vlan"), "{warnings}");
    // g2 by `port add` without VLAN options; g3 with its own VLAN.
    k.cli(&["port", "add", "vl", "g2"]).unwrap();
    k.cli(&["port", "add", "vl", "g3", "--vlan", "7"]).unwrap();

    let ct = Capture::start(&t0.ns, "eth0").unwrap();
    let c3 = Capture::start(&g3.ns, "eth0").unwrap();
    let send = |g: &GuestPort, p: &[u8]| {
        inject(&g.ns, "eth0", &[eth_frame([0xff; 6], g.mac, 0x88b5, p)]).unwrap()
    };
    send(&g3, b"from-g3");
    send(&g1, b"from-g1");
    send(&g2, b"from-g2");
    let has = |f: &Frame, p: &[u8]| f.payload().windows(p.len()).any(|w| w == p);
    let ft = ct
        .stop_when("g1's and g2's broadcasts", Duration::from_secs(3), |fs| {
            [&b"from-g1"[..], b"from-g2"]
                .iter()
                .all(|p| fs.iter().any(|f| has(f, p)))
        })
        .unwrap();
    for p in [&b"from-g1"[..], b"from-g2"] {
        assert_eq!(
            count_frames(&ft, |f| has(f, p) && vid(f) == Some(42)),
            1,
            "{:?} on the trunk tagged 42: {ft:?}",
            String::from_utf8_lossy(p)
        );
    }
    // g3's own VLAN 7 is not the trunk's, and VLAN 42 does not reach g3.
    assert_eq!(count_frames(&ft, |f| has(f, b"from-g3")), 0, "{ft:?}");
    let f3 = c3.stop().unwrap();
    assert_eq!(
        count_frames(&f3, |f| has(f, b"from-g1") || has(f, b"from-g2")),
        0,
        "{f3:?}"
    );
}

/// The MAC of the IPv6 guest whose DUID-LL is a `<dhcp><host id>`.
const V6_MAC: &str = "52:54:00:4c:00:06";

/// Its address and name; the gateway's IPv6 address.
const V6_WEB: &str = "2001:db8:4c::5";
const GW6: &str = "2001:db8:4c::1";

/// Polls `f` every 100 ms for up to `secs`.
fn until<T>(secs: u64, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if std::time::Instant::now() > end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ipv6_from_libvirt_xml_slaac_dhcp6_host_by_duid_and_aaaa() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let k = Kvnet::start(&lab).unwrap();
    // Both keep the kernel's IPv6 defaults; g2 has the reserved MAC.
    let g1 = lab.add_guest("p1").unwrap();
    let mut g2 = lab.add_guest("p2").unwrap();
    g2.sh(&format!("ip link set eth0 address {V6_MAC}"))
        .unwrap();
    g2.mac = kvnet_tests::lab::read_mac(&g2.ns, "eth0").unwrap();
    // libvirt's isolated network (no <forward>) with IPv6; the host by
    // DUID-LL carries over, the one by name only is named.
    let duid = format!("0:3:0:1:{V6_MAC}");
    let xml = format!(
        "<network>
  <name>lv6</name>
  <domain name='{DOMAIN}'/>
  <ip address='10.78.0.1' prefix='24'><dhcp><range start='10.78.0.10' end='10.78.0.50'/></dhcp></ip>
  <ip family='ipv6' address='{GW6}' prefix='64'>
    <dhcp>
      <range start='2001:db8:4c::100' end='2001:db8:4c::1ff'/>
      <host id='{duid}' name='web' ip='{V6_WEB}'/>
      <host name='paul' ip='2001:db8:4c::6'/>
    </dhcp>
  </ip>
</network>
"
    );
    let ports =
        "\n[[ports]]\niface = \"p1\"\nnet = \"lv6\"\n\n[[ports]]\niface = \"p2\"\nnet = \"lv6\"\n";
    let warnings = import_apply(&lab, &k, "lv6", &xml, ports);
    assert!(
        warnings.contains("<host name='paul' ip='2001:db8:4c::6'> is not carried over"),
        "{warnings}"
    );
    let show = k.json(&["net", "show", "lv6"]).unwrap();
    assert_eq!(show["ipv6"]["gateways"][0], format!("{GW6}/64"), "{show}");

    // SLAAC in the prefix from kvnet's RA (the guest has the defaults).
    let a1 = until(15, || {
        let out = g1.sh("ip -6 -o addr show dev eth0 scope global").ok()?;
        out.split_whitespace()
            .filter_map(|w| w.split_once('/').map(|(a, _)| a.to_string()))
            .find(|a| a.starts_with("2001:db8:4c:"))
    })
    .expect("g1's SLAAC address from kvnet's RA");
    // dhclient -6 on g2 (a DUID-LLT of its MAC): the reserved address.
    until(5, || {
        let t = g2.sh("ip -6 -o addr show dev eth0 tentative").ok()?;
        t.trim().is_empty().then_some(())
    })
    .expect("g2's link-local address out of DAD");
    let (_c2, ev2) = dhclient6(&lab, &g2, "g2");
    let b2 = wait_first_event(&ev2, "BOUND6", Duration::from_secs(20));
    assert_eq!(field(&b2, "ip6"), V6_WEB, "{b2}");
    // AAAA for the reservation's name, from the gateway's IPv6 resolver;
    // the two guests reach each other over IPv6.
    let aaaa = g1
        .sh(&format!(
            "dig +short +time=2 +tries=2 @{GW6} AAAA web.{DOMAIN}"
        ))
        .unwrap();
    assert_eq!(aaaa.trim(), V6_WEB, "AAAA of web.{DOMAIN}");
    assert!(g2.ping(&a1), "g2 -> g1's SLAAC address {a1}");
}
