//! kvnet's daemon, CLI and datapath loader as a library: the `kvnet` binary
//! and `kvnet-bench` are thin mains over it.
pub mod cidr;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod datapath;
pub mod dhcp;
pub mod dns;
pub mod dnsname;
pub mod ethtool_features;
pub mod gateway;
pub mod genl;
pub mod host;
pub mod libvirt;
pub mod mac;
pub mod netdev;
pub mod output;
pub mod policy;
pub mod rate;
pub mod rtnl;
pub mod security;
pub mod switch;
pub mod tasks;
pub mod trace;
pub mod vlan;
pub mod xdp_features;
