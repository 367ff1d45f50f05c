//! `lab-server`: the lab's control plane.
//!
//! A tour, from the wire inwards:
//! - [`grpc`]: thin tonic handlers for `lab.v1` (plus health and reflection);
//!   errors become statuses in `grpc::status` only.
//! - [`auth`]: bearer tokens → principal and role.
//! - [`core`]: the actor that owns all state, batches requests into one
//!   durable commit, enforces TTLs and runs the queue.
//! - [`lease`]: the pure lease/host state machines and the grant rule.
//! - [`store`]: the storage trait with compare-and-set, on redb.
//! - [`inventory`]: `inventory.toml`, raw and validated.
//! - [`events`], [`types`]: the event record; typed ids.
#![forbid(unsafe_code)]

pub mod agents;
pub mod auth;
pub mod core;
pub mod events;
pub mod grpc;
pub mod inventory;
pub mod lease;
pub mod store;
pub mod types;
