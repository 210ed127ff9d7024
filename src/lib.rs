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
//!                 api:: /v1/services, /readyz     push:: hub ──NDJSON stream──► router::
//!                                                      ▲                          │
//!                                                      └──── acks (revision) ─────┘
//!  lifecycle:: completes launch/terminate hooks once routers have acked (and drained)
//! ```
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod api;
pub mod cli;
pub mod cloud;
pub mod config;
pub mod controller;
pub mod events;
pub mod health;
pub mod lifecycle;
pub mod metrics;
pub mod model;
pub mod push;
pub mod reconcile;
pub mod registry;
pub mod router;
pub mod tags;

/// Resolves once `stop` says true (or its sender is gone). A function rather
/// than `wait_for` inline, so that no watch guard is held across an await.
pub(crate) async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}
