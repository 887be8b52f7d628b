//! Developer entry point for kvnet: `cargo xtask <command>`.
//!
//! Every command except `setup --check` first runs the setup check, which
//! installs only what is missing, so a fresh machine needs no manual steps.

mod bench;
mod build;
mod cmd;
mod demo;
mod fuzz;
mod lab;
#[cfg(test)]
mod layering;
mod package;
mod run;
mod setup;
mod soak;
mod test;
mod upgrade;

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test kvnet")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing: nightly rust-src, bpf-linker, Debian packages, bpffs.
    Setup {
        /// Only report; install nothing and fail if something is missing.
        #[arg(long)]
        check: bool,
    },
    /// Build kvnet (eBPF object included) and the end-to-end tests, release profile.
    Build {
        /// Accepted for habit's sake: kvnet is always built with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run `kvnet ARGS` as root; without ARGS, run the demo.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run unit tests, then the privileged end-to-end tests.
    Test {
        /// Skip the end-to-end tests (no root needed).
        #[arg(long)]
        unit_only: bool,
        /// Parallel end-to-end tests (default: number of CPUs).
        #[arg(long, value_name = "N")]
        test_threads: Option<usize>,
        /// Test name filter and other test-harness arguments, after `--`.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Upgrade in place: build the kvnet of an older revision (git worktree
    /// under target/upgrade-from/) and run the upgrade tests from it to this one.
    UpgradeTest {
        /// The older revision (default: the last one with the previous map layout).
        #[arg(long, value_name = "REV", default_value = upgrade::PREVIOUS_LAYOUT_REV)]
        from: String,
    },
    /// Differential fuzzing: random map states and frames through the datapath
    /// (BPF_PROG_RUN, both hooks) and its model; fails with a minimal reproducer.
    Fuzz {
        /// Frames to run.
        #[arg(long, value_name = "N", default_value_t = 1_000_000)]
        frames: u64,
        /// Seed (default: from the clock, printed so the run can be repeated).
        #[arg(long, value_name = "S")]
        seed: Option<u64>,
        /// Run the seeded slice of the unit tests instead (`cargo xtask test`'s).
        #[arg(long, conflicts_with_all = ["frames", "seed"])]
        slice: bool,
    },
    /// Fault and soak tests, long forms (KVNET_SOAK=1): port churn, protocol
    /// fuzzing, ... then a table (scenario, iterations, leaks found).
    Soak {
        /// Only these test files (of tests/tests/), e.g. `--test faults`.
        #[arg(long = "test", value_name = "FILE")]
        only: Vec<String>,
    },
    /// Keep a lab (hypervisor namespace + 3 guests) around for manual poking.
    Lab {
        #[command(subcommand)]
        action: lab::Action,
    },
    /// Benchmarks: kvnet vs the Linux bridge, NAT peers and a redirect-only limit (target/bench/).
    Bench {
        #[arg(long)]
        quick: bool,
        /// Only the ports-per-network scale table (issue 21), minutes
        /// instead of the whole run.
        #[arg(long)]
        ports_only: bool,
    },
    /// Build the Debian package target/package/kvnet_<version>_<arch>.deb
    /// (binary, systemd unit, qemu scripts, completions, man pages).
    Package,
    /// Internal: the demo, re-executed under sudo by `run`.
    #[command(hide = true)]
    DemoAsRoot { kvnet: PathBuf },
}

fn main() {
    if let Err(err) = real_main() {
        eprintln!("xtask: error: {err:#}");
        std::process::exit(1);
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    setup::ensure_cargo_bin_on_path();
    match cli.command {
        Cmd::Setup { check } => setup::ensure(if check {
            setup::Mode::Check
        } else {
            setup::Mode::Verbose
        }),
        Cmd::Build { release: _ } => {
            setup::ensure(setup::Mode::Quiet)?;
            let kvnet = build::kvnet()?;
            build::e2e_tests()?;
            println!("kvnet binary: {}", kvnet.display());
            Ok(())
        }
        Cmd::Run { args } => run::run(&args),
        Cmd::Test {
            unit_only,
            test_threads,
            filter,
        } => test::test(&test::Options {
            unit_only,
            test_threads,
            harness_args: filter,
        }),
        Cmd::UpgradeTest { from } => upgrade::upgrade_test(&from),
        Cmd::Fuzz {
            frames,
            seed,
            slice,
        } => fuzz::fuzz(frames, seed, slice),
        Cmd::Soak { only } => soak::soak(&only),
        Cmd::Lab { action } => lab::lab(action),
        Cmd::Bench { quick, ports_only } => bench::bench(quick, ports_only),
        Cmd::Package => package::package().map(|_| ()),
        Cmd::DemoAsRoot { kvnet } => demo::run(&kvnet),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> &'static Path {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest)
}
