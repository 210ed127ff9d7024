"""The emulator's lifecycle hooks (localstack/lifecycle_hooks.py), tested alone.

Starts the patched server (`moto_server_hooks`, what `emulator.sh bin`
prints) on a free port, resets it before each test, and drives it with boto3.
Every wait is a poll with a deadline. Heartbeat timeouts of 2-3 s stand in
for AWS's 30 s minimum (the emulator does not enforce it).
"""
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = Path(__file__).resolve().parent
SERVER = HERE.parent / "moto_server_hooks"
LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
# Where the server records CompleteLifecycleAction calls (SIGNPOST_HOOKS_CALLS_LOG).
CALLS_LOG = Path(os.environ.get("TMPDIR", "/tmp")) / f"signpost-hooks-calls-{os.getpid()}.jsonl"


def wait_for(what, check, timeout=10.0, interval=0.1):
    """Poll check() until it returns something truthy; fail after timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def _answers(endpoint):
    try:
        urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
    except urllib.error.HTTPError:
        pass
    except OSError:
        return False
    return True


@pytest.fixture(scope="session")
def endpoint():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ep = f"http://127.0.0.1:{port}"
    CALLS_LOG.unlink(missing_ok=True)
    proc = subprocess.Popen([str(SERVER), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "SIGNPOST_HOOKS_CALLS_LOG": str(CALLS_LOG)})
    try:
        wait_for("the patched moto_server to answer",
                 lambda: proc.poll() is not None and "exited" or _answers(ep), timeout=30)
        assert proc.poll() is None, "moto_server_hooks exited"
        yield ep
    finally:
        proc.terminate()
        proc.wait(10)


class Aws:
    """boto3 clients on the emulator plus a VPC/subnet/launch template."""

    def __init__(self, endpoint):
        kw = dict(endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="test",
                  aws_secret_access_key="test", config=Config(retries={"max_attempts": 1}))
        self.asg = boto3.client("autoscaling", **kw)
        self.ec2 = boto3.client("ec2", **kw)
        self.sqs = boto3.client("sqs", **kw)
        self.events = boto3.client("events", **kw)
        vpc = self.ec2.create_vpc(CidrBlock="127.43.0.0/16")["Vpc"]["VpcId"]
        self.subnet = self.ec2.create_subnet(VpcId=vpc, CidrBlock="127.43.1.0/24",
                                             AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
        self.ec2.create_launch_template(LaunchTemplateName="hooks-lt", LaunchTemplateData={
            "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})

    def group(self, name, desired, hooks=(), **extra):
        self.asg.create_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=0, MaxSize=10, DesiredCapacity=desired,
            LaunchTemplate={"LaunchTemplateName": "hooks-lt", "Version": "$Latest"},
            VPCZoneIdentifier=self.subnet, LifecycleHookSpecificationList=list(hooks), **extra)

    def hook(self, group, name, transition, **kw):
        self.asg.put_lifecycle_hook(AutoScalingGroupName=group, LifecycleHookName=name,
                                    LifecycleTransition=transition, **kw)

    def queue(self, name):
        url = self.sqs.create_queue(QueueName=name)["QueueUrl"]
        arn = self.sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        return url, arn

    def instances(self, group):
        """{instance id: LifecycleState} as DescribeAutoScalingGroups reports it."""
        g = self.asg.describe_auto_scaling_groups(AutoScalingGroupNames=[group])["AutoScalingGroups"][0]
        return {i["InstanceId"]: i["LifecycleState"] for i in g["Instances"]}

    def desired(self, group):
        return self.asg.describe_auto_scaling_groups(
            AutoScalingGroupNames=[group])["AutoScalingGroups"][0]["DesiredCapacity"]

    def ec2_state(self, instance_id):
        r = self.ec2.describe_instances(InstanceIds=[instance_id])["Reservations"][0]["Instances"][0]
        return r["State"]["Name"], r.get("PrivateIpAddress")

    def receive(self, url, count, what, timeout=10.0):
        """At least `count` message bodies (JSON) from the queue, in order received."""
        got = []

        def more():
            for m in self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                              WaitTimeSeconds=1).get("Messages", []):
                got.append(json.loads(m["Body"]))
                self.sqs.delete_message(QueueUrl=url, ReceiptHandle=m["ReceiptHandle"])
            return len(got) >= count

        wait_for(what, more, timeout=timeout, interval=0)
        return got

    def receive_none(self, url):
        """No message arrives within one long poll (1 s): an absence check."""
        msgs = self.sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10,
                                        WaitTimeSeconds=1).get("Messages", [])
        return [json.loads(m["Body"]) for m in msgs]

    def states_are(self, group, want):
        """Poll helper: the group's states, once they equal `want` (a dict or a callable)."""
        def check():
            cur = self.instances(group)
            ok = want(cur) if callable(want) else cur == want
            return [cur] if ok else None  # a list, so an empty group still counts as reached
        return check


@pytest.fixture
def aws(endpoint):
    urllib.request.urlopen(urllib.request.Request(endpoint + "/moto-api/reset", method="POST"), timeout=10)
    return Aws(endpoint)


def validation_error(call, **kw):
    with pytest.raises(ClientError) as e:
        call(**kw)
    assert e.value.response["Error"]["Code"] == "ValidationError"
    return e.value.response["Error"]["Message"]


# --------------------------------------------------------------------------


def test_put_lifecycle_hook_sends_test_notification_first(aws):
    url, arn = aws.queue("hooks")
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, NotificationTargetARN=arn,
             RoleARN="arn:aws:iam::123456789012:role/hooks", NotificationMetadata="meta")
    [msg] = aws.receive(url, 1, "the test notification")
    assert msg["Event"] == "autoscaling:TEST_NOTIFICATION"
    assert msg["AutoScalingGroupName"] == "web"
    assert msg["Service"] == "AWS Auto Scaling"
    assert msg["AccountId"] == "123456789012"
    assert msg["AutoScalingGroupARN"].startswith("arn:aws:autoscaling:us-east-1:123456789012:")
    assert msg["RequestId"] and msg["Time"].endswith("Z")
    # The hook keeps what was put, not moto's hardcoded target.
    [hook] = aws.asg.describe_lifecycle_hooks(AutoScalingGroupName="web")["LifecycleHooks"]
    assert hook["NotificationTargetARN"] == arn
    assert hook["NotificationMetadata"] == "meta"
    assert hook["HeartbeatTimeout"] == 3600 and hook["DefaultResult"] == "ABANDON"
    assert hook["GlobalTimeout"] == 172800


def test_put_lifecycle_hook_to_missing_queue_is_refused(aws):
    aws.group("web", 0)
    validation_error(aws.asg.put_lifecycle_hook, AutoScalingGroupName="web", LifecycleHookName="h",
                     LifecycleTransition=LAUNCHING,
                     NotificationTargetARN="arn:aws:sqs:us-east-1:123456789012:nope")
    assert aws.asg.describe_lifecycle_hooks(AutoScalingGroupName="web")["LifecycleHooks"] == []


def test_scale_out_holds_instances_in_pending_wait_and_notifies(aws):
    url, arn = aws.queue("hooks")
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, NotificationTargetARN=arn, NotificationMetadata="meta")
    aws.receive(url, 1, "the test notification")
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=2)

    states = aws.instances("web")
    assert sorted(states.values()) == ["Pending:Wait", "Pending:Wait"]
    for iid in states:
        state, ip = aws.ec2_state(iid)
        assert state == "running" and ip.startswith("127.43.1.")
    msgs = aws.receive(url, 2, "two launch notifications")
    assert {m["EC2InstanceId"] for m in msgs} == set(states)
    for m in msgs:
        assert m["LifecycleTransition"] == LAUNCHING
        assert m["LifecycleHookName"] == "launch" and m["AutoScalingGroupName"] == "web"
        assert m["Origin"] == "EC2" and m["Destination"] == "AutoScalingGroup"
        assert m["Service"] == "AWS Auto Scaling" and m["AccountId"] == "123456789012"
        assert m["NotificationMetadata"] == "meta"
        assert m["LifecycleActionToken"] and m["RequestId"] and m["Time"]
    # Instances still launching count toward capacity: asking again launches nothing.
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=2)
    assert aws.instances("web") == states
    states_api = aws.asg.describe_auto_scaling_instances(InstanceIds=list(states))["AutoScalingInstances"]
    assert {i["LifecycleState"] for i in states_api} == {"Pending:Wait"}


def test_create_and_update_group_with_hooks_launch_into_pending_wait(aws):
    aws.group("created", 2, hooks=[{"LifecycleHookName": "launch", "LifecycleTransition": LAUNCHING}])
    assert set(aws.instances("created").values()) == {"Pending:Wait"}
    assert len(aws.instances("created")) == 2

    aws.group("updated", 0)
    aws.hook("updated", "launch", LAUNCHING)
    aws.asg.update_auto_scaling_group(AutoScalingGroupName="updated", DesiredCapacity=3)
    assert list(aws.instances("updated").values()) == ["Pending:Wait"] * 3


def test_continue_by_instance_id_or_token_puts_instance_in_service(aws):
    url, arn = aws.queue("hooks")
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, NotificationTargetARN=arn)
    aws.receive(url, 1, "the test notification")
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=2)
    msgs = aws.receive(url, 2, "two launch notifications")
    by_id, by_token = msgs[0], msgs[1]

    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="launch",
                                      LifecycleActionResult="CONTINUE",
                                      InstanceId=by_id["EC2InstanceId"])
    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="launch",
                                      LifecycleActionResult="CONTINUE",
                                      LifecycleActionToken=by_token["LifecycleActionToken"])
    assert aws.instances("web") == {by_id["EC2InstanceId"]: "InService",
                                    by_token["EC2InstanceId"]: "InService"}
    # Completing again: the action is gone, AWS's ValidationError.
    msg = validation_error(aws.asg.complete_lifecycle_action, AutoScalingGroupName="web",
                           LifecycleHookName="launch", LifecycleActionResult="CONTINUE",
                           InstanceId=by_id["EC2InstanceId"])
    assert msg == f"No active Lifecycle Action found with instance ID {by_id['EC2InstanceId']}"
    # Every call is recorded with its caller's access key, found or not (by
    # token, the instance is not in the request).
    calls = [json.loads(line) for line in CALLS_LOG.read_text().splitlines()]
    mine = [(c["caller"], c["instance"], c["result"], c["found"]) for c in calls
            if c["group"] == "web" and c["instance"] in (by_id["EC2InstanceId"], None)]
    assert mine[-3:] == [("test", by_id["EC2InstanceId"], "CONTINUE", True),
                         ("test", None, "CONTINUE", True),
                         ("test", by_id["EC2InstanceId"], "CONTINUE", False)], calls


def test_abandon_on_launch_terminates_and_launches_a_replacement(aws):
    url, arn = aws.queue("hooks")
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, NotificationTargetARN=arn)
    aws.receive(url, 1, "the test notification")
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [first] = aws.instances("web")
    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="launch",
                                      LifecycleActionResult="ABANDON", InstanceId=first)
    assert aws.ec2_state(first)[0] == "terminated"
    states = aws.instances("web")
    assert first not in states and list(states.values()) == ["Pending:Wait"]
    assert aws.desired("web") == 1
    msgs = aws.receive(url, 2, "notifications for both launches")
    assert [m["EC2InstanceId"] for m in msgs] == [first] + list(states)


def test_no_pending_action_answers_validation_error(aws):
    aws.group("web", 1)
    aws.hook("web", "launch", LAUNCHING)
    [iid] = aws.instances("web")  # launched before the hook: InService
    for call in (aws.asg.complete_lifecycle_action, aws.asg.record_lifecycle_action_heartbeat):
        extra = {"LifecycleActionResult": "CONTINUE"} if call == aws.asg.complete_lifecycle_action else {}
        msg = validation_error(call, AutoScalingGroupName="web", LifecycleHookName="launch",
                               InstanceId=iid, **extra)
        assert msg == f"No active Lifecycle Action found with instance ID {iid}"
        token = "11111111-2222-3333-4444-555555555555"
        msg = validation_error(call, AutoScalingGroupName="web", LifecycleHookName="launch",
                               LifecycleActionToken=token, **extra)
        assert msg == f"No active Lifecycle Action found with token {token}"


def test_heartbeat_timeout_applies_default_result_continue(aws):
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, HeartbeatTimeout=2, DefaultResult="CONTINUE")
    start = time.monotonic()
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [iid] = aws.instances("web")
    assert aws.instances("web") == {iid: "Pending:Wait"}
    wait_for("the timeout to put the instance in service",
             aws.states_are("web", {iid: "InService"}), timeout=6)
    assert time.monotonic() - start >= 1.9


def test_heartbeat_timeout_applies_default_result_abandon(aws):
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, HeartbeatTimeout=2)  # DefaultResult defaults to ABANDON
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [first] = aws.instances("web")
    [states] = wait_for("the timeout to abandon and replace the instance",
                        aws.states_are("web", lambda s: s and first not in s), timeout=6)
    assert list(states.values()) == ["Pending:Wait"]
    assert aws.ec2_state(first)[0] == "terminated"


def test_heartbeat_restarts_the_timeout(aws):
    aws.group("web", 0)
    aws.hook("web", "launch", LAUNCHING, HeartbeatTimeout=3, DefaultResult="CONTINUE")
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [iid] = aws.instances("web")
    # Heartbeats every second for 5 s: past the 3 s timeout, still waiting.
    start = time.monotonic()
    while time.monotonic() - start < 5:
        aws.asg.record_lifecycle_action_heartbeat(AutoScalingGroupName="web", LifecycleHookName="launch",
                                                  InstanceId=iid)
        assert aws.instances("web") == {iid: "Pending:Wait"}
        time.sleep(1)  # pacing the heartbeats, not waiting for a condition
    last = time.monotonic()
    wait_for("the timeout after the last heartbeat", aws.states_are("web", {iid: "InService"}), timeout=6)
    assert time.monotonic() - last >= 1.5  # ~3 s after the last heartbeat, not at once


def test_scale_in_passes_through_terminating_wait(aws):
    url, arn = aws.queue("hooks")
    aws.group("web", 3)
    aws.hook("web", "drain", TERMINATING, NotificationTargetARN=arn, NotificationMetadata="m")
    aws.receive(url, 1, "the test notification")
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)

    assert aws.desired("web") == 1  # desired already reflects the scale-in
    states = aws.instances("web")
    waiting = sorted(i for i, s in states.items() if s == "Terminating:Wait")
    assert len(states) == 3 and len(waiting) == 2
    for iid in waiting:
        assert aws.ec2_state(iid)[0] == "running"
    msgs = aws.receive(url, 2, "two terminate notifications")
    assert sorted(m["EC2InstanceId"] for m in msgs) == waiting
    for m in msgs:
        assert m["LifecycleTransition"] == TERMINATING
        assert m["Origin"] == "AutoScalingGroup" and m["Destination"] == "EC2"
        assert m["NotificationMetadata"] == "m"
    # Asking for the same capacity again picks no further instance.
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    assert aws.instances("web") == states

    # CONTINUE and ABANDON both let a terminating instance go.
    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="drain",
                                      LifecycleActionResult="CONTINUE", InstanceId=waiting[0])
    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="drain",
                                      LifecycleActionResult="ABANDON", InstanceId=waiting[1])
    for iid in waiting:
        assert aws.ec2_state(iid)[0] == "terminated"
    assert list(aws.instances("web").values()) == ["InService"]


def test_terminate_instance_in_group_passes_through_terminating_wait(aws):
    aws.group("web", 2, hooks=[{"LifecycleHookName": "drain", "LifecycleTransition": TERMINATING}])
    a, b = aws.instances("web")
    aws.asg.terminate_instance_in_auto_scaling_group(InstanceId=a, ShouldDecrementDesiredCapacity=True)
    assert aws.instances("web") == {a: "Terminating:Wait", b: "InService"} and aws.desired("web") == 1
    aws.asg.terminate_instance_in_auto_scaling_group(InstanceId=b, ShouldDecrementDesiredCapacity=False)
    states = aws.instances("web")
    assert states[b] == "Terminating:Wait" and aws.desired("web") == 1
    [replacement] = [i for i in states if i not in (a, b)]
    assert states[replacement] == "InService"
    for iid in (a, b):
        aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="drain",
                                          LifecycleActionResult="CONTINUE", InstanceId=iid)
        assert aws.ec2_state(iid)[0] == "terminated"
    assert aws.instances("web") == {replacement: "InService"}


def test_terminate_heartbeat_timeout_terminates(aws):
    aws.group("web", 1)
    aws.hook("web", "drain", TERMINATING, HeartbeatTimeout=2, DefaultResult="CONTINUE")
    [iid] = aws.instances("web")
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=0)
    assert aws.instances("web") == {iid: "Terminating:Wait"}
    wait_for("the timeout to terminate the instance", aws.states_are("web", {}), timeout=6)
    assert aws.ec2_state(iid)[0] == "terminated"


def test_eventbridge_events_reach_a_rule_on_the_default_bus(aws):
    url, arn = aws.queue("events")
    aws.events.put_rule(Name="asg", EventPattern=json.dumps({"source": ["aws.autoscaling"]}))
    aws.events.put_targets(Rule="asg", Targets=[{"Id": "q", "Arn": arn}])
    aws.group("web", 0, hooks=[
        {"LifecycleHookName": "launch", "LifecycleTransition": LAUNCHING, "NotificationMetadata": "x"},
        {"LifecycleHookName": "drain", "LifecycleTransition": TERMINATING}])
    group_arn = aws.asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=["web"])["AutoScalingGroups"][0]["AutoScalingGroupARN"]

    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    [iid] = aws.instances("web")
    [ev] = aws.receive(url, 1, "the launch lifecycle action event")
    assert ev["source"] == "aws.autoscaling"
    assert ev["detail-type"] == "EC2 Instance-launch Lifecycle Action"
    # moto's delivery to SQS leaves out "account" (its default input template
    # has no such field); every other envelope field is there.
    assert ev["region"] == "us-east-1" and ev["version"] == "0" and ev["id"] and ev["time"]
    assert ev["resources"] == [group_arn]
    d = ev["detail"]
    assert d["EC2InstanceId"] == iid and d["AutoScalingGroupName"] == "web"
    assert d["LifecycleHookName"] == "launch" and d["LifecycleTransition"] == LAUNCHING
    assert d["LifecycleActionToken"] and d["NotificationMetadata"] == "x"
    assert d["Origin"] == "EC2" and d["Destination"] == "AutoScalingGroup"

    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="launch",
                                      LifecycleActionResult="CONTINUE",
                                      LifecycleActionToken=d["LifecycleActionToken"])
    [ev] = aws.receive(url, 1, "the launch successful event")
    assert ev["detail-type"] == "EC2 Instance Launch Successful"
    assert ev["resources"] == [group_arn, f"arn:aws:ec2:us-east-1:123456789012:instance/{iid}"]
    d = ev["detail"]
    assert d["EC2InstanceId"] == iid and d["AutoScalingGroupName"] == "web"
    assert d["StatusCode"] == "InProgress" and d["Details"]["Subnet ID"] == aws.subnet
    assert {"ActivityId", "Cause", "Description", "StartTime", "EndTime", "RequestId"} <= set(d)

    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=0)
    [ev] = aws.receive(url, 1, "the terminate lifecycle action event")
    assert ev["detail-type"] == "EC2 Instance-terminate Lifecycle Action"
    d = ev["detail"]
    assert d["EC2InstanceId"] == iid and d["LifecycleTransition"] == TERMINATING
    assert d["Origin"] == "AutoScalingGroup" and d["Destination"] == "EC2"
    assert "NotificationMetadata" not in d

    aws.asg.complete_lifecycle_action(AutoScalingGroupName="web", LifecycleHookName="drain",
                                      LifecycleActionResult="CONTINUE", InstanceId=iid)
    [ev] = aws.receive(url, 1, "the terminate successful event")
    assert ev["detail-type"] == "EC2 Instance Terminate Successful"
    assert ev["detail"]["EC2InstanceId"] == iid
    assert aws.instances("web") == {}


def test_delete_group_ends_its_actions_and_hooks(aws):
    aws.group("web", 2, hooks=[{"LifecycleHookName": "drain", "LifecycleTransition": TERMINATING}])
    ids = list(aws.instances("web"))
    aws.asg.set_desired_capacity(AutoScalingGroupName="web", DesiredCapacity=1)
    aws.asg.delete_auto_scaling_group(AutoScalingGroupName="web", ForceDelete=True)
    for iid in ids:
        assert aws.ec2_state(iid)[0] == "terminated"
    aws.group("web", 1)  # same name again: no hook left over
    assert list(aws.instances("web").values()) == ["InService"]


def test_groups_without_hooks_are_untouched(aws):
    url, arn = aws.queue("events")
    aws.events.put_rule(Name="asg", EventPattern=json.dumps({"source": ["aws.autoscaling"]}))
    aws.events.put_targets(Rule="asg", Targets=[{"Id": "q", "Arn": arn}])
    aws.group("plain", 2)
    states = aws.instances("plain")
    assert list(states.values()) == ["InService", "InService"]  # synchronous, as moto does
    aws.asg.set_desired_capacity(AutoScalingGroupName="plain", DesiredCapacity=3)
    assert list(aws.instances("plain").values()) == ["InService"] * 3
    aws.asg.set_desired_capacity(AutoScalingGroupName="plain", DesiredCapacity=1)
    left = aws.instances("plain")
    assert list(left.values()) == ["InService"]
    gone = [i for i in states if i not in left]
    assert gone and all(aws.ec2_state(i)[0] == "terminated" for i in gone)
    assert aws.receive_none(url) == []  # no events for a group without hooks
    msg = validation_error(aws.asg.complete_lifecycle_action, AutoScalingGroupName="plain",
                           LifecycleHookName="none", LifecycleActionResult="CONTINUE",
                           InstanceId=next(iter(left)))
    assert msg.startswith("No active Lifecycle Action found with instance ID")
