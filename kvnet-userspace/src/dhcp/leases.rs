//! The lease database: which MAC holds which address until when, kept in a
//! JSON file in the state folder (written atomically: temp file, fsync,
//! rename, fsync of the folder) and reloaded on start.
//!
//! The file is written by a [`Writer`] thread, off the serving task: each
//! change hands it a snapshot of the whole database, and it writes only
//! the newest one, so changes made while a write is under way share the
//! next write and its fsyncs (group commit). A [`Ticket`] says when a
//! change is on disk; the server sends an ACK only then.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::config::{in_subnet, DhcpConfig};
use crate::mac::Mac;

/// How long an offered address is held for the client that was offered it.
pub const OFFER_HOLD_SECS: u64 = 30;
/// How long a DECLINEd address stays out of the pool.
pub const DECLINE_QUARANTINE_SECS: u64 = 600;
pub const LEASE_FILE: &str = "leases.json";

/// A lease as `kvnet dhcp leases` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseInfo {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub hostname: Option<String>,
    pub expires_unix: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Offered, not yet requested (not persisted).
    Offered,
    Bound,
    /// Declined by a client (someone else uses it): out of the pool until
    /// `expires_unix`.
    Declined,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Entry {
    pub mac: Mac,
    pub hostname: Option<String>,
    pub expires_unix: u64,
    pub state: State,
}

#[derive(Serialize, Deserialize)]
struct FileFormat {
    version: u32,
    leases: BTreeMap<Ipv4Addr, Entry>,
}

/// Where the writer puts a snapshot (the lease file; a test's stand-in).
pub type Sink = Box<dyn FnMut(&[u8]) -> Result<()> + Send>;

/// A failed write is tried again after this, doubling up to
/// [`RETRY_MAX`], unless a newer snapshot comes first.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// What the writer has done: snapshots are numbered in the order they
/// were handed over, and each contains all changes before it.
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Every snapshot up to this one was written or failed.
    attempted: u64,
    /// Every change up to this snapshot is on disk.
    written: u64,
    /// Why the last write failed.
    error: Option<Arc<str>>,
}

#[derive(Default)]
struct Queue {
    /// The number of the newest snapshot handed over.
    submitted: u64,
    /// The newest snapshot not yet taken by the writer.
    next: Option<(u64, Vec<u8>)>,
    closing: bool,
}

struct Shared {
    queue: Mutex<Queue>,
    wake: Condvar,
    /// Writes of the file (each one fsync of it and one of its folder).
    writes: AtomicU64,
    failures: AtomicU64,
}

fn lock_queue(s: &Shared) -> MutexGuard<'_, Queue> {
    s.queue.lock().unwrap_or_else(|e| e.into_inner())
}

/// The lease file's writer thread. Dropping it writes what is pending and
/// waits for the thread.
struct Writer {
    shared: Arc<Shared>,
    done: watch::Receiver<Progress>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Waits until a change is durable.
#[derive(Clone)]
pub struct Ticket {
    snapshot: u64,
    done: watch::Receiver<Progress>,
}

impl Ticket {
    /// Ok once the snapshot with the change (or a newer one) is on disk;
    /// an error when its write failed.
    pub async fn durable(mut self) -> Result<()> {
        let want = self.snapshot;
        let p = self
            .done
            .wait_for(|p| p.attempted >= want || p.written >= want)
            .await
            .map_err(|_| anyhow!("the lease writer ended"))?
            .clone();
        if p.written >= want {
            return Ok(());
        }
        Err(anyhow!(
            "{}",
            p.error.as_deref().unwrap_or("lease file not written")
        ))
    }
}

impl Writer {
    fn spawn(name: &str, sink: Sink) -> Result<Writer> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            writes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
        });
        let (tx, done) = watch::channel(Progress::default());
        let s = shared.clone();
        let who = name.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("kvnet-leases-{name}"))
            .spawn(move || write_loop(&who, &s, sink, &tx))
            .context("start the lease writer thread")?;
        Ok(Writer {
            shared,
            done,
            thread: Some(thread),
        })
    }

    /// Hands over a snapshot; any older one not yet taken is dropped.
    fn submit(&self, data: Vec<u8>) -> u64 {
        let mut q = lock_queue(&self.shared);
        q.submitted += 1;
        let n = q.submitted;
        q.next = Some((n, data));
        self.shared.wake.notify_one();
        n
    }

    fn ticket(&self) -> Ticket {
        Ticket {
            snapshot: lock_queue(&self.shared).submitted,
            done: self.done.clone(),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        lock_queue(&self.shared).closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn write_loop(who: &str, s: &Shared, mut sink: Sink, done: &watch::Sender<Progress>) {
    let mut retry = RETRY_FIRST;
    let mut failed: Option<(u64, Vec<u8>)> = None;
    let mut failed_before = false;
    let mut last_try = false;
    loop {
        let (n, data) = {
            let mut q = lock_queue(s);
            loop {
                if let Some(x) = q.next.take() {
                    // A newer snapshot holds everything a failed one had.
                    failed = None;
                    break x;
                }
                if let Some(x) = failed.take() {
                    if q.closing {
                        // One last try before the thread ends.
                        if last_try {
                            return;
                        }
                        last_try = true;
                        break x;
                    }
                    let (g, waited) = s
                        .wake
                        .wait_timeout(q, retry)
                        .unwrap_or_else(|e| e.into_inner());
                    q = g;
                    if waited.timed_out() && q.next.is_none() {
                        retry = (retry * 2).min(RETRY_MAX);
                        break x;
                    }
                    failed = Some(x);
                    continue;
                }
                if q.closing {
                    return;
                }
                q = s.wake.wait(q).unwrap_or_else(|e| e.into_inner());
            }
        };
        let r = sink(&data);
        s.writes.fetch_add(1, Ordering::Relaxed);
        match r {
            Ok(()) => {
                if failed_before {
                    log::info!("dhcp {who}: lease file written again");
                }
                failed_before = false;
                retry = RETRY_FIRST;
                done.send_modify(|p| {
                    p.attempted = p.attempted.max(n);
                    p.written = p.written.max(n);
                    p.error = None;
                });
            }
            Err(e) => {
                s.failures.fetch_add(1, Ordering::Relaxed);
                let why = format!("{e:#}");
                log::error!("dhcp {who}: writing the lease file: {why}; trying again in {retry:?}");
                done.send_modify(|p| {
                    p.attempted = p.attempted.max(n);
                    p.error = Some(why.into());
                });
                failed = Some((n, data));
                failed_before = true;
            }
        }
    }
}

pub struct LeaseDb {
    range: (u32, u32),
    net: (Ipv4Addr, u8),
    statics: Vec<super::StaticHost>,
    entries: BTreeMap<Ipv4Addr, Entry>,
    writer: Writer,
}

impl LeaseDb {
    /// Open (and load, if present) the lease file in `state_dir`; changes
    /// are written to it by a writer thread.
    pub fn open(cfg: &DhcpConfig, state_dir: &Path, now: u64) -> Result<LeaseDb> {
        let path = state_dir.join(LEASE_FILE);
        let p = path.clone();
        Self::open_with(cfg, state_dir, now, Box::new(move |d| write_atomic(&p, d)))
    }

    /// [`LeaseDb::open`] with the snapshots going to `sink`.
    pub fn open_with(cfg: &DhcpConfig, state_dir: &Path, now: u64, sink: Sink) -> Result<LeaseDb> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("create DHCP state folder {}", state_dir.display()))?;
        let path = state_dir.join(LEASE_FILE);
        let mut db = LeaseDb {
            range: (u32::from(cfg.range.0), u32::from(cfg.range.1)),
            net: (cfg.server_ip, cfg.prefix),
            statics: cfg.hosts.clone(),
            entries: BTreeMap::new(),
            writer: Writer::spawn(&cfg.iface, sink)?,
        };
        match fs::read(&path) {
            Ok(bytes) => {
                let f: FileFormat = serde_json::from_slice(&bytes)
                    .with_context(|| format!("parse lease file {}", path.display()))?;
                for (ip, e) in f.leases {
                    // Drop what no longer fits the config (range or static
                    // hosts changed while we were down).
                    if e.state == State::Offered || !db.fits(&e.mac, ip) || e.expires_unix <= now {
                        continue;
                    }
                    db.entries.insert(ip, e);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("read lease file {}", path.display())),
        }
        Ok(db)
    }

    fn in_range(&self, ip: Ipv4Addr) -> bool {
        (self.range.0..=self.range.1).contains(&u32::from(ip))
    }

    fn static_of_mac(&self, mac: &Mac) -> Option<&super::StaticHost> {
        self.statics.iter().find(|h| h.mac == *mac)
    }

    fn static_of_ip(&self, ip: Ipv4Addr) -> Option<&super::StaticHost> {
        self.statics.iter().find(|h| h.ip == ip)
    }

    /// May `mac` hold `ip` as far as the configuration goes (ignoring other
    /// clients' leases)?
    fn fits(&self, mac: &Mac, ip: Ipv4Addr) -> bool {
        if !in_subnet(ip, self.net.0, self.net.1) {
            return false;
        }
        match (self.static_of_mac(mac), self.static_of_ip(ip)) {
            (Some(h), _) => h.ip == ip,
            (None, Some(_)) => false,
            (None, None) => self.in_range(ip),
        }
    }

    /// Is `ip` held by someone other than `mac` (or quarantined) at `now`?
    fn taken_by_other(&self, mac: &Mac, ip: Ipv4Addr, now: u64) -> bool {
        self.entries
            .get(&ip)
            .is_some_and(|e| e.expires_unix > now && (e.mac != *mac || e.state == State::Declined))
    }

    /// Can `mac` be given `ip` now (REQUEST, renewal, INIT-REBOOT)?
    pub fn can_serve(&self, mac: &Mac, ip: Ipv4Addr, now: u64) -> bool {
        self.fits(mac, ip) && !self.taken_by_other(mac, ip, now)
    }

    /// The address to offer `mac`: its static one, the one it holds, the
    /// one it asks for if free, else the lowest free one of the range
    /// (never-used before expired ones). None when the pool is exhausted.
    pub fn choose(&self, mac: &Mac, requested: Option<Ipv4Addr>, now: u64) -> Option<Ipv4Addr> {
        if let Some(h) = self.static_of_mac(mac) {
            return (!self.taken_by_other(mac, h.ip, now)).then_some(h.ip);
        }
        if let Some((ip, _)) = self
            .entries
            .iter()
            .find(|(ip, e)| e.mac == *mac && e.state != State::Declined && self.fits(mac, **ip))
        {
            return Some(*ip);
        }
        if let Some(r) = requested.filter(|r| self.can_serve(mac, *r, now)) {
            return Some(r);
        }
        let mut expired = None;
        for n in self.range.0..=self.range.1 {
            let ip = Ipv4Addr::from(n);
            if self.static_of_ip(ip).is_some() {
                continue;
            }
            match self.entries.get(&ip) {
                None => return Some(ip),
                Some(e) if e.expires_unix <= now && expired.is_none() => expired = Some(ip),
                Some(_) => {}
            }
        }
        expired
    }

    /// Drop `mac`'s other entries so it holds at most one address.
    fn forget_mac(&mut self, mac: &Mac, keep: Ipv4Addr) {
        self.entries
            .retain(|ip, e| *ip == keep || e.mac != *mac || e.state == State::Declined);
    }

    pub fn offer(&mut self, mac: Mac, ip: Ipv4Addr, now: u64) {
        let hold = now + OFFER_HOLD_SECS;
        match self.entries.get_mut(&ip) {
            // A live lease of this client stays as it is.
            Some(e) if e.mac == mac && e.state == State::Bound && e.expires_unix > hold => {}
            _ => {
                self.forget_mac(&mac, ip);
                self.entries.insert(
                    ip,
                    Entry {
                        mac,
                        hostname: None,
                        expires_unix: hold,
                        state: State::Offered,
                    },
                );
            }
        }
    }

    /// Bind `ip` to `mac` until `expires_unix` and persist (see
    /// [`LeaseDb::ticket`]).
    pub fn bind(
        &mut self,
        mac: Mac,
        ip: Ipv4Addr,
        hostname: Option<String>,
        expires_unix: u64,
    ) -> Result<()> {
        self.forget_mac(&mac, ip);
        self.entries.insert(
            ip,
            Entry {
                mac,
                hostname,
                expires_unix,
                state: State::Bound,
            },
        );
        self.save()
    }

    /// RELEASE: `mac` gives `ip` back. True if it held it.
    pub fn release(&mut self, mac: &Mac, ip: Ipv4Addr) -> Result<bool> {
        match self.entries.get(&ip) {
            Some(e) if e.mac == *mac && e.state != State::Declined => {
                self.entries.remove(&ip);
                self.save()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// DECLINE: `ip` is in use by someone else; keep it out of the pool.
    pub fn decline(&mut self, mac: &Mac, ip: Ipv4Addr, now: u64) -> Result<bool> {
        match self.entries.get(&ip) {
            Some(e) if e.mac == *mac && e.state != State::Declined => {
                self.entries.insert(
                    ip,
                    Entry {
                        mac: Mac([0; 6]),
                        hostname: None,
                        expires_unix: now + DECLINE_QUARANTINE_SECS,
                        state: State::Declined,
                    },
                );
                self.save()?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    /// Remove expired entries; persists if a bound or declined one went.
    pub fn reclaim(&mut self, now: u64) -> Result<usize> {
        let before = self.entries.len();
        let mut persisted = false;
        self.entries.retain(|_, e| {
            let keep = e.expires_unix > now;
            if !keep && e.state != State::Offered {
                persisted = true;
            }
            keep
        });
        if persisted {
            self.save()?;
        }
        Ok(before - self.entries.len())
    }

    /// Bound leases, lowest address first.
    pub fn leases(&self) -> Vec<LeaseInfo> {
        self.entries
            .iter()
            .filter(|(_, e)| e.state == State::Bound)
            .map(|(ip, e)| LeaseInfo {
                mac: e.mac,
                ip: *ip,
                hostname: e.hostname.clone(),
                expires_unix: e.expires_unix,
            })
            .collect()
    }

    /// Waits until every change so far is on disk.
    pub fn ticket(&self) -> Ticket {
        self.writer.ticket()
    }

    /// (file writes, failed writes) so far.
    pub fn write_counts(&self) -> (u64, u64) {
        let s = &self.writer.shared;
        (
            s.writes.load(Ordering::Relaxed),
            s.failures.load(Ordering::Relaxed),
        )
    }

    /// Hand the bound and declined entries to the writer (temp file,
    /// fsync, rename, fsync the folder); [`LeaseDb::ticket`] waits for it.
    pub fn save(&self) -> Result<()> {
        let f = FileFormat {
            version: 1,
            leases: self
                .entries
                .iter()
                .filter(|(_, e)| e.state != State::Offered)
                .map(|(ip, e)| (*ip, e.clone()))
                .collect(),
        };
        self.writer.submit(serde_json::to_vec_pretty(&f)?);
        Ok(())
    }
}

/// Replace `path` with `data` so a crash leaves the old or the new file,
/// never a torn one.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f = File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
        f.write_all(data)
            .with_context(|| format!("write {}", tmp.display()))?;
        f.sync_all()
            .with_context(|| format!("fsync {}", tmp.display()))?;
        fs::rename(&tmp, path)
            .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync folder {}", dir.display()))?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Read the leases of a state folder without a running server (for a CLI).
pub fn read_leases(state_dir: &Path) -> Result<Vec<LeaseInfo>> {
    let path = state_dir.join(LEASE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read lease file {}", path.display())),
    };
    let f: FileFormat = serde_json::from_slice(&bytes)
        .with_context(|| format!("parse lease file {}", path.display()))?;
    Ok(f.leases
        .into_iter()
        .filter(|(_, e)| e.state == State::Bound)
        .map(|(ip, e)| LeaseInfo {
            mac: e.mac,
            ip,
            hostname: e.hostname,
            expires_unix: e.expires_unix,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dhcp::config::parse_host;
    use std::path::PathBuf;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }
    fn mac(n: u8) -> Mac {
        Mac([0x52, 0x54, 0, 0, 0, n])
    }
    fn cfg() -> DhcpConfig {
        let mut c = DhcpConfig::new(
            "br0",
            ip("10.5.0.1"),
            24,
            (ip("10.5.0.10"), ip("10.5.0.12")),
        );
        c.hosts
            .push(parse_host("52:54:00:00:00:63,10.5.0.99,fixed").unwrap());
        c.hosts
            .push(parse_host("52:54:00:00:00:64,10.5.0.11,inrange").unwrap());
        c
    }
    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("kvnet-dhcp-unit-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn dhcp_leases_pool_static_release_decline() {
        let dir = tmpdir("pool");
        let mut db = LeaseDb::open(&cfg(), &dir, 1000).unwrap();
        // Static hosts get their address; the in-range static one is not
        // in the pool.
        assert_eq!(db.choose(&mac(0x63), None, 1000), Some(ip("10.5.0.99")));
        assert_eq!(db.choose(&mac(1), None, 1000), Some(ip("10.5.0.10")));
        db.bind(mac(1), ip("10.5.0.10"), Some("a".into()), 2000)
            .unwrap();
        assert_eq!(db.choose(&mac(1), None, 1000), Some(ip("10.5.0.10")));
        assert_eq!(
            db.choose(&mac(2), Some(ip("10.5.0.10")), 1000),
            Some(ip("10.5.0.12"))
        );
        assert!(!db.can_serve(&mac(2), ip("10.5.0.10"), 1000));
        assert!(
            !db.can_serve(&mac(2), ip("10.5.0.11"), 1000),
            "static of another"
        );
        assert!(
            !db.can_serve(&mac(2), ip("10.5.0.50"), 1000),
            "out of range"
        );
        db.offer(mac(2), ip("10.5.0.12"), 1000);
        // Pool exhausted for a third client while the offer is held.
        assert_eq!(db.choose(&mac(3), None, 1000), None);
        // ... and free again once the offer lapses.
        assert_eq!(
            db.choose(&mac(3), None, 1000 + OFFER_HOLD_SECS + 1),
            Some(ip("10.5.0.12"))
        );
        db.bind(mac(2), ip("10.5.0.12"), None, 2000).unwrap();
        assert_eq!(db.choose(&mac(3), None, 1500), None);
        assert!(
            !db.release(&mac(3), ip("10.5.0.12")).unwrap(),
            "not its lease"
        );
        assert!(db.release(&mac(2), ip("10.5.0.12")).unwrap());
        assert_eq!(db.choose(&mac(3), None, 1500), Some(ip("10.5.0.12")));
        // DECLINE quarantines.
        db.bind(mac(3), ip("10.5.0.12"), None, 2000).unwrap();
        assert!(db.decline(&mac(3), ip("10.5.0.12"), 1500).unwrap());
        assert_eq!(db.choose(&mac(3), None, 1500), None);
        assert!(!db.can_serve(&mac(3), ip("10.5.0.12"), 1500));
        assert!(db
            .choose(&mac(3), None, 1500 + DECLINE_QUARANTINE_SECS + 1)
            .is_some());
        // Expiry reclaims.
        assert_eq!(db.reclaim(5000).unwrap(), 2);
        assert!(db.leases().is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn dhcp_leases_persist_and_reload() {
        let dir = tmpdir("persist");
        let mut db = LeaseDb::open(&cfg(), &dir, 1000).unwrap();
        db.bind(mac(1), ip("10.5.0.10"), Some("g1".into()), 5000)
            .unwrap();
        db.bind(mac(2), ip("10.5.0.12"), None, 1500).unwrap();
        db.offer(mac(3), ip("10.5.0.11"), 1000);
        drop(db);
        assert!(!dir
            .join(format!(".{LEASE_FILE}.tmp{}", std::process::id()))
            .exists());
        // Reloaded at 2000: the expired lease is gone, the offer too.
        let db = LeaseDb::open(&cfg(), &dir, 2000).unwrap();
        let l = db.leases();
        assert_eq!(l.len(), 1);
        assert_eq!(
            (l[0].mac, l[0].ip, l[0].hostname.as_deref()),
            (mac(1), ip("10.5.0.10"), Some("g1"))
        );
        assert_eq!(read_leases(&dir).unwrap().len(), 2);
        // A changed range drops leases outside it.
        let mut c = cfg();
        c.range = (ip("10.5.0.20"), ip("10.5.0.30"));
        assert!(LeaseDb::open(&c, &dir, 2000).unwrap().leases().is_empty());
        // A corrupt file is an error naming it.
        fs::write(dir.join(LEASE_FILE), b"{nope").unwrap();
        let e = format!("{:#}", LeaseDb::open(&cfg(), &dir, 2000).err().unwrap());
        assert!(
            e.contains("parse lease file") && e.contains(LEASE_FILE),
            "{e}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// A sink writing the real file, whose first write waits until the
    /// test lets it go (says when it started on `started`).
    fn gated_sink(
        path: PathBuf,
    ) -> (
        Sink,
        std::sync::mpsc::Receiver<()>,
        std::sync::mpsc::Sender<()>,
    ) {
        let (started_tx, started) = std::sync::mpsc::channel();
        let (go, go_rx) = std::sync::mpsc::channel::<()>();
        let mut first = true;
        let sink: Sink = Box::new(move |d| {
            if std::mem::take(&mut first) {
                let _ = started_tx.send(());
                let _ = go_rx.recv();
            }
            write_atomic(&path, d)
        });
        (sink, started, go)
    }

    #[tokio::test]
    async fn dhcp_lease_writes_are_grouped_and_durable_before_ack() {
        let dir = tmpdir("group");
        let mut c = cfg();
        c.range = (ip("10.5.0.100"), ip("10.5.0.200"));
        let (sink, started, go) = gated_sink(dir.join(LEASE_FILE));
        let mut db = LeaseDb::open_with(&c, &dir, 1000, sink).unwrap();
        // The first lease's write starts and is held up...
        db.bind(mac(1), ip("10.5.0.100"), None, 5000).unwrap();
        let mut tickets = vec![db.ticket()];
        started.recv().unwrap();
        // ...while 49 more clients are ACKed.
        const N: u8 = 50;
        for n in 2..=N {
            db.bind(mac(n), ip(&format!("10.5.0.{}", 99 + n)), None, 5000)
                .unwrap();
            tickets.push(db.ticket());
        }
        // None of them may be answered yet: nothing is on disk.
        let early = tokio::time::timeout(Duration::from_millis(100), tickets[0].clone().durable());
        assert!(early.await.is_err(), "durable before its write ended");
        assert!(read_leases(&dir).unwrap().is_empty());
        go.send(()).unwrap();
        for t in tickets {
            tokio::time::timeout(Duration::from_secs(10), t.durable())
                .await
                .expect("written")
                .unwrap();
        }
        // Every acknowledged lease is on disk, and 50 ACKs cost 2 writes.
        assert_eq!(read_leases(&dir).unwrap().len(), usize::from(N));
        assert_eq!(db.write_counts(), (2, 0));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn dhcp_concurrent_acks_share_fsyncs_of_the_real_file() {
        let dir = tmpdir("concurrent");
        let mut c = cfg();
        c.range = (ip("10.5.0.100"), ip("10.5.0.250"));
        let db = Arc::new(Mutex::new(LeaseDb::open(&c, &dir, 1000).unwrap()));
        // 100 requests at once, each waiting for its lease on disk like
        // the server's ACK does.
        const N: u8 = 100;
        let tasks: Vec<_> = (1..=N)
            .map(|n| {
                let (db, dir) = (db.clone(), dir.clone());
                tokio::spawn(async move {
                    let t = {
                        let mut db = db.lock().unwrap();
                        db.bind(mac(n), ip(&format!("10.5.0.{}", 99 + n)), None, 5000)
                            .unwrap();
                        db.ticket()
                    };
                    t.durable().await.unwrap();
                    // Acknowledged: on disk.
                    let l = read_leases(&dir).unwrap();
                    assert!(l.iter().any(|l| l.mac == mac(n)), "{n}: {l:?}");
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        let (writes, failures) = db.lock().unwrap().write_counts();
        assert_eq!(failures, 0);
        assert!(writes >= 1 && writes < u64::from(N), "{writes} writes");
        assert_eq!(read_leases(&dir).unwrap().len(), usize::from(N));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn dhcp_failed_lease_write_is_reported_and_retried() {
        let dir = tmpdir("fail");
        let fail = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let f = fail.clone();
        let path = dir.join(LEASE_FILE);
        let sink: Sink = Box::new(move |d| {
            if f.load(Ordering::SeqCst) {
                anyhow::bail!("disk full");
            }
            write_atomic(&path, d)
        });
        let mut db = LeaseDb::open_with(&cfg(), &dir, 1000, sink).unwrap();
        db.bind(mac(1), ip("10.5.0.10"), None, 5000).unwrap();
        let e = db.ticket().durable().await.unwrap_err();
        assert!(e.to_string().contains("disk full"), "{e}");
        // The writer tries again by itself once the disk is back.
        fail.store(false, Ordering::SeqCst);
        let end = std::time::Instant::now() + Duration::from_secs(10);
        while read_leases(&dir).unwrap().is_empty() {
            assert!(std::time::Instant::now() < end, "not retried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(db.write_counts().1 >= 1);
        drop(db);
        fs::remove_dir_all(&dir).unwrap();
    }
}
