//! The tag contract: how an Auto Scaling group says which service it runs.
//!
//! | tag | value | default |
//! | --- | --- | --- |
//! | `signpost:service` | service name (required; groups without it are ignored) | |
//! | `signpost:port` | 1..=65535 | `default_port` from config, else required |
//! | `signpost:health` | `http:/path`, `tcp`, `grpc` or `grpc:<service>` | `http:/health` |
//! | `signpost:route` | path prefix starting with `/` | `/<service>` |

use thiserror::Error;

use crate::model::{HealthCheck, ServiceSettings};

pub const SERVICE: &str = "signpost:service";
pub const PORT: &str = "signpost:port";
pub const HEALTH: &str = "signpost:health";
pub const ROUTE: &str = "signpost:route";

/// Why a group's tags cannot be used. The message names the tag and value.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TagError {
    #[error("tag {SERVICE} is empty")]
    EmptyService,
    #[error("tag {SERVICE}={0:?}: a service name is 1-63 letters, digits, '-', '_' or '.', starting with a letter or digit")]
    BadService(String),
    #[error("tag {PORT} is missing and no default_port is configured")]
    MissingPort,
    #[error("tag {PORT}={0:?}: not a port number (1-65535)")]
    BadPort(String),
    #[error(
        "tag {HEALTH}={0:?}: expected \"http:/path\", \"tcp\", \"grpc\" or \"grpc:<service>\""
    )]
    BadHealth(String),
    #[error("tag {ROUTE}={0:?}: a route is a path prefix starting with '/'")]
    BadRoute(String),
}

/// Reads the service name alone, so that a group with a bad port can still be
/// reported under the service it meant to join.
pub fn service_name<'a>(
    tags: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Option<Result<String, TagError>> {
    let (_, value) = tags.into_iter().find(|(k, _)| *k == SERVICE)?;
    Some(validate_service(value.trim()))
}

/// Interprets a group's tags. `default_port` comes from the config.
pub fn parse<'a>(
    tags: impl IntoIterator<Item = (&'a str, &'a str)> + Clone,
    default_port: Option<u16>,
) -> Result<(String, ServiceSettings), TagError> {
    let get = |key: &str| {
        tags.clone()
            .into_iter()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.trim())
    };
    let name = validate_service(get(SERVICE).unwrap_or_default())?;
    let port = match get(PORT) {
        Some(p) => parse_port(p)?,
        None => default_port.ok_or(TagError::MissingPort)?,
    };
    let health = match get(HEALTH) {
        Some(h) => parse_health(h)?,
        None => HealthCheck::Http {
            path: "/health".into(),
        },
    };
    let route = match get(ROUTE) {
        Some(r) => parse_route(r)?,
        None => format!("/{name}"),
    };
    Ok((
        name,
        ServiceSettings {
            route,
            port,
            health,
        },
    ))
}

fn validate_service(name: &str) -> Result<String, TagError> {
    if name.is_empty() {
        return Err(TagError::EmptyService);
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    let starts_ok = name.starts_with(|c: char| c.is_ascii_alphanumeric());
    if name.len() > 63 || !starts_ok || !name.chars().all(ok_char) {
        return Err(TagError::BadService(name.into()));
    }
    Ok(name.into())
}

fn parse_port(value: &str) -> Result<u16, TagError> {
    match value.parse::<u16>() {
        Ok(p) if p > 0 => Ok(p),
        _ => Err(TagError::BadPort(value.into())),
    }
}

fn parse_health(value: &str) -> Result<HealthCheck, TagError> {
    if value == "tcp" {
        return Ok(HealthCheck::Tcp);
    }
    if value == "grpc" {
        return Ok(HealthCheck::Grpc {
            service: String::new(),
        });
    }
    // A gRPC service name as a health server knows it: `package.Service`.
    if let Some(service) = value.strip_prefix("grpc:") {
        let name_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
        if !service.is_empty() && service.chars().all(name_char) {
            return Ok(HealthCheck::Grpc {
                service: service.into(),
            });
        }
        return Err(TagError::BadHealth(value.into()));
    }
    match value.strip_prefix("http:") {
        Some(path)
            if path.starts_with('/')
                && !path.contains(char::is_whitespace)
                && probe_can_request(path) =>
        {
            Ok(HealthCheck::Http { path: path.into() })
        }
        _ => Err(TagError::BadHealth(value.into())),
    }
}

/// Whether `path` is a request target as written, which the HTTP probe
/// (`health::NetProbe`) puts in its request line unchanged. A path that a
/// URI cannot carry (a control character, say) failed every probe, so the
/// group's endpoints never became healthy and no tag was named as wrong
/// (found by the fuzzer: `http:/a\0b` was taken).
fn probe_can_request(path: &str) -> bool {
    format!("http://0.0.0.0{path}")
        .parse::<hyper::Uri>()
        .is_ok_and(|uri| uri.path_and_query().map(|p| p.as_str()) == Some(path))
}

fn parse_route(value: &str) -> Result<String, TagError> {
    if !value.starts_with('/') || value.contains(char::is_whitespace) {
        return Err(TagError::BadRoute(value.into()));
    }
    // "/users/" and "/users" are the same prefix; keep one spelling so that
    // groups that agree are not reported as conflicting.
    let trimmed = value.trim_end_matches('/');
    Ok(if trimmed.is_empty() { "/" } else { trimmed }.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_tags(
        tags: &[(&str, &str)],
        default_port: Option<u16>,
    ) -> Result<ServiceSettings, TagError> {
        parse(tags.iter().copied(), default_port).map(|(_, s)| s)
    }

    #[test]
    fn defaults_fill_health_and_route() {
        let (name, s) = parse([(SERVICE, "users"), (PORT, "8080")], None).unwrap();
        assert_eq!(name, "users");
        assert_eq!(s.port, 8080);
        assert_eq!(s.route, "/users");
        assert_eq!(
            s.health,
            HealthCheck::Http {
                path: "/health".into()
            }
        );
    }

    #[test]
    fn explicit_tags_win() {
        let s = parse_tags(
            &[
                (SERVICE, "users"),
                (PORT, "9000"),
                (HEALTH, "tcp"),
                (ROUTE, "/api/users/"),
            ],
            Some(80),
        )
        .unwrap();
        assert_eq!(
            (s.port, s.health, s.route.as_str()),
            (9000, HealthCheck::Tcp, "/api/users")
        );
    }

    #[test]
    fn grpc_health_names_a_service_or_the_whole_server() {
        let health = |value| {
            parse_tags(&[(SERVICE, "u"), (PORT, "1"), (HEALTH, value)], None)
                .unwrap()
                .health
        };
        for (tag, service) in [("grpc", ""), ("grpc:echo.v1.Echo", "echo.v1.Echo")] {
            let check = health(tag);
            assert_eq!(
                check,
                HealthCheck::Grpc {
                    service: service.into()
                }
            );
            assert_eq!(check.to_string(), tag, "shown as tagged");
        }
    }

    #[test]
    fn bad_ports_are_rejected_with_the_value() {
        for bad in ["abc", "0", "70000", "-1", ""] {
            let err = parse_tags(&[(SERVICE, "users"), (PORT, bad)], Some(80)).unwrap_err();
            assert_eq!(err, TagError::BadPort(bad.into()));
            assert!(err.to_string().contains("signpost:port"), "{err}");
        }
    }

    #[test]
    fn missing_port_uses_default_or_fails() {
        assert_eq!(
            parse_tags(&[(SERVICE, "users")], Some(8080)).unwrap().port,
            8080
        );
        assert_eq!(
            parse_tags(&[(SERVICE, "users")], None).unwrap_err(),
            TagError::MissingPort
        );
    }

    #[test]
    fn bad_health_and_route_are_rejected() {
        for bad in [
            "grpc:/x",
            "grpc:",
            "grpc:a b",
            "GRPC",
            "http:health",
            "http",
            "TCP",
            // Found by the fuzzer: paths the probe's URI cannot carry.
            "http:/heagn\0h",
            "http:/h\u{7f}",
        ] {
            let err = parse_tags(&[(SERVICE, "u"), (PORT, "1"), (HEALTH, bad)], None).unwrap_err();
            assert_eq!(err, TagError::BadHealth(bad.into()));
        }
        let err = parse_tags(&[(SERVICE, "u"), (PORT, "1"), (ROUTE, "users")], None).unwrap_err();
        assert_eq!(err, TagError::BadRoute("users".into()));
    }

    #[test]
    fn service_names_are_validated() {
        assert_eq!(
            parse_tags(&[(SERVICE, "  "), (PORT, "1")], None).unwrap_err(),
            TagError::EmptyService
        );
        let err = parse_tags(&[(SERVICE, "-users"), (PORT, "1")], None).unwrap_err();
        assert_eq!(err, TagError::BadService("-users".into()));
        assert_eq!(service_name([(PORT, "1")]), None);
        assert_eq!(service_name([(SERVICE, "users")]), Some(Ok("users".into())));
    }

    #[test]
    fn root_route_stays_root() {
        let s = parse_tags(&[(SERVICE, "web"), (PORT, "1"), (ROUTE, "/")], None).unwrap();
        assert_eq!(s.route, "/");
    }
}
