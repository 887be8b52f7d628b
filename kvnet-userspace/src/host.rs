//! The host around the datapath: iproute2 commands, sysctls and the
//! monotonic clock the datapath's timestamps use, in one place.
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Runs `ip ARGS` (iproute2); its stderr is the error.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip link ARGS`.
pub fn ip_link(args: &[&str]) -> Result<()> {
    let mut a = vec!["link"];
    a.extend_from_slice(args);
    ip(&a)
}

pub fn read_sysctl(path: &str) -> Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {path}"))?
        .trim()
        .to_string())
}

pub fn write_sysctl(path: &str, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("writing {value} to {path}"))
}

/// CLOCK_MONOTONIC in ns: the clock of `bpf_ktime_get_ns`, so the
/// datapath's timestamps (FDB, conntrack) compare with it.
pub fn monotonic_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}
