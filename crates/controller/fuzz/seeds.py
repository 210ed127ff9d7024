#!/usr/bin/env python3
"""Writes the hand-made seeds of the controller's fuzz corpora
(corpus/<target>/seed-*): real inputs, in the shapes the tests and the
emulator use (tests/events.rs, tests/faults.rs, localstack/lifecycle_hooks.py,
the chart's configmap, crates/protocol's tests), so that the fuzzer starts
from every shape the parsers know. Input formats: checks.rs."""
import json
import os

here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def write(target, name, data):
    d = os.path.join(here, target)
    os.makedirs(d, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data)


# --- sqs_body: SQS message bodies ---------------------------------------
common = {
    "LifecycleActionToken": "71514b9d-6a40-4b26-8523-05e7ee35fa40",
    "AutoScalingGroupName": "users-a",
    "LifecycleHookName": "signpost-launch",
    "EC2InstanceId": "i-0598c7d356eba48d7",
    "LifecycleTransition": "autoscaling:EC2_INSTANCE_LAUNCHING",
}
hook_launch = {"Origin": "EC2", "Destination": "AutoScalingGroup", "Service": "AWS Auto Scaling",
               "Time": "2026-11-25T10:00:00.000Z", "AccountId": "123456789012",
               "RequestId": "4d7ab7b2-9c8f-4b32-b3d8-1f5a2b1c3d4e", **common,
               "NotificationMetadata": "{\"team\": \"users\"}"}
hook_terminate = {**hook_launch, "Origin": "AutoScalingGroup", "Destination": "EC2",
                  "LifecycleHookName": "signpost-drain",
                  "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"}
del hook_terminate["NotificationMetadata"]
test_notification = {"AccountId": "123456789012", "RequestId": "r-1",
                     "AutoScalingGroupARN": "arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:1f5a:autoScalingGroupName/users-a",
                     "AutoScalingGroupName": "users-a", "Service": "AWS Auto Scaling",
                     "Event": "autoscaling:TEST_NOTIFICATION", "Time": "2026-11-25T10:00:00.000Z"}


def eventbridge(source, detail_type, detail):
    return {"version": "0", "id": "12345678-1234-1234-1234-123456789012", "detail-type": detail_type,
            "source": source, "account": "123456789012", "time": "2026-11-25T10:00:00Z",
            "region": "eu-west-1",
            "resources": ["arn:aws:autoscaling:eu-west-1:123456789012:autoScalingGroup:1f5a:autoScalingGroupName/users-a"],
            "detail": detail}


eb_launch_action = eventbridge("aws.autoscaling", "EC2 Instance-launch Lifecycle Action",
                               {**common, "Origin": "EC2", "Destination": "AutoScalingGroup"})
eb_terminate_action = eventbridge("aws.autoscaling", "EC2 Instance-terminate Lifecycle Action",
                                  {**common, "LifecycleHookName": "signpost-drain",
                                   "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"})
activity = {"StatusCode": "InProgress", "Description": "Launching a new EC2 instance: i-0598c7d356eba48d7",
            "AutoScalingGroupName": "users-a", "ActivityId": "a-1",
            "Details": {"Availability Zone": "eu-west-1a", "Subnet ID": "subnet-1"},
            "RequestId": "r-2", "StatusMessage": "", "EndTime": "2026-11-25T10:00:00Z",
            "EC2InstanceId": "i-0598c7d356eba48d7", "StartTime": "2026-11-25T10:00:00Z",
            "Cause": "At 2026-11-25T10:00:00Z an instance was started in response to a difference between desired and actual capacity.",
            "Origin": "EC2", "Destination": "AutoScalingGroup"}
eb_launched = eventbridge("aws.autoscaling", "EC2 Instance Launch Successful", activity)
eb_terminated = eventbridge("aws.autoscaling", "EC2 Instance Terminate Successful",
                            {**activity, "Origin": "AutoScalingGroup", "Destination": "EC2"})
eb_launch_failed = eventbridge("aws.autoscaling", "EC2 Instance Launch Unsuccessful",
                               {**activity, "StatusCode": "Failed", "EC2InstanceId": ""})
eb_ec2 = eventbridge("aws.ec2", "EC2 Instance State-change Notification",
                     {"instance-id": "i-0598c7d356eba48d7", "state": "shutting-down"})


def sns(message):
    return {"Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            "TopicArn": "arn:aws:sns:eu-west-1:123456789012:signpost",
            "Subject": "Auto Scaling:  Lifecycle action 'LAUNCHING' for instance i-0598c7d356eba48d7",
            "Message": json.dumps(message), "Timestamp": "2026-11-25T10:00:00.000Z",
            "SignatureVersion": "1", "Signature": "EXAMPLE==",
            "SigningCertURL": "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-0000.pem",
            "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe"}


for name, body in {
    "hook-launch": hook_launch, "hook-terminate": hook_terminate, "test-notification": test_notification,
    "eb-launch-action": eb_launch_action, "eb-terminate-action": eb_terminate_action,
    "eb-launched": eb_launched, "eb-terminated": eb_terminated, "eb-launch-failed": eb_launch_failed,
    "eb-ec2-state": eb_ec2, "sns-hook": sns(hook_launch), "sns-eventbridge": sns(eb_terminate_action),
    "eb-s3": eventbridge("aws.s3", "Object Created", {}),
}.items():
    write("sqs_body", name, json.dumps(body))
write("sqs_body", "eb-compact", json.dumps(eb_launched, separators=(",", ":")))
write("sqs_body", "poison", '{"detail-type": 42}')
write("sqs_body", "garbage", "this is not an event")
write("sqs_body", "transition-only", '{"LifecycleTransition":"autoscaling:EC2_INSTANCE_LAUNCHING"}')

# --- tags: default port line, then key=value --------------------------------
for name, text in {
    "minimal": "\nsignpost:service=users\nsignpost:port=8080",
    "default-port": "80\nsignpost:service=users\nName=users-a\naws:autoscaling:groupName=users-a",
    "http-route": "\nsignpost:service=users\nsignpost:port=8080\nsignpost:health=http:/healthz\nsignpost:route=/api/users/",
    "tcp-root": "443\nsignpost:service=edge.v2\nsignpost:health=tcp\nsignpost:route=/",
    "grpc": "\nsignpost:service=greeter\nsignpost:port=50051\nsignpost:health=grpc",
    "grpc-service": "\nsignpost:service=greeter\nsignpost:port=50051\nsignpost:health=grpc:helloworld.Greeter",
    "spaces": "\nsignpost:service= users \nsignpost:port= 8080 ",
    "bad-port": "\nsignpost:service=users\nsignpost:port=70000",
    "zero-port": "\nsignpost:service=users\nsignpost:port=0",
    "bad-route": "\nsignpost:service=users\nsignpost:port=1\nsignpost:route=users",
    "bad-health": "\nsignpost:service=users\nsignpost:port=1\nsignpost:health=http:/a b",
    "bad-service": "\nsignpost:service=-users",
    "no-service": "8080\nName=web",
    "twice": "\nsignpost:service=users\nsignpost:service=other\nsignpost:port=8080",
}.items():
    write("tags", name, text)

# --- config: config files ------------------------------------------------
chart = '''# Rendered by the signpost chart from .Values.controller.config.
listen = "0.0.0.0:7070"
resync_interval = "30s"
default_port = 8080

[aws]
region = "eu-west-1"
max_attempts = 3
attempt_timeout = "5s"
operation_timeout = "20s"
calls_per_second = 20.0

[health]
interval = "5s"
timeout = "2s"
healthy_threshold = 2
unhealthy_threshold = 3
max_concurrent_probes = 256

[events]
queue_url = "https://sqs.eu-west-1.amazonaws.com/123456789012/signpost"
wait_time = "20s"

[lifecycle]
hook_prefix = "signpost"
launch_timeout = "5m"
launch_timeout_result = "abandon"
drain_timeout = "30s"
router_grace = "10s"

[ha]
table = "signpost-lease"
lease_name = "signpost-controller"
lease_duration = "15s"

[tls]
cert = "/etc/signpost/tls/tls.crt"
key = "/etc/signpost/tls/tls.key"
client_ca = "/etc/signpost/tls/ca.crt"

[auth]
tokens_file = "/etc/signpost/tokens/tokens.toml"

[xds]
listen = "0.0.0.0:18000"
envoy_listener = "0.0.0.0:10000"

[health.services."users"]
interval = "1s"
timeout = "500ms"
healthy_threshold = 1
'''
for name, text in {
    "empty": "",
    "chart": chart.replace('[ha]\ntable = "signpost-lease"', '[ha]\nadvertise = "https://signpost.example:7070"\ntable = "signpost-lease"'),
    "full": '''listen = "0.0.0.0:8080"
insecure_plaintext = true
resync_interval = "10s"
default_port = 80
[aws]
region = "eu-west-1"
calls_per_second = 5.5
endpoint_url = "http://127.0.0.1:5000"
[aws.endpoints]
sqs = "http://127.0.0.1:4566"
autoscaling = "https://autoscaling.eu-west-1.amazonaws.com"
ec2 = "http://[::1]:4566/"
dynamodb = "http://localhost:8000"
[health]
interval = "1s"
timeout = "500ms"
[health.services.users]
unhealthy_threshold = 5
''',
    "security": '''listen = "[::]:7070"
[tls]
cert = "c.pem"
key = "k.pem"
client_ca = "ca.pem"
identity = "uri_san"
uri_prefix = "spiffe://signpost/router/"
reload_interval = "10s"
[auth]
tokens_file = "t.toml"
[auth.roles]
ops = "admin"
grafana = "reader"
[limits]
max_body = 1048576
subscriptions_per_identity = 4
requests_per_second = 100
''',
    "guard-routers": '''[removal_guard]
enabled = true
max_share = 0.5
min_endpoints = 2
listings = 3
[routers]
expected = ["edge-1", "edge-2"]
minimum = { envoy = 3, signpost = 1, grpc = 1, haproxy = 1, nginx = 1 }
''',
    "events-lifecycle": '''[events]
queue_url = "http://localhost:4566/000000000000/signpost"
wait_time = "1s"
[lifecycle]
hook_prefix = "sp-"
launch_timeout = "1h 30m"
launch_timeout_result = "continue"
drain_timeout = "0s"
router_grace = "500ms"
''',
    "ha-local": '[ha]\ntable = "lease"\nlease_duration = "6s"\nreplica_id = "a"\nadvertise = "http://10.0.0.1:7070/"\n',
    "unknown-key": 'resync = "5s"\n',
    "bad-duration": 'resync_interval = "soon"\n',
    "bad-endpoint": '[aws.endpoints]\nsqs = "ftp://127.0.0.1:4566"\n',
    "bad-override": '[health.services.users]\nhealthy_threshold = 0\n',
    "bad-role": '[auth.roles]\nops = "root"\n',
    "bad-router-id": '[routers]\nexpected = ["edge 1"]\n',
    "zero-minimum": '[routers]\nminimum = { envoy = 0 }\n',
    "bad-share": '[removal_guard]\nmax_share = nan\n',
    "off-loopback": 'listen = "0.0.0.0:7070"\n',
}.items():
    write("config", name, text)

# --- push_lines: NDJSON stream lines ----------------------------------------
def endpoint(instance, address, state):
    return {"instance": instance, "address": address, "port": 8080, "zone": "eu-west-1a", "state": state}


snapshot = {"type": "snapshot", "protocol": 2, "epoch": 11, "revision": 5, "services": [
    {"name": "users", "route": "/users", "endpoints": [endpoint("i-1", "10.0.1.4", "healthy"),
                                                      endpoint("i-2", "10.0.2.7", "starting")]},
    {"name": "orders", "route": "/", "endpoints": [endpoint("i-9", "fd00::9", "unhealthy")]}]}
delta = {"type": "delta", "protocol": 2, "epoch": 11, "revision": 6, "base": 5, "changes": [
    {"op": "put_endpoint", "service": "users", "endpoint": endpoint("i-1", "10.0.1.4", "draining")},
    {"op": "remove_endpoint", "service": "users", "instance": "i-2"},
    {"op": "put_service", "name": "carts", "route": "/carts"},
    {"op": "remove_service", "name": "orders"}]}
ping = {"type": "ping", "revision": 6}
lines = lambda *ms: "".join(json.dumps(m, separators=(",", ":")) + "\n" for m in ms)
write("push_lines", "stream", lines(snapshot, delta, ping))
write("push_lines", "snapshot", lines(snapshot))
write("push_lines", "base-mismatch", lines(snapshot, {**delta, "base": 4}))
write("push_lines", "new-epoch", lines(snapshot, {**snapshot, "epoch": 22, "revision": 1}))
write("push_lines", "backwards", lines(snapshot, {**snapshot, "revision": 4}, {**delta, "revision": 5}))
write("push_lines", "unknown-service", lines(snapshot, {**delta, "changes": [
    {"op": "remove_endpoint", "service": "nope", "instance": "i-1"}]}))
write("push_lines", "old-protocol", lines({**snapshot, "protocol": 1}))
write("push_lines", "cut", lines(snapshot)[:90])

# --- ack: ack bodies ------------------------------------------------------
for name, body in {
    "empty": {"epoch": 7, "revision": 3, "in_flight": {}, "ejected": []},
    "minimal": {"epoch": 1, "revision": 1},
    "in-flight": {"epoch": 4503599627370496, "revision": 42,
                  "in_flight": {"users": {"i-1": 3, "i-2": 1}, "orders": {"i-9": 12}}},
    "shared-instance": {"epoch": 9, "revision": 2,
                        "in_flight": {"users": {"i-1": 9000000000000000000}, "admin": {"i-1": 5}}},
    # Not found by the fuzzer (5 million runs): written with its check,
    # which summing these overflowed (routers::RouterRecord::in_flight_to).
    "shared-instance-overflow": {"epoch": 9, "revision": 2,
                                 "in_flight": {"users": {"i-1": 18446744073709551615}, "admin": {"i-1": 1}}},
    "ejected": {"epoch": 9, "revision": 2, "in_flight": {},
                "ejected": [{"service": "users", "instance": "i-2", "reason": "connect_failures", "remaining_ms": 5000},
                            {"service": "users", "instance": "i-3", "reason": "server_errors", "remaining_ms": 0}]},
}.items():
    write("ack", name, json.dumps(body))
write("ack", "bad-reason", '{"epoch":9,"revision":2,"ejected":[{"service":"u","instance":"i","reason":"slow","remaining_ms":1}]}')

# --- xds_version: an ACK's version_info ---------------------------------------
for name, text in {"first": "", "ours": "77-12", "largest-epoch": "9007199254740991-18446744073709551615",
                   "zero-epoch": "0-3", "no-dash": "12", "foreign": "x-1", "three": "1-2-3",
                   "envoy-hash": "2a6f3c4d9e"}.items():
    write("xds_version", name, text)
