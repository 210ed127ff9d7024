"""iam/controller-policy.json proven against an IAM-enforcing emulator.

moto_server starts with INITIAL_NO_AUTH_ACTION_COUNT=3: the first three calls
(create an admin user, give it Allow */*, make its key) run unauthenticated,
and every call after that is signed, its key looked up and its action checked
against the caller's IAM policies. The controller runs with the key of a user
that has only the policy under test. moto checks the *action* of every
service's calls; it checks the *resource* only for SQS (the queue's ARN) and
IAM roles, and it evaluates no condition keys on these calls (see
iam/README.md, "What the emulator can prove").
"""
import copy
import json
import re

import pytest
from botocore.exceptions import ClientError

from conftest import (ACCOUNT_ID, Backends, Controller, Moto, render_policy, wait_for)

SUBNET = "127.42.200.0/24"  # this file's own; other tests use other third octets
PORT = 8080
SERVICE = "iam-web"
DESCRIBE_STATEMENTS = {
    # Sid -> the IAM action moto names in its AccessDenied message
    "ListTaggedAutoScalingGroups": "autoscaling:DescribeAutoScalingGroups",
    "ReadInstanceAddresses": "ec2:DescribeInstances",
}
PERMISSION_ERROR = re.compile(r"AccessDenied|not authorized", re.I)


class World:
    """The emulator with IAM enforced, an admin, a tagged group of two
    instances, and live backends at the instances' addresses."""

    def __init__(self, moto_bin, tmp):
        self.moto = Moto(moto_bin, tmp / "moto.log", env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
        self.admin = self.moto.make_admin()
        self.users = 0

        ec2, asg = self.client("ec2"), self.client("autoscaling")
        vpc = ec2.create_vpc(CidrBlock="127.42.0.0/16")["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=SUBNET,
                                   AvailabilityZone="us-east-1a")["Subnet"]["SubnetId"]
        ec2.create_launch_template(LaunchTemplateName="iam-test", LaunchTemplateData={
            "ImageId": "ami-12c6146b", "InstanceType": "t3.micro"})
        asg.create_auto_scaling_group(
            AutoScalingGroupName="iam-web", MinSize=0, MaxSize=4, DesiredCapacity=2,
            LaunchTemplate={"LaunchTemplateName": "iam-test", "Version": "$Latest"},
            VPCZoneIdentifier=subnet,
            Tags=[{"ResourceId": "iam-web", "ResourceType": "auto-scaling-group", "Key": k,
                   "Value": v, "PropagateAtLaunch": True}
                  for k, v in {"signpost:service": SERVICE, "signpost:port": str(PORT),
                               "signpost:health": "http:/health"}.items()])
        ids = [i["InstanceId"] for i in asg.describe_auto_scaling_groups(
            AutoScalingGroupNames=["iam-web"])["AutoScalingGroups"][0]["Instances"]]
        self.ips = sorted(i["PrivateIpAddress"]
                          for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]
                          for i in r["Instances"])
        assert len(self.ips) == 2 and all(ip.startswith("127.42.200.") for ip in self.ips), self.ips
        self.backends = Backends([(ip, PORT) for ip in self.ips])

    def client(self, service, creds=None):
        return self.moto.client(service, *(creds or self.admin))

    def user_with(self, policy):
        """A new IAM user whose only permission is `policy` (None: nothing)."""
        self.users += 1
        name = f"signpost-{self.users}"
        iam = self.client("iam")
        iam.create_user(UserName=name)
        if policy is not None:
            iam.put_user_policy(UserName=name, PolicyName="signpost-controller",
                                PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return name, (key["AccessKeyId"], key["SecretAccessKey"])

    def stop(self):
        self.backends.stop()
        self.moto.stop()


@pytest.fixture(scope="module")
def world(moto_server_bin, tmp_path_factory):
    w = World(moto_server_bin, tmp_path_factory.mktemp("iam"))
    yield w
    w.stop()


@pytest.fixture
def run_controller(world, signpost_bin, tmp_path):
    started = []

    def start(creds, extra=""):
        c = Controller(signpost_bin, world.moto.url, *creds, tmp_path, name=f"c{len(started)}",
                       extra=extra)
        started.append(c)
        return c

    yield start
    for c in started:
        c.stop()


def without(policy, sid):
    p = copy.deepcopy(policy)
    p["Statement"] = [s for s in p["Statement"] if s["Sid"] != sid]
    assert len(p["Statement"]) == len(policy["Statement"]) - 1, f"no statement {sid}"
    return p


def readiness(controller):
    """(status, reason) of /readyz; (None, "") while nothing listens yet."""
    status, body = controller.get("/readyz")
    return status, (body.get("reason") or "") if isinstance(body, dict) else ""


def healthy_addresses(controller):
    status, body = controller.get("/v1/services")
    if status != 200:
        return None
    for s in body["services"]:
        if s["name"] == SERVICE:
            return sorted(e["address"] for e in s["endpoints"] if e["state"] == "healthy") or None
    return None


def test_emulator_enforces_iam(world):
    """Without this, every other test here would pass vacuously."""
    with pytest.raises(ClientError) as unknown_key:
        world.moto.client("autoscaling").describe_auto_scaling_groups()
    assert unknown_key.value.response["Error"]["Code"] == "InvalidClientTokenId"
    _, creds = world.user_with(None)
    with pytest.raises(ClientError) as no_policy:
        world.client("autoscaling", creds).describe_auto_scaling_groups()
    assert no_policy.value.response["Error"]["Code"] == "AccessDenied"


def test_controller_with_only_the_policy_serves_healthy_endpoints(world, run_controller):
    _, creds = world.user_with(render_policy("controller-policy.json"))
    c = run_controller(creds)
    wait_for("/readyz 200", lambda: c.get("/readyz")[0] == 200)
    assert wait_for("both endpoints healthy",
                    lambda: healthy_addresses(c) == world.ips and healthy_addresses(c)) == world.ips
    assert not PERMISSION_ERROR.search(c.log()), c.log()


@pytest.mark.parametrize("sid", sorted(DESCRIBE_STATEMENTS))
def test_policy_without_statement_fails_with_permission_error(world, run_controller, sid):
    action = DESCRIBE_STATEMENTS[sid]
    _, creds = world.user_with(without(render_policy("controller-policy.json"), sid))
    c = run_controller(creds)

    def denied():
        status, reason = readiness(c)
        return status == 503 and PERMISSION_ERROR.search(reason) and action in reason and reason

    reason = wait_for(f"/readyz 503 naming {action}", denied)
    assert "no complete sync yet" in reason, reason
    wait_for(f"controller log naming {action}",
             lambda: PERMISSION_ERROR.search(c.log()) and action in c.log())
    status, body = c.get("/v1/services")
    assert status == 200 and not body["services"], body


def test_revoked_permission_keeps_last_good_endpoints(world, run_controller):
    """A permission lost at run time (someone edits the role) is a failed
    listing: readiness says why, and no endpoint is removed."""
    policy = render_policy("controller-policy.json")
    name, creds = world.user_with(policy)
    c = run_controller(creds)
    wait_for("both endpoints healthy", lambda: healthy_addresses(c) == world.ips)

    world.client("iam").put_user_policy(
        UserName=name, PolicyName="signpost-controller",
        PolicyDocument=json.dumps(without(policy, "ReadInstanceAddresses")))

    def denied():
        status, reason = readiness(c)
        return status == 503 and PERMISSION_ERROR.search(reason) and reason

    reason = wait_for("/readyz 503 after revocation", denied, timeout=30)
    assert "ec2:DescribeInstances" in reason, reason
    assert healthy_addresses(c) == world.ips


def assert_denied(error):
    # moto answers IAM denials in EC2's XML error shape whatever the service;
    # boto3's SQS client speaks JSON and then sees only the HTTP status.
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 403, error.response
    assert error.response["Error"]["Code"] in ("AccessDenied", "403"), error.response


def test_sqs_statement_reaches_only_the_configured_queue(world):
    """moto resolves SQS calls to the queue's ARN, so the Resource of the
    ConsumeLifecycleEvents statement is really checked here."""
    sqs = world.client("sqs")
    mine = sqs.create_queue(QueueName="signpost-events")["QueueUrl"]
    other = sqs.create_queue(QueueName="someone-elses")["QueueUrl"]
    sqs.send_message(QueueUrl=mine, MessageBody="{}")
    sqs.send_message(QueueUrl=other, MessageBody="{}")
    policy = render_policy("controller-policy.json")

    _, creds = world.user_with(policy)
    as_controller = world.client("sqs", creds)
    assert as_controller.get_queue_attributes(QueueUrl=mine, AttributeNames=["QueueArn"])[
        "Attributes"]["QueueArn"] == f"arn:aws:sqs:us-east-1:{ACCOUNT_ID}:signpost-events"
    msgs = as_controller.receive_message(QueueUrl=mine, WaitTimeSeconds=0)["Messages"]
    as_controller.delete_message(QueueUrl=mine, ReceiptHandle=msgs[0]["ReceiptHandle"])
    for call in (lambda: as_controller.receive_message(QueueUrl=other, WaitTimeSeconds=0),
                 lambda: as_controller.send_message(QueueUrl=mine, MessageBody="x"),
                 lambda: as_controller.purge_queue(QueueUrl=mine)):
        with pytest.raises(ClientError) as e:
            call()
        assert_denied(e.value)

    _, creds = world.user_with(without(policy, "ConsumeLifecycleEvents"))
    with pytest.raises(ClientError) as e:
        world.client("sqs", creds).receive_message(QueueUrl=mine, WaitTimeSeconds=0)
    assert_denied(e.value)


def hooked_group(world, name, port):
    """A tagged group of its own whose launches wait on a signpost hook with
    a 3s heartbeat timeout (default ABANDON), scaled to one instance that
    waits in Pending:Wait with a backend at its address."""
    asg, ec2 = world.client("autoscaling"), world.client("ec2")
    subnet = asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=["iam-web"])["AutoScalingGroups"][0]["VPCZoneIdentifier"]
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=0, MaxSize=2, DesiredCapacity=0,
        LaunchTemplate={"LaunchTemplateName": "iam-test", "Version": "$Latest"},
        VPCZoneIdentifier=subnet,
        Tags=[{"ResourceId": name, "ResourceType": "auto-scaling-group", "Key": k, "Value": v,
               "PropagateAtLaunch": True}
              for k, v in {"signpost:service": name, "signpost:port": str(port)}.items()])
    asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName="signpost-launch",
                           LifecycleTransition="autoscaling:EC2_INSTANCE_LAUNCHING",
                           HeartbeatTimeout=3, DefaultResult="ABANDON")
    asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=1)
    [instance] = asg.describe_auto_scaling_groups(
        AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"]
    assert instance["LifecycleState"] == "Pending:Wait", instance
    [reservation] = ec2.describe_instances(InstanceIds=[instance["InstanceId"]])["Reservations"]
    backends = Backends([(reservation["Instances"][0]["PrivateIpAddress"], port)])
    return instance["InstanceId"], backends


def remove_group(world, name):
    world.client("autoscaling").delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)


def lifecycle_state(world, name):
    instances = world.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["Instances"]
    return [i["LifecycleState"] for i in instances]


def test_policy_lets_the_controller_hold_and_complete_its_hooks(world, run_controller):
    """With only the policy, a launch held by a signpost hook is read
    (DescribeLifecycleHooks), kept alive past its 3s heartbeat timeout
    (RecordLifecycleActionHeartbeat; the default result would terminate it)
    and completed (CompleteLifecycleAction)."""
    # moto checks Auto Scaling calls against Resource "*" only (iam/README):
    # the statement's ARN pattern is widened so that its actions are tested.
    policy = render_policy("controller-policy.json")
    [acting] = [s for s in policy["Statement"] if s["Sid"] == "ActOnLifecycleHooksOfTaggedGroups"]
    acting["Resource"] = "*"
    _, creds = world.user_with(policy)
    instance, backends = hooked_group(world, "iam-hooked", PORT + 1)
    try:
        c = run_controller(creds, extra='[lifecycle]\nrouter_grace = "5s"')
        try:
            wait_for("the launch to complete",
                     lambda: lifecycle_state(world, "iam-hooked") == ["InService"], timeout=30)
        except BaseException:
            print(c.log())
            raise
        status, body = c.get("/v1/lifecycle")
        [done] = [a for a in body["recent"] if a["instance"] == instance]
        assert done["result"] == "continue" and done["completed_ms"] > 3000, done
        assert not PERMISSION_ERROR.search(c.log()), c.log()
    finally:
        remove_group(world, "iam-hooked")
        backends.stop()


def test_policy_without_read_lifecycle_hooks_names_the_action(world, run_controller):
    _, creds = world.user_with(without(render_policy("controller-policy.json"), "ReadLifecycleHooks"))
    _, backends = hooked_group(world, "iam-unread", PORT + 2)
    try:
        c = run_controller(creds)

        def denied():
            status, reason = readiness(c)
            return status == 503 and "autoscaling:DescribeLifecycleHooks" in reason and reason

        reason = wait_for("/readyz 503 naming autoscaling:DescribeLifecycleHooks", denied)
        assert PERMISSION_ERROR.search(reason), reason
    finally:
        remove_group(world, "iam-unread")
        backends.stop()


HA = '\n[ha]\ntable = "signpost-lease"\nlease_duration = "3s"\nreplica_id = "{id}"\n'


def leadership(controller):
    status, body = controller.get("/readyz")
    return body.get("leadership", {}) if isinstance(body, dict) else {}


def test_policy_lets_two_controllers_elect_one_leader(world, run_controller):
    """HoldTheLeaderLease is enough for the lease (GetItem, conditional
    UpdateItem); without it nobody leads and the log names the action."""
    dynamodb = world.client("dynamodb")
    if "signpost-lease" not in dynamodb.list_tables()["TableNames"]:
        dynamodb.create_table(TableName="signpost-lease", BillingMode="PAY_PER_REQUEST",
                              AttributeDefinitions=[{"AttributeName": "name", "AttributeType": "S"}],
                              KeySchema=[{"AttributeName": "name", "KeyType": "HASH"}])
    policy = render_policy("controller-policy.json")
    # moto checks DynamoDB calls against Resource "*" only (as Auto Scaling's,
    # iam/README): this proves the action list; test_iam_lint pins the ARN.
    (lease,) = [s for s in policy["Statement"] if s["Sid"] == "HoldTheLeaderLease"]
    lease["Resource"] = "*"
    _, creds = world.user_with(policy)
    a = run_controller(creds, extra=HA.format(id="a"))
    b = run_controller(creds, extra=HA.format(id="b"))

    def one_leader():
        roles = sorted(leadership(c).get("role", "") for c in (a, b))
        return roles == ["follower", "leader"]

    wait_for("one leader, one follower", one_leader)
    assert not PERMISSION_ERROR.search(a.log() + b.log()), a.log() + b.log()

    _, denied = world.user_with(without(policy, "HoldTheLeaderLease"))
    c = run_controller(denied, extra=HA.format(id="c"))
    wait_for("the log naming the lease's DynamoDB action",
             lambda: PERMISSION_ERROR.search(c.log()) and "dynamodb:" in c.log())
    assert leadership(c).get("role") == "follower"
