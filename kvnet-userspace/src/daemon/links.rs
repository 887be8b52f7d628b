//! Taps that join and leave: `kvnet ifup`/`ifdown` and the netlink
//! watcher that attaches interfaces matching a port rule as they appear.
use std::sync::Mutex;

use anyhow::{Context, Result};

use super::reconcile::*;
use crate::{
    config::*,
    control::{Hook, VlanArgs},
    netdev,
    security::SecurityArgs,
    switch::Switch,
    vlan::{self, VlanCfg},
};

/// `kvnet ifup TAP`: attach by explicit settings (env) or by rule.
pub fn ifup(sw: &mut Switch, iface: &str, net: Option<&str>, vlan: Option<&str>) -> Result<String> {
    let (spec, explicit) = match net {
        Some(n) => {
            let vlan = VlanArgs {
                vlan: vlan.map(Into::into),
                ..Default::default()
            };
            (
                PortSpec {
                    net: n.to_string(),
                    hook: Hook::Auto,
                    hairpin: false,
                    trusted: false,
                    vlan: vlan.to_cfg()?,
                    security: SecurityArgs::default(),
                    policy: Default::default(),
                },
                true,
            )
        }
        None => {
            let (mut spec, _) = with_rt(|rt| wanted(&rt.applied, iface)).with_context(|| {
                format!("no port or rule of the config matches '{iface}' (set KVNET_NET)")
            })?;
            if let Some(v) = vlan {
                spec.vlan = VlanCfg::Access {
                    vid: vlan::parse_vid(v)?,
                };
            }
            (spec, vlan.is_some())
        }
    };
    // Refused before anything changes: attach would first take the port
    // out of its present network, then fail to add it to a missing one.
    if !sw.nets.contains_key(&spec.net) {
        anyhow::bail!("no network named '{}'", spec.net);
    }
    // Best effort, as a tap's creator usually brings it up itself; attach
    // below reports a missing interface.
    if let Err(e) = crate::rtnl::link_set_up(iface) {
        log::debug!("{e}");
    }
    attach(sw, iface, &spec)?;
    with_rt(|rt| {
        let is_static = rt.applied.ports.iter().any(|p| p.iface == iface);
        if !is_static || explicit {
            rt.dynamic
                .insert(iface.to_string(), explicit.then(|| spec.clone()));
        }
    });
    Ok(spec.to_string())
}

/// Attaches `iface` as `spec` says; already attached the same way is fine.
fn attach(sw: &mut Switch, iface: &str, spec: &PortSpec) -> Result<()> {
    let have = running_port(sw, iface);
    match have {
        Some(h) if &h == spec => Ok(()),
        Some(h) if h.only_vlan_differs(spec) => {
            let mut a = spec.vlan_args();
            a.no_vlan = a.is_empty();
            sw.port_set(iface, &a)
        }
        Some(_) => {
            sw.port_del(iface)?;
            sw.port_add(
                &spec.net,
                iface,
                spec.hairpin,
                spec.hook,
                &spec.vlan_args(),
                spec.trusted,
                &spec.security,
                &spec.policy,
            )
        }
        None => sw.port_add(
            &spec.net,
            iface,
            spec.hairpin,
            spec.hook,
            &spec.vlan_args(),
            spec.trusted,
            &spec.security,
            &spec.policy,
        ),
    }
}

pub fn ifdown(sw: &mut Switch, iface: &str) -> Result<()> {
    with_rt(|rt| rt.dynamic.remove(iface));
    if sw.ports.contains_key(iface) {
        sw.port_del(iface)?;
    }
    Ok(())
}

/// A link appeared or changed: attach it if a static port or rule wants it.
/// `index` is its ifindex when the caller has it (a link event).
pub fn link_added(sw: &mut Switch, iface: &str, index: Option<u32>) -> Option<String> {
    // A port's interface renamed: its old name's port still holds the
    // interface (its filter); drop it now, so the new name can be attached
    // if a rule wants it. Only this interface is looked at: a burst of
    // thousands of new links must not each ask the kernel for every
    // port's name.
    if let Some(index) = index {
        if drop_ports_of(sw, index, Some(iface)) {
            crate::daemon::state::persist(sw);
        }
    }
    if sw.ports.contains_key(iface) || sw.nets.is_empty() {
        return None;
    }
    let (spec, rule) = with_rt(|rt| wanted(&rt.applied, iface))?;
    if !sw.nets.contains_key(&spec.net) {
        return None;
    }
    match sw.port_add(
        &spec.net,
        iface,
        spec.hairpin,
        spec.hook,
        &spec.vlan_args(),
        spec.trusted,
        &spec.security,
        &spec.policy,
    ) {
        Ok(()) => {
            if rule {
                with_rt(|rt| rt.dynamic.insert(iface.to_string(), None));
            }
            Some(format!("{iface} -> {spec}"))
        }
        Err(e) => {
            log::warn!("attaching {iface}: {e:#}");
            None
        }
    }
}

/// A link went away: drop its port now (the reaper would within seconds).
pub fn link_removed(sw: &mut Switch, iface: &str, index: u32) -> bool {
    with_rt(|rt| rt.dynamic.remove(iface));
    drop_ports_of(sw, index, None)
}

/// Removes the ports on interface `index` other than `keep` (by name).
/// Whether any went.
fn drop_ports_of(sw: &mut Switch, index: u32, keep: Option<&str>) -> bool {
    let gone: Vec<String> = sw
        .ports
        .iter()
        .filter(|(name, p)| p.ifindex == index && Some(name.as_str()) != keep)
        .map(|(name, _)| name.clone())
        .collect();
    for port in &gone {
        match sw.port_remove(port) {
            Ok(()) => eprintln!("port {port} vanished: removed"),
            Err(e) => log::warn!("removing vanished port {port}: {e:#}"),
        }
    }
    !gone.is_empty()
}

/// Follows link events (RTMGRP_LINK) to attach/detach ports, and IPv4
/// address events (RTMGRP_IPV4_IFADDR) so NAT networks follow their
/// uplink's address at once; runs on its own thread for the daemon's life.
pub fn watch_links(switch: std::sync::Arc<Mutex<Switch>>) -> Result<()> {
    let sock =
        crate::rtnl::event_socket().context("subscribing to link and address events (netlink)")?;
    // Weak: the daemon's exit drops the switch (and with it the pins).
    let switch = std::sync::Arc::downgrade(&switch);
    std::thread::Builder::new()
        .name("kvnet-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sock.recv(&mut &mut buf[..], 0) {
                    Ok(n) => n.min(buf.len()),
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        // Missed events: catch up with a full scan.
                        let Some(switch) = switch.upgrade() else {
                            return;
                        };
                        let Ok(mut sw) = switch.lock() else { return };
                        // A full scan: ports gone or renamed, then new links.
                        if !sw.reap_vanished_ports().is_empty() {
                            crate::daemon::state::persist(&sw);
                        }
                        for i in netdev::interfaces() {
                            link_added(&mut sw, &i, None);
                        }
                        follow_uplinks(&mut sw);
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("netlink watcher stopped: {e}");
                        return;
                    }
                };
                // Parsed before taking the lock; the lock is held for the
                // switch's own work only.
                let mut links = Vec::new();
                let mut address_changed = false;
                for frame in crate::rtnl::frames(&buf[..n]) {
                    let frame = match frame {
                        Ok(f) => f,
                        Err(e) => {
                            log::warn!("netlink watcher: {e}");
                            continue;
                        }
                    };
                    let m = match crate::rtnl::decode(frame) {
                        Ok(m) => m,
                        // Some link messages do not decode (a veth's
                        // RTM_DELLINK on 6.18); their header and name
                        // still say which port went.
                        Err(e) => {
                            match crate::rtnl::raw_link_event(frame) {
                                Some(ev) => links.push(ev),
                                None => log::warn!("netlink watcher: {e}"),
                            }
                            continue;
                        }
                    };
                    let netlink_packet_core::NetlinkPayload::InnerMessage(m) = m.payload else {
                        continue;
                    };
                    if let Some(ev) = crate::rtnl::link_event(&m) {
                        links.push(ev);
                    } else if crate::rtnl::ipv4_address_event(&m).is_some() {
                        address_changed = true;
                    }
                }
                if links.is_empty() && !address_changed {
                    continue;
                }
                let Some(switch) = switch.upgrade() else {
                    return;
                };
                let Ok(mut sw) = switch.lock() else { return };
                // Uplink groups first: a failover is what must not wait.
                if !links.is_empty() {
                    sw.uplinks_follow_carrier();
                }
                for ev in links {
                    if ev.added {
                        if let Some(what) = link_added(&mut sw, &ev.name, Some(ev.index)) {
                            eprintln!("port {what}: attached (interface appeared)");
                            crate::daemon::state::persist(&sw);
                        }
                    } else if link_removed(&mut sw, &ev.name, ev.index) {
                        crate::daemon::state::persist(&sw);
                    }
                }
                if address_changed {
                    follow_uplinks(&mut sw);
                }
            }
        })
        .context("starting the netlink watcher")?;
    Ok(())
}

/// An IPv4 address came or went somewhere: NAT networks re-read their
/// uplink's (one ioctl per NAT uplink, so any address event will do).
fn follow_uplinks(sw: &mut Switch) {
    if let Err(e) = sw.nat_follow_uplinks() {
        log::warn!("following uplink addresses: {e:#}");
    }
}
