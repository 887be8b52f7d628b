//! Port security bindings the daemon keeps: snooped DHCP addresses swept
//! when their lease goes, and bindings seeded on an upgrade.
use std::collections::BTreeSet;

use anyhow::{Context, Result};
use kvnet_common::{PortConfig, PORT_IPS, PORT_MACS};

/// How long a snooped address stays bound once its lease expired: clients
/// that renew late (busybox clamps short leases) keep working. A released
/// address, one leased to another MAC, or one only offered goes at once.
const BINDING_GRACE_SECS: u64 = 300;

/// What the binding sweep last saw of a snooped address's lease.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseSeen {
    /// The lease's expiry when last seen in the table (0: never seen).
    pub expires: u64,
}

/// Whether a snooped binding stays, from its lease as the server has it
/// now (`Some(true)`: the port's own MAC, `Some(false)`: another MAC).
fn binding_stays(lease: Option<(bool, u64)>, seen: &mut LeaseSeen, now: u64) -> bool {
    match lease {
        Some((true, expires)) => {
            seen.expires = expires;
            true
        }
        // The address went to another guest.
        Some((false, _)) => false,
        // Never leased (only offered), or gone before it expired: released.
        None if seen.expires == 0 || seen.expires > now => false,
        None => now.saturating_sub(seen.expires) <= BINDING_GRACE_SECS,
    }
}

impl super::Switch {
    /// Forgets addresses snooped from DHCP replies that no longer belong
    /// to the guest (released, leased to another MAC, or expired past a
    /// grace) on networks where kvnet serves DHCP. The port entry is read
    /// before the leases: the server records a lease before its ACK
    /// reaches the datapath, so a binding snooped meanwhile has its lease.
    pub fn sweep_bindings(&mut self) -> Result<usize> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let guests: Vec<(u32, String)> = self
            .ports
            .values()
            .filter(|p| p.role == super::network::PortRole::Guest && p.security.guarded)
            .map(|p| (p.ifindex, p.net.clone()))
            .collect();
        let mut forgotten = 0;
        let mut still: BTreeSet<(u32, u32)> = BTreeSet::new();
        for (ifindex, net) in guests {
            let Ok(pc) = self.dp.ports()?.get(&ifindex, 0) else {
                continue;
            };
            let fixed = pc.ip_fixed as usize;
            if pc.bound_ips().len() <= fixed {
                continue;
            }
            let Some(leases) = self.services.leases(&net) else {
                continue;
            };
            let owned = pc.owned_macs();
            let mut kept: Vec<u32> = pc.bound_ips()[..fixed].to_vec();
            for ip in &pc.bound_ips()[fixed..] {
                let lease = leases
                    .iter()
                    .find(|l| u32::from(l.ip).to_be() == *ip)
                    .map(|l| (owned.contains(&l.mac.0), l.expires_unix));
                let seen = self.binding_leases.entry((ifindex, *ip)).or_default();
                if binding_stays(lease, seen, now) {
                    kept.push(*ip);
                    still.insert((ifindex, *ip));
                }
            }
            if kept.len() == pc.bound_ips().len() {
                continue;
            }
            forgotten += pc.bound_ips().len() - kept.len();
            let mut next = pc;
            next.ips = [0; PORT_IPS];
            next.ips[..kept.len()].copy_from_slice(&kept);
            (next.ip_count, next.ip_next) = (kept.len() as u8, kept.len() as u8);
            // A binding snooped between our read and this write would be
            // lost until the guest's next renewal; the window is the few
            // microseconds since the read.
            self.dp
                .ports()?
                .insert(ifindex, next, 0)
                .context("writing the port map")?;
        }
        self.binding_leases.retain(|k, _| still.contains(k));
        Ok(forgotten)
    }
}

impl super::Switch {
    /// Port security bindings for a guest port carried over from a datapath
    /// that had none (an upgrade from layout 1): the MACs the FDB learned
    /// on the port, most recent first, and the unexpired DHCP leases of
    /// those MACs, so guests keep talking through the upgrade. `fill` then
    /// keeps what the port's limits allow.
    pub(crate) fn seed_bindings(
        &mut self,
        net: &str,
        net_id: u32,
        ifindex: u32,
        mut old: PortConfig,
    ) -> PortConfig {
        if old.mac_count > 0 {
            return old;
        }
        let mut learned: Vec<(u64, [u8; 6])> = self
            .dp
            .fdb()
            .map(|f| {
                f.iter()
                    .filter_map(|r| r.ok())
                    .filter(|(k, e)| {
                        k.net_id == net_id
                            && k.vid != kvnet_common::FDB_VID_ANY
                            && e.ifindex == ifindex
                            && e.flags & kvnet_common::FDB_F_STATIC == 0
                    })
                    .map(|(k, e)| (e.last_seen_ns, k.mac))
                    .collect()
            })
            .unwrap_or_default();
        learned.sort_by(|a, b| b.0.cmp(&a.0));
        learned.dedup_by_key(|(_, m)| *m);
        let macs: Vec<[u8; 6]> = learned
            .into_iter()
            .map(|(_, m)| m)
            .take(PORT_MACS)
            .collect();
        old.macs[..macs.len()].copy_from_slice(&macs);
        old.mac_count = macs.len() as u8;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let ips: Vec<u32> = self
            .services
            .leases(net)
            .unwrap_or_default()
            .iter()
            .filter(|l| macs.contains(&l.mac.0) && l.expires_unix > now)
            .map(|l| u32::from(l.ip).to_be())
            .take(PORT_IPS)
            .collect();
        old.ips[..ips.len()].copy_from_slice(&ips);
        (old.ip_count, old.ip_next, old.ip_fixed) = (ips.len() as u8, ips.len() as u8, 0);
        old
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snooped_bindings_go_with_release_or_reassignment_and_expire_late() {
        let now = 10_000;
        let fresh = LeaseSeen::default;
        let mut seen = fresh();
        assert!(binding_stays(Some((true, now + 60)), &mut seen, now));
        assert_eq!(seen.expires, now + 60);
        // Released: gone before it expired.
        assert!(!binding_stays(None, &mut seen, now));
        // Leased to another guest.
        assert!(!binding_stays(Some((false, now + 60)), &mut fresh(), now));
        // Expired: kept for the grace, then gone.
        let mut expired = LeaseSeen { expires: now - 10 };
        assert!(binding_stays(None, &mut expired, now));
        assert!(!binding_stays(None, &mut expired, now + BINDING_GRACE_SECS));
        // Only offered, or released before the sweep saw its lease.
        assert!(!binding_stays(None, &mut fresh(), now));
    }
}
