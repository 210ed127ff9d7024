//! Push: the controller streams the registry to routers, and routers say
//! what they have applied.
//!
//! ```text
//!  registry ──watch──► hub:: one feeder task per subscribed router
//!                        │  GET /v1/watch?router=ID&protocol=1
//!                        ▼  NDJSON: snapshot, then deltas (base → revision), pings
//!                     router ──POST /v1/routers/{id}/ack──► hub ──► routers::Routers
//!                                                          GET /v1/routers
//! ```
//!
//! The transport is a long-lived HTTP/1.1 response of newline-delimited JSON:
//! no code generation, it passes any HTTP proxy, and `curl -N` can read it.
//! The messages are `signpost_protocol`'s; `encode` turns registry snapshots
//! into them and `hub` serves them.

pub mod encode;
pub mod hub;
