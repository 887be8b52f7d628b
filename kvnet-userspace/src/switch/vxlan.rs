//! VXLAN networks on this host: the VTEP device (one collect_md VXLAN
//! device shared by every VXLAN network, its tc ingress kvnet's), and the
//! maps that tie a network to its VNI and remote VTEPs (`vxlan_nets`,
//! `vxlan_vnis`, `fdb_remote`; the datapath's `vxlan.rs`).
use std::{
    collections::{BTreeSet, HashSet},
    net::Ipv4Addr,
};

use anyhow::{bail, Context, Result};
use kvnet_common::{names, FdbKey, VxlanNet, VXLAN_OVERHEAD, VXLAN_PORT};

use crate::{
    control::NetOpts,
    netdev, rtnl,
    switch::{
        journal::{self, Undo},
        remove_where, Switch,
    },
    vxlan::{Plan, VxlanInfo, VTEP_IFACE},
};

/// The host's VTEP device and the networks that use it.
pub struct Vtep {
    pub ifindex: u32,
    pub local: Ipv4Addr,
    pub dev: Option<String>,
    pub users: BTreeSet<String>,
}

impl Switch {
    /// The network's VXLAN plan, checked, and its options with the
    /// guests' MTU (`mtu`, DHCP option 26) set to what the underlay
    /// carries once encapsulated, unless the admin chose one.
    pub(crate) fn vxlan_plan(&self, name: &str, opts: &NetOpts) -> Result<(Option<Plan>, NetOpts)> {
        let Some(v) = &opts.vxlan else {
            return Ok((None, opts.clone()));
        };
        let plan = v.plan()?;
        self.vxlan_check(name, &plan)?;
        let fits = v.default_mtu()?;
        let mut opts = opts.clone();
        match opts.mtu {
            Some(m) if m > fits => bail!(
                "--mtu {m} does not fit the underlay with {VXLAN_OVERHEAD} bytes of VXLAN headers: at most {fits}"
            ),
            Some(_) => {}
            None => opts.mtu = Some(fits),
        }
        Ok((Some(plan), opts))
    }

    /// Refuses a VXLAN plan that clashes with this host's VTEP or another
    /// network's VNI. Nothing is built.
    pub(crate) fn vxlan_check(&self, name: &str, plan: &Plan) -> Result<()> {
        for (other, n) in &self.nets {
            let Some(o) = &n.opts.vxlan else { continue };
            if other != name && o.vni == plan.vni {
                bail!("VNI {} is already network '{other}''s", plan.vni);
            }
        }
        if let Some(v) = &self.vtep {
            if v.local != plan.local || v.dev != plan.dev {
                bail!(
                    "this host's VTEP is {} (dev {}): every VXLAN network shares it",
                    v.local,
                    v.dev.as_deref().unwrap_or("any")
                );
            }
        }
        if let Some(d) = &plan.dev {
            netdev::ifindex(d).with_context(|| format!("--vtep-dev {d}"))?;
        }
        Ok(())
    }

    /// Joins network `name` (id `id`) to the overlay: the VTEP device
    /// (created with the first VXLAN network), the VNI's overlay port and
    /// the flood list.
    pub(crate) fn build_vxlan(&mut self, name: &str, id: u32, plan: &Plan) -> Result<()> {
        self.vxlan_check(name, plan)?;
        let vtep = match &self.vtep {
            Some(v) => v.ifindex,
            None => self.create_vtep(plan)?,
        };
        if let Some(v) = self.vtep.as_mut() {
            v.users.insert(name.to_string());
        }
        self.dp
            .hash_map::<u32, u32>(names::MAP_VXLAN_VNIS)?
            .insert(plan.vni, id, 0)
            .context("writing the VNI map")?;
        let mut net = VxlanNet {
            vni: plan.vni,
            vtep,
            local_ip: u32::from(plan.local).to_be(),
            count: plan.remotes.len() as u32,
            ..Default::default()
        };
        for (slot, r) in net.remotes.iter_mut().zip(&plan.remotes) {
            *slot = u32::from(*r).to_be();
        }
        self.dp
            .hash_map::<u32, VxlanNet>(names::MAP_VXLAN_NETS)?
            .insert(id, net, 0)
            .context("writing the VXLAN network map")?;
        Ok(())
    }

    /// The VTEP device, up, with kvnet's tc ingress: its ifindex.
    fn create_vtep(&mut self, plan: &Plan) -> Result<u32> {
        let link = plan.dev.as_deref().map(netdev::ifindex).transpose()?;
        // A restarted daemon adopts its own device; anything else by that
        // name is a leftover of a daemon that died.
        if netdev::ifindex(VTEP_IFACE).is_ok() && !self.dp.adopting {
            rtnl::link_del(VTEP_IFACE)?;
        }
        if netdev::ifindex(VTEP_IFACE).is_err() {
            journal::record(Undo::Link {
                iface: VTEP_IFACE.to_string(),
            })?;
            rtnl::link_add_vxlan_external(VTEP_IFACE, plan.local, VXLAN_PORT, link)?;
        }
        rtnl::link_set_up(VTEP_IFACE)?;
        let ifindex = netdev::ifindex(VTEP_IFACE)?;
        let attached = self
            .dp
            .reset_stats(ifindex)
            .and_then(|_| {
                self.dp
                    .hash_map::<u32, u32>(names::MAP_VTEPS)?
                    .insert(ifindex, 1, 0)
                    .context("writing the VTEP map")
            })
            .and_then(|_| self.dp.attach(VTEP_IFACE, ifindex, false));
        self.vtep = Some(Vtep {
            ifindex,
            local: plan.local,
            dev: plan.dev.clone(),
            users: BTreeSet::new(),
        });
        if let Err(e) = attached {
            self.remove_vtep();
            return Err(e);
        }
        Ok(ifindex)
    }

    fn remove_vtep(&mut self) {
        let Some(v) = self.vtep.take() else { return };
        self.dp.detach(v.ifindex);
        if let Ok(mut m) = self.dp.hash_map::<u32, u32>(names::MAP_VTEPS) {
            let _ = m.remove(&v.ifindex);
        }
        let _ = self.dp.port_stats().map(|mut s| s.remove(&v.ifindex));
        if let Err(e) = rtnl::link_del(VTEP_IFACE) {
            log::warn!("removing {VTEP_IFACE}: {e:#}");
        }
    }

    /// Takes network `name` (id `id`) off the overlay; the VTEP device goes
    /// with the last VXLAN network.
    pub(crate) fn vxlan_teardown(&mut self, name: &str, id: u32) {
        let Some(vni) = self
            .net(name)
            .ok()
            .and_then(|n| n.opts.vxlan.as_ref())
            .map(|o| o.vni)
        else {
            return;
        };
        if let Ok(mut m) = self.dp.hash_map::<u32, VxlanNet>(names::MAP_VXLAN_NETS) {
            let _ = m.remove(&id);
        }
        if let Ok(mut m) = self.dp.hash_map::<u32, u32>(names::MAP_VXLAN_VNIS) {
            if m.get(&vni, 0).is_ok_and(|n| n == id) {
                let _ = m.remove(&vni);
            }
        }
        if let Ok(mut m) = self.dp.hash_map::<FdbKey, u32>(names::MAP_FDB_REMOTE) {
            remove_where(&mut m, |k, _| k.net_id == id);
        }
        let last = self.vtep.as_mut().is_some_and(|v| {
            v.users.remove(name);
            v.users.is_empty()
        });
        if last {
            self.remove_vtep();
        }
    }

    /// Forgets remote VTEPs of MACs the FDB no longer holds (aged,
    /// flushed): learning writes them back when the MAC shows up again.
    pub(crate) fn vxlan_age(&mut self) -> Result<()> {
        if self.vtep.is_none() {
            return Ok(());
        }
        let known: HashSet<FdbKey> = self.dp.fdb()?.keys().filter_map(|k| k.ok()).collect();
        let mut m = self.dp.hash_map::<FdbKey, u32>(names::MAP_FDB_REMOTE)?;
        remove_where(&mut m, |k, _| !known.contains(k));
        Ok(())
    }

    /// The remote VTEP of the FDB entry (network, VLAN, MAC) if it points
    /// at the VTEP device.
    pub(crate) fn vxlan_remote_of(&mut self, key: &FdbKey, ifindex: u32) -> Option<Ipv4Addr> {
        if self.vtep.as_ref()?.ifindex != ifindex {
            return None;
        }
        let m = self
            .dp
            .hash_map::<FdbKey, u32>(names::MAP_FDB_REMOTE)
            .ok()?;
        m.get(key, 0)
            .ok()
            .map(|ip| Ipv4Addr::from(u32::from_be(ip)))
    }

    /// `net show`'s VXLAN part (None: not a VXLAN network).
    pub(crate) fn vxlan_info(&self, name: &str) -> Option<VxlanInfo> {
        let n = self.net(name).ok()?;
        let plan = n.opts.vxlan.as_ref()?.plan().ok()?;
        Some(VxlanInfo {
            vni: plan.vni,
            vtep_local: plan.local,
            vtep_dev: plan.dev,
            vtep_iface: VTEP_IFACE.to_string(),
            remotes: plan.remotes,
            mtu: n.opts.mtu,
        })
    }
}
