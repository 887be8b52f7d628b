//! Issue 20, point 5: the Debian package (`cargo xtask package`) installs
//! with `dpkg -i` in a throwaway root, `kvnet --version` runs from there,
//! and the unit's ExecStart, run under the unit's capability bounding set,
//! starts a daemon that reports ready (Type=notify) and answers; then the
//! package purges cleanly.
//!
//! The throwaway root is the host's own root under an overlay whose upper
//! layer is a tmpfs, in private mount, network and PID namespaces: every
//! write (dpkg's database included) lands in the tmpfs, and everything —
//! mounts, the daemon, its bpffs and interfaces — vanishes with the
//! namespaces when the script ends, whichever way it ends. The test checks
//! that the host's dpkg state and files did not change.
use std::{
    fs,
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::SystemTime,
};

use kvnet_tests::{kvnet::kvnet_bin, lab::privileged};

/// Runs in the namespaces: $1 the scratch folder, $2 the package. Each
/// step prints a `== name` header so the test can read its output.
const SCRIPT: &str = r#"
set -eu
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
T=$1 DEB=$2 R=$1/root
mount -t tmpfs -o mode=0755 tmpfs "$T/layers"
mkdir "$T/layers/upper" "$T/layers/work"
mount -t overlay overlay -o "lowerdir=/,upperdir=$T/layers/upper,workdir=$T/layers/work" "$R"
mount -t proc proc "$R/proc"
mount --bind /dev "$R/dev"
mount -t sysfs sysfs "$R/sys"
mount -t bpf bpf "$R/sys/fs/bpf"
# No /run/systemd: the maintainer scripts act as outside systemd.
mount -t tmpfs tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
mkdir "$R/run/notify"
mount --bind "$T/notify" "$R/run/notify"
cp "$DEB" "$R/tmp/kvnet.deb"
in_root() { chroot "$R" "$@"; }

echo "== install"
in_root dpkg -i /tmp/kvnet.deb
echo "== status"
in_root dpkg-query -W -f '${Status} ${Version}\n' kvnet
echo "== version"
in_root /usr/bin/kvnet --version
echo "== verify"
in_root dpkg --verify kvnet
echo "== files"
in_root dpkg -L kvnet
echo "== example"
in_root /usr/bin/kvnet check /usr/share/doc/kvnet/examples/kvnet.toml
echo "== man"
in_root gzip -dc /usr/share/man/man1/kvnet-daemon.1.gz | grep -c '^\.TH'

unit=$R/usr/lib/systemd/system/kvnet.service
exec_start=$(sed -n 's/^ExecStart=//p' "$unit")
# CAP_NET_ADMIN CAP_BPF -> -all,+net_admin,+bpf (setpriv's spelling)
caps=$(sed -n 's/^CapabilityBoundingSet=//p' "$unit" | tr 'A-Z' 'a-z' | sed 's/cap_/+/g; s/ /,/g')
echo "== unit help"
in_root $exec_start --help | head -1
echo "== unit start"
# What systemd makes for RuntimeDirectory= and StateDirectory=.
mkdir -p "$R/run/kvnet" "$R/var/lib/kvnet"
NOTIFY_SOCKET=/run/notify/sock chroot "$R" setpriv --no-new-privs --bounding-set "-all,$caps" $exec_start &
daemon=$!
i=0
until in_root /usr/bin/kvnet status --json > "$T/status.json" 2>/dev/null; do
    i=$((i + 1))
    if [ $i -gt 300 ] || ! kill -0 $daemon 2>/dev/null; then
        echo "the daemon did not answer"; cat "$T/status.json"; exit 1
    fi
    sleep 0.1
done
cat "$T/status.json"
echo "== unit stop"
kill -TERM $daemon
wait $daemon && echo "exit 0"
in_root /usr/bin/kvnet down
echo "== purge"
in_root dpkg --purge kvnet
for f in /usr/bin/kvnet /usr/lib/systemd/system/kvnet.service /usr/lib/kvnet; do
    if [ -e "$R$f" ]; then echo "$f is still there"; exit 1; fi
done
in_root dpkg-query -W -f '${Status}\n' kvnet || true
echo "== done"
"#;

/// The package under test: `$KVNET_DEB` (set by `cargo xtask test`), else
/// `cargo xtask package`'s output next to `$KVNET_BIN`'s target folder.
fn package(kvnet: &Path, version: &str) -> PathBuf {
    if let Some(p) = std::env::var_os("KVNET_DEB") {
        assert!(
            !p.is_empty(),
            "KVNET_DEB is empty: `cargo xtask test`'s package phase failed"
        );
        return PathBuf::from(p);
    }
    let arch = stdout(Command::new("dpkg").arg("--print-architecture"));
    let target = kvnet
        .parent()
        .and_then(Path::parent)
        .expect("kvnet is under <target>/release/");
    let deb = target
        .join("package")
        .join(format!("kvnet_{version}_{}.deb", arch.trim()));
    assert!(
        deb.is_file(),
        "{} is missing: run `cargo xtask package` (or set KVNET_DEB)",
        deb.display()
    );
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).unwrap();
    assert!(
        mtime(&deb) >= mtime(kvnet),
        "{} is older than {}: run `cargo xtask package` again",
        deb.display(),
        kvnet.display()
    );
    deb
}

fn stdout(c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(out.status.success(), "{c:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// What the host must still be after the test: its dpkg view of kvnet and
/// the files the package would install.
fn host_state() -> Vec<String> {
    let q = Command::new("dpkg-query")
        .args(["-W", "-f", "${Status} ${Version}", "kvnet"])
        .output()
        .expect("dpkg-query runs");
    let mut state = vec![format!(
        "dpkg-query: {}",
        String::from_utf8_lossy(&q.stdout)
    )];
    for f in [
        "/usr/bin/kvnet",
        "/usr/lib/systemd/system/kvnet.service",
        "/usr/lib/kvnet/kvnet-ifup",
        "/usr/share/man/man1/kvnet.1.gz",
        "/usr/share/bash-completion/completions/kvnet",
    ] {
        let m = fs::metadata(f).ok().map(|m| (m.len(), m.modified().ok()));
        state.push(format!("{f}: {m:?}"));
    }
    state
}

/// The script's output of step `name`: the lines after its `== name`
/// header, up to the next header.
fn section(out: &str, name: &str) -> String {
    let header = format!("== {name}");
    let mut lines = out.lines().skip_while(|l| *l != header);
    assert!(lines.next().is_some(), "no step {name} in:\n{out}");
    let body: Vec<&str> = lines.take_while(|l| !l.starts_with("== ")).collect();
    body.join("\n")
}

/// Removes the scratch folder however the test ends (the mounts in it
/// died with the namespaces).
struct Scratch(PathBuf);
impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

#[test]
fn the_package_installs_runs_and_purges_in_a_clean_root() {
    if !privileged() {
        return;
    }
    let kvnet = kvnet_bin().unwrap();
    let version = stdout(Command::new(&kvnet).arg("--version"));
    let version = version.trim().strip_prefix("kvnet ").unwrap().to_string();
    let deb = package(&kvnet, &version);

    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let scratch =
        Scratch(std::env::temp_dir().join(format!("kvnet-package-{}-{nanos}", std::process::id())));
    for d in ["layers", "root", "notify"] {
        fs::create_dir_all(scratch.0.join(d)).unwrap();
    }
    let notify = UnixDatagram::bind(scratch.0.join("notify/sock")).unwrap();
    notify.set_nonblocking(true).unwrap();

    let before = host_state();
    let out = Command::new("unshare")
        .args([
            "--mount",
            "--net",
            "--pid",
            "--fork",
            "--kill-child",
            "--propagation",
            "private",
            "sh",
            "-c",
            SCRIPT,
            "sh",
        ])
        .arg(&scratch.0)
        .arg(&deb)
        .output()
        .expect("unshare runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let log = format!("{text}\nstderr:\n{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(before, host_state(), "the host changed:\n{log}");
    assert!(out.status.success(), "{}:\n{log}", out.status);

    assert_eq!(
        section(&text, "status").trim(),
        format!("install ok installed {version}"),
        "{log}"
    );
    assert_eq!(
        section(&text, "version").trim(),
        format!("kvnet {version}"),
        "{log}"
    );
    // dpkg --verify prints only files whose checksum differs.
    assert_eq!(section(&text, "verify").trim(), "", "{log}");
    let files = section(&text, "files");
    let files: Vec<&str> = files.lines().collect();
    for f in [
        "/usr/bin/kvnet",
        "/usr/lib/systemd/system/kvnet.service",
        "/usr/lib/kvnet/kvnet-ifup",
        "/usr/lib/kvnet/kvnet-ifdown",
        "/usr/share/bash-completion/completions/kvnet",
        "/usr/share/zsh/vendor-completions/_kvnet",
        "/usr/share/fish/vendor_completions.d/kvnet.fish",
        "/usr/share/man/man1/kvnet.1.gz",
        "/usr/share/man/man1/kvnet-net-add.1.gz",
        "/usr/share/doc/kvnet/README.md",
    ] {
        assert!(files.contains(&f), "{f} not installed:\n{log}");
    }
    assert!(
        section(&text, "example").contains(": ok"),
        "the example config does not check:\n{log}"
    );
    assert_eq!(section(&text, "man").trim(), "1", "{log}");
    assert!(
        section(&text, "unit help").contains("Run the daemon"),
        "{log}"
    );

    let status: serde_json::Value = serde_json::from_str(&section(&text, "unit start"))
        .unwrap_or_else(|e| panic!("{e}: {log}"));
    assert_eq!(status["version"], version.as_str(), "{log}");
    assert_eq!(
        section(&text, "unit stop").lines().next(),
        Some("exit 0"),
        "{log}"
    );
    let mut messages = Vec::new();
    let mut buf = [0u8; 256];
    while let Ok(n) = notify.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(
        messages.iter().any(|m| m.contains("READY=1")),
        "no READY=1 from the unit's daemon (Type=notify): {messages:?}\n{log}"
    );
    // Purged: dpkg no longer knows the package.
    assert!(!section(&text, "purge").contains("install ok"), "{log}");
}
