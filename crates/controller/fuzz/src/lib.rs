//! The controller's input parsers, built without the AWS SDK: the modules
//! that read SQS bodies, tags, the config file and xDS versions are pulled
//! in from `../src` by path, at the same crate paths (`crate::model`,
//! `crate::routers`, ...) they have in the controller, so that their
//! `use crate::...` lines resolve unchanged. An instrumented build of the
//! controller crate itself would compile the SDK (20-40 minutes here).
//!
//! The push protocol (lines, acks) is `signpost-protocol`, a dependency.
#![allow(dead_code, unused_imports, clippy::all)]

#[path = "../../src/config.rs"]
pub mod config;
#[path = "../../src/events/message.rs"]
pub mod events;
#[path = "../../src/guard.rs"]
pub mod guard;
#[path = "../../src/model.rs"]
pub mod model;
#[path = "../../src/routers.rs"]
pub mod routers;
#[path = "../../src/tags.rs"]
pub mod tags;
#[path = "../../src/xds/version.rs"]
mod xds_version;

pub mod xds {
    pub use crate::xds_version::Version;
}

#[path = "../checks.rs"]
pub mod checks;
