//! Building kvnet and its tests. One profile everywhere (release) so that
//! `build`, `run` and `test` share artifacts instead of compiling twice.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cmd, workspace_root};

/// The cargo profile flag used by every build and test command.
pub const PROFILE_FLAG: &str = "--release";

/// A `cargo` command run from the workspace root, with the toolchain that
/// runs xtask (cargo sets `CARGO` for us).
pub fn cargo() -> Command {
    let program = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(program);
    c.current_dir(workspace_root());
    c
}

/// Builds the `kvnet` binary (its build script compiles the eBPF object)
/// and returns its absolute path as reported by cargo itself, so a custom
/// target dir is honoured.
pub fn kvnet() -> Result<PathBuf> {
    let mut c = cargo();
    c.args([
        "build",
        PROFILE_FLAG,
        "-p",
        "kvnet-userspace",
        "--bin",
        "kvnet",
    ])
    .arg("--message-format=json-render-diagnostics");
    let line = cmd::display(&c);
    println!("build: {line}");
    // stdout carries the JSON messages; diagnostics and progress stay on
    // the inherited stderr.
    let mut child = c
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("failed to start `{line}`"))?;
    let stdout = child.stdout.take().context("cargo stdout was not piped")?;
    let mut exe = None;
    for l in BufReader::new(stdout).lines() {
        let l = l.with_context(|| format!("reading output of `{line}`"))?;
        if let Some(path) = executable_of(&l, "kvnet") {
            exe = Some(path);
        }
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    exe.with_context(|| format!("`{line}` succeeded but reported no `kvnet` executable"))
}

/// Compiles the end-to-end tests without running them (same flags as the
/// later `cargo test`, so nothing is rebuilt then).
pub fn e2e_tests() -> Result<()> {
    // The fault tests fill conntrack with kvnet-bench (next to kvnet).
    let mut bench = cargo();
    bench.args([
        "build",
        PROFILE_FLAG,
        "-p",
        "kvnet-userspace",
        "--bin",
        "kvnet-bench",
    ]);
    println!("build: {}", cmd::display(&bench));
    cmd::run(&mut bench)?;
    let mut c = cargo();
    c.args([
        "test",
        PROFILE_FLAG,
        "-p",
        "kvnet-tests",
        "--tests",
        "--no-run",
    ]);
    println!("build: {}", cmd::display(&c));
    cmd::run(&mut c)
}

/// Extracts the executable path from a cargo `compiler-artifact` JSON
/// message for the binary target `name`.
pub fn executable_of(json_line: &str, name: &str) -> Option<PathBuf> {
    let v: serde_json::Value = serde_json::from_str(json_line).ok()?;
    if v.get("reason")?.as_str()? != "compiler-artifact" {
        return None;
    }
    let target = v.get("target")?;
    let is_bin = target
        .get("kind")?
        .as_array()?
        .iter()
        .any(|k| k.as_str() == Some("bin"));
    if !is_bin || target.get("name")?.as_str()? != name {
        return None;
    }
    v.get("executable")?.as_str().map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_kvnet_executable() {
        let line = r#"{"reason":"compiler-artifact","package_id":"x","target":{"kind":["bin"],"crate_types":["bin"],"name":"kvnet","src_path":"/w/src/main.rs"},"executable":"/w/target/release/kvnet","fresh":true}"#;
        assert_eq!(
            executable_of(line, "kvnet"),
            Some(PathBuf::from("/w/target/release/kvnet"))
        );
        assert_eq!(executable_of(line, "other"), None);
    }

    #[test]
    fn ignores_other_messages() {
        let lib = r#"{"reason":"compiler-artifact","target":{"kind":["lib"],"name":"kvnet"},"executable":null}"#;
        assert_eq!(executable_of(lib, "kvnet"), None);
        assert_eq!(
            executable_of(r#"{"reason":"build-finished","success":true}"#, "kvnet"),
            None
        );
        assert_eq!(executable_of("not json", "kvnet"), None);
    }
}
