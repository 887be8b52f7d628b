//! `cargo xtask lab up|down|status|cleanup`: a lab kept alive after xtask
//! exits, for poking at kvnet by hand, built with `kvnet_tests::lab`.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};
use clap::Subcommand;

use crate::{cmd, run, setup};

const NETNS_DIR: &str = "/var/run/netns";
/// Every namespace the lab library creates starts with this.
const PREFIX: &str = "kvnet-";
/// Guests of a kept lab: (hv-side port, guest eth0 address).
const GUESTS: &[(&str, &str)] = &[
    ("g1", "10.77.0.11/24"),
    ("g2", "10.77.0.12/24"),
    ("g3", "10.77.0.13/24"),
];

#[derive(Subcommand, Clone)]
pub enum Action {
    /// Create a hypervisor namespace with 3 guests and leave it running.
    Up,
    /// Delete every `kvnet-*` namespace (kept labs and any other lab).
    Down {
        /// Only namespaces starting with this (default `kvnet-`).
        #[arg(long, default_value = PREFIX, hide = true)]
        prefix: String,
    },
    /// List `kvnet-*` namespaces and their addresses.
    Status,
    /// Remove leftovers of crashed runs (namespaces, pins, processes whose
    /// owning pid is dead).
    Cleanup,
}

pub fn lab(action: Action) -> Result<()> {
    if !matches!(action, Action::Status) {
        setup::ensure(setup::Mode::Quiet)?;
        if !cmd::is_root() {
            return reexec_as_root();
        }
    }
    match action {
        Action::Up => up(),
        Action::Down { prefix } => down(&prefix),
        Action::Status => status(),
        Action::Cleanup => cleanup_leftovers().map(|_| ()),
    }
}

/// Namespaces need root: run this same xtask invocation again under sudo.
fn reexec_as_root() -> Result<()> {
    let me = std::env::current_exe().context("locating the xtask executable")?;
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    cmd::run(&mut run::as_root(&me, &args)?)
}

/// The lab library's cleanup of crashed runs; under sudo when not root.
pub fn cleanup_leftovers() -> Result<()> {
    if !cmd::is_root() {
        return reexec_with(&["lab", "cleanup"]);
    }
    let n = kvnet_tests::lab::cleanup_leftovers().context("cleaning up lab leftovers")?;
    println!("lab: removed {n} leftovers of earlier runs");
    Ok(())
}

fn reexec_with(args: &[&str]) -> Result<()> {
    let me = std::env::current_exe().context("locating the xtask executable")?;
    cmd::run(&mut run::as_root(&me, args)?)
}

fn up() -> Result<()> {
    let lab = kvnet_tests::lab::Lab::new().context("creating the lab")?;
    let mut guests = Vec::new();
    for (port, ip) in GUESTS {
        let g = lab
            .add_guest_with(port, Some(ip))
            .with_context(|| format!("adding guest {port}"))?;
        guests.push((g, *ip));
    }
    let hv = lab.hv().to_string();
    // Keep the namespaces: Lab's Drop would tear everything down. (The lab
    // API has no keep() yet; forgetting only leaks memory of this process.)
    std::mem::forget(lab);

    println!("lab up: hypervisor namespace {hv}");
    println!("  ports in {hv}: {}", port_names().join(" "));
    for (g, ip) in &guests {
        println!(
            "  guest {:<3} netns {}  eth0 {ip}  mac {}",
            g.hv_if,
            g.ns,
            kvnet_tests::mac_fmt(&g.mac)
        );
    }
    println!("enter a namespace: nsenter --net={NETNS_DIR}/{hv} bash");
    println!(
        "e.g. ping between guests once kvnet switches them: nsenter --net={NETNS_DIR}/{} ping 10.77.0.12",
        guests.first().map(|(g, _)| g.ns.as_str()).unwrap_or("NAME")
    );
    println!("remove it: cargo xtask lab down");
    // cleanup_leftovers() attributes namespaces to the (now dead) pid that
    // created them, so a kept lab counts as a leftover of a crashed run.
    println!("note: `cargo xtask test` and `lab cleanup` also remove this lab");
    Ok(())
}

fn port_names() -> Vec<&'static str> {
    GUESTS.iter().map(|(p, _)| *p).collect()
}

fn down(prefix: &str) -> Result<()> {
    let names = kvnet_namespaces(prefix);
    if names.is_empty() {
        println!("lab down: no {prefix}* namespaces");
        return Ok(());
    }
    for ns in &names {
        kill_processes_in(ns);
        cmd::run(Command::new("ip").args(["netns", "delete", ns]))?;
        println!("lab down: deleted netns {ns}");
    }
    for dir in scratch_dirs(&names) {
        if let Err(e) = fs::remove_dir_all(&dir) {
            eprintln!("lab down: cannot remove {dir}: {e}");
        } else {
            println!("lab down: removed {dir}");
        }
    }
    Ok(())
}

/// Processes (qemu guests, a kvnet daemon) would keep a deleted namespace
/// and its devices alive, so they go first.
fn kill_processes_in(ns: &str) {
    let Ok(pids) = cmd::stdout(Command::new("ip").args(["netns", "pids", ns])) else {
        return;
    };
    for pid in pids
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
    {
        // SAFETY: plain kill(2); an already-exited pid just yields ESRCH.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

/// Work folders and pin folders of the labs owning these namespaces.
fn scratch_dirs(namespaces: &[String]) -> Vec<String> {
    let mut suffixes: Vec<&str> = namespaces.iter().filter_map(|n| lab_suffix(n)).collect();
    suffixes.sort_unstable();
    suffixes.dedup();
    suffixes
        .iter()
        .flat_map(|s| {
            [
                format!("/tmp/{PREFIX}{s}"),
                format!("/sys/fs/bpf/{PREFIX}{s}"),
            ]
        })
        .filter(|d| Path::new(d).is_dir())
        .collect()
}

/// `kvnet-<suffix>-<role>` -> `<suffix>` (the role is hv, out, gN).
pub fn lab_suffix(ns: &str) -> Option<&str> {
    let rest = ns.strip_prefix(PREFIX)?;
    let (suffix, role) = rest.rsplit_once('-')?;
    (!suffix.is_empty() && !role.is_empty()).then_some(suffix)
}

fn status() -> Result<()> {
    let names = kvnet_namespaces(PREFIX);
    if names.is_empty() {
        println!("lab status: no {PREFIX}* namespaces (start one: cargo xtask lab up)");
        return Ok(());
    }
    for ns in &names {
        println!("netns {ns}  (nsenter --net={NETNS_DIR}/{ns})");
        let mut addrs = Command::new("ip");
        addrs.args(["-n", ns, "-br", "addr"]);
        match cmd::stdout(&mut addrs) {
            Ok(out) => out.lines().for_each(|l| println!("    {l}")),
            Err(e) => println!("    ({e:#})"),
        }
    }
    Ok(())
}

fn kvnet_namespaces(prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(NETNS_DIR)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffix_of_lab_namespaces() {
        assert_eq!(lab_suffix("kvnet-p12x0abc-hv"), Some("p12x0abc"));
        assert_eq!(lab_suffix("kvnet-p12x0abc-g3"), Some("p12x0abc"));
        assert_eq!(lab_suffix("kvnet-hv"), None);
        assert_eq!(lab_suffix("other-p1x0-hv"), None);
    }
}
