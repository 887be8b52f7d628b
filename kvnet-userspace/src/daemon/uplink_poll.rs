//! Uplink groups' carrier poll (`--miimon`): netlink link events are the
//! fast way (links.rs); the poll catches what an event could miss.
use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context, Result};

use crate::switch::Switch;

/// Without a miimon, groups are still polled this often.
const DEFAULT_POLL: Duration = Duration::from_secs(1);

pub fn start(switch: Arc<Mutex<Switch>>) -> Result<()> {
    let switch = Arc::downgrade(&switch);
    std::thread::Builder::new()
        .name("kvnet-uplink-poll".into())
        .spawn(move || loop {
            let every = {
                let Some(sw) = switch.upgrade() else { return };
                let Ok(mut sw) = sw.lock() else { return };
                sw.uplinks_follow_carrier();
                sw.uplinks
                    .miimon()
                    .map_or(DEFAULT_POLL, Duration::from_millis)
            };
            std::thread::sleep(every);
        })
        .context("starting the uplink carrier poll")?;
    Ok(())
}
