//! Background processes started inside a namespace and owned by a lab.
//!
//! Each child runs in its own process group so that stopping it also stops
//! whatever it forked (a `sh -c` pipeline, iperf3 workers, ...).
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, ChildStderr, ChildStdout, Command, ExitStatus};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::lab::netns_path;

/// Environment variable set on every lab child, so leftovers can be found
/// by suffix even after the namespaces are gone.
pub const LAB_ENV: &str = "KVNET_LAB";

/// How long a stopped process gets between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

struct Entry {
    child: Child,
    status: Option<ExitStatus>,
    label: String,
}

#[derive(Default)]
pub(crate) struct ProcTable {
    next: u64,
    entries: HashMap<u64, Entry>,
}

pub(crate) type Procs = Arc<Mutex<ProcTable>>;

fn lock(procs: &Procs) -> MutexGuard<'_, ProcTable> {
    // A panic while holding the lock must not stop teardown.
    procs.lock().unwrap_or_else(|e| e.into_inner())
}

/// Spawn `cmd` with its network namespace switched to `ns` (the same thing
/// `nsenter --net=/var/run/netns/NS` does, but keeping the caller's stdio
/// settings). The child leads a new process group.
pub fn spawn_in_ns(ns: &str, mut cmd: Command) -> Result<Child> {
    let path = netns_path(ns);
    let nsfile = File::open(&path).with_context(|| format!("open netns {}", path.display()))?;
    let fd = nsfile.as_raw_fd();
    cmd.process_group(0);
    // SAFETY: setns is a plain syscall, async-signal-safe after fork; the fd
    // is inherited from the parent and closed by exec (O_CLOEXEC).
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {} in netns {ns}", describe(&cmd)))?;
    drop(nsfile);
    Ok(child)
}

/// A command line for error messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// A background process owned by a [`crate::Lab`]. Dropping the handle
/// leaves the process running; the lab stops it on drop (or call
/// [`Proc::stop`]).
pub struct Proc {
    id: u64,
    pid: u32,
    procs: Procs,
    /// The child's stdout, if the command asked for a pipe.
    pub stdout: Option<ChildStdout>,
    /// The child's stderr, if the command asked for a pipe.
    pub stderr: Option<ChildStderr>,
}

impl Proc {
    pub(crate) fn register(procs: &Procs, mut child: Child, label: String) -> Proc {
        let pid = child.id();
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let mut t = lock(procs);
        t.next += 1;
        let id = t.next;
        t.entries.insert(
            id,
            Entry {
                child,
                status: None,
                label,
            },
        );
        Proc {
            id,
            pid,
            procs: procs.clone(),
            stdout,
            stderr,
        }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has ended (reaping it).
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        let mut t = lock(&self.procs);
        let e = t
            .entries
            .get_mut(&self.id)
            .ok_or_else(|| anyhow!("process {} is no longer tracked", self.pid))?;
        poll(e)
    }

    pub fn is_running(&self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Wait up to `timeout` for the process to end.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Send `sig` to the process group.
    pub fn signal(&self, sig: Signal) -> Result<()> {
        killpg(Pid::from_raw(self.pid as i32), sig)
            .with_context(|| format!("send {sig} to process group {}", self.pid))
    }

    /// SIGTERM, wait [`STOP_GRACE`], then SIGKILL; returns the exit status.
    pub fn stop(self) -> Result<ExitStatus> {
        let mut t = lock(&self.procs);
        let e = t
            .entries
            .get_mut(&self.id)
            .ok_or_else(|| anyhow!("process {} is no longer tracked", self.pid))?;
        let status = stop_entries(&mut [e]);
        t.entries.remove(&self.id);
        status
            .into_iter()
            .next()
            .flatten()
            .ok_or_else(|| anyhow!("process {} could not be reaped", self.pid))
    }
}

fn poll(e: &mut Entry) -> Result<Option<ExitStatus>> {
    if e.status.is_none() {
        e.status = e
            .child
            .try_wait()
            .with_context(|| format!("wait for {}", e.label))?;
    }
    Ok(e.status)
}

/// Stop several processes at once so the grace periods overlap.
fn stop_entries(entries: &mut [&mut Entry]) -> Vec<Option<ExitStatus>> {
    for e in entries.iter_mut() {
        // The group may outlive its leader, so signal it even if the leader
        // already exited (as long as we have not reaped it, the pgid is ours).
        if e.status.is_none() {
            let _ = killpg(Pid::from_raw(e.child.id() as i32), Signal::SIGTERM);
        }
    }
    let end = Instant::now() + STOP_GRACE;
    loop {
        let mut all = true;
        for e in entries.iter_mut() {
            if !matches!(poll(e), Ok(Some(_))) {
                all = false;
            }
        }
        if all || Instant::now() >= end {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    entries
        .iter_mut()
        .map(|e| {
            if e.status.is_none() {
                let _ = killpg(Pid::from_raw(e.child.id() as i32), Signal::SIGKILL);
                e.status = e.child.wait().ok();
            }
            e.status
        })
        .collect()
}

/// Stop every process still in the table (used by `Lab::drop`).
pub(crate) fn stop_all(procs: &Procs) {
    let mut t = lock(procs);
    let mut live: Vec<&mut Entry> = t.entries.values_mut().collect();
    let statuses = stop_entries(&mut live);
    for (e, s) in live.iter().zip(statuses) {
        if let Some(s) = s {
            if s.signal() == Some(libc::SIGKILL) {
                log::debug!("{} needed SIGKILL", e.label);
            }
        }
    }
    t.entries.clear();
}
