//! IPv6 next to IPv4 in the guest-to-outside scenario: the same guest g1
//! and outside host, each configuration given its IPv6 half (Linux IPv6
//! forwarding, ip6tables / nft masquerade, kvnet routed IPv6 and NAT66),
//! measured with the same ping and iperf3 as IPv4.

/// The guests' prefix and g1's address in it.
pub const GUEST_PREFIX: &str = "2001:db8:10::/64";
pub const G1_IP6: &str = "2001:db8:10::1";
/// The gateway's address in the guests' prefix.
pub const GW_IP6: &str = "2001:db8:10::fe";
/// The uplink's and the outside's addresses.
pub const UP_HV6: &str = "2001:db8:77::1";
pub const UP_OUT6: &str = "2001:db8:77::2";

/// Metric names of the IPv6 rows.
pub const TCP_1: &str = "TCP bulk IPv6, 1 stream";
pub const RR_P50: &str = "RR latency IPv6 p50 (ping)";
pub const RR_P99: &str = "RR latency IPv6 p99 (ping)";

/// How a configuration carries the guests' IPv6 to the outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carried {
    /// Routed: the outside routes the guests' prefix back to the uplink.
    Routed,
    /// Masqueraded behind the uplink's address.
    Masqueraded,
}

/// What `config` does with IPv6; `nat6` whether this kvnet has NAT66.
pub fn carried(config: &str, nat6: bool) -> Carried {
    match config {
        "linux-routed" | "kvnet-routed" => Carried::Routed,
        "kvnet-nat" if !nat6 => Carried::Routed,
        _ => Carried::Masqueraded,
    }
}

/// The ip6tables rule libvirt adds for `<nat ipv6='yes'/>`.
pub fn ip6tables_masquerade() -> Vec<&'static str> {
    vec![
        "ip6tables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        GUEST_PREFIX,
        "!",
        "-d",
        GUEST_PREFIX,
        "-j",
        "MASQUERADE",
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_routed_configurations_need_a_route_back() {
        assert_eq!(carried("linux-routed", true), Carried::Routed);
        assert_eq!(carried("kvnet-routed", true), Carried::Routed);
        assert_eq!(carried("kvnet-nat", false), Carried::Routed);
        assert_eq!(carried("kvnet-nat", true), Carried::Masqueraded);
        assert_eq!(carried("nft-masq", false), Carried::Masqueraded);
        assert_eq!(carried("bridge+iptables-masq", false), Carried::Masqueraded);
    }
}
