#![no_std]
// The datapath is src/main.rs, built for bpfel-unknown-none by aya-build.
