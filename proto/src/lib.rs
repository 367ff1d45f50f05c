//! `lab-proto`: the `lab.v1` gRPC contract and nothing else.
//!
//! The `.proto` files live in `proto/lab/v1/`; `build.rs` compiles them with
//! protox (pure Rust, no `protoc`). This crate exposes the generated messages,
//! clients and servers, the encoded descriptor set for gRPC reflection, and a
//! few conversions between protobuf well-known types and std types; and,
//! client side only, the etcd v3 API vendored under `proto/etcd/`
//! ([`etcd`]) for lab-server's etcd store.

#![forbid(unsafe_code)]

/// Generated code for package `lab.v1`.
pub mod v1 {
    #![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    tonic::include_proto!("lab.v1");
}

/// The etcd v3 API, client side only (lab-server's etcd store), from the
/// protos vendored under `proto/etcd/api/` (etcd v3.5, annotations
/// stripped; the wire format is that of etcd 3.4 and 3.5 alike).
pub mod etcd {
    #![allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
    /// `mvccpb`: keys, values and their revisions.
    pub mod mvccpb {
        tonic::include_proto!("mvccpb");
    }
    /// `authpb`: users, roles and permissions.
    pub mod authpb {
        tonic::include_proto!("authpb");
    }
    /// `etcdserverpb`: the KV, Watch, Lease, Cluster, Maintenance and Auth
    /// services.
    pub mod etcdserverpb {
        tonic::include_proto!("etcdserverpb");
    }

    /// Never prints the password.
    impl std::fmt::Debug for etcdserverpb::AuthenticateRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AuthenticateRequest")
                .field("name", &self.name)
                .field("password", &"***")
                .finish()
        }
    }

    /// Never prints the token.
    impl std::fmt::Debug for etcdserverpb::AuthenticateResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AuthenticateResponse")
                .field("header", &self.header)
                .field("token", &"***")
                .finish()
        }
    }
}

/// The BMC access an agent receives: printed without its password, so
/// that no `{:?}` of a message (or of a rack's state) can leak it.
impl std::fmt::Debug for v1::Bmc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bmc")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &"***")
            .finish()
    }
}

/// Encoded `FileDescriptorSet` of every lab proto file (and its imports),
/// as served by gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/lab_descriptor.bin"));

/// Conversions between protobuf well-known types and std types.
pub mod convert {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// A protobuf timestamp from milliseconds since the Unix epoch.
    pub fn timestamp_from_millis(ms: i64) -> prost_types::Timestamp {
        prost_types::Timestamp {
            seconds: ms.div_euclid(1000),
            nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
        }
    }

    /// Milliseconds since the Unix epoch from a protobuf timestamp,
    /// saturating: a peer's timestamp beyond ±292 million years (which a
    /// well-formed one never is) must not overflow.
    pub fn millis_from_timestamp(ts: &prost_types::Timestamp) -> i64 {
        ts.seconds
            .saturating_mul(1000)
            .saturating_add(i64::from(ts.nanos) / 1_000_000)
    }

    /// A `SystemTime` from a protobuf timestamp (clamped at the epoch).
    pub fn system_time(ts: &prost_types::Timestamp) -> SystemTime {
        let ms = millis_from_timestamp(ts);
        if ms <= 0 {
            UNIX_EPOCH
        } else {
            UNIX_EPOCH + Duration::from_millis(ms as u64)
        }
    }

    /// A protobuf timestamp from a `SystemTime` (clamped at the epoch).
    pub fn system_time_to_proto(t: SystemTime) -> prost_types::Timestamp {
        let ms = t
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        timestamp_from_millis(ms)
    }

    /// A protobuf duration from a std duration.
    pub fn duration_to_proto(d: Duration) -> prost_types::Duration {
        prost_types::Duration {
            seconds: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }

    /// A std duration from a protobuf duration; `None` when negative or malformed.
    pub fn duration_from_proto(d: &prost_types::Duration) -> Option<Duration> {
        if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
            return None;
        }
        Some(Duration::new(d.seconds as u64, d.nanos as u32))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn timestamp_round_trip_including_negative() {
            for ms in [0, 1, 999, 1000, 1_700_000_000_123, -1, -1001] {
                assert_eq!(millis_from_timestamp(&timestamp_from_millis(ms)), ms);
            }
        }

        #[test]
        fn out_of_range_timestamps_saturate() {
            let ts = |seconds, nanos| prost_types::Timestamp { seconds, nanos };
            assert_eq!(millis_from_timestamp(&ts(i64::MAX, 999_999_999)), i64::MAX);
            assert_eq!(millis_from_timestamp(&ts(i64::MIN, -999_999_999)), i64::MIN);
            assert_eq!(
                millis_from_timestamp(&ts(i64::MAX / 1000, 0)),
                i64::MAX / 1000 * 1000
            );
            assert_eq!(system_time(&ts(i64::MIN, 0)), UNIX_EPOCH);
        }

        #[test]
        fn bmc_debug_never_shows_the_password() {
            let b = crate::v1::Bmc {
                address: "198.18.0.101".into(),
                port: 623,
                user: "admin".into(),
                password: "hunter2".into(),
            };
            let host = crate::v1::AgentHost {
                bmc: Some(b),
                ..Default::default()
            };
            let text = format!("{host:?}");
            assert!(
                text.contains("198.18.0.101") && text.contains("***"),
                "{text}"
            );
            assert!(!text.contains("hunter2"), "{text}");
        }

        #[test]
        fn negative_duration_is_rejected() {
            let d = prost_types::Duration {
                seconds: -1,
                nanos: 0,
            };
            assert_eq!(duration_from_proto(&d), None);
            let d = duration_to_proto(Duration::from_millis(1500));
            assert_eq!(duration_from_proto(&d), Some(Duration::from_millis(1500)));
        }
    }
}
