//! NAT66 (`--nat6`): a NAT network's guests' IPv6 masqueraded behind the
//! uplink's global IPv6 address, with IPv6 port forwards; its conntrack
//! table (map `ct6`) listed, flushed and garbage-collected with IPv4's
//! (switch/nat.rs), under the same timeouts and the same per-guest quota.
use std::{
    collections::{BTreeMap, HashMap},
    net::{Ipv6Addr, SocketAddrV6},
};

use anyhow::{bail, Context, Result};
use kvnet_common::{
    Addr6, Ct6Entry, Ct6Key, Forward6Target, Nat6Config, NetConfig, CT_F_ORIGINAL,
    DEFAULT_FORWARD_RATE, NET_F_NAT6,
};

use crate::{
    control::{proto_name, ConntrackRow, Endpoint, FlowTuple, ForwardRow, Mode, NetOpts},
    host::monotonic_ns,
    ipv6::Prefix6,
    netdev,
    switch::{nat::forward_key, Switch},
};

/// A NAT66 network's translation: the uplink's address and the IPv6 port
/// forwards, (proto, port on that address) -> guest address and port.
#[derive(Debug, Clone)]
pub struct Nat6State {
    pub nat_ip: Ipv6Addr,
    pub forwards: BTreeMap<(u8, u16), (Ipv6Addr, u16)>,
}

/// The datapath's form of an address: four network-order words.
pub fn addr6(a: Ipv6Addr) -> Addr6 {
    let o = a.octets();
    let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

pub fn from_addr6(a: &Addr6) -> Ipv6Addr {
    let mut o = [0u8; 16];
    for (i, w) in a.iter().enumerate() {
        o[4 * i..4 * i + 4].copy_from_slice(&w.to_ne_bytes());
    }
    Ipv6Addr::from(o)
}

/// An interface's global IPv6 address (not temporary, tentative or
/// deprecated), from /proc/net/if_inet6; None if it has none.
pub fn global_ipv6(iface: &str) -> Result<Option<Ipv6Addr>> {
    let text =
        std::fs::read_to_string("/proc/net/if_inet6").context("reading /proc/net/if_inet6")?;
    Ok(text.lines().find_map(|l| parse_if_inet6(l, iface)))
}

/// One line of /proc/net/if_inet6 ("ADDR IFINDEX PLEN SCOPE FLAGS NAME"):
/// its address, if a usable global one of `iface`.
fn parse_if_inet6(line: &str, iface: &str) -> Option<Ipv6Addr> {
    const TEMPORARY: u32 = 0x01;
    const DEPRECATED: u32 = 0x20;
    const TENTATIVE: u32 = 0x40;
    let f: Vec<&str> = line.split_whitespace().collect();
    let [hex, _, _, scope, flags, name] = f[..] else {
        return None;
    };
    let flags = u32::from_str_radix(flags, 16).ok()?;
    if name != iface || scope != "00" || flags & (TEMPORARY | DEPRECATED | TENTATIVE) != 0 {
        return None;
    }
    u128::from_str_radix(hex, 16).ok().map(Ipv6Addr::from)
}

impl Switch {
    /// Checks `--nat6` before anything is built: the uplink's IPv6 address.
    pub(crate) fn nat6_plan(&self, opts: &NetOpts) -> Result<Option<Nat6State>> {
        if !opts.nat6 {
            return Ok(None);
        }
        if opts.mode != Mode::Nat {
            bail!("--nat6 is for --mode nat");
        }
        if opts.gateway6.is_empty() {
            bail!("--nat6 needs --gateway6 ADDRESS/PREFIX (the guests' IPv6 prefix)");
        }
        let uplink = opts.uplink.as_deref().context("--nat6 needs --uplink")?;
        let nat_ip = global_ipv6(uplink)?.with_context(|| {
            format!("uplink '{uplink}' has no global IPv6 address to masquerade behind")
        })?;
        Ok(Some(Nat6State {
            nat_ip,
            forwards: BTreeMap::new(),
        }))
    }

    /// Turns a NAT network's IPv6 into NAT66: its guest prefixes and the
    /// uplink's address into the datapath, the network's NAT66 flag on.
    pub(crate) fn build_nat6(&mut self, name: &str, id: u32, state: Nat6State) -> Result<()> {
        let prefixes: Vec<Prefix6> = self
            .net(name)?
            .opts
            .gateway6
            .iter()
            .map(|g| g.parse())
            .collect::<Result<_>>()?;
        let mut subnets = self.dp.nat6_subnets()?;
        for p in &prefixes {
            subnets
                .insert(&subnet6_key(p), id, 0)
                .context("writing the NAT66 prefix map")?;
        }
        self.dp
            .nat6_nets()?
            .insert(
                id,
                Nat6Config {
                    nat_ip: addr6(state.nat_ip),
                },
                0,
            )
            .context("writing the NAT66 network map")?;
        let mut cfg: NetConfig = self
            .dp
            .nets()?
            .get(&id, 0)
            .context("the network's datapath entry")?;
        cfg.flags |= NET_F_NAT6;
        self.dp
            .nets()?
            .insert(id, cfg, 0)
            .context("writing the network map")?;
        if let Some(s) = self.nets.get_mut(name).and_then(|n| n.nat.as_mut()) {
            s.nat6 = Some(state);
        }
        Ok(())
    }

    /// Removes a NAT66 network's prefixes, forwards and flows.
    pub(crate) fn teardown_nat6(&mut self, name: &str, id: u32, uplink: Option<&str>) {
        let Some(state) = self
            .nets
            .get_mut(name)
            .and_then(|n| n.nat.as_mut())
            .and_then(|s| s.nat6.take())
        else {
            return;
        };
        if let Some(ifindex) = uplink.and_then(|u| netdev::ifindex(u).ok()) {
            if let Ok(mut f) = self.dp.forwards6() {
                for (proto, port) in state.forwards.keys() {
                    let _ = f.remove(&forward_key(ifindex, *proto, *port));
                }
            }
        }
        let _ = self.ct6_flush_id(id);
        let prefixes: Vec<Prefix6> = self
            .nets
            .get(name)
            .map(|n| {
                n.opts
                    .gateway6
                    .iter()
                    .filter_map(|g| g.parse().ok())
                    .collect()
            })
            .unwrap_or_default();
        if let Ok(mut m) = self.dp.nat6_subnets() {
            for p in &prefixes {
                let _ = m.remove(&subnet6_key(p));
            }
        }
        if let Ok(mut m) = self.dp.nat6_nets() {
            let _ = m.remove(&id);
        }
    }

    /// `forward add NET ... --to [ADDR]:PORT`: an IPv6 port forward on the
    /// uplink's IPv6 address.
    pub(crate) fn forward6_add(
        &mut self,
        net: &str,
        proto: u8,
        port: u16,
        to: SocketAddrV6,
    ) -> Result<()> {
        let n = self.net(net)?;
        let (id, uplink) = (n.id, n.uplink.clone().unwrap_or_default());
        let state = n
            .nat
            .as_ref()
            .and_then(|s| s.nat6.as_ref())
            .with_context(|| {
                format!("network '{net}' has no NAT66 (--nat6): IPv6 forwards need it")
            })?;
        let addr = *to.ip();
        let prefixes: Vec<Prefix6> = n
            .opts
            .gateway6
            .iter()
            .filter_map(|g| g.parse().ok())
            .collect();
        if !prefixes.iter().any(|p| p.contains(addr) && p.addr != addr) {
            bail!("forward target {addr} is not a guest address of network '{net}'");
        }
        if to.port() == 0 {
            bail!("forward target '{to}': port 0");
        }
        if let Some((a, p)) = state.forwards.get(&(proto, port)) {
            bail!(
                "{} port {port} is already forwarded to [{a}]:{p}",
                proto_name(proto)
            );
        }
        let ifindex = netdev::ifindex(&uplink)?;
        let target = Forward6Target {
            addr: addr6(addr),
            port: to.port(),
            net_id: id,
            rate: DEFAULT_FORWARD_RATE,
            tokens: DEFAULT_FORWARD_RATE,
            ..Default::default()
        };
        self.dp
            .forwards6()?
            .insert(forward_key(ifindex, proto, port), target, 0)
            .context("writing the IPv6 forward map")?;
        if let Some(s) = self.nat6_state_mut(net) {
            s.forwards.insert((proto, port), (addr, to.port()));
        }
        Ok(())
    }

    /// Removes an IPv6 forward; false if the network has none of that port.
    pub(crate) fn forward6_del(&mut self, net: &str, proto: u8, port: u16) -> Result<bool> {
        let n = self.net(net)?;
        let uplink = n.uplink.clone().unwrap_or_default();
        let has = n
            .nat
            .as_ref()
            .and_then(|s| s.nat6.as_ref())
            .is_some_and(|s| s.forwards.contains_key(&(proto, port)));
        if !has {
            return Ok(false);
        }
        let ifindex = netdev::ifindex(&uplink)?;
        let _ = self
            .dp
            .forwards6()?
            .remove(&forward_key(ifindex, proto, port));
        if let Some(s) = self.nat6_state_mut(net) {
            s.forwards.remove(&(proto, port));
        }
        Ok(true)
    }

    fn nat6_state_mut(&mut self, net: &str) -> Option<&mut Nat6State> {
        self.nets
            .get_mut(net)
            .and_then(|n| n.nat.as_mut())
            .and_then(|s| s.nat6.as_mut())
    }

    /// The network's IPv6 forwards, as `forward list` shows them.
    pub(crate) fn forward6_rows(&self, net: &str) -> Vec<ForwardRow> {
        let Some(s) = self
            .nets
            .get(net)
            .and_then(|n| n.nat.as_ref())
            .and_then(|s| s.nat6.as_ref())
        else {
            return Vec::new();
        };
        s.forwards
            .iter()
            .map(|((proto, port), (a, p))| ForwardRow {
                net: net.into(),
                proto: proto_name(*proto),
                port: *port,
                to: Endpoint {
                    addr: (*a).into(),
                    port: *p,
                },
            })
            .collect()
    }

    fn ct6_entries(&mut self) -> Result<HashMap<Ct6Key, Ct6Entry>> {
        Ok(self.dp.ct6()?.iter().filter_map(|r| r.ok()).collect())
    }

    /// Network `id`'s IPv6 flows, as `conntrack list` shows them.
    pub(crate) fn conntrack6_rows(&mut self, id: u32) -> Result<Vec<ConntrackRow>> {
        let all = self.ct6_entries()?;
        let now = monotonic_ns();
        let tuple = |k: &Ct6Key| FlowTuple {
            saddr: from_addr6(&k.saddr).into(),
            sport: k.sport,
            daddr: from_addr6(&k.daddr).into(),
            dport: k.dport,
        };
        Ok(all
            .iter()
            .filter(|(_, e)| e.net_id == id && e.flags & CT_F_ORIGINAL != 0)
            .map(|(k, e)| {
                let reply = all.get(&e.rewrite.reply());
                crate::switch::nat::conntrack_row(
                    proto_name(k.proto),
                    tuple(k),
                    tuple(&e.rewrite),
                    e,
                    reply,
                    now,
                )
            })
            .collect())
    }

    /// Deletes network `id`'s IPv6 flows; how many entries went.
    pub(crate) fn ct6_flush_id(&mut self, id: u32) -> Result<usize> {
        let doomed: Vec<Ct6Key> = self
            .ct6_entries()?
            .into_iter()
            .filter(|(_, e)| e.net_id == id)
            .map(|(k, _)| k)
            .collect();
        let mut ct = self.dp.ct6()?;
        for k in &doomed {
            let _ = ct.remove(k);
        }
        Ok(doomed.len())
    }

    /// Deletes IPv6 flows idle past their state's timeout (both entries)
    /// and reply entries left alone by a half-created flow. Returns how many
    /// entries went.
    pub(crate) fn conntrack6_gc(&mut self) -> Result<usize> {
        let all = self.ct6_entries()?;
        if all.is_empty() {
            return Ok(0);
        }
        let now = monotonic_ns();
        let candidates = crate::switch::nat::gc_candidates(&all, now, |e| e.rewrite.reply());
        let mut ct = self.dp.ct6()?;
        let mut doomed = Vec::new();
        // Read again: a flow that came back to life during the walk stays.
        for (k, rkey) in candidates {
            let Ok(e) = ct.get(&k, 0) else {
                continue;
            };
            let reply = ct.get(&rkey, 0).ok();
            if crate::switch::nat::idle_past_timeout(&e, reply.as_ref(), monotonic_ns()) {
                doomed.push(k);
                doomed.push(rkey);
            }
        }
        for (k, e) in all.iter().filter(|(_, e)| e.flags & CT_F_ORIGINAL == 0) {
            if !all.contains_key(&e.rewrite.reply())
                && now.saturating_sub(e.created_ns) > 5_000_000_000
            {
                doomed.push(*k);
            }
        }
        for k in &doomed {
            let _ = ct.remove(k);
        }
        Ok(doomed.len())
    }

    /// Guest ports' open IPv6 flows (their quota counts IPv4's and IPv6's).
    pub(crate) fn ct6_open_per_port(&mut self) -> Result<HashMap<u32, u32>> {
        let mut open: HashMap<u32, u32> = HashMap::new();
        for e in self.ct6_entries()?.values() {
            if e.flags & CT_F_ORIGINAL != 0 && e.port != 0 {
                *open.entry(e.port).or_default() += 1;
            }
        }
        Ok(open)
    }

    /// Follows the uplinks' IPv6 addresses: new flows use the new one.
    pub(crate) fn nat6_follow_uplinks(&mut self) -> Result<()> {
        let nats: Vec<(String, u32, String, Ipv6Addr)> = self
            .nets
            .iter()
            .filter_map(|(name, n)| {
                let s = n.nat.as_ref()?.nat6.as_ref()?;
                Some((name.clone(), n.id, n.uplink.clone()?, s.nat_ip))
            })
            .collect();
        for (name, id, uplink, old) in nats {
            let Ok(Some(ip)) = global_ipv6(&uplink) else {
                continue;
            };
            if ip == old {
                continue;
            }
            self.dp
                .nat6_nets()?
                .insert(id, Nat6Config { nat_ip: addr6(ip) }, 0)?;
            if let Some(s) = self.nat6_state_mut(&name) {
                s.nat_ip = ip;
            }
            log::info!("network {name}: uplink {uplink} IPv6 address changed {old} -> {ip}");
        }
        Ok(())
    }
}

fn subnet6_key(p: &Prefix6) -> aya::maps::lpm_trie::Key<Addr6> {
    aya::maps::lpm_trie::Key::new(u32::from(p.len), addr6(p.network()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_round_trip_the_datapath_form() {
        let a: Ipv6Addr = "2001:db8:1::5".parse().unwrap();
        assert_eq!(from_addr6(&addr6(a)), a);
        // Memory order: the words' bytes are the address's.
        assert_eq!(addr6(a)[0].to_ne_bytes(), [0x20, 0x01, 0x0d, 0xb8]);
    }

    #[test]
    fn if_inet6_lines_give_usable_global_addresses_only() {
        let l =
            |addr: &str, scope: &str, flags: &str| format!("{addr} 03 40 {scope} {flags}    up0");
        let g = "20010db8ffff00000000000000000001";
        assert_eq!(
            parse_if_inet6(&l(g, "00", "80"), "up0"),
            Some("2001:db8:ffff::1".parse().unwrap())
        );
        assert_eq!(parse_if_inet6(&l(g, "00", "80"), "up1"), None);
        // Link-local scope, tentative, deprecated: not an address to use.
        assert_eq!(
            parse_if_inet6(&l("fe800000000000000000000000000001", "20", "80"), "up0"),
            None
        );
        assert_eq!(parse_if_inet6(&l(g, "00", "c0"), "up0"), None);
        assert_eq!(parse_if_inet6(&l(g, "00", "a0"), "up0"), None);
    }
}
