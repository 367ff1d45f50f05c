//! Compiles `lab/v1/*.proto` in pure Rust (protox): no `protoc` needed.
//! Also writes the encoded descriptor set that gRPC reflection serves.
//!
//! The vendored etcd v3 protos under `etcd/api/` (see the comment at the
//! top of each) are compiled the same way, client side only, for
//! lab-server's etcd store; they are not part of the reflection set.

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

    let etcd = [
        "etcd/api/etcdserverpb/rpc.proto",
        "etcd/api/mvccpb/kv.proto",
        "etcd/api/authpb/auth.proto",
    ];
    for f in etcd {
        println!("cargo:rerun-if-changed={f}");
    }
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        // Carry passwords and tokens: their Debug is written by hand.
        .skip_debug([
            ".etcdserverpb.AuthenticateRequest",
            ".etcdserverpb.AuthenticateResponse",
        ])
        .compile_fds(protox::compile(etcd, ["."])?)?;
    Ok(())
}
