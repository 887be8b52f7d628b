//! A test that panics with a fully built lab must leave nothing behind.
//! The panicking test runs in a child process (this same binary, filtered
//! to `child_panics_with_lab`, with KVNET_PANIC_CHILD set).
use std::process::Command;

use kvnet_tests::lab::{mount_bpffs_if_needed, privileged};
use kvnet_tests::{leftovers_of, Lab};

const CHILD_ENV: &str = "KVNET_PANIC_CHILD";
const SUFFIX_TAG: &str = "KVNET-SUFFIX=";

#[test]
fn panicking_test_leaves_nothing() {
    if !privileged() {
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let out = Command::new(exe)
        .args([
            "--exact",
            "child_panics_with_lab",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "child should fail:\n{stdout}\n{stderr}"
    );
    assert!(stderr.contains("on purpose"), "{stderr}");
    let suffix = stdout
        .lines()
        // The harness may print "test NAME ... " on the same line.
        .find_map(|l| l.split_once(SUFFIX_TAG).map(|(_, s)| s))
        .unwrap_or_else(|| panic!("child printed no suffix:\n{stdout}\n{stderr}"));
    assert_eq!(leftovers_of(suffix.trim()), Vec::<String>::new());
}

/// Only does something when started by `panicking_test_leaves_nothing`.
#[test]
fn child_panics_with_lab() {
    if std::env::var_os(CHILD_ENV).is_none() {
        return;
    }
    let lab = Lab::new().unwrap();
    println!("{SUFFIX_TAG}{}", lab.suffix());
    lab.add_guest_with("g1", Some("10.9.3.1/24")).unwrap();
    lab.add_guest("g2").unwrap();
    lab.add_tap("tap0").unwrap();
    lab.add_outside().unwrap();
    // What the daemon would leave: a pin folder on bpffs and a socket.
    mount_bpffs_if_needed().unwrap();
    std::fs::create_dir_all(lab.pin_dir().join("maps")).unwrap();
    std::fs::write(lab.socket_path(), b"").unwrap();
    let mut sleeper = Command::new("sh");
    sleeper.args(["-c", "sleep 600; true"]);
    lab.spawn(lab.hv(), sleeper).unwrap();
    assert!(!kvnet_tests::leftovers_of(lab.suffix()).is_empty());
    panic!("on purpose, with a lab up");
}
