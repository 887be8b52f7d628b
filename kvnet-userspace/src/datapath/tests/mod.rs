//! BPF_PROG_RUN tests of the datapath, one file per concern (as Cilium's
//! `bpf/tests`): frames in, verdicts, output bytes and map changes out;
//! and a reference model of the whole decision with a differential fuzzer
//! that runs both on random map states and frames (issue 14).
mod frames;
mod fuzz;
mod guards;
mod model;
mod nat;
mod route;
