//! `kvnet`: the daemon that owns the eBPF datapath, and its CLI.
fn main() -> std::process::ExitCode {
    kvnet_userspace::cli::main()
}
