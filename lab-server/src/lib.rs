//! `lab-server`: the lab's control plane.
//!
//! A tour, from the wire inwards:
//! - [`grpc`]: thin tonic handlers for `lab.v1` (plus health and reflection)
//!   and the `AgentService.Attach` adapter (`grpc/agent.rs`); requests are
//!   converted in `grpc::convert`, domain errors become statuses in
//!   `grpc::status` only. Nothing outside `grpc` knows tonic or `lab.v1`
//!   (besides `main.rs`, which serves).
//! - [`auth`]: bearer tokens → principal and role.
//! - [`core`]: the actor that owns all state, batches requests into one
//!   durable commit, enforces TTLs and runs the queue; the clock; the
//!   reclaim hook; `core::policy`, every "who may do what" rule.
//! - [`racks`]: the rack registry — one link per rack agent, the desired
//!   state pushed down it, reports (reachability, provisioning), commands
//!   (power, consoles, console logs, forwards to hosts' ports) and the
//!   agents' reclaim step.
//! - [`lease`]: the pure lease/host state machines and the grant rule.
//! - [`health`]: fleet health; failure attribution (host, job, infra).
//! - [`store`]: the storage trait with compare-and-set, on redb.
//! - [`inventory`]: `inventory.toml`, raw and validated.
//! - [`metrics`]: the OpenMetrics registry of `/metrics`; [`web`]: the web
//!   port (`--web-listen`): `/metrics` and the dashboard.
//! - [`webhooks`]: the webhooks file, the outbox rows the core writes with
//!   its events, and the task that delivers them (signed, with back-off).
//! - [`events`], [`types`]: the event record; typed ids.
//!
//! (`fuzzing`, hidden from these docs, holds the entry points of the fuzz
//! targets in `fuzz/`.)
#![forbid(unsafe_code)]

pub mod auth;
pub mod core;
pub mod events;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod health;
pub mod inventory;
pub mod lease;
pub mod metrics;
pub mod projects;
pub mod racks;
pub mod store;
pub mod types;
pub mod web;
pub mod webhooks;
