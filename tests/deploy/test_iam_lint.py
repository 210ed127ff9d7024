"""Every policy in iam/ passes `parliament` (with its community auditors)
with no finding above LOW, except the few listed in IGNORED, each with why;
and the statements say what iam/README.md says they do."""
import json
import re

import pytest
from parliament import analyze_policy_string, config as parliament_config
from parliament.community_auditors import __file__ as community_init

import yaml
from pathlib import Path

from conftest import IAM, PLACEHOLDERS, render_policy

POLICIES = sorted(p.name for p in IAM.glob("*.json"))

# (file, issue, detail pattern) -> why it is not a problem.
IGNORED = {
    ("trust-irsa.json", "MALFORMED", "neither Resource nor NotResource"):
        "a trust policy has no Resource: the role it is attached to is the resource",
    ("trust-pod-identity.json", "MALFORMED", "neither Resource nor NotResource"):
        "a trust policy has no Resource: the role it is attached to is the resource",
    ("trust-irsa.json", "UNKNOWN_FEDERATION_SOURCE", "oidc-provider/oidc.eks."):
        "parliament knows SAML providers and a few web IdPs, not an account's EKS OIDC provider",
    ("setup-policy.json", "PERMISSIONS_MANAGEMENT_ACTIONS", ""):
        "the setup policy exists to create the controller's role and the queue policy; "
        "it is scoped to that one role and one queue, and run once by an operator",
}
SEVERITY_ORDER = ["INFO", "LOW", "MEDIUM", "HIGH", "CRITICAL"]


def severity(issue):
    """parliament keeps severities in two YAML files (core, community)."""
    override = yaml.safe_load((Path(community_init).parent / "config_override.yaml").read_text())
    known = {**parliament_config, **override}
    assert issue in known, f"parliament issue {issue} has no severity"
    return known[issue]["severity"]


@pytest.mark.parametrize("name", POLICIES)
def test_policy_has_no_findings_above_low(name):
    # Linted as deployed: placeholders filled with a realistic account.
    policy = json.dumps(render_policy(name))
    findings = analyze_policy_string(policy, name, include_community_auditors=True).findings
    problems = []
    for f in findings:
        sev = severity(f.issue)
        ignored = any(n == name and i == f.issue and d in str(f.detail)
                      for (n, i, d) in IGNORED)
        if SEVERITY_ORDER.index(sev) > SEVERITY_ORDER.index("LOW") and not ignored:
            problems.append(f"{f.issue} ({sev}): {f.detail}")
    assert not problems, problems


def test_every_ignore_is_still_needed():
    """An ignore that no longer matches anything hides nothing and must go."""
    for (name, issue, detail), why in IGNORED.items():
        policy = json.dumps(render_policy(name))
        findings = analyze_policy_string(policy, name, include_community_auditors=True).findings
        assert any(f.issue == issue and detail in str(f.detail) for f in findings), (name, issue, why)


@pytest.mark.parametrize("name", POLICIES)
def test_placeholders_are_all_known(name):
    """iam/setup.sh fills exactly these; any other would reach AWS unfilled."""
    used = set(re.findall(r"__[A-Z_]+__", (IAM / name).read_text()))
    assert used <= set(PLACEHOLDERS), used - set(PLACEHOLDERS)


def test_controller_policy_is_least_privilege():
    statements = {s["Sid"]: s for s in render_policy("controller-policy.json")["Statement"]}
    assert {s["Effect"] for s in statements.values()} == {"Allow"}
    actions = sorted(a for s in statements.values()
                     for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"]))
    assert actions == sorted([
        "autoscaling:DescribeAutoScalingGroups", "ec2:DescribeInstances",
        "autoscaling:DescribeLifecycleHooks", "autoscaling:CompleteLifecycleAction", "autoscaling:RecordLifecycleActionHeartbeat",
        "sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:GetQueueAttributes",
        "dynamodb:GetItem", "dynamodb:UpdateItem"]), actions
    # Describe* support no resource-level permissions: "*" is the only choice,
    # narrowed to the controller's region.
    for sid in ("ListTaggedAutoScalingGroups", "ReadInstanceAddresses", "ReadLifecycleHooks"):
        assert statements[sid]["Resource"] == "*"
        assert statements[sid]["Condition"] == {"StringEquals": {"aws:RequestedRegion": "us-east-1"}}
    # Lifecycle actions: groups of this account and region, and only those
    # carrying the signpost:service tag (moto cannot evaluate this; AWS does).
    hooks = statements["ActOnLifecycleHooksOfTaggedGroups"]
    assert hooks["Resource"] == ("arn:aws:autoscaling:us-east-1:123456789012:"
                                 "autoScalingGroup:*:autoScalingGroupName/*")
    assert hooks["Condition"] == {"Null": {"autoscaling:ResourceTag/signpost:service": "false"}}
    assert statements["ConsumeLifecycleEvents"]["Resource"] == \
        "arn:aws:sqs:us-east-1:123456789012:signpost-events"
    # The lease: read and conditional writes on the one table, nothing else
    # (no PutItem, no Scan, no DeleteItem: the controller never needs them).
    assert statements["HoldTheLeaderLease"]["Resource"] == \
        "arn:aws:dynamodb:us-east-1:123456789012:table/signpost-lease"


def test_readme_lists_every_action():
    readme = (IAM / "README.md").read_text()
    for name in POLICIES:
        for s in render_policy(name)["Statement"]:
            for a in [s["Action"]] if isinstance(s["Action"], str) else s["Action"]:
                assert f"`{a}`" in readme, f"iam/README.md does not mention {a} ({name})"
