//! libvirt's own daemon in a lab: Debian's `libvirtd` (qemu driver, TCG)
//! runs in the hv namespace, so the taps it creates for `<interface
//! type='ethernet'>` appear where kvnet runs, and the tests drive it with
//! `virsh` like an administrator would.
//!
//! A privileged libvirtd's folders are fixed at build time (/etc/libvirt,
//! /run/libvirt, /var/lib/libvirt, /var/log/libvirt, /var/cache/libvirt), so
//! it runs in a private mount namespace where each is a bind mount of a
//! folder under the lab's work folder: the host's libvirt setup, if any, is
//! neither read nor changed, and nothing is left behind. Tmpfs over /run and
//! /var (inside that namespace only) provide the mount points without
//! creating them on the host; hiding the host's /run also keeps libvirtd
//! off the system D-Bus (no systemd-machined registration).
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::guest::{kernel_cmdline, Image};
use crate::procs::LAB_ENV;
use crate::{Lab, Proc};

/// The binaries the tests need (Debian: libvirt-daemon,
/// libvirt-daemon-driver-qemu, libvirt-clients; `cargo xtask setup`).
const LIBVIRTD: &str = "/usr/sbin/libvirtd";
const VIRSH: &str = "/usr/bin/virsh";
const QEMU: &str = "/usr/bin/qemu-system-x86_64";

/// The qemu driver's settings for a container without cgroup delegation,
/// SELinux/AppArmor or virtlogd: qemu runs as root, libvirt changes no
/// file ownership or labels, creates no per-VM mount namespace and no
/// cgroups, and qemu writes its log itself.
const QEMU_CONF: &str = r#"user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
"#;

/// libvirt 9 resolves its build-time qemu user at start, even when
/// qemu.conf says root; Debian's libvirt-daemon-system would create it on
/// the host, the private mount namespace gets a passwd/group that has it.
const QEMU_USER: &str = "libvirt-qemu";

/// Folders a privileged libvirtd uses, and their stand-ins under the work
/// folder (`run` first: it holds the control socket and qemu's pid files).
const MOUNTS: &[(&str, &str)] = &[
    ("run", "/run/libvirt"),
    ("etc", "/etc/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// What a test domain boots: the lab's guest image with a script.
#[derive(Debug, Clone)]
pub struct DomainSpec {
    /// The domain's name (also names its console and initrd files).
    pub name: String,
    /// The `<interface>` element(s), verbatim: what the test is about.
    pub interfaces: String,
    /// How the guest configures eth0 (see [`crate::guest::VmSpec::ip`]).
    pub ip: String,
    /// Run by the guest's /init once eth0 is configured.
    pub script: String,
}

/// A libvirtd of the lab's own; on drop its domains are destroyed, the
/// daemon stopped and any qemu it left killed.
pub struct Libvirtd {
    dir: PathBuf,
    uri: String,
    suffix: String,
    daemon: Option<Proc>,
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// The host's passwd/group lines plus the qemu user, if it is missing.
fn with_qemu_user(file: &str, line: &str) -> Result<String> {
    let text = fs::read_to_string(file).with_context(|| format!("read {file}"))?;
    if text
        .lines()
        .any(|l| l.starts_with(&format!("{QEMU_USER}:")))
    {
        return Ok(text);
    }
    let sep = if text.ends_with('\n') || text.is_empty() {
        ""
    } else {
        "\n"
    };
    Ok(format!("{text}{sep}{line}\n"))
}

impl Libvirtd {
    /// Starts libvirtd in the lab's hv namespace with its folders under
    /// `<work>/libvirt` and waits until virsh reaches it.
    pub fn start(lab: &Lab) -> Result<Libvirtd> {
        for bin in [LIBVIRTD, VIRSH, QEMU] {
            if !Path::new(bin).exists() {
                bail!(
                    "{bin} is missing: install libvirt-daemon-driver-qemu, libvirt-daemon, \
                     libvirt-clients and qemu-system-x86 (`cargo xtask setup`)"
                );
            }
        }
        let dir = lab.work_dir().join("libvirt");
        for (sub, _) in MOUNTS {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("create {}", dir.join(sub).display()))?;
        }
        let ids = dir.join("ids");
        fs::create_dir_all(&ids)?;
        fs::write(
            ids.join("passwd"),
            with_qemu_user(
                "/etc/passwd",
                &format!("{QEMU_USER}:x:64055:64055:kvnet lab:/nonexistent:/usr/sbin/nologin"),
            )?,
        )?;
        fs::write(
            ids.join("group"),
            with_qemu_user("/etc/group", &format!("{QEMU_USER}:x:64055:"))?,
        )?;
        fs::write(dir.join("etc/qemu.conf"), QEMU_CONF)?;
        let log = dir.join("libvirtd.log");
        // Unix socket clients are root (the test); warnings and errors go
        // to a file a failure shows.
        fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "auth_unix_rw = \"none\"\nauth_unix_ro = \"none\"\n\
                 log_outputs = \"3:file:{}\"\n",
                s(&log)
            ),
        )?;

        let mut script = String::from(
            "set -e\nmount -t tmpfs tmpfs /run\nmount -t tmpfs tmpfs /var\n\
             ln -s /run /var/run\nmkdir -p /var/tmp\n",
        );
        for (sub, target) in MOUNTS {
            script.push_str(&format!(
                "mkdir -p {target}\nmount --bind {} {target}\n",
                s(&dir.join(sub))
            ));
        }
        for f in ["passwd", "group"] {
            script.push_str(&format!("mount --bind {} /etc/{f}\n", s(&ids.join(f))));
        }
        script.push_str(&format!(
            "exec {LIBVIRTD} --config {}\n",
            s(&dir.join("etc/libvirtd.conf"))
        ));
        let out = fs::File::create(dir.join("libvirtd.out"))?;
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"])
            .arg(&script)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let daemon = lab.spawn(lab.hv(), cmd).context("start libvirtd")?;
        let lv = Libvirtd {
            uri: format!("qemu:///system?socket={}", s(&dir.join("run/libvirt-sock"))),
            dir,
            suffix: lab.suffix().to_string(),
            daemon: Some(daemon),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if lv.try_virsh(&["version"])?.status.success() {
                return Ok(lv);
            }
            if !lv.daemon.as_ref().is_some_and(|d| d.is_running()) {
                bail!("libvirtd exited at start:\n{}", lv.logs());
            }
            if Instant::now() > deadline {
                bail!("libvirtd did not answer within 30 s:\n{}", lv.logs());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// `qemu:///system?socket=...`: this daemon, for `virsh -c`.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// `virsh -c URI ARGS`, whatever its exit status.
    pub fn try_virsh(&self, args: &[&str]) -> Result<Output> {
        Command::new(VIRSH)
            .args(["-c", &self.uri])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("run virsh {}", args.join(" ")))
    }

    /// `virsh -c URI ARGS`, which must succeed; returns stdout.
    pub fn virsh(&self, args: &[&str]) -> Result<String> {
        let o = self.try_virsh(args)?;
        if !o.status.success() {
            bail!(
                "`virsh {}` failed ({}): {}\n{}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr).trim(),
                self.logs()
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Names of the domains virsh lists (`--all`: defined ones too).
    pub fn domains(&self, all: bool) -> Result<Vec<String>> {
        let mut args = vec!["list", "--name"];
        if all {
            args.push("--all");
        }
        Ok(self
            .virsh(&args)?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect())
    }

    fn console_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.console"))
    }

    /// The domain XML booting `image` with `spec`: kernel, initrd (with
    /// the script) and command line given directly, no disk, the serial
    /// console to a file. The qemu process carries the lab's marker in its
    /// environment, so a crashed run's qemu is found as a leftover.
    pub fn guest_xml(&self, image: &Image, spec: &DomainSpec) -> Result<String> {
        let initrd = self.dir.join(format!("{}.initrd", spec.name));
        image.write_initrd(&spec.script, &initrd)?;
        Ok(format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{QEMU}</emulator>
{interfaces}
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <memballoon model='none'/>
  </devices>
  <qemu:commandline><qemu:env name='{LAB_ENV}' value='{suffix}'/></qemu:commandline>
</domain>
",
            name = spec.name,
            kernel = s(&image.kernel),
            initrd = s(&initrd),
            cmdline = kernel_cmdline(&spec.ip),
            interfaces = spec.interfaces,
            console = s(&self.console_path(&spec.name)),
            suffix = self.suffix,
        ))
    }

    /// Writes `xml` next to the daemon's files and `virsh define`s it.
    pub fn define(&self, name: &str, xml: &str) -> Result<String> {
        let path = self.dir.join(format!("{name}.xml"));
        fs::write(&path, xml).with_context(|| format!("write {}", path.display()))?;
        self.virsh(&["define", &s(&path)])
    }

    /// The domain's serial console so far.
    pub fn console(&self, name: &str) -> String {
        fs::read(self.console_path(name))
            .map(|b| String::from_utf8_lossy(&b).replace('\r', ""))
            .unwrap_or_default()
    }

    /// Waits until the domain's console shows `marker`; fails early, with
    /// the console's and qemu log's tails, if the domain stops running.
    pub fn wait_console(&self, name: &str, marker: &str, timeout: Duration) -> Result<String> {
        let end = Instant::now() + timeout;
        loop {
            // The state first, so output written just before it stopped is
            // still seen.
            let state = self.try_virsh(&["domstate", name])?;
            let state = String::from_utf8_lossy(&state.stdout).trim().to_string();
            let con = self.console(name);
            if con.contains(marker) {
                return Ok(con);
            }
            let why = if state != "running" {
                format!("domain {name} is {state:?} before {marker:?}")
            } else if Instant::now() >= end {
                format!("no {marker:?} on {name}'s console within {timeout:?}")
            } else {
                thread::sleep(Duration::from_millis(250));
                continue;
            };
            return Err(anyhow!(
                "{why}\n--- console tail ---\n{}\n--- qemu log tail ---\n{}",
                tail(&con, 30),
                tail(&self.qemu_log(name), 15)
            ));
        }
    }

    /// libvirt's log of the domain's qemu (command line, qemu's stderr).
    pub fn qemu_log(&self, name: &str) -> String {
        fs::read_to_string(self.dir.join(format!("log/qemu/{name}.log"))).unwrap_or_default()
    }

    /// The daemon's own output and the tail of its log.
    pub fn logs(&self) -> String {
        let out = fs::read_to_string(self.dir.join("libvirtd.out")).unwrap_or_default();
        let log = fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default();
        format!(
            "--- libvirtd output ---\n{}\n--- libvirtd log tail ---\n{}",
            out.trim(),
            tail(&log, 20)
        )
    }

    /// Kills the qemu processes whose pid files libvirt left (a domain
    /// libvirtd could not destroy, or one it lost when it stopped).
    fn kill_qemus(&self) {
        let Ok(rd) = fs::read_dir(self.dir.join("run/qemu")) else {
            return;
        };
        for e in rd.filter_map(|e| e.ok()) {
            if e.path().extension().is_none_or(|x| x != "pid") {
                continue;
            }
            let Some(pid) = fs::read_to_string(e.path())
                .ok()
                .and_then(|t| t.trim().parse::<i32>().ok())
            else {
                continue;
            };
            // Only a qemu still carrying this lab's marker: a pid file can
            // outlive its process, and the pid be reused.
            let marker = format!("{LAB_ENV}={}", self.suffix);
            let ours = fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|b| *b == 0).any(|v| v == marker.as_bytes()))
                .unwrap_or(false);
            if ours && kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                let end = Instant::now() + Duration::from_secs(5);
                while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < end {
                    thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        if self.daemon.as_ref().is_some_and(|d| d.is_running()) {
            for name in self.domains(false).unwrap_or_default() {
                let _ = self.try_virsh(&["destroy", &name]);
            }
        }
        if let Some(d) = self.daemon.take() {
            let _ = d.stop();
        }
        self.kill_qemus();
    }
}
