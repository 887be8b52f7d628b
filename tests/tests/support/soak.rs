//! Shared by the fault and soak tests (control_fuzz.rs, faults.rs): the
//! CI/soak scale switch, the `SOAK ...` result line `cargo xtask soak`
//! parses, a seeded RNG and the daemon's footprint (fds, RSS).
#![allow(dead_code)]
use std::{
    thread,
    time::{Duration, Instant},
};

/// Whether the long (soak) forms run: `KVNET_SOAK=1` (set by `cargo xtask soak`).
pub fn soak() -> bool {
    std::env::var("KVNET_SOAK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `ci` in the suite, `long` under `cargo xtask soak`.
pub fn scale<T>(ci: T, long: T) -> T {
    if soak() {
        long
    } else {
        ci
    }
}

/// The machine-readable result of one scenario, printed before the test
/// asserts (so a failing soak still reports what it found). `cargo xtask
/// soak` collects these lines; keep the format in step with xtask/src/soak.rs.
pub fn soak_line(scenario: &str, iterations: u64, leaks: &[String], started: Instant) {
    println!(
        "SOAK scenario={scenario} iterations={iterations} leaks={} seconds={:.1}",
        leaks.len(),
        started.elapsed().as_secs_f64()
    );
    for l in leaks {
        println!("SOAK-LEAK scenario={scenario} {l}");
    }
}

/// splitmix64: small, seeded, good enough to pick fuzz cases.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    /// Seeded from `KVNET_FUZZ_SEED` or the clock; the seed is printed so
    /// a failure can be replayed.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("KVNET_FUZZ_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            });
        println!("{what}: seed {seed} (replay with KVNET_FUZZ_SEED={seed})");
        Rng(seed)
    }
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// In 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// What a process holds: open fds and resident memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footprint {
    pub fds: usize,
    pub rss_kib: u64,
}

pub fn footprint(pid: u32) -> Footprint {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Footprint { fds, rss_kib }
}

/// Waits (up to `t`) for the daemon's fd count to come back to `base`
/// (connections are closed asynchronously); returns the last count.
pub fn settle_fds(pid: u32, base: usize, t: Duration) -> usize {
    let end = Instant::now() + t;
    loop {
        let n = footprint(pid).fds;
        if n <= base || Instant::now() > end {
            return n;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` every 20 ms until it holds; panics naming `what` after `t`.
pub fn wait_until(what: &str, t: Duration, mut f: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < t, "{what}: not within {t:?}");
        thread::sleep(Duration::from_millis(20));
    }
}
