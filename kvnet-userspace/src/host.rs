//! The host around the datapath: sysctls and the monotonic clock the
//! datapath's timestamps use, in one place (links, addresses, routes and
//! rules are in `rtnl`).
use anyhow::{Context, Result};

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
