//! `cargo xtask soak`: the long forms of the fault and soak tests (issue
//! 15, point 7). Builds kvnet, runs each file of [`SOAK_TESTS`] with
//! `KVNET_SOAK=1` (minutes of port churn, long protocol fuzzing, ...) and
//! prints a table of what they report.
//!
//! A scenario reports by printing one line (see tests/tests/support/soak.rs):
//!
//! ```text
//! SOAK scenario=port-churn iterations=120 leaks=0 seconds=600.2
//! ```
//!
//! To add scenarios, print such lines from a test and list its file here.

use std::{
    io::{BufRead, BufReader},
    process::Stdio,
};

use anyhow::{bail, Context, Result};

use crate::{build, cmd, lab, setup};

/// The end-to-end test files (tests/tests/NAME.rs) whose tests scale up
/// under `KVNET_SOAK=1` and print `SOAK` lines.
pub const SOAK_TESTS: &[&str] = &["control_fuzz", "faults"];

/// One scenario's report.
#[derive(Debug, Clone, PartialEq)]
pub struct SoakResult {
    pub scenario: String,
    pub iterations: u64,
    pub leaks: u64,
    pub seconds: f64,
}

/// The report in a line of test output, if it has one: `SOAK ` then
/// `key=value` words (scenario required; unknown keys ignored, missing
/// numbers 0). The harness may print other text before it on the line.
pub fn parse_soak_line(line: &str) -> Option<SoakResult> {
    let at = line.find("SOAK ")?;
    // "SOAK " must start a word ("XSOAK " is not a report).
    if at > 0 && !line[..at].ends_with(char::is_whitespace) {
        return None;
    }
    let mut r = SoakResult {
        scenario: String::new(),
        iterations: 0,
        leaks: 0,
        seconds: 0.0,
    };
    for word in line[at + 5..].split_whitespace() {
        let Some((k, v)) = word.split_once('=') else {
            continue;
        };
        match k {
            "scenario" => r.scenario = v.to_string(),
            "iterations" => r.iterations = v.parse().ok()?,
            "leaks" => r.leaks = v.parse().ok()?,
            "seconds" => r.seconds = v.parse().ok()?,
            _ => {}
        }
    }
    (!r.scenario.is_empty()).then_some(r)
}

/// One row of the table: a scenario (or a file that reported none).
#[derive(Debug, PartialEq)]
struct Row {
    file: String,
    result: Option<SoakResult>,
    /// The test file passed (every test in it).
    file_ok: bool,
}

impl Row {
    fn passed(&self) -> bool {
        self.file_ok && self.result.as_ref().is_some_and(|r| r.leaks == 0)
    }
}

pub fn soak(only: &[String]) -> Result<()> {
    setup::ensure(setup::Mode::Quiet)?;
    let files: Vec<&str> = if only.is_empty() {
        SOAK_TESTS.to_vec()
    } else {
        for o in only {
            if !SOAK_TESTS.contains(&o.as_str()) {
                bail!("no soak test file {o} (known: {})", SOAK_TESTS.join(", "));
            }
        }
        only.iter().map(String::as_str).collect()
    };
    let kvnet = build::kvnet()?;
    lab::cleanup_leftovers()?;
    let mut rows = Vec::new();
    for file in files {
        rows.extend(run_file(file, &kvnet)?);
    }
    lab::cleanup_leftovers()?;
    print!("{}", table(&rows));
    let failed = rows.iter().filter(|r| !r.passed()).count();
    if failed > 0 {
        bail!("{failed} of {} soak scenarios failed", rows.len());
    }
    Ok(())
}

/// Runs one test file in soak mode, its output streamed through; returns
/// its scenarios.
fn run_file(file: &str, kvnet: &std::path::Path) -> Result<Vec<Row>> {
    let mut c = build::cargo();
    c.args([
        "test",
        build::PROFILE_FLAG,
        "-p",
        "kvnet-tests",
        "--test",
        file,
    ])
    .args(["--", "--nocapture", "--test-threads=1"])
    .env("KVNET_SOAK", "1")
    .env("KVNET_BIN", kvnet)
    .stdout(Stdio::piped());
    if !cmd::is_root() {
        c.env(crate::test::runner_env_var(), "sudo -E");
    }
    println!("soak: {}", cmd::display(&c));
    let mut child = c
        .spawn()
        .with_context(|| format!("starting `{}`", cmd::display(&c)))?;
    let mut found = Vec::new();
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let line = line.context("reading the tests' output")?;
            println!("{line}");
            if let Some(r) = parse_soak_line(&line) {
                found.push(r);
            }
        }
    }
    let file_ok = child.wait().context("waiting for the tests")?.success();
    Ok(rows_of(file, found, file_ok))
}

fn rows_of(file: &str, found: Vec<SoakResult>, file_ok: bool) -> Vec<Row> {
    if found.is_empty() {
        // A file that reported nothing failed before its report (or has
        // no scenario): a row of its own, failed.
        return vec![Row {
            file: file.to_string(),
            result: None,
            file_ok: false,
        }];
    }
    found
        .into_iter()
        .map(|r| Row {
            file: file.to_string(),
            result: Some(r),
            file_ok,
        })
        .collect()
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from("\n==== soak ====\n");
    s.push_str(&format!(
        "{:<14} {:<24} {:>10} {:>6} {:>9}  result\n",
        "file", "scenario", "iterations", "leaks", "seconds"
    ));
    for r in rows {
        let result = match (&r.result, r.file_ok) {
            (None, _) => "FAIL (no SOAK line)",
            (Some(x), _) if x.leaks > 0 => "FAIL (leaks)",
            (Some(_), false) => "FAIL (test failed)",
            (Some(_), true) => "pass",
        };
        match &r.result {
            Some(x) => s.push_str(&format!(
                "{:<14} {:<24} {:>10} {:>6} {:>9.1}  {result}\n",
                r.file, x.scenario, x.iterations, x.leaks, x.seconds
            )),
            None => s.push_str(&format!(
                "{:<14} {:<24} {:>10} {:>6} {:>9}  {result}\n",
                r.file, "-", "-", "-", "-"
            )),
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soak_lines() {
        let r = parse_soak_line("SOAK scenario=port-churn iterations=120 leaks=0 seconds=600.2")
            .unwrap();
        assert_eq!(
            r,
            SoakResult {
                scenario: "port-churn".into(),
                iterations: 120,
                leaks: 0,
                seconds: 600.2
            }
        );
        // After the harness's "test NAME ... " on the same line; extra keys.
        let r = parse_soak_line(
            "test faults::churn ... SOAK scenario=x leaks=3 seconds=1 iterations=7 extra=yes",
        )
        .unwrap();
        assert_eq!((r.scenario.as_str(), r.iterations, r.leaks), ("x", 7, 3));
        // Not reports.
        assert_eq!(parse_soak_line("SOAK-LEAK scenario=x fds 3 -> 4"), None);
        assert_eq!(parse_soak_line("XSOAK scenario=x"), None);
        assert_eq!(parse_soak_line("SOAK iterations=3"), None);
        assert_eq!(parse_soak_line("SOAK scenario=x leaks=many"), None);
        assert_eq!(parse_soak_line("running 3 tests"), None);
        // Missing numbers are 0.
        assert_eq!(parse_soak_line("SOAK scenario=y").unwrap().iterations, 0);
    }

    #[test]
    fn a_scenario_passes_only_without_leaks_in_a_passing_file() {
        let ok = |leaks| SoakResult {
            scenario: "s".into(),
            iterations: 1,
            leaks,
            seconds: 1.0,
        };
        let rows = rows_of("f", vec![ok(0), ok(2)], true);
        assert!(rows[0].passed() && !rows[1].passed());
        assert!(!rows_of("f", vec![ok(0)], false)[0].passed());
        let none = rows_of("f", vec![], true);
        assert_eq!(none.len(), 1);
        assert!(!none[0].passed());
        let t = table(&rows_of("f", vec![ok(0), ok(2)], true));
        assert!(t.contains("pass") && t.contains("FAIL (leaks)"), "{t}");
    }
}
