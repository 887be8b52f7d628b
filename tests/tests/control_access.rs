//! Issue 15, point 4: access control on the daemon's control socket. The
//! socket is root:GROUP 0660 (plus an ACL entry for the read-only group),
//! every connection's peer credentials decide what it may do (root or
//! GROUP: everything; the read-only group: reads; anyone else: one error
//! line), request lines are bounded, and `kvnet save` stays in the config
//! directory unless forced.
//!
//! Clients of other users are the kvnet CLI run as uid/gid 65534 (nobody)
//! with chosen supplementary groups. The daemon creates this run's own
//! groups (`kvt-<suffix>`, `kvt-ro-<suffix>`); they are deleted at the end.
use std::{
    io::{BufRead, BufReader, Write},
    os::unix::{
        fs::{MetadataExt, PermissionsExt},
        net::UnixStream,
        process::CommandExt,
    },
    process::{Command, Output},
    time::Duration,
};

use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    lab::privileged,
    Lab,
};
use serde_json::Value;

const NOBODY: u32 = 65534;

/// This run's groups: deleted when the test ends, however it ends.
struct Groups(Vec<String>);

impl Drop for Groups {
    fn drop(&mut self) {
        for g in &self.0 {
            if gid(g).is_some() {
                let _ = Command::new("groupdel").arg(g).status();
            }
        }
    }
}

fn gid(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

/// `kvnet ARGS` against `k`'s socket as uid and gid nobody with exactly
/// `groups` as supplementary groups.
fn cli_as_nobody(k: &Kvnet, groups: &[u32], args: &[&str]) -> Output {
    let mut cmd = Command::new(k.bin());
    cmd.arg("--socket").arg(k.socket()).args(args);
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: plain syscalls after fork, no allocation (the vector is
    // moved in whole). setgroups before dropping root, which it needs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
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

/// Sends `pad` spaces and a `net_list` request as one line (JSON allows
/// leading whitespace) over a raw connection as root; returns the answer.
fn padded_net_list(k: &Kvnet, pad: usize) -> Value {
    let mut s = UnixStream::connect(k.socket()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut line = vec![b' '; pad];
    line.extend_from_slice(b"{\"op\":\"net_list\"}\n");
    // A refused line is answered before it is all read: the write may
    // break; the answer is what counts.
    let _ = s.write_all(&line);
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
}

#[test]
fn socket_access_by_group_and_bounded_requests() {
    if !privileged() {
        return;
    }
    let lab = Lab::new().unwrap();
    let full = format!("kvt-{}", lab.suffix());
    let ro = format!("kvt-ro-{}", lab.suffix());
    assert_eq!((gid(&full), gid(&ro)), (None, None), "fresh group names");
    let groups = Groups(vec![full.clone(), ro.clone()]);
    let k = Kvnet::start_bin(
        &lab,
        &kvnet_bin().unwrap(),
        &["--socket-group", &full, "--ro-group", &ro],
        &[],
    )
    .unwrap();
    let log = k.daemon_log();
    let (full_gid, ro_gid) = (gid(&full).unwrap(), gid(&ro).unwrap());
    assert!(
        log.contains(&format!("created group {full} (gid {full_gid})")),
        "{log}"
    );
    assert!(
        log.contains(&format!("created group {ro} (gid {ro_gid})")),
        "{log}"
    );

    // The socket: root:GROUP 0660.
    let meta = std::fs::metadata(k.socket()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o660);
    assert_eq!((meta.uid(), meta.gid()), (0, full_gid));

    // Root may do anything (and the lists below have something to show).
    k.cli(&["net", "add", "lab"]).unwrap();

    // The read-only group reads (through its ACL entry and the peer check)...
    let out = cli_as_nobody(&k, &[ro_gid], &["net", "list", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed[0]["name"], "lab", "{listed}");
    let out = cli_as_nobody(&k, &[ro_gid], &["stats", "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // ...and changes nothing.
    let out = cli_as_nobody(&k, &[ro_gid], &["net", "add", "evil"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("permission denied: net_add changes the daemon")
            && err.contains(&format!("read-only group {ro}")),
        "{err}"
    );
    let saved = lab.work_dir().join("by-ro.toml");
    let out = cli_as_nobody(&k, &[ro_gid], &["save", saved.to_str().unwrap(), "--force"]);
    assert!(!out.status.success() && text(&out.stderr).contains("permission denied"));
    assert!(!saved.exists());
    let out = cli_as_nobody(&k, &[ro_gid], &["down"]);
    assert!(!out.status.success() && text(&out.stderr).contains("permission denied"));
    assert_eq!(nets(&k), ["lab"]);

    // A stranger: the file mode already keeps it out...
    let out = cli_as_nobody(&k, &[], &["net", "list"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out.stderr)
    );
    // ...and with the mode opened, the daemon refuses it itself.
    std::fs::set_permissions(k.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = cli_as_nobody(&k, &[], &["net", "list"]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(&format!(
            "permission denied: uid {NOBODY} is not root or in group {full}/{ro}"
        )),
        "{err}"
    );
    // Positive control through the same opened socket: a member of GROUP
    // (a supplementary group, not root) may change things.
    let out = cli_as_nobody(&k, &[full_gid], &["net", "add", "second"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    // But a member is not root: the daemon writes no file of its choosing.
    let anywhere = lab.work_dir().join("member-forced.toml");
    let out = cli_as_nobody(
        &k,
        &[full_gid],
        &["save", anywhere.to_str().unwrap(), "--force"],
    );
    assert!(
        !out.status.success() && text(&out.stderr).contains("only root may force"),
        "{}",
        text(&out.stderr)
    );
    assert!(!anywhere.exists(), "the member's forced save wrote a file");
    std::fs::set_permissions(k.socket(), std::fs::Permissions::from_mode(0o660)).unwrap();
    let log = k.daemon_log();
    assert!(
        log.contains("uid 65534") && log.contains("refused"),
        "{log}"
    );
    assert!(k.daemon_running());
    assert_eq!(nets(&k), ["lab", "second"]);

    // A request line over 8 MiB is refused and its connection closed; one
    // just under it is answered (same request, less padding).
    let big = padded_net_list(&k, 9 << 20);
    assert_eq!(big["ok"], false, "{big}");
    let err = big["error"].as_str().unwrap_or_default();
    assert!(err.contains("longer than 8 MiB"), "{err}");
    let under = padded_net_list(&k, 7 << 20);
    assert_eq!(under["ok"], true, "{under}");
    assert!(k.daemon_running());
    assert_eq!(nets(&k), ["lab", "second"]);

    // `save` outside the config directory (/etc/kvnet: this daemon has no
    // file) needs --force.
    let target = lab.work_dir().join("saved.toml");
    let err = k.cli_err(&["save", target.to_str().unwrap()]).unwrap();
    assert!(
        err.contains("outside the config directory") && err.contains("--force"),
        "{err}"
    );
    assert!(!target.exists());
    k.cli(&["save", target.to_str().unwrap(), "--force"])
        .unwrap();
    let saved = std::fs::read_to_string(&target).unwrap();
    assert!(saved.contains("[networks.second]"), "{saved}");

    k.stop().unwrap();
    drop(groups);
    assert_eq!((gid(&full), gid(&ro)), (None, None), "groups removed");
}
