//! Stand-in for `kvnet_tests::demo::run` until the demo lands in the
//! kvnet-tests library; `cargo xtask run` (no args) calls this.

use std::path::Path;

use anyhow::Result;

pub fn run(kvnet: &Path) -> Result<()> {
    println!(
        "demo not yet available (kvnet binary: {}); try `cargo xtask run -- --help`",
        kvnet.display()
    );
    Ok(())
}
