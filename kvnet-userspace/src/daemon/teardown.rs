//! `kvnet down` when no daemon answers: everything kvnet
//! installed is removed from what the state files and the kernel say, without
//! loading the datapath, so it also works for a datapath whose layout this
//! binary cannot read (a newer or an unknown one) or after a failed start.
use std::path::Path;

use anyhow::Result;
use aya::programs::{links::Link, tc::SchedClassifierLink, TcAttachType};

use crate::{
    daemon::state::{Saved, ADOPT, RUNNING},
    datapath::{TC_HANDLE, TC_PRIO},
    gateway::Gateway,
    switch::network::Restore,
};

/// What was removed, for the user.
#[derive(Debug, Default)]
pub struct Removed {
    pub filters: Vec<String>,
    pub gateways: Vec<String>,
    pub host_settings: usize,
    pub pins: bool,
}

pub fn down(pin_dir: &Path, state_dir: &Path) -> Result<Removed> {
    let mut removed = Removed::default();
    // What a killed daemon had begun is not in the state files: undo it.
    if let Ok(undone) = crate::switch::journal::recover(state_dir, pin_dir) {
        removed.host_settings += undone.len();
    }
    // kvnet's filters, wherever they are in this network namespace: they sit
    // at kvnet's own priority and handle.
    let ifaces = crate::netdev::interfaces();
    for iface in &ifaces {
        for t in [TcAttachType::Ingress, TcAttachType::Egress] {
            let gone = SchedClassifierLink::attached(iface, t, TC_PRIO, TC_HANDLE, None)
                .ok()
                .is_some_and(|l| l.detach().is_ok());
            if gone && !removed.filters.contains(iface) {
                removed.filters.push(iface.clone());
            }
        }
    }
    // Pins: programs, maps and XDP links (a link goes with its last pin).
    if pin_dir.exists() {
        std::fs::remove_dir_all(pin_dir)
            .map_err(|e| anyhow::anyhow!("removing {}: {e}", pin_dir.display()))?;
        removed.pins = true;
    }
    // Gateway interfaces named by the running state, never guessed.
    for g in gateways(&state_dir.join(RUNNING)) {
        if crate::netdev::ifindex(&g).is_ok() {
            Gateway::remove(&g);
            removed.gateways.push(g);
        }
    }
    // Host settings, restored as the daemon would: each network's in
    // reverse, then the routed uplinks'.
    if let Some(saved) = std::fs::read_to_string(state_dir.join(ADOPT))
        .ok()
        .and_then(|t| serde_json::from_str::<Saved>(&t).ok())
    {
        let all: Vec<&Restore> = saved
            .nets
            .values()
            .flat_map(|n| n.restore.iter().rev())
            .chain(saved.routed_uplinks.values().flatten())
            .collect();
        for r in all {
            r.undo();
            removed.host_settings += 1;
        }
        // Uplink groups last: the networks' settings may name them.
        for (name, g) in &saved.uplink_groups {
            g.undo(name);
            removed.host_settings += 1;
        }
    }
    crate::daemon::state::remove(state_dir);
    Ok(removed)
}

/// The gateway interfaces of the networks in a running-state file, read
/// leniently (a newer kvnet may have written keys this one does not know).
fn gateways(running: &Path) -> Vec<String> {
    let Ok(text) = std::fs::read_to_string(running) else {
        return Vec::new();
    };
    let Ok(doc) = text.parse::<toml::Table>() else {
        return Vec::new();
    };
    let Some(nets) = doc.get("networks").and_then(|n| n.as_table()) else {
        return Vec::new();
    };
    nets.iter()
        .filter(|(_, s)| s.get("gateway").is_some())
        .filter_map(
            |(name, s)| match s.get("gateway_iface").and_then(|g| g.as_str()) {
                Some(g) => Some(g.to_string()),
                None => Gateway::default_name(name).ok(),
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateways_come_from_the_running_state_only() {
        let dir = std::env::temp_dir().join(format!("kvnet-teardown-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("running.toml");
        std::fs::write(
            &f,
            "[networks.default]\nmode = \"nat\"\ngateway = \"192.168.122.1/24\"\ngateway_iface = \"virbr0\"\n\
             [networks.lan]\nmode = \"host-only\"\ngateway = \"10.1.0.1/24\"\nfuture_key = 1\n\
             [networks.iso]\nmode = \"isolated\"\n",
        )
        .unwrap();
        let mut g = gateways(&f);
        g.sort();
        assert_eq!(
            g,
            vec![Gateway::default_name("lan").unwrap(), "virbr0".to_string()]
        );
        assert!(gateways(&dir.join("absent.toml")).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
