//! The daemon's side of IPv6 source address validation (FCFS SAVI; the
//! datapath's is kvnet-ebpf `savi.rs`): addresses kvnet itself gives a
//! port (a DHCPv6 lease, a static host, the EUI-64 addresses of a
//! configured MAC, the gateway's own) are bound to it before the guest
//! uses them, so nobody can claim them first; idle claims age out.
use std::collections::BTreeMap;
use std::net::Ipv6Addr;
use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{HashMap, Map, MapData};
use kvnet_common::{
    names, owner_key, FdbKey, V6Owner, V6OwnerKey, V6_OWNER_F_DAEMON, V6_OWNER_IDLE_NS,
};

use super::Prefix6;

/// The modified EUI-64 interface identifier of `mac` (RFC 4291 2.5.1)
/// behind the first 64 bits of `prefix`: the address SLAAC gives a guest
/// without privacy extensions or stable-privacy identifiers.
pub fn eui64(prefix: Ipv6Addr, mac: [u8; 6]) -> Ipv6Addr {
    let mut a = prefix.octets();
    a[8..16].copy_from_slice(&[
        mac[0] ^ 0x02,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ]);
    Ipv6Addr::from(a)
}

/// The addresses a port with MAC `mac` forms by EUI-64: link-local, and
/// one in every /64 the network advertises for SLAAC.
pub fn eui64_addresses(gateways: &[Prefix6], mac: [u8; 6]) -> Vec<Ipv6Addr> {
    let mut v = vec![eui64(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), mac)];
    v.extend(
        gateways
            .iter()
            .filter(|g| g.slaac())
            .map(|g| eui64(g.network(), mac)),
    );
    v
}

/// A binding the daemon makes: owned by `ifindex`, never aged, not
/// counted in the port's claims.
pub fn daemon_binding(ifindex: u32) -> V6Owner {
    V6Owner {
        ifindex,
        flags: V6_OWNER_F_DAEMON,
        last_seen_ns: 0,
    }
}

/// Whether the ageing walk releases `o` at `now` (CLOCK_MONOTONIC ns).
pub fn idle(o: &V6Owner, now: u64) -> bool {
    o.flags & V6_OWNER_F_DAEMON == 0 && now.saturating_sub(o.last_seen_ns) > V6_OWNER_IDLE_NS
}

/// Each port's claims (the entries the datapath made), as map `v6_claims`
/// should count them.
pub fn claims<'a>(owners: impl IntoIterator<Item = &'a V6Owner>) -> BTreeMap<u32, u32> {
    let mut n = BTreeMap::new();
    for o in owners
        .into_iter()
        .filter(|o| o.flags & V6_OWNER_F_DAEMON == 0)
    {
        *n.entry(o.ifindex).or_default() += 1;
    }
    n
}

/// Binds what DHCPv6 hands out to the port of the client that asked: the
/// one owning the request's source address (its link-local, claimed as
/// the request passed the datapath), else the one owning the MAC in its
/// DUID. Opened on the pinned maps, so the DHCPv6 task needs no lock on
/// the switch.
pub struct LeaseBinder {
    net_id: u32,
    owners: HashMap<MapData, V6OwnerKey, V6Owner>,
    macs: HashMap<MapData, FdbKey, u32>,
}

impl LeaseBinder {
    pub fn open(pin_dir: &Path, net_id: u32) -> Result<LeaseBinder> {
        let open = |name: &str| -> Result<Map> {
            let path = pin_dir.join(name);
            let data =
                MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
            Ok(Map::HashMap(data))
        };
        Ok(LeaseBinder {
            net_id,
            owners: HashMap::try_from(open(names::MAP_V6_OWNERS)?)?,
            macs: HashMap::try_from(open(names::MAP_MAC_OWNERS)?)?,
        })
    }

    fn key(&self, a: Ipv6Addr) -> V6OwnerKey {
        V6OwnerKey {
            net_id: self.net_id,
            addr: a.octets(),
        }
    }

    /// The port of the client at `from` (DUID MAC `mac`), if known.
    pub fn client_port(&self, from: Ipv6Addr, mac: Option<[u8; 6]>) -> Option<u32> {
        if let Ok(o) = self.owners.get(&self.key(from), 0) {
            return Some(o.ifindex);
        }
        self.macs.get(&owner_key(self.net_id, mac?), 0).ok()
    }

    /// Binds `ip` to the client's port (taking it from a guest that
    /// claimed it by using it: the server's word wins). The port, or None
    /// when the client's port is unknown.
    pub fn bind(&mut self, from: Ipv6Addr, mac: Option<[u8; 6]>, ip: Ipv6Addr) -> Option<u32> {
        let port = self.client_port(from, mac)?;
        let key = self.key(ip);
        if let Err(e) = self.owners.insert(key, daemon_binding(port), 0) {
            log::warn!("binding the DHCPv6 lease {ip} to port {port}: {e}");
            return None;
        }
        Some(port)
    }

    /// Releases `ip` if the daemon bound it to the client's port.
    pub fn unbind(&mut self, from: Ipv6Addr, mac: Option<[u8; 6]>, ip: Ipv6Addr) {
        let Some(port) = self.client_port(from, mac) else {
            return;
        };
        let key = self.key(ip);
        if self.owners.get(&key, 0).is_ok_and(|o| o.ifindex == port) {
            let _ = self.owners.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eui64_addresses_of_a_mac() {
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let gws: Vec<Prefix6> = vec![
            "2001:db8:1::1/64".parse().unwrap(),
            "2001:db8:2::1/80".parse().unwrap(),
        ];
        let v = eui64_addresses(&gws, mac);
        let want: Vec<Ipv6Addr> = ["fe80::5054:ff:fe12:3456", "2001:db8:1::5054:ff:fe12:3456"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        assert_eq!(v, want, "no SLAAC address in a /80");
    }

    #[test]
    fn only_idle_claims_age_and_only_claims_count() {
        let claim = |ifindex, last_seen_ns| V6Owner {
            ifindex,
            flags: 0,
            last_seen_ns,
        };
        let now = V6_OWNER_IDLE_NS * 3;
        assert!(idle(&claim(5, now - V6_OWNER_IDLE_NS - 1), now));
        assert!(!idle(&claim(5, now - 1_000_000_000), now));
        assert!(!idle(&daemon_binding(5), now), "the daemon's bindings stay");
        // A time ahead of ours (coarse clock) is not idle.
        assert!(!idle(&claim(5, now + 5), now));
        let all = [claim(5, 0), claim(5, 1), daemon_binding(5), claim(7, 0)];
        assert_eq!(claims(&all), BTreeMap::from([(5, 2), (7, 1)]));
    }
}
