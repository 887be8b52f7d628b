//! BPF_PROG_RUN tests of the datapath, one file per concern (as Cilium's
//! `bpf/tests`): frames in, verdicts, output bytes and map changes out.
mod guards;
mod nat;
mod route;
