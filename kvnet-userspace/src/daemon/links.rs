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
    let _ = std::process::Command::new("ip")
        .args(["link", "set", "dev", iface, "up"])
        .status();
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
    let have = running_ports(sw).remove(iface);
    match have {
        Some(h) if &h == spec => Ok(()),
        Some(h)
            if h.net == spec.net
                && h.hook == spec.hook
                && h.hairpin == spec.hairpin
                && h.trusted == spec.trusted
                && same_security(&h.security, &spec.security) =>
        {
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
pub fn link_added(sw: &mut Switch, iface: &str) -> Option<String> {
    if sw.ports.contains_key(iface) || sw.nets.is_empty() {
        return None;
    }
    let (spec, rule) = with_rt(|rt| wanted(&rt.applied, iface))?;
    if !sw.nets.contains_key(&spec.net) {
        return None;
    }
    // A port renamed to a name a rule matches: its old name's port still
    // holds the interface (its filter) until the reaper's next tick, and no
    // link event may follow that tick. Drop it now, then attach.
    let reaped = sw.reap_vanished_ports();
    for gone in &reaped {
        eprintln!("port {gone} vanished: removed");
    }
    if !reaped.is_empty() {
        crate::daemon::state::persist(sw);
    }
    match sw.port_add(
        &spec.net,
        iface,
        spec.hairpin,
        spec.hook,
        &spec.vlan_args(),
        spec.trusted,
        &spec.security,
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

/// A link went away: drop its port now (the poller would in half a second).
pub fn link_removed(sw: &mut Switch, iface: &str) -> bool {
    with_rt(|rt| rt.dynamic.remove(iface));
    if sw.ports.contains_key(iface) && netdev::ifindex(iface).is_err() {
        return sw.port_remove(iface).is_ok();
    }
    !sw.reap_vanished_ports().is_empty()
}

/// Follows RTM_NEWLINK/RTM_DELLINK on a netlink socket (RTMGRP_LINK) and
/// attaches/detaches ports; runs on its own thread for the daemon's life.
pub fn watch_links(switch: std::sync::Arc<Mutex<Switch>>) -> Result<()> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    // SAFETY: plain socket(2)/bind(2) on a fresh fd we own.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("opening a netlink socket");
    }
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as u16;
    addr.nl_groups = libc::RTMGRP_LINK as u32;
    let rc = unsafe {
        libc::bind(
            sock.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as u32,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error()).context("binding to RTMGRP_LINK");
    }
    // Weak: the daemon's exit drops the switch (and with it the pins).
    let switch = std::sync::Arc::downgrade(&switch);
    std::thread::Builder::new()
        .name("kvnet-netlink".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n =
                    unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.raw_os_error() == Some(libc::ENOBUFS) {
                        // Missed events: catch up with a full scan.
                        let Some(switch) = switch.upgrade() else {
                            return;
                        };
                        if let Ok(mut sw) = switch.lock() {
                            for i in netdev::interfaces() {
                                link_added(&mut sw, &i);
                            }
                        }
                        continue;
                    }
                    if e.kind() == std::io::ErrorKind::Interrupted {
                        continue;
                    }
                    log::warn!("netlink watcher stopped: {e}");
                    return;
                }
                let Some(switch) = switch.upgrade() else {
                    return;
                };
                for (ty, name) in parse_link_msgs(&buf[..n as usize]) {
                    let Ok(mut sw) = switch.lock() else { return };
                    if ty == libc::RTM_NEWLINK {
                        if let Some(what) = link_added(&mut sw, &name) {
                            eprintln!("port {what}: attached (interface appeared)");
                            crate::daemon::state::persist(&sw);
                        }
                    } else if ty == libc::RTM_DELLINK && link_removed(&mut sw, &name) {
                        eprintln!("port {name} vanished: removed");
                        crate::daemon::state::persist(&sw);
                    }
                }
            }
        })
        .context("starting the netlink watcher")?;
    Ok(())
}

/// (message type, IFLA_IFNAME) of each link message in a netlink datagram.
fn parse_link_msgs(mut b: &[u8]) -> Vec<(u16, String)> {
    const NLMSG_HDR: usize = 16;
    const IFINFO: usize = 16;
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDR {
        let len = u32::from_ne_bytes(b[0..4].try_into().unwrap()) as usize;
        let ty = u16::from_ne_bytes(b[4..6].try_into().unwrap());
        if len < NLMSG_HDR || len > b.len() {
            break;
        }
        if ty == libc::RTM_NEWLINK || ty == libc::RTM_DELLINK {
            let msg = &b[..len];
            let mut off = NLMSG_HDR + IFINFO;
            while off + 4 <= len {
                let alen = u16::from_ne_bytes([msg[off], msg[off + 1]]) as usize;
                let aty = u16::from_ne_bytes([msg[off + 2], msg[off + 3]]);
                if alen < 4 || off + alen > len {
                    break;
                }
                if aty == libc::IFLA_IFNAME {
                    let v = &msg[off + 4..off + alen];
                    let v = v.split(|c| *c == 0).next().unwrap_or_default();
                    out.push((ty, String::from_utf8_lossy(v).into_owned()));
                }
                off += (alen + 3) & !3;
            }
        }
        let step = (len + 3) & !3;
        if step >= b.len() {
            break;
        }
        b = &b[step..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netlink_link_messages() {
        // nlmsghdr(16) + ifinfomsg(16) + IFLA_IFNAME "tap0\0" padded.
        let mut m = Vec::new();
        let attr_len = 4 + 5;
        let total = 16 + 16 + ((attr_len + 3) & !3);
        m.extend_from_slice(&(total as u32).to_ne_bytes());
        m.extend_from_slice(&libc::RTM_NEWLINK.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(&[0; 16]);
        m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
        m.extend_from_slice(&libc::IFLA_IFNAME.to_ne_bytes());
        m.extend_from_slice(b"tap0\0\0\0\0");
        let mut two = m.clone();
        two.extend_from_slice(&m);
        assert_eq!(
            parse_link_msgs(&two),
            vec![
                (libc::RTM_NEWLINK, "tap0".to_string()),
                (libc::RTM_NEWLINK, "tap0".to_string())
            ]
        );
    }
}
