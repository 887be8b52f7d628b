//! `cargo xtask upgrade-test [--from REV]`: upgrade in place (issue 22)
//! against a real older kvnet. Builds the `kvnet` of an older revision in a
//! git worktree of its own, builds this one, and runs the end-to-end tests
//! of tests/tests/upgrade.rs with both (`KVNET_OLD_BIN`, `KVNET_BIN`): the
//! old daemon pins its datapath, this one takes it over.
//!
//! Also a phase of `cargo xtask test` (after the end-to-end tests), which
//! does not fail but says SKIPPED, loudly, in a clone without the older
//! revision (a shallow one).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::{build, cmd, lab, setup, workspace_root};

/// The last released revision with the previous map layout (layout 3:
/// NAT fragments and UDP mappings, before flood sets of 4096 ports, ARP
/// suppression and port policy; kvnet_common::LAYOUT_VERSION 4 is the
/// current one). Move it forward when LAYOUT_VERSION changes again. Layouts
/// 1 (fa4f158) and 2 (d483672) are still carried (`--from REV`).
pub const PREVIOUS_LAYOUT_REV: &str = "9bd548a";

/// The name of the `cargo xtask test` phase.
pub const PHASE: &str = "upgrade from the previous layout";
/// Its name when the previous revision is not in this clone.
pub const PHASE_SKIPPED: &str =
    "upgrade from the previous layout: SKIPPED, previous revision not in this clone";

/// `cargo xtask upgrade-test`: a missing revision is an error here.
pub fn upgrade_test(from: &str) -> Result<()> {
    // Before any build: a revision that is not there fails at once.
    let rev = match resolve_or_skip(from)? {
        Ok(rev) => rev,
        Err(why) => bail!("{why}"),
    };
    setup::ensure(setup::Mode::Quiet)?;
    let kvnet = build::kvnet()?;
    // Namespaces of earlier crashed runs would collide with new ones.
    lab::cleanup_leftovers()?;
    if run(from, &rev, &kvnet)? {
        println!("upgrade-test: the upgrade from {from} passed");
        Ok(())
    } else {
        bail!("the upgrade tests from {from} failed (see output above)")
    }
}

/// The phase of `cargo xtask test`: its name and outcome. A revision
/// missing from the clone passes as SKIPPED, said loudly, never silently.
pub fn phase(kvnet: &Path) -> (&'static str, Result<bool>) {
    match resolve_or_skip(PREVIOUS_LAYOUT_REV) {
        Ok(Ok(rev)) => (PHASE, run(PREVIOUS_LAYOUT_REV, &rev, kvnet)),
        Ok(Err(why)) => {
            let bar = "!".repeat(72);
            println!("\n{bar}\nSKIPPED: {why}\n{bar}\n");
            (PHASE_SKIPPED, Ok(true))
        }
        Err(e) => (PHASE, Err(e)),
    }
}

/// The full commit id of `from`, or (inner `Err`) why it cannot be tested:
/// this clone does not have it.
fn resolve_or_skip(from: &str) -> Result<std::result::Result<String, String>> {
    check_rev_arg(from)?;
    // Not a git checkout at all (or one git refuses to read): say so
    // rather than blame the revision.
    let mut c = git_cmd();
    c.args(["rev-parse", "--git-dir"]);
    let out =
        cmd::probe(&mut c).with_context(|| format!("failed to start `{}`", cmd::display(&c)))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let first = err.lines().next().unwrap_or("").trim();
        return Ok(Err(format!(
            "{from} cannot be looked up, git reads no history here ({first}): the upgrade from it was NOT tested"
        )));
    }
    if let Some(rev) = resolve(from)? {
        return Ok(Ok(rev));
    }
    let shallow = git(&["rev-parse", "--is-shallow-repository"]).is_ok_and(|s| s.trim() == "true");
    Ok(Err(not_in_clone(from, shallow)))
}

fn not_in_clone(from: &str, shallow: bool) -> String {
    let hint = if shallow {
        " (a shallow clone: `git fetch --unshallow` brings the history)"
    } else {
        ""
    };
    format!("{from} not in this clone{hint}: the upgrade from it was NOT tested")
}

/// Builds the old kvnet of `rev` (`from` resolved) and runs the upgrade
/// tests with it and `kvnet` (this version's binary); whether they passed.
fn run(from: &str, rev: &str, kvnet: &Path) -> Result<bool> {
    println!("upgrade-test: from {from} ({rev})");
    let base = workspace_root().join("target").join("upgrade-from");
    let tree = worktree_dir(&base, rev);
    ensure_worktree(&tree, rev)?;
    // A target folder per revision: cargo hashes path dependencies relative
    // to the workspace, so two old trees sharing one would reuse each
    // other's kvnet-common as fresh.
    let old = build_old(&tree, &tree.with_extension("target"))?;
    println!(
        "upgrade-test: old kvnet {}, new kvnet {}",
        old.display(),
        kvnet.display()
    );
    let mut c = build::cargo();
    c.args([
        "test",
        build::PROFILE_FLAG,
        "-p",
        "kvnet-tests",
        "--test",
        "upgrade",
        "--",
        "--test-threads=1",
    ])
    .env("KVNET_BIN", kvnet)
    .env("KVNET_OLD_BIN", &old);
    if !cmd::is_root() {
        // Build as the user, run only the test binary as root.
        c.env(crate::test::runner_env_var(), "sudo -E");
    }
    println!("test: {}", cmd::display(&c));
    cmd::run_status(&mut c)
}

/// A revision argument git will read as a revision, never as an option.
fn check_rev_arg(rev: &str) -> Result<()> {
    if rev.is_empty() || rev.starts_with('-') || rev.chars().any(char::is_whitespace) {
        bail!("not a revision: {rev:?}");
    }
    Ok(())
}

/// The full commit id of `rev`, or `None` if this clone does not have it.
fn resolve(rev: &str) -> Result<Option<String>> {
    let mut c = git_cmd();
    c.args(["rev-parse", "--verify", "--quiet"])
        .arg(format!("{rev}^{{commit}}"));
    let out =
        cmd::probe(&mut c).with_context(|| format!("failed to start `{}`", cmd::display(&c)))?;
    if !out.status.success() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    match parse_commit_id(&text) {
        Some(id) => Ok(Some(id)),
        None => bail!("`{}` printed {text:?}", cmd::display(&c)),
    }
}

/// A commit id as `git rev-parse` prints it (SHA-1 or SHA-256, hex).
fn parse_commit_id(out: &str) -> Option<String> {
    let id = out.trim();
    let hex = id
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase());
    (hex && (id.len() == 40 || id.len() == 64)).then(|| id.to_string())
}

/// `BASE/src-<first 12 hex digits of rev>`.
fn worktree_dir(base: &Path, rev: &str) -> PathBuf {
    let short: String = rev.chars().take(12).collect();
    base.join(format!("src-{short}"))
}

/// A detached worktree of `rev` at `dir`: reused when it already is one at
/// that revision, otherwise (re)created.
fn ensure_worktree(dir: &Path, rev: &str) -> Result<()> {
    if dir.join(".git").exists() {
        let head = git_in(dir, &["rev-parse", "HEAD"]).ok();
        if head.as_deref().and_then(parse_commit_id).as_deref() == Some(rev) {
            println!("upgrade-test: reusing worktree {}", dir.display());
            return Ok(());
        }
        println!(
            "upgrade-test: {} is not at {rev}: recreating it",
            dir.display()
        );
    }
    if dir.exists() {
        std::fs::remove_dir_all(dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    // Forget registrations of worktrees whose folder is gone (`cargo clean`).
    git(&["worktree", "prune"])?;
    let mut c = git_cmd();
    c.args(["worktree", "add", "--detach", "-f"])
        .arg(dir)
        .arg(rev);
    println!("upgrade-test: {}", cmd::display(&c));
    cmd::run(&mut c)
}

/// Builds the old revision's `kvnet` in `tree` into the target folder
/// `target` (kept apart from this version's artifacts); returns its path.
fn build_old(tree: &Path, target: &Path) -> Result<PathBuf> {
    let mut c = build::cargo();
    c.current_dir(tree).env("CARGO_TARGET_DIR", target).args([
        "build",
        build::PROFILE_FLAG,
        "-p",
        "kvnet-userspace",
        "--bin",
        "kvnet",
    ]);
    println!("build: (in {}) {}", tree.display(), cmd::display(&c));
    cmd::run(&mut c)?;
    let bin = target.join("release").join("kvnet");
    if !bin.is_file() {
        bail!("the old kvnet was built but {} is missing", bin.display());
    }
    Ok(bin)
}

fn git_cmd() -> Command {
    let mut c = Command::new("git");
    c.current_dir(workspace_root());
    c
}

fn git(args: &[&str]) -> Result<String> {
    let mut c = git_cmd();
    c.args(args);
    cmd::stdout(&mut c)
}

fn git_in(dir: &Path, args: &[&str]) -> Result<String> {
    let mut c = Command::new("git");
    c.current_dir(dir).args(args);
    cmd::stdout(&mut c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "fa4f158e0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a";

    #[test]
    fn commit_ids() {
        assert_eq!(parse_commit_id(&format!("{ID}\n")), Some(ID.to_string()));
        let sha256 = "ab".repeat(32);
        assert_eq!(parse_commit_id(&sha256), Some(sha256.clone()));
        assert_eq!(parse_commit_id("fa4f158"), None);
        assert_eq!(parse_commit_id(""), None);
        assert_eq!(parse_commit_id(&ID.to_uppercase()), None);
        assert_eq!(parse_commit_id(&format!("{}x", &ID[..39])), None);
    }

    #[test]
    fn worktree_folder_is_named_by_the_short_rev() {
        assert_eq!(
            worktree_dir(Path::new("/w/target/upgrade-from"), ID),
            PathBuf::from("/w/target/upgrade-from/src-fa4f158e0d1c")
        );
    }

    #[test]
    fn revision_arguments() {
        assert!(check_rev_arg(PREVIOUS_LAYOUT_REV).is_ok());
        assert!(check_rev_arg("v0.3.0~2").is_ok());
        assert!(check_rev_arg("").is_err());
        assert!(check_rev_arg("--all").is_err());
        assert!(check_rev_arg("a b").is_err());
    }

    #[test]
    fn a_missing_revision_says_it_was_not_tested() {
        let m = not_in_clone("fa4f158", false);
        assert!(m.starts_with("fa4f158 not in this clone") && m.contains("NOT tested"));
        assert!(not_in_clone("fa4f158", true).contains("git fetch --unshallow"));
    }

    #[test]
    fn phase_names() {
        assert!(PHASE_SKIPPED.starts_with(PHASE) && PHASE_SKIPPED.contains("SKIPPED"));
    }
}
