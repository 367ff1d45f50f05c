//! A small etcd v3 client over the vendored protos (`lab_proto::etcd`):
//! the KV calls the store needs, the lease calls of the election, the
//! endpoint list with failover, TLS and user/password authentication.
//!
//! Every call is retried on another member while the error says the call
//! may not have reached a working leader (UNAVAILABLE, a deadline, a broken
//! connection), with back-off, until [`EtcdConfig::retry_for`] runs out.
//! That is safe for reads; a write is only ever sent as a transaction whose
//! compares make a second application fail, so the caller (the store)
//! decides what an ambiguous retry did (see `EtcdStore::commit`).

use lab_proto::etcd::etcdserverpb as pb;
use lab_proto::etcd::etcdserverpb::auth_client::AuthClient;
use lab_proto::etcd::etcdserverpb::kv_client::KvClient;
use lab_proto::etcd::etcdserverpb::lease_client::LeaseClient;
use lab_types::Secret;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Code, Request, Status};

/// How lab-server reaches etcd (`--etcd-*` options).
#[derive(Clone)]
pub struct EtcdConfig {
    /// Client URLs of the members (`http://` or `https://`), tried in turn.
    pub endpoints: Vec<String>,
    /// Every key of the lab is under this prefix (`/lab/`).
    pub prefix: String,
    /// CA certificate (PEM) for `https://` endpoints; else the system's roots.
    pub ca: Option<PathBuf>,
    /// Client certificate and key (PEM) for etcd's `--client-cert-auth`.
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// etcd user and password (`--etcd-user`, the password from a file or
    /// the environment, never the command line).
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// One call's deadline on one member.
    pub request_timeout: Duration,
    /// How long a call is retried on the members before it fails.
    pub retry_for: Duration,
    /// The most operations one transaction may hold: etcd's
    /// `--max-txn-ops` (its default, 128, is too small: see
    /// docs/multi-site.md). A batch that needs more is refused before it
    /// is sent.
    pub max_txn_ops: usize,
}

impl std::fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("ca", &self.ca)
            .field("cert", &self.cert)
            .field("key", &self.key)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("request_timeout", &self.request_timeout)
            .field("retry_for", &self.retry_for)
            .field("max_txn_ops", &self.max_txn_ops)
            .finish()
    }
}

impl EtcdConfig {
    /// Plaintext endpoints, no auth, the default timeouts and prefix.
    pub fn new(endpoints: Vec<String>) -> Self {
        Self {
            endpoints,
            prefix: "/lab/".into(),
            ca: None,
            cert: None,
            key: None,
            user: None,
            password: None,
            request_timeout: Duration::from_secs(3),
            retry_for: Duration::from_secs(30),
            max_txn_ops: 16_384,
        }
    }
}

/// Why an etcd call failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("no etcd endpoint given")]
    NoEndpoints,
    #[error("bad etcd endpoint {url}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    #[error("cannot read {what} {}", path.display())]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--etcd-cert and --etcd-key go together")]
    HalfIdentity,
    #[error("a user name needs a password and a password a user name")]
    HalfAuth,
    #[error("etcd refused {op} at {endpoint}")]
    Refused {
        op: &'static str,
        endpoint: String,
        #[source]
        source: Status,
    },
    #[error("etcd {op}: no member answered usefully within {waited:?}")]
    Unavailable {
        op: &'static str,
        waited: Duration,
        #[source]
        last: Status,
    },
    #[error(
        "{op} needs {ops} operations in one etcd transaction; the limit is {max} (--etcd-max-txn-ops, etcd's --max-txn-ops)"
    )]
    TooManyOps {
        op: &'static str,
        ops: usize,
        max: usize,
    },
}

/// The members, the one in use, and the auth token.
pub struct EtcdClient {
    config: EtcdConfig,
    members: Vec<(String, Channel)>,
    current: AtomicUsize,
    token: Mutex<Option<AsciiMetadataValue>>,
}

impl std::fmt::Debug for EtcdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdClient")
            .field("endpoints", &self.config.endpoints)
            .field("current", &self.current.load(Ordering::Relaxed))
            .finish()
    }
}

/// Errors worth trying again on another member: the call may not have
/// reached a working leader, or its answer was lost.
fn retriable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Cancelled
            | Code::Aborted
    ) || s.message().contains("leader changed")
        || s.message().contains("no leader")
}

/// etcd's "invalid auth token" (expired, or the member restarted).
fn token_expired(s: &Status) -> bool {
    s.code() == Code::Unauthenticated || s.message().contains("invalid auth token")
}

fn read(what: &'static str, path: &PathBuf) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        what,
        path: path.clone(),
        source,
    })
}

impl EtcdClient {
    /// Channels to every member, connected lazily. Must run inside a tokio
    /// runtime (the one that will drive the calls).
    pub fn new(config: EtcdConfig) -> Result<Self, EtcdError> {
        if config.endpoints.is_empty() {
            return Err(EtcdError::NoEndpoints);
        }
        if config.cert.is_some() != config.key.is_some() {
            return Err(EtcdError::HalfIdentity);
        }
        if config.user.is_some() != config.password.is_some() {
            return Err(EtcdError::HalfAuth);
        }
        let mut tls = None;
        if config.endpoints.iter().any(|u| u.starts_with("https://")) {
            let mut t = ClientTlsConfig::new();
            t = match &config.ca {
                Some(ca) => t.ca_certificate(Certificate::from_pem(read("CA file", ca)?)),
                None => t.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&config.cert, &config.key) {
                t = t.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client key", key)?,
                ));
            }
            tls = Some(t);
        }
        let mut members = Vec::new();
        for url in &config.endpoints {
            let bad = |source| EtcdError::Endpoint {
                url: url.clone(),
                source,
            };
            let mut e = Endpoint::from_shared(url.clone())
                .map_err(bad)?
                .connect_timeout(Duration::from_secs(1))
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(1))
                .keep_alive_timeout(Duration::from_secs(2))
                .keep_alive_while_idle(true);
            if let (true, Some(t)) = (url.starts_with("https://"), &tls) {
                e = e.tls_config(t.clone()).map_err(bad)?;
            }
            members.push((url.clone(), e.connect_lazy()));
        }
        Ok(Self {
            config,
            members,
            current: AtomicUsize::new(0),
            token: Mutex::new(None),
        })
    }

    pub fn config(&self) -> &EtcdConfig {
        &self.config
    }

    /// The member calls go to now.
    pub fn current_endpoint(&self) -> &str {
        &self.members[self.current.load(Ordering::Relaxed) % self.members.len()].0
    }

    fn request<M>(&self, msg: M) -> Request<M> {
        let mut r = Request::new(msg);
        if let Some(t) = self.token.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            r.metadata_mut().insert("token", t);
        }
        r
    }

    /// Get an auth token from the member `channel` (when a user is set).
    async fn authenticate(&self, channel: Channel) -> Result<(), Status> {
        let (Some(user), Some(password)) = (&self.config.user, &self.config.password) else {
            return Ok(());
        };
        let password = String::from_utf8(password.expose().to_vec())
            .map_err(|_| Status::invalid_argument("the etcd password is not UTF-8"))?;
        let resp = AuthClient::new(channel)
            .authenticate(pb::AuthenticateRequest {
                name: user.clone(),
                password,
            })
            .await?
            .into_inner();
        let mut token: AsciiMetadataValue = MetadataValue::try_from(resp.token.as_str())
            .map_err(|_| Status::internal("etcd returned an auth token that is not ASCII"))?;
        // Never in a debug print of the request.
        token.set_sensitive(true);
        *self.token.lock().unwrap_or_else(|p| p.into_inner()) = Some(token);
        Ok(())
    }

    /// Run `f` on the current member, moving to the next one and trying
    /// again while the error is retriable, for at most `retry_for`.
    pub async fn call<T, F, Fut>(&self, op: &'static str, mut f: F) -> Result<T, EtcdError>
    where
        F: FnMut(Channel, Request<()>) -> Fut,
        Fut: Future<Output = Result<T, Status>>,
    {
        let started = Instant::now();
        let mut delay = Duration::from_millis(25);
        let mut authenticated = self.config.user.is_none()
            || self
                .token
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_some();
        loop {
            let i = self.current.load(Ordering::Relaxed) % self.members.len();
            let (url, channel) = &self.members[i];
            let attempt = async {
                if !authenticated {
                    self.authenticate(channel.clone()).await?;
                }
                f(channel.clone(), self.request(())).await
            };
            let last = match tokio::time::timeout(self.config.request_timeout, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(s)) if token_expired(&s) && self.config.user.is_some() => {
                    authenticated = false;
                    s
                }
                Ok(Err(s)) if retriable(&s) => s,
                Ok(Err(source)) => {
                    return Err(EtcdError::Refused {
                        op,
                        endpoint: url.clone(),
                        source,
                    });
                }
                Err(_) => Status::deadline_exceeded(format!(
                    "no answer from {url} within {:?}",
                    self.config.request_timeout
                )),
            };
            // An expired token: authenticate again on the same member;
            // anything else: the next member.
            if authenticated || !token_expired(&last) {
                let _ = self.current.compare_exchange(
                    i,
                    (i + 1) % self.members.len(),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            let waited = started.elapsed();
            if waited + delay > self.config.retry_for {
                return Err(EtcdError::Unavailable { op, waited, last });
            }
            tracing::debug!(op, endpoint = %url, error = %last, "etcd call failed; trying again");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(400));
        }
    }

    /// One transaction.
    pub async fn txn(
        &self,
        op: &'static str,
        txn: pb::TxnRequest,
    ) -> Result<pb::TxnResponse, EtcdError> {
        let ops = txn
            .success
            .len()
            .max(txn.failure.len())
            .max(txn.compare.len());
        if ops > self.config.max_txn_ops {
            return Err(EtcdError::TooManyOps {
                op,
                ops,
                max: self.config.max_txn_ops,
            });
        }
        self.call(op, |ch, req| {
            let (meta, ext, ()) = req.into_parts();
            let req = Request::from_parts(meta, ext, txn.clone());
            async move {
                Ok(KvClient::new(ch)
                    .max_decoding_message_size(usize::MAX)
                    .max_encoding_message_size(usize::MAX)
                    .txn(req)
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// One range read.
    pub async fn range(
        &self,
        op: &'static str,
        range: pb::RangeRequest,
    ) -> Result<pb::RangeResponse, EtcdError> {
        self.call(op, |ch, req| {
            let (meta, ext, ()) = req.into_parts();
            let req = Request::from_parts(meta, ext, range.clone());
            async move {
                Ok(KvClient::new(ch)
                    .max_decoding_message_size(usize::MAX)
                    .range(req)
                    .await?
                    .into_inner())
            }
        })
        .await
    }

    /// A new etcd lease of `ttl`; returns its id.
    pub async fn lease_grant(&self, ttl: Duration) -> Result<i64, EtcdError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        self.call("grant an etcd lease", |ch, req| {
            let (meta, ext, ()) = req.into_parts();
            let req = Request::from_parts(meta, ext, pb::LeaseGrantRequest { ttl, id: 0 });
            async move { Ok(LeaseClient::new(ch).lease_grant(req).await?.into_inner().id) }
        })
        .await
    }

    /// Revoke an etcd lease (its keys go with it).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), EtcdError> {
        self.call("revoke an etcd lease", |ch, req| {
            let (meta, ext, ()) = req.into_parts();
            let req = Request::from_parts(meta, ext, pb::LeaseRevokeRequest { id });
            async move {
                match LeaseClient::new(ch).lease_revoke(req).await {
                    Ok(_) => Ok(()),
                    // Revoked already, or expired.
                    Err(s) if s.code() == Code::NotFound => Ok(()),
                    Err(s) => Err(s),
                }
            }
        })
        .await
    }

    /// Keep an etcd lease alive once; returns its remaining TTL in seconds
    /// (0 or less: it is gone).
    pub async fn lease_keep_alive_once(&self, id: i64) -> Result<i64, EtcdError> {
        self.call("keep an etcd lease alive", |ch, req| {
            let (meta, ext, ()) = req.into_parts();
            let stream = futures::stream::iter([pb::LeaseKeepAliveRequest { id }]);
            let req = Request::from_parts(meta, ext, stream);
            async move {
                let mut resp = LeaseClient::new(ch)
                    .lease_keep_alive(req)
                    .await?
                    .into_inner();
                match resp.message().await? {
                    Some(r) => Ok(r.ttl),
                    None => Err(Status::unavailable("the keep-alive stream closed")),
                }
            }
        })
        .await
    }
}
