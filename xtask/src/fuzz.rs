//! `cargo xtask fuzz [--frames N] [--seed S] [--slice]`: the datapath's
//! differential fuzzer (issue 14, point 2), which runs random map states
//! and frames through BPF_PROG_RUN on both hooks and through the model of
//! `kvnet-userspace/src/datapath/tests/model.rs`, and fails with a minimal
//! reproducer on the first difference.
//!
//! It is the ignored test `differential_fuzz_long` (release build, output
//! as it goes: frames/s every few seconds); `--slice` runs the seeded
//! slice of the unit tests (`differential_fuzz_bounded`) instead. The test
//! needs root: without it, only the test binary runs under sudo.

use std::process::Command;

use anyhow::{bail, Result};

use crate::{build, cmd, setup};

/// The fuzzer's tests in kvnet-userspace.
const LONG: &str = "datapath::tests::fuzz::differential_fuzz_long";
/// The seeded slice: a unit test, which a `cargo xtask test` phase of its
/// own may run instead (`--skip` it among the unit tests).
pub const SLICE: &str = "datapath::tests::fuzz::differential_fuzz_bounded";

pub fn fuzz(frames: u64, seed: Option<u64>, slice: bool) -> Result<()> {
    setup::ensure(setup::Mode::Quiet)?;
    let ok = if slice {
        run_slice()?
    } else {
        let mut c = test_command(LONG);
        c.arg("--ignored")
            .env("KVNET_FUZZ_FRAMES", frames.to_string());
        if let Some(s) = seed {
            c.env("KVNET_FUZZ_SEED", s.to_string());
        }
        println!("fuzz: {}", cmd::display(&c));
        cmd::run_status(&mut c)?
    };
    if !ok {
        bail!(
            "the datapath and its model differ (the report above has the reproducer and the seed)"
        );
    }
    Ok(())
}

/// The seeded slice (what a `cargo xtask test` phase runs): whether it passed.
pub fn run_slice() -> Result<bool> {
    let mut c = test_command(SLICE);
    println!("fuzz: {}", cmd::display(&c));
    cmd::run_status(&mut c)
}

/// `cargo test` of one of the fuzzer's tests, output shown.
fn test_command(test: &str) -> Command {
    let mut c = build::cargo();
    c.args([
        "test",
        build::PROFILE_FLAG,
        "-p",
        "kvnet-userspace",
        "--lib",
        test,
        "--",
        "--exact",
        "--nocapture",
    ]);
    if !cmd::is_root() {
        // Build as the user, run only the test binary as root.
        c.env(crate::test::runner_env_var(), "sudo -E");
    }
    c
}
