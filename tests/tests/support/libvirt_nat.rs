//! Shared by config.rs and restart.rs: libvirt's default network imported
//! with `kvnet import-libvirt`, applied in a lab whose `up0` (198.51.100.1/24)
//! leads to an outside namespace at 198.51.100.2; guests join by a rule
//! (`vnet*`) and get their addresses over DHCP.
#![allow(dead_code)]
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

pub use kvnet_tests::tools::{echo_server, py};
use kvnet_tests::{kvnet::Kvnet, GuestPort, Lab, Outside};

/// The issue's example, verbatim.
pub const DEFAULT_NET_XML: &str =
    "<network><name>default</name><forward mode='nat'><nat><port start='1024' end='65535'/></nat>
</forward><bridge name='virbr0' stp='on' delay='0'/><ip address='192.168.122.1'
netmask='255.255.255.0'><dhcp><range start='192.168.122.2' end='192.168.122.254'/><host
mac='00:25:90:eb:4b:bb' name='guest1' ip='192.168.122.13'/></dhcp></ip></network>";

pub const GUEST1_MAC: &str = "00:25:90:eb:4b:bb";
pub const OUTSIDE_IP: &str = "198.51.100.2";

pub struct LibvirtLab {
    pub lab: Lab,
    pub out: Outside,
    /// guest1 (MAC 00:25:90:eb:4b:bb) on vnet0, another on vnet1.
    pub guests: Vec<GuestPort>,
    /// The imported config with the `vnet*` rule appended.
    pub config: PathBuf,
    /// What `kvnet import-libvirt` printed on stdout and stderr.
    pub imported: String,
    pub import_warnings: String,
}

/// The lab, the XML imported (`--uplink up0`) into `default.toml` plus a
/// `vnet*` rule. No daemon yet.
pub fn libvirt_lab() -> LibvirtLab {
    let lab = Lab::new().unwrap();
    let out = lab.add_outside().unwrap();
    out.set_ip(&format!("{OUTSIDE_IP}/24")).unwrap();
    out.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        .unwrap();
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "198.51.100.1/24", "dev", "up0"],
    )
    .unwrap();
    let guests: Vec<GuestPort> = ["vnet0", "vnet1"]
        .iter()
        .map(|n| {
            let g = lab.add_guest_with(n, None).unwrap();
            g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1")
                .unwrap();
            g
        })
        .collect();
    guests[0]
        .sh(&format!(
            "ip link set eth0 down && ip link set eth0 address {GUEST1_MAC} && ip link set eth0 up"
        ))
        .unwrap();
    let xml = lab.work_dir().join("default.xml");
    fs::write(&xml, DEFAULT_NET_XML).unwrap();
    let bin = kvnet_tests::kvnet::kvnet_bin().unwrap();
    let o = Command::new(&bin)
        .args(["import-libvirt", "--uplink", "up0"])
        .arg(&xml)
        .output()
        .unwrap();
    let imported = String::from_utf8_lossy(&o.stdout).into_owned();
    let import_warnings = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "import-libvirt: {import_warnings}");
    let config = lab.work_dir().join("default.toml");
    fs::write(
        &config,
        format!("{imported}\n[[rules]]\nmatch = \"vnet*\"\nnet = \"default\"\n"),
    )
    .unwrap();
    LibvirtLab {
        lab,
        out,
        guests,
        config,
        imported,
        import_warnings,
    }
}

/// udhcpc once in `g`: configures the address and default route; returns
/// the address it got.
pub fn dhcp(lab: &Lab, g: &GuestPort, tag: &str) -> String {
    let script = lab.work_dir().join(format!("udhcpc-{tag}.sh"));
    let events = lab.work_dir().join(format!("udhcpc-{tag}.events"));
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             echo \"$1 ip=$ip router=$router\" >> {ev}\n\
             case \"$1\" in\n\
               bound|renew) ip addr flush dev \"$interface\"; ip addr add \"$ip/$mask\" dev \"$interface\"; ip route replace default via \"$router\" ;;\n\
             esac\n\
             exit 0\n",
            ev = events.display()
        ),
    )
    .unwrap();
    let mut p = fs::metadata(&script).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut p, 0o755);
    fs::set_permissions(&script, p).unwrap();
    let s = script.to_string_lossy().into_owned();
    let o = lab
        .exec_output(
            &g.ns,
            &[
                "busybox", "udhcpc", "-i", "eth0", "-f", "-q", "-n", "-t", "5", "-T", "1", "-A",
                "1", "-s", &s,
            ],
        )
        .unwrap();
    let ev = fs::read_to_string(&events).unwrap_or_default();
    let line = ev
        .lines()
        .find(|l| l.starts_with("bound "))
        .unwrap_or_else(|| {
            panic!(
                "{tag}: no lease: {}{}\n{ev}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            )
        });
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("ip="))
        .unwrap()
        .to_string()
}

/// A TCP round trip of `n` bytes from `ns` to `ip:port`: "tcp N" on success.
pub fn tcp_echo(ns: &str, ip: &str, port: u16, n: usize) -> String {
    py(
        ns,
        &format!(
            r#"
import socket
s = socket.create_connection(("{ip}", {port}), timeout=5); s.sendall(b"x" * {n})
got = b""
while len(got) < {n}:
    d = s.recv(65536)
    if not d: break
    got += d
print("tcp", len(got))
"#
        ),
    )
}

pub fn start_with_config(l: &LibvirtLab) -> Kvnet {
    let k = Kvnet::start(&l.lab).unwrap();
    let out = k.cli(&["apply", path(&l.config)]).unwrap();
    assert!(out.contains("+ network default"), "{out}");
    k
}

pub fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The default network's DHCP leases, (MAC, IP), sorted.
pub fn leases(k: &Kvnet) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = k
        .json(&["dhcp", "leases", "default"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["mac"].as_str().unwrap_or_default().to_string(),
                l["ip"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}
