//! Builds the load generator's XDP programs (`loadgen-ebpf`) for `bpfel-unknown-none` into
//! `OUT_DIR/loadgen-xdp`, where `src/xdp.rs` embeds them (see `ebpf-build` for the tool chain).

fn main() {
    let manifest_dir = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    // The package's binary target `loadgen-xdp` names the object.
    ebpf_build::build_or_exit("loadgen-ebpf", &manifest_dir.join("ebpf"), &["loadgen-xdp"]);
}
