//! signpost's controller: watches Auto Scaling groups, keeps the registry,
//! health-checks endpoints, pushes endpoint sets to routers and completes
//! lifecycle hooks once every router has confirmed a change. No agent runs
//! on the instances.
//!
//! ```text
//!  AWS Auto Scaling + EC2 ──poll (resync)──► cloud:: complete fleet listing
//!  SQS (hooks, EventBridge) ──► events:: hints ──┘    ▼
//!                            reconcile:: plan(fleet, snapshot) -> changes
//!                                                 ▼
//!                health:: probes ──verdicts──► registry:: services → endpoints, revision
//!                                                 ▼ watch (immutable snapshots)
//!                 api:: /v1/services, /readyz     push:: hub ──NDJSON stream──► routers
//!                                                      │                          │
//!                                   routers:: what each router applied ◄── acks ──┘
//!                                                      ▼
//!                 xds:: ADS (SotW) ──────► Envoy, gRPC ── ACK/NACK, LRS ──► routers::
//!  lifecycle:: completes launch/terminate hooks once every client has acked (and drained)
//! ```
//!
//! This crate uses the protocol crate and nothing else of signpost's; the
//! data plane (`signpost-router`) never uses this crate.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod auth;
pub mod cloud;
pub mod config;
pub mod endpoints;
pub mod events;
pub mod guard;
pub mod health;
#[cfg(test)]
mod json_contract;
pub mod lease;
pub mod lifecycle;
pub mod listener;
pub mod metrics;
pub mod model;
pub mod push;
pub mod reconcile;
pub mod registry;
pub mod reload;
pub mod routers;
mod run;
/// A simulated account at scale behind `cloud::AutoScaling` (benchmarks).
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod tags;
pub mod tls;
pub mod xds;

pub use config::Config;
pub use run::run;
