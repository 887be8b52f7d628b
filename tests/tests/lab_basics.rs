//! Privileged checks of the lab itself: namespaces, veths, taps, capture,
//! injection, background processes and teardown. Run as root.
use std::process::{Command, Stdio};
use std::time::Duration;

use kvnet_tests::lab::{netns_path, privileged};
use kvnet_tests::{cleanup_leftovers, count_frames, eth_frame, inject, leftovers_of, Capture, Lab};

#[test]
fn ping_capture_inject_and_teardown() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let g1 = lab.add_guest_with("g1", Some("10.9.0.1/24")).unwrap();
    assert_eq!(g1.hv_if, "g1");
    assert_ne!(g1.mac, [0; 6]);
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "10.9.0.254/24", "dev", "g1"],
    )
    .unwrap();

    let cap = Capture::start(lab.hv(), "g1").unwrap();
    g1.exec(&["ping", "-c", "2", "-W", "2", "10.9.0.254"])
        .unwrap();
    let frame = eth_frame([0xff; 6], g1.mac, 0x88b5, b"kvnet-lab");
    inject(&g1.ns, "eth0", &[frame.clone(), frame]).unwrap();
    let frames = cap.stop().unwrap();

    let requests = count_frames(&frames, |f| {
        f.icmp_type() == Some(8) && f.src_mac() == g1.mac
    });
    assert_eq!(requests, 2, "ICMP echo requests seen on g1: {frames:?}");
    let injected = count_frames(&frames, |f| {
        f.is_broadcast() && f.ethertype() == 0x88b5 && f.src_mac() == g1.mac
    });
    assert_eq!(injected, 2);

    let suffix = lab.suffix().to_string();
    let namespaces = lab.namespaces();
    assert_eq!(namespaces.len(), 2);
    assert!(namespaces.iter().all(|n| netns_path(n).exists()));
    drop(lab);
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
}

#[test]
fn outside_tap_spawn_and_errors() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let out = lab.add_outside().unwrap();
    assert_eq!(out.hv_if, "up0");
    out.set_ip("192.0.2.2/24").unwrap();
    lab.exec(
        lab.hv(),
        &["ip", "addr", "add", "192.0.2.1/24", "dev", "up0"],
    )
    .unwrap();
    let tap = lab.add_tap("tap0").unwrap();
    let links = lab.sh(lab.hv(), "ip -o link show").unwrap();
    assert!(links.contains("up0@") && links.contains(&tap), "{links}");

    // An iperf3 server in the outside namespace, reached from the hv.
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-B", "192.0.2.2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let srv = lab.spawn(&out.ns, cmd).unwrap();
    let mut ok = false;
    for _ in 0..50 {
        let o = lab
            .exec_output(lab.hv(), &["iperf3", "-c", "192.0.2.2", "-n", "1M", "-J"])
            .unwrap();
        if o.status.success() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(ok, "iperf3 client never reached the server");
    assert!(srv.is_running());

    // A long-running child, left for the lab to stop.
    let mut sleeper = Command::new("sh");
    sleeper.args(["-c", "sleep 600; true"]);
    let sleeper = lab.spawn(lab.hv(), sleeper).unwrap();
    assert!(sleeper.is_running());

    // Failing commands report the command, namespace and stderr.
    let err = lab
        .exec(&out.ns, &["ip", "link", "show", "nosuchdev"])
        .unwrap_err()
        .to_string();
    assert!(err.contains("ip link show nosuchdev"), "{err}");
    assert!(err.contains(&out.ns), "{err}");
    assert!(err.contains("does not exist"), "{err}");
    // Interface names must fit IFNAMSIZ.
    assert!(lab.add_guest("much-too-long-name").is_err());

    let suffix = lab.suffix().to_string();
    let pids = [sleeper.pid(), srv.pid()];
    drop(lab);
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
    for pid in pids {
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}

#[test]
fn parallel_labs_do_not_collide() {
    if !privileged() {
        return;
    }
    let handles: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(|| {
                let lab = Lab::new().unwrap();
                // Same interface names and addresses in every lab.
                let g = lab.add_guest_with("g1", Some("10.9.2.1/24")).unwrap();
                lab.exec(
                    lab.hv(),
                    &["ip", "addr", "add", "10.9.2.254/24", "dev", "g1"],
                )
                .unwrap();
                g.exec(&["ping", "-c", "1", "-W", "2", "10.9.2.254"])
                    .unwrap();
                lab.suffix().to_string()
            })
        })
        .collect();
    let suffixes: Vec<String> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let mut uniq = suffixes.clone();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 4);
    for s in suffixes {
        assert_eq!(leftovers_of(&s), Vec::<String>::new());
    }
}

#[test]
fn cleanup_removes_dead_runs_only() {
    if !privileged() {
        return;
    }
    // A pid that is certainly dead: a child we started and reaped.
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let suffix = format!("p{dead}xdead");
    let ns = format!("kvnet-{suffix}-hv");
    let st = Command::new("ip")
        .args(["netns", "add", &ns])
        .status()
        .unwrap();
    assert!(st.success());
    std::fs::create_dir_all(format!("/tmp/kvnet-{suffix}")).unwrap();

    let live = Lab::new().unwrap();
    assert!(cleanup_leftovers().unwrap() >= 2);
    assert_eq!(leftovers_of(&suffix), Vec::<String>::new());
    // Our own, live lab is untouched.
    assert!(netns_path(live.hv()).exists());
}
