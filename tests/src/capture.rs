//! Packet capture with tcpdump inside a namespace.
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::pcap::{parse_pcap, Frame};
use crate::procs::spawn_in_ns;

const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Time given to frames still in flight before tcpdump is stopped.
const SETTLE: Duration = Duration::from_millis(150);

static CAPTURES: AtomicU32 = AtomicU32::new(0);

/// A running `tcpdump -w` on one interface of one namespace.
pub struct Capture {
    child: Option<Child>,
    file: PathBuf,
    what: String,
    stderr: Arc<Mutex<String>>,
}

impl Capture {
    /// Start capturing on `iface` in `ns`; returns once tcpdump reports it
    /// is listening.
    pub fn start(ns: &str, iface: &str) -> Result<Capture> {
        let n = CAPTURES.fetch_add(1, Ordering::Relaxed);
        let file =
            std::env::temp_dir().join(format!("kvnet-cap-{}-{n}-{iface}.pcap", std::process::id()));
        let what = format!("tcpdump on {iface} in netns {ns}");
        let mut cmd = Command::new("tcpdump");
        // --immediate-mode: no ring-block batching, so nothing is lost on
        // SIGINT; -Z root: keep root so the output file can be written.
        cmd.args([
            "-i",
            iface,
            "-U",
            "-n",
            "--immediate-mode",
            "-Z",
            "root",
            "-w",
        ])
        .arg(&file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut child = spawn_in_ns(ns, cmd).with_context(|| format!("start {what}"))?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        if let Some(err) = child.stderr.take() {
            let buf = stderr.clone();
            // Keep draining stderr so tcpdump never blocks on a full pipe.
            thread::spawn(move || {
                for line in BufReader::new(err).lines().map_while(|l| l.ok()) {
                    if line.contains("listening on") {
                        let _ = tx.send(());
                    }
                    let mut b = buf.lock().unwrap_or_else(|e| e.into_inner());
                    b.push_str(&line);
                    b.push('\n');
                }
            });
        }
        let mut cap = Capture {
            child: Some(child),
            file,
            what,
            stderr,
        };
        let end = Instant::now() + START_TIMEOUT;
        loop {
            if rx.recv_timeout(Duration::from_millis(50)).is_ok() {
                return Ok(cap);
            }
            let exited = match cap.child.as_mut() {
                Some(c) => c.try_wait().ok().flatten(),
                None => None,
            };
            if let Some(st) = exited {
                bail!("{} exited ({st}): {}", cap.what, cap.stderr_text());
            }
            if Instant::now() >= end {
                bail!(
                    "{} not listening after {:?}: {}",
                    cap.what,
                    START_TIMEOUT,
                    cap.stderr_text()
                );
            }
        }
    }

    fn stderr_text(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trim()
            .to_string()
    }

    /// The frames captured so far. tcpdump writes each frame as it comes
    /// (`-U`); a record still being written is left for the next read.
    pub fn frames(&self) -> Result<Vec<Frame>> {
        let buf = match fs::read(&self.file) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("read {} of {}", self.file.display(), self.what))
            }
        };
        // The file header is written with the first frame.
        if buf.len() < 24 {
            return Ok(Vec::new());
        }
        parse_pcap(&buf).with_context(|| format!("parse capture of {}", self.what))
    }

    /// Waits until `done` holds for the frames captured so far (a positive
    /// control: the frame sent last along the path under test), then stops
    /// tcpdump and returns every frame. Frames sent before the control on
    /// the same path are in by then: no fixed settling time. An error
    /// naming `what` if `done` does not hold within `timeout`.
    pub fn stop_when(
        mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&[Frame]) -> bool,
    ) -> Result<Vec<Frame>> {
        let end = Instant::now() + timeout;
        loop {
            let frames = self.frames()?;
            if done(&frames) {
                break;
            }
            if Instant::now() >= end {
                let last = &frames[frames.len().saturating_sub(5)..];
                bail!(
                    "{}: {what} not captured within {timeout:?} ({} frames, the last: {last:?})",
                    self.what,
                    frames.len()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        self.terminate()
            .with_context(|| format!("stop {}", self.what))?;
        let buf = fs::read(&self.file)
            .with_context(|| format!("read {} of {}", self.file.display(), self.what))?;
        parse_pcap(&buf).with_context(|| format!("parse capture of {}", self.what))
    }

    /// Stop tcpdump (SIGINT) and return the captured frames, after a short
    /// settling time for frames still in flight. Where a frame must NOT
    /// arrive, prefer [`Capture::stop_when`] on a control frame.
    pub fn stop(mut self) -> Result<Vec<Frame>> {
        thread::sleep(SETTLE);
        self.terminate()
            .with_context(|| format!("stop {}", self.what))?;
        let buf = fs::read(&self.file)
            .with_context(|| format!("read {} of {}", self.file.display(), self.what))?;
        parse_pcap(&buf).with_context(|| format!("parse capture of {}", self.what))
    }

    fn terminate(&mut self) -> Result<()> {
        let Some(mut child) = self.child.take() else {
            return Ok(());
        };
        let pid = Pid::from_raw(child.id() as i32);
        let _ = kill(pid, Signal::SIGINT);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if child.try_wait()?.is_some() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        bail!("tcpdump ignored SIGINT: {}", self.stderr_text())
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.terminate();
        let _ = fs::remove_file(&self.file);
    }
}
