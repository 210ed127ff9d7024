//! The wire's JSON, pinned byte for byte: routers of the previous build (of
//! the same protocol version) read what this one writes (and the reverse),
//! so a change of the Rust types behind a message must not change a byte of
//! it. Protocol 2 added `epoch`.

use std::collections::BTreeMap;

use signpost_protocol::{
    Ack, Epoch, Message, WireChange, WireEndpoint, WireService, WireState, PROTOCOL,
};

fn endpoint(instance: &str, state: WireState) -> WireEndpoint {
    WireEndpoint {
        instance: instance.into(),
        address: [127, 42, 1, 4].into(),
        port: 8080,
        zone: "eu-west-1a".into(),
        state,
    }
}

fn line(message: &Message) -> String {
    String::from_utf8(message.to_line()).unwrap()
}

#[test]
fn stream_messages_are_unchanged_on_the_wire() {
    assert_eq!(PROTOCOL, 2);
    let snapshot = Message::Snapshot {
        protocol: PROTOCOL,
        epoch: Epoch::from_bits(77),
        revision: 3,
        services: vec![WireService {
            name: "users".into(),
            route: "/users".into(),
            endpoints: vec![endpoint("i-1", WireState::Healthy)],
        }],
    };
    let snapshot_line = concat!(
        r#"{"type":"snapshot","protocol":2,"epoch":77,"revision":3,"services":[{"name":"users","route":"/users","endpoints":["#,
        r#"{"instance":"i-1","address":"127.42.1.4","port":8080,"zone":"eu-west-1a","state":"healthy"}]}]}"#,
        "\n"
    );
    assert_eq!(line(&snapshot), snapshot_line);

    let delta = Message::Delta {
        protocol: PROTOCOL,
        epoch: Epoch::from_bits(77),
        revision: 4,
        base: 3,
        changes: vec![
            WireChange::PutService {
                name: "orders".into(),
                route: "/orders".into(),
            },
            WireChange::PutEndpoint {
                service: "orders".into(),
                endpoint: endpoint("i-2", WireState::Starting),
            },
            WireChange::PutEndpoint {
                service: "users".into(),
                endpoint: endpoint("i-1", WireState::Draining),
            },
            WireChange::RemoveEndpoint {
                service: "users".into(),
                instance: "i-3".into(),
            },
            WireChange::RemoveService { name: "old".into() },
        ],
    };
    let delta_line = concat!(
        r#"{"type":"delta","protocol":2,"epoch":77,"revision":4,"base":3,"changes":["#,
        r#"{"op":"put_service","name":"orders","route":"/orders"},"#,
        r#"{"op":"put_endpoint","service":"orders","endpoint":{"instance":"i-2","address":"127.42.1.4","port":8080,"zone":"eu-west-1a","state":"starting"}},"#,
        r#"{"op":"put_endpoint","service":"users","endpoint":{"instance":"i-1","address":"127.42.1.4","port":8080,"zone":"eu-west-1a","state":"draining"}},"#,
        r#"{"op":"remove_endpoint","service":"users","instance":"i-3"},"#,
        r#"{"op":"remove_service","name":"old"}]}"#,
        "\n"
    );
    assert_eq!(line(&delta), delta_line);
    assert_eq!(
        line(&Message::Ping { revision: 4 }),
        "{\"type\":\"ping\",\"revision\":4}\n"
    );
    for (message, text) in [(snapshot, snapshot_line), (delta, delta_line)] {
        assert_eq!(Message::from_line(text.as_bytes()).unwrap(), message);
    }
}

#[test]
fn acks_are_unchanged_on_the_wire() {
    let text = concat!(
        r#"{"epoch":77,"revision":9,"in_flight":{"users":{"i-1":3}},"ejected":["#,
        r#"{"service":"users","instance":"i-2","reason":"connect_failures","remaining_ms":1000},"#,
        r#"{"service":"users","instance":"i-3","reason":"server_errors","remaining_ms":250}]}"#
    );
    let ack: Ack = serde_json::from_str(text).unwrap();
    assert_eq!(ack.revision, 9);
    assert_eq!(
        ack.in_flight,
        BTreeMap::from([(
            "users".to_string(),
            BTreeMap::from([("i-1".to_string(), 3)])
        )])
    );
    assert_eq!(serde_json::to_string(&ack).unwrap(), text);
    let bare: Ack = serde_json::from_str(r#"{"epoch":77,"revision":1}"#).unwrap();
    assert_eq!(
        serde_json::to_string(&bare).unwrap(),
        r#"{"epoch":77,"revision":1,"in_flight":{},"ejected":[]}"#,
        "an ack without in_flight or ejected still reads"
    );
    assert!(
        serde_json::from_str::<Ack>(r#"{"revision":1}"#).is_err(),
        "an ack without an epoch (protocol 1) is refused"
    );
}
