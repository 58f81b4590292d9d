//! Link options for the BPF object (only when building for the BPF target; the host build of
//! this crate, used by `cargo clippy --workspace`, links nothing special).

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|arch| arch == "bpf") {
        // bpf-linker asks LLVM to expand memcpy "in order" by default, which leaves memset
        // (zeroing a struct, a run of zero stores merged by the optimizer) as a call to a
        // byte-at-a-time `memset` BPF function. The generic expansion turns it into a few wide
        // stores instead.
        println!("cargo::rustc-link-arg-bins=--disable-expand-memcpy-in-order");
    }
}
