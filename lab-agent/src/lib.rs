//! `lab-agent`: the rack agent. It makes a leased host boot what its holder
//! asked for.
//!
//! - [`hosts`]: the rack's hosts and each one's current boot profile.
//! - [`dhcp`]: DHCPv4 (authoritative or proxy) that points PXE firmware and
//!   iPXE at the right boot file; pure decisions, one socket loop.
//! - [`tftp`]: read-only TFTP (RFC 1350 + blksize/tsize/timeout/windowsize),
//!   confined to the assets root and the per-host generated files.
//! - [`http`]: the same content over HTTP (faster for kernels and initrds).
//! - [`assets`]: the confined asset root and the rendering of per-host iPXE
//!   scripts from `pxe-assets/` templates.
#![forbid(unsafe_code)]

pub mod assets;
pub mod dhcp;
pub mod hosts;
pub mod http;
pub mod tftp;
