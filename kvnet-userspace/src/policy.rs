//! A port's traffic policy: isolation from the network's other isolated
//! ports and rate limits each way (libvirt's `<port isolated>` and
//! `<bandwidth>`).
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::rate::Rate;

#[derive(Args, Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyArgs {
    /// Isolate the port: it reaches the gateway, the uplink and
    /// non-isolated ports, never another isolated port.
    #[arg(long)]
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
    /// Rate limit into the guest, like 10mbit (bits/s; kbit, mbit, gbit).
    #[arg(long, value_name = "RATE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_in: Option<Rate>,
    /// Rate limit out of the guest, like 10mbit.
    #[arg(long, value_name = "RATE")]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_out: Option<Rate>,
}

impl PolicyArgs {
    pub fn is_default(&self) -> bool {
        *self == PolicyArgs::default()
    }
}
