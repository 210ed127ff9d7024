//! Every xDS resource signpost serves, derived from one registry snapshot by
//! a pure function, and the make-before-break order in which a stream moves
//! from what it sent to what it should have. No streams, no I/O here.
//!
//! Per service `S`:
//! - a `Cluster` `S`: EDS over ADS, least-request balancing (round robin
//!   for gRPC, see `Balancing`), panic threshold 0 (signpost decides health;
//!   in panic mode Envoy would route to draining hosts);
//! - a `ClusterLoadAssignment` `S`: one locality per zone; healthy endpoints
//!   HEALTHY, draining ones DRAINING (no new requests, the ones in flight
//!   finish); starting and unhealthy endpoints are left out, never routable;
//! - an API listener `S` for proxyless gRPC (a channel to `xds:///S`), with
//!   its route inline, served only to a client that asks for it by name.
//!
//! And for Envoy: one `RouteConfiguration` (`signpost`) with every service's
//! prefix, longest first, matching whole path segments as signpost's router
//! does; one `Listener` (`signpost`) on the configured address using it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use envoy_types::pb::envoy::config::cluster::v3::{
    cluster::{ClusterDiscoveryType, CommonLbConfig, DiscoveryType, EdsClusterConfig, LbPolicy},
    Cluster,
};
use envoy_types::pb::envoy::config::core::v3::{
    address, config_source::ConfigSourceSpecifier, socket_address::PortSpecifier, Address,
    AggregatedConfigSource, ApiVersion, ConfigSource, HealthStatus, Locality, SocketAddress,
};
use envoy_types::pb::envoy::config::endpoint::v3::{
    lb_endpoint::HostIdentifier, ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints,
};
use envoy_types::pb::envoy::config::listener::v3::{
    filter::ConfigType as FilterConfig, ApiListener, Filter, FilterChain, Listener,
};
use envoy_types::pb::envoy::config::route::v3::{
    route::Action, route_action::ClusterSpecifier, route_match::PathSpecifier, Route, RouteAction,
    RouteConfiguration, RouteMatch, VirtualHost,
};
use envoy_types::pb::envoy::extensions::filters::http::router::v3::Router;
use envoy_types::pb::envoy::extensions::filters::network::http_connection_manager::v3::{
    http_connection_manager::RouteSpecifier, http_filter::ConfigType as HttpFilterConfig,
    HttpConnectionManager, HttpFilter, Rds,
};
use envoy_types::pb::envoy::r#type::v3::Percent;
use envoy_types::pb::google::protobuf::{Any, Duration, UInt32Value};
use prost::Name;

use super::ResourceType;
use crate::model::{EndpointState, Revision, Service, Snapshot};

/// The name of Envoy's listener and of its route configuration.
pub const ENVOY_LISTENER: &str = "signpost";
pub const ENVOY_ROUTES: &str = "signpost";

/// One type's resources by name, packed as they go on the wire.
pub type ResourceSet = BTreeMap<String, Any>;

/// What `from_snapshot` needs besides the snapshot.
#[derive(Clone, Debug, PartialEq)]
pub struct Settings {
    /// Where Envoy's listener takes requests.
    pub envoy_listener: SocketAddr,
}

/// How a client may balance a cluster's endpoints. Envoy takes least
/// request; gRPC's xDS client (grpcio 1.85) NACKs a Cluster with
/// `lb_policy: LEAST_REQUEST` ("LB policy is not supported") and gets
/// round robin, its own default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balancing {
    LeastRequest,
    RoundRobin,
}

/// Every resource of one registry revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resources {
    pub revision: Revision,
    /// Per type, what a wildcard subscription gets (clusters balanced by
    /// least request).
    sets: BTreeMap<ResourceType, ResourceSet>,
    /// The clusters again, balanced round robin.
    round_robin_clusters: ResourceSet,
    /// gRPC's API listeners: only by name. Envoy asks for listeners by
    /// wildcard and would be handed listeners it cannot serve.
    api_listeners: ResourceSet,
}

/// Which resources of a type a client asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subscription {
    /// All of them (an empty `resource_names`, or `*`): Envoy's LDS and CDS.
    Wildcard,
    Named(BTreeSet<String>),
}

impl Subscription {
    pub fn from_names(names: &[String]) -> Subscription {
        if names.is_empty() || names.iter().any(|n| n == "*") {
            Subscription::Wildcard
        } else {
            Subscription::Named(names.iter().cloned().collect())
        }
    }
}

impl Resources {
    pub fn from_snapshot(snapshot: &Snapshot, settings: &Settings) -> Resources {
        let mut sets: BTreeMap<ResourceType, ResourceSet> = BTreeMap::new();
        let mut api_listeners = ResourceSet::new();
        let mut round_robin_clusters = ResourceSet::new();
        for (name, service) in &snapshot.services {
            sets.entry(ResourceType::Cluster)
                .or_default()
                .insert(name.clone(), pack(cluster(name, Balancing::LeastRequest)));
            round_robin_clusters.insert(name.clone(), pack(cluster(name, Balancing::RoundRobin)));
            sets.entry(ResourceType::Endpoints)
                .or_default()
                .insert(name.clone(), pack(load_assignment(service)));
            api_listeners.insert(name.clone(), pack(api_listener(name)));
        }
        sets.entry(ResourceType::Route)
            .or_default()
            .insert(ENVOY_ROUTES.into(), pack(envoy_routes(snapshot)));
        sets.entry(ResourceType::Listener)
            .or_default()
            .insert(ENVOY_LISTENER.into(), pack(envoy_listener(settings)));
        Resources {
            revision: snapshot.revision,
            sets,
            round_robin_clusters,
            api_listeners,
        }
    }

    /// What a client that balances by `balancing`, subscribed to
    /// `subscription` of `kind`, gets. A name signpost does not have is left
    /// out: for RDS and EDS that means "no news", and a gRPC client reports
    /// it as not existing after its timeout.
    pub fn view(
        &self,
        kind: ResourceType,
        subscription: &Subscription,
        balancing: Balancing,
    ) -> ResourceSet {
        let empty = ResourceSet::new();
        let set = match (kind, balancing) {
            (ResourceType::Cluster, Balancing::RoundRobin) => &self.round_robin_clusters,
            _ => self.sets.get(&kind).unwrap_or(&empty),
        };
        match subscription {
            Subscription::Wildcard => set.clone(),
            Subscription::Named(names) => names
                .iter()
                .filter_map(|n| {
                    let found = match kind {
                        ResourceType::Listener => self.api_listeners.get(n).or_else(|| set.get(n)),
                        _ => set.get(n),
                    };
                    found.map(|r| (n.clone(), r.clone()))
                })
                .collect(),
        }
    }
}

/// The responses that take a client from `sent` to `next`, per type, in
/// make-before-break order: clusters and endpoints first, kept while
/// anything may still use them, then listeners and routes, then the
/// removal of clusters and endpoints no longer used. Types the client does
/// not subscribe to are in neither map; a type missing from `sent` has
/// never been sent and is sent whatever it holds.
pub fn ordered(
    sent: &BTreeMap<ResourceType, ResourceSet>,
    next: &BTreeMap<ResourceType, ResourceSet>,
) -> Vec<(ResourceType, ResourceSet)> {
    let mut now = Vec::new();
    let mut last = Vec::new();
    for (&kind, want) in next {
        let had = sent.get(&kind);
        if had == Some(want) {
            continue;
        }
        let used_by_others = matches!(kind, ResourceType::Cluster | ResourceType::Endpoints);
        let removed: Vec<(&String, &Any)> = had
            .into_iter()
            .flatten()
            .filter(|(name, _)| !want.contains_key(*name))
            .collect();
        if used_by_others && !removed.is_empty() {
            let mut keep = want.clone();
            keep.extend(removed.into_iter().map(|(n, r)| (n.clone(), r.clone())));
            if had != Some(&keep) {
                now.push((kind, keep));
            }
            last.push((kind, want.clone()));
        } else {
            now.push((kind, want.clone()));
        }
    }
    now.extend(last);
    now
}

fn pack<T: Name>(message: T) -> Any {
    Any {
        type_url: T::type_url(),
        value: prost::Message::encode_to_vec(&message),
    }
}

fn ads() -> ConfigSource {
    ConfigSource {
        config_source_specifier: Some(ConfigSourceSpecifier::Ads(AggregatedConfigSource {})),
        resource_api_version: ApiVersion::V3 as i32,
        ..Default::default()
    }
}

fn socket(ip: IpAddr, port: u16) -> Address {
    Address {
        address: Some(address::Address::SocketAddress(SocketAddress {
            address: ip.to_string(),
            port_specifier: Some(PortSpecifier::PortValue(port.into())),
            ..Default::default()
        })),
    }
}

fn cluster(name: &str, balancing: Balancing) -> Cluster {
    Cluster {
        name: name.into(),
        cluster_discovery_type: Some(ClusterDiscoveryType::Type(DiscoveryType::Eds as i32)),
        eds_cluster_config: Some(EdsClusterConfig {
            eds_config: Some(ads()),
            service_name: String::new(),
        }),
        connect_timeout: Some(Duration {
            seconds: 1,
            nanos: 0,
        }),
        lb_policy: match balancing {
            Balancing::LeastRequest => LbPolicy::LeastRequest,
            Balancing::RoundRobin => LbPolicy::RoundRobin,
        } as i32,
        common_lb_config: Some(CommonLbConfig {
            healthy_panic_threshold: Some(Percent { value: 0.0 }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn load_assignment(service: &Service) -> ClusterLoadAssignment {
    let mut zones: BTreeMap<&str, Vec<LbEndpoint>> = BTreeMap::new();
    for e in service.endpoints.values() {
        let status = match e.state {
            EndpointState::Healthy => HealthStatus::Healthy,
            EndpointState::Draining => HealthStatus::Draining,
            EndpointState::Starting | EndpointState::Unhealthy => continue,
        };
        zones.entry(&e.zone).or_default().push(LbEndpoint {
            host_identifier: Some(HostIdentifier::Endpoint(Endpoint {
                address: Some(socket(e.address, e.port)),
                ..Default::default()
            })),
            health_status: status as i32,
            ..Default::default()
        });
    }
    ClusterLoadAssignment {
        cluster_name: service.name.clone(),
        endpoints: zones
            .into_iter()
            .map(|(zone, lb_endpoints)| LocalityLbEndpoints {
                locality: Some(Locality {
                    zone: zone.into(),
                    ..Default::default()
                }),
                // gRPC drops a locality without a weight ("contains no
                // localities"); by endpoint count every endpoint gets an
                // even share. Envoy ignores it (no locality-weighted LB).
                load_balancing_weight: Some(UInt32Value {
                    value: lb_endpoints.len() as u32,
                }),
                lb_endpoints,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

fn route_to(cluster: &str, path: PathSpecifier) -> Route {
    Route {
        name: cluster.into(),
        r#match: Some(RouteMatch {
            path_specifier: Some(path),
            ..Default::default()
        }),
        action: Some(Action::Route(RouteAction {
            cluster_specifier: Some(ClusterSpecifier::Cluster(cluster.into())),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// Every service's route, longest prefix first (Envoy takes the first
/// match). `path_separated_prefix` matches whole segments: `/users` takes
/// `/users` and `/users/1`, not `/usersx`, as signpost's router does. It
/// cannot be `/` (nor end in `/`, which `tags` never lets a route do): the
/// root is a plain prefix, which matches everything, and comes last.
fn envoy_routes(snapshot: &Snapshot) -> RouteConfiguration {
    let mut services: Vec<&Service> = snapshot.services.values().map(|s| &**s).collect();
    services
        .sort_by(|a, b| (b.settings.route.len(), &a.name).cmp(&(a.settings.route.len(), &b.name)));
    let routes = services
        .into_iter()
        .map(|s| {
            let path = if s.settings.route == "/" {
                PathSpecifier::Prefix("/".into())
            } else {
                PathSpecifier::PathSeparatedPrefix(s.settings.route.clone())
            };
            route_to(&s.name, path)
        })
        .collect();
    RouteConfiguration {
        name: ENVOY_ROUTES.into(),
        virtual_hosts: vec![VirtualHost {
            name: ENVOY_ROUTES.into(),
            domains: vec!["*".into()],
            routes,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn router_filter() -> HttpFilter {
    HttpFilter {
        name: "envoy.filters.http.router".into(),
        config_type: Some(HttpFilterConfig::TypedConfig(pack(Router::default()))),
        ..Default::default()
    }
}

fn envoy_listener(settings: &Settings) -> Listener {
    let manager = HttpConnectionManager {
        stat_prefix: "signpost".into(),
        route_specifier: Some(RouteSpecifier::Rds(Rds {
            config_source: Some(ads()),
            route_config_name: ENVOY_ROUTES.into(),
        })),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: ENVOY_LISTENER.into(),
        address: Some(socket(
            settings.envoy_listener.ip(),
            settings.envoy_listener.port(),
        )),
        filter_chains: vec![FilterChain {
            filters: vec![Filter {
                name: "envoy.filters.network.http_connection_manager".into(),
                config_type: Some(FilterConfig::TypedConfig(pack(manager))),
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// What a gRPC channel to `xds:///<service>` resolves: every call to the
/// service's cluster. The route is inline, so gRPC needs no RDS.
fn api_listener(service: &str) -> Listener {
    let routes = RouteConfiguration {
        name: service.into(),
        virtual_hosts: vec![VirtualHost {
            name: service.into(),
            domains: vec!["*".into()],
            routes: vec![route_to(service, PathSpecifier::Prefix(String::new()))],
            ..Default::default()
        }],
        ..Default::default()
    };
    let manager = HttpConnectionManager {
        stat_prefix: service.into(),
        route_specifier: Some(RouteSpecifier::RouteConfig(routes)),
        http_filters: vec![router_filter()],
        ..Default::default()
    };
    Listener {
        name: service.into(),
        api_listener: Some(ApiListener {
            api_listener: Some(pack(manager)),
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Endpoint as RegistryEndpoint, HealthCheck, InstanceId, ServiceSettings};
    use std::sync::Arc;
    use std::time::SystemTime;

    fn settings() -> Settings {
        Settings {
            envoy_listener: "127.0.0.1:10000".parse().unwrap(),
        }
    }

    fn service(name: &str, route: &str, endpoints: &[(&str, u8, EndpointState)]) -> Arc<Service> {
        Arc::new(Service {
            name: name.into(),
            settings: ServiceSettings {
                route: route.into(),
                port: 8080,
                health: HealthCheck::Tcp,
            },
            groups: BTreeSet::new(),
            endpoints: endpoints
                .iter()
                .map(|(id, last, state)| {
                    let e = RegistryEndpoint {
                        instance_id: InstanceId::from(*id),
                        address: [127, 42, 1, *last].into(),
                        port: 8080,
                        zone: "us-east-1a".into(),
                        group: "g".into(),
                        state: *state,
                        since: SystemTime::UNIX_EPOCH,
                    };
                    (e.instance_id.clone(), e)
                })
                .collect(),
        })
    }

    fn snapshot(revision: Revision, services: Vec<Arc<Service>>) -> Snapshot {
        Snapshot {
            revision,
            services: services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            problems: BTreeMap::new(),
        }
    }

    fn unpack<T: Name + Default>(any: &Any) -> T {
        assert_eq!(any.type_url, T::type_url());
        prost::Message::decode(any.value.as_slice()).unwrap()
    }

    fn names(set: &ResourceSet) -> Vec<&str> {
        set.keys().map(String::as_str).collect()
    }

    #[test]
    fn a_snapshot_gives_a_cluster_and_endpoints_per_service_and_one_envoy_listener() {
        use EndpointState::*;
        let snap = snapshot(
            7,
            vec![
                service("users", "/users", &[("i-1", 4, Healthy)]),
                service("web", "/", &[("i-2", 5, Healthy)]),
            ],
        );
        let r = Resources::from_snapshot(&snap, &settings());
        assert_eq!(r.revision, 7);
        let all = Subscription::Wildcard;
        assert_eq!(
            names(&r.view(ResourceType::Cluster, &all, Balancing::LeastRequest)),
            ["users", "web"]
        );
        assert_eq!(
            names(&r.view(ResourceType::Endpoints, &all, Balancing::LeastRequest)),
            ["users", "web"]
        );
        assert_eq!(
            names(&r.view(ResourceType::Listener, &all, Balancing::LeastRequest)),
            [ENVOY_LISTENER],
            "a wildcard gets no API listener"
        );
        assert_eq!(
            names(&r.view(ResourceType::Route, &all, Balancing::LeastRequest)),
            [ENVOY_ROUTES]
        );

        let c: Cluster =
            unpack(&r.view(ResourceType::Cluster, &all, Balancing::LeastRequest)["users"]);
        assert_eq!(c.lb_policy, LbPolicy::LeastRequest as i32);
        assert_eq!(
            c.common_lb_config.unwrap().healthy_panic_threshold,
            Some(Percent { value: 0.0 }),
            "no panic mode: it would route to draining hosts"
        );
        assert_eq!(c.eds_cluster_config.unwrap().eds_config, Some(ads()));

        let l: Listener =
            unpack(&r.view(ResourceType::Listener, &all, Balancing::LeastRequest)[ENVOY_LISTENER]);
        let SocketAddress {
            address,
            port_specifier,
            ..
        } = match l.address.unwrap().address.unwrap() {
            address::Address::SocketAddress(s) => s,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            (address.as_str(), port_specifier),
            ("127.0.0.1", Some(PortSpecifier::PortValue(10000)))
        );
    }

    #[test]
    fn healthy_is_healthy_draining_is_draining_and_the_rest_is_left_out() {
        use EndpointState::*;
        let snap = snapshot(
            1,
            vec![service(
                "users",
                "/users",
                &[
                    ("i-1", 1, Healthy),
                    ("i-2", 2, Draining),
                    ("i-3", 3, Starting),
                    ("i-4", 4, Unhealthy),
                ],
            )],
        );
        let r = Resources::from_snapshot(&snap, &settings());
        let cla: ClusterLoadAssignment = unpack(
            &r.view(
                ResourceType::Endpoints,
                &Subscription::Wildcard,
                Balancing::LeastRequest,
            )["users"],
        );
        assert_eq!(cla.cluster_name, "users");
        let got: Vec<(String, i32)> = cla
            .endpoints
            .iter()
            .flat_map(|l| &l.lb_endpoints)
            .map(|e| {
                let Some(HostIdentifier::Endpoint(ep)) = &e.host_identifier else {
                    panic!("endpoint")
                };
                let Some(address::Address::SocketAddress(s)) =
                    &ep.address.as_ref().unwrap().address
                else {
                    panic!("socket")
                };
                (s.address.clone(), e.health_status)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("127.42.1.1".to_string(), HealthStatus::Healthy as i32),
                ("127.42.1.2".to_string(), HealthStatus::Draining as i32),
            ]
        );
        assert_eq!(
            cla.endpoints[0].locality.as_ref().unwrap().zone,
            "us-east-1a"
        );
        assert_eq!(
            cla.endpoints[0].load_balancing_weight,
            Some(UInt32Value { value: 2 }),
            "weighted (gRPC drops a locality without a weight), by endpoint count"
        );
    }

    #[test]
    fn routes_are_longest_prefix_first_on_whole_segments_with_root_last() {
        let snap = snapshot(
            1,
            vec![
                service("web", "/", &[]),
                service("users", "/users", &[]),
                service("admin", "/users/admin", &[]),
                service("api", "/api", &[]),
            ],
        );
        let r = Resources::from_snapshot(&snap, &settings());
        let rc: RouteConfiguration = unpack(
            &r.view(
                ResourceType::Route,
                &Subscription::Wildcard,
                Balancing::LeastRequest,
            )[ENVOY_ROUTES],
        );
        let got: Vec<(PathSpecifier, String)> = rc.virtual_hosts[0]
            .routes
            .iter()
            .map(|route| {
                let path = route.r#match.clone().unwrap().path_specifier.unwrap();
                let Some(Action::Route(RouteAction {
                    cluster_specifier: Some(ClusterSpecifier::Cluster(c)),
                    ..
                })) = &route.action
                else {
                    panic!("route action")
                };
                (path, c.clone())
            })
            .collect();
        use PathSpecifier::{PathSeparatedPrefix as Seg, Prefix};
        assert_eq!(
            got,
            vec![
                (Seg("/users/admin".into()), "admin".into()),
                (Seg("/users".into()), "users".into()),
                (Seg("/api".into()), "api".into()),
                (Prefix("/".into()), "web".into()),
            ]
        );
    }

    #[test]
    fn grpc_gets_an_api_listener_by_service_name_routing_to_its_cluster() {
        let snap = snapshot(1, vec![service("greeter", "/greeter", &[])]);
        let r = Resources::from_snapshot(&snap, &settings());
        let asked = Subscription::Named(BTreeSet::from(["greeter".into(), "missing".into()]));
        let got = r.view(ResourceType::Listener, &asked, Balancing::RoundRobin);
        assert_eq!(names(&got), ["greeter"], "an unknown name is left out");
        let l: Listener = unpack(&got["greeter"]);
        let manager: HttpConnectionManager =
            unpack(l.api_listener.unwrap().api_listener.as_ref().unwrap());
        let Some(RouteSpecifier::RouteConfig(rc)) = manager.route_specifier else {
            panic!("inline routes")
        };
        let route = &rc.virtual_hosts[0].routes[0];
        assert!(matches!(
            &route.action,
            Some(Action::Route(RouteAction { cluster_specifier: Some(ClusterSpecifier::Cluster(c)), .. })) if c == "greeter"
        ));
        assert_eq!(manager.http_filters[0].name, "envoy.filters.http.router");
        // Named CDS and EDS (what gRPC asks) get just those, balanced
        // round robin: grpcio NACKs least request.
        let named = Subscription::Named(BTreeSet::from(["greeter".into()]));
        let clusters = r.view(ResourceType::Cluster, &named, Balancing::RoundRobin);
        assert_eq!(names(&clusters), ["greeter"]);
        let c: Cluster = unpack(&clusters["greeter"]);
        assert_eq!(c.lb_policy(), LbPolicy::RoundRobin);
        assert_eq!(
            c.common_lb_config.unwrap().healthy_panic_threshold,
            Some(Percent { value: 0.0 })
        );
        let envoy: Cluster =
            unpack(&r.view(ResourceType::Cluster, &named, Balancing::LeastRequest)["greeter"]);
        assert_eq!(envoy.lb_policy(), LbPolicy::LeastRequest);
    }

    fn views(r: &Resources) -> BTreeMap<ResourceType, ResourceSet> {
        ResourceType::ALL
            .into_iter()
            .map(|t| {
                (
                    t,
                    r.view(t, &Subscription::Wildcard, Balancing::LeastRequest),
                )
            })
            .collect()
    }

    #[test]
    fn first_send_is_clusters_endpoints_listeners_routes() {
        let snap = snapshot(1, vec![service("users", "/users", &[])]);
        let next = views(&Resources::from_snapshot(&snap, &settings()));
        let order: Vec<ResourceType> = ordered(&BTreeMap::new(), &next)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(order, ResourceType::ALL);
        assert!(
            ordered(&next, &next).is_empty(),
            "nothing changed, nothing sent"
        );
    }

    #[test]
    fn a_removed_service_leaves_clusters_and_endpoints_last() {
        use EndpointState::*;
        let before = views(&Resources::from_snapshot(
            &snapshot(
                1,
                vec![
                    service("users", "/users", &[("i-1", 1, Healthy)]),
                    service("old", "/old", &[("i-2", 2, Healthy)]),
                ],
            ),
            &settings(),
        ));
        let after = views(&Resources::from_snapshot(
            &snapshot(2, vec![service("users", "/users", &[("i-1", 1, Draining)])]),
            &settings(),
        ));
        let steps = ordered(&before, &after);
        let steps: Vec<(ResourceType, Vec<&str>)> =
            steps.iter().map(|(t, set)| (*t, names(set))).collect();
        assert_eq!(
            steps,
            vec![
                // The cluster set only gains nothing: unchanged but for the
                // removal, so no first CDS; endpoints change (draining), and
                // keep `old` while the routes may still use it.
                (ResourceType::Endpoints, vec!["old", "users"]),
                (ResourceType::Route, vec![ENVOY_ROUTES]),
                (ResourceType::Cluster, vec!["users"]),
                (ResourceType::Endpoints, vec!["users"]),
            ]
        );
    }

    #[test]
    fn an_added_service_comes_before_the_routes_that_use_it() {
        let before = views(&Resources::from_snapshot(
            &snapshot(1, vec![service("users", "/users", &[])]),
            &settings(),
        ));
        let after = views(&Resources::from_snapshot(
            &snapshot(
                2,
                vec![service("users", "/users", &[]), service("new", "/new", &[])],
            ),
            &settings(),
        ));
        let order: Vec<ResourceType> = ordered(&before, &after)
            .into_iter()
            .map(|(t, _)| t)
            .collect();
        assert_eq!(
            order,
            vec![
                ResourceType::Cluster,
                ResourceType::Endpoints,
                ResourceType::Route
            ]
        );
    }
}
