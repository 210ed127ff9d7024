#!/usr/bin/env bash
# One-time AWS setup for signpost, with the AWS CLI, idempotent (safe to re-run):
#   1. the SQS queue the controller reads lifecycle events from, with a queue
#      policy that lets only our EventBridge rules send to it;
#   2. the EventBridge rules (Auto Scaling lifecycle/launch/terminate events,
#      EC2 state changes) targeting that queue;
#   3. the DynamoDB table of the controllers' leader lease (partition key
#      `name`, on-demand billing: a few calls a second at most);
#   4. the controller's IAM role: trust for IRSA or EKS Pod Identity, and
#      controller-policy.json (rendered for this account/region/queue/table) inline.
# The caller needs setup-policy.json (rendered the same way) or more.
#
#   iam/setup.sh --cluster NAME [--trust irsa|pod-identity] [--region R]
#                [--namespace signpost] [--service-account signpost]
#                [--role-name signpost-controller] [--queue-name signpost-events]
#                [--lease-table signpost-lease | --no-lease-table]
#                [--oidc-provider oidc.eks.REGION.amazonaws.com/id/XXXX]
#   iam/setup.sh --render FILE ...   print FILE with placeholders filled, no AWS calls
#
# Prints the role ARN and queue URL last, as `key=value` lines.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
AWS_BIN="${AWS_CLI:-aws}"
# An explicit --endpoint-url as well as AWS_ENDPOINT_URL: not every AWS CLI
# release applies the variable to every service (SQS in CLI v1).
aws_cli() { "$AWS_BIN" ${AWS_ENDPOINT_URL:+--endpoint-url "$AWS_ENDPOINT_URL"} "$@"; }
AWS=aws_cli
REGION="${AWS_REGION:-${AWS_DEFAULT_REGION:-}}"
CLUSTER="" TRUST="irsa" NAMESPACE="signpost" SERVICE_ACCOUNT="signpost"
ROLE_NAME="signpost-controller" QUEUE_NAME="signpost-events" OIDC_PROVIDER="" ACCOUNT_ID=""
LEASE_TABLE="signpost-lease" MAKE_LEASE_TABLE=1
RENDER=""

die() { echo "setup.sh: $*" >&2; exit 1; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --cluster) CLUSTER="$2"; shift 2 ;;
        --trust) TRUST="$2"; shift 2 ;;
        --region) REGION="$2"; shift 2 ;;
        --namespace) NAMESPACE="$2"; shift 2 ;;
        --service-account) SERVICE_ACCOUNT="$2"; shift 2 ;;
        --role-name) ROLE_NAME="$2"; shift 2 ;;
        --queue-name) QUEUE_NAME="$2"; shift 2 ;;
        --lease-table) LEASE_TABLE="$2"; shift 2 ;;
        --no-lease-table) MAKE_LEASE_TABLE=""; shift ;;
        --oidc-provider) OIDC_PROVIDER="${2#https://}"; shift 2 ;;
        --account-id) ACCOUNT_ID="$2"; shift 2 ;;
        --render) RENDER="$2"; shift 2 ;;
        -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done
[[ -n "$REGION" ]] || die "no region: pass --region or set AWS_REGION"
[[ "$TRUST" == irsa || "$TRUST" == pod-identity ]] || die "--trust must be irsa or pod-identity"
export AWS_REGION="$REGION" AWS_DEFAULT_REGION="$REGION"

# Fills the __PLACEHOLDER__s of one of the JSON files beside this script.
render() {
    sed -e "s|__REGION__|$REGION|g" -e "s|__ACCOUNT_ID__|$ACCOUNT_ID|g" \
        -e "s|__QUEUE_NAME__|$QUEUE_NAME|g" -e "s|__OIDC_PROVIDER__|$OIDC_PROVIDER|g" \
        -e "s|__NAMESPACE__|$NAMESPACE|g" -e "s|__SERVICE_ACCOUNT__|$SERVICE_ACCOUNT|g" \
        -e "s|__CLUSTER__|$CLUSTER|g" -e "s|__ROLE_NAME__|$ROLE_NAME|g" \
        -e "s|__LEASE_TABLE__|$LEASE_TABLE|g" "$1"
}

if [[ -z "$ACCOUNT_ID" ]]; then
    ACCOUNT_ID="$("$AWS" sts get-caller-identity --query Account --output text)"
fi
if [[ -n "$RENDER" ]]; then
    render "$RENDER"
    exit 0
fi
[[ -n "$CLUSTER" ]] || die "--cluster is required (the EKS cluster signpost runs in)"
log() { echo "setup.sh: $*" >&2; }

# 1. The queue. Events are hints (a resync is the truth), so a short retention
#    is enough; SSE with SQS-managed keys needs no KMS permissions.
QUEUE_URL="$("$AWS" sqs create-queue --queue-name "$QUEUE_NAME" \
    --attributes MessageRetentionPeriod=86400,SqsManagedSseEnabled=true \
    --query QueueUrl --output text)"
QUEUE_ARN="arn:aws:sqs:$REGION:$ACCOUNT_ID:$QUEUE_NAME"
log "queue $QUEUE_URL"

# 2. The rules (their patterns are the files beside this script, which the
#    tests put on their emulated buses too), then the queue policy naming
#    exactly them.
RULE_ASG="signpost-autoscaling" RULE_EC2="signpost-ec2-state"
"$AWS" events put-rule --name "$RULE_ASG" --state ENABLED \
    --description "signpost: Auto Scaling lifecycle and launch/terminate events" \
    --event-pattern "file://$HERE/event-patterns/autoscaling.json" \
    --query RuleArn --output text >/dev/null
"$AWS" events put-rule --name "$RULE_EC2" --state ENABLED \
    --description "signpost: EC2 instance state changes" \
    --event-pattern "file://$HERE/event-patterns/ec2-state.json" \
    --query RuleArn --output text >/dev/null
for rule in "$RULE_ASG" "$RULE_EC2"; do
    "$AWS" events put-targets --rule "$rule" \
        --targets "Id=signpost-queue,Arn=$QUEUE_ARN" --query FailedEntryCount --output text >/dev/null
done
log "rules $RULE_ASG, $RULE_EC2 -> $QUEUE_NAME"

QUEUE_POLICY="$(cat <<JSON
{"Version":"2012-10-17","Statement":[{"Sid":"EventBridgeRulesOfSignpost","Effect":"Allow",
"Principal":{"Service":"events.amazonaws.com"},"Action":"sqs:SendMessage","Resource":"$QUEUE_ARN",
"Condition":{"ArnEquals":{"aws:SourceArn":["arn:aws:events:$REGION:$ACCOUNT_ID:rule/$RULE_ASG","arn:aws:events:$REGION:$ACCOUNT_ID:rule/$RULE_EC2"]}}}]}
JSON
)"
# set-queue-attributes takes a map of strings: the policy goes in as one JSON string.
ATTRS="$(python3 -c 'import json,sys; print(json.dumps({"Policy": json.dumps(json.loads(sys.argv[1]))}))' "$QUEUE_POLICY")"
"$AWS" sqs set-queue-attributes --queue-url "$QUEUE_URL" --attributes "$ATTRS"

# 3. The lease table. Expiry is an attribute compared in conditional writes,
#    never DynamoDB's TTL deletion (which runs up to days late).
#    --no-lease-table: a single controller (no [ha]) needs none.
if [[ -z "$MAKE_LEASE_TABLE" ]]; then
    log "no lease table (--no-lease-table)"
elif ! "$AWS" dynamodb describe-table --table-name "$LEASE_TABLE" >/dev/null 2>&1; then
    "$AWS" dynamodb create-table --table-name "$LEASE_TABLE" \
        --attribute-definitions AttributeName=name,AttributeType=S \
        --key-schema AttributeName=name,KeyType=HASH \
        --billing-mode PAY_PER_REQUEST >/dev/null
    log "lease table $LEASE_TABLE"
else
    log "lease table $LEASE_TABLE"
fi

# 4. The role.
if [[ "$TRUST" == irsa ]]; then
    if [[ -z "$OIDC_PROVIDER" ]]; then
        OIDC_PROVIDER="$("$AWS" eks describe-cluster --name "$CLUSTER" \
            --query cluster.identity.oidc.issuer --output text)"
        OIDC_PROVIDER="${OIDC_PROVIDER#https://}"
    fi
    TRUST_FILE="$HERE/trust-irsa.json"
else
    TRUST_FILE="$HERE/trust-pod-identity.json"
fi
TRUST_DOC="$(render "$TRUST_FILE")"
if "$AWS" iam get-role --role-name "$ROLE_NAME" >/dev/null 2>&1; then
    "$AWS" iam update-assume-role-policy --role-name "$ROLE_NAME" --policy-document "$TRUST_DOC"
else
    "$AWS" iam create-role --role-name "$ROLE_NAME" --assume-role-policy-document "$TRUST_DOC" \
        --description "signpost controller ($TRUST)" >/dev/null
fi
"$AWS" iam put-role-policy --role-name "$ROLE_NAME" --policy-name signpost-controller \
    --policy-document "$(render "$HERE/controller-policy.json")"
ROLE_ARN="arn:aws:iam::$ACCOUNT_ID:role/$ROLE_NAME"
log "role $ROLE_ARN ($TRUST)"

if [[ "$TRUST" == pod-identity ]]; then
    existing="$("$AWS" eks list-pod-identity-associations --cluster-name "$CLUSTER" \
        --namespace "$NAMESPACE" --service-account "$SERVICE_ACCOUNT" \
        --query 'associations[0].associationId' --output text)"
    if [[ -z "$existing" || "$existing" == None ]]; then
        "$AWS" eks create-pod-identity-association --cluster-name "$CLUSTER" \
            --namespace "$NAMESPACE" --service-account "$SERVICE_ACCOUNT" --role-arn "$ROLE_ARN" >/dev/null
    else
        "$AWS" eks update-pod-identity-association --cluster-name "$CLUSTER" \
            --association-id "$existing" --role-arn "$ROLE_ARN" >/dev/null
    fi
    log "pod identity association $NAMESPACE/$SERVICE_ACCOUNT -> $ROLE_ARN"
fi

echo "role_arn=$ROLE_ARN"
echo "queue_url=$QUEUE_URL"
