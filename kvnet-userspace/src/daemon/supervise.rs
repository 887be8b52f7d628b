//! Crash-only and supervised: a panic anywhere ends the daemon (systemd's
//! `Restart=on-failure` then starts a new one, which adopts the running
//! datapath), and systemd hears when the daemon is ready and that it
//! still makes progress (`Type=notify`, `WatchdogSec=`), through the
//! sd_notify datagram protocol.
use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

/// From here on, a panic aborts the process instead of ending one thread
/// or task: a daemon with a poisoned lock or a dead housekeeping task
/// would stay alive answering errors, and systemd would never restart it.
/// The datapath forwards on; its pins stay for the next daemon.
pub fn crash_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!(
            "kvnet: a panic ends the daemon (crash-only); the datapath keeps forwarding and the next daemon adopts it"
        );
        std::process::abort();
    }));
}

/// `KVNET_PANIC_ON=<request>`: a test's way to make the daemon panic while
/// answering that request (its `op` on the wire, e.g. `status`).
pub fn panic_if_asked(req: &crate::control::Request) {
    let Ok(asked) = std::env::var("KVNET_PANIC_ON") else {
        return;
    };
    let op = serde_json::to_value(req).ok();
    if op.as_ref().and_then(|v| v["op"].as_str()) == Some(asked.as_str()) {
        panic!("KVNET_PANIC_ON={asked}: panicking as asked");
    }
}

/// The service manager's notification socket ($NOTIFY_SOCKET), if any.
fn notify_socket(var: Option<std::ffi::OsString>) -> Option<PathBuf> {
    let path = var?;
    if path.as_encoded_bytes().first() == Some(&b'@') {
        // An abstract socket: std's UnixDatagram cannot name one; systemd
        // gives a path unless told otherwise.
        return None;
    }
    Some(PathBuf::from(path))
}

/// Sends one sd_notify message (`READY=1`, `WATCHDOG=1`, `STOPPING=1`) to
/// `to`. Failures are logged, never fatal.
fn send(to: &Path, state: &str) {
    let sent = UnixDatagram::unbound().and_then(|s| s.send_to(state.as_bytes(), to));
    if let Err(e) = sent {
        log::warn!("sd_notify {state} to {}: {e}", to.display());
    }
}

/// Tells the service manager `state`; nothing without one.
pub fn notify(state: &str) {
    if let Some(to) = notify_socket(std::env::var_os("NOTIFY_SOCKET")) {
        send(&to, state);
    }
}

/// The watchdog ($WATCHDOG_USEC, for this process): pings go at half its
/// deadline.
pub struct Watchdog {
    to: PathBuf,
    every: Duration,
    last: Option<Instant>,
}

impl Watchdog {
    /// None when the service manager asked for no watchdog.
    pub fn from_env() -> Option<Watchdog> {
        Watchdog::of(
            notify_socket(std::env::var_os("NOTIFY_SOCKET")),
            std::env::var("WATCHDOG_USEC").ok(),
            std::env::var("WATCHDOG_PID").ok(),
            std::process::id(),
        )
    }

    fn of(
        to: Option<PathBuf>,
        usec: Option<String>,
        pid: Option<String>,
        me: u32,
    ) -> Option<Watchdog> {
        let usec: u64 = usec?.parse().ok()?;
        if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(me)) {
            return None;
        }
        let to = to?;
        (usec > 0).then(|| Watchdog {
            to,
            every: Duration::from_micros(usec / 2),
            last: None,
        })
    }

    /// Pings when due. Called from housekeeping with the switch locked: a
    /// daemon stuck on its lock stops pinging and systemd restarts it.
    pub fn tick(&mut self) {
        if self.last.is_none_or(|t| t.elapsed() >= self.every) {
            send(&self.to, "WATCHDOG=1");
            self.last = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notifications_reach_the_service_managers_socket() {
        let dir = std::env::temp_dir().join(format!("kvnet-notify-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("notify");
        let _ = std::fs::remove_file(&path);
        let manager = UnixDatagram::bind(&path).unwrap();
        manager
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let to = notify_socket(Some(path.clone().into_os_string()));
        assert_eq!(to.as_deref(), Some(path.as_path()));
        send(&path, "READY=1");
        let usec = Some("2000000".to_string());
        let mut w = Watchdog::of(to.clone(), usec.clone(), None, 7).expect("a 2 s watchdog");
        assert_eq!(w.every, Duration::from_secs(1));
        w.tick();
        w.tick(); // not due yet: one ping only
        let mut buf = [0u8; 64];
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = manager.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
        manager
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        assert!(manager.recv(&mut buf).is_err(), "a second ping too early");
        // Another process's watchdog, none asked for, no socket, abstract.
        assert!(Watchdog::of(to.clone(), usec.clone(), Some("8".into()), 7).is_none());
        assert!(Watchdog::of(to.clone(), Some("7".into()), Some("7".into()), 7).is_some());
        assert!(Watchdog::of(to.clone(), None, None, 7).is_none());
        assert!(Watchdog::of(None, usec, None, 7).is_none());
        assert!(notify_socket(Some("@abstract".into())).is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
