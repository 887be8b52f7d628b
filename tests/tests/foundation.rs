//! Issue: foundation. The pipeline end to end: both programs count on a lab
//! port, bpftool in the hypervisor namespace sees programs and pinned maps,
//! bad environments give one clear line, and a panicking lab user with a
//! running daemon leaves nothing behind.
use std::process::Command;

use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    lab::privileged,
    leftovers_of, Lab,
};

const CHILD_ENV: &str = "KVNET_FOUNDATION_PANIC_CHILD";
const SUFFIX_TAG: &str = "KVNET-SUFFIX=";

#[test]
fn xdp_and_tc_count_on_a_port_and_bpftool_sees_programs_and_pins() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g1 = lab.add_guest_with("p1", Some("10.10.0.1/24")).unwrap();
    lab.add_guest_with("p2", Some("10.10.0.2/24")).unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "demo"]).unwrap();
    k.cli(&["port", "add", "demo", "p1", "--hook", "xdp"])
        .unwrap();
    k.cli(&["port", "add", "demo", "p2", "--hook", "xdp"])
        .unwrap();
    g1.exec(&["ping", "-c", "3", "-i", "0.2", "10.10.0.2"])
        .unwrap();

    let p1 = k.port_stats("p1").unwrap();
    assert!(
        p1["xdp_seen"].as_u64().unwrap() >= 3,
        "XDP program counted: {p1}"
    );
    assert!(
        p1["tc_seen"].as_u64().unwrap() >= 1,
        "tc program counted: {p1}"
    );

    let hv = lab.hv();
    let net = lab.sh(hv, "bpftool net show").unwrap();
    assert!(
        net.contains("p1(") && net.contains("kvnet_tc"),
        "bpftool net show:\n{net}"
    );
    assert!(
        net.lines()
            .any(|l| l.starts_with("p1(") && l.contains("driver")),
        "XDP on p1:\n{net}"
    );
    let progs = lab.sh(hv, "bpftool prog show").unwrap();
    assert!(
        progs.contains("kvnet_xdp") && progs.contains("kvnet_tc"),
        "{progs}"
    );
    let pins = lab.pin_dir();
    for map in ["ports", "fdb", "flood", "port_stats"] {
        let dump = lab
            .sh(
                hv,
                &format!("bpftool map dump pinned {}/{map}", pins.display()),
            )
            .unwrap();
        if map == "fdb" {
            assert!(
                dump.contains("\"key\"") || dump.contains("key:"),
                "fdb dump:\n{dump}"
            );
        }
    }
    for prog in ["kvnet_xdp", "kvnet_tc"] {
        assert!(pins.join(prog).exists(), "{prog} pinned");
    }

    // A stopped daemon (SIGTERM) leaves the datapath forwarding: programs
    // attached, pins in place, the XDP links pinned.
    assert!(k.stop().unwrap().success());
    assert!(pins.join("kvnet_tc").exists(), "pins kept by a stop");
    assert!(
        std::fs::read_dir(pins.join("links")).unwrap().count() == 2,
        "the two XDP links are pinned"
    );
    let net = lab.sh(hv, "bpftool net show").unwrap();
    assert!(
        net.contains("kvnet_tc")
            && net
                .lines()
                .any(|l| l.starts_with("p1(") && l.contains("driver")),
        "programs still attached after a stop:\n{net}"
    );
    g1.exec(&["ping", "-c", "2", "-i", "0.2", "10.10.0.2"])
        .unwrap();
    // The next daemon adopts it; `kvnet down` detaches and unpins everything.
    let k = Kvnet::start(&lab).unwrap();
    assert!(k.daemon_log().contains("adopted"), "{}", k.daemon_log());
    assert_eq!(
        k.json(&["port", "list"]).unwrap().as_array().unwrap().len(),
        2
    );
    k.cli(&["down"]).unwrap();
    assert!(!pins.exists(), "pins left behind");
    let net = lab.sh(hv, "bpftool net show").unwrap();
    assert!(!net.contains("kvnet"), "programs still attached:\n{net}");
}

fn first_line(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_string()
}

#[test]
fn daemon_without_root_says_so_in_one_line() {
    if !privileged() {
        return;
    }
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(kvnet_bin().unwrap())
        .args([
            "--socket",
            "/tmp/kvnet-nonroot-test.sock",
            "daemon",
            "--pin-dir",
            "/sys/fs/bpf/kvnet-nonroot-test",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = first_line(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("must run as root"), "{err}");
}

#[test]
fn daemon_with_unmountable_bpffs_says_so_in_one_line() {
    if !privileged() {
        return;
    }
    // A private mount namespace without bpffs, and no right to mount one.
    let script = format!(
        "umount -l /sys/fs/bpf 2>/dev/null; exec setpriv --bounding-set=-sys_admin --inh-caps=-sys_admin {} --socket /tmp/kvnet-nobpffs-test.sock daemon",
        kvnet_bin().unwrap().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = first_line(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bpffs is not mounted at /sys/fs/bpf and mounting it failed"),
        "{err}"
    );
}

#[test]
fn cli_without_a_daemon_says_so_in_one_line() {
    let Ok(bin) = kvnet_bin() else { return };
    let out = Command::new(bin)
        .args(["--socket", "/tmp/kvnet-no-daemon.sock", "net", "list"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = first_line(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the kvnet daemon"), "{err}");
}

#[test]
fn a_panicking_lab_user_with_a_running_daemon_leaves_nothing() {
    if !privileged() {
        return;
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_panics_with_daemon_running",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("on purpose"),
        "{stdout}\n{stderr}"
    );
    let suffix = stdout
        .lines()
        .find_map(|l| l.split_once(SUFFIX_TAG).map(|(_, s)| s.trim().to_string()))
        .unwrap_or_else(|| panic!("child printed no suffix:\n{stdout}\n{stderr}"));
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
    assert!(!std::path::Path::new(&format!("/sys/fs/bpf/kvnet-{suffix}")).exists());
}

/// Only acts when started by the test above.
#[test]
fn child_panics_with_daemon_running() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let lab = Lab::new().unwrap();
    println!("{SUFFIX_TAG}{}", lab.suffix());
    let g1 = lab.add_guest_with("p1", Some("10.11.0.1/24")).unwrap();
    lab.add_guest_with("p2", Some("10.11.0.2/24")).unwrap();
    let k = Kvnet::start(&lab).unwrap();
    k.cli(&["net", "add", "x"]).unwrap();
    k.cli(&["port", "add", "x", "p1", "--hook", "xdp"]).unwrap();
    k.cli(&["port", "add", "x", "p2"]).unwrap();
    g1.exec(&["ping", "-c", "1", "10.11.0.2"]).unwrap();
    assert!(lab.pin_dir().exists());
    panic!("on purpose, with kvnet attached and pinned");
}
