//! The CLI commands around configuration and the daemon's life: apply,
//! check, save, import, status, down.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::{
    config::{self, Plan},
    control::{call, Request},
    daemon::status::Status,
};

pub fn absolute(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

pub fn apply(sock: &Path, file: &Path, dry_run: bool, json: bool) -> Result<()> {
    // Validated here first, so errors show without a daemon too.
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    config::parse(&file.display().to_string(), &text)?;
    let data = call(
        sock,
        &Request::Apply {
            path: Some(absolute(file)),
            text,
            dry_run,
        },
    )?;
    let plan: Plan = serde_json::from_value(data).context("unexpected answer from the daemon")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&plan)?);
        return Ok(());
    }
    for w in &plan.warnings {
        eprintln!("kvnet: warning: {w}");
    }
    print!("{}", plan.render());
    Ok(())
}

pub fn import_libvirt(file: &Path, uplink: Option<&str>) -> Result<()> {
    let xml =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (cfg, warnings) = crate::libvirt::import(&xml, uplink)?;
    for w in &warnings {
        eprintln!("kvnet: import: {w}");
    }
    print!(
        "# imported from {} by `kvnet import-libvirt`\n{}",
        file.display(),
        config::to_toml(&cfg)?
    );
    Ok(())
}

pub fn status(sock: &Path, json: bool) -> Result<()> {
    let data = match call(sock, &Request::Status) {
        Ok(d) => d,
        Err(e) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({"daemon": "down", "error": format!("{e:#}")})
                );
            } else {
                println!("daemon: not running ({e:#})");
            }
            std::process::exit(3);
        }
    };
    let s: Status = serde_json::from_value(data).context("unexpected answer from the daemon")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "daemon:   {} (pid {}, kvnet {})",
        s.daemon, s.pid, s.version
    );
    println!("config:   {}", s.config.as_deref().unwrap_or("(none)"));
    println!("pins:     {}", s.pin_dir);
    println!("programs: {}", s.programs.join(", "));
    println!("networks: {} ({})", s.networks.len(), s.networks.join(", "));
    println!("ports:    {}", s.ports);
    println!("rules:    {}", s.rules);
    println!(
        "fdb:      {} / {} entries ({:.2}%)",
        s.fdb_entries,
        s.fdb_capacity,
        s.fdb_entries as f64 * 100.0 / s.fdb_capacity as f64
    );
    Ok(())
}

/// Asks the daemon to tear everything down, and waits until it is gone.
pub fn down(sock: &Path, pin_dir: &Path, state_dir: &Path) -> Result<()> {
    if std::os::unix::net::UnixStream::connect(sock).is_err() {
        return down_without_daemon(sock, pin_dir, state_dir);
    }
    call(sock, &Request::Down)?;
    let end = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_ok() || sock.exists() {
        if Instant::now() > end {
            anyhow::bail!("the daemon did not exit within 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _: PathBuf = sock.to_path_buf();
    println!("kvnet is down: programs, pins, interfaces and host settings removed");
    Ok(())
}

/// No daemon answers: remove what kvnet left from the state files and
/// the kernel.
fn down_without_daemon(sock: &Path, pin_dir: &Path, state_dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!(
            "no kvnet daemon answers on {}; removing kvnet without one needs root",
            sock.display()
        );
    }
    let r = crate::daemon::teardown::down(pin_dir, state_dir)?;
    let _ = std::fs::remove_file(sock);
    println!(
        "kvnet is down (no daemon was running): filters removed from {} interface(s), {} gateway interface(s) deleted, {} host setting(s) restored, pins {}",
        r.filters.len(),
        r.gateways.len(),
        r.host_settings,
        if r.pins { "removed" } else { "already gone" }
    );
    Ok(())
}
