//! Generates the protocol types from `proto/chat/v1/chat.proto`.
//!
//! protox compiles the schema in pure Rust, so a fresh machine needs no
//! system `protoc`; prost-build turns the descriptors into Rust types and
//! pbjson-build into the canonical proto3 JSON mapping (serde impls) that the
//! WebSocket adapter speaks. All .proto files go through one protox call:
//! two calls for one package would write the same output file and the second
//! would overwrite the first.

use prost::Message as _;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/chat/v1/chat.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    let descriptors = fds.encode_to_vec();
    prost_build::Config::new().bytes(["."]).compile_fds(fds)?;
    pbjson_build::Builder::new().register_descriptors(&descriptors)?.build(&[".chat.v1"])?;
    Ok(())
}
