//! The lab of the NAT end-to-end tests (nat.rs, nat_mapping.rs): guests
//! behind a NAT network and an outside network behind its uplink.
use kvnet_tests::{
    kvnet::{kvnet_bin, Kvnet},
    GuestPort, Lab, Outside,
};

pub struct Nat {
    pub lab: Lab,
    #[allow(dead_code)] // not every test file looks outside
    pub out: Outside,
    pub guests: Vec<GuestPort>,
    pub k: Kvnet,
}

/// Guests 10.50.0.11.. behind gateway 10.50.0.1 (NAT network "nat" on
/// uplink up0 at 198.51.100.1, with `net_args`); the outside at
/// 198.51.100.2 knows no route to the guests. The daemon runs with
/// `daemon_args` and the environment `envs` (its own only: set_var would
/// change every test thread's).
pub fn nat_lab_with(
    n: usize,
    daemon_args: &[&str],
    envs: &[(&str, &str)],
    net_args: &[&str],
) -> Nat {
    let lab = Lab::new().unwrap();
    let out = lab
        .add_outside_with("198.51.100.2/24", "198.51.100.1/24")
        .unwrap();
    let guests: Vec<GuestPort> = (0..n)
        .map(|i| {
            let g = lab
                .add_guest_with(&format!("vm{i}"), Some(&format!("10.50.0.{}/24", 11 + i)))
                .unwrap();
            g.disable_ipv6().unwrap();
            g.sh("ip route add default via 10.50.0.1").unwrap();
            g
        })
        .collect();
    let k = Kvnet::start_bin(&lab, &kvnet_bin().unwrap(), daemon_args, envs).unwrap();
    let mut add = vec![
        "net",
        "add",
        "nat",
        "--mode",
        "nat",
        "--gateway",
        "10.50.0.1/24",
        "--uplink",
        "up0",
    ];
    add.extend_from_slice(net_args);
    k.cli(&add).unwrap();
    for g in &guests {
        k.cli(&["port", "add", "nat", &g.hv_if]).unwrap();
    }
    Nat {
        lab,
        out,
        guests,
        k,
    }
}
