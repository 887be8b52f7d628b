//! Issue 20, point 1: a VM that libvirt itself defines and starts
//! (Debian's libvirtd and qemu, TCG) joins a kvnet network and gets DHCP,
//! DNS and the outside. libvirtd runs in the lab's hv namespace with its
//! own folders (see `kvnet_tests::libvirt`); the tests drive it with
//! `virsh define/start/destroy/undefine` and check on the wire: the
//! guest's console, kvnet's port list and leases, and what a server
//! behind the NAT uplink received. Run as root.
use std::{
    fs,
    os::unix::fs::PermissionsExt,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    guest::{default_cache_dir, Image},
    kvnet::Kvnet,
    lab::privileged,
    leftovers_of,
    libvirt::{DomainSpec, Libvirtd},
    Lab, Outside,
};

/// A NAT network behind the lab's uplink, DHCP with a reservation for the
/// guest (so its name resolves), and the rule that attaches libvirt's taps.
const CONFIG: &str = r#"[networks.lv]
mode = "nat"
gateway = "10.77.0.1/24"
uplink = "up0"

[networks.lv.dhcp]
start = "10.77.0.100"
end = "10.77.0.199"
domain = "lab.test"
hosts = [{ mac = "52:54:00:6c:76:01", ip = "10.77.0.50", name = "lvguest" }]

[[rules]]
match = "kv-*"
net = "lv"
"#;

const GUEST_MAC: &str = "52:54:00:6c:76:01";
const GUEST_IP: &str = "10.77.0.50";
const OUTSIDE_IP: &str = "203.0.113.2";
const UPLINK_IP: &str = "203.0.113.1";
const SINK_PORT: u16 = 8080;

/// The attachment the README documents, taken from the example domain
/// (`contrib/libvirt-domain.xml`): libvirt creates the tap `kv-web0`,
/// kvnet's daemon sees it appear and the rule attaches it.
fn ethernet_interface() -> String {
    const EXAMPLE: &str = include_str!("../../contrib/libvirt-domain.xml");
    // Past the comment, which mentions the element too.
    let devices = EXAMPLE.find("<devices>").expect("the example has devices");
    let start = devices
        + EXAMPLE[devices..]
            .find("<interface type='ethernet'>")
            .expect("the example has an ethernet interface");
    let end = start + EXAMPLE[start..].find("</interface>").unwrap() + "</interface>".len();
    EXAMPLE[start..end].to_string()
}

/// Run in the guest once /init has its DHCP lease: DHCP again with a hook
/// that prints what kvnet offered (router, DNS server, domain), the
/// guest's own name looked up at that DNS server, a ping and a TCP
/// message to the server behind the NAT. The guest then stays up, for
/// `virsh destroy` to stop.
fn guest_script() -> String {
    format!(
        r#"cat > /tmp/lease.sh <<'EOF'
#!/bin/sh
if [ "$1" = bound ]; then
    echo "LV-LEASE ip=$ip router=$router dns=$dns domain=$domain"
    echo "$dns" > /tmp/dns; echo "$domain" > /tmp/domain
fi
exit 0
EOF
chmod +x /tmp/lease.sh
udhcpc -i eth0 -n -q -t 5 -T 1 -s /tmp/lease.sh
echo LV-DNS-BEGIN
nslookup lvguest.$(cat /tmp/domain) $(cat /tmp/dns)
echo LV-DNS-END
ping -c 3 -W 2 {OUTSIDE_IP}
echo hello-from-libvirt | nc -w 10 {OUTSIDE_IP} {SINK_PORT} && echo LV-TCP-OK
echo LV-END
sleep 600
"#
    )
}

/// A TCP server in `ns` that writes the peer address and the first line
/// it receives to `file`, answers "ok" and closes; returns once listening.
fn tcp_sink(lab: &Lab, ns: &str, port: u16, file: &std::path::Path) {
    let code = format!(
        r#"
import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {port})); s.listen(4)
while True:
    c, peer = s.accept()
    data = b""
    while not data.endswith(b"\n"):
        d = c.recv(4096)
        if not d: break
        data += d
    open("{file}", "a").write("peer=%s data=%s\n" % (peer[0], data.decode().strip()))
    c.sendall(b"ok\n"); c.close()
"#,
        file = file.display()
    );
    let mut cmd = Command::new("python3");
    cmd.args(["-c", &code])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    lab.spawn(ns, cmd).unwrap();
    wait_until("the TCP sink listens", Duration::from_secs(5), || {
        lab.sh(ns, &format!("ss -Hltn 'sport = :{port}'"))
            .is_ok_and(|s| !s.trim().is_empty())
    });
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// The network kvnet's port list says `iface` is attached to, if any.
fn port_net(k: &Kvnet, iface: &str) -> Option<String> {
    k.port(iface)
        .map(|p| p["net"].as_str().unwrap_or_default().to_string())
}

/// Whether an interface exists in the lab's hv namespace.
fn link_exists(lab: &Lab, iface: &str) -> bool {
    lab.exec_output(lab.hv(), &["ip", "link", "show", "dev", iface])
        .is_ok_and(|o| o.status.success())
}

/// The lines of `console` between two markers.
fn section<'a>(console: &'a str, begin: &str, end: &str) -> &'a str {
    let start = console.find(begin).map_or(0, |i| i + begin.len());
    let stop = console[start..]
        .find(end)
        .map_or(console.len(), |i| start + i);
    &console[start..stop]
}

/// The guest image, a lab with the outside behind the uplink, and kvnet
/// started from [`CONFIG`].
fn kvnet_lab() -> (Image, Lab, Outside, Kvnet) {
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    let out = lab
        .add_outside_with(&format!("{OUTSIDE_IP}/24"), &format!("{UPLINK_IP}/24"))
        .unwrap();
    let config = lab.work_dir().join("lv.toml");
    fs::write(&config, CONFIG).unwrap();
    let k = Kvnet::start_with(&lab, &["--config", config.to_str().unwrap()]).unwrap();
    (image, lab, out, k)
}

/// libvirtd (and its qemu) first, then kvnet, then the lab; nothing of
/// the lab may be left.
fn teardown(lv: Libvirtd, k: Kvnet, lab: Lab) {
    let suffix = lab.suffix().to_string();
    drop(lv);
    drop(k);
    drop(lab);
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
}

#[test]
fn libvirt_domain_on_an_ethernet_tap_joins_by_rule_and_gets_dhcp_dns_and_nat() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let (image, lab, out, k) = kvnet_lab();
    let sink = lab.work_dir().join("sink.log");
    tcp_sink(&lab, &out.ns, SINK_PORT, &sink);
    // Declared after the lab: dropped (domains destroyed, libvirtd and
    // qemu stopped) before the lab deletes the namespaces.
    let lv = Libvirtd::start(&lab).unwrap();
    println!("libvirtd up after {:.1?}", t0.elapsed());

    let name = "kvnet-web";
    let xml = lv
        .guest_xml(
            &image,
            &DomainSpec {
                name: name.into(),
                interfaces: ethernet_interface(),
                ip: "dhcp".into(),
                script: guest_script(),
            },
        )
        .unwrap();
    lv.define(name, &xml).unwrap();
    assert_eq!(lv.domains(true).unwrap(), vec![name.to_string()]);
    // Why the README says to name targets: libvirt keeps `vnet*` for the
    // names it makes up and drops such a target at define.
    let reserved = xml
        .replace("kv-web0", "vnet7")
        .replace(&format!("<name>{name}</name>"), "<name>kvnet-vnet</name>");
    lv.define("kvnet-vnet", &reserved).unwrap();
    let kept = lv.virsh(&["dumpxml", "--inactive", "kvnet-vnet"]).unwrap();
    assert!(!kept.contains("vnet7"), "{kept}");
    lv.virsh(&["undefine", "kvnet-vnet"]).unwrap();
    assert!(port_net(&k, "kv-web0").is_none(), "no tap before start");
    lv.virsh(&["start", name]).unwrap();
    // The tap libvirt created joined by the rule, without any hook.
    wait_until(
        "kv-web0 attached by the rule",
        Duration::from_secs(5),
        || port_net(&k, "kv-web0").as_deref() == Some("lv"),
    );

    let console = lv
        .wait_console(name, "LV-END", Duration::from_secs(120))
        .unwrap();
    println!("guest done after {:.1?}", t0.elapsed());
    // DHCP: kvnet's reservation, its gateway as router and DNS server.
    assert!(
        console.contains(&format!(
            "LV-LEASE ip={GUEST_IP} router=10.77.0.1 dns=10.77.0.1 domain=lab.test"
        )),
        "{console}"
    );
    let leases = k.json(&["dhcp", "leases", "lv"]).unwrap();
    assert!(
        leases
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["mac"] == GUEST_MAC && l["ip"] == GUEST_IP),
        "{leases}"
    );
    // DNS: kvnet answers the guest's name under the network's domain.
    let dns = section(&console, "LV-DNS-BEGIN", "LV-DNS-END");
    assert!(
        dns.contains("lvguest.lab.test") && dns.contains(GUEST_IP),
        "nslookup through kvnet's DNS:\n{dns}"
    );
    // The outside: ping, and a TCP message that arrived from the uplink
    // address (NAT), not from the guest's private one.
    assert!(console.contains("3 packets received"), "{console}");
    assert!(console.contains("LV-TCP-OK"), "{console}");
    let got = fs::read_to_string(&sink).unwrap_or_default();
    assert_eq!(
        got,
        format!("peer={UPLINK_IP} data=hello-from-libvirt\n"),
        "what the outside server received"
    );
    let stats = k.port_stats("kv-web0").unwrap();
    assert!(stats["rx_bytes"].as_u64().unwrap_or(0) > 0, "{stats}");

    // destroy: libvirt deletes its tap, kvnet drops the port.
    lv.virsh(&["destroy", name]).unwrap();
    wait_until("kv-web0's port removed", Duration::from_secs(5), || {
        port_net(&k, "kv-web0").is_none()
    });
    assert!(!link_exists(&lab, "kv-web0"), "libvirt removed its tap");
    assert_eq!(lv.virsh(&["domstate", name]).unwrap().trim(), "shut off");
    lv.virsh(&["undefine", name]).unwrap();
    assert!(lv.domains(true).unwrap().is_empty());
    println!("test body {:.1?}", t0.elapsed());

    teardown(lv, k, lab);
}

/// The other attachments libvirt offers for a tap: `managed='no'` (libvirt
/// opens a tap that exists already and leaves it alone) and a `<script>`
/// (libvirt creates the tap and runs the script with its name; kvnet's
/// `kvnet ifup`, through a wrapper naming the network since libvirt clears
/// the environment). One domain with one NIC of each: both get a lease.
#[test]
fn libvirt_domain_on_a_precreated_tap_and_through_an_ifup_script() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let (image, lab, _out, k) = kvnet_lab();
    // managed='no': the administrator's tap, attached by the rule as soon
    // as it exists, before any VM uses it.
    lab.add_tap("kv-pre0").unwrap();
    wait_until(
        "kv-pre0 attached by the rule",
        Duration::from_secs(5),
        || port_net(&k, "kv-pre0").as_deref() == Some("lv"),
    );
    // The script: `sc-web0` matches no rule, the wrapper names the network.
    let (bin, sock) = (k.bin().display(), k.socket().display());
    let ifup = lab.work_dir().join("kvnet-ifup-lv");
    let ifdown = lab.work_dir().join("kvnet-ifdown-lv");
    fs::write(
        &ifup,
        format!("#!/bin/sh\nKVNET_NET=lv exec {bin} --socket {sock} ifup \"$1\"\n"),
    )
    .unwrap();
    fs::write(
        &ifdown,
        format!("#!/bin/sh\nexec {bin} --socket {sock} ifdown \"$1\"\n"),
    )
    .unwrap();
    for f in [&ifup, &ifdown] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o755)).unwrap();
    }
    let lv = Libvirtd::start(&lab).unwrap();

    let name = "kvnet-two";
    let interfaces = format!(
        "    <interface type='ethernet'>
      <mac address='52:54:00:6c:76:02'/>
      <target dev='kv-pre0' managed='no'/>
      <model type='virtio'/>
    </interface>
    <interface type='ethernet'>
      <mac address='52:54:00:6c:76:03'/>
      <target dev='sc-web0'/>
      <script path='{}'/>
      <downscript path='{}'/>
      <model type='virtio'/>
    </interface>",
        ifup.display(),
        ifdown.display()
    );
    let script = r#"cat > /tmp/lease.sh <<'EOF'
#!/bin/sh
[ "$1" = bound ] && echo "LV-LEASE mac=$(cat /sys/class/net/$interface/address) ip=$ip"
exit 0
EOF
chmod +x /tmp/lease.sh
for i in eth0 eth1; do
    ip link set $i up
    udhcpc -i $i -n -q -t 10 -T 1 -s /tmp/lease.sh
done
echo LV-END
sleep 600
"#;
    let xml = lv
        .guest_xml(
            &image,
            &DomainSpec {
                name: name.into(),
                interfaces,
                ip: String::new(),
                script: script.into(),
            },
        )
        .unwrap();
    lv.define(name, &xml).unwrap();
    lv.virsh(&["start", name]).unwrap();
    // The script ran before qemu started: the port is there already.
    assert_eq!(port_net(&k, "sc-web0").as_deref(), Some("lv"));
    let console = lv
        .wait_console(name, "LV-END", Duration::from_secs(120))
        .unwrap();
    let leases = k.json(&["dhcp", "leases", "lv"]).unwrap();
    for mac in ["52:54:00:6c:76:02", "52:54:00:6c:76:03"] {
        let ip = leases
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["mac"] == mac)
            .and_then(|l| l["ip"].as_str())
            .unwrap_or_else(|| panic!("no kvnet lease for {mac}: {leases}"));
        assert!(
            console.contains(&format!("LV-LEASE mac={mac} ip={ip}")),
            "{mac}: {console}"
        );
    }

    // destroy: libvirt runs the downscript and deletes its own tap; the
    // administrator's tap stays, and so does its port, ready for the next
    // start.
    lv.virsh(&["destroy", name]).unwrap();
    wait_until("sc-web0's port removed", Duration::from_secs(5), || {
        port_net(&k, "sc-web0").is_none()
    });
    assert!(!link_exists(&lab, "sc-web0"));
    assert!(link_exists(&lab, "kv-pre0"));
    assert_eq!(port_net(&k, "kv-pre0").as_deref(), Some("lv"));
    lv.virsh(&["undefine", name]).unwrap();
    println!("test body {:.1?}", t0.elapsed());

    teardown(lv, k, lab);
}
