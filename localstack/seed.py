#!/usr/bin/env python3
"""Seed an AWS endpoint (moto by default) with signpost's demo world.

  seed.py --group web:web:8080:2 --group api:api:9090:1 --untagged batch:1
  seed.py --scale web:4

Creates, idempotently: VPC 127.42.0.0/16 (Name=signpost-demo), subnets
127.42.1.0/24 (us-east-1a) and 127.42.2.0/24 (us-east-1b), launch template
`signpost-demo`, and the Auto Scaling groups asked for. The VPC lives in
127.0.0.0/8 on purpose: instance private IPs are then loopback addresses on
Linux, so backends.py can serve real HTTP at each instance's own IP.

`--group NAME:SERVICE:PORT:DESIRED` makes a group tagged signpost:service,
signpost:port and signpost:health=http:/health; `--untagged NAME:DESIRED` one
without signpost tags (the controller must ignore it). Running again with a
new DESIRED updates the group. `--scale NAME:DESIRED` only calls
SetDesiredCapacity. Either way a JSON summary goes to stdout.

Endpoint from AWS_ENDPOINT_URL (boto3 reads it itself); region and test
credentials default to us-east-1 / test / test.
"""
import argparse
import json
import os
import sys

import boto3
from botocore.exceptions import ClientError

for k, v in (("AWS_DEFAULT_REGION", os.environ.get("AWS_REGION", "us-east-1")),
             ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")):
    os.environ.setdefault(k, v)

VPC_CIDR = "127.42.0.0/16"
SUBNETS = [("127.42.1.0/24", "us-east-1a"), ("127.42.2.0/24", "us-east-1b")]
TEMPLATE = "signpost-demo"
IMAGE_ID = "ami-12c6146b"  # ships with moto, so it passes even MOTO_ENABLE_AMI_VALIDATION
ec2 = boto3.client("ec2")
asg = boto3.client("autoscaling")


def ensure_network():
    vpcs = ec2.describe_vpcs(Filters=[{"Name": "tag:Name", "Values": ["signpost-demo"]}])["Vpcs"]
    if vpcs:
        vpc_id = vpcs[0]["VpcId"]
    else:
        vpc_id = ec2.create_vpc(CidrBlock=VPC_CIDR, TagSpecifications=[{
            "ResourceType": "vpc", "Tags": [{"Key": "Name", "Value": "signpost-demo"}]}])["Vpc"]["VpcId"]
    subnet_ids = []
    for cidr, az in SUBNETS:
        found = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                                              {"Name": "cidr-block", "Values": [cidr]}])["Subnets"]
        subnet_ids.append(found[0]["SubnetId"] if found else ec2.create_subnet(
            VpcId=vpc_id, CidrBlock=cidr, AvailabilityZone=az)["Subnet"]["SubnetId"])
    try:
        ec2.describe_launch_templates(LaunchTemplateNames=[TEMPLATE])
    except ClientError:  # not found
        ec2.create_launch_template(LaunchTemplateName=TEMPLATE, LaunchTemplateData={
            "ImageId": IMAGE_ID, "InstanceType": "t3.micro"})
    return vpc_id, subnet_ids


def find_group(name):
    groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    return groups[0] if groups else None


def ensure_group(name, desired, tags, subnet_ids):
    tag_list = [{"ResourceId": name, "ResourceType": "auto-scaling-group", "Key": k,
                 "Value": v, "PropagateAtLaunch": True} for k, v in tags.items()]
    if find_group(name):
        asg.update_auto_scaling_group(AutoScalingGroupName=name, MinSize=0, MaxSize=20,
                                      DesiredCapacity=desired)
        if tag_list:
            asg.create_or_update_tags(Tags=tag_list)
    else:
        # Both subnets are listed, as a real deployment would; moto puts every
        # instance in the first one (127.42.1.x) anyway.
        asg.create_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=0, MaxSize=20, DesiredCapacity=desired,
            LaunchTemplate={"LaunchTemplateName": TEMPLATE, "Version": "$Latest"},
            VPCZoneIdentifier=",".join(subnet_ids), Tags=tag_list)


def summary(name):
    g = find_group(name)
    if g is None:
        return {"name": name, "missing": True}
    tags = {t["Key"]: t["Value"] for t in g.get("Tags", [])}
    ids = [i["InstanceId"] for i in g["Instances"]]
    by_id = {}
    if ids:
        for r in ec2.describe_instances(InstanceIds=ids)["Reservations"]:
            for i in r["Instances"]:
                by_id[i["InstanceId"]] = i
    return {
        "name": name,
        "service": tags.get("signpost:service"),
        "port": int(tags["signpost:port"]) if "signpost:port" in tags else None,
        "desired": g["DesiredCapacity"],
        "instances": [{
            "id": i["InstanceId"],
            "ip": by_id.get(i["InstanceId"], {}).get("PrivateIpAddress"),
            "state": by_id.get(i["InstanceId"], {}).get("State", {}).get("Name"),
            "lifecycle": i["LifecycleState"],
            "az": i["AvailabilityZone"],
        } for i in g["Instances"]],
    }


def split(spec, n, what):
    parts = spec.split(":")
    if len(parts) != n:
        sys.exit(f"seed.py: bad {what} {spec!r}")
    return parts


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--group", action="append", default=[], metavar="NAME:SERVICE:PORT:DESIRED")
    p.add_argument("--untagged", action="append", default=[], metavar="NAME:DESIRED")
    p.add_argument("--scale", action="append", default=[], metavar="NAME:DESIRED")
    p.add_argument("--hooks", action="append", default=[], metavar="NAME",
                   help="add signpost's launch and terminate lifecycle hooks to this group")
    a = p.parse_args()
    names = []
    if a.hooks:
        for name in a.hooks:
            # The README's hooks: a launch abandoned, a termination let go,
            # if nobody completes them within the heartbeat timeout.
            for hook, transition, default in (
                    ("signpost-launch", "autoscaling:EC2_INSTANCE_LAUNCHING", "ABANDON"),
                    ("signpost-terminate", "autoscaling:EC2_INSTANCE_TERMINATING", "CONTINUE")):
                asg.put_lifecycle_hook(AutoScalingGroupName=name, LifecycleHookName=hook,
                                       LifecycleTransition=transition, HeartbeatTimeout=300,
                                       DefaultResult=default)
            names.append(name)
        hooks = {n: [h["LifecycleHookName"] for h in asg.describe_lifecycle_hooks(
            AutoScalingGroupName=n)["LifecycleHooks"]] for n in names}
        print(json.dumps({"hooks": hooks}, indent=2))
        return
    if a.scale:
        for spec in a.scale:
            name, desired = split(spec, 2, "--scale")
            # HonorCooldown=False: scale now, like an operator would in a demo.
            asg.set_desired_capacity(AutoScalingGroupName=name, DesiredCapacity=int(desired),
                                     HonorCooldown=False)
            names.append(name)
        print(json.dumps({"groups": [summary(n) for n in names]}, indent=2))
        return
    vpc_id, subnet_ids = ensure_network()
    for spec in a.group:
        name, service, port, desired = split(spec, 4, "--group")
        ensure_group(name, int(desired), {"signpost:service": service, "signpost:port": port,
                                          "signpost:health": "http:/health"}, subnet_ids)
        names.append(name)
    for spec in a.untagged:
        name, desired = split(spec, 2, "--untagged")
        ensure_group(name, int(desired), {}, subnet_ids)
        names.append(name)
    print(json.dumps({"endpoint": os.environ.get("AWS_ENDPOINT_URL"), "vpc": vpc_id,
                      "subnets": subnet_ids, "groups": [summary(n) for n in names]}, indent=2))


if __name__ == "__main__":
    main()
