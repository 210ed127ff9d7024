"""iam/setup.sh run for real (AWS CLI from PyPI) against an IAM-enforcing
emulator, as a user holding only iam/setup-policy.json's actions, and against
LocalStack (its free edition serves everything setup.sh calls, but enforces
no IAM).

moto checks the action of every call but resolves the resource only for SQS
queues and IAM roles that already exist (else "*"), so the setup policy's
Resource ARNs are widened to "*" here: this proves its action list is
complete, not its resource scoping (parliament checks the ARNs' shape)."""
import json
import os
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

from conftest import ACCOUNT_ID, IAM, PLACEHOLDERS, LocalStack, Moto, render_policy

ARGS = ["--cluster", "prod", "--region", "us-east-1",
        "--oidc-provider", "https://" + PLACEHOLDERS["__OIDC_PROVIDER__"]]


@pytest.fixture(scope="module")
def moto(moto_server_bin, tmp_path_factory):
    m = Moto(moto_server_bin, tmp_path_factory.mktemp("setup") / "moto.log",
             env={"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    m.admin = m.make_admin()
    yield m
    m.stop()


def operator_with_setup_policy(moto):
    iam = moto.client("iam", *moto.admin)
    iam.create_user(UserName="operator")
    policy = render_policy("setup-policy.json")
    for s in policy["Statement"]:
        s["Resource"] = "*"
    iam.put_user_policy(UserName="operator", PolicyName="setup", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="operator")["AccessKey"]
    return key["AccessKeyId"], key["SecretAccessKey"]


@pytest.fixture(scope="module")
def localstack(localstack_server_bin, tmp_path_factory):
    ls = LocalStack(localstack_server_bin, tmp_path_factory.mktemp("setup") / "localstack.log")
    yield ls
    ls.stop()


def run_setup(moto, creds, extra=()):
    bindir = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update({"AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": creds[0],
                "AWS_SECRET_ACCESS_KEY": creds[1], "AWS_CLI": str(bindir / "aws"),
                "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
                "PATH": f"{bindir}:{env['PATH']}"})
    return subprocess.run([str(IAM / "setup.sh"), *ARGS, *extra], capture_output=True, text=True,
                          env=env)


def check_setup_twice(emulator, creds, account_id, admin, lease_table=True):
    """Runs setup.sh twice and checks what it made: queue, policy, rules,
    role, lease table; an Auto Scaling event on the bus lands in the queue."""
    extra = () if lease_table else ("--no-lease-table",)
    first = run_setup(emulator, creds, extra)
    assert first.returncode == 0, first.stderr
    second = run_setup(emulator, creds, extra)  # re-running changes nothing and does not fail
    assert second.returncode == 0, second.stderr
    out = dict(line.split("=", 1) for line in second.stdout.split())
    assert out["role_arn"] == f"arn:aws:iam::{account_id}:role/signpost-controller"

    iam, sqs, events = (emulator.client(s, *admin) for s in ("iam", "sqs", "events"))
    assert sqs.list_queues()["QueueUrls"] == [out["queue_url"]], "one queue, made once"
    if lease_table:
        table = emulator.client("dynamodb", *admin).describe_table(TableName="signpost-lease")["Table"]
        assert table["KeySchema"] == [{"AttributeName": "name", "KeyType": "HASH"}], table
    role = iam.get_role(RoleName="signpost-controller")["Role"]
    filled = {"__ACCOUNT_ID__": account_id}
    trust = role["AssumeRolePolicyDocument"]
    if isinstance(trust, str):  # LocalStack answers the URL-encoded text
        trust = json.loads(urllib.parse.unquote(trust))
    assert trust == render_policy("trust-irsa.json", **filled)
    inline = iam.get_role_policy(RoleName="signpost-controller", PolicyName="signpost-controller")
    document = inline["PolicyDocument"]
    if isinstance(document, str):
        document = json.loads(urllib.parse.unquote(document))
    assert document == render_policy("controller-policy.json", **filled)

    queue_arn = f"arn:aws:sqs:us-east-1:{account_id}:signpost-events"
    attrs = sqs.get_queue_attributes(QueueUrl=out["queue_url"], AttributeNames=["All"])["Attributes"]
    queue_policy = json.loads(attrs["Policy"])["Statement"][0]
    assert queue_policy["Principal"] == {"Service": "events.amazonaws.com"}
    assert queue_policy["Action"] == "sqs:SendMessage" and queue_policy["Resource"] == queue_arn
    for rule, pattern in (("signpost-autoscaling", "event-patterns/autoscaling.json"),
                          ("signpost-ec2-state", "event-patterns/ec2-state.json")):
        described = events.describe_rule(Name=rule)
        assert json.loads(described["EventPattern"]) == json.loads((IAM / pattern).read_text())
        targets = events.list_targets_by_rule(Rule=rule)["Targets"]
        assert [t["Arn"] for t in targets] == [queue_arn]

    # The rule's pattern matches what Auto Scaling sends: a lifecycle event lands in the queue.
    events.put_events(Entries=[{
        "Source": "aws.autoscaling", "DetailType": "EC2 Instance-terminate Lifecycle Action",
        "Detail": json.dumps({"AutoScalingGroupName": "web", "EC2InstanceId": "i-0123456789abcdef0",
                              "LifecycleTransition": "autoscaling:EC2_INSTANCE_TERMINATING"})}])
    msgs = sqs.receive_message(QueueUrl=out["queue_url"], WaitTimeSeconds=5).get("Messages", [])
    assert msgs and json.loads(msgs[0]["Body"])["detail-type"] == \
        "EC2 Instance-terminate Lifecycle Action", msgs


def test_setup_creates_queue_rules_and_role_and_is_idempotent(moto):
    check_setup_twice(moto, operator_with_setup_policy(moto), ACCOUNT_ID, moto.admin)


def test_setup_on_localstack_creates_queue_rules_and_role_and_is_idempotent(localstack):
    # LocalStack's DynamoDB fails CreateTable here (an internal error of its
    # DynamoDB Local backend); the lease table is proven on moto above.
    check_setup_twice(localstack, ("test", "test"), LocalStack.ACCOUNT_ID, ("test", "test"),
                      lease_table=False)


def test_setup_fails_without_the_setup_policy(moto):
    iam = moto.client("iam", *moto.admin)
    iam.create_user(UserName="nobody")
    key = iam.create_access_key(UserName="nobody")["AccessKey"]
    result = run_setup(moto, (key["AccessKeyId"], key["SecretAccessKey"]))
    assert result.returncode != 0
    assert "AccessDenied" in result.stderr or "not authorized" in result.stderr, result.stderr
