//! The daemon's conntrack GC walking a grown table. The daemon reports its
//! walks (`kvnet status --json`: `conntrack_gc`), so the bench starts its
//! 64-byte run once a walk that began after the fill is under way (the
//! forwarding rate *while* the GC walks) and afterwards reads that walk's
//! CPU and wall time; the daemon's whole CPU (/proc/PID/stat) over the
//! same span is measured too. The daemon waits as long as a walk took (at
//! least a second) before the next, so the long-run share is one walk's
//! CPU over twice its wall time.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use serde_json::{json, Value};

use super::proc_cpu_secs;

const POLL: Duration = Duration::from_millis(100);

/// The walks as the daemon reports them.
#[derive(Debug, Clone, Copy)]
struct Walks {
    done: u64,
    walking: bool,
}

fn walks(status: &Value) -> Result<Walks> {
    let gc = &status["conntrack_gc"];
    Ok(Walks {
        done: gc["walks"]
            .as_u64()
            .ok_or_else(|| anyhow!("no conntrack_gc.walks in kvnet status: {status}"))?,
        walking: gc["walking"].as_bool().unwrap_or(false),
    })
}

/// Follows one walk of the grown table.
pub struct Watch<'a> {
    status: &'a dyn Fn() -> Result<Value>,
    pid: Option<u32>,
    /// The walk of interest is the one that makes `done` reach this + 1.
    walk: u64,
    /// When it was seen under way: (daemon CPU seconds, wall clock).
    seen: Option<(f64, Instant)>,
}

impl<'a> Watch<'a> {
    /// Right after the fill: the walk under way (it reads the rest of the
    /// grown table at its paced rate) or the next one.
    pub fn after_fill(status: &'a dyn Fn() -> Result<Value>, pid: Option<u32>) -> Result<Self> {
        let w = walks(&status()?)?;
        Ok(Watch {
            status,
            pid,
            walk: w.done,
            seen: None,
        })
    }

    /// Waits (at most `bound`) until that walk is under way; whether it is.
    pub fn await_walk(&mut self, bound: Duration) -> Result<bool> {
        let until = Instant::now() + bound;
        while Instant::now() < until {
            let w = walks(&(self.status)()?)?;
            if w.done > self.walk {
                return Ok(false);
            }
            if w.done == self.walk && w.walking {
                let cpu = self.pid.and_then(|p| proc_cpu_secs(p).ok()).unwrap_or(0.0);
                self.seen = Some((cpu, Instant::now()));
                return Ok(true);
            }
            std::thread::sleep(POLL);
        }
        Ok(false)
    }

    /// Whether the walk is still under way (the run just made fell inside it).
    pub fn still_walking(&self) -> bool {
        (self.status)()
            .and_then(|s| walks(&s))
            .is_ok_and(|w| w.done == self.walk && w.walking)
    }

    /// Waits (at most `bound`) for a walk of at least `entries` entries to
    /// end (the one under way began before the fill ended, if it read
    /// less) and describes it.
    pub fn finish(mut self, bound: Duration, entries: u64) -> Result<Value> {
        let until = Instant::now() + bound;
        loop {
            let s = (self.status)()?;
            let done = walks(&s)?.done;
            if done > self.walk && s["conntrack_gc"]["last_entries"].as_u64() < Some(entries) {
                // That walk began before the fill was through: the next.
                self.walk = done;
                self.seen = None;
            } else if done > self.walk {
                let gc = &s["conntrack_gc"];
                let (cpu_ms, wall_ms) = (
                    gc["last_cpu_ms"].as_f64().unwrap_or(0.0),
                    gc["last_wall_ms"].as_f64().unwrap_or(0.0),
                );
                // The daemon as a whole over the part of the walk seen.
                let process = self.seen.and_then(|(cpu0, t0)| {
                    let cpu = proc_cpu_secs(self.pid?).ok()? - cpu0;
                    Some(cpu / t0.elapsed().as_secs_f64())
                });
                return Ok(json!({
                    "walk_seen": true,
                    "entries": gc["last_entries"],
                    "expired": gc["last_expired"],
                    "walk_wall_secs": wall_ms / 1e3,
                    "walk_cpu_secs": cpu_ms / 1e3,
                    "walk_share_of_core": cpu_ms / wall_ms.max(1.0),
                    "daemon_share_of_core_during_walk": process,
                    // The next walk waits as long as this one took, at
                    // least a second.
                    "long_run_share_of_core": cpu_ms / (wall_ms + wall_ms.max(1000.0)),
                }));
            }
            if Instant::now() >= until {
                return Ok(json!({"walk_seen": self.seen.is_some(), "ended": false}));
            }
            if self.seen.is_none() {
                // The whole daemon's CPU from the walk's start on.
                let w = walks(&s)?;
                if w.walking && w.done == self.walk {
                    let cpu = self.pid.and_then(|p| proc_cpu_secs(p).ok()).unwrap_or(0.0);
                    self.seen = Some((cpu, Instant::now()));
                }
            }
            std::thread::sleep(POLL);
        }
    }
}
