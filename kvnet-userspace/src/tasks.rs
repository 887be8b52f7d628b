//! Supervised serving tasks (a network's DHCP and DNS), each restarted when it ends before
//! it was told to stop: a serving loop that gives up on its socket (an
//! error it cannot go on from) is started again, with a fresh socket,
//! after a growing pause, and the restart is logged and counted. Without
//! this a failed task would silently end DHCP or DNS for its network.
//!
//! (In the daemon a panic aborts the process, see daemon/supervise.rs; a
//! task that panics elsewhere, e.g. under `kvnet dhcp-serve`, is restarted
//! like one that failed.)
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::watch;

/// The first pause before a restart; it doubles up to [`BACKOFF_MAX`].
pub const BACKOFF_FIRST: Duration = Duration::from_millis(100);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A task that ran this long before failing restarts after the first
/// pause again.
const STABLE: Duration = Duration::from_secs(60);

/// `KVNET_FAIL_ON=<task>[,<task>...]`: a test's way to make a serving
/// loop (`dhcp-serve`, `dns-udp`, `dns-tcp`) fail once, on its first
/// message, as if its socket had failed. True once per task and process.
pub fn fail_once(task: &str) -> bool {
    static FIRED: Mutex<Option<HashSet<String>>> = Mutex::new(None);
    match std::env::var("KVNET_FAIL_ON") {
        Ok(asked) => first_time_asked(&asked, task, &FIRED),
        Err(_) => false,
    }
}

fn first_time_asked(asked: &str, task: &str, fired: &Mutex<Option<HashSet<String>>>) -> bool {
    if !asked.split(',').any(|t| t.trim() == task) {
        return false;
    }
    let mut fired = fired.lock().unwrap_or_else(|e| e.into_inner());
    fired
        .get_or_insert_with(HashSet::new)
        .insert(task.to_string())
}

/// Waits until `stop` says true (at once if it already does).
pub async fn stopped(stop: &mut watch::Receiver<bool>) {
    // An error means the sender is gone: nobody can start us again.
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs `run(attempt)` (attempt 0 first) as a task until `stop` says
/// true; each time it ends before that (an error, Ok, or a panic) it is
/// logged as `{what}: task {task} ...`, counted in `restarts` and started
/// again after a pause.
pub async fn supervise<F, Fut>(
    what: String,
    task: &'static str,
    restarts: Arc<AtomicU64>,
    mut stop: watch::Receiver<bool>,
    mut run: F,
) where
    F: FnMut(u64) -> Fut,
    Fut: Future<Output = Result<()>> + Send + 'static,
{
    let mut backoff = BACKOFF_FIRST;
    let mut attempt = 0u64;
    loop {
        let began = Instant::now();
        let mut job = tokio::spawn(run(attempt));
        let why = tokio::select! {
            r = &mut job => match r {
                Ok(Ok(())) if *stop.borrow() => return,
                Ok(Ok(())) => "ended".to_string(),
                Ok(Err(e)) => format!("failed: {e:#}"),
                Err(e) if e.is_panic() => "panicked".to_string(),
                Err(e) => format!("was cancelled: {e}"),
            },
            _ = stopped(&mut stop) => {
                // The task stops itself on the same signal; wait for it
                // so its socket is closed when we return.
                let _ = job.await;
                return;
            }
        };
        if began.elapsed() >= STABLE {
            backoff = BACKOFF_FIRST;
        }
        let n = restarts.fetch_add(1, Ordering::Relaxed) + 1;
        log::error!("{what}: task {task} {why}; restarting it in {backoff:?} (restart {n})");
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return,
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
        attempt += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[tokio::test]
    async fn dhcp_supervised_task_restarts_after_failure_and_panic_until_stopped() {
        let restarts = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicU32::new(0));
        let (stop_tx, stop) = watch::channel(false);
        let task_stop = stop.clone();
        let r = runs.clone();
        let sup = tokio::spawn(supervise(
            "dhcp test".into(),
            "serve",
            restarts.clone(),
            stop,
            move |attempt| {
                r.fetch_add(1, Ordering::Relaxed);
                let mut stop = task_stop.clone();
                async move {
                    match attempt {
                        0 => anyhow::bail!("socket gone"),
                        1 => panic!("as asked"),
                        _ => {
                            stopped(&mut stop).await;
                            Ok(())
                        }
                    }
                }
            },
        ));
        // Two restarts, then the third run serves until stopped.
        let deadline = Instant::now() + Duration::from_secs(5);
        while runs.load(Ordering::Relaxed) < 3 {
            assert!(Instant::now() < deadline, "not restarted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(restarts.load(Ordering::Relaxed), 2);
        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), sup)
            .await
            .expect("stops when told")
            .unwrap();
        assert_eq!(restarts.load(Ordering::Relaxed), 2);
        assert_eq!(runs.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn dhcp_fail_once_fires_once_for_a_named_task() {
        let fired = Mutex::new(None);
        let asked = "dhcp-serve, dns-tcp";
        assert!(first_time_asked(asked, "dhcp-serve", &fired));
        assert!(!first_time_asked(asked, "dhcp-serve", &fired));
        assert!(first_time_asked(asked, "dns-tcp", &fired));
        assert!(!first_time_asked(asked, "dns-udp", &fired));
        assert!(!first_time_asked("", "dns-udp", &fired));
    }
}
