//! Compiles the `.proto` files with protox (a protobuf compiler in Rust) and generates the
//! prost messages and tonic clients and servers from its descriptor set, so building Rampart
//! needs no system `protoc`.

use std::{env, path::PathBuf};

const PROTO_ROOT: &str = "proto";
const FILES: &[&str] = &[
    "proto/rampart/control/v1/common.proto",
    "proto/rampart/control/v1/frontend.proto",
    "proto/rampart/control/v1/agent.proto",
    "proto/rampart/control/v1/operator.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for file in FILES {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(FILES, [PROTO_ROOT])?;

    // The encoded descriptor set ships with the crate, for gRPC reflection and for tools that
    // generate independent clients from exactly what this build compiled.
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    std::fs::write(
        out_dir.join("rampart_descriptor.bin"),
        prost::Message::encode_to_vec(&descriptors),
    )?;

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}
