//! An xDS client that rejects what it is sent (a NACK) is shown with its
//! error, counted, and holds a launch until `launch_timeout`'s ACK wait
//! ends, as a lagging router does: the controller never counts a NACKed
//! version as applied. The client is a test's own ADS stream (tonic and
//! envoy-types) that ACKs clusters and NACKs every endpoint assignment.

mod common;

use std::time::{Duration, SystemTime};

use common::{completed, free_port, wait_for, wait_in_service, Scene};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use envoy_types::pb::google::rpc::Status;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PORT: u16 = 18680;
const CDS: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
const EDS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
const REJECTION: &str = "this client rejects every endpoint assignment";

/// Runs an ADS stream as node `id` until dropped: clusters are ACKed,
/// endpoints (of service `web`) NACKed with `REJECTION`.
fn nacking_client(id: &str, xds_port: u16) -> tokio::task::JoinHandle<()> {
    let id = id.to_owned();
    tokio::spawn(async move {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{xds_port}"))
                .await
                .expect("connect to the xDS server");
        let (tx, rx) = mpsc::channel(16);
        let node = Node {
            id,
            user_agent_name: "envoy".into(),
            ..Default::default()
        };
        let request = |type_url: &str, names: &[&str]| DiscoveryRequest {
            node: Some(node.clone()),
            type_url: type_url.into(),
            resource_names: names.iter().map(|n| n.to_string()).collect(),
            ..Default::default()
        };
        tx.send(request(CDS, &[])).await.unwrap();
        tx.send(request(EDS, &["web"])).await.unwrap();
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("ADS stream")
            .into_inner();
        while let Ok(Some(response)) = responses.message().await {
            let mut answer = request(&response.type_url, &[]);
            answer.response_nonce = response.nonce.clone();
            if response.type_url == EDS {
                // A NACK carries the version last accepted: none.
                answer.resource_names = vec!["web".into()];
                answer.error_detail = Some(Status {
                    code: 3,
                    message: REJECTION.into(),
                    details: vec![],
                });
            } else {
                answer.version_info = response.version_info.clone();
            }
            if tx.send(answer).await.is_err() {
                return;
            }
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nacking_client_is_shown_and_holds_a_launch_until_the_ack_wait_ends() {
    let xds_port = free_port();
    let toml = format!(
        "[lifecycle]\nrouter_grace = \"1s\"\nlaunch_timeout = \"8s\"\n\
         [xds]\nlisten = \"127.0.0.1:{xds_port}\"\nenvoy_listener = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let tags = [("signpost:service", "web"), ("signpost:port", "18680")];
    let scene = Scene::start(PORT, "web-nack", &tags, 1, &toml).await;
    let Scene {
        emulator: _emulator,
        cloud,
        backends,
        controller,
        ..
    } = scene;
    common::hold_launches_and_terminations(&cloud, "web-nack").await;
    let _client = nacking_client("nacker", xds_port);
    let nack = wait_for(
        "the client's NACK in /v1/routers",
        Duration::from_secs(10),
        || async {
            controller.router_record("nacker").await?["xds"]["last_nack"]
                .as_object()
                .cloned()
        },
    )
    .await;
    assert_eq!(nack["type_url"], EDS, "{nack:?}");
    assert_eq!(nack["message"], REJECTION, "{nack:?}");
    let record = controller.router_record("nacker").await.unwrap();
    assert!(
        record["acked_revision"].is_null(),
        "never applied: {record}"
    );
    assert!(
        controller
            .metric("signpost_xds_nacks_total{type=\"eds\"}")
            .await
            .is_some_and(|n| n >= 1.0),
        "counted"
    );

    let _followed = common::FollowedGroup::start(&cloud, "web-nack", backends);
    let scaled_at = SystemTime::now();
    cloud.set_desired("web-nack", 2).await;
    let two = wait_in_service(&cloud, "web-nack", 2, Duration::from_secs(40)).await;
    let mut launched = None;
    for id in &two {
        if let Some(record) = completed(&controller, id).await {
            launched = Some(record);
        }
    }
    let launched = launched.expect("the new instance's launch action completed");
    assert_eq!(launched["result"], "continue", "{launched:#}");
    let note = launched["note"].as_str().unwrap_or_default();
    assert!(
        note.contains("nacker"),
        "went on without the NACKing client's ACK, and says so: {launched:#}"
    );
    let since = humantime::parse_rfc3339(launched["since"].as_str().unwrap()).unwrap();
    let completed_at = since + Duration::from_millis(launched["completed_ms"].as_u64().unwrap());
    let held = completed_at.duration_since(scaled_at).unwrap();
    assert!(
        held >= Duration::from_secs(6),
        "held for the ACK wait (launch_timeout 8s), not {held:?}"
    );
}

/// xDS streams count against `limits.subscriptions_per_identity` as watch
/// streams do (without authentication, by node id): one more is refused
/// with RESOURCE_EXHAUSTED and counted, and a stream that ends gives its
/// slot back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xds_streams_count_against_the_subscriptions_of_their_identity() {
    let xds_port = free_port();
    let toml = format!(
        "[limits]\nsubscriptions_per_identity = 2\n\
         [xds]\nlisten = \"127.0.0.1:{xds_port}\"\nenvoy_listener = \"127.0.0.1:{}\"\n",
        free_port()
    );
    let tags = [("signpost:service", "web"), ("signpost:port", "18680")];
    let scene = Scene::start(PORT, "web-xds-slots", &tags, 1, &toml).await;
    let controller = &scene.controller;
    // An ADS stream as node `edge`: the first response, or the refusal.
    let open = || async {
        let mut client =
            AggregatedDiscoveryServiceClient::connect(format!("http://127.0.0.1:{xds_port}"))
                .await
                .expect("connect to the xDS server");
        let (tx, rx) = mpsc::channel(4);
        tx.send(DiscoveryRequest {
            node: Some(Node {
                id: "edge".into(),
                user_agent_name: "envoy".into(),
                ..Default::default()
            }),
            type_url: CDS.into(),
            ..Default::default()
        })
        .await
        .unwrap();
        let mut responses = client
            .stream_aggregated_resources(ReceiverStream::new(rx))
            .await
            .expect("ADS stream")
            .into_inner();
        let first = responses.message().await;
        (first.map(|r| r.is_some()), tx, responses)
    };
    let (first, _tx1, one) = open().await;
    let (second, _tx2, _two) = open().await;
    assert!(
        matches!((&first, &second), (Ok(true), Ok(true))),
        "two streams of `edge` are served: {first:?} {second:?}"
    );
    let (third, _tx3, _three) = open().await;
    let status = third.expect_err("a third stream of `edge` is refused");
    assert_eq!(status.code(), tonic::Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("subscriptions_per_identity"),
        "{status:?}"
    );
    assert_eq!(
        controller
            .metric("signpost_auth_refusals_total{reason=\"too_many_subscriptions\"}")
            .await,
        Some(1.0)
    );
    drop((one, _tx1));
    wait_for("a slot to free up", Duration::from_secs(20), || async {
        let (again, tx, stream) = open().await;
        again.ok().map(|_| (tx, stream))
    })
    .await;
}
