//! The conntrack GC. A thread of its own reads the table in batches
//! without the switch lock and paces itself to a small share of one core,
//! so a million entries never take a core from forwarding or hold the
//! control socket; it takes the lock only to delete what expired.

use std::{
    collections::HashMap,
    os::fd::{AsFd, OwnedFd},
    sync::{Mutex, Weak},
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use kvnet_common::{CtEntry, CtKey};
use serde::{Deserialize, Serialize};

use crate::{datapath::batch, host::monotonic_ns, switch::Switch};

/// The walk's share of one core while it runs: it sleeps this many times
/// as long as each batch took.
const SLEEP_PER_WORK: u32 = 19;
/// Entries per batch read.
const BATCH: u32 = 4096;
/// The least pause between walks; a walk also waits as long as it took.
const MIN_PAUSE: Duration = Duration::from_secs(1);

/// What `kvnet status --json` says of the GC.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct GcReport {
    /// Walks finished since the daemon started.
    pub walks: u64,
    /// A walk is under way.
    pub walking: bool,
    /// Entries the last walk read and deleted.
    pub last_entries: u64,
    pub last_expired: u64,
    /// The last walk's CPU time and wall time, in ms.
    pub last_cpu_ms: f64,
    pub last_wall_ms: f64,
}

static REPORT: Mutex<GcReport> = Mutex::new(GcReport {
    walks: 0,
    walking: false,
    last_entries: 0,
    last_expired: 0,
    last_cpu_ms: 0.0,
    last_wall_ms: 0.0,
});

pub fn report() -> GcReport {
    REPORT.lock().map(|r| r.clone()).unwrap_or_default()
}

fn update(f: impl FnOnce(&mut GcReport)) {
    if let Ok(mut r) = REPORT.lock() {
        f(&mut r);
    }
}

/// Starts the GC thread; it ends with the switch.
pub fn spawn(switch: Weak<Mutex<Switch>>) -> Result<()> {
    std::thread::Builder::new()
        .name("kvnet-ct-gc".into())
        .spawn(move || run(switch))
        .map(|_| ())
        .map_err(|e| anyhow!("starting the conntrack GC thread: {e}"))
}

fn run(switch: Weak<Mutex<Switch>>) {
    let mut fd: Option<OwnedFd> = None;
    loop {
        if fd.is_none() {
            let Some(sw) = switch.upgrade() else { return };
            let Ok(mut sw) = sw.lock() else { return };
            match sw.dp.ct_fd() {
                Ok(f) => fd = Some(f),
                Err(e) => log::warn!("conntrack GC: {e:#}"),
            }
        }
        let pause = match fd.as_ref().map(|f| walk(&switch, f)) {
            Some(Ok(Some(took))) => MIN_PAUSE.max(took),
            Some(Ok(None)) => return,
            Some(Err(e)) => {
                log::warn!("conntrack GC: {e:#}");
                update(|r| r.walking = false);
                MIN_PAUSE
            }
            None => MIN_PAUSE,
        };
        std::thread::sleep(pause);
    }
}

/// This thread's CPU time.
fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Runs `work`, then sleeps in proportion to the CPU it took.
fn paced<T>(work: impl FnOnce() -> T) -> T {
    let t = thread_cpu();
    let out = work();
    std::thread::sleep(thread_cpu().saturating_sub(t) * SLEEP_PER_WORK);
    out
}

/// One walk; its wall time, or None once the switch is gone.
fn walk(switch: &Weak<Mutex<Switch>>, fd: &OwnedFd) -> Result<Option<Duration>> {
    let (wall0, cpu0) = (Instant::now(), thread_cpu());
    let started = monotonic_ns();
    let Some(quota_before) = with_switch(switch, |sw| sw.ct_quota_counts())? else {
        return Ok(None);
    };
    update(|r| r.walking = true);
    let mut read: Vec<(CtKey, CtEntry)> = Vec::new();
    let mut cursor = batch::Cursor::default();
    while !cursor.done() {
        paced(|| batch::lookup(fd.as_fd(), &mut cursor, BATCH, &mut read))?;
    }
    let (all, candidates) = paced(|| {
        let all: HashMap<CtKey, CtEntry> = read.into_iter().collect();
        let candidates = crate::switch::nat::conntrack_gc_candidates(&all, monotonic_ns());
        (all, candidates)
    });
    // (Also with no IPv4 flows: NAT66's table, the quota recount and the
    // UDP mappings are done here too.)
    let Some(expired) = with_switch(switch, |sw| {
        sw.conntrack_gc_apply(&all, candidates, started, &quota_before)
    })?
    else {
        return Ok(None);
    };
    let took = wall0.elapsed();
    let cpu = thread_cpu().saturating_sub(cpu0);
    update(|r| {
        r.walks += 1;
        r.walking = false;
        r.last_entries = all.len() as u64;
        r.last_expired = expired as u64;
        r.last_cpu_ms = cpu.as_secs_f64() * 1e3;
        r.last_wall_ms = took.as_secs_f64() * 1e3;
    });
    Ok(Some(took))
}

/// `f` on the switch under its lock; None once the switch is gone.
fn with_switch<T>(
    switch: &Weak<Mutex<Switch>>,
    f: impl FnOnce(&mut Switch) -> Result<T>,
) -> Result<Option<T>> {
    let Some(sw) = switch.upgrade() else {
        return Ok(None);
    };
    let Ok(mut sw) = sw.lock() else {
        return Ok(None);
    };
    f(&mut sw).map(Some)
}
