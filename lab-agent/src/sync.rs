//! Following lab-server: the agent lists its rack's hosts and the profile of
//! each one's lease, then watches the event log and lists again whenever a
//! lease or host changes. A lost connection is retried with backoff and
//! followed by a full resync (reconciliation, not a replay of missed events).
//!
//! This uses the public `lab.v1` API with the agent's token; a dedicated
//! agent stream (desired/actual power state) comes with the IPMI work.

use crate::hosts::{Arch, BootHost, Firmware, HostTable, Mac};
use lab_proto::v1 as pb;
use lab_proto::v1::event_service_client::EventServiceClient;
use lab_proto::v1::host_service_client::HostServiceClient;
use lab_proto::v1::lease_service_client::LeaseServiceClient;
use std::time::Duration;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tracing::{debug, info, warn};

/// Where and as whom to follow the server.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    pub server: String,
    pub token: Option<String>,
    pub rack: String,
    /// Profile of hosts that no lease (or a lease without profile) holds.
    pub default_profile: String,
}

/// Why one sync round failed; the loop retries.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("{server:?} is not a server URL")]
    BadUrl { server: String },
    #[error("cannot reach lab-server at {server}")]
    Connect {
        server: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("lab-server refused {call}")]
    Call {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
    #[error("host {host} has an unusable {field}: {value:?}")]
    BadHost {
        host: String,
        field: &'static str,
        value: String,
    },
}

#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Svc = InterceptedService<Channel, Bearer>;

struct Clients {
    hosts: HostServiceClient<Svc>,
    leases: LeaseServiceClient<Svc>,
    events: EventServiceClient<Svc>,
}

async fn connect(cfg: &SyncConfig) -> Result<Clients, SyncError> {
    let err = |source| SyncError::Connect {
        server: cfg.server.clone(),
        source,
    };
    let channel = Channel::from_shared(cfg.server.clone())
        .map_err(|_| SyncError::BadUrl {
            server: cfg.server.clone(),
        })?
        .connect_timeout(Duration::from_secs(5))
        // Notice a server that vanished without closing the connection.
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .keep_alive_while_idle(true)
        .connect()
        .await
        .map_err(err)?;
    let bearer = Bearer(
        cfg.token
            .as_ref()
            .and_then(|t| format!("Bearer {t}").parse().ok()),
    );
    Ok(Clients {
        hosts: HostServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        leases: LeaseServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        events: EventServiceClient::with_interceptor(channel, bearer),
    })
}

/// A host of the API as the boot services need it.
pub fn boot_host(h: &pb::Host, profile: String) -> Result<BootHost, SyncError> {
    let bad = |field, value: &str| SyncError::BadHost {
        host: h.name.clone(),
        field,
        value: value.to_owned(),
    };
    let mac: Mac = h.mac.parse().map_err(|_| bad("mac", &h.mac))?;
    let ipv4 = if h.ipv4.is_empty() {
        None
    } else {
        Some(h.ipv4.parse().map_err(|_| bad("ipv4", &h.ipv4))?)
    };
    let arch = match pb::Arch::try_from(h.arch) {
        Ok(pb::Arch::X8664) => Arch::X86_64,
        Ok(pb::Arch::Aarch64) => Arch::Aarch64,
        _ => return Err(bad("arch", &h.arch.to_string())),
    };
    let firmware = match pb::Firmware::try_from(h.firmware) {
        Ok(pb::Firmware::Bios) => Firmware::Bios,
        Ok(pb::Firmware::Uefi) => Firmware::Uefi,
        _ => return Err(bad("firmware", &h.firmware.to_string())),
    };
    let lease = (!h.lease_id.is_empty() && h.state == pb::HostState::Leased as i32)
        .then(|| h.lease_id.clone());
    Ok(BootHost {
        name: h.name.clone(),
        mac,
        ipv4,
        arch,
        firmware,
        profile,
        lease,
    })
}

/// List the rack's hosts with the profile each should boot now.
async fn resync(c: &mut Clients, cfg: &SyncConfig) -> Result<Vec<BootHost>, SyncError> {
    let hosts = c
        .hosts
        .list_hosts(pb::ListHostsRequest::default())
        .await
        .map_err(|source| SyncError::Call {
            call: "ListHosts",
            source,
        })?
        .into_inner()
        .hosts;
    let mut out = Vec::new();
    for h in hosts.iter().filter(|h| h.rack == cfg.rack) {
        let mut profile = cfg.default_profile.clone();
        if h.state == pb::HostState::Leased as i32 && !h.lease_id.is_empty() {
            let lease = c
                .leases
                .get_lease(pb::GetLeaseRequest {
                    lease_id: h.lease_id.clone(),
                })
                .await
                .map_err(|source| SyncError::Call {
                    call: "GetLease",
                    source,
                })?
                .into_inner();
            if !lease.profile.is_empty() {
                profile = lease.profile;
            }
        }
        match boot_host(h, profile) {
            Ok(b) => out.push(b),
            Err(e) => warn!(error = %e, "host skipped"),
        }
    }
    Ok(out)
}

/// Does this event change what some host should boot?
fn relevant(kind: i32) -> bool {
    use pb::EventKind as K;
    matches!(
        K::try_from(kind),
        Ok(K::LeaseGranted
            | K::LeaseReleased
            | K::LeaseExpired
            | K::HostAvailable
            | K::HostAdded
            | K::HostRemoved
            | K::HostRetired
            | K::InventoryLoaded)
    )
}

/// One connection's life: resync, then follow events until the stream ends.
async fn follow(cfg: &SyncConfig, table: &HostTable, synced: &mut bool) -> Result<(), SyncError> {
    let mut c = connect(cfg).await?;
    // Watch from the log's end first, then list: a change between the two
    // is not missed.
    let last_seq = c
        .events
        .list_events(pb::ListEventsRequest {
            after_seq: u64::MAX,
            limit: 1,
            ..Default::default()
        })
        .await
        .map_err(|source| SyncError::Call {
            call: "ListEvents",
            source,
        })?
        .into_inner()
        .last_seq;
    let mut stream = c
        .events
        .watch_events(pb::WatchEventsRequest {
            after_seq: last_seq,
            ..Default::default()
        })
        .await
        .map_err(|source| SyncError::Call {
            call: "WatchEvents",
            source,
        })?
        .into_inner();
    let hosts = resync(&mut c, cfg).await?;
    info!(rack = %cfg.rack, hosts = hosts.len(), "synced with lab-server");
    table.replace(hosts);
    *synced = true;
    loop {
        match stream.message().await {
            Ok(Some(e)) if relevant(e.kind) => {
                debug!(seq = e.seq, kind = e.kind, "change; resyncing");
                table.replace(resync(&mut c, cfg).await?);
            }
            Ok(Some(_)) => {}
            Ok(None) => return Ok(()),
            Err(source) => {
                return Err(SyncError::Call {
                    call: "WatchEvents",
                    source,
                });
            }
        }
    }
}

/// Follow the server for ever, reconnecting with backoff (1 s doubling to 30 s).
pub async fn run(cfg: SyncConfig, table: HostTable) {
    const FIRST: Duration = Duration::from_secs(1);
    let mut delay = FIRST;
    loop {
        let mut synced = false;
        let result = follow(&cfg, &table, &mut synced).await;
        if synced {
            // It worked for a while: the next failure starts the backoff afresh.
            delay = FIRST;
        }
        match result {
            Ok(()) => info!(retry_in = ?delay, "lab-server closed the event stream; reconnecting"),
            Err(e) => {
                warn!(error = %crate::error_chain(&e), retry_in = ?delay, "sync with lab-server failed")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}
