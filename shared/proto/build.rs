//! Compiles `proto/` with protox (pure Rust, so no system `protoc` is needed)
//! and generates prost messages plus tonic clients and servers.
//! The compiled descriptor set is kept in OUT_DIR for the wire-compatibility test.

use std::{env, fs, path::PathBuf};

use prost::Message;

const ROOTS: &[&str] = &["flyteidl/service/agent.proto"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(ROOTS, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("flotilla_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .codec_path("crate::codec::FlotillaCodec")
        // The deprecated fields are still on the wire; plugins read them.
        .compile_fds(fds)?;
    Ok(())
}
