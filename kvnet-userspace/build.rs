//! Builds the eBPF datapath (kvnet-ebpf) for bpfel-unknown-none with the
//! nightly toolchain, so `cargo build` never embeds a stale object.
fn main() -> anyhow::Result<()> {
    println!("cargo:rerun-if-changed=../kvnet-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "kvnet-ebpf",
            root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../kvnet-ebpf"),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
