//! The properties the controller's fuzz targets (`fuzz_targets/*.rs`) check
//! on every input, and `tests/fuzz_corpus.rs` on the committed corpora
//! (`corpus/<target>/`). Each function panics when a property fails; none
//! may panic for any other reason, whatever the input.
//!
//! Compiled twice: in the fuzz crate, where `crate::events`, `crate::tags`,
//! ... are the controller's source files pulled in by path, and in the
//! controller's replay test, where they are `signpost_controller`'s modules.
//!
//! | target        | input                                  | beyond "no panic"                                        |
//! |---------------|----------------------------------------|----------------------------------------------------------|
//! | `sqs_body`    | an SQS message body                    | what is read depends on the JSON alone; every group, instance and hook it names is a string of the body |
//! | `tags`        | default port, then `key=value` lines   | the service name alone agrees with the full read; what is read is valid (a health path the probe can request) and reads back from its own tags |
//! | `config`      | a config file                          | only parse errors or errors naming a key of the config; a valid config prints and reads back the same |
//! | `push_lines`  | NDJSON stream lines                    | a message re-encodes to one line and the same value; a refused message leaves the mirror as it was; the cache snapshot restores the same mirror |
//! | `ack`         | an ack body                            | re-encodes to the same value; counted as sent, in-flight totals never fall below one service's count, and "drained" means none in flight |
//! | `xds_version` | an ACK's `version_info`                | a version that reads is one signpost writes: it prints back to the same text |

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::Value;
use signpost_protocol::{Ack, Message, Mirror};

use crate::config::{Config, ConfigError};
use crate::events::{Event, EventError};
use crate::model::HealthCheck;
use crate::routers::Routers;
use crate::tags::{self, TagError};
use crate::xds::Version;

/// A target's check: panics when a property fails.
pub type Check = fn(&[u8]);

/// Every target by name, as `corpus/<name>/` is named.
pub const TARGETS: [(&str, Check); 6] = [
    ("sqs_body", sqs_body),
    ("tags", tags),
    ("config", config),
    ("push_lines", push_lines),
    ("ack", ack),
    ("xds_version", xds_version),
];

pub fn sqs_body(data: &[u8]) {
    // The SDK hands bodies over as text.
    let Ok(body) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = crate::events::parse(body);
    let Ok(value) = serde_json::from_str::<Value>(body) else {
        assert!(
            matches!(parsed, Err(EventError::NotJson(_))),
            "{body:?} is not JSON but read as {parsed:?}"
        );
        return;
    };
    // Spacing, key order and escapes do not change what a message says.
    let rewritten = value.to_string();
    assert_eq!(
        crate::events::parse(&rewritten),
        parsed,
        "{body:?} and the same JSON written as {rewritten:?}"
    );
    let Ok(event) = parsed else {
        return;
    };
    let mut strings = BTreeSet::new();
    strings_of(&value, &mut strings);
    let hook = match &event {
        Event::LifecycleAction { hook, .. } => Some(hook.as_str()),
        _ => None,
    };
    for named in [event.group(), event.instance(), hook]
        .into_iter()
        .flatten()
    {
        assert!(
            strings.contains(named),
            "{event:?} names {named:?}, which is no string of {body:?}"
        );
    }
}

/// Every key and string in `value`, and in strings that are JSON themselves
/// (an SNS envelope's `Message`).
fn strings_of(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            if let Ok(inner) = serde_json::from_str::<Value>(s) {
                strings_of(&inner, out);
            }
            out.insert(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|v| strings_of(v, out)),
        Value::Object(map) => {
            for (k, v) in map {
                out.insert(k.clone());
                strings_of(v, out);
            }
        }
        _ => {}
    }
}

/// The first line is `default_port` (none unless it reads as a port number:
/// `Config::validate` refuses 0); each other line a tag, `key=value` (a
/// line without `=` is a key with an empty value).
pub fn tags(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut lines = text.split('\n');
    let default_port = lines
        .next()
        .and_then(|l| l.parse::<u16>().ok())
        .filter(|&p| p != 0);
    let pairs: Vec<(&str, &str)> = lines
        .map(|l| l.split_once('=').unwrap_or((l, "")))
        .collect();
    let parsed = tags::parse(pairs.iter().copied(), default_port);
    // The name alone (which reports a group with a bad port under the
    // service it meant to join) agrees with the whole read.
    match tags::service_name(pairs.iter().copied()) {
        None => assert_eq!(parsed, Err(TagError::EmptyService), "{pairs:?}"),
        Some(Err(e)) => assert_eq!(parsed, Err(e), "{pairs:?}"),
        Some(Ok(name)) => match &parsed {
            Ok((read, _)) => assert_eq!(read, &name, "{pairs:?}"),
            Err(e) => assert!(
                !matches!(e, TagError::EmptyService | TagError::BadService(_)),
                "{pairs:?}: service_name read {name:?}, parse refused it: {e}"
            ),
        },
    }
    let Ok((name, settings)) = parsed else {
        return;
    };
    let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    assert!(
        (1..=63).contains(&name.len())
            && name.starts_with(|c: char| c.is_ascii_alphanumeric())
            && name.chars().all(name_char),
        "{pairs:?} gave service {name:?}"
    );
    assert_ne!(settings.port, 0, "{pairs:?}");
    let route = &settings.route;
    assert!(
        route.starts_with('/')
            && !route.contains(char::is_whitespace)
            && (route == "/" || !route.ends_with('/')),
        "{pairs:?} gave route {route:?}"
    );
    match &settings.health {
        HealthCheck::Http { path } => {
            assert!(
                path.starts_with('/') && !path.contains(char::is_whitespace),
                "{pairs:?} gave health path {path:?}"
            );
            // A path the tags accept is one the probe can request (it
            // parses this URI, `health::NetProbe`), or the group's
            // endpoints would never pass with no tag named.
            let uri = format!("http://10.0.0.1:8080{path}").parse::<hyper::Uri>();
            assert_eq!(
                uri.as_ref()
                    .ok()
                    .and_then(|u| u.path_and_query())
                    .map(|p| p.as_str()),
                Some(path.as_str()),
                "{pairs:?} gave health path {path:?}, which the probe cannot request as written"
            );
        }
        HealthCheck::Grpc { service } => assert!(service.chars().all(name_char), "{pairs:?}"),
        HealthCheck::Tcp => {}
    }
    // What was read, written back as tags, reads the same.
    let port = settings.port.to_string();
    let health = settings.health.to_string();
    let own = [
        (tags::SERVICE, name.as_str()),
        (tags::PORT, port.as_str()),
        (tags::HEALTH, health.as_str()),
        (tags::ROUTE, route.as_str()),
    ];
    assert_eq!(
        tags::parse(own, None),
        Ok((name.clone(), settings.clone())),
        "{pairs:?} read as {own:?}"
    );
}

pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match Config::from_toml(text) {
        Ok(config) => config,
        Err(ConfigError::Parse { message, .. }) => {
            assert!(
                !message.is_empty(),
                "{text:?}: a parse error without a message"
            );
            return;
        }
        Err(e) => panic!("{text:?}: reading failed other than by parsing: {e}"),
    };
    match config.validate() {
        // `--check-config` prints a valid config (cli.rs): it reads back.
        Ok(()) => {
            let printed = config.to_toml();
            let back = Config::from_toml(&printed)
                .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}, which reads as {e}"));
            assert_eq!(back, config, "{text:?} printed as {printed:?}");
            back.validate()
                .unwrap_or_else(|e| panic!("{text:?} printed as {printed:?}: {e}"));
        }
        Err(ConfigError::Invalid { key, reason }) => {
            assert!(!reason.is_empty(), "{text:?}: {key} without a reason");
            // The key is a TOML key, and what holds it is a table of this
            // config: `health.services."a b".timeout`, not `...a b.timeout`.
            let path = toml_path(&key)
                .unwrap_or_else(|| panic!("{text:?}: the error names {key:?}, not a TOML key"));
            if let Ok(printed) = toml::Table::try_from(&config) {
                let (leaf, parents) = path.split_last().expect("a key has a segment");
                let mut table = &printed;
                for segment in parents {
                    table = table
                        .get(segment)
                        .and_then(toml::Value::as_table)
                        .unwrap_or_else(|| panic!("{text:?}: the error names {key:?}, but {segment:?} is no table of the config"));
                }
                if parents.is_empty() {
                    assert!(
                        table.contains_key(leaf),
                        "{text:?}: the error names {key:?}, no key of the config"
                    );
                }
            }
        }
        Err(e) => panic!("{text:?}: validate failed without naming a key: {e}"),
    }
}

/// The segments of a dotted TOML key, or none if `key` is not one.
fn toml_path(key: &str) -> Option<Vec<String>> {
    let mut table: toml::Table = format!("{key} = 0").parse().ok()?;
    let mut path = Vec::new();
    loop {
        let (segment, value) = table.into_iter().next()?;
        path.push(segment);
        match value {
            toml::Value::Table(inner) => table = inner,
            toml::Value::Integer(0) => return Some(path),
            _ => return None,
        }
    }
}

/// A stream as a router reads it: lines into a mirror.
pub fn push_lines(data: &[u8]) {
    let mut mirror = Mirror::default();
    for line in data.split(|&b| b == b'\n') {
        let Ok(message) = Message::from_line(line) else {
            continue;
        };
        let written = message.to_line();
        assert!(
            written.ends_with(b"\n") && written.iter().filter(|&&b| b == b'\n').count() == 1,
            "{message:?} is not written as one line"
        );
        assert_eq!(
            Message::from_line(&written).as_ref(),
            Ok(&message),
            "{line:?} re-encoded"
        );
        let before = mirror.clone();
        match mirror.apply(message.clone()) {
            Err(e) => assert_eq!(mirror, before, "refused ({e}) but changed"),
            Ok(moved) => {
                if matches!(message, Message::Ping { .. }) {
                    assert!(!moved && mirror == before, "a ping moved the mirror");
                    continue;
                }
                if before.epoch == mirror.epoch {
                    assert!(
                        before.revision <= mirror.revision,
                        "revision went back within an epoch: {before:?} -> {mirror:?}"
                    );
                }
                // The router's cache file is this snapshot: read back after
                // a restart, it is the same mirror.
                let cached = mirror
                    .to_snapshot()
                    .expect("a mirror that applied a message has a snapshot")
                    .to_line();
                let mut restored = Mirror::default();
                let snapshot = Message::from_line(&cached).expect("the cache file reads");
                assert_eq!(restored.apply(snapshot), Ok(true));
                assert_eq!(restored, mirror, "restored from {cached:?}");
            }
        }
    }
}

/// An ack body as the controller's `POST /v1/ack/{id}` takes it (axum's
/// `Json<Ack>` is serde_json), counted for a router that was sent its
/// revision.
pub fn ack(data: &[u8]) {
    let Ok(ack) = serde_json::from_slice::<Ack>(data) else {
        return;
    };
    let encoded = serde_json::to_vec(&ack).expect("an ack encodes");
    assert_eq!(
        serde_json::from_slice::<Ack>(&encoded).ok().as_ref(),
        Some(&ack),
        "re-encoded as {:?}",
        String::from_utf8_lossy(&encoded)
    );
    let routers = Routers::new(ack.epoch);
    let connection = routers.connect("edge-1", SocketAddr::from(([127, 0, 0, 1], 40000)));
    routers.sent("edge-1", connection, ack.revision);
    routers
        .acked("edge-1", ack.clone())
        .expect("an ack of this epoch, of the revision sent, counts");
    let record = routers.list().pop().expect("one router");
    assert_eq!(record.acked_revision, Some(ack.revision));
    assert_eq!(record.in_flight, ack.in_flight);
    let instances: BTreeSet<&String> = ack.in_flight.values().flat_map(|m| m.keys()).collect();
    for instance in instances {
        let total = record.in_flight_to(instance);
        let most = ack
            .in_flight
            .values()
            .filter_map(|by_instance| by_instance.get(instance))
            .max()
            .copied()
            .unwrap_or(0);
        assert!(
            total >= most,
            "{instance:?}: {total} in flight in all, {most} in one service"
        );
        assert_eq!(
            record.drained(instance),
            total == 0,
            "{instance:?}: drained with {total} in flight?"
        );
    }
}

pub fn xds_version(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(version) = Version::parse(text) {
        assert_eq!(
            version.to_string(),
            text,
            "{text:?} reads as {version:?}, which signpost writes otherwise"
        );
    }
}
