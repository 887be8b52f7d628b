//! Guest-to-guest through taps, the hypervisor's real port type: a writer
//! process on tap tA writes prebuilt 64-byte frames into its fd (as qemu's
//! userspace virtio backend would, no vhost-net here), a reader process on
//! tap tB reads and counts them. Linux bridge vs kvnet tc vs kvnet XDP.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::{Bench, Results};

pub const TAP: &str = "guest-to-guest over taps";
pub const TAP_CONFIGS: &[&str] = &["linux-bridge", "kvnet-tc", "kvnet-xdp"];
pub const TAP_METRIC: &str = "64-byte frames, writer → reader";
const MAC_A: &str = "02:7a:00:00:00:01";
const MAC_B: &str = "02:7a:00:00:00:02";

impl Bench<'_> {
    pub(super) fn taps(&mut self, res: &mut Results) -> Result<()> {
        let (a, b) = (self.lab.add_tap("tA")?, self.lab.add_tap("tB")?);
        for rep in 1..=self.plan.repeats {
            for &config in TAP_CONFIGS {
                println!(
                    "bench: [{TAP}] repeat {rep}/{}: {config}",
                    self.plan.repeats
                );
                let r = self
                    .tap_up(config, &a, &b)
                    .and_then(|()| self.tap_rate(&a, &b));
                match r {
                    Ok((mpps, share)) => {
                        res.add(TAP, config, TAP_METRIC, "Mpps", mpps);
                        res.add(TAP, config, "delivered", "%", share * 100.0);
                    }
                    Err(e) => res.fail(TAP, config, TAP_METRIC, "Mpps", format!("{e:#}")),
                }
                if config.starts_with("kvnet") {
                    self.kvnet_counters(res, &format!("{config} (taps)"));
                }
                self.tap_down(config, &a, &b);
            }
        }
        Ok(())
    }

    fn tap_up(&self, config: &str, a: &str, b: &str) -> Result<()> {
        if !self.switch_up(config, [a, b])? {
            bail!("unknown config {config}");
        }
        Ok(())
    }

    fn tap_down(&self, config: &str, a: &str, b: &str) {
        if config == "linux-bridge" {
            let _ = self
                .lab
                .exec_output(self.lab.hv(), &["ip", "link", "del", "br0"]);
        } else {
            for t in [a, b] {
                let _ = self.kv.cli(&["port", "del", t]);
            }
            let _ = self.kv.cli(&["net", "del", "bench"]);
        }
    }

    /// The reader on `b` first (it announces its MAC so the switch knows
    /// it), then the writer on `a`. Returns (Mpps delivered over the
    /// writer's wall time, delivered share).
    fn tap_rate(&self, a: &str, b: &str) -> Result<(f64, f64)> {
        let frames = self.plan.gen_frames;
        let budget = if self.plan.quick { 10.0 } else { 30.0 };
        let out = self.lab.work_dir().join("tap-sink.json");
        let mut c = Command::new(&self.helper);
        c.args(["tap-sink", b, "--mac", MAC_B, "--secs"])
            .arg(format!("{}", budget + 5.0))
            .stdout(Stdio::from(std::fs::File::create(&out)?));
        let sink = self.lab.spawn(self.lab.hv(), c)?;
        let ready = Instant::now() + Duration::from_secs(5);
        while !std::fs::read_to_string(&out)?.contains("ready") {
            if Instant::now() > ready || !sink.is_running() {
                bail!("the tap reader on {b} did not start");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Let the switch learn the reader's MAC from its announcement.
        std::thread::sleep(Duration::from_millis(100));
        let g = self.helper_in(
            self.lab.hv(),
            &[
                "tap-gen",
                a,
                "--count",
                &frames.to_string(),
                "--secs",
                &budget.to_string(),
                "--src",
                MAC_A,
                "--dst",
                MAC_B,
            ],
        )?;
        sink.wait_timeout(Duration::from_secs_f64(budget + 10.0))?
            .context("the tap reader did not finish")?;
        let text = std::fs::read_to_string(&out)?;
        let r: Value = serde_json::from_str(text.lines().last().unwrap_or(""))
            .with_context(|| format!("tap reader output {text:?}"))?;
        let got = r["frames"].as_f64().unwrap_or(0.0);
        let sent = g["sent"].as_f64().unwrap_or(0.0);
        let secs = g["secs"].as_f64().unwrap_or(f64::NAN);
        if got < sent * 0.01 {
            bail!("only {got} of {sent} frames reached the reader on {b}");
        }
        Ok((got.min(sent) / secs / 1e6, got.min(sent) / sent))
    }
}
