//! Lab topology: a hypervisor namespace, guest namespaces veth'd into it,
//! taps for qemu guests and an "outside" namespace behind an uplink.
//!
//! Names carry a per-run suffix `p<pid>x<counter><random>` so labs in one
//! process and across processes never collide, and leftovers of crashed runs
//! can be attributed to a dead pid.
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};

use crate::procs::{self, describe, spawn_in_ns, Proc, Procs, LAB_ENV};

/// Where `ip netns add` puts its namespace files.
pub const NETNS_DIR: &str = "/var/run/netns";
/// bpffs mount point.
pub const BPFFS: &str = "/sys/fs/bpf";
const BPFFS_MAGIC: i64 = 0xcafe4a11;
const PREFIX: &str = "kvnet-";

pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn new_suffix() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    // The random part guards against a reused pid meeting leftovers of a
    // crashed run with the same pid.
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let rnd = (nanos ^ (nanos >> 12) ^ n.wrapping_mul(2654435761)) & 0xfff;
    format!("p{}x{:x}{:03x}", std::process::id(), n, rnd)
}

/// The pid embedded in a suffix (`p<pid>x...`), or in a name containing one
/// (`kvnet-p<pid>x...-hv`).
pub fn suffix_pid(name: &str) -> Option<u32> {
    let s = name.strip_prefix(PREFIX).unwrap_or(name);
    let rest = s.strip_prefix('p')?;
    let end = rest.find('x')?;
    rest[..end].parse().ok()
}

fn pid_alive(pid: u32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None) {
        Ok(()) => true,
        Err(e) => e == nix::errno::Errno::EPERM,
    }
}

fn check_ifname(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 15
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        bail!("invalid interface name {name:?} (1-15 chars, no '/', ':' or spaces)");
    }
    Ok(())
}

/// Run a command in namespace `ns` (`nsenter --net=/var/run/netns/NS --`,
/// which, unlike `ip netns exec`, keeps the host's /sys and bpffs view) and
/// return its output whatever its exit status.
pub fn exec_output(ns: &str, args: &[&str]) -> Result<Output> {
    let Some((prog, rest)) = args.split_first() else {
        bail!("exec in netns {ns}: empty command");
    };
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", netns_path(ns).display()))
        .arg("--")
        .arg(prog)
        .args(rest)
        .stdin(Stdio::null());
    cmd.output()
        .with_context(|| format!("run `{}` in netns {ns}", args.join(" ")))
}

/// Like [`exec_output`] but a non-zero exit status is an error carrying the
/// command line, status and stderr.
pub fn exec(ns: &str, args: &[&str]) -> Result<Output> {
    let out = exec_output(ns, args)?;
    if !out.status.success() {
        let stdout = String::from_utf8_lossy(&out.stdout);
        bail!(
            "`{}` in netns {ns} failed ({}): {}{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if stdout.trim().is_empty() {
                ""
            } else {
                "\nstdout: "
            },
            stdout.trim()
        );
    }
    Ok(out)
}

/// Run `sh -c CMD` in namespace `ns`; returns stdout. Fails on non-zero exit.
pub fn sh(ns: &str, cmd: &str) -> Result<String> {
    let out = exec(ns, &["sh", "-c", cmd])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run a command on the host (outside any lab namespace); errors name it.
pub(crate) fn host(args: &[&str]) -> Result<Output> {
    let Some((prog, rest)) = args.split_first() else {
        bail!("empty host command");
    };
    let out = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run `{}`", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// The MAC address of `iface` in `ns` (read through `ip -j`, because /sys
/// shows the root namespace's devices).
pub fn read_mac(ns: &str, iface: &str) -> Result<[u8; 6]> {
    let out = exec(ns, &["ip", "-j", "link", "show", "dev", iface])?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parse `ip -j link show {iface}` in netns {ns}"))?;
    let addr = v
        .get(0)
        .and_then(|l| l.get("address"))
        .and_then(|a| a.as_str())
        .with_context(|| format!("no MAC address for {iface} in netns {ns}"))?;
    crate::inject::mac_parse(addr).with_context(|| format!("MAC of {iface} in netns {ns}"))
}

/// How many of `count` pings from namespace `ns` to `ip` (0.2 s apart,
/// 1 s timeout each) were answered, read from ping's summary line (its
/// exit status only says "at least one"). 0 if ping could not send.
pub fn ping_replies(ns: &str, ip: &str, count: u32) -> u32 {
    let c = count.to_string();
    let Ok(o) = exec_output(ns, &["ping", "-c", &c, "-i", "0.2", "-W", "1", ip]) else {
        return 0;
    };
    parse_ping_received(&String::from_utf8_lossy(&o.stdout))
}

/// The "N received" of ping's summary ("2 packets transmitted, 2
/// received, ..."); duplicates are not counted; 0 without a summary.
pub fn parse_ping_received(text: &str) -> u32 {
    text.lines()
        .find(|l| l.contains("packets transmitted"))
        .and_then(|l| {
            l.split(',')
                .map(str::trim)
                .find_map(|f| f.strip_suffix(" received"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// Whether `ip` answers both of two pings from namespace `ns`.
pub fn ping(ns: &str, ip: &str) -> bool {
    ping_replies(ns, ip, 2) == 2
}

/// Whether `ip` answers neither of two pings from namespace `ns`: what an
/// isolation check asserts (`!ping` would pass with one reply of two).
pub fn ping_unanswered(ns: &str, ip: &str) -> bool {
    ping_replies(ns, ip, 2) == 0
}

/// Add an address (`10.0.0.1/24`) to `iface` in `ns`.
pub fn set_ip(ns: &str, iface: &str, cidr: &str) -> Result<()> {
    exec(ns, &["ip", "addr", "add", cidr, "dev", iface])?;
    Ok(())
}

/// One guest's namespace and its port into the hypervisor namespace.
#[derive(Debug, Clone)]
pub struct GuestPort {
    /// The guest's namespace (`kvnet-<suffix>-gN`).
    pub ns: String,
    /// The hv-side veth end (the guest's "tap"), in the hv namespace.
    pub hv_if: String,
    /// The guest-side interface, always `eth0`.
    pub guest_if: String,
    /// The guest interface's MAC.
    pub mac: [u8; 6],
}

impl GuestPort {
    /// Add an address to the guest's `eth0`.
    pub fn set_ip(&self, cidr: &str) -> Result<()> {
        set_ip(&self.ns, &self.guest_if, cidr)
    }
    /// Run a command in the guest's namespace.
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        exec(&self.ns, args)
    }
    pub fn sh(&self, cmd: &str) -> Result<String> {
        sh(&self.ns, cmd)
    }
    /// See [`ping`]: every reply.
    pub fn ping(&self, ip: &str) -> bool {
        ping(&self.ns, ip)
    }
    /// See [`ping_unanswered`]: no reply at all.
    pub fn ping_unanswered(&self, ip: &str) -> bool {
        ping_unanswered(&self.ns, ip)
    }
    /// Turns IPv6 off in the guest, so that no IPv6 chatter (router
    /// solicitations, DAD) refreshes FDB entries or fills captures behind a
    /// test's back.
    pub fn disable_ipv6(&self) -> Result<()> {
        self.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.eth0.disable_ipv6=1")?;
        Ok(())
    }
}

/// The outside world: a namespace behind the uplink `up0` of the hv.
#[derive(Debug, Clone)]
pub struct Outside {
    /// `kvnet-<suffix>-out`.
    pub ns: String,
    /// The uplink in the hv namespace (`up0`), playing the physical NIC.
    pub hv_if: String,
    /// The interface in the outside namespace (`eth0`).
    pub iface: String,
    pub mac: [u8; 6],
}

impl Outside {
    pub fn set_ip(&self, cidr: &str) -> Result<()> {
        set_ip(&self.ns, &self.iface, cidr)
    }
    pub fn exec(&self, args: &[&str]) -> Result<Output> {
        exec(&self.ns, args)
    }
    pub fn sh(&self, cmd: &str) -> Result<String> {
        sh(&self.ns, cmd)
    }
}

/// A lab: namespaces, ports and processes, all torn down on drop.
pub struct Lab {
    suffix: String,
    hv: String,
    work_dir: PathBuf,
    namespaces: Mutex<Vec<String>>,
    taps: Mutex<Vec<String>>,
    remove: Mutex<Vec<PathBuf>>,
    guests: AtomicU32,
    procs: Procs,
}

fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Lab {
    /// Create the hypervisor namespace `kvnet-<suffix>-hv` (with `lo` up) and
    /// the lab's work folder `/tmp/kvnet-<suffix>`.
    pub fn new() -> Result<Lab> {
        let suffix = new_suffix();
        let work_dir = PathBuf::from(format!("/tmp/{PREFIX}{suffix}"));
        let lab = Lab {
            hv: format!("{PREFIX}{suffix}-hv"),
            suffix,
            work_dir,
            namespaces: Mutex::new(Vec::new()),
            taps: Mutex::new(Vec::new()),
            remove: Mutex::new(Vec::new()),
            guests: AtomicU32::new(0),
            procs: Arc::default(),
        };
        // From here on, Drop cleans up whatever was half built.
        lab.remove_on_drop(lab.pin_dir());
        lab.remove_on_drop(lab.socket_path());
        fs::create_dir_all(&lab.work_dir)
            .with_context(|| format!("create {}", lab.work_dir.display()))?;
        let hv = lab.hv.clone();
        lab.add_ns(&hv)?;
        Ok(lab)
    }

    fn add_ns(&self, ns: &str) -> Result<()> {
        // Record first: a failure half way must still be cleaned up.
        locked(&self.namespaces).push(ns.to_string());
        host(&["ip", "netns", "add", ns]).with_context(|| format!("create netns {ns}"))?;
        exec(ns, &["ip", "link", "set", "lo", "up"])?;
        Ok(())
    }

    pub fn suffix(&self) -> &str {
        &self.suffix
    }
    /// The hypervisor namespace's name.
    pub fn hv(&self) -> &str {
        &self.hv
    }
    /// `/sys/fs/bpf/kvnet-<suffix>`: not created here, removed on drop.
    pub fn pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("{BPFFS}/{PREFIX}{}", self.suffix))
    }
    /// A control socket path for the daemon, removed on drop.
    pub fn socket_path(&self) -> PathBuf {
        self.work_dir.join("kvnet.sock")
    }
    /// A scratch folder (`/tmp/kvnet-<suffix>`) for logs, initrds, captures;
    /// removed on drop.
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }
    /// All namespaces created so far.
    pub fn namespaces(&self) -> Vec<String> {
        locked(&self.namespaces).clone()
    }

    /// Remove `path` (file or folder, recursively) when the lab is dropped.
    pub fn remove_on_drop(&self, path: impl Into<PathBuf>) {
        locked(&self.remove).push(path.into());
    }

    /// A new guest namespace `kvnet-<suffix>-gN` joined to the hv by a veth:
    /// `name` in the hv namespace, `eth0` in the guest; both up.
    pub fn add_guest(&self, name: &str) -> Result<GuestPort> {
        self.add_guest_with(name, None)
    }

    /// [`Lab::add_guest`], also giving the guest's eth0 an address.
    pub fn add_guest_with(&self, name: &str, ip_cidr: Option<&str>) -> Result<GuestPort> {
        check_ifname(name)?;
        let n = self.guests.fetch_add(1, Ordering::Relaxed) + 1;
        let ns = format!("{PREFIX}{}-g{n}", self.suffix);
        self.add_ns(&ns)?;
        self.veth(name, &ns, "eth0")?;
        let port = GuestPort {
            mac: read_mac(&ns, "eth0")?,
            ns,
            hv_if: name.to_string(),
            guest_if: "eth0".to_string(),
        };
        if let Some(cidr) = ip_cidr {
            port.set_ip(cidr)?;
        }
        Ok(port)
    }

    /// Guests `(port name, address)` with IPv6 off (see
    /// [`GuestPort::disable_ipv6`]): only the test's own traffic flows.
    pub fn add_ipv4_guests(&self, specs: &[(&str, &str)]) -> Result<Vec<GuestPort>> {
        specs
            .iter()
            .map(|(name, cidr)| {
                let g = self.add_guest_with(name, Some(cidr))?;
                g.disable_ipv6()?;
                Ok(g)
            })
            .collect()
    }

    /// veth `hv_name` (hv ns) <-> `peer` (in `peer_ns`), both up.
    fn veth(&self, hv_name: &str, peer_ns: &str, peer: &str) -> Result<()> {
        let hv = &self.hv;
        exec(
            hv,
            &[
                "ip", "link", "add", hv_name, "type", "veth", "peer", "name", peer, "netns",
                peer_ns,
            ],
        )
        .with_context(|| {
            format!("create veth {hv_name} (netns {hv}) <-> {peer} (netns {peer_ns})")
        })?;
        exec(hv, &["ip", "link", "set", hv_name, "up"])?;
        exec(peer_ns, &["ip", "link", "set", peer, "up"])?;
        Ok(())
    }

    /// A bare namespace `kvnet-<suffix>-<role>` (only `lo`, up), removed
    /// with the lab: for hosts beyond the outside, wired by the test.
    pub fn add_netns(&self, role: &str) -> Result<String> {
        if role.is_empty() || !role.chars().all(|c| c.is_ascii_alphanumeric()) {
            bail!("invalid namespace role {role:?} (letters and digits)");
        }
        let ns = format!("{PREFIX}{}-{role}", self.suffix);
        if locked(&self.namespaces).contains(&ns) {
            bail!("netns {ns} already exists in this lab");
        }
        self.add_ns(&ns)?;
        Ok(ns)
    }

    /// A real tap device `name` in the hv namespace (up), for a qemu guest.
    pub fn add_tap(&self, name: &str) -> Result<String> {
        check_ifname(name)?;
        locked(&self.taps).push(name.to_string());
        exec(
            &self.hv,
            &["ip", "tuntap", "add", "dev", name, "mode", "tap"],
        )?;
        exec(&self.hv, &["ip", "link", "set", name, "up"])?;
        Ok(name.to_string())
    }

    /// The outside namespace `kvnet-<suffix>-out`, joined to the hv by a veth
    /// whose hv end `up0` plays the physical NIC.
    pub fn add_outside(&self) -> Result<Outside> {
        let ns = format!("{PREFIX}{}-out", self.suffix);
        self.add_ns(&ns)?;
        self.veth("up0", &ns, "eth0")?;
        Ok(Outside {
            mac: read_mac(&ns, "eth0")?,
            ns,
            hv_if: "up0".to_string(),
            iface: "eth0".to_string(),
        })
    }

    /// [`Lab::add_outside`] with `outside_cidr` on its eth0 and
    /// `uplink_cidr` on the hv's up0, and IPv6 off outside so that only the
    /// test's own traffic crosses the uplink.
    pub fn add_outside_with(&self, outside_cidr: &str, uplink_cidr: &str) -> Result<Outside> {
        let out = self.add_outside()?;
        out.set_ip(outside_cidr)?;
        out.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1")?;
        exec(&self.hv, &["ip", "addr", "add", uplink_cidr, "dev", "up0"])?;
        Ok(out)
    }

    /// See [`exec`].
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Output> {
        exec(ns, args)
    }
    /// See [`exec_output`].
    pub fn exec_output(&self, ns: &str, args: &[&str]) -> Result<Output> {
        exec_output(ns, args)
    }
    /// See [`sh`].
    pub fn sh(&self, ns: &str, cmd: &str) -> Result<String> {
        sh(ns, cmd)
    }

    /// Start `cmd` in namespace `ns` in the background, keeping its stdio
    /// settings (default: inherited). The lab stops it (its whole process
    /// group) on drop.
    pub fn spawn(&self, ns: &str, mut cmd: Command) -> Result<Proc> {
        cmd.env(LAB_ENV, &self.suffix);
        let label = format!("`{}` in netns {ns}", describe(&cmd));
        let child = spawn_in_ns(ns, cmd)?;
        Ok(Proc::register(&self.procs, child, label))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        procs::stop_all(&self.procs);
        // Taps are deleted explicitly: cheap insurance that no device is
        // ever pushed back to the root namespace.
        for tap in locked(&self.taps).iter() {
            let _ = exec_output(&self.hv, &["ip", "link", "del", tap]);
        }
        // Guests first, hv last (the reverse of creation).
        for ns in locked(&self.namespaces).iter().rev() {
            if netns_path(ns).exists() {
                if let Err(e) = host(&["ip", "netns", "delete", ns]) {
                    eprintln!("kvnet lab: {e:#}");
                }
            }
        }
        let mut paths = locked(&self.remove).clone();
        paths.push(self.work_dir.clone());
        for p in paths {
            remove_path(&p);
        }
    }
}

fn remove_path(p: &Path) {
    let res = match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(p),
        Ok(_) => fs::remove_file(p),
        Err(_) => return,
    };
    if let Err(e) = res {
        eprintln!("kvnet lab: remove {}: {e}", p.display());
    }
}

/// Whether privileged lab tests can run (root); prints why not otherwise,
/// so tests can `if !privileged() { return; }`.
pub fn privileged() -> bool {
    let root = nix::unistd::geteuid().is_root();
    if !root {
        eprintln!("kvnet lab: not root, skipping privileged test");
    }
    root
}

/// Mount bpffs on /sys/fs/bpf unless it already is bpffs. Returns whether
/// it mounted.
pub fn mount_bpffs_if_needed() -> Result<bool> {
    let st = nix::sys::statfs::statfs(BPFFS).with_context(|| format!("statfs {BPFFS}"))?;
    if st.filesystem_type().0 as i64 == BPFFS_MAGIC {
        return Ok(false);
    }
    nix::mount::mount(
        Some("bpf"),
        BPFFS,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .with_context(|| format!("mount -t bpf bpf {BPFFS}"))?;
    Ok(true)
}

fn list_prefixed(dir: &str, prefix: &str) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

/// Pids of processes carrying `KVNET_LAB=<suffix>` in their environment.
fn lab_processes(mut want: impl FnMut(&str) -> bool) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(rd) = fs::read_dir("/proc") else {
        return found;
    };
    let key = format!("{LAB_ENV}=");
    for e in rd.filter_map(|e| e.ok()) {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(env) = fs::read(e.path().join("environ")) else {
            continue;
        };
        for var in env.split(|b| *b == 0) {
            if let Some(s) = var.strip_prefix(key.as_bytes()) {
                let s = String::from_utf8_lossy(s);
                if want(&s) {
                    found.push((pid, s.into_owned()));
                }
            }
        }
    }
    found
}

fn proc_cmdline(pid: u32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Everything still around that belongs to lab `suffix`: namespaces, pin
/// folder, work folder and processes. Empty after a clean teardown.
pub fn leftovers_of(suffix: &str) -> Vec<String> {
    let mut out = Vec::new();
    for ns in list_prefixed(NETNS_DIR, &format!("{PREFIX}{suffix}-")) {
        out.push(format!("netns {ns}"));
    }
    for dir in [BPFFS, "/tmp"] {
        let p = Path::new(dir).join(format!("{PREFIX}{suffix}"));
        if p.exists() {
            out.push(format!("path {}", p.display()));
        }
    }
    for (pid, _) in lab_processes(|s| s == suffix) {
        out.push(format!("process {pid}: {}", proc_cmdline(pid)));
    }
    out
}

/// Remove what crashed earlier runs left: `kvnet-*` namespaces, pin and
/// work folders, and lab processes whose embedded pid is dead. Returns how
/// many things were removed.
pub fn cleanup_leftovers() -> Result<usize> {
    let dead = |name: &str| suffix_pid(name).is_some_and(|p| !pid_alive(p));
    let mut n = 0;
    // Processes first: they may keep namespaces alive.
    for (pid, suffix) in lab_processes(|s| dead(s)) {
        if pid != std::process::id()
            && nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
        {
            log::info!("killed leftover process {pid} of lab {suffix}");
            n += 1;
        }
    }
    for ns in list_prefixed(NETNS_DIR, PREFIX) {
        if dead(&ns) {
            host(&["ip", "netns", "delete", &ns])?;
            n += 1;
        }
    }
    for dir in [BPFFS, "/tmp"] {
        for name in list_prefixed(dir, PREFIX) {
            if dead(&name) {
                let p = Path::new(dir).join(&name);
                remove_path(&p);
                n += 1;
            }
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_roundtrip() {
        let a = new_suffix();
        let b = new_suffix();
        assert_ne!(a, b);
        assert_eq!(suffix_pid(&a), Some(std::process::id()));
        assert_eq!(
            suffix_pid(&format!("kvnet-{a}-hv")),
            Some(std::process::id())
        );
        assert_eq!(suffix_pid("kvnet-foo"), None);
        assert_eq!(suffix_pid("kvnet-p12x3abc-g1"), Some(12));
    }

    #[test]
    fn ping_summary() {
        let all = "--- 10.0.0.2 ping statistics ---\n\
                   2 packets transmitted, 2 received, 0% packet loss, time 201ms\n";
        assert_eq!(parse_ping_received(all), 2);
        let half = "2 packets transmitted, 1 received, 50% packet loss, time 1002ms\n";
        assert_eq!(parse_ping_received(half), 1);
        let dup = "2 packets transmitted, 1 received, +1 duplicates, 50% packet loss\n";
        assert_eq!(parse_ping_received(dup), 1);
        let err = "2 packets transmitted, 0 received, +2 errors, 100% packet loss\n";
        assert_eq!(parse_ping_received(err), 0);
        assert_eq!(
            parse_ping_received("ping: connect: Network is unreachable\n"),
            0
        );
    }

    #[test]
    fn ifname_rules() {
        assert!(check_ifname("g1").is_ok());
        assert!(check_ifname("abcdefghijklmno").is_ok());
        assert!(check_ifname("abcdefghijklmnop").is_err());
        assert!(check_ifname("").is_err());
        assert!(check_ifname("a/b").is_err());
    }
}
