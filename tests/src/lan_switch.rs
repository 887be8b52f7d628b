//! The LAN behind an uplink group: a "switch" namespace whose Linux bridge
//! holds the far ends of the hypervisor's member links and the link of an
//! outside host. IPv6 is off in both (an L2 switch and an IPv4 host: no
//! stray router solicitations or DAD in the captures).
use anyhow::Result;

use crate::Lab;

pub struct LanSwitch {
    /// The switch's namespace (bridge `br0`).
    pub ns: String,
    /// The outside host's namespace (its link `eth0`, on the bridge as `so`).
    pub outside: String,
}

impl Lab {
    /// Member links `(hv end, switch end)` (the hv ends up, not
    /// addressed), all on `br0`, and an outside host with `outside_cidr`.
    pub fn add_lan_switch(&self, links: &[(&str, &str)], outside_cidr: &str) -> Result<LanSwitch> {
        let ns = self.add_netns("lansw")?;
        let outside = self.add_netns("lanhost")?;
        let no_v6 =
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1";
        self.sh(
            &ns,
            &format!("{no_v6}; ip link add br0 type bridge && ip link set br0 up"),
        )?;
        for (m, s) in links {
            self.sh(
                self.hv(),
                &format!(
                    "ip link add {m} type veth peer name {s} netns {ns} && ip link set {m} up"
                ),
            )?;
            self.sh(
                &ns,
                &format!("ip link set {s} master br0 && ip link set {s} up"),
            )?;
        }
        self.sh(
            &ns,
            &format!("ip link add so type veth peer name eth0 netns {outside} && ip link set so master br0 && ip link set so up"),
        )?;
        self.sh(
            &outside,
            &format!("{no_v6}; ip link set eth0 up && ip addr add {outside_cidr} dev eth0"),
        )?;
        Ok(LanSwitch { ns, outside })
    }
}
