//! Rates as people write them ("10mbit", "1.5gbit", "800kbit", tc's
//! units, decimal), kept in bits per second: the port rate limits.
use std::{fmt, str::FromStr};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A rate in bits per second.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Rate(pub u64);

/// Below this a token bucket of whole packets stops making sense.
pub const MIN_RATE: u64 = 8_000;

const UNITS: &[(&str, u64)] = &[
    ("gbit", 1_000_000_000),
    ("mbit", 1_000_000),
    ("kbit", 1_000),
    ("bit", 1),
    // Bytes per second, as tc writes them.
    ("gbps", 8_000_000_000),
    ("mbps", 8_000_000),
    ("kbps", 8_000),
    ("bps", 8),
];

impl Rate {
    pub fn bits_per_sec(self) -> u64 {
        self.0
    }
    pub fn bytes_per_sec(self) -> u64 {
        self.0 / 8
    }
    /// libvirt's `<bandwidth>` unit: KiB per second.
    pub fn from_kib_per_sec(kib: u64) -> Rate {
        Rate(kib.saturating_mul(1024 * 8))
    }
}

impl FromStr for Rate {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Rate> {
        let t = s.trim().to_ascii_lowercase();
        let Some((unit, mult)) = UNITS.iter().find(|(u, _)| t.ends_with(u)) else {
            bail!("rate '{s}' has no unit: write it like 10mbit, 500kbit or 1gbit (bits per second) or 2mbps (bytes)");
        };
        let num = t[..t.len() - unit.len()].trim();
        let value: f64 = num
            .parse()
            .with_context(|| format!("rate '{s}': '{num}' is not a number"))?;
        if !value.is_finite() || value <= 0.0 {
            bail!("rate '{s}' must be above zero");
        }
        let bits = value * *mult as f64;
        if bits > 400e9 {
            bail!("rate '{s}' is above 400gbit");
        }
        let bits = bits.round() as u64;
        if bits < MIN_RATE {
            bail!("rate '{s}' is below the smallest limit kvnet enforces, 8kbit");
        }
        Ok(Rate(bits))
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, mult) in &UNITS[..4] {
            if self.0 >= *mult && self.0 % mult == 0 {
                return write!(f, "{}{unit}", self.0 / mult);
            }
        }
        write!(f, "{}bit", self.0)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Rate, D::Error> {
        let s = String::deserialize(d)?;
        s.parse()
            .map_err(|e: anyhow::Error| serde::de::Error::custom(format!("{e:#}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_tc_units_and_print_back() {
        assert_eq!("10mbit".parse::<Rate>().unwrap(), Rate(10_000_000));
        assert_eq!("1.5Gbit".parse::<Rate>().unwrap(), Rate(1_500_000_000));
        assert_eq!("2mbps".parse::<Rate>().unwrap(), Rate(16_000_000));
        assert_eq!(" 800 kbit ".parse::<Rate>().unwrap(), Rate(800_000));
        assert_eq!(Rate(10_000_000).to_string(), "10mbit");
        assert_eq!(Rate(1_500_000_000).to_string(), "1500mbit");
        assert_eq!(Rate(12_345).to_string(), "12345bit");
        assert_eq!(Rate::from_kib_per_sec(1000), Rate(8_192_000));
        for bad in [
            "10",
            "mbit",
            "-1mbit",
            "0kbit",
            "1bit",
            "nanmbit",
            "1e12gbit",
            "10 furlongs",
        ] {
            assert!(bad.parse::<Rate>().is_err(), "{bad} parsed");
        }
    }
}
