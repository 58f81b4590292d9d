//! The boilerplate of an eBPF binary, written once.

/// What every eBPF binary of the project needs once: a panic handler (never run: the verifier
/// refuses any program with a reachable panic path), a GPL-compatible license section (the
/// kernel lets only those call the GPL-only helpers, `bpf_ktime_get_ns` and others), and, for
/// the host build that `cargo clippy --workspace` lints, a `main` saying what the binary is.
#[macro_export]
macro_rules! ebpf_binary {
    ($what:literal) => {
        #[cfg(target_arch = "bpf")]
        #[panic_handler]
        fn panic(_info: &core::panic::PanicInfo) -> ! {
            loop {}
        }

        #[unsafe(link_section = "license")]
        #[unsafe(no_mangle)]
        static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

        #[cfg(not(target_arch = "bpf"))]
        fn main() {
            eprintln!($what);
        }
    };
}
