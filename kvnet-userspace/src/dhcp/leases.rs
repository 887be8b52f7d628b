//! The lease database: which MAC holds which address until when, kept in a
//! JSON file in the state folder (written atomically: temp file, fsync,
//! rename, fsync of the folder) and reloaded on start.
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

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

pub struct LeaseDb {
    path: PathBuf,
    range: (u32, u32),
    net: (Ipv4Addr, u8),
    statics: Vec<super::StaticHost>,
    entries: BTreeMap<Ipv4Addr, Entry>,
}

impl LeaseDb {
    /// Open (and load, if present) the lease file in `state_dir`.
    pub fn open(cfg: &DhcpConfig, state_dir: &Path, now: u64) -> Result<LeaseDb> {
        fs::create_dir_all(state_dir)
            .with_context(|| format!("create DHCP state folder {}", state_dir.display()))?;
        let path = state_dir.join(LEASE_FILE);
        let mut db = LeaseDb {
            path,
            range: (u32::from(cfg.range.0), u32::from(cfg.range.1)),
            net: (cfg.server_ip, cfg.prefix),
            statics: cfg.hosts.clone(),
            entries: BTreeMap::new(),
        };
        match fs::read(&db.path) {
            Ok(bytes) => {
                let f: FileFormat = serde_json::from_slice(&bytes)
                    .with_context(|| format!("parse lease file {}", db.path.display()))?;
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
            Err(e) => {
                return Err(e).with_context(|| format!("read lease file {}", db.path.display()))
            }
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

    /// Bind `ip` to `mac` until `expires_unix` and persist.
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

    /// Write the bound and declined entries: temp file, fsync, rename,
    /// fsync the folder.
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
        write_atomic(&self.path, &serde_json::to_vec_pretty(&f)?)
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
}
