//! The kvnet lab: throw-away network namespaces, guest ports and real
//! guests, used by the end-to-end tests, `cargo xtask run` and the benches.
//!
//! Everything the lab builds lives in network namespaces it creates itself
//! (`kvnet-<suffix>-*`); nothing touches the root namespace's interfaces.
pub mod capture;
pub mod clients;
pub mod cpio;
pub mod guest;
pub mod inject;
pub mod kvnet;
pub mod lab;
pub mod lan_switch;
pub mod libvirt;
pub mod pcap;
pub mod procs;
pub mod tools;

pub use capture::Capture;
pub use inject::{eth_frame, inject, mac_fmt, mac_parse};
pub use lab::{cleanup_leftovers, leftovers_of, mount_bpffs_if_needed, GuestPort, Lab, Outside};
pub use pcap::{count_frames, Frame};
pub use procs::Proc;
