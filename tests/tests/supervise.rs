//! Issue 15, point 1: crash-only and supervised. A panic anywhere ends the
//! daemon (a daemon alive with a poisoned lock would answer errors forever
//! and systemd's `Restart=on-failure` would never fire); the datapath
//! forwards on and the next daemon adopts it. The daemon tells systemd
//! when it is ready and pings its watchdog (`Type=notify`).
use std::{
    os::unix::{fs::PermissionsExt, net::UnixDatagram, process::ExitStatusExt},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    lab::privileged,
    Lab,
};

/// Polls `f` every 20 ms until it holds; panics naming `what` after `t`.
fn wait_until(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < t, "{what}: not within {t:?}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_panic_ends_the_daemon_and_the_next_one_adopts_the_datapath() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let a = lab.add_guest_with("vm0", Some("10.60.0.11/24")).unwrap();
    let b = lab.add_guest_with("vm1", Some("10.60.0.12/24")).unwrap();
    // systemd's side of sd_notify: a datagram socket named by NOTIFY_SOCKET.
    let dir = lab.work_dir().join("notify");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("socket");
    let manager = UnixDatagram::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o666)).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let bin = kvnet_bin().unwrap();
    let k = Kvnet::start_bin(
        &lab,
        &bin,
        &[],
        &[
            ("KVNET_PANIC_ON", "status"),
            ("NOTIFY_SOCKET", path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    )
    .unwrap();
    let mut buf = [0u8; 64];
    let mut heard = Vec::new();
    let t0 = Instant::now();
    while heard.iter().filter(|m| *m == "WATCHDOG=1").count() < 3 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the service manager heard: {heard:?}"
        );
        let n = manager.recv(&mut buf).unwrap();
        heard.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert_eq!(heard[0], "READY=1", "ready first: {heard:?}");

    k.cli(&["net", "add", "blue"]).unwrap();
    k.cli(&["port", "add", "blue", &a.hv_if]).unwrap();
    k.cli(&["port", "add", "blue", &b.hv_if]).unwrap();
    assert!(a.ping("10.60.0.12"), "switched under the daemon");

    // The request that panics: the process ends, it does not live on.
    let asked = k.try_cli(&["status"]).unwrap();
    assert!(!asked.status.success(), "the panicking request answered");
    wait_until("the daemon ending", Duration::from_secs(5), || {
        !k.daemon_running()
    });
    let log = k.daemon_log();
    assert!(log.contains("a panic ends the daemon"), "{log}");
    let status = k.stop().unwrap();
    assert_eq!(status.signal(), Some(6), "ended by SIGABRT: {status:?}");

    // The datapath forwards without a daemon, and the next one adopts it.
    assert!(a.ping("10.60.0.12"), "forwarding after the crash");
    let k = Kvnet::start_bin(&lab, &bin, &[], &[]).unwrap();
    let log = k.daemon_log();
    assert!(log.contains("adopted the running datapath"), "{log}");
    let ports = k.json(&["port", "list"]).unwrap();
    assert_eq!(
        ports.as_array().map(|p| p.len()),
        Some(2),
        "both ports adopted: {ports}"
    );
    assert!(a.ping("10.60.0.12"), "forwarding under the new daemon");
    // Control: without KVNET_PANIC_ON the same request is answered.
    assert!(k.try_cli(&["status"]).unwrap().status.success());
}
