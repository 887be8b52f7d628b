//! `kvnet uplink`: uplink groups (kvnet as the bond).
use std::path::Path;

use anyhow::Result;
use clap::Subcommand;

use crate::{
    control::{call, Request},
    output,
    uplink::UplinkInfo,
    uplink_spec::UplinkSpec,
};

#[derive(Subcommand)]
pub enum UplinkCmd {
    /// Create a group of NICs that networks use as one uplink (`net add
    /// --uplink NAME`); the group is an interface NAME carrying the host's
    /// address, with the primary (else first) member's MAC on every member.
    Add {
        #[command(flatten)]
        spec: UplinkSpec,
    },
    /// Groups, their members' state and counters, the active member, failovers.
    Show {
        /// Print JSON instead of a table.
        #[arg(short, long)]
        json: bool,
    },
    /// Delete a group no network uses; its members get their own MACs back.
    Del {
        /// The group.
        name: String,
    },
}

pub fn run(sock: &Path, cmd: UplinkCmd) -> Result<()> {
    match cmd {
        UplinkCmd::Add { spec } => {
            spec.check()?;
            call(sock, &Request::UplinkAdd { spec }).map(drop)
        }
        UplinkCmd::Show { json } => {
            output::show::<Vec<UplinkInfo>>(call(sock, &Request::UplinkShow)?, json, table)
        }
        UplinkCmd::Del { name } => call(sock, &Request::UplinkDel { name }).map(drop),
    }
}

fn table(groups: &Vec<UplinkInfo>) -> Vec<Vec<String>> {
    let mut rows = vec![[
        "GROUP",
        "MODE",
        "MEMBER",
        "STATE",
        "CARRYING",
        "RX BYTES",
        "TX BYTES",
        "FAILOVERS",
        "USED BY",
    ]
    .map(String::from)
    .to_vec()];
    for g in groups {
        for (i, m) in g.members.iter().enumerate() {
            let first = i == 0;
            rows.push(vec![
                if first { g.name.clone() } else { String::new() },
                if first {
                    g.mode.name().into()
                } else {
                    String::new()
                },
                m.name.clone(),
                m.state.clone(),
                if m.carrying { "yes" } else { "no" }.into(),
                m.counters.rx_bytes.to_string(),
                m.counters.tx_bytes.to_string(),
                if first {
                    g.failovers.to_string()
                } else {
                    String::new()
                },
                if first {
                    g.used_by.join(",")
                } else {
                    String::new()
                },
            ]);
        }
    }
    rows
}
