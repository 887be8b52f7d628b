//! The journal of host changes in flight. Before kvnet changes the host (a
//! gateway interface, a policy rule, a sysctl, programs on an interface)
//! it writes down how to undo that change; the state files the
//! daemon writes after each request close the journal. A daemon killed in
//! between (in `net add`, `port add`, `apply`) leaves the journal behind,
//! and the next daemon undoes what it lists before it adopts the state
//! files: a kill at any point converges on the last state written, and
//! nothing it half-built is left on the host.
use std::{
    path::{Path, PathBuf},
    sync::Mutex,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::switch::network::Restore;

pub const JOURNAL: &str = "journal.json";

/// One change to undo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Undo {
    /// An interface kvnet created (a gateway: its veth pair goes with it).
    Link { iface: String },
    /// A host setting kvnet changed, with its old value.
    Setting(Restore),
    /// kvnet's programs on an interface: its tc filters and XDP link.
    Programs { iface: String, ifindex: u32 },
    /// A routing table of kvnet's, emptied.
    Table { table: String },
}

impl std::fmt::Display for Undo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Undo::Link { iface } => write!(f, "interface {iface} removed"),
            Undo::Setting(r) => write!(f, "{} restored", r.describe()),
            Undo::Programs { iface, .. } => write!(f, "programs detached from {iface}"),
            Undo::Table { table } => write!(f, "routing table {table} flushed"),
        }
    }
}

struct Open {
    path: PathBuf,
    entries: Vec<Undo>,
    /// Test hook (`KVNET_ABORT_AT_JOURNAL=N`): the process aborts, as if
    /// killed, once the N-th change of its life is journaled and before it
    /// is made.
    abort_at: Option<usize>,
    recorded: usize,
}

static OPEN: Mutex<Option<Open>> = Mutex::new(None);

/// Journals into `<state_dir>/journal.json` from now on.
pub fn enable(state_dir: &Path) {
    let abort_at = std::env::var("KVNET_ABORT_AT_JOURNAL")
        .ok()
        .and_then(|v| v.parse().ok());
    *OPEN.lock().unwrap_or_else(|e| e.into_inner()) = Some(Open {
        path: state_dir.join(JOURNAL),
        entries: Vec::new(),
        abort_at,
        recorded: 0,
    });
}

/// Writes `undo` down before the change it undoes is made. Without a
/// journal (tests, `kvnet down`) it does nothing. A journal that cannot be
/// written refuses the change: it could not be undone after a kill.
pub fn record(undo: Undo) -> Result<()> {
    let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    let Some(j) = g.as_mut() else {
        return Ok(());
    };
    if j.entries.contains(&undo) {
        return Ok(());
    }
    j.entries.push(undo);
    write_whole(&j.path, &j.entries)
        .with_context(|| format!("writing the journal {}", j.path.display()))?;
    j.recorded += 1;
    if j.abort_at == Some(j.recorded) {
        eprintln!(
            "kvnet: KVNET_ABORT_AT_JOURNAL={}: aborting before the change",
            j.recorded
        );
        std::process::abort();
    }
    Ok(())
}

/// The state files now say what runs: nothing is in flight any more.
pub fn close() {
    let mut g = OPEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(j) = g.as_mut() {
        if !j.entries.is_empty() {
            j.entries.clear();
            if let Err(e) = std::fs::remove_file(&j.path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    eprintln!("kvnet: removing {}: {e}", j.path.display());
                }
            }
        }
    }
}

/// Written whole and renamed into place, not fsynced: what it undoes
/// (links, filters, rules, sysctls) does not outlive the host, and a
/// killed daemon's write is in the page cache for the next one.
fn write_whole(path: &Path, entries: &[Undo]) -> Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(entries)?)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// What a killed daemon left in flight, undone newest first, by the next
/// daemon (before it adopts anything) and by `kvnet down`. Returns what was
/// undone, for the log.
pub fn recover(state_dir: &Path, pin_dir: &Path) -> Result<Vec<String>> {
    let path = state_dir.join(JOURNAL);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let entries: Vec<Undo> = serde_json::from_str(&text)
        .with_context(|| format!("parsing {} (move it away to start anyway)", path.display()))?;
    let mut done = Vec::new();
    for u in entries.iter().rev() {
        undo(u, pin_dir);
        done.push(u.to_string());
    }
    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
    Ok(done)
}

fn undo(u: &Undo, pin_dir: &Path) {
    match u {
        Undo::Link { iface } => {
            if crate::netdev::ifindex(iface).is_ok() {
                crate::gateway::Gateway::remove(iface);
            }
        }
        Undo::Setting(r) => r.undo(),
        Undo::Table { table } => {
            let flushed = table
                .parse::<u32>()
                .map_err(anyhow::Error::from)
                .and_then(|t| Ok(crate::rtnl::route_flush_table(t)?));
            if let Err(e) = flushed {
                log::warn!("flushing routing table {table}: {e:#}");
            }
        }
        Undo::Programs { iface, ifindex } => {
            use aya::programs::{links::Link, tc::SchedClassifierLink, TcAttachType};
            // Only while the interface is the one journaled: an ifindex
            // reused by another interface is not ours.
            if crate::netdev::ifindex(iface).ok() == Some(*ifindex) {
                for t in [TcAttachType::Ingress, TcAttachType::Egress] {
                    if let Ok(l) = SchedClassifierLink::attached(
                        iface,
                        t,
                        crate::datapath::TC_PRIO,
                        crate::datapath::TC_HANDLE,
                        None,
                    ) {
                        let _ = l.detach();
                    }
                }
            }
            let _ = std::fs::remove_file(crate::datapath::xdp_link_pin(pin_dir, *ifindex));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_journal_survives_as_json_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("kvnet-journal-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let entries = vec![
            Undo::Link {
                iface: "kvnet-x".into(),
            },
            Undo::Setting(Restore::Rule {
                pref: "14003".into(),
            }),
            Undo::Programs {
                iface: "veth-absent".into(),
                ifindex: 999_999,
            },
        ];
        write_whole(&dir.join(JOURNAL), &entries).unwrap();
        let back: Vec<Undo> =
            serde_json::from_str(&std::fs::read_to_string(dir.join(JOURNAL)).unwrap()).unwrap();
        assert_eq!(back, entries);
        // Undone: only what exists on no host (this test runs in the
        // machine's own namespace and must change nothing there).
        let absent = &entries[1..];
        let absent = vec![
            Undo::Link {
                iface: "kvnet-absent0".into(),
            },
            absent[1].clone(),
        ];
        write_whole(&dir.join(JOURNAL), &absent).unwrap();
        let pins = dir.join("pins");
        let done = recover(&dir, &pins).unwrap();
        assert_eq!(done.len(), 2);
        assert!(done[0].contains("veth-absent"), "{done:?}");
        assert!(!dir.join(JOURNAL).exists());
        assert!(recover(&dir, &pins).unwrap().is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
