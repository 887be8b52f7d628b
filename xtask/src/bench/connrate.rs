//! New connections per second through a gateway: many short TCP
//! connections from g1 to a server on `out` (accept and close at once),
//! bounded in count and time. Through kvnet NAT every connection is a new
//! flow (port pick and two conntrack inserts in the datapath); through
//! iptables/nftables masquerade it is a kernel conntrack entry and a NAT
//! binding.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::{Bench, Results, OUT, UP_OUT};

pub const METRIC: &str = "new TCP connections";
const PORT: &str = "7001";

impl Bench<'_> {
    pub(super) fn conn_rate(&self, res: &mut Results, config: &str) {
        match self.conn_rate_once() {
            Ok(v) => res.add(OUT, config, METRIC, "conn/s", v),
            Err(e) => res.fail(OUT, config, METRIC, "conn/s", format!("{e:#}")),
        }
    }

    fn conn_rate_once(&self) -> Result<f64> {
        let count = if self.plan.quick { 3_000 } else { 20_000 };
        let secs = if self.plan.quick { 10.0 } else { 30.0 };
        let out = self.lab.work_dir().join("conn-server.json");
        let mut c = Command::new(&self.helper);
        c.args(["conn-server", "--port", PORT, "--count"])
            .arg(count.to_string())
            .arg("--secs")
            .arg(format!("{}", secs + 5.0))
            .stdout(Stdio::from(std::fs::File::create(&out)?));
        let server = self.lab.spawn(&self.out_ns, c)?;
        let ready = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&out)?.contains("ready") {
            if Instant::now() > ready || !server.is_running() {
                bail!("the connection server did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let v = self.helper_in(
            &self.g1.ns.clone(),
            &[
                "conn-rate",
                "--to",
                &format!("{UP_OUT}:{PORT}"),
                "--count",
                &count.to_string(),
                "--secs",
                &secs.to_string(),
            ],
        )?;
        // The server stops at `count`; if some connections failed it stops
        // at its deadline: do not wait for that.
        if server.wait_timeout(Duration::from_secs(1))?.is_none() {
            let _ = server.stop();
        }
        let done = v["connections"].as_f64().unwrap_or(0.0);
        if done < count as f64 * 0.5 {
            bail!("only {done} of {count} connections: {v}");
        }
        v["per_sec"].as_f64().context("conn-rate: no per_sec")
    }
}
