//! `kvnet status`.

use anyhow::Result;
use serde::{Deserialize, Serialize};

use super::reconcile::with_rt;
use crate::{
    control::{NetDetail, NetPolicy},
    switch::Switch,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Status {
    pub daemon: String,
    /// The running daemon's kvnet version.
    #[serde(default)]
    pub version: String,
    pub pid: u32,
    pub pin_dir: String,
    pub programs: Vec<String>,
    pub config: Option<String>,
    pub networks: Vec<String>,
    pub ports: usize,
    pub rules: usize,
    pub fdb_entries: usize,
    pub fdb_capacity: u32,
    /// The conntrack GC's walks.
    #[serde(default)]
    pub conntrack_gc: crate::daemon::ct_gc::GcReport,
}

pub fn status(sw: &mut Switch) -> Result<Status> {
    let pin_dir = sw.dp.pin_dir().to_path_buf();
    let programs = [
        kvnet_common::names::PROG_XDP,
        kvnet_common::names::PROG_TC,
        kvnet_common::names::PROG_TC_OUT,
    ]
    .iter()
    .filter(|p| pin_dir.join(p).exists())
    .map(|p| p.to_string())
    .collect();
    let fdb_entries = sw
        .dp
        .fdb()?
        .keys()
        .filter(|k| k.as_ref().is_ok_and(|k| k.vid != kvnet_common::FDB_VID_ANY))
        .count();
    let (config, rules) = with_rt(|rt| {
        (
            rt.source.as_ref().map(|p| p.display().to_string()),
            rt.applied.rules.len(),
        )
    });
    Ok(Status {
        daemon: "running".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        pid: std::process::id(),
        pin_dir: pin_dir.display().to_string(),
        programs,
        config,
        networks: sw.nets.keys().cloned().collect(),
        ports: sw.ports.len(),
        rules,
        fdb_entries,
        fdb_capacity: kvnet_common::MAX_FDB_ENTRIES,
        conntrack_gc: crate::daemon::ct_gc::report(),
    })
}

/// `kvnet net show`: the switch's view plus the port defaults the
/// network gives its guest ports (storm control with its default filled in).
pub fn net_show(sw: &Switch, name: &str) -> Result<NetDetail> {
    let mut d = sw.net_show(name)?;
    let o = &sw.net(name)?.opts;
    d.policy = NetPolicy {
        isolated_ports: o.port_policy.isolated,
        port_rate_in_bps: o.port_policy.rate_in.map(|r| r.0),
        port_rate_out_bps: o.port_policy.rate_out.map(|r| r.0),
        storm_pps: Some(o.storm_pps.unwrap_or(kvnet_common::DEFAULT_STORM_PPS)),
    };
    Ok(d)
}

/// Set by `kvnet down`: the daemon removes everything and exits.
pub static DOWN: tokio::sync::Notify = tokio::sync::Notify::const_new();
