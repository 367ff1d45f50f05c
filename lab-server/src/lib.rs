//! `lab-server`: the lab's control plane.
#![forbid(unsafe_code)]

pub mod types;
