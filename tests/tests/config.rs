//! Issue 9: networks as configuration. The daemon starts from a TOML file,
//! `kvnet apply` changes only the diff (a running ping loses nothing), a bad
//! file names its line and changes nothing, `kvnet save` makes CLI changes
//! persist, taps matching a rule join by themselves (netlink, and qemu's
//! script=kvnet-ifup), and `kvnet down` leaves nothing behind.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    guest::{default_cache_dir, Image, Vm, VmSpec, READY},
    kvnet::{vlan_text, Kvnet},
    lab::privileged,
    mac_fmt, GuestPort, Lab,
};
use serde_json::{json, Value};

fn quiet(g: &GuestPort) {
    g.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1")
        .unwrap();
}

fn guest(lab: &Lab, port: &str, ip: Option<&str>) -> GuestPort {
    let g = lab.add_guest_with(port, ip).unwrap();
    quiet(&g);
    g
}

fn write(lab: &Lab, name: &str, text: &str) -> PathBuf {
    let p = lab.work_dir().join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn nets(k: &Kvnet) -> Vec<String> {
    k.json(&["net", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect()
}

/// iface -> (net, vlan) of the guest ports.
fn ports(k: &Kvnet) -> Vec<(String, String, String)> {
    k.json(&["port", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["role"] == "guest")
        .map(|p| {
            (
                p["iface"].as_str().unwrap().to_string(),
                p["net"].as_str().unwrap().to_string(),
                vlan_text(&p["vlan"]),
            )
        })
        .collect()
}

/// Every one of two pings answered ([`GuestPort::ping`]).
fn ping(g: &GuestPort, ip: &str) -> bool {
    g.ping(ip)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> Duration {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < timeout, "{what}: not within {timeout:?}");
        thread::sleep(Duration::from_millis(20));
    }
    t0.elapsed()
}

const BASE: &str = r#"# two guests on one network
[networks.lab]
mode = "isolated"

[[ports]]
iface = "p1"
net = "lab"

[[ports]]
iface = "p2"
net = "lab"
"#;

#[test]
fn apply_changes_only_the_diff_and_a_bad_file_changes_nothing() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g1 = guest(&lab, "p1", Some("10.50.0.1/24"));
    let _g2 = guest(&lab, "p2", Some("10.50.0.2/24"));
    let _g3 = guest(&lab, "p3", Some("10.50.1.3/24"));
    let f1 = write(&lab, "base.toml", BASE);
    let k = Kvnet::start_with(&lab, &["--config", s(&f1)]).unwrap();
    assert_eq!(nets(&k), ["lab"]);
    assert_eq!(
        ports(&k),
        [
            ("p1".into(), "lab".into(), "-".into()),
            ("p2".into(), "lab".into(), "-".into())
        ]
    );
    assert!(ping(&g1, "10.50.0.2"));
    // Applying the same file again: nothing to do.
    assert_eq!(k.cli(&["apply", s(&f1)]).unwrap(), "no changes\n");

    let f2 = write(
        &lab,
        "more.toml",
        &format!(
            "{}\n[networks.lab2]\n\n[[ports]]\niface = \"p3\"\nnet = \"lab2\"\nvlan = 7\n",
            BASE.replace("mode = \"isolated\"", "mode = \"isolated\"\nageing = 60")
        ),
    );
    let diff =
        "+ network lab2\n~ network lab: ageing 300 -> 60 (live)\n+ port p3 -> lab2 (access 7)\n";
    assert_eq!(k.cli(&["apply", "--dry-run", s(&f2)]).unwrap(), diff);
    let j: Value =
        serde_json::from_str(&k.cli(&["apply", "--dry-run", "--json", s(&f2)]).unwrap()).unwrap();
    assert_eq!(j["networks_added"], serde_json::json!(["lab2"]));
    assert_eq!(j["applied"], false);
    assert_eq!(nets(&k), ["lab"], "--dry-run changed the running state");

    // A ping every 20 ms between the two guests across the apply.
    let pinger = {
        let ns = g1.ns.clone();
        thread::spawn(move || {
            kvnet_tests::lab::exec_output(
                &ns,
                &["ping", "-c", "150", "-i", "0.02", "-W", "1", "10.50.0.2"],
            )
            .unwrap()
        })
    };
    thread::sleep(Duration::from_millis(800));
    assert_eq!(k.cli(&["apply", s(&f2)]).unwrap(), diff);
    let out = pinger.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("150 packets transmitted, 150 received") || text.contains("150 received"),
        "pings lost across the apply:\n{text}"
    );
    assert_eq!(nets(&k), ["lab", "lab2"]);
    assert!(ports(&k).contains(&("p3".into(), "lab2".into(), "access 7".into())));
    let lab_net = &k.json(&["net", "show", "lab"]).unwrap();
    assert_eq!(lab_net["ageing_secs"], 60);

    // An error on line 7: named with file, line and column; nothing changes.
    let bad = write(
        &lab,
        "bad.toml",
        "[networks.lab]\nmode = \"isolated\"\n\n[networks.hnet]\nmode = \"host-only\"\n# the gateway below has no valid prefix\ngateway = \"10.70.0.1/33\"\n",
    );
    let before = (nets(&k), ports(&k));
    let e = k.cli_err(&["apply", s(&bad)]).unwrap();
    assert!(
        e.contains(&format!("{}:7:11:", bad.display())) && e.contains("/33"),
        "{e}"
    );
    let e = k.cli_err(&["apply", "--dry-run", s(&bad)]).unwrap();
    assert!(e.contains(":7:11:"), "{e}");
    // Also when the daemon is the one reading it (no CLI pre-check): a
    // reference to an unknown network.
    let bad2 = write(
        &lab,
        "bad2.toml",
        "[networks.lab]\n\n[[ports]]\niface = \"p1\"\nnet = \"nope\"\n",
    );
    let e = k.cli_err(&["apply", s(&bad2)]).unwrap();
    assert!(e.contains("bad2.toml:4:1:") && e.contains("'nope'"), "{e}");
    // Issue 15: `check` runs exactly the validation `apply` runs. A DHCP
    // range holding the gateway and a 1 s lease passed `check` and failed
    // half-way through `apply`; both now refuse them, with the same words.
    for (name, dhcp, why) in [
        (
            "gw.toml",
            "start = \"10.71.0.1\"\nend = \"10.71.0.50\"",
            "gateway's own address",
        ),
        (
            "lease.toml",
            "start = \"10.71.0.10\"\nend = \"10.71.0.50\"\nlease_secs = 1",
            "--dhcp-lease 1s",
        ),
    ] {
        let f = write(
            &lab,
            name,
            &format!("{BASE}\n[networks.dh]\nmode = \"host-only\"\ngateway = \"10.71.0.1/24\"\n[networks.dh.dhcp]\n{dhcp}\n"),
        );
        let checked = k.try_cli(&["check", s(&f)]).unwrap();
        let said = String::from_utf8_lossy(&checked.stderr).to_string();
        assert!(
            !checked.status.success() && said.contains(why),
            "check: {said}"
        );
        let e = k.cli_err(&["apply", s(&f)]).unwrap();
        assert!(e.contains(why), "apply: {e}");
    }
    // A file that defines nothing would remove every network: `check` warns,
    // `apply` refuses while networks run.
    let empty = write(&lab, "empty.toml", "# nothing here\n");
    let checked = k.try_cli(&["check", s(&empty)]).unwrap();
    assert!(
        checked.status.success()
            && String::from_utf8_lossy(&checked.stderr).contains("defines no networks"),
        "{checked:?}"
    );
    let e = k.cli_err(&["apply", s(&empty)]).unwrap();
    assert!(e.contains("would remove all"), "{e}");
    assert_eq!(
        (nets(&k), ports(&k)),
        before,
        "a rejected file changed the state"
    );
    assert!(ping(&g1, "10.50.0.2"));

    // Back to the first file: removals and the live ageing change.
    assert_eq!(
        k.cli(&["apply", "--dry-run", s(&f1)]).unwrap(),
        "- network lab2\n~ network lab: ageing 60 -> 300 (live)\n- port p3\n"
    );
    k.cli(&["apply", s(&f1)]).unwrap();
    assert_eq!(nets(&k), ["lab"]);
    assert_eq!(ports(&k).len(), 2);
    // A VLAN change of a port is done live.
    let f3 = write(
        &lab,
        "vlan.toml",
        &BASE.replace(
            "iface = \"p2\"\nnet = \"lab\"",
            "iface = \"p2\"\nnet = \"lab\"\nvlan = 9",
        ),
    );
    assert_eq!(
        k.cli(&["apply", s(&f3)]).unwrap(),
        "~ port p2: lab -> lab (access 9) (live)\n"
    );
    assert!(
        g1.ping_unanswered("10.50.0.2"),
        "VLAN 9 should isolate p2 from p1"
    );
    k.stop().unwrap();
}

#[test]
fn cli_changes_persist_with_save_and_sighup_reloads() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _g1 = guest(&lab, "p1", None);
    let _g2 = guest(&lab, "p2", None);
    let f = write(
        &lab,
        "kvnet.toml",
        "[networks.lab]\n\n[[ports]]\niface = \"p1\"\nnet = \"lab\"\n",
    );
    let k = Kvnet::start_with(&lab, &["--config", s(&f)]).unwrap();
    k.cli(&[
        "net",
        "add",
        "extra",
        "--mode",
        "host-only",
        "--gateway",
        "10.51.0.1/24",
    ])
    .unwrap();
    k.cli(&["port", "add", "extra", "p2", "--vlan", "5"])
        .unwrap();
    let out = k.cli(&["save"]).unwrap();
    assert!(out.contains(s(&f)), "{out}");
    let saved = std::fs::read_to_string(&f).unwrap();
    assert!(
        saved.contains("[networks.extra]") && saved.contains("10.51.0.1/24"),
        "{saved}"
    );
    k.stop().unwrap();

    // A restart from the file brings the CLI changes back.
    let k = Kvnet::start_with(&lab, &["--config", s(&f)]).unwrap();
    assert_eq!(nets(&k), ["extra", "lab"]);
    let mut p = ports(&k);
    p.sort();
    assert_eq!(
        p,
        [
            ("p1".into(), "lab".into(), "-".into()),
            ("p2".into(), "extra".into(), "access 5".into())
        ]
    );
    let extra = k.json(&["net", "show", "extra"]).unwrap();
    assert_eq!(extra["gateway"]["address"], "10.51.0.1");
    assert_eq!(extra["gateway"]["prefix"], 24);

    // SIGHUP re-reads the file.
    std::fs::write(
        &f,
        "[networks.lab]\n\n[[ports]]\niface = \"p1\"\nnet = \"lab\"\n",
    )
    .unwrap();
    let st = k.json(&["status"]).unwrap();
    let pid = st["pid"].as_u64().unwrap().to_string();
    assert_eq!(st["config"], s(&f));
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    wait_until("SIGHUP reload", Duration::from_secs(5), || {
        nets(&k) == ["lab"]
    });
    assert_eq!(ports(&k).len(), 1);
    // The gateway interface of the removed network is gone.
    assert!(lab
        .exec_output(lab.hv(), &["ip", "link", "show", "kvnet-extra"])
        .map(|o| !o.status.success())
        .unwrap());
    // A broken file on SIGHUP: logged, nothing changes.
    std::fs::write(&f, "[networks.lab]\nmode = 5\n").unwrap();
    std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    wait_until("SIGHUP error logged", Duration::from_secs(5), || {
        k.daemon_log().contains("running state unchanged")
    });
    assert!(
        k.daemon_log().contains("kvnet.toml:2:8"),
        "{}",
        k.daemon_log()
    );
    assert_eq!(nets(&k), ["lab"]);
    k.stop().unwrap();
}

const RULES: &str = r#"[networks.lab]

[[ports]]
iface = "p10"
net = "lab"
vlan = 10

[[ports]]
iface = "p20"
net = "lab"
vlan = 20

[[rules]]
match = "tap-v10-*"
net = "lab"
vlan = 10
"#;

#[test]
fn taps_matching_a_rule_join_and_leave_by_themselves() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let f = write(&lab, "rules.toml", RULES);
    let k = Kvnet::start_with(&lab, &["--config", s(&f)]).unwrap();
    // p10/p20 are absent: pending, attached when they appear.
    assert!(ports(&k).is_empty());
    let _g = guest(&lab, "p10", None);
    wait_until("p10 attached", Duration::from_secs(1), || {
        ports(&k).iter().any(|p| p.0 == "p10" && p.2 == "access 10")
    });
    let hv = lab.hv().to_string();
    let took = {
        lab.exec(
            &hv,
            &["ip", "tuntap", "add", "dev", "tap-v10-x", "mode", "tap"],
        )
        .unwrap();
        wait_until("tap attached", Duration::from_secs(1), || {
            ports(&k)
                .iter()
                .any(|p| p.0 == "tap-v10-x" && p.1 == "lab" && p.2 == "access 10")
        })
    };
    println!("tap attached {took:?} after creation");
    // Not matching: left alone.
    lab.exec(
        &hv,
        &["ip", "tuntap", "add", "dev", "tap-v30-x", "mode", "tap"],
    )
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    assert!(!ports(&k).iter().any(|p| p.0 == "tap-v30-x"));
    lab.exec(&hv, &["ip", "link", "del", "tap-v30-x"]).unwrap();
    lab.exec(&hv, &["ip", "link", "del", "tap-v10-x"]).unwrap();
    wait_until("tap detached", Duration::from_secs(1), || {
        !ports(&k).iter().any(|p| p.0 == "tap-v10-x")
    });
    // `kvnet ifup` with KVNET_NET/KVNET_VLAN and no rule.
    lab.exec(&hv, &["ip", "tuntap", "add", "dev", "vm7", "mode", "tap"])
        .unwrap();
    let out = std::process::Command::new(k.bin())
        .args(["--socket", s(k.socket()), "ifup", "vm7"])
        .env("KVNET_NET", "lab")
        .env("KVNET_VLAN", "20")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ports(&k).contains(&("vm7".into(), "lab".into(), "access 20".into())));
    // Saved state keeps rules and static ports, not the dynamic ports.
    let saved = lab.work_dir().join("saved.toml");
    k.cli(&["save", s(&saved)]).unwrap();
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(text.contains("tap-v10-*") && text.contains("p20"), "{text}");
    assert!(!text.contains("vm7"), "{text}");
    k.cli(&["ifdown", "vm7"]).unwrap();
    assert!(!ports(&k).iter().any(|p| p.0 == "vm7"));
    lab.exec(&hv, &["ip", "link", "del", "vm7"]).unwrap();
    k.stop().unwrap();
}

#[test]
fn qemu_guest_with_kvnet_ifup_reaches_vlan_10_only() {
    if !privileged() {
        return;
    }
    let image = Image::ensure(&default_cache_dir()).unwrap();
    let lab = Lab::new().unwrap();
    let _g10 = guest(&lab, "p10", Some("10.60.0.10/24"));
    let _g20 = guest(&lab, "p20", Some("10.60.0.20/24"));
    let f = write(&lab, "rules.toml", RULES);
    let k = Kvnet::start_with(&lab, &["--config", s(&f)]).unwrap();
    // qemu runs the shipped scripts, through wrappers that point them at
    // this lab's daemon and binary.
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bindir = k.bin().parent().unwrap().to_path_buf();
    let wrap = |name: &str| {
        let p = lab.work_dir().join(name);
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nexport KVNET_SOCKET={}\nexport PATH={}:$PATH\necho \"$0 $*\" >> {}/scripts.log\nexec {}/scripts/{name} \"$@\"\n",
                k.socket().display(),
                bindir.display(),
                lab.work_dir().display(),
                repo.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(
            &p,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o755),
        )
        .unwrap();
        p
    };
    let vm = Vm::boot(
        &lab,
        &image,
        VmSpec {
            tap: "tap-v10-vm".into(),
            mac: "52:54:00:60:00:05".into(),
            ip: "10.60.0.5/24".into(),
            script: "ping -c 3 -W 3 10.60.0.10 || exit 11\n\
                     if ping -c 2 -W 2 10.60.0.20; then exit 12; fi\n\
                     echo VLAN-OK\n"
                .into(),
            ifup: Some(wrap("kvnet-ifup")),
            ifdown: Some(wrap("kvnet-ifdown")),
            ..VmSpec::default()
        },
    )
    .unwrap();
    vm.wait_for(READY, Duration::from_secs(180)).unwrap();
    assert!(
        ports(&k).contains(&("tap-v10-vm".into(), "lab".into(), "access 10".into())),
        "{:?}",
        ports(&k)
    );
    let rc = vm.wait_done(Duration::from_secs(180)).unwrap();
    assert_eq!(rc, 0, "guest script failed:\n{}", vm.script_output());
    assert!(vm.script_output().contains("VLAN-OK"));
    vm.wait_exit(Duration::from_secs(60)).unwrap();
    wait_until("port gone after qemu exit", Duration::from_secs(2), || {
        !ports(&k).iter().any(|p| p.0 == "tap-v10-vm")
    });
    let log = std::fs::read_to_string(lab.work_dir().join("scripts.log")).unwrap_or_default();
    assert!(
        log.contains("kvnet-ifup tap-v10-vm") && log.contains("kvnet-ifdown tap-v10-vm"),
        "{log}"
    );
    k.stop().unwrap();
}

#[test]
fn status_then_down_leaves_nothing_behind() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let _g1 = guest(&lab, "p1", None);
    let out = lab.add_outside().unwrap();
    let hv = lab.hv().to_string();
    let sysctl = |k: &str| {
        lab.sh(
            &hv,
            &format!("cat /proc/sys/net/ipv4/conf/{}/{k}", out.hv_if),
        )
        .unwrap()
    };
    let fwd_before = sysctl("forwarding");
    let rules_before = lab.sh(&hv, "ip rule list").unwrap();
    let f = write(
        &lab,
        "k.toml",
        "[networks.hnet]\nmode = \"host-only\"\ngateway = \"10.80.0.1/24\"\n\n[networks.rnet]\nmode = \"routed\"\ngateway = \"10.81.0.1/24\"\nuplink = \"up0\"\n\n[[ports]]\niface = \"p1\"\nnet = \"hnet\"\n",
    );
    let k = Kvnet::start_with(&lab, &["--config", s(&f)]).unwrap();
    let st = k.json(&["status"]).unwrap();
    assert_eq!(st["daemon"], "running");
    assert_eq!(st["programs"].as_array().unwrap().len(), 3, "{st}");
    assert_eq!(st["networks"], serde_json::json!(["hnet", "rnet"]));
    assert!(st["ports"].as_u64().unwrap() >= 3, "{st}");
    assert!(st["fdb_capacity"].as_u64().unwrap() > 0);
    let text = k.cli(&["status"]).unwrap();
    assert!(
        text.contains("programs:") && text.contains("fdb:"),
        "{text}"
    );
    assert!(lab.sh(&hv, "bpftool net show").unwrap().contains("kvnet"));
    assert_ne!(
        sysctl("forwarding"),
        fwd_before,
        "the routed uplink should forward"
    );

    let msg = k.cli(&["down"]).unwrap();
    assert!(msg.contains("down"), "{msg}");
    wait_until("daemon exit", Duration::from_secs(5), || {
        !k.daemon_running()
    });
    let net = lab.sh(&hv, "bpftool net show").unwrap();
    assert!(!net.contains("kvnet"), "programs left:\n{net}");
    assert!(!lab.pin_dir().exists(), "pin folder left");
    for gw in ["kvnet-hnet", "kvnet-rnet"] {
        assert!(
            !lab.exec_output(&hv, &["ip", "link", "show", gw])
                .unwrap()
                .status
                .success(),
            "{gw} left"
        );
    }
    assert_eq!(sysctl("forwarding"), fwd_before);
    assert_eq!(lab.sh(&hv, "ip rule list").unwrap(), rules_before);
    assert!(!k.socket().exists());
    // status says so, with its own exit code.
    let o = k.try_cli(&["status"]).unwrap();
    assert_eq!(o.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&o.stdout).contains("not running"));
}

#[path = "support/libvirt_nat.rs"]
mod libvirt_nat;

/// Acceptance: libvirt's default network, imported and applied, is a NAT
/// network whose guests get DHCP leases (guest1's MAC gets .13) and reach
/// the outside (ping + TCP) behind the uplink's address; forwards in the
/// file are applied and changed live.
#[test]
fn libvirt_default_network_imported_and_applied_is_a_working_nat() {
    if !privileged() {
        return;
    }
    use libvirt_nat::*;
    let l = libvirt_lab();
    assert!(
        l.imported.contains("mode = \"nat\"")
            && l.imported.contains("uplink = \"up0\"")
            && l.imported.contains("port_range = [1024, 65535]")
            && l.imported.contains("00:25:90:eb:4b:bb"),
        "{}",
        l.imported
    );
    assert!(l.import_warnings.contains("stp"), "{}", l.import_warnings);
    let k = start_with_config(&l);
    let net = k.json(&["net", "show", "default"]).unwrap();
    assert_eq!(net["mode"], "nat", "{net}");
    assert_eq!(net["gateway"]["iface"], "virbr0", "{net}");
    wait_until(
        "guests attached by the rule",
        Duration::from_secs(3),
        || ports(&k).len() == 2,
    );
    let ip1 = dhcp(&l.lab, &l.guests[0], "g1");
    assert_eq!(ip1, "192.168.122.13", "guest1's reserved address");
    let ip2 = dhcp(&l.lab, &l.guests[1], "g2");
    assert!(ip2.starts_with("192.168.122.") && ip2 != ip1, "{ip2}");
    let leases = k.json(&["dhcp", "leases", "default"]).unwrap();
    assert_eq!(leases.as_array().unwrap().len(), 2, "{leases}");

    echo_server(&l.lab, &l.out.ns, 5000).unwrap();
    for g in &l.guests {
        assert!(ping(g, OUTSIDE_IP), "{} cannot ping the outside", g.hv_if);
        let r = tcp_echo(&g.ns, OUTSIDE_IP, 5000, 200_000);
        assert!(r.contains("tcp 200000"), "{}: {r}", g.hv_if);
    }
    let ct = k.json(&["conntrack", "list", "default"]).unwrap();
    assert!(
        ct.as_array()
            .unwrap()
            .iter()
            .any(|r| r.to_string().contains("192.168.122.13")),
        "{ct}"
    );

    // A forward added to the file: the dry run names it, apply adds it live.
    echo_server(&l.lab, &l.guests[0].ns, 80).unwrap();
    let f2 = write(
        &l.lab,
        "default-fwd.toml",
        &format!(
            "{}\n[[networks.default.forwards]]\nproto = \"tcp\"\nport = 8080\nto = \"192.168.122.13:80\"\n",
            std::fs::read_to_string(&l.config).unwrap()
        ),
    );
    assert_eq!(
        k.cli(&["apply", "--dry-run", s(&f2)]).unwrap(),
        "~ network default: + forward tcp/8080 -> 192.168.122.13:80 (live)\n"
    );
    k.cli(&["apply", s(&f2)]).unwrap();
    let fw = k.json(&["forward", "list", "default"]).unwrap();
    assert_eq!(
        fw[0]["to"],
        serde_json::json!({"addr": "192.168.122.13", "port": 80}),
        "{fw}"
    );
    let r = tcp_echo(&l.out.ns, "198.51.100.1", 8080, 1000);
    assert!(r.contains("tcp 1000"), "through the forward: {r}");
    // `net show` has it all: the gateway with its MAC, DHCP with the
    // static host and both leases, DNS, NAT's range and address, the forward.
    let show = k.json(&["net", "show", "default"]).unwrap();
    let gw_mac = mac_fmt(&kvnet_tests::lab::read_mac(l.lab.hv(), "virbr0").unwrap());
    assert_eq!(
        (
            &show["gateway"]["address"],
            &show["gateway"]["prefix"],
            &show["gateway"]["mac"]
        ),
        (&json!("192.168.122.1"), &json!(24), &json!(gw_mac)),
        "{show}"
    );
    assert_eq!(show["gateway"]["vlan"], json!({"mode": "none"}), "{show}");
    let dhcp = &show["dhcp"];
    assert_eq!(
        dhcp["range"],
        json!({"first": "192.168.122.2", "last": "192.168.122.254"}),
        "{show}"
    );
    assert_eq!(
        dhcp["hosts"],
        json!([{"mac": GUEST1_MAC, "ip": "192.168.122.13", "name": "guest1"}]),
        "{show}"
    );
    assert_eq!(dhcp["leases"], 2, "{show}");
    assert_eq!(show["dns"], true, "{show}");
    assert_eq!(
        show["nat"],
        json!({"ports": {"first": 1024, "last": 65535}, "udp": "eim", "address": "198.51.100.1"}),
        "{show}"
    );
    assert_eq!(show["forwards"], fw, "{show}");
    let text = k.cli(&["net", "show", "default"]).unwrap();
    for want in [
        format!("192.168.122.1/24 on virbr0 (mac {gw_mac})"),
        "192.168.122.2-192.168.122.254, lease 3600s, domain -, 1 static hosts, 2 leases".into(),
        "ports 1024-65535, udp eim, masquerade 198.51.100.1".into(),
        "tcp 8080 -> 192.168.122.13:80".into(),
    ] {
        assert!(text.contains(&want), "{want:?} not in\n{text}");
    }
    // `kvnet save` writes the forward and the port range back.
    let saved = l.lab.work_dir().join("saved.toml");
    k.cli(&["save", s(&saved)]).unwrap();
    let text = std::fs::read_to_string(&saved).unwrap();
    assert!(
        text.contains("192.168.122.13:80") && text.contains("port_range"),
        "{text}"
    );
    // `kvnet net dump` prints the one network the same way: a file that
    // checks, and that applied changes nothing (`-j` is `--json`).
    let dump = k.cli(&["net", "dump", "default"]).unwrap();
    assert!(
        dump.contains("[networks.default]") && dump.contains("192.168.122.13:80"),
        "{dump}"
    );
    let dumped = write(&l.lab, "dumped.toml", &dump);
    let checked = k.try_cli(&["check", s(&dumped)]).unwrap();
    assert!(checked.status.success(), "{checked:?}\n{dump}");
    assert_eq!(
        k.cli(&["apply", "--dry-run", s(&dumped)]).unwrap(),
        "no changes\n"
    );
    let e = k.cli_err(&["net", "dump", "nosuch"]).unwrap();
    assert!(e.contains("nosuch"), "{e}");
    assert_eq!(
        k.json(&["net", "list"]).unwrap(),
        serde_json::from_str::<serde_json::Value>(&k.cli(&["net", "list", "-j"]).unwrap()).unwrap()
    );
    // And back: the forward goes, live; a ping keeps working.
    assert_eq!(
        k.cli(&["apply", s(&l.config)]).unwrap(),
        "~ network default: - forward tcp/8080 -> 192.168.122.13:80 (live)\n"
    );
    assert_eq!(
        k.json(&["forward", "list", "default"]).unwrap(),
        serde_json::json!([])
    );
    assert!(ping(&l.guests[1], OUTSIDE_IP));
    k.cli(&["down"]).unwrap();
}

/// Issue 15, point 3: DHCP settings change live. A static host and the
/// domain are changed with `kvnet apply` while guest1 sends through the
/// NAT: the network is not rebuilt (its ports keep their programs, its
/// conntrack its flows), no segment is lost, and the new settings serve
/// (guest1 is known as guest1.lab.test from then on).
#[test]
fn dhcp_hosts_and_domain_change_live_under_a_nat_transfer() {
    use kvnet_tests::tools::{netstat, snmp};
    use libvirt_nat::*;
    if !privileged() {
        return;
    }
    let l = libvirt_lab();
    let k = start_with_config(&l);
    assert_eq!(dhcp(&l.lab, &l.guests[0], "g1"), "192.168.122.13");
    let g1 = &l.guests[0];
    let lookup = || {
        g1.sh("busybox nslookup guest1.lab.test 192.168.122.1 2>&1 || true")
            .unwrap_or_default()
    };
    assert!(
        !lookup().contains("192.168.122.13"),
        "control: no domain yet: {}",
        lookup()
    );
    let prog = |iface: &str| {
        l.lab
            .sh(l.lab.hv(), &format!("tc filter show dev {iface} ingress"))
            .unwrap()
    };
    let prog_before = prog("vnet0");

    let mut srv = std::process::Command::new("iperf3");
    srv.args(["-s", "-1"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    l.lab.spawn(&l.out.ns, srv).unwrap();
    wait_until("iperf3 listening", Duration::from_secs(5), || {
        l.out
            .sh("ss -Hltn 'sport = :5201'")
            .is_ok_and(|s| !s.trim().is_empty())
    });
    let report = l.lab.work_dir().join("iperf3.json");
    let mut cli = std::process::Command::new("sh");
    cli.args([
        "-c",
        &format!(
            "iperf3 -c {OUTSIDE_IP} -t 6 -b 100M -J > {} 2>&1",
            report.display()
        ),
    ]);
    let client = l.lab.spawn(&g1.ns, cli).unwrap();
    let flows = || -> Vec<(String, String)> {
        let ct = k.json(&["conntrack", "list", "default"]).unwrap();
        let mut v: Vec<(String, String)> = ct
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["orig"]["dport"] == 5201)
            .map(|r| (r["orig"].to_string(), r["translated"].to_string()))
            .collect();
        v.sort();
        v
    };
    wait_until(
        "iperf3's connections in conntrack",
        Duration::from_secs(5),
        || flows().len() >= 2,
    );
    let flows_before = flows();
    // Retransmissions but tail loss probes: a probe is sent when an ACK is
    // late (a busy machine), not when a segment was lost.
    let counters = || {
        (
            snmp(&g1.ns, "Tcp", "RetransSegs"),
            netstat(&g1.ns, "TcpExt", "TCPLossProbes"),
        )
    };
    let retrans0 = counters();

    // The change: a new static host and a domain.
    let text = std::fs::read_to_string(&l.config).unwrap().replace(
        "[networks.default.dhcp]\n",
        "[networks.default.dhcp]\ndomain = \"lab.test\"\n",
    ) + "\n[[networks.default.dhcp.hosts]]\nmac = \"52:54:00:00:00:99\"\nip = \"192.168.122.99\"\nname = \"spare\"\n";
    let changed = write(&l.lab, "changed.toml", &text);
    let diff = k.cli(&["apply", "--dry-run", s(&changed)]).unwrap();
    assert_eq!(diff, "~ network default: dhcp settings (live)\n");
    assert_eq!(k.cli(&["apply", s(&changed)]).unwrap(), diff);

    assert!(client.is_running(), "the transfer ended before the change");
    assert_eq!(flows(), flows_before, "conntrack kept its flows");
    assert_eq!(prog("vnet0"), prog_before, "the port was not re-attached");
    wait_until("guest1.lab.test answered", Duration::from_secs(5), || {
        lookup().contains("192.168.122.13")
    });
    // The same live, from the command line: a static host added and
    // removed again (the file then matches the running state), a domain.
    k.cli(&[
        "dhcp",
        "host",
        "add",
        "default",
        "52:54:00:00:00:98,192.168.122.98,other",
    ])
    .unwrap();
    assert_eq!(
        k.cli(&["apply", "--dry-run", s(&changed)]).unwrap(),
        "~ network default: dhcp settings (live)\n"
    );
    k.cli(&["dhcp", "host", "del", "default", "52:54:00:00:00:98"])
        .unwrap();
    assert_eq!(
        k.cli(&["apply", "--dry-run", s(&changed)]).unwrap(),
        "no changes\n"
    );
    let e = k
        .cli_err(&["dhcp", "host", "del", "default", "52:54:00:00:00:98"])
        .unwrap();
    assert!(e.contains("no static DHCP host"), "{e}");
    k.cli(&["net", "set", "default", "--domain", "other.test"])
        .unwrap();
    wait_until("guest1.other.test answered", Duration::from_secs(5), || {
        g1.sh("busybox nslookup guest1.other.test 192.168.122.1 2>&1 || true")
            .unwrap_or_default()
            .contains("192.168.122.13")
    });
    // The NAT port range, live: running flows keep their ports, new ones
    // take theirs from the new range.
    let udp_flow_port = |dst: u16| -> Option<u16> {
        let ct = k.json(&["conntrack", "list", "default"]).unwrap();
        ct.as_array().unwrap().iter().find_map(|r| {
            (r["orig"]["dport"] == dst && r["proto"] == "udp")
                .then(|| u16::try_from(r["translated"]["sport"].as_u64()?).ok())
                .flatten()
        })
    };
    k.cli(&["net", "set", "default", "--nat-ports", "2000-2999"])
        .unwrap();
    // One datagram from a chosen source port.
    let send_udp = |sport: u16, dport: u16| {
        g1.sh(&format!(
            "/usr/bin/python3 -c \"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('', {sport})); s.sendto(b'x', ('{OUTSIDE_IP}', {dport}))\""
        ))
        .unwrap();
    };
    send_udp(1409, 9);
    wait_until(
        "the new UDP flow in conntrack",
        Duration::from_secs(5),
        || udp_flow_port(9).is_some(),
    );
    let p = udp_flow_port(9).unwrap();
    assert!((2000..=2999).contains(&p), "a new flow took port {p}");
    assert_eq!(flows(), flows_before, "the range change kept the flows");
    assert!(client.is_running(), "the transfer ended before the change");
    assert_eq!(
        k.cli(&["apply", "--dry-run", s(&changed)]).unwrap(),
        "~ network default: nat ports 2000-2999 -> 1024-65535, dhcp settings (live)\n"
    );
    k.cli(&["apply", s(&changed)]).unwrap();
    assert_eq!(flows(), flows_before, "apply kept the flows");
    send_udp(1410, 10);
    wait_until(
        "the next UDP flow in conntrack",
        Duration::from_secs(5),
        || udp_flow_port(10).is_some(),
    );
    let p = udp_flow_port(10).unwrap();
    // In the whole range again, the guest's own port is kept.
    assert_eq!(p, 1410, "back to the whole range");
    let st = client.wait_timeout(Duration::from_secs(20)).unwrap();
    let report = std::fs::read_to_string(&report).unwrap_or_default();
    assert!(st.is_some_and(|s| s.success()), "iperf3: {report}");
    // A probe may carry new data (then it is no retransmission at all).
    let (retrans, probes) = counters();
    let retrans = (retrans - retrans0.0).saturating_sub(probes - retrans0.1);
    assert_eq!(retrans, 0, "segments lost across the change");
    assert_eq!(leases(&k).len(), 1, "guest1's lease kept: {:?}", leases(&k));
}
