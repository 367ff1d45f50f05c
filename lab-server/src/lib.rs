//! `lab-server`: the lab's control plane.
#![forbid(unsafe_code)]

pub mod events;
pub mod inventory;
pub mod lease;
pub mod store;
pub mod types;
