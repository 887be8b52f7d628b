//! `cargo xtask run`: the demo, or `kvnet ARGS` as root.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{build, cmd, demo, setup};

pub fn run(args: &[String]) -> Result<()> {
    setup::ensure(setup::Mode::Quiet)?;
    let kvnet = build::kvnet()?;
    if args.is_empty() {
        return run_demo(&kvnet);
    }
    let mut c = as_root(&kvnet, args)?;
    let line = cmd::display(&c);
    let status = c
        .status()
        .with_context(|| format!("failed to start `{line}`"))?;
    // Hand kvnet's own exit code through (e.g. for scripts around `run`).
    std::process::exit(status.code().unwrap_or(1));
}

fn run_demo(kvnet: &Path) -> Result<()> {
    if cmd::is_root() {
        return demo::run(kvnet);
    }
    // The demo runs in-process (it is library code), so re-execute this
    // xtask binary itself under sudo rather than cargo, which root may lack.
    let me = std::env::current_exe().context("locating the xtask executable")?;
    let args = [OsStr::new("demo-as-root"), kvnet.as_os_str()];
    cmd::run(&mut as_root(&me, &args)?)
}

/// `program args` directly when root, else through `sudo -E` (keeping env
/// such as RUST_LOG and PATH); fails with a clear fix when sudo is missing.
pub fn as_root<S: AsRef<OsStr>>(program: &Path, args: &[S]) -> Result<Command> {
    if cmd::is_root() {
        let mut c = Command::new(program);
        c.args(args);
        return Ok(c);
    }
    if !cmd::on_path("sudo") {
        bail!(
            "`{}` needs root and sudo is not installed: rerun this command as root",
            program.display()
        );
    }
    let mut c = Command::new("sudo");
    c.arg("-E").arg(program).args(args);
    Ok(c)
}
