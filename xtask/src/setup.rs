//! `cargo xtask setup`: idempotent bootstrap of everything kvnet needs
//! beyond the Rust toolchains. Each item is checked first and installed only
//! when missing, so the implicit run before every other subcommand is cheap.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cmd;

/// Debian packages the lab, the demo and the tests use (nsenter is in
/// util-linux, modprobe in kmod, `ip netns` in iproute2).
pub const DEB_PACKAGES: &[&str] = &[
    "iproute2",
    "iputils-ping",
    "tcpdump",
    "iperf3",
    "bpftool",
    "busybox-static",
    "qemu-system-x86",
    "kmod",
    "ethtool",
    "nftables",
    "iptables",
    "procps",
    "util-linux",
    "xz-utils",
    "fonts-dejavu-core",
    // `cargo xtask bench`: trafgen, 64-byte frames as ordinary skbs.
    "netsniff-ng",
    // DHCP/DNS tests: a Debian DHCP client, dig.
    "isc-dhcp-client",
    "bind9-dnsutils",
    // `cargo xtask package`: strip, objdump (dpkg-deb is in dpkg itself).
    "binutils",
    // tests/libvirt_vm.rs: libvirtd with its qemu driver, virsh (without
    // libvirt-daemon-system: no host service, no default network).
    "libvirt-daemon",
    "libvirt-clients",
];

const BPFFS: &str = "/sys/fs/bpf";
/// `BPF_FS_MAGIC` from linux/magic.h.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    /// `cargo xtask setup`: one line per item, install what is missing.
    Verbose,
    /// Before other subcommands: silent when everything is present.
    Quiet,
    /// `cargo xtask setup --check`: install nothing, fail if anything is missing.
    Check,
}

/// Collects per-item outcomes so the run ends with one summary and, on
/// failure, with every missing item and its fix at once.
struct Report {
    mode: Mode,
    present: usize,
    installed: usize,
    missing: Vec<String>,
}

impl Report {
    fn new(mode: Mode) -> Self {
        Report {
            mode,
            present: 0,
            installed: 0,
            missing: Vec::new(),
        }
    }

    fn installs(&self) -> bool {
        self.mode != Mode::Check
    }

    fn present(&mut self, item: &str, detail: &str) {
        self.present += 1;
        if self.mode != Mode::Quiet {
            println!("setup: {item:<34} present{detail}");
        }
    }

    fn installing(&mut self, item: &str, how: &str) {
        self.installed += 1;
        println!("setup: {item:<34} installing ({how})");
    }

    fn missing(&mut self, item: &str, problem: &str, fix: &str) {
        println!("setup: {item:<34} MISSING{problem} -> fix: {fix}");
        self.missing.push(format!("{item}{problem}: {fix}"));
    }

    fn finish(self) -> Result<()> {
        let total = self.present + self.installed + self.missing.len();
        if self.mode == Mode::Quiet && self.installed == 0 && self.missing.is_empty() {
            println!("setup: all {total} prerequisites present");
            return Ok(());
        }
        println!(
            "setup: {total} items: {} present, {} installed, {} missing",
            self.present,
            self.installed,
            self.missing.len()
        );
        if !self.missing.is_empty() {
            bail!("missing prerequisites:\n  {}", self.missing.join("\n  "));
        }
        Ok(())
    }
}

/// Checks every prerequisite and installs the missing ones (except in
/// `Mode::Check`).
pub fn ensure(mode: Mode) -> Result<()> {
    let mut report = Report::new(mode);
    rust_src(&mut report)?;
    debian_packages(&mut report)?;
    bpffs(&mut report)?;
    bpf_linker(&mut report)?;
    promtool(&mut report)?;
    report.finish()
}

/// Makes `~/.cargo/bin` visible to us and to child processes (aya-build looks
/// up `bpf-linker` in PATH), even under sudo's reduced PATH.
pub fn ensure_cargo_bin_on_path() {
    let Some(bin) = cargo_home().map(|h| h.join("bin")) else {
        return;
    };
    let old = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&old).any(|p| p == bin) {
        return;
    }
    let paths = std::iter::once(bin).chain(std::env::split_paths(&old));
    if let Ok(joined) = std::env::join_paths(paths) {
        std::env::set_var("PATH", joined);
    }
}

fn cargo_home() -> Option<PathBuf> {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| home().map(|h| h.join(".cargo")))
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

/// A shell command line to fix something as root, prefixed for non-root.
fn as_root_hint(command: &str) -> String {
    if cmd::is_root() {
        command.to_string()
    } else if command.contains("&&") {
        format!("sudo sh -c '{command}'")
    } else {
        format!("sudo {command}")
    }
}

// ---------------------------------------------------------------- promtool

/// Where setup puts Prometheus's `promtool` (the metrics tests check the
/// daemon's endpoint with `promtool check metrics`). Taken out of Debian's
/// `prometheus` package rather than installing it: the package would also
/// install and start a Prometheus server on this machine.
pub const PROMTOOL: &str = "/usr/local/lib/kvnet/promtool";

fn promtool(report: &mut Report) -> Result<()> {
    const ITEM: &str = "promtool (from Debian's prometheus)";
    if let Ok(out) = cmd::probe(Command::new(PROMTOOL).arg("--version")) {
        if out.status.success() {
            let version = String::from_utf8_lossy(&out.stdout);
            let version = version.lines().next().unwrap_or("").trim().to_string();
            report.present(ITEM, &format!(" ({version})"));
            return Ok(());
        }
    }
    let fix = "cargo xtask setup";
    if !report.installs() {
        report.missing(ITEM, " (not found)", fix);
        return Ok(());
    }
    report.installing(ITEM, "apt-get download prometheus, promtool extracted");
    let dir = std::env::temp_dir().join(format!("kvnet-promtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // apt fetches as its own user `_apt`, which must be able to write here.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
    let result = (|| -> Result<()> {
        let download = || {
            let mut c = Command::new("apt-get");
            c.args(["download", "prometheus"]).current_dir(&dir);
            cmd::run(&mut c)
        };
        if download().is_err() {
            // Stale package lists: refresh them once.
            cmd::run(Command::new("apt-get").arg("update"))?;
            download()?;
        }
        let deb = std::fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .context("apt-get download left no .deb")?;
        let target = Path::new(PROMTOOL);
        let parent = target.parent().context("PROMTOOL has a folder")?;
        std::fs::create_dir_all(parent)?;
        let tmp = parent.join("promtool.tmp");
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg("dpkg-deb --fsys-tarfile \"$1\" | tar -xO ./usr/bin/promtool > \"$2\"")
            .arg("sh")
            .arg(&deb)
            .arg(&tmp);
        cmd::run(&mut c)?;
        std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        std::fs::rename(&tmp, target)?;
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result.with_context(|| format!("installing promtool to {PROMTOOL}"))
}

// ---------------------------------------------------------------- rust-src

fn rust_src(report: &mut Report) -> Result<()> {
    const ITEM: &str = "rust-src (nightly toolchain)";
    let mut list = Command::new("rustup");
    list.args(["component", "list", "--toolchain", "nightly", "--installed"]);
    let out = cmd::probe(&mut list).with_context(|| {
        format!(
            "failed to start `{}`: rustup is required, install it from https://rustup.rs",
            cmd::display(&list)
        )
    })?;
    // A failing list means the nightly toolchain itself is absent.
    let (fix, action) = if !out.status.success() {
        let mut c = Command::new("rustup");
        c.args(["toolchain", "install", "nightly", "--profile", "minimal"])
            .args(["--component", "rust-src"]);
        (c, "nightly toolchain with rust-src")
    } else if has_component(&String::from_utf8_lossy(&out.stdout), "rust-src") {
        report.present(ITEM, "");
        return Ok(());
    } else {
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", "nightly"]);
        (c, "rust-src component")
    };
    let mut fix = fix;
    if !report.installs() {
        report.missing(ITEM, "", &cmd::display(&fix));
        return Ok(());
    }
    report.installing(ITEM, action);
    cmd::run(&mut fix)
}

/// Whether `rustup component list --installed` output names `component`.
pub fn has_component(list: &str, component: &str) -> bool {
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .any(|name| name == component)
}

// --------------------------------------------------------- Debian packages

fn debian_packages(report: &mut Report) -> Result<()> {
    let installed = query_packages(DEB_PACKAGES)?;
    let mut missing = Vec::new();
    for pkg in DEB_PACKAGES {
        let item = format!("deb {pkg}");
        if installed.get(*pkg).copied().unwrap_or(false) {
            report.present(&item, "");
        } else {
            missing.push(*pkg);
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let list = missing.join(" ");
    let fix = format!("apt-get update && apt-get install -y {list}");
    if !report.installs() || !cmd::is_root() {
        let why = if report.installs() {
            " (needs root)"
        } else {
            ""
        };
        for pkg in &missing {
            report.missing(&format!("deb {pkg}"), why, &as_root_hint(&fix));
        }
        return Ok(());
    }
    for pkg in &missing {
        report.installing(&format!("deb {pkg}"), "apt-get");
    }
    install_packages(&missing)?;
    let after = query_packages(&missing)?;
    let still: Vec<_> = missing
        .iter()
        .filter(|p| !after.get(**p).copied().unwrap_or(false))
        .collect();
    if !still.is_empty() {
        bail!("apt-get finished but these packages are still not installed: {still:?}; try `{fix}` by hand");
    }
    Ok(())
}

fn query_packages(pkgs: &[&str]) -> Result<HashMap<String, bool>> {
    let mut q = Command::new("dpkg-query");
    q.args(["-W", "-f=${Package} ${Status}\\n"]).args(pkgs);
    // dpkg-query exits 1 when some package is unknown but still prints the
    // known ones, so its exit status is not an error here.
    let out = cmd::probe(&mut q).with_context(|| {
        format!(
            "failed to start `{}`: kvnet's setup supports Debian-like systems only; \
             install these packages by other means: {}",
            cmd::display(&q),
            pkgs.join(" ")
        )
    })?;
    Ok(parse_dpkg_status(&String::from_utf8_lossy(&out.stdout)))
}

/// Parses `dpkg-query -W -f='${Package} ${Status}\n'` output into
/// package -> installed. "hold ok installed" counts as installed; removed
/// packages with leftover config ("deinstall ok config-files") do not.
pub fn parse_dpkg_status(out: &str) -> HashMap<String, bool> {
    out.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let pkg = words.next()?;
            let status: Vec<&str> = words.collect();
            let installed = status.len() == 3 && status[1] == "ok" && status[2] == "installed";
            Some((pkg.to_string(), installed))
        })
        .collect()
}

fn install_packages(pkgs: &[&str]) -> Result<()> {
    cmd::run(Command::new("apt-get").arg("update"))?;
    cmd::run(
        Command::new("apt-get")
            .args(["install", "-y"])
            .args(pkgs)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

// ------------------------------------------------------------------- bpffs

fn bpffs(report: &mut Report) -> Result<()> {
    const ITEM: &str = "bpffs mounted at /sys/fs/bpf";
    if bpffs_mounted(Path::new(BPFFS)) {
        report.present(ITEM, "");
        return Ok(());
    }
    let fix = as_root_hint(&format!("mount -t bpf bpf {BPFFS}"));
    if !report.installs() {
        report.missing(ITEM, "", &fix);
        return Ok(());
    }
    if !cmd::is_root() {
        report.missing(ITEM, " (needs root)", &fix);
        return Ok(());
    }
    report.installing(ITEM, "mount -t bpf");
    fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    cmd::run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

fn bpffs_mounted(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c_path) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: c_path is a valid NUL-terminated string and buf is a properly
    // sized, writable statfs struct.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    rc == 0 && buf.f_type as i64 == BPF_FS_MAGIC
}

// -------------------------------------------------------------- bpf-linker

fn bpf_linker(report: &mut Report) -> Result<()> {
    const ITEM: &str = "bpf-linker";
    let problem = match cmd::probe(Command::new("bpf-linker").arg("--version")) {
        Ok(out) if out.status.success() => {
            let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
            match llvm_mismatch()? {
                None => {
                    report.present(ITEM, &format!(" ({version})"));
                    return Ok(());
                }
                Some(problem) => problem,
            }
        }
        // Typically a stale libLLVM after a nightly update: rebuild.
        Ok(out) => format!(
            "broken: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .next()
                .unwrap_or("")
        ),
        Err(_) => "not found".to_string(),
    };
    if !report.installs() {
        report.missing(ITEM, &format!(" ({problem})"), "cargo xtask setup");
        return Ok(());
    }
    println!("setup: {ITEM}: {problem}");
    install_bpf_linker(report)
}

/// A bpf-linker that runs but links another LLVM major than the nightly
/// rustc emits bitcode for (e.g. one built against a distro LLVM) would fail
/// later, obscurely, inside the eBPF build; detect that up front.
fn llvm_mismatch() -> Result<Option<String>> {
    // The dynamic loader lists the resolved libraries without running the
    // program (this is what ldd does).
    let mut trace = Command::new("bpf-linker");
    trace.env("LD_TRACE_LOADED_OBJECTS", "1");
    let Ok(out) = cmd::probe(&mut trace) else {
        return Ok(None);
    };
    let Some(linked) = linked_llvm_major(&String::from_utf8_lossy(&out.stdout)) else {
        return Ok(None); // statically linked LLVM: nothing to compare
    };
    let nightly = nightly_llvm_major()?;
    Ok((linked != nightly)
        .then(|| format!("linked against LLVM {linked}, the nightly rustc uses LLVM {nightly}")))
}

fn nightly_llvm_major() -> Result<u32> {
    let vv = cmd::stdout(Command::new("rustc").args(["+nightly", "-vV"]))?;
    parse_llvm_major(&vv).context("reading the LLVM version of the nightly rustc")
}

/// The LLVM major of the libLLVM named in loader-trace (ldd) output, from
/// sonames like `libLLVM.so.22.1-rust-1.97.0-nightly`, `libLLVM-19.so.1`
/// or `libLLVM.so.19.1`.
pub fn linked_llvm_major(ldd: &str) -> Option<u32> {
    let soname = ldd.split_whitespace().find(|w| w.starts_with("libLLVM"))?;
    let rest = soname
        .strip_prefix("libLLVM.so.")
        .or_else(|| soname.strip_prefix("libLLVM-"))?;
    let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
    digits.parse().ok()
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM, so the
/// LLVM bitcode rustc emits for the eBPF crate is read by the same LLVM.
fn install_bpf_linker(report: &mut Report) -> Result<()> {
    let major = nightly_llvm_major()?;
    let sysroot = cmd::stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let sysroot_lib = Path::new(sysroot.trim()).join("lib");
    let prefix = llvm_prefix(major)?;
    link_libllvm(&sysroot_lib, &prefix.join("lib"), major)?;

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut install = Command::new(cargo);
    install
        .args(["install", "bpf-linker", "--locked", "--force"])
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &prefix);
    report.installing(
        "bpf-linker",
        &format!(
            "LLVM {major} from nightly, ~2 min: {}",
            cmd::display(&install)
        ),
    );
    cmd::run(&mut install)?;
    let out = cmd::stdout(Command::new("bpf-linker").arg("--version"))
        .context("bpf-linker was installed but does not run")?;
    println!("setup: bpf-linker ready: {}", out.trim());
    Ok(())
}

/// `~/.cache/kvnet/llvm-<major>` (or under target/ without a HOME). The
/// installed bpf-linker keeps an rpath to `<prefix>/lib`, so it must stay.
fn llvm_prefix(major: u32) -> Result<PathBuf> {
    let base = match home() {
        Some(h) => h.join(".cache/kvnet"),
        None => crate::workspace_root().join("target/kvnet"),
    };
    Ok(base.join(format!("llvm-{major}")))
}

/// Creates `<lib>/libLLVM.so` (what the build links against) and
/// `<lib>/<soname file>` (what the rpath lookup at run time asks for), both
/// pointing into the nightly sysroot.
fn link_libllvm(sysroot_lib: &Path, lib: &Path, major: u32) -> Result<()> {
    let names: Vec<String> = fs::read_dir(sysroot_lib)
        .with_context(|| format!("listing {}", sysroot_lib.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let Some(name) = find_libllvm(&names, major) else {
        bail!(
            "no libLLVM.so.{major}.*-rust-* in {}; reinstall the toolchain: rustup toolchain install nightly --force",
            sysroot_lib.display()
        );
    };
    let target = sysroot_lib.join(name);
    fs::create_dir_all(lib).with_context(|| format!("creating {}", lib.display()))?;
    for link in ["libLLVM.so", name] {
        let path = lib.join(link);
        if path.symlink_metadata().is_ok() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        }
        symlink(&target, &path)
            .with_context(|| format!("symlinking {} -> {}", path.display(), target.display()))?;
    }
    Ok(())
}

/// Extracts the major from the `LLVM version: 22.1.4` line of `rustc -vV`.
pub fn parse_llvm_major(rustc_vv: &str) -> Result<u32> {
    let version = rustc_vv
        .lines()
        .find_map(|l| l.trim().strip_prefix("LLVM version:"))
        .context("no `LLVM version:` line in `rustc -vV` output")?
        .trim();
    let major = version.split('.').next().unwrap_or_default();
    major
        .parse()
        .with_context(|| format!("cannot parse LLVM version `{version}`"))
}

/// Picks the shared libLLVM shipped in a rustc sysroot
/// (`libLLVM.so.<major>.*-rust-*`); the newest name wins if several match.
pub fn find_libllvm(names: &[String], major: u32) -> Option<&str> {
    let prefix = format!("libLLVM.so.{major}.");
    names
        .iter()
        .filter(|n| n.starts_with(&prefix) && n.contains("-rust-"))
        .max()
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUSTC_VV: &str = "rustc 1.97.0-nightly (e50aa6fba 2026-05-19)
binary: rustc
commit-hash: e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a
commit-date: 2026-05-19
host: x86_64-unknown-linux-gnu
release: 1.97.0-nightly
LLVM version: 22.1.4
";

    #[test]
    fn llvm_major_from_rustc_vv() {
        assert_eq!(parse_llvm_major(RUSTC_VV).unwrap(), 22);
        assert_eq!(parse_llvm_major("LLVM version: 19\n").unwrap(), 19);
    }

    #[test]
    fn llvm_major_errors() {
        assert!(parse_llvm_major("rustc 1.0\nhost: x\n").is_err());
        assert!(parse_llvm_major("LLVM version: abc\n").is_err());
    }

    #[test]
    fn dpkg_status_parsing() {
        let out = "iproute2 install ok installed\n\
                   tcpdump deinstall ok config-files\n\
                   iperf3 hold ok installed\n\
                   kmod install ok half-configured\n";
        let m = parse_dpkg_status(out);
        assert_eq!(m.get("iproute2"), Some(&true));
        assert_eq!(m.get("tcpdump"), Some(&false));
        assert_eq!(m.get("iperf3"), Some(&true));
        assert_eq!(m.get("kmod"), Some(&false));
        assert_eq!(m.get("ethtool"), None);
    }

    #[test]
    fn component_list() {
        let list = "cargo-x86_64-unknown-linux-gnu\nrust-src\nrust-std-x86_64-unknown-linux-gnu\n";
        assert!(has_component(list, "rust-src"));
        assert!(!has_component(list, "rust-std"));
        assert!(!has_component("", "rust-src"));
    }

    #[test]
    fn llvm_major_from_ldd() {
        let rust = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibLLVM.so.22.1-rust-1.97.0-nightly => /c/lib/libLLVM.so.22.1-rust-1.97.0-nightly (0x00007f44)\n\tlibc.so.6 => /lib/libc.so.6 (0x1)\n";
        assert_eq!(linked_llvm_major(rust), Some(22));
        assert_eq!(
            linked_llvm_major("libLLVM-19.so.1 => /usr/lib/x/libLLVM-19.so.1 (0x1)"),
            Some(19)
        );
        assert_eq!(linked_llvm_major("libLLVM.so.19.1 => not found"), Some(19));
        assert_eq!(linked_llvm_major("libc.so.6 => /lib/libc.so.6 (0x1)"), None);
    }

    #[test]
    fn libllvm_glob() {
        let names: Vec<String> = [
            "libLLVM-22-rust-1.97.0-nightly.so",
            "libLLVM.so.22.1-rust-1.97.0-nightly",
            "librustc_driver-b5a965480ee51f9a.so",
            "libLLVM.so.21.1-rust-1.90.0-nightly",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(
            find_libllvm(&names, 22),
            Some("libLLVM.so.22.1-rust-1.97.0-nightly")
        );
        assert_eq!(find_libllvm(&names, 23), None);
    }
}
