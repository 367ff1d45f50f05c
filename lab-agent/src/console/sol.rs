//! [`SolSource`]: a host's console over IPMI Serial-over-LAN, one RMCP+
//! session per connection (see [`crate::ipmi::sol`]).

use std::io;
use std::net::SocketAddr;

use super::source::{ConsoleSource, SourceError};
use crate::ipmi::{ConnectOptions, IpmiClient, Secret, SolOptions, SolStream};

/// The console behind a BMC's SOL. Each `connect` opens a session and
/// activates SOL, deactivating a stale activation first; dropping the
/// connection deactivates it and closes the session.
#[derive(Debug, Clone)]
pub struct SolSource {
    endpoint: SocketAddr,
    user: String,
    password: Secret,
    options: ConnectOptions,
    /// SOL tuning (retransmits, keepalive, buffers).
    pub sol: SolOptions,
}

impl SolSource {
    /// A SOL console on the BMC at `endpoint`.
    pub fn new(
        endpoint: SocketAddr,
        user: String,
        password: Secret,
        options: ConnectOptions,
    ) -> Self {
        SolSource {
            endpoint,
            user,
            password,
            options,
            sol: SolOptions::default(),
        }
    }
}

impl ConsoleSource for SolSource {
    type Conn = SolStream;

    async fn connect(&self) -> Result<SolStream, SourceError> {
        let target = self.describe();
        let client = IpmiClient::connect(
            self.endpoint,
            &self.user,
            self.password.clone(),
            self.options.clone(),
        )
        .await
        .map_err(|e| SourceError::Connect {
            target: target.clone(),
            source: io::Error::other(e),
        })?;
        SolStream::activate(client, self.sol.clone())
            .await
            .map_err(|e| SourceError::Connect {
                target,
                source: io::Error::other(e),
            })
    }

    fn describe(&self) -> String {
        format!("sol:{}", self.endpoint)
    }

    async fn send_break(&self, conn: &mut SolStream) -> Result<(), SourceError> {
        conn.send_break()
            .await
            .map_err(|source| SourceError::Write {
                target: self.describe(),
                source,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describe_names_the_bmc_and_never_the_password() {
        let s = SolSource::new(
            "198.18.0.111:623".parse().unwrap(),
            "admin".into(),
            Secret::from_bytes(b"hunter2"),
            ConnectOptions::default(),
        );
        assert_eq!(s.describe(), "sol:198.18.0.111:623");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
