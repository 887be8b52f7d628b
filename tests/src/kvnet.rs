//! Running kvnet in a lab: the daemon in the hypervisor namespace, the CLI
//! talking to it over the lab's control socket.
use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::{Lab, Proc};

/// The kvnet binary under test: `$KVNET_BIN` (set by `cargo xtask test`),
/// else the workspace's release or debug build.
pub fn kvnet_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("KVNET_BIN") {
        return Ok(PathBuf::from(p));
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for profile in ["release", "debug"] {
        let p = root.join("target").join(profile).join("kvnet");
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("kvnet binary not found: set KVNET_BIN or run `cargo xtask build`")
}

/// How a daemon expected to fail ended ([`Kvnet::start_must_fail`]).
#[derive(Debug)]
pub struct DaemonFailure {
    pub status: std::process::ExitStatus,
    /// Its stderr.
    pub log: String,
}

/// A flow direction of `kvnet conntrack list --json` ({saddr, sport,
/// daddr, dport}) as the table prints it: "10.0.0.2:40000 -> 198.51.100.2:80".
/// An older kvnet (the upgrade test's) sent that text itself: kept as is.
pub fn flow(t: &Value) -> String {
    if let Some(text) = t.as_str() {
        return text.to_string();
    }
    format!(
        "{}:{} -> {}:{}",
        t["saddr"].as_str().unwrap_or("?"),
        t["sport"],
        t["daddr"].as_str().unwrap_or("?"),
        t["dport"]
    )
}

/// A port forward's target ({addr, port}; an older kvnet's "ADDR:PORT"
/// text kept as is) as "ADDR:PORT".
pub fn endpoint(t: &Value) -> String {
    match t.as_str() {
        Some(text) => text.to_string(),
        None => format!("{}:{}", t["addr"].as_str().unwrap_or("?"), t["port"]),
    }
}

/// A port's `vlan` object of `kvnet port list --json` as the table words
/// it: "-", "access 10", "trunk 10,20 native 1" (VID lists unabridged).
pub fn vlan_text(v: &Value) -> String {
    let vids = |v: &Value| {
        v.as_array()
            .map(|a| a.iter().map(Value::to_string).collect::<Vec<_>>().join(","))
            .unwrap_or_default()
    };
    match v["mode"].as_str() {
        Some("access") => format!("access {}", v["vid"]),
        Some("trunk") if v["native"].is_null() => format!("trunk {}", vids(&v["vids"])),
        Some("trunk") => format!("trunk {} native {}", vids(&v["vids"]), v["native"]),
        _ => "-".into(),
    }
}

/// A kvnet daemon running in a lab's hypervisor namespace.
/// `kvnet down` of `bin` with no daemon running, in the lab's hv
/// namespace: from the lab's state files and pins alone.
pub fn down_without_daemon(lab: &Lab, bin: &Path) -> Result<Output> {
    let (socket, pins) = (lab.socket_path(), lab.pin_dir());
    let state = lab.work_dir().join("state");
    let arg = |p: &Path| p.to_string_lossy().into_owned();
    lab.exec_output(
        lab.hv(),
        &[
            &arg(bin),
            "--socket",
            &arg(&socket),
            "down",
            "--pin-dir",
            &arg(&pins),
            "--state-dir",
            &arg(&state),
        ],
    )
}

pub struct Kvnet {
    bin: PathBuf,
    socket: PathBuf,
    log: PathBuf,
    daemon: Option<Proc>,
}

impl Kvnet {
    /// Starts `kvnet daemon` in the lab's hv namespace with the lab's pin
    /// folder and socket, and waits until it answers.
    pub fn start(lab: &Lab) -> Result<Kvnet> {
        Self::start_with(lab, &[])
    }

    pub fn start_with(lab: &Lab, extra: &[&str]) -> Result<Kvnet> {
        Self::start_bin(lab, &kvnet_bin()?, extra, &[])
    }

    /// [`Kvnet::start_with`] for the daemon of an explicit binary `bin`
    /// (another kvnet version, for upgrade tests), with extra environment
    /// variables; the CLI calls of the returned handle use `bin` too.
    pub fn start_bin(
        lab: &Lab,
        bin: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Kvnet> {
        Self::start_at(lab, bin, &lab.pin_dir(), extra, envs)
    }

    /// [`Kvnet::start_bin`] with the pins under `pin_dir` instead of the
    /// lab's (a private bpffs, for tests that unmount it).
    pub fn start_at(
        lab: &Lab,
        bin: &Path,
        pin_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Kvnet> {
        let k = Self::spawn_daemon(lab, bin, pin_dir, extra, envs)?;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if k.try_cli(&["net", "list", "--json"])?.status.success() {
                return Ok(k);
            }
            if let Some(d) = &k.daemon {
                if !d.is_running() {
                    bail!("kvnet daemon exited at start:\n{}", k.daemon_log());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "kvnet daemon did not answer within 20 s:\n{}",
                    k.daemon_log()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the daemon of `bin` like [`Kvnet::start_bin`] but expects it
    /// to fail: waits up to `timeout` for it to exit and returns its exit
    /// status and log (stderr). An error if it exits successfully or is
    /// still running then (it is stopped first).
    pub fn start_must_fail(
        lab: &Lab,
        bin: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
        timeout: Duration,
    ) -> Result<DaemonFailure> {
        let mut k = Self::spawn_daemon(lab, bin, &lab.pin_dir(), extra, envs)?;
        let d = k.daemon.take().expect("just spawned");
        match d.wait_timeout(timeout)? {
            Some(status) if !status.success() => Ok(DaemonFailure {
                status,
                log: k.daemon_log(),
            }),
            Some(status) => bail!(
                "kvnet daemon exited with {status} but should have failed:\n{}",
                k.daemon_log()
            ),
            None => {
                d.stop()?;
                bail!(
                    "kvnet daemon still running after {timeout:?} but should have failed:\n{}",
                    k.daemon_log()
                )
            }
        }
    }

    /// `bin daemon` in the lab's hv namespace with the lab's pin folder,
    /// state folder and socket, its stderr in the lab's daemon log.
    fn spawn_daemon(
        lab: &Lab,
        bin: &Path,
        pin_dir: &Path,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Result<Kvnet> {
        crate::mount_bpffs_if_needed()?;
        let bin = bin.to_path_buf();
        let socket = lab.socket_path();
        let log = lab.work_dir().join("kvnet-daemon.log");
        let log_file =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(&bin);
        cmd.arg("--socket")
            .arg(&socket)
            .arg("daemon")
            .arg("--pin-dir")
            .arg(pin_dir)
            .arg("--state-dir")
            .arg(lab.work_dir().join("state"));
        cmd.args(extra);
        // The socket's groups: root's own, so a lab never creates the
        // host's `kvnet` groups (a test of them passes its own by flag).
        cmd.env("KVNET_SOCKET_GROUP", "root")
            .env("KVNET_RO_GROUP", "root");
        cmd.envs(envs.iter().copied());
        cmd.stdout(Stdio::null()).stderr(log_file);
        let daemon = lab.spawn(lab.hv(), cmd)?;
        Ok(Kvnet {
            bin,
            socket,
            log,
            daemon: Some(daemon),
        })
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub fn bin(&self) -> &Path {
        &self.bin
    }

    /// Runs `kvnet ARGS` against this daemon and returns the raw output.
    pub fn try_cli(&self, args: &[&str]) -> Result<Output> {
        Command::new(&self.bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .with_context(|| format!("run {} {}", self.bin.display(), args.join(" ")))
    }

    /// Runs `kvnet ARGS`, which must succeed; returns stdout.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = self.try_cli(args)?;
        if !out.status.success() {
            return Err(anyhow!(
                "`kvnet {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `kvnet ARGS`, which must fail; returns stderr.
    pub fn cli_err(&self, args: &[&str]) -> Result<String> {
        let out = self.try_cli(args)?;
        if out.status.success() {
            bail!(
                "`kvnet {}` succeeded but should have failed",
                args.join(" ")
            );
        }
        Ok(String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Runs a show/list command with `--json` and parses it.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("parse JSON of `kvnet {}`: {out}", a.join(" ")))
    }

    /// The daemon's pid (for /proc looks: fds, memory), while it runs.
    pub fn daemon_pid(&self) -> Option<u32> {
        self.daemon.as_ref().map(|d| d.pid())
    }

    /// Whether the daemon process is still alive.
    pub fn daemon_running(&self) -> bool {
        self.daemon.as_ref().is_some_and(|d| d.is_running())
    }

    /// Kills the daemon with SIGKILL (a crash): the datapath stays as it
    /// was; a daemon started next adopts it.
    pub fn kill(mut self) -> Result<()> {
        let d = self
            .daemon
            .take()
            .ok_or_else(|| anyhow!("daemon already stopped"))?;
        d.signal(nix::sys::signal::Signal::SIGKILL)?;
        d.wait_timeout(Duration::from_secs(5))?;
        d.stop()?;
        Ok(())
    }

    /// Stops the daemon with SIGTERM: it exits and leaves the datapath
    /// forwarding (pinned and attached) for the next daemon to adopt;
    /// `kvnet down` removes everything instead.
    pub fn stop(mut self) -> Result<std::process::ExitStatus> {
        let d = self
            .daemon
            .take()
            .ok_or_else(|| anyhow!("daemon already stopped"))?;
        d.stop()
    }
}

/// Look-ups in the daemon's JSON listings, for assertions: they panic if
/// the daemon does not answer, like the tests' own `.unwrap()`s would.
impl Kvnet {
    /// The `kvnet port list` row of `iface`, if it is a port.
    pub fn port(&self, iface: &str) -> Option<Value> {
        let ports = self.json(&["port", "list"]).unwrap();
        let ports = ports.as_array().expect("`kvnet port list` is a list");
        ports.iter().find(|p| p["iface"] == iface).cloned()
    }

    /// The `kvnet stats` row of `port`, if it has one.
    pub fn port_stats(&self, port: &str) -> Option<Value> {
        let stats = self.json(&["stats"]).unwrap();
        let ports = stats["ports"]
            .as_array()
            .expect("`kvnet stats` lists ports");
        ports.iter().find(|s| s["port"] == port).cloned()
    }

    /// How many frames `port` dropped for `reason` (0 if it has no count).
    pub fn port_drops(&self, port: &str, reason: &str) -> u64 {
        self.port_stats(port)
            .and_then(|s| s["drops"][reason].as_u64())
            .unwrap_or(0)
    }

    /// The forwarding table of network `net` (`kvnet fdb show`).
    pub fn fdb(&self, net: &str) -> Vec<Value> {
        self.json(&["fdb", "show", net])
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// The port network `net` has learned (or was told) `mac` is behind.
    pub fn fdb_port_of(&self, net: &str, mac: &[u8; 6]) -> Option<String> {
        let mac = crate::mac_fmt(mac);
        self.fdb(net)
            .iter()
            .find(|e| e["mac"] == mac.as_str())
            .map(|e| e["port"].as_str().unwrap_or("").to_string())
    }
}
