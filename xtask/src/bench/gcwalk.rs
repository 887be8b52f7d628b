//! The daemon's conntrack GC walking a grown table: a sampler reads the
//! daemon's CPU time (/proc/PID/stat) every 100 ms, so the bench can start
//! its 64-byte run once a walk is under way (the forwarding rate *while*
//! the GC walks) and afterwards tell one walk's CPU and wall time. The
//! daemon paces walks by their own wall time (the next one waits 20 times
//! as long), so the long-run share follows from one walk.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::proc_cpu_secs;

const SLICE: Duration = Duration::from_millis(100);
/// A slice where the daemon used more than this share of a core is walking.
const BUSY: f64 = 0.3;
/// A slice below this share is idle (the daemon's housekeeping ticks).
const IDLE: f64 = 0.05;
/// The daemon's pacing: the next walk waits this many times the last one.
pub const WALK_COST_FACTOR: f64 = 20.0;

pub struct Sampler {
    stop: Arc<AtomicBool>,
    /// (seconds since start, daemon CPU seconds so far).
    samples: Arc<Mutex<Vec<(f64, f64)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Sampler {
    /// Samples `pid` until stopped or `bound` passes.
    pub fn start(pid: u32, bound: Duration) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (s, v) = (stop.clone(), samples.clone());
        let thread = std::thread::spawn(move || {
            let t0 = Instant::now();
            while !s.load(Ordering::Relaxed) && t0.elapsed() < bound {
                let Ok(cpu) = proc_cpu_secs(pid) else { return };
                if let Ok(mut v) = v.lock() {
                    v.push((t0.elapsed().as_secs_f64(), cpu));
                }
                std::thread::sleep(SLICE);
            }
        });
        Sampler {
            stop,
            samples,
            thread: Some(thread),
        }
    }

    fn snapshot(&self) -> Vec<(f64, f64)> {
        self.samples.lock().map(|v| v.clone()).unwrap_or_default()
    }

    /// Waits (at most `bound`) until a slice shows the daemon walking;
    /// whether it did.
    pub fn await_walk(&self, bound: Duration) -> bool {
        let until = Instant::now() + bound;
        while Instant::now() < until {
            if busy_slices(&self.snapshot()).next().is_some() {
                return true;
            }
            std::thread::sleep(SLICE);
        }
        false
    }

    /// Waits (at most `bound`) for the first walk to end, stops sampling
    /// and describes that walk.
    pub fn finish(mut self, bound: Duration) -> Value {
        let until = Instant::now() + bound;
        while Instant::now() < until && !first_walk_ended(&self.snapshot()) {
            std::thread::sleep(SLICE);
        }
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let s = self.snapshot();
        let Some((start, end)) = first_walk(&s) else {
            return json!({"walk_seen": false, "sampled_secs": s.last().map(|l| l.0)});
        };
        let (wall, cpu) = (s[end].0 - s[start - 1].0, s[end].1 - s[start - 1].1);
        json!({
            "walk_seen": true,
            "ended": first_walk_ended(&s),
            "walk_wall_secs": wall,
            "walk_cpu_secs": cpu,
            "walk_share_of_core": cpu / wall,
            // Long run: one walk's CPU every (1 + factor) walk wall times.
            "long_run_share_of_core": cpu / (wall * (1.0 + WALK_COST_FACTOR)),
            "sampled_secs": s.last().map(|l| l.0),
        })
    }
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn share(s: &[(f64, f64)], i: usize) -> f64 {
    let (dt, dc) = (s[i].0 - s[i - 1].0, s[i].1 - s[i - 1].1);
    if dt > 0.0 {
        dc / dt
    } else {
        0.0
    }
}

/// Indexes i where the slice (i-1, i] was busy.
fn busy_slices(s: &[(f64, f64)]) -> impl Iterator<Item = usize> + '_ {
    (1..s.len()).filter(|&i| share(s, i) > BUSY)
}

/// The first walk: from the first busy slice to the last slice above
/// IDLE before a second of idleness (on a loaded machine a walking daemon
/// may get less than BUSY of a core for a while). (first index, last
/// index, whether the idle second came).
fn first_walk_span(s: &[(f64, f64)]) -> Option<(usize, usize, bool)> {
    let start = busy_slices(s).next()?;
    let mut last = start;
    for i in start + 1..s.len() {
        if share(s, i) > IDLE {
            last = i;
        } else if s[i].0 - s[last].0 > 1.0 {
            return Some((start, last, true));
        }
    }
    Some((start, last, false))
}

fn first_walk(s: &[(f64, f64)]) -> Option<(usize, usize)> {
    first_walk_span(s).map(|(a, b, _)| (a, b))
}

fn first_walk_ended(s: &[(f64, f64)]) -> bool {
    first_walk_span(s).is_some_and(|(_, _, ended)| ended)
}
