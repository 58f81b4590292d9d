//! Builds the XDP program (`relay-ebpf`) for `bpfel-unknown-none` and leaves the objects in
//! `OUT_DIR/rampart-xdp`, `OUT_DIR/rampart-steer` and `OUT_DIR/rampart-gather`, where
//! `src/lib.rs`, `src/steering.rs` and `src/gathering.rs` embed them (see `ebpf-build` for the
//! tool chain).

fn main() {
    let manifest_dir = std::path::PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let root_dir = manifest_dir
        .ancestors()
        .nth(2)
        .expect("relay-user/xdp is inside the workspace")
        .join("relay-ebpf");
    // The package's binary targets name the objects: the XDP program and the reuseport one.
    ebpf_build::build_or_exit(
        "relay-ebpf",
        &root_dir,
        &["rampart-xdp", "rampart-steer", "rampart-gather"],
    );
}
