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

/// `routers` checks `[routers] expected` ids with `auth::valid_id`; the
/// `auth` module is the API's middleware (axum, rustls), so this is a copy
/// of that one function. The corpus replay (`tests/fuzz_corpus.rs`) runs
/// the controller's own.
pub mod auth {
    pub fn valid_id(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= 253
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    }
}

#[path = "../checks.rs"]
pub mod checks;
