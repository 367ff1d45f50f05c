//! Domain types that lab-server, lab-agent and the CLI share, with one
//! definition each: validated names ([`names`]), lease ids, MAC addresses
//! ([`mac`]), host architecture and firmware ([`arch`]), secrets that never
//! print ([`secret`]), OpenSSH public keys with their fingerprints
//! ([`ssh`]), `path:line:column` configuration errors ([`config`])
//! and [`error_chain`] for logging an error with its causes.
//!
//! Nothing here does I/O or knows about gRPC: the protobuf conversions live
//! at the edges (the server's `grpc/` and the agent's link).

pub mod arch;
pub mod config;
pub mod mac;
pub mod names;
pub mod secret;
pub mod ssh;

pub use arch::{Arch, Firmware};
pub use config::{EntryNames, FileError, line_column};
pub use mac::{InvalidMac, MacAddr};
pub use names::{Flag, HostName, InvalidName, LeaseId, Principal, ProfileName, RackName};
pub use secret::Secret;
pub use ssh::{InvalidSshKey, SshPublicKey};

/// An error and its sources on one line: `outer: cause: root cause`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn error_chain_joins_sources() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(super::error_chain(&e), "outer: inner");
    }
}
