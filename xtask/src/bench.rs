//! `cargo xtask bench`: placeholder until the benchmark harness lands.

use anyhow::Result;

pub fn bench(quick: bool) -> Result<()> {
    let mode = if quick { " (--quick)" } else { "" };
    println!("bench{mode}: not yet implemented; nothing was run");
    Ok(())
}
