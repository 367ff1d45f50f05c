//! Exactly one active core: leader election on an etcd lease.
//!
//! The election key (`<prefix>election/leader`) holds the leader's address
//! (what clients are told to use) and is attached to an etcd lease of
//! [`Election::ttl`] (2 s) that the leader keeps alive three times per TTL.
//! A server campaigns by creating the key if it does not exist (one
//! transaction: compare create revision 0, put with its lease); the key's
//! create revision, unique in etcd's history, is the leader's **fence**:
//! every write of the store then compares it ([`super::EtcdStore::set_fence`]),
//! so once the key is gone (the lease expired or was revoked) or belongs to
//! another server, nothing this server sends can land.
//!
//! Standbys campaign again every [`Election::poll`] (250 ms), and report
//! the leader they see meanwhile. A leader that is told its lease is gone,
//! or cannot refresh it for [`GIVE_UP_AFTER`], has lost: [`Leadership::lost`]
//! resolves and lab-server exits (its service manager starts it again, as a
//! standby). Its writes are refused by the fence from the moment the lease
//! expires in etcd, whatever it believes.

use super::client::{EtcdClient, EtcdError};
use super::{Fence, get, kvs};
use lab_proto::etcd::etcdserverpb as pb;
use lab_proto::etcd::etcdserverpb::compare::{CompareResult, CompareTarget, TargetUnion};
use lab_proto::etcd::etcdserverpb::request_op::Request as Op;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// One server's campaign.
#[derive(Debug, Clone)]
pub struct Election {
    client: Arc<EtcdClient>,
    key: Vec<u8>,
    /// What the key says about this server: the address clients use.
    me: String,
    /// The election lease's TTL.
    pub ttl: Duration,
    /// How often a standby tries again.
    pub poll: Duration,
}

/// What one campaign found.
#[derive(Debug)]
pub enum Campaign {
    /// This server leads now.
    Won(Leadership),
    /// Another server leads (its address, if it said one).
    Lost { leader: Option<String> },
}

/// This server's leadership: the fence for its writes, and the task that
/// keeps the lease alive.
#[derive(Debug)]
pub struct Leadership {
    pub fence: Fence,
    pub lease: i64,
    lost: watch::Receiver<bool>,
    keeper: tokio::task::JoinHandle<()>,
    client: Arc<EtcdClient>,
}

impl Leadership {
    /// Resolves when the leadership is lost (the lease could not be kept
    /// alive, or is gone).
    pub async fn lost(&mut self) {
        let _ = self.lost.wait_for(|lost| *lost).await;
    }

    /// Give the leadership up now (a graceful stop): the key goes with the
    /// lease, and a standby takes over at once.
    pub async fn resign(self) {
        self.keeper.abort();
        if let Err(e) = self.client.lease_revoke(self.lease).await {
            tracing::warn!(error = %e, "could not revoke the election lease; it expires by itself");
        }
    }
}

impl Election {
    /// `prefix`: the store's key prefix; `me`: this server's address for
    /// clients (`--advertise`).
    pub fn new(client: Arc<EtcdClient>, prefix: &str, me: String) -> Self {
        Self {
            client,
            key: format!("{prefix}election/leader").into_bytes(),
            me,
            ttl: Duration::from_secs(2),
            poll: Duration::from_millis(250),
        }
    }

    /// The election key.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// The leader's address now, if there is one.
    pub async fn leader(&self) -> Result<Option<String>, EtcdError> {
        let r = self
            .client
            .range(
                "read the election key",
                pb::RangeRequest {
                    key: self.key.clone(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(r.kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    /// Try once to become the leader.
    pub async fn campaign(&self) -> Result<Campaign, EtcdError> {
        if let Some(leader) = self.leader().await? {
            return Ok(Campaign::Lost {
                leader: Some(leader),
            });
        }
        let lease = self.client.lease_grant(self.ttl).await?;
        let resp = self
            .client
            .txn(
                "campaign",
                pb::TxnRequest {
                    compare: vec![pb::Compare {
                        result: CompareResult::Equal as i32,
                        target: CompareTarget::Create as i32,
                        key: self.key.clone(),
                        range_end: Vec::new(),
                        target_union: Some(TargetUnion::CreateRevision(0)),
                    }],
                    success: vec![pb::RequestOp {
                        request: Some(Op::RequestPut(pb::PutRequest {
                            key: self.key.clone(),
                            value: self.me.clone().into_bytes(),
                            lease,
                            ..Default::default()
                        })),
                    }],
                    failure: vec![get(self.key.clone())],
                },
            )
            .await;
        let resp = match resp {
            Ok(r) => r,
            Err(e) => {
                let _ = self.client.lease_revoke(lease).await;
                return Err(e);
            }
        };
        if !resp.succeeded {
            // (If an earlier send of this campaign had landed, the key is
            // ours: revoking the lease removes it, and the next campaign
            // starts clean.)
            let _ = self.client.lease_revoke(lease).await;
            return Ok(Campaign::Lost {
                leader: kvs(&resp, 0)
                    .first()
                    .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()),
            });
        }
        let revision = resp.header.map_or(0, |h| h.revision);
        let fence = Fence {
            key: self.key.clone(),
            create_revision: revision,
        };
        let (tx, lost) = watch::channel(false);
        let keeper = tokio::spawn(keep_alive(self.client.clone(), lease, self.ttl, tx));
        Ok(Campaign::Won(Leadership {
            fence,
            lease,
            lost,
            keeper,
            client: self.client.clone(),
        }))
    }

    /// Campaign until this server leads; `leader` is told who leads
    /// meanwhile. Errors (etcd unreachable) are logged and tried again.
    pub async fn until_leader(&self, leader: &watch::Sender<Option<String>>) -> Leadership {
        let mut last_error = None::<String>;
        loop {
            match self.campaign().await {
                Ok(Campaign::Won(l)) => return l,
                Ok(Campaign::Lost { leader: who }) => {
                    leader.send_if_modified(|old| {
                        let changed = *old != who;
                        *old = who.clone();
                        changed
                    });
                    last_error = None;
                }
                Err(e) => {
                    let text = e.to_string();
                    if last_error.as_ref() != Some(&text) {
                        tracing::warn!(error = %crate::core::error_chain(&e), "campaign for the lead failed; trying again");
                    }
                    last_error = Some(text);
                }
            }
            tokio::time::sleep(self.poll).await;
        }
    }
}

/// How long a leader goes without refreshing its election lease before it
/// gives up. etcd keeps a lease alive across its own leader elections
/// (the new etcd leader extends every lease), so failed keep-alives alone
/// do not mean the lease is gone; and safety does not rest on this bound:
/// once the lease has expired, the fence refuses every write. It bounds how
/// long a server cut off from etcd goes on answering reads.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(10);

/// Keep `lease` alive every third of `ttl`; say `lost` when etcd says it is
/// gone, or when it could not be refreshed for [`GIVE_UP_AFTER`].
async fn keep_alive(client: Arc<EtcdClient>, lease: i64, ttl: Duration, lost: watch::Sender<bool>) {
    let mut refreshed = Instant::now();
    let every = ttl / 3;
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(ttl, client.lease_keep_alive_once(lease)).await {
            Ok(Ok(remaining)) if remaining > 0 => refreshed = Instant::now(),
            Ok(Ok(_)) => {
                tracing::error!(lease, "the election lease is gone");
                let _ = lost.send(true);
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %crate::core::error_chain(&e), "could not keep the election lease alive");
            }
            Err(_) => {
                tracing::warn!(
                    ?ttl,
                    "keeping the election lease alive took longer than its TTL"
                );
            }
        }
        if refreshed.elapsed() >= GIVE_UP_AFTER {
            tracing::error!(lease, after = ?GIVE_UP_AFTER, "the election lease could not be kept alive");
            let _ = lost.send(true);
            return;
        }
    }
}
