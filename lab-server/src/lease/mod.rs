//! Leases: the pure lease and host state machines (`machine`) and the wait
//! queue with its grant rule (`queue`). No I/O, no clock, no tokio here.

pub mod booking;
pub mod fair;
pub mod machine;
pub mod queue;

pub use machine::{
    HostEvent, HostRecord, HostState, Lease, LeaseEvent, LeaseState, TransitionError,
};
pub use queue::{Candidate, LeaseSpec, Queue, Waiter};
