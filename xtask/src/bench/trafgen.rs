//! 64-byte frames as ordinary skbs: netsniff-ng's `trafgen` (AF_PACKET with
//! qdisc bypass) sends from inside the sending guest's namespace, and the
//! receiving namespace's rx counter counts. Unlike the live-frame generator
//! (BPF_PROG_RUN), these frames enter the host stack as a guest's would (not
//! PACKET_OTHERHOST), so Linux routing and masquerade are measured the same
//! way as kvnet (../shared/MEASURED.md).

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use super::{mac_str, Bench, G1_IP};

/// The metric name of a trafgen rate (the live-frame one is "64-byte frames").
pub const METRIC: &str = "64-byte frames (trafgen)";
/// The same with 1M conntrack entries when no GC walk was running.
pub const METRIC_NO_WALK: &str = "64-byte frames (trafgen), no GC walk running";

impl Bench<'_> {
    /// Sends `gen_frames` 64-byte UDP frames g1 -> `dst_mac`/`dst_ip` from
    /// g1's eth0 and counts them on `sink_ns`'s `sink_dev`. Returns
    /// (Mpps delivered over the sender's wall time, delivered share).
    pub(super) fn trafgen_rate(
        &self,
        dst_mac: &str,
        dst_ip: &str,
        sink_ns: &str,
        sink_dev: &str,
    ) -> Result<(f64, f64)> {
        let frame = self.helper_in(
            self.lab.hv(),
            &[
                "frame",
                "--src",
                &mac_str(&self.g1.mac),
                "--dst",
                dst_mac,
                "--sip",
                G1_IP,
                "--dip",
                dst_ip,
            ],
        )?;
        let conf = self.lab.work_dir().join("trafgen.cfg");
        std::fs::write(
            &conf,
            frame["trafgen"]
                .as_str()
                .ok_or_else(|| anyhow!("kvnet-bench frame: {frame}"))?,
        )?;
        let sent = self.plan.gen_frames;
        let before = rx_packets(&self.lab, sink_ns, sink_dev)?;
        let t = Instant::now();
        // One sending process; the root namespace's socket-memory sysctls
        // and IRQ affinities are left alone. `timeout` bounds a stuck run.
        let mut c = Command::new("timeout");
        c.args([
            "60",
            "trafgen",
            "--no-sock-mem",
            "--notouch-irq",
            "--no-cpu-stats",
        ])
        .args(["--cpus", "1", "--dev", "eth0", "--num", &sent.to_string()])
        .arg("--conf")
        .arg(&conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped());
        let out = kvnet_tests::procs::spawn_in_ns(&self.g1.ns, c)?
            .wait_with_output()
            .context("waiting for trafgen")?;
        let secs = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!(
                "trafgen failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        // Frames still queued on the way: wait until the counter settles.
        let mut got = rx_packets(&self.lab, sink_ns, sink_dev)? - before;
        let settle = Instant::now() + Duration::from_secs(1);
        while Instant::now() < settle {
            std::thread::sleep(Duration::from_millis(50));
            let now = rx_packets(&self.lab, sink_ns, sink_dev)? - before;
            if now == got {
                break;
            }
            got = now;
        }
        let sent = sent as f64;
        let got = got as f64;
        if got < sent * 0.01 {
            bail!("only {got} of {sent} frames reached {sink_ns}'s {sink_dev}");
        }
        Ok((got.min(sent) / secs / 1e6, got.min(sent) / sent))
    }
}

/// A device's rx packet counter (netdev stats, as `ip -s link` shows).
pub fn rx_packets(lab: &kvnet_tests::lab::Lab, ns: &str, dev: &str) -> Result<u64> {
    let o = lab.exec(ns, &["ip", "-j", "-s", "link", "show", "dev", dev])?;
    let v: Value = serde_json::from_slice(&o.stdout).context("ip -j -s link")?;
    v[0]["stats64"]["rx"]["packets"]
        .as_u64()
        .ok_or_else(|| anyhow!("no rx counter for {dev} in {ns}: {v}"))
}
