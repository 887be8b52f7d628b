//! Real guests: a tiny cached boot image (Debian's stock kernel, virtio-net
//! modules, static busybox) and qemu VMs attached to lab taps.
use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

use crate::cpio::Cpio;
use crate::lab::{host, Lab};
use crate::procs::Proc;

/// Printed by /init once eth0 is configured.
pub const READY: &str = "KVNET-READY";
/// Printed by /init before running /script.sh.
pub const SCRIPT_BEGIN: &str = "KVNET-SCRIPT-BEGIN";
/// Printed by /init after /script.sh as `KVNET-DONE rc=N`.
pub const DONE: &str = "KVNET-DONE rc=";

/// The virtio-net driver stack, loaded in dependency order at boot.
const MODULES: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_modern_dev",
    "virtio_pci_legacy_dev",
    "virtio_pci",
    "failover",
    "net_failover",
    "virtio_net",
];
const BUSYBOX: &str = "/bin/busybox";
const DONE_MARKER: &str = "done";

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for m in $(cat /etc/kvnet-modules); do
    insmod /lib/modules/kvnet/$m || echo "kvnet: insmod $m failed"
done
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 200 ]; do sleep 0.05; i=$((i+1)); done
ip link set eth0 up
cfg=$(sed -n 's/.*kvnet\.ip=\([^ ]*\).*/\1/p' /proc/cmdline)
case "$cfg" in
    "") ;;
    dhcp) udhcpc -i eth0 -n -q -t 20 -T 1 -s /usr/share/udhcpc/default.script || echo "kvnet: dhcp failed" ;;
    *) ip addr add "$cfg" dev eth0 ;;
esac
echo KVNET-READY
rc=0
if [ -f /script.sh ]; then
    echo KVNET-SCRIPT-BEGIN
    sh /script.sh
    rc=$?
fi
echo "KVNET-DONE rc=$rc"
sync
poweroff -f
"#;

/// busybox udhcpc hook: configure the lease on the interface.
const DHCP_SCRIPT: &str = r#"#!/bin/sh
case "$1" in
    deconfig) ip addr flush dev "$interface"; ip link set "$interface" up ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for r in $router; do ip route add default via "$r" dev "$interface"; break; done
        echo "kvnet: dhcp $ip/${mask:-24} router ${router:-none}"
        ;;
esac
exit 0
"#;

/// A cached boot image: kernel and base initramfs.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

/// Where the tests cache the image: `$KVNET_GUEST_CACHE`, else
/// `<workspace>/target/guest-image`.
pub fn default_cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("KVNET_GUEST_CACHE") {
        return PathBuf::from(d);
    }
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .unwrap_or(manifest)
        .join("target/guest-image")
}

fn progress(msg: &str) {
    eprintln!("kvnet guest image: {msg}");
}

/// An exclusive flock held until dropped, so parallel tests build once.
struct FileLock(#[allow(dead_code)] File);

impl FileLock {
    fn exclusive(path: &Path) -> Result<FileLock> {
        let f = File::create(path).with_context(|| format!("create {}", path.display()))?;
        // SAFETY: flock on an fd we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("lock {}", path.display()));
        }
        Ok(FileLock(f))
    }
}

impl Image {
    fn at(dir: &Path) -> Image {
        Image {
            dir: dir.to_path_buf(),
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio"),
        }
    }

    fn ready(&self) -> bool {
        self.dir.join(DONE_MARKER).exists() && self.kernel.exists() && self.initrd.exists()
    }

    /// The cached image in `cache_dir`, building it first if needed (a few
    /// seconds: apt-get download of the stock kernel, dpkg -x, cpio).
    pub fn ensure(cache_dir: &Path) -> Result<Image> {
        let img = Image::at(cache_dir);
        if img.ready() {
            return Ok(img);
        }
        fs::create_dir_all(cache_dir).with_context(|| format!("create {}", cache_dir.display()))?;
        let _lock = FileLock::exclusive(&cache_dir.join(".lock"))?;
        if img.ready() {
            return Ok(img); // built by another test while we waited
        }
        let tmp = cache_dir.join("build.tmp");
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        build(&img, &tmp).context("build guest image")?;
        let _ = fs::remove_dir_all(&tmp);
        Ok(img)
    }

    /// Writes to `dest` the image's initramfs with `script` (run by /init
    /// once the network is up) riding in a small appended cpio.
    pub fn write_initrd(&self, script: &str, dest: &Path) -> Result<()> {
        let mut rd =
            fs::read(&self.initrd).with_context(|| format!("read {}", self.initrd.display()))?;
        if !script.is_empty() {
            let mut c = Cpio::new();
            c.file("script.sh", 0o755, script.as_bytes());
            rd.extend_from_slice(&c.finish());
        }
        fs::write(dest, rd).with_context(|| format!("write {}", dest.display()))
    }

    /// What the image was built from (the kernel package name).
    pub fn describe(&self) -> String {
        fs::read_to_string(self.dir.join(DONE_MARKER)).unwrap_or_default()
    }
}

/// The concrete kernel package behind the `linux-image-amd64` metapackage.
fn kernel_package() -> Result<String> {
    let find = || -> Result<Option<String>> {
        let out = host(&["apt-cache", "depends", "linux-image-amd64"])?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends:"))
            .map(|p| p.trim().to_string())
            .find(|p| p.starts_with("linux-image-") && p.ends_with("-amd64")))
    };
    if let Ok(Some(p)) = find() {
        return Ok(p);
    }
    progress("apt-cache knows no kernel package; running apt-get update");
    host(&["apt-get", "update", "-q"])?;
    find()?.ok_or_else(|| anyhow!("apt-cache depends linux-image-amd64 names no kernel package"))
}

fn build(img: &Image, tmp: &Path) -> Result<()> {
    let t0 = Instant::now();
    let busybox =
        fs::read(BUSYBOX).with_context(|| format!("read {BUSYBOX} (install busybox-static)"))?;
    if has_interp(&busybox) {
        bail!("{BUSYBOX} is dynamically linked; install busybox-static");
    }
    let pkg = kernel_package()?;
    progress(&format!("downloading {pkg}"));
    let out = Command::new("apt-get")
        .args(["download", "-q", &pkg])
        .current_dir(tmp)
        .stdin(Stdio::null())
        .output()
        .context("run apt-get download")?;
    if !out.status.success() {
        bail!(
            "apt-get download {pkg} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let deb = find_file(tmp, |n| n.ends_with(".deb"))?
        .ok_or_else(|| anyhow!("apt-get download {pkg} left no .deb in {}", tmp.display()))?;
    progress(&format!("unpacking {}", deb.display()));
    let root = tmp.join("root");
    host(&[
        "dpkg",
        "-x",
        &deb.to_string_lossy(),
        &root.to_string_lossy(),
    ])?;
    let vmlinuz = find_file(&root.join("boot"), |n| n.starts_with("vmlinuz-"))?
        .ok_or_else(|| anyhow!("{pkg} has no boot/vmlinuz-*"))?;
    let moddir = ["lib/modules", "usr/lib/modules"]
        .iter()
        .filter_map(|d| find_file(&root.join(d), |_| true).ok().flatten())
        .next()
        .ok_or_else(|| anyhow!("{pkg} has no lib/modules/<version>"))?;
    progress("resolving virtio-net modules");
    let mods = resolve_modules(&moddir, &tmp.join("mods"))?;

    let mut c = Cpio::new();
    for d in [
        "bin",
        "sbin",
        "usr",
        "usr/bin",
        "usr/sbin",
        "usr/share",
        "usr/share/udhcpc",
        "etc",
        "proc",
        "sys",
        "dev",
        "tmp",
        "run",
        "lib",
        "lib/modules",
        "lib/modules/kvnet",
    ] {
        c.dir(d);
    }
    // The kernel opens /dev/console for init before devtmpfs is mounted.
    c.char_dev("dev/console", 0o600, 5, 1);
    c.file("bin/busybox", 0o755, &busybox);
    c.symlink("bin/sh", "busybox");
    c.file("init", 0o755, INIT.as_bytes());
    c.file(
        "usr/share/udhcpc/default.script",
        0o755,
        DHCP_SCRIPT.as_bytes(),
    );
    let mut order = String::new();
    for (i, (name, data)) in mods.iter().enumerate() {
        let file = format!("{i:02}-{name}.ko");
        c.file(&format!("lib/modules/kvnet/{file}"), 0o644, data);
        order.push_str(&file);
        order.push('\n');
    }
    c.file("etc/kvnet-modules", 0o644, order.as_bytes());
    let names: Vec<&str> = mods.iter().map(|(n, _)| n.as_str()).collect();

    fs::copy(&vmlinuz, &img.kernel)
        .with_context(|| format!("copy {} to {}", vmlinuz.display(), img.kernel.display()))?;
    fs::write(&img.initrd, c.finish())
        .with_context(|| format!("write {}", img.initrd.display()))?;
    // Written last: its presence means the image is complete.
    fs::write(
        img.dir.join(DONE_MARKER),
        format!("{pkg} modules={}\n", names.join(",")),
    )?;
    progress(&format!(
        "built {} from {pkg} (modules: {}) in {:.1?}",
        img.dir.display(),
        if names.is_empty() {
            "all built in".to_string()
        } else {
            names.join(" ")
        },
        t0.elapsed()
    ));
    Ok(())
}

/// Whether an ELF binary names a dynamic loader (PT_INTERP).
fn has_interp(elf: &[u8]) -> bool {
    let rd = |o: usize, n: usize| -> Option<u64> {
        let b = elf.get(o..o + n)?;
        Some(b.iter().rev().fold(0u64, |a, x| (a << 8) | u64::from(*x)))
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (rd(0x20, 8), rd(0x36, 2), rd(0x38, 2))
    else {
        return false;
    };
    (0..phnum).any(|i| rd((phoff + i * phentsize) as usize, 4) == Some(3))
}

fn find_file(dir: &Path, pred: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    let mut names: Vec<_> = rd
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_str().is_some_and(&pred))
        .map(|e| e.path())
        .collect();
    names.sort();
    Ok(names.pop())
}

fn norm(name: &str) -> String {
    name.replace('-', "_")
}

/// Every module file under `dir`, by normalized module name.
fn index_modules(dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<()> {
    for e in fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let e = e?;
        let p = e.path();
        if e.file_type()?.is_dir() {
            index_modules(&p, out)?;
        } else if let Some(n) = e.file_name().to_str() {
            if let Some(i) = n.find(".ko") {
                out.insert(norm(&n[..i]), p);
            }
        }
    }
    Ok(())
}

/// Decompress a module file to plain ELF (the guest's insmod is busybox).
fn module_bytes(path: &Path) -> Result<Vec<u8>> {
    let p = path.to_string_lossy();
    let tool = if p.ends_with(".ko") {
        return fs::read(path).with_context(|| format!("read {p}"));
    } else if p.ends_with(".xz") {
        "xz"
    } else if p.ends_with(".zst") {
        "zstd"
    } else if p.ends_with(".gz") {
        "gzip"
    } else {
        bail!("unknown module compression: {p}");
    };
    Ok(host(&[tool, "-dc", &p])?.stdout)
}

/// The wanted modules plus their dependencies, in load order, as
/// (name, uncompressed bytes). Built-in modules are skipped.
fn resolve_modules(moddir: &Path, scratch: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut index = HashMap::new();
    index_modules(&moddir.join("kernel"), &mut index)?;
    let builtin: HashSet<String> = fs::read_to_string(moddir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(norm)
        .collect();
    fs::create_dir_all(scratch)?;
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for m in MODULES {
        add_module(
            &norm(m),
            true,
            &index,
            &builtin,
            scratch,
            &mut seen,
            &mut out,
        )?;
    }
    Ok(out)
}

fn add_module(
    name: &str,
    optional: bool,
    index: &HashMap<String, PathBuf>,
    builtin: &HashSet<String>,
    scratch: &Path,
    seen: &mut HashSet<String>,
    out: &mut Vec<(String, Vec<u8>)>,
) -> Result<()> {
    if !seen.insert(name.to_string()) {
        return Ok(());
    }
    let Some(path) = index.get(name) else {
        if builtin.contains(name) || optional {
            // Built in, or absent from this kernel version (e.g. the legacy
            // virtio-pci split came later); the wanted ones that matter fail
            // loudly at boot.
            return Ok(());
        }
        bail!("module {name} is neither a module nor built in");
    };
    let bytes = module_bytes(path)?;
    // modinfo reads the plain copy, whatever the compression was.
    let plain = scratch.join(format!("{name}.ko"));
    fs::write(&plain, &bytes)?;
    let deps = host(&["modinfo", "-F", "depends", &plain.to_string_lossy()])?;
    for d in String::from_utf8_lossy(&deps.stdout)
        .trim()
        .split(',')
        .filter(|d| !d.is_empty())
    {
        add_module(&norm(d), false, index, builtin, scratch, seen, out)
            .with_context(|| format!("dependency of {name}"))?;
    }
    out.push((name.to_string(), bytes));
    Ok(())
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmSpec {
    /// The lab tap (in the hv namespace) to attach to.
    pub tap: String,
    /// The guest NIC's MAC, `52:54:00:..`.
    pub mac: String,
    /// `10.0.0.5/24`, `dhcp`, or empty to leave eth0 unaddressed.
    pub ip: String,
    /// Shell script run after the network is up (output on the console).
    pub script: String,
    pub mem_mb: u32,
    /// qemu's `script=`/`downscript=` for the tap (default: no scripts).
    pub ifup: Option<PathBuf>,
    pub ifdown: Option<PathBuf>,
}

impl Default for VmSpec {
    fn default() -> Self {
        VmSpec {
            tap: String::new(),
            mac: "52:54:00:12:34:56".to_string(),
            ip: String::new(),
            script: String::new(),
            mem_mb: 256,
            ifup: None,
            ifdown: None,
        }
    }
}

/// The guest kernel's command line: serial console, and eth0 configured
/// as `ip` says (see [`VmSpec::ip`]).
pub fn kernel_cmdline(ip: &str) -> String {
    let mut append = String::from("console=ttyS0 quiet panic=-1");
    if !ip.is_empty() {
        append.push_str(&format!(" kvnet.ip={ip}"));
    }
    append
}

static VMS: AtomicU32 = AtomicU32::new(0);

/// A running qemu guest; killed on drop (and by the lab's drop).
pub struct Vm {
    proc: Option<Proc>,
    name: String,
    serial: PathBuf,
    qemu_log: PathBuf,
}

impl Vm {
    /// Boot `image` in qemu inside the lab's hv namespace, on `spec.tap`.
    /// The script rides in a small cpio appended to the base initramfs.
    pub fn boot(lab: &Lab, image: &Image, spec: VmSpec) -> Result<Vm> {
        if spec.ip.chars().any(char::is_whitespace) {
            bail!("VM ip {:?} must not contain spaces", spec.ip);
        }
        crate::inject::mac_parse(&spec.mac)?;
        let n = VMS.fetch_add(1, Ordering::Relaxed);
        let name = format!("vm{n}-{}", spec.tap);
        let dir = lab.work_dir();
        let initrd = dir.join(format!("{name}.initrd"));
        let serial = dir.join(format!("{name}.serial"));
        let qemu_log = dir.join(format!("{name}.qemu.log"));

        image.write_initrd(&spec.script, &initrd)?;
        File::create(&serial).with_context(|| format!("create {}", serial.display()))?;
        let log =
            File::create(&qemu_log).with_context(|| format!("create {}", qemu_log.display()))?;

        let append = kernel_cmdline(&spec.ip);
        let kvm = std::env::var("KVNET_GUEST_ACCEL").is_ok_and(|v| v == "kvm");
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(if kvm {
            ["-accel", "kvm", "-cpu", "host"]
        } else {
            // Default: this host's /dev/kvm hangs stock kernels.
            ["-accel", "tcg", "-cpu", "max"]
        });
        cmd.args(["-m", &spec.mem_mb.to_string()])
            .args(["-nodefaults", "-no-user-config", "-no-reboot"])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-kernel")
            .arg(&image.kernel)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .arg("-netdev")
            .arg(format!(
                "tap,id=n0,ifname={},script={},downscript={},vhost=off",
                spec.tap,
                spec.ifup
                    .as_deref()
                    .map_or("no".into(), |p| p.display().to_string()),
                spec.ifdown
                    .as_deref()
                    .map_or("no".into(), |p| p.display().to_string()),
            ))
            .arg("-device")
            .arg(format!("virtio-net-pci,netdev=n0,mac={}", spec.mac))
            .arg("-serial")
            .arg(format!("file:{}", serial.display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let proc = lab
            .spawn(lab.hv(), cmd)
            .with_context(|| format!("start qemu for {name}"))?;
        Ok(Vm {
            proc: Some(proc),
            name,
            serial,
            qemu_log,
        })
    }

    /// The serial console so far.
    pub fn console(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// The serial log's path.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    fn exited(&self) -> Option<ExitStatus> {
        self.proc.as_ref().and_then(|p| p.try_wait().ok().flatten())
    }

    fn failure(&self, what: String) -> anyhow::Error {
        let con = self.console();
        let lines: Vec<&str> = con.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        let qemu = fs::read_to_string(&self.qemu_log).unwrap_or_default();
        anyhow!(
            "{} {what}\n--- console tail ---\n{tail}\n--- qemu output ---\n{}",
            self.name,
            qemu.trim()
        )
    }

    /// Poll the console until `pred` finds something; errors (with the
    /// console's tail) on timeout or when qemu exits first.
    fn poll<T>(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> Option<T>,
    ) -> Result<T> {
        let end = Instant::now() + timeout;
        loop {
            // Read the exit status before the console, so output written
            // just before exiting is not missed.
            let exited = self.exited();
            if let Some(v) = pred(&self.console()) {
                return Ok(v);
            }
            if let Some(st) = exited {
                return Err(self.failure(format!("qemu exited ({st}) before {what}")));
            }
            if Instant::now() >= end {
                return Err(self.failure(format!("no {what} within {timeout:?}")));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// Wait until the console shows `marker`; returns the console.
    pub fn wait_for(&self, marker: &str, timeout: Duration) -> Result<String> {
        self.poll(&format!("{marker:?} on the console"), timeout, |c| {
            c.contains(marker).then(|| c.to_string())
        })
    }

    /// Wait for `KVNET-DONE rc=N` and return N.
    pub fn wait_done(&self, timeout: Duration) -> Result<i32> {
        self.poll("KVNET-DONE", timeout, |c| {
            let rest = &c[c.find(DONE)? + DONE.len()..];
            let line = &rest[..rest.find('\n')?];
            line.trim().parse().ok()
        })
    }

    /// The script's output (between the begin and done markers).
    pub fn script_output(&self) -> String {
        let c = self.console();
        let start = c.find(SCRIPT_BEGIN).map(|i| i + SCRIPT_BEGIN.len() + 1);
        let end = c.find(DONE);
        match (start, end) {
            (Some(s), Some(e)) if s <= e => c[s..e].to_string(),
            (Some(s), None) => c.get(s..).unwrap_or_default().to_string(),
            _ => String::new(),
        }
    }

    /// Wait for qemu to exit (the guest powers off after its script).
    pub fn wait_exit(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        match &self.proc {
            Some(p) => p.wait_timeout(timeout),
            None => Ok(None),
        }
    }

    /// Stop qemu now.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(p) = self.proc.take() {
            p.stop()?;
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_busybox_is_static() {
        if let Ok(b) = fs::read(BUSYBOX) {
            assert!(!has_interp(&b));
        }
        if let Ok(b) = fs::read("/bin/ls") {
            assert!(has_interp(&b));
        }
    }

    #[test]
    fn init_mentions_markers() {
        assert!(INIT.contains(READY));
        assert!(INIT.contains(SCRIPT_BEGIN));
        assert!(INIT.contains(DONE));
    }
}
