//! signpost: service discovery for AWS Auto Scaling groups, done from the
//! infrastructure side. No agent runs on the instances.
//!
//! ```text
//!  AWS Auto Scaling + EC2 ──poll (resync)──► cloud:: complete fleet listing
//!                                                 ▼
//!                            reconcile:: plan(fleet, snapshot) -> changes
//!                                                 ▼
//!                health:: probes ──verdicts──► registry:: services → endpoints, revision
//!                                                 ▼ watch (immutable snapshots)
//!                                    api:: /v1/services, /readyz
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod health;
pub mod model;
pub mod reconcile;
pub mod registry;
pub mod tags;
