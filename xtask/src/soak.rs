//! `cargo xtask soak`: the long forms of the fault and soak tests (issue
//! 15, point 7). Builds kvnet, runs each test of the files of
//! [`SOAK_TESTS`] (one process a test) with `KVNET_SOAK=1` (minutes of
//! port churn, long protocol fuzzing, ...) and prints a table of what they
//! report; fails if a test failed or found leaks.
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
pub const SOAK_TESTS: &[&str] = &["control_fuzz", "faults", "kill_points"];

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

/// One row of the table: a scenario, or a test that reported none.
#[derive(Debug, PartialEq)]
struct Row {
    file: String,
    test: String,
    result: Option<SoakResult>,
    /// The test passed.
    test_ok: bool,
}

impl Row {
    fn passed(&self) -> bool {
        self.test_ok && self.result.as_ref().is_none_or(|r| r.leaks == 0)
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
    // The test binaries and what they use besides kvnet (kvnet-bench).
    build::e2e_tests()?;
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

/// Runs each test of one file in soak mode, one process a test (so a
/// failure is pinned on its own scenarios), output streamed through.
fn run_file(file: &str, kvnet: &std::path::Path) -> Result<Vec<Row>> {
    let mut list = test_command(file, kvnet);
    list.args(["--list", "--format=terse"]);
    let listed = cmd::stdout(&mut list)?;
    let tests = parse_test_list(&listed);
    if tests.is_empty() {
        bail!("no tests in tests/tests/{file}.rs");
    }
    let mut rows = Vec::new();
    for test in tests {
        let mut c = test_command(file, kvnet);
        c.args(["--exact", &test, "--nocapture", "--test-threads=1"])
            .stdout(Stdio::piped());
        println!("soak: {}", cmd::display(&c));
        let mut child = c
            .spawn()
            .with_context(|| format!("starting `{}`", cmd::display(&c)))?;
        let mut found = Vec::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let line = line.context("reading the test's output")?;
                println!("{line}");
                if let Some(r) = parse_soak_line(&line) {
                    found.push(r);
                }
            }
        }
        let ok = child.wait().context("waiting for the test")?.success();
        rows.extend(rows_of(file, &test, found, ok));
    }
    Ok(rows)
}

/// `cargo test` of one e2e test file in soak mode; harness arguments follow.
fn test_command(file: &str, kvnet: &std::path::Path) -> std::process::Command {
    let mut c = build::cargo();
    c.args([
        "test",
        build::PROFILE_FLAG,
        "-p",
        "kvnet-tests",
        "--test",
        file,
        "--",
    ])
    .env("KVNET_SOAK", "1")
    .env("KVNET_BIN", kvnet);
    if !cmd::is_root() {
        c.env(crate::test::runner_env_var(), "sudo -E");
    }
    c
}

/// Test names from `--list --format=terse` ("NAME: test" lines).
fn parse_test_list(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| l.strip_suffix(": test"))
        .map(str::to_string)
        .collect()
}

fn rows_of(file: &str, test: &str, found: Vec<SoakResult>, test_ok: bool) -> Vec<Row> {
    if found.is_empty() {
        // No report: a test that failed before it, or one that is no
        // scenario (it still has to pass).
        return vec![Row {
            file: file.to_string(),
            test: test.to_string(),
            result: None,
            test_ok,
        }];
    }
    found
        .into_iter()
        .map(|r| Row {
            file: file.to_string(),
            test: test.to_string(),
            result: Some(r),
            test_ok,
        })
        .collect()
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from("\n==== soak ====\n");
    s.push_str(&format!(
        "{:<18} {:>10} {:>6} {:>9}  {:<20} test\n",
        "scenario", "iterations", "leaks", "seconds", "result"
    ));
    for r in rows {
        let result = match (&r.result, r.test_ok) {
            (Some(x), _) if x.leaks > 0 => "FAIL (leaks)",
            (_, false) => "FAIL (test failed)",
            (Some(_), true) => "pass",
            (None, true) => "pass (no SOAK line)",
        };
        let test = format!("{}::{}", r.file, r.test);
        match &r.result {
            Some(x) => s.push_str(&format!(
                "{:<18} {:>10} {:>6} {:>9.1}  {result:<20} {test}\n",
                x.scenario, x.iterations, x.leaks, x.seconds
            )),
            None => s.push_str(&format!(
                "{:<18} {:>10} {:>6} {:>9}  {result:<20} {test}\n",
                "-", "-", "-", "-"
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
    fn a_scenario_passes_only_without_leaks_in_a_passing_test() {
        let ok = |leaks| SoakResult {
            scenario: "s".into(),
            iterations: 1,
            leaks,
            seconds: 1.0,
        };
        let rows = rows_of("f", "t", vec![ok(0), ok(2)], true);
        assert!(rows[0].passed() && !rows[1].passed());
        assert!(!rows_of("f", "t", vec![ok(0)], false)[0].passed());
        // No report: as the test went.
        let none = rows_of("f", "t", vec![], false);
        assert_eq!(none.len(), 1);
        assert!(!none[0].passed());
        assert!(rows_of("f", "t", vec![], true)[0].passed());
        let t = table(&rows_of("f", "t", vec![ok(0), ok(2)], true));
        assert!(
            t.contains("pass") && t.contains("FAIL (leaks)") && t.contains("f::t"),
            "{t}"
        );
    }

    #[test]
    fn test_lists() {
        let out = "a_test: test\nmod_x::b: test\nsome_bench: bench\n\n";
        assert_eq!(parse_test_list(out), ["a_test", "mod_x::b"]);
    }
}
