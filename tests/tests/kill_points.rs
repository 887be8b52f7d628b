//! Issue 15, point 2: never half-applied. `kvnet apply` applies the whole
//! file or rolls back to the running state; a daemon killed (SIGKILL) at
//! any point of `apply` (and so of the `net add`/`port add` steps it runs)
//! leaves a journal the next daemon undoes: it converges on the last state
//! written, nothing half-built stays on the host, and the same change
//! succeeds afterwards.
//!
//! The kill points are every journaled host change (the test hook
//! `KVNET_ABORT_AT_JOURNAL=N` aborts right before the N-th), plus kills at
//! random moments. `KVNET_SOAK=1` (from `cargo xtask soak`) runs 100 random
//! kills instead of a few; each scenario prints a `SOAK` line.
use std::{
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant},
};

use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    lab::privileged,
    GuestPort, Lab,
};

/// The running state before: an isolated network whose two guests talk.
fn base_toml(a: &GuestPort, b: &GuestPort) -> String {
    format!(
        r#"
[networks.keep]
mode = "isolated"

[[ports]]
iface = "{}"
net = "keep"

[[ports]]
iface = "{}"
net = "keep"
"#,
        a.hv_if, b.hv_if
    )
}

/// The change: a NAT network (gateway, uplink programs, sysctls, policy
/// rules), a host-only one, a guest port in each new network.
fn target_toml(a: &GuestPort, b: &GuestPort, c: &GuestPort, d: &GuestPort) -> String {
    format!(
        r#"{}
[networks.nat0]
mode = "nat"
gateway = "10.77.0.1/24"
uplink = "up0"

[networks.ho0]
mode = "host-only"
gateway = "10.78.0.1/24"

[[ports]]
iface = "{}"
net = "nat0"

[[ports]]
iface = "{}"
net = "ho0"
"#,
        base_toml(a, b),
        c.hv_if,
        d.hv_if
    )
}

/// What kvnet may have changed on the host, as text to compare: links and
/// their flags, policy rules, kvnet's tc filters, the uplink's forwarding
/// sysctl, the pins.
fn host_state(lab: &Lab) -> String {
    let script = r#"
ip -o link show | sed -E 's/^[0-9]+: //; s/ mtu .*//; s/,?LOWER_UP//; s/,?M-DOWN//' | sort
echo '-- rules'; ip rule show
echo '-- filters'
for d in $(ip -o link show | sed -E 's/^[0-9]+: ([^:@]+).*/\1/'); do
  for dir in ingress egress; do
    tc filter show dev "$d" "$dir" 2>/dev/null | grep -oE 'pref [0-9]+ bpf' | sort -u | sed "s/^/$d $dir /"
  done
done
echo '-- sysctl'; cat /proc/sys/net/ipv4/conf/up0/forwarding
ip -d link show up0 | grep -oE 'promiscuity [0-9]+'
true
"#;
    let mut s = lab.sh(lab.hv(), script).unwrap();
    s.push_str("-- pins\n");
    s.push_str(&pins(&lab.pin_dir()).join("\n"));
    s
}

fn pins(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap().display().to_string());
                if p.is_dir() {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

fn nets(k: &Kvnet) -> Vec<String> {
    let mut v: Vec<String> = k
        .json(&["net", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// Line-by-line difference, for a readable failure.
fn diff(want: &str, got: &str) -> String {
    let w: Vec<&str> = want.lines().collect();
    let g: Vec<&str> = got.lines().collect();
    let mut out = String::new();
    for l in &w {
        if !g.contains(l) {
            out.push_str(&format!("- {l}\n"));
        }
    }
    for l in &g {
        if !w.contains(l) {
            out.push_str(&format!("+ {l}\n"));
        }
    }
    out
}

struct World {
    lab: Lab,
    guests: Vec<GuestPort>,
    base: PathBuf,
    target: PathBuf,
    bin: PathBuf,
}

impl World {
    fn new() -> World {
        let lab = Lab::new().unwrap();
        lab.add_outside_with("198.51.100.2/24", "198.51.100.1/24")
            .unwrap();
        let guests: Vec<GuestPort> = (0..4)
            .map(|i| {
                lab.add_guest_with(&format!("vm{i}"), Some(&format!("10.76.0.{}/24", 11 + i)))
                    .unwrap()
            })
            .collect();
        let dir = lab.work_dir().join("conf");
        std::fs::create_dir_all(&dir).unwrap();
        let (base, target) = (dir.join("base.toml"), dir.join("target.toml"));
        let g = &guests;
        std::fs::write(&base, base_toml(&g[0], &g[1])).unwrap();
        std::fs::write(&target, target_toml(&g[0], &g[1], &g[2], &g[3])).unwrap();
        World {
            lab,
            guests,
            base,
            target,
            bin: kvnet_bin().unwrap(),
        }
    }

    fn start(&self, envs: &[(&str, &str)]) -> Kvnet {
        Kvnet::start_bin(
            &self.lab,
            &self.bin,
            &["--config", self.base.to_str().unwrap()],
            envs,
        )
        .unwrap()
    }

    fn apply(&self, k: &Kvnet, file: &Path) -> std::process::Output {
        k.try_cli(&["apply", file.to_str().unwrap()]).unwrap()
    }

    /// The running state is `base` or `target`, exactly as on the host; the
    /// guests of the untouched network still talk. Returns which it is.
    fn converged(&self, k: &Kvnet, base: &str, target: &str, what: &str) -> &'static str {
        let names = nets(k);
        let (which, want) = if names == ["keep"] {
            ("base", base)
        } else if names == ["ho0", "keep", "nat0"] {
            ("target", target)
        } else {
            panic!(
                "{what}: networks {names:?} are neither the old nor the new state\n{}",
                k.daemon_log()
            );
        };
        let got = host_state(&self.lab);
        assert_eq!(
            got,
            want,
            "{what}: the host is not as in the {which} state:\n{}\ndaemon log:\n{}",
            diff(want, &got),
            k.daemon_log()
        );
        assert!(
            self.guests[0].ping("10.76.0.12"),
            "{what}: the untouched network's guests no longer talk"
        );
        which
    }
}

fn soak() -> bool {
    std::env::var("KVNET_SOAK").is_ok_and(|v| v == "1")
}

/// A small LCG: reproducible kill moments from a printed seed.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n.max(1)
    }
}

#[test]
fn a_kill_at_any_point_of_apply_converges_and_leaks_nothing() {
    if !privileged() {
        return;
    }
    let t0 = Instant::now();
    let w = World::new();
    let k = w.start(&[]);
    let base = host_state(&w.lab);
    assert!(w.guests[0].ping("10.76.0.12"), "positive control: switched");
    // The full change, then back: both states as the host shows them.
    let started = Instant::now();
    let out = w.apply(&k, &w.target);
    assert!(out.status.success(), "{out:?}\n{}", k.daemon_log());
    let mut apply_time = started.elapsed();
    let target = host_state(&w.lab);
    assert_ne!(
        base, target,
        "positive control: the change shows on the host"
    );
    assert!(target.contains("kvnet-nat0"), "{target}");
    let out = w.apply(&k, &w.base);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        host_state(&w.lab),
        base,
        "apply back to the old file leaves what it removed:\n{}",
        diff(&base, &host_state(&w.lab))
    );
    k.stop().unwrap();

    // Journaled changes: the daemon dies right before the N-th. The soak
    // visits every one; the suite every third, from a moving offset, so
    // that runs together cover all.
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let step = if soak() { 1 } else { 3 };
    let first = 1 + (seed % step as u64) as usize;
    println!("kill points {first}, {}, ... (seed {seed})", first + step);
    let mut points = 0;
    let mut kills = 0;
    for n in (first..).step_by(step) {
        let k = w.start(&[("KVNET_ABORT_AT_JOURNAL", &n.to_string())]);
        let out = w.apply(&k, &w.target);
        if out.status.success() {
            // Past the last change: all points were visited.
            assert!(k.daemon_running());
            k.stop().unwrap();
            break;
        }
        assert!(n < 40, "more kill points than any apply here makes");
        let log = k.daemon_log();
        assert!(log.contains("KVNET_ABORT_AT_JOURNAL"), "point {n}: {log}");
        let _ = k.stop();
        let k = w.start(&[]);
        let which = w.converged(&k, &base, &target, &format!("kill point {n}"));
        assert_eq!(which, "base", "kill point {n}: killed before it ended");
        assert!(
            k.daemon_log()
                .contains("a change in flight when the last daemon died"),
            "kill point {n}: nothing undone:\n{}",
            k.daemon_log()
        );
        // Nothing left in the way: the same change succeeds now.
        let started = Instant::now();
        let out = w.apply(&k, &w.target);
        // The random kills below aim inside the quickest apply seen.
        apply_time = apply_time.min(started.elapsed());
        assert!(out.status.success(), "kill point {n}: {out:?}");
        w.converged(
            &k,
            &base,
            &target,
            &format!("kill point {n}, applied again"),
        );
        let out = w.apply(&k, &w.base);
        assert!(out.status.success(), "kill point {n}: {out:?}");
        w.converged(&k, &base, &target, &format!("kill point {n}, back"));
        k.stop().unwrap();
        points += 1;
        kills += 1;
    }
    assert!(
        points * step >= 9,
        "only {points} kill points every {step}: is the journal used?"
    );

    // Kills at random moments of the change (SIGKILL from outside).
    println!("random kills: seed {seed}, apply takes {apply_time:?}");
    let mut rng = Rng(seed);
    let rounds = if soak() { 100 } else { 1 };
    let mut seen = [0usize; 2];
    let mut k = w.start(&[]);
    for i in 0..rounds {
        let bin = w.bin.clone();
        let (sock, file) = (k.socket().to_path_buf(), w.target.clone());
        let client = thread::spawn(move || {
            std::process::Command::new(bin)
                .arg("--socket")
                .arg(sock)
                .arg("apply")
                .arg(file)
                .output()
        });
        let delay = rng.below(apply_time.as_micros() as u64);
        thread::sleep(Duration::from_micros(delay));
        k.kill().unwrap();
        let _ = client.join();
        k = w.start(&[]);
        let which = w.converged(
            &k,
            &base,
            &target,
            &format!("random kill {i} at {delay} us"),
        );
        seen[(which == "target") as usize] += 1;
        if which == "target" {
            let out = w.apply(&k, &w.base);
            assert!(out.status.success(), "{out:?}");
            w.converged(&k, &base, &target, &format!("random kill {i}, back"));
        }
        kills += 1;
    }
    k.stop().unwrap();
    println!(
        "SOAK scenario=kill-apply iterations={kills} leaks=0 seconds={:.1} (kill points {points}; random kills ended in old {} / new {})",
        t0.elapsed().as_secs_f64(),
        seen[0],
        seen[1]
    );
}

#[test]
fn an_apply_that_fails_midway_rolls_back_to_the_running_state() {
    if !privileged() {
        return;
    }
    let w = World::new();
    let k = w.start(&[]);
    let base = host_state(&w.lab);
    let g = &w.guests;
    // Removes a port and changes the kept network (done first), adds a
    // network (done next), then a network whose gateway interface name is
    // taken by the uplink: that step fails after the others ran.
    let bad = w.lab.work_dir().join("conf/bad.toml");
    std::fs::write(
        &bad,
        format!(
            r#"
[networks.keep]
mode = "isolated"
ageing = 77

[networks.a-host]
mode = "host-only"
gateway = "10.79.0.1/24"

[networks.b-bad]
mode = "host-only"
gateway = "10.80.0.1/24"
gateway_iface = "up0"

[[ports]]
iface = "{}"
net = "keep"

[[ports]]
iface = "{}"
net = "a-host"
"#,
            g[0].hv_if, g[2].hv_if
        ),
    )
    .unwrap();
    let out = w.apply(&k, &bad);
    assert!(!out.status.success(), "the bad file applied");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("b-bad"), "the error names the step: {err}");
    assert!(err.contains("rolled back"), "the error says so: {err}");
    // Nothing of it stays: networks, ports, settings, host.
    assert_eq!(nets(&k), ["keep"]);
    let ports: Vec<String> = k
        .json(&["port", "list"])
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["iface"].as_str().unwrap().to_string())
        .collect();
    assert!(
        ports.contains(&g[1].hv_if) && !ports.contains(&g[2].hv_if),
        "ports: {ports:?}"
    );
    let keep = k.json(&["net", "show", "keep"]).unwrap();
    assert_ne!(keep["ageing_secs"], 77, "{keep}");
    assert_eq!(
        host_state(&w.lab),
        base,
        "{}",
        diff(&base, &host_state(&w.lab))
    );
    assert!(
        g[0].ping("10.76.0.12"),
        "the removed port is back and switches"
    );
    // The state files say the same: a restart adopts the old state.
    k.stop().unwrap();
    let k = w.start(&[]);
    assert_eq!(nets(&k), ["keep"]);
    k.stop().unwrap();
}

#[test]
fn a_kill_inside_net_add_or_port_add_from_the_cli_is_undone() {
    if !privileged() {
        return;
    }
    let w = World::new();
    let clean = host_state(&w.lab);
    let k = w.start(&[]);
    let base = host_state(&w.lab);
    k.stop().unwrap();
    let add = [
        "net",
        "add",
        "nat0",
        "--mode",
        "nat",
        "--gateway",
        "10.77.0.1/24",
        "--uplink",
        "up0",
    ];
    let vm2 = w.guests[2].hv_if.as_str();
    let port_add = vec!["port", "add", "keep", vm2];
    // Point 3 of `net add` (past the gateway interface and its port); point
    // 1 of a `port add` (its programs), under a network added before.
    for (point, before, op) in [
        ("3", None, add.to_vec()),
        ("1", Some(add.to_vec()), port_add.clone()),
    ] {
        if let Some(b) = &before {
            // Finished and written down: the adopting daemon journals nothing.
            let k = w.start(&[]);
            k.cli(b).unwrap();
            k.stop().unwrap();
        }
        let k = w.start(&[("KVNET_ABORT_AT_JOURNAL", point)]);
        let out = k.try_cli(&op).unwrap();
        assert!(!out.status.success(), "`{}` finished", op.join(" "));
        assert!(k.daemon_log().contains("KVNET_ABORT_AT_JOURNAL"));
        let _ = k.stop();
        let k = w.start(&[]);
        if before.is_some() {
            // The finished `net add` stays; the killed port add is undone.
            assert_eq!(nets(&k), ["keep", "nat0"]);
            assert!(k.port(vm2).is_none(), "the killed port add is half there");
            k.cli(&["net", "del", "nat0"]).unwrap();
        }
        w.converged(&k, &base, "", &format!("`{}` killed", op.join(" ")));
        // Nothing in the way: the same change works now.
        if let Some(b) = &before {
            k.cli(b).unwrap();
        }
        k.cli(&op).unwrap();
        if before.is_some() {
            k.cli(&["port", "del", vm2]).unwrap();
        }
        k.cli(&["net", "del", "nat0"]).unwrap();
        w.converged(&k, &base, "", "after the same change and its removal");
        k.stop().unwrap();
    }
    // Killed in `net add`, and no daemon started again: `kvnet down`
    // removes the half-built network too, from the journal.
    let k = w.start(&[("KVNET_ABORT_AT_JOURNAL", "4")]);
    assert!(!k.try_cli(&add).unwrap().status.success());
    let bin = k.bin().to_path_buf();
    let _ = k.stop();
    let o = kvnet_tests::kvnet::down_without_daemon(&w.lab, &bin).unwrap();
    assert!(o.status.success(), "{o:?}");
    let after = host_state(&w.lab);
    assert_eq!(after, clean, "left after down:\n{}", diff(&clean, &after));
}
