//! Networks as configuration: the TOML file (`/etc/kvnet/kvnet.toml`), its
//! validation (errors name file, line and column) and what a file wants
//! (networks, ports, port rules) as plain specs the daemon can compare with
//! its running state. A pure model: nothing here touches the switch; the
//! daemon's `reconcile` applies the difference.
//!
//! How the file and the CLI relate (as `virsh net-define` vs `net-start`):
//! the file is the definition; `kvnet daemon` starts from it and `kvnet
//! apply FILE` (or SIGHUP) makes the running state what the file says,
//! touching only what differs. CLI changes (`net add`, `port add`, ...) are
//! runtime-only until `kvnet save` writes the running state back to the
//! file the daemon last started from or applied.
mod parse;
mod schema;
mod spec;

pub use parse::*;
pub use schema::*;
pub use spec::*;

pub const DEFAULT_CONFIG: &str = "/etc/kvnet/kvnet.toml";
