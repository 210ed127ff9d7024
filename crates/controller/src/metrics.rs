//! Every metric family the controller exports, declared once here with its
//! name, help and label names, and rendered with `prometheus-client` in the
//! Prometheus text format (0.0.4). The encoder escapes label values, so a
//! service or router id holding a quote or a newline cannot corrupt the
//! page; a sample must give exactly its family's labels (the array length
//! is checked by the compiler).
//!
//! Most families are read off the controller's state at scrape time (the
//! registry snapshot, the sync status, the routers), so `api` fills a
//! [`Page`] per scrape; the histograms live in `lifecycle`, which observes
//! into them as actions go.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the page.
pub const CONTENT_TYPE: &str = prometheus_text::CONTENT_TYPE;

/// A family whose samples carry the `N` labels named in `labels`.
#[derive(Debug)]
pub struct Family<const N: usize> {
    /// The name as scraped (a counter's with its `_total`).
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
    pub labels: [&'static str; N],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Gauge,
    Counter,
    Histogram,
}

impl Kind {
    /// The name the `# TYPE` line gives.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
            Kind::Histogram => "histogram",
        }
    }
}

/// Histogram bounds in seconds: from a fast push (milliseconds) to a slow
/// boot (minutes).
const BOUNDS: [f64; 15] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A histogram of durations with the bounds every signpost histogram
/// uses. Clones share their counts.
#[derive(Clone, Debug)]
pub struct Histogram(prometheus_client::metrics::histogram::Histogram);

impl Default for Histogram {
    fn default() -> Self {
        Histogram(prometheus_client::metrics::histogram::Histogram::new(
            BOUNDS,
        ))
    }
}

impl Histogram {
    pub fn observe_ms(&self, ms: u64) {
        self.0.observe(ms as f64 / 1000.0);
    }
}

pub const REGISTRY_REVISION: Family<0> = Family {
    name: "signpost_registry_revision",
    kind: Kind::Gauge,
    help: "Current registry revision.",
    labels: [],
};
pub const ENDPOINTS: Family<2> = Family {
    name: "signpost_endpoints",
    kind: Kind::Gauge,
    help: "Endpoints by service and state.",
    labels: ["service", "state"],
};
pub const MISCONFIGURED_GROUPS: Family<0> = Family {
    name: "signpost_misconfigured_groups",
    kind: Kind::Gauge,
    help: "Groups whose tags cannot be used.",
    labels: [],
};
pub const REMOVALS_HELD: Family<0> = Family {
    name: "signpost_removals_held",
    kind: Kind::Gauge,
    help: "Endpoints a complete listing would remove that the mass-removal guard holds (AWS has not said their instances are leaving).",
    labels: [],
};
pub const READY: Family<0> = Family {
    name: "signpost_ready",
    kind: Kind::Gauge,
    help: "1 while /readyz answers 200.",
    labels: [],
};
pub const LEADER: Family<0> = Family {
    name: "signpost_leader",
    kind: Kind::Gauge,
    help: "1 while this replica leads (always, without [ha]): it alone serves routers and completes lifecycle actions.",
    labels: [],
};
pub const LEASE_TOKEN: Family<0> = Family {
    name: "signpost_lease_token",
    kind: Kind::Gauge,
    help: "Fencing token of the lease as this replica knows it (its own term's, or the leader's); 0 without [ha].",
    labels: [],
};
pub const LEASE_CALLS: Family<2> = Family {
    name: "signpost_lease_calls_total",
    kind: Kind::Counter,
    help: "DynamoDB calls of the HA lease by call (GetItem, UpdateItem) and result (ok, condition_failed: another replica holds it, error).",
    labels: ["call", "result"],
};
pub const LEADER_SINCE: Family<0> = Family {
    name: "signpost_leader_since_timestamp_seconds",
    kind: Kind::Gauge,
    help: "When this replica's current term began; 0 while it follows.",
    labels: [],
};
pub const SYNC_LAST_SUCCESS: Family<0> = Family {
    name: "signpost_sync_last_success_timestamp_seconds",
    kind: Kind::Gauge,
    help: "When the last complete listing was applied.",
    labels: [],
};
pub const SYNC_LAST_DURATION: Family<0> = Family {
    name: "signpost_sync_last_duration_seconds",
    kind: Kind::Gauge,
    help: "Wall time of the last complete listing.",
    labels: [],
};
pub const SYNCS: Family<0> = Family {
    name: "signpost_syncs_total",
    kind: Kind::Counter,
    help: "Complete listings applied.",
    labels: [],
};
pub const AWS_CALLS: Family<1> = Family {
    name: "signpost_aws_calls_total",
    kind: Kind::Counter,
    help: "AWS calls made by complete listings, by API.",
    labels: ["api"],
};
pub const SYNC_FAILURES: Family<2> = Family {
    name: "signpost_sync_failures_total",
    kind: Kind::Counter,
    help: "Listings that failed, by the API that failed and how.",
    labels: ["api", "kind"],
};
pub const EVENTS: Family<1> = Family {
    name: "signpost_events_total",
    kind: Kind::Counter,
    help: "SQS event messages by outcome.",
    labels: ["result"],
};
pub const EVENT_RECEIVE_FAILURES: Family<1> = Family {
    name: "signpost_event_receive_failures_total",
    kind: Kind::Counter,
    help: "SQS ReceiveMessage calls that failed, by how.",
    labels: ["kind"],
};
pub const ROUTERS_CONNECTED: Family<0> = Family {
    name: "signpost_routers_connected",
    kind: Kind::Gauge,
    help: "Routers subscribed now.",
    labels: [],
};
pub const ROUTERS_BY_KIND: Family<1> = Family {
    name: "signpost_routers_connected_by_kind",
    kind: Kind::Gauge,
    help: "Routers subscribed now, by kind: signpost, haproxy and nginx (NDJSON), envoy and grpc (xDS).",
    labels: ["kind"],
};
pub const ROUTERS_MISSING: Family<0> = Family {
    name: "signpost_routers_missing",
    kind: Kind::Gauge,
    help: "Routers in [routers] expected that are not connected, plus kinds short of their [routers] minimum (one each); /readyz names them.",
    labels: [],
};
pub const XDS_NACKS: Family<1> = Family {
    name: "signpost_xds_nacks_total",
    kind: Kind::Counter,
    help: "xDS responses a client rejected, by type (cds, eds, lds, rds).",
    labels: ["type"],
};
pub const XDS_BAD_REQUESTS: Family<1> = Family {
    name: "signpost_xds_bad_requests_total",
    kind: Kind::Counter,
    help: "xDS requests that could not be used: no node id, a type signpost does not serve.",
    labels: ["reason"],
};
pub const XDS_RESPONSES: Family<0> = Family {
    name: "signpost_xds_responses_total",
    kind: Kind::Counter,
    help: "xDS responses written.",
    labels: [],
};
pub const ROUTER_LAG: Family<1> = Family {
    name: "signpost_router_lag_revisions",
    kind: Kind::Gauge,
    help: "Registry revision minus the router's acked revision.",
    labels: ["router"],
};
pub const ACKS_IGNORED: Family<1> = Family {
    name: "signpost_acks_ignored_total",
    kind: Kind::Counter,
    help: "Router acks that did not count: of another controller epoch, for a revision never sent on the router's connection, or from a router not subscribed.",
    labels: ["reason"],
};
pub const AUTH_REFUSALS: Family<1> = Family {
    name: "signpost_auth_refusals_total",
    kind: Kind::Counter,
    help: "API requests and xDS streams refused by authentication or authorization, by reason.",
    labels: ["reason"],
};
pub const LIFECYCLE_ACTIONS: Family<2> = Family {
    name: "signpost_lifecycle_actions_total",
    kind: Kind::Counter,
    help: "Lifecycle actions ended, by transition and result (continue, abandon, not_waiting: already complete, error: CompleteLifecycleAction failed).",
    labels: ["transition", "result"],
};
pub const LIFECYCLE_TIMEOUTS: Family<1> = Family {
    name: "signpost_lifecycle_timeouts_total",
    kind: Kind::Counter,
    help: "Lifecycle waits decided by a timeout: launch (not healthy), acks (a router did not ack), drain.",
    labels: ["stage"],
};
pub const LIFECYCLE_HEARTBEATS: Family<1> = Family {
    name: "signpost_lifecycle_heartbeats_total",
    kind: Kind::Counter,
    help: "RecordLifecycleActionHeartbeat calls, by result.",
    labels: ["result"],
};
pub const XDS_PUSH_TO_ACK: Family<0> = Family {
    name: "signpost_xds_push_to_ack_seconds",
    kind: Kind::Histogram,
    help: "From an xDS response written to the client's ACK of it.",
    labels: [],
};
pub const LAUNCH_HEALTHY: Family<0> = Family {
    name: "signpost_lifecycle_launch_healthy_seconds",
    kind: Kind::Histogram,
    help: "Launch: from the event (or EC2 launch time) to the endpoint healthy.",
    labels: [],
};
pub const LAUNCH_ACKED: Family<0> = Family {
    name: "signpost_lifecycle_launch_acked_seconds",
    kind: Kind::Histogram,
    help: "Launch: from the event (or EC2 launch time) to every router acked the healthy endpoint.",
    labels: [],
};
pub const HEALTHY_TO_ACKED: Family<0> = Family {
    name: "signpost_lifecycle_healthy_to_acked_seconds",
    kind: Kind::Histogram,
    help: "Launch: from the endpoint healthy to every router acked it.",
    labels: [],
};
pub const TERMINATE_DRAINED: Family<0> = Family {
    name: "signpost_lifecycle_terminate_drained_seconds",
    kind: Kind::Histogram,
    help: "Terminate: from the event (or Terminating:Wait seen) to every router acked the drain with nothing in flight.",
    labels: [],
};

/// Every family declared above, in the order `/metrics` lists them: name,
/// kind and label names (for the check of the README's table).
pub fn families() -> Vec<(&'static str, Kind, Vec<&'static str>)> {
    fn declared<const N: usize>(f: &Family<N>) -> (&'static str, Kind, Vec<&'static str>) {
        (f.name, f.kind, f.labels.to_vec())
    }
    vec![
        declared(&REGISTRY_REVISION),
        declared(&ENDPOINTS),
        declared(&MISCONFIGURED_GROUPS),
        declared(&REMOVALS_HELD),
        declared(&READY),
        declared(&LEADER),
        declared(&LEASE_TOKEN),
        declared(&LEASE_CALLS),
        declared(&LEADER_SINCE),
        declared(&SYNC_LAST_SUCCESS),
        declared(&SYNC_LAST_DURATION),
        declared(&SYNCS),
        declared(&AWS_CALLS),
        declared(&SYNC_FAILURES),
        declared(&EVENTS),
        declared(&EVENT_RECEIVE_FAILURES),
        declared(&ROUTERS_CONNECTED),
        declared(&ROUTERS_BY_KIND),
        declared(&ROUTERS_MISSING),
        declared(&XDS_NACKS),
        declared(&XDS_BAD_REQUESTS),
        declared(&XDS_RESPONSES),
        declared(&ROUTER_LAG),
        declared(&ACKS_IGNORED),
        declared(&AUTH_REFUSALS),
        declared(&LIFECYCLE_ACTIONS),
        declared(&LIFECYCLE_TIMEOUTS),
        declared(&LIFECYCLE_HEARTBEATS),
        declared(&LAUNCH_HEALTHY),
        declared(&LAUNCH_ACKED),
        declared(&HEALTHY_TO_ACKED),
        declared(&TERMINATE_DRAINED),
        declared(&XDS_PUSH_TO_ACK),
    ]
}

/// One scrape's worth of samples, family by family, in the order added.
#[derive(Debug, Default)]
pub struct Page {
    families: Vec<Written>,
}

#[derive(Debug)]
struct Written {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Samples,
}

#[derive(Debug)]
enum Samples {
    Gauge(Vec<(Labels, f64)>),
    Counter(Vec<(Labels, u64)>),
    Histogram(Histogram),
}

type Labels = Vec<(&'static str, String)>;

fn labels<const N: usize>(family: &Family<N>, values: [&str; N]) -> Labels {
    family
        .labels
        .iter()
        .zip(values)
        .map(|(name, value)| (*name, value.to_owned()))
        .collect()
}

impl Page {
    /// A gauge family with these samples (none: the family is still listed).
    pub fn gauges<'a, const N: usize>(
        &mut self,
        family: &Family<N>,
        samples: impl IntoIterator<Item = ([&'a str; N], f64)>,
    ) {
        let samples = samples
            .into_iter()
            .map(|(values, v)| (labels(family, values), v))
            .collect();
        self.add(family, Samples::Gauge(samples));
    }

    /// A counter family with these samples.
    pub fn counters<'a, const N: usize>(
        &mut self,
        family: &Family<N>,
        samples: impl IntoIterator<Item = ([&'a str; N], u64)>,
    ) {
        let samples = samples
            .into_iter()
            .map(|(values, v)| (labels(family, values), v))
            .collect();
        self.add(family, Samples::Counter(samples));
    }

    pub fn gauge(&mut self, family: &Family<0>, value: f64) {
        self.gauges(family, [([], value)]);
    }

    pub fn counter(&mut self, family: &Family<0>, value: u64) {
        self.counters(family, [([], value)]);
    }

    /// A histogram (shared: it goes on counting after this scrape).
    pub fn histogram(&mut self, family: &Family<0>, histogram: &Histogram) {
        self.add(family, Samples::Histogram(histogram.clone()));
    }

    fn add<const N: usize>(&mut self, family: &Family<N>, samples: Samples) {
        let kind = match samples {
            Samples::Gauge(_) => Kind::Gauge,
            Samples::Counter(_) => Kind::Counter,
            Samples::Histogram(_) => Kind::Histogram,
        };
        assert_eq!(kind, family.kind, "{} written as a {kind:?}", family.name);
        self.families.push(Written {
            name: family.name,
            kind,
            help: family.help,
            samples,
        });
    }

    /// The page in the Prometheus text format.
    pub fn render(self) -> String {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(self));
        let mut out = String::new();
        prometheus_text::encode(&mut out, &registry).expect("a String takes any write");
        out
    }
}

impl Collector for Page {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        for family in &self.families {
            let (kind, name) = match family.kind {
                Kind::Gauge => (MetricType::Gauge, family.name),
                // The encoder adds a counter's `_total` itself.
                Kind::Counter => (
                    MetricType::Counter,
                    family.name.strip_suffix("_total").unwrap_or(family.name),
                ),
                Kind::Histogram => (MetricType::Histogram, family.name),
            };
            let mut metric = encoder.encode_descriptor(name, family.help, None, kind)?;
            match &family.samples {
                Samples::Gauge(samples) => {
                    for (labels, value) in samples {
                        let metric = metric.encode_family(labels)?;
                        // Whole numbers (counts, revisions) read `2` as they
                        // always did, not `2.0`.
                        if value.fract() == 0.0 && value.abs() < 2f64.powi(53) {
                            ConstGauge::new(*value as i64).encode(metric)?;
                        } else {
                            ConstGauge::new(*value).encode(metric)?;
                        }
                    }
                }
                Samples::Counter(samples) => {
                    for (labels, value) in samples {
                        ConstCounter::new(*value).encode(metric.encode_family(labels)?)?;
                    }
                }
                Samples::Histogram(Histogram(histogram)) => histogram.encode(metric)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_inf_counts_everything() {
        let h = Histogram::default();
        for ms in [3, 40, 40, 900_000] {
            h.observe_ms(ms);
        }
        let mut page = Page::default();
        page.histogram(&LAUNCH_HEALTHY, &h);
        let out = page.render();
        let name = LAUNCH_HEALTHY.name;
        assert!(out.contains(&format!("# TYPE {name} histogram\n")), "{out}");
        assert!(out.contains(&format!("{name}_bucket{{le=\"0.005\"}} 1\n")));
        assert!(out.contains(&format!("{name}_bucket{{le=\"0.05\"}} 3\n")));
        assert!(
            out.contains(&format!("{name}_bucket{{le=\"1\"}} 3\n")),
            "{out}"
        );
        assert!(out.contains(&format!("{name}_bucket{{le=\"300\"}} 3\n")));
        assert!(out.contains(&format!("{name}_bucket{{le=\"+Inf\"}} 4\n")));
        assert!(out.contains(&format!("{name}_count 4\n")));
        assert!(out.contains(&format!("{name}_sum 900.083\n")), "{out}");
    }

    #[test]
    fn families_read_as_before() {
        let mut page = Page::default();
        page.counter(&SYNCS, 3);
        page.gauges(&ENDPOINTS, [(["users", "healthy"], 2.0)]);
        page.gauges(&ROUTER_LAG, []);
        assert_eq!(
            page.render(),
            concat!(
                "# HELP signpost_syncs_total Complete listings applied.\n",
                "# TYPE signpost_syncs_total counter\n",
                "signpost_syncs_total 3\n",
                "# HELP signpost_endpoints Endpoints by service and state.\n",
                "# TYPE signpost_endpoints gauge\n",
                "signpost_endpoints{service=\"users\",state=\"healthy\"} 2\n",
                "# HELP signpost_router_lag_revisions Registry revision minus the router's acked revision.\n",
                "# TYPE signpost_router_lag_revisions gauge\n",
            )
        );
    }
}
