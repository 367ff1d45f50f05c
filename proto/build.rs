//! Compiles `lab/v1/*.proto` in pure Rust (protox): no `protoc` needed.
//! Also writes the encoded descriptor set that gRPC reflection serves.

use prost::Message;
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["lab/v1/lab.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    // compile_fds does not write the descriptor set: reflection needs it.
    std::fs::write(out.join("lab_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // Carries a BMC password: its Debug is written by hand, redacted.
        .skip_debug([".lab.v1.Bmc"])
        .compile_fds(fds)?;
    Ok(())
}
