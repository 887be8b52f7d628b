//! `cargo xtask test`: unit tests (no root), then the privileged end-to-end
//! tests against the freshly built kvnet binary, then a summary.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{build, cmd, lab, setup};

pub struct Options {
    pub unit_only: bool,
    pub test_threads: Option<usize>,
    /// Passed to the test harness after `--` (name filter, `--nocapture`...).
    pub harness_args: Vec<String>,
}

pub fn test(opts: &Options) -> Result<()> {
    setup::ensure(setup::Mode::Quiet)?;
    let kvnet = build::kvnet()?;
    let mut results = Vec::new();

    // Setup ran above; run it again in check mode: it must find everything
    // present and install nothing (setup is idempotent).
    results.push(phase(
        "setup again: nothing to install",
        setup::ensure(setup::Mode::Check),
    ));
    results.push(phase("unit tests", unit_tests(&opts.harness_args)));
    if !opts.unit_only {
        let built = phase("end-to-end build", build::e2e_tests());
        let built_ok = built.1.is_ok();
        results.push(built);
        if built_ok {
            // Namespaces of earlier crashed runs would collide with new ones.
            results.push(phase("leftover cleanup (before)", lab::cleanup_leftovers()));
            // tests/package.rs installs this package in a throwaway root.
            let deb = crate::package::build(&kvnet);
            let deb_path = deb.as_ref().ok().cloned();
            results.push(phase("package (cargo xtask package)", deb.map(|_| ())));
            let mut e2e = e2e_tests(&kvnet, deb_path.as_deref(), opts);
            results.push(phase("end-to-end tests", cmd::run_status(&mut e2e)));
            if cmd::is_root() && opts.harness_args.is_empty() {
                // Upgrade in place from the previous layout's kvnet.
                let (name, r) = crate::upgrade::phase(&kvnet);
                results.push(phase(name, r));
                // The newcomer's first command must keep working: run the demo.
                results.push(phase("demo (cargo xtask run)", crate::demo::run(&kvnet)));
            }
            results.push(phase("leftover cleanup (after)", lab::cleanup_leftovers()));
        }
    }
    summarize(&results)
}

/// Outcome of one phase: passed, or why not.
type Outcome = std::result::Result<(), String>;

fn phase(name: &'static str, r: Result<impl Into<PhaseOk>>) -> (&'static str, Outcome) {
    let outcome = match r.map(Into::into) {
        Ok(PhaseOk(true)) => Ok(()),
        Ok(PhaseOk(false)) => Err("failed (see output above)".to_string()),
        Err(e) => Err(format!("{e:#}")),
    };
    (name, outcome)
}

/// Lets a phase return either `bool` (command ran; did it pass?) or `()`.
struct PhaseOk(bool);
impl From<bool> for PhaseOk {
    fn from(b: bool) -> Self {
        PhaseOk(b)
    }
}
impl From<()> for PhaseOk {
    fn from(_: ()) -> Self {
        PhaseOk(true)
    }
}

fn unit_tests(harness_args: &[String]) -> Result<bool> {
    // No --workspace: the default members are exactly the host crates
    // (xtask's own tests included); kvnet-ebpf is a member only for the
    // bpfel target and cannot be built for the host.
    let mut c = build::cargo();
    c.args(["test", build::PROFILE_FLAG, "--lib", "--bins"]);
    if !harness_args.is_empty() {
        c.arg("--").args(harness_args);
    }
    println!("test: {}", cmd::display(&c));
    cmd::run_status(&mut c)
}

fn e2e_tests(kvnet: &std::path::Path, deb: Option<&std::path::Path>, opts: &Options) -> Command {
    let threads = opts.test_threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut c = build::cargo();
    c.args(["test", build::PROFILE_FLAG, "-p", "kvnet-tests", "--tests"])
        .arg("--")
        .arg(format!("--test-threads={threads}"))
        .args(&opts.harness_args)
        .env("KVNET_BIN", kvnet)
        .env("KVNET_DEB", deb.unwrap_or("".as_ref()))
        // The upgrade tests run in their own phase (they skip without it).
        .env_remove("KVNET_OLD_BIN");
    if !cmd::is_root() {
        // Build as the user, run only the test binaries as root.
        c.env(runner_env_var(), "sudo -E");
    }
    println!("test: {}", cmd::display(&c));
    c
}

/// `CARGO_TARGET_<HOST TRIPLE>_RUNNER` for the host this xtask runs on.
pub(crate) fn runner_env_var() -> String {
    let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
    format!(
        "CARGO_TARGET_{}_RUNNER",
        triple.to_uppercase().replace('-', "_")
    )
}

fn summarize(results: &[(&str, Outcome)]) -> Result<()> {
    println!("\n==== test summary ====");
    for (name, outcome) in results {
        match outcome {
            Ok(()) => println!("  ok      {name}"),
            Err(why) => println!("  FAILED  {name}: {why}"),
        }
    }
    let failed = results.iter().filter(|(_, o)| o.is_err()).count();
    if failed > 0 {
        bail!("{failed} of {} test phases failed", results.len());
    }
    println!("all {} phases passed", results.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_var_name() {
        let v = runner_env_var();
        assert!(v.starts_with("CARGO_TARGET_") && v.ends_with("_UNKNOWN_LINUX_GNU_RUNNER"));
        assert!(!v.contains('-'));
    }

    #[test]
    fn summary_fails_on_any_failure() {
        assert!(summarize(&[("a", Ok(()))]).is_ok());
        assert!(summarize(&[("a", Ok(())), ("b", Err("x".into()))]).is_err());
    }
}
