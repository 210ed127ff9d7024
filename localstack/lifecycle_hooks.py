"""Lifecycle hooks for moto's Auto Scaling, following AWS's documented behaviour.

moto 5.2.5 stores lifecycle hooks and does nothing with them. Importing this
module (moto_with_hooks.py does, before the server starts) patches moto's
Auto Scaling model and response classes so that a group with hooks behaves as
AWS documents:

- scale-out puts each new instance in `Pending:Wait` (EC2 `running`, private
  IP assigned) with one lifecycle action per launch hook; scale-in puts the
  chosen instances in `Terminating:Wait` (still running, still in the group);
- each action is announced by the hook's SQS notification and by an
  EventBridge event on the default bus;
- CompleteLifecycleAction (CONTINUE/ABANDON, by instance id or token),
  RecordLifecycleActionHeartbeat, and a background timer that applies the
  hook's DefaultResult when the heartbeat timeout (or the global timeout)
  expires.

AWS documentation followed (titles; URLs under
https://docs.aws.amazon.com/autoscaling/ec2/):
  [HOW]    "How lifecycle hooks work"             userguide/lifecycle-hooks-overview.html
  [COMP]   "Complete a lifecycle action"          userguide/completing-lifecycle-hooks.html
  [NOTIF]  "Configure a notification target for lifecycle notifications"
                                                  userguide/prepare-for-lifecycle-notifications.html
  [EVENTS] "Amazon EC2 Auto Scaling event reference"
                                                  userguide/ec2-auto-scaling-event-reference.html
  [API]    API reference: PutLifecycleHook, CompleteLifecycleAction,
           RecordLifecycleActionHeartbeat, LifecycleHook, CreateAutoScalingGroup
           (LifecycleHookSpecificationList), DeleteAutoScalingGroup (ForceDelete)
                                                  APIReference/API_<Name>.html

A group with no lifecycle hook is left exactly to moto: every patched entry
point checks for hooks first and otherwise calls moto's own code unchanged.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timezone

from moto.autoscaling import models as asg_models
from moto.autoscaling.exceptions import ValidationError
from moto.autoscaling.models import FakeAutoScalingGroup, LifecycleHook
from moto.autoscaling.responses import AutoScalingResponse
from moto.core.responses import EmptyResult

log = logging.getLogger("signpost.lifecycle_hooks")

LAUNCHING = "autoscaling:EC2_INSTANCE_LAUNCHING"
TERMINATING = "autoscaling:EC2_INSTANCE_TERMINATING"
# [API] LifecycleHook.GlobalTimeout: 48 hours or 100 x HeartbeatTimeout, whichever is smaller.
GLOBAL_TIMEOUT_MAX = 172800
# How often the timer thread looks for expired actions (seconds). Small, so
# short heartbeat timeouts in tests expire close to on time.
TICK = float(os.environ.get("SIGNPOST_HOOKS_TICK", "0.2"))

# moto serves requests from several threads; every patched path and the timer
# thread hold this lock while they read or change hook state.
_LOCK = threading.RLock()
# Pending lifecycle actions, token -> Action. Module-level rather than on the
# backend so the timer can find them; an action whose group or instance is gone
# (deleted group, POST /moto-api/reset) is dropped when next looked at.
_ACTIONS: dict[str, "Action"] = {}
# Set: every CompleteLifecycleAction call is appended to this file as a JSON
# line (wall time, caller's access key id, group, hook, instance, result,
# whether an action was found), so that tests can tell which controller
# replica completed what, and when, against the lease's history.
CALLS_LOG = os.environ.get("SIGNPOST_HOOKS_CALLS_LOG")


class Action:
    """One lifecycle action: one instance held in a wait state by one hook."""

    def __init__(self, group: FakeAutoScalingGroup, state, hook: LifecycleHook):
        self.token = str(uuid.uuid4())
        self.group = group
        self.state = state  # moto's InstanceState (its lifecycle_state is what AWS reports)
        self.hook = hook
        self.transition = hook.lifecycle_transition
        now = time.monotonic()
        self.deadline = now + hook.heartbeat_timeout
        self.global_deadline = now + hook.global_timeout

    @property
    def instance_id(self) -> str:
        return self.state.instance.id

    def alive(self) -> bool:
        g = self.group
        return (g.autoscaling_backend.autoscaling_groups.get(g.name) is g
                and self.state in g.instance_states)


# --------------------------------------------------------------------------
# helpers


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _hooks(group: FakeAutoScalingGroup, transition: str | None = None) -> list[LifecycleHook]:
    backend = group.autoscaling_backend
    return [h for h in backend.lifecycle_hooks.values()
            if h.auto_scaling_group_name == group.name
            and (transition is None or h.lifecycle_transition == transition)]


def _hooked(group: FakeAutoScalingGroup) -> bool:
    """Does this group get the AWS lifecycle behaviour? (No hook: pure moto.)"""
    if getattr(group, "_signpost_deleting", False):
        return False  # [API] DeleteAutoScalingGroup ForceDelete: outstanding actions are deleted
    return bool(_hooks(group))


def _actions_of(state, transition: str | None = None) -> list[Action]:
    return [a for a in _ACTIONS.values()
            if a.state is state and (transition is None or a.transition == transition)]


def _send_notification(hook: LifecycleHook, body: dict) -> None:
    """[NOTIF] SQS targets get the notification as a JSON body."""
    arn = getattr(hook, "notification_target_arn", None)
    if not arn:
        return
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[2] != "sqs":
        log.warning("lifecycle hook %s: only SQS notification targets are emulated (%s)", hook.name, arn)
        return
    from moto.sqs.models import sqs_backends
    _, _, _, region, account, queue = parts
    sqs_backends[account][region].send_message(queue_name=queue, message_body=json.dumps(body))


def _put_event(group: FakeAutoScalingGroup, detail_type: str, detail: dict, resources: list[str]) -> None:
    """[EVENTS] Auto Scaling sends these to the default event bus; going through
    moto's put_events makes rules (e.g. with SQS targets) deliver them."""
    from moto.events.models import events_backends
    backend = events_backends[group.account_id][group.region]
    backend.put_events([{"Source": "aws.autoscaling", "DetailType": detail_type,
                         "Detail": json.dumps(detail), "Resources": resources}])


def _instance_arn(group: FakeAutoScalingGroup, instance_id: str) -> str:
    return f"arn:aws:ec2:{group.region}:{group.account_id}:instance/{instance_id}"


def _announce_action(action: Action) -> None:
    """[NOTIF] the hook's notification and [EVENTS] the "... Lifecycle Action" event."""
    group, hook = action.group, action.hook
    launching = action.transition == LAUNCHING
    # [EVENTS] Origin/Destination: EC2 -> AutoScalingGroup on launch, the reverse on terminate.
    origin, destination = ("EC2", "AutoScalingGroup") if launching else ("AutoScalingGroup", "EC2")
    common = {
        "LifecycleActionToken": action.token,
        "AutoScalingGroupName": group.name,
        "LifecycleHookName": hook.name,
        "EC2InstanceId": action.instance_id,
        "LifecycleTransition": action.transition,
    }
    metadata = getattr(hook, "notification_metadata", None)
    if metadata:
        common["NotificationMetadata"] = metadata
    body = {"Origin": origin, "Destination": destination, "Service": "AWS Auto Scaling",
            "Time": _now_iso(), "AccountId": group.account_id, "RequestId": str(uuid.uuid4()),
            **common}
    _send_notification(hook, body)
    _put_event(group, "EC2 Instance-launch Lifecycle Action" if launching
               else "EC2 Instance-terminate Lifecycle Action",
               {**common, "Origin": origin, "Destination": destination}, [group.arn])


def _activity_event(group: FakeAutoScalingGroup, state, launching: bool) -> None:
    """[EVENTS] "EC2 Instance Launch Successful" / "EC2 Instance Terminate Successful"."""
    iid = state.instance.id
    now = _now_iso()
    subnet = getattr(state.instance, "subnet_id", None)
    detail = {
        # The event reference's examples carry StatusCode "InProgress" for both.
        "StatusCode": "InProgress",
        "Description": (f"Launching a new EC2 instance: {iid}" if launching
                        else f"Terminating EC2 instance: {iid}"),
        "AutoScalingGroupName": group.name,
        "ActivityId": str(uuid.uuid4()),
        "Details": {"Availability Zone": state.availability_zone, "Subnet ID": subnet},
        "RequestId": str(uuid.uuid4()),
        "StatusMessage": "",
        "EndTime": now,
        "EC2InstanceId": iid,
        "StartTime": now,
        "Cause": (f"At {now} an instance was started in response to a difference between "
                  "desired and actual capacity." if launching else
                  f"At {now} an instance was taken out of service in response to a "
                  "difference between desired and actual capacity."),
        "Origin": "EC2" if launching else "AutoScalingGroup",
        "Destination": "AutoScalingGroup" if launching else "EC2",
    }
    _put_event(group, "EC2 Instance Launch Successful" if launching
               else "EC2 Instance Terminate Successful",
               detail, [group.arn, _instance_arn(group, iid)])


def _terminate_now(group: FakeAutoScalingGroup, state) -> None:
    """Terminate in EC2 and drop from the group, as moto's own scale-in does."""
    for a in _actions_of(state):
        _ACTIONS.pop(a.token, None)
    group.autoscaling_backend.ec2_backend.terminate_instances([state.instance.id])
    if state in group.instance_states:
        group.instance_states.remove(state)


# --------------------------------------------------------------------------
# state transitions


def _begin_launch(group: FakeAutoScalingGroup, state) -> None:
    hooks = _hooks(group, LAUNCHING)
    if not hooks:
        _activity_event(group, state, launching=True)
        return
    # [HOW] step 2: the launch hook puts the instance into Pending:Wait.
    state.lifecycle_state = "Pending:Wait"
    for hook in hooks:
        action = Action(group, state, hook)
        _ACTIONS[action.token] = action
        _announce_action(action)


def _begin_termination(group: FakeAutoScalingGroup, states) -> None:
    hooks = _hooks(group, TERMINATING)
    for state in states:
        # A launch still waiting for its hook is cancelled: the instance goes.
        for a in _actions_of(state, LAUNCHING):
            _ACTIONS.pop(a.token, None)
        if not hooks:
            _terminate_now(group, state)
            _activity_event(group, state, launching=False)
            continue
        # [HOW] steps 4-5: the terminate hook holds the instance in
        # Terminating:Wait; it stays running and in the group until completed.
        state.lifecycle_state = "Terminating:Wait"
        for hook in hooks:
            action = Action(group, state, hook)
            _ACTIONS[action.token] = action
            _announce_action(action)


def _complete(action: Action, result: str) -> None:
    """Apply one action's result; the instance moves on once all its hooks are done."""
    _ACTIONS.pop(action.token, None)
    group, state = action.group, action.state
    if not action.alive():
        return
    if action.transition == LAUNCHING:
        if result == "ABANDON":
            # [COMP] ABANDON on launch: the instance is terminated, and the
            # group launches a replacement to keep its desired capacity.
            for a in _actions_of(state, LAUNCHING):
                _ACTIONS.pop(a.token, None)
            _terminate_now(group, state)
            group.set_desired_capacity(group.desired_capacity)
            return
        if _actions_of(state, LAUNCHING):
            return  # other launch hooks still hold it
        # [HOW] CONTINUE: Pending:Proceed, then InService.
        state.lifecycle_state = "Pending:Proceed"
        state.lifecycle_state = "InService"
        _activity_event(group, state, launching=True)
    else:
        # [COMP] on terminate, CONTINUE and ABANDON both let the instance terminate.
        if _actions_of(state, TERMINATING):
            return
        state.lifecycle_state = "Terminating:Proceed"
        _terminate_now(group, state)
        _activity_event(group, state, launching=False)


def _find_action(group_name: str, hook_name: str, instance_id: str | None, token: str | None) -> Action:
    for a in list(_ACTIONS.values()):
        if not a.alive():
            _ACTIONS.pop(a.token, None)
            continue
        if a.group.name != group_name or a.hook.name != hook_name:
            continue
        if (token and a.token == token) or (not token and instance_id and a.instance_id == instance_id):
            return a
    # Wording of AWS's ValidationError, as clients match on it (e.g. "No active
    # Lifecycle Action found with instance ID i-08406e13ee788fc10").
    if token:
        raise ValidationError(f"No active Lifecycle Action found with token {token}")
    raise ValidationError(f"No active Lifecycle Action found with instance ID {instance_id}")


def _expire_due() -> None:
    now = time.monotonic()
    with _LOCK:
        for a in list(_ACTIONS.values()):
            if a.token not in _ACTIONS:
                continue  # completed as a side effect of an earlier one
            if not a.alive():
                _ACTIONS.pop(a.token, None)
            elif now >= min(a.deadline, a.global_deadline):
                # [HOW] when the timeout period ends the group applies the
                # hook's DefaultResult ([API] LifecycleHook.DefaultResult).
                try:
                    _complete(a, a.hook.default_result)
                except Exception:  # never let the timer thread die
                    log.exception("applying default result of %s failed", a.token)


def _timer() -> None:
    while True:
        time.sleep(TICK)
        _expire_due()


# --------------------------------------------------------------------------
# patches of moto's model


_orig_set_desired_capacity = FakeAutoScalingGroup.set_desired_capacity
_orig_replace_instances = FakeAutoScalingGroup.replace_autoscaling_group_instances
_orig_delete_group = asg_models.AutoScalingBackend.delete_auto_scaling_group
_orig_terminate_instance = asg_models.AutoScalingBackend.terminate_instance
_orig_lifecycle_hook_init = LifecycleHook.__init__


def active_instances(self):
    # Instances still launching count toward capacity, or every later
    # SetDesiredCapacity would launch them again. moto's own states
    # (InService only) are unchanged for groups that never have Pending ones.
    return [s for s in self.instance_states
            if s.lifecycle_state in ("InService", "Pending:Wait", "Pending:Proceed")]


def replace_autoscaling_group_instances(self, count_needed, propagated_tags):
    with _LOCK:
        first_new = len(self.instance_states)
        _orig_replace_instances(self, count_needed, propagated_tags)
        if _hooked(self):
            for state in self.instance_states[first_new:]:
                _begin_launch(self, state)


def set_desired_capacity(self, new_capacity):
    with _LOCK:
        if not _hooked(self) or (self.mixed_instances_policy and len(
                self.mixed_instances_policy.get("LaunchTemplate", {}).get("Overrides", []))):
            return _orig_set_desired_capacity(self, new_capacity)
        # moto's algorithm (first N unprotected instances go on scale-in), except
        # that instances already terminating are neither counted nor chosen again
        # and termination goes through the terminate hooks.
        self.desired_capacity = self.min_size if new_capacity is None else new_capacity
        delta = (self.desired_capacity or 0) - len(self.active_instances())
        if delta > 0:
            self.replace_autoscaling_group_instances(delta, self.get_propagated_tags())
        elif delta < 0:
            candidates = [s for s in self.instance_states
                          if not s.protected_from_scale_in
                          and s.lifecycle_state in ("InService", "Pending:Wait", "Pending:Proceed")]
            # In-service instances first, then ones still launching.
            candidates.sort(key=lambda s: s.lifecycle_state != "InService")
            _begin_termination(self, candidates[:-delta])
        if self.name in self.autoscaling_backend.autoscaling_groups:
            self.autoscaling_backend.update_attached_elbs(self.name)
            self.autoscaling_backend.update_attached_target_groups(self.name)


def delete_auto_scaling_group(self, group_name):
    # [API] DeleteAutoScalingGroup: deleting a group (ForceDelete) deletes its
    # outstanding lifecycle actions, and its hooks go with it.
    with _LOCK:
        group = self.autoscaling_groups.get(group_name)
        if group is not None:
            group._signpost_deleting = True
            # Instances held in Terminating:Wait are not counted by moto's
            # scale-to-zero; terminate them here so none outlives the group.
            for state in [s for s in group.instance_states if s.lifecycle_state.startswith("Terminating")]:
                _terminate_now(group, state)
        try:
            _orig_delete_group(self, group_name)
        finally:
            if group is not None:
                group._signpost_deleting = False
        for key in [k for k, h in self.lifecycle_hooks.items() if h.auto_scaling_group_name == group_name]:
            del self.lifecycle_hooks[key]
        for a in [a for a in _ACTIONS.values() if a.group is group]:
            _ACTIONS.pop(a.token, None)


def terminate_instance(self, instance_id, should_decrement):
    # [HOW] TerminateInstanceInAutoScalingGroup also passes through the
    # terminate hooks; without ShouldDecrementDesiredCapacity the group
    # launches a replacement.
    with _LOCK:
        state = next((s for g in self.autoscaling_groups.values() for s in g.instance_states
                      if s.instance.id == instance_id), None)
        group = state.auto_scaling_group if state is not None else None
        if group is None or not _hooked(group) or not _hooks(group, TERMINATING) \
                or state.lifecycle_state.startswith("Terminating"):
            return _orig_terminate_instance(self, instance_id, should_decrement)
        original_size = group.desired_capacity
        if should_decrement:
            group.desired_capacity -= 1
        _begin_termination(group, [state])
        group.set_desired_capacity(group.desired_capacity)
        return asg_models.TerminateInstanceActivity(state.instance, original_size)


def lifecycle_hook_init(self, name, as_name, transition, timeout, result):
    _orig_lifecycle_hook_init(self, name, as_name, transition, timeout, result)
    # moto hardcodes a role and an SQS queue; the real values come from the request.
    self.role_arn = None
    self.notification_target_arn = None
    self.notification_metadata = None
    # [API] LifecycleHook.GlobalTimeout: 48 h or 100 x HeartbeatTimeout, whichever is smaller.
    self.global_timeout = min(GLOBAL_TIMEOUT_MAX, 100 * self.heartbeat_timeout)


# --------------------------------------------------------------------------
# patches of moto's responses (the API actions)


def _put_hook(backend, group_name: str, spec: dict) -> LifecycleHook:
    """PutLifecycleHook semantics: create, or update only the fields given."""
    key = f"{group_name}_{spec['LifecycleHookName']}"
    hook = backend.lifecycle_hooks.get(key)
    if hook is None:
        hook = backend.create_lifecycle_hook(
            name=spec["LifecycleHookName"], as_name=group_name,
            transition=spec.get("LifecycleTransition"),
            timeout=int(spec["HeartbeatTimeout"]) if spec.get("HeartbeatTimeout") else None,
            result=spec.get("DefaultResult"))
    else:
        if spec.get("LifecycleTransition"):
            hook.lifecycle_transition = spec["LifecycleTransition"]
        if spec.get("HeartbeatTimeout"):
            hook.heartbeat_timeout = int(spec["HeartbeatTimeout"])
            hook.global_timeout = min(GLOBAL_TIMEOUT_MAX, 100 * hook.heartbeat_timeout)
        if spec.get("DefaultResult"):
            hook.default_result = spec["DefaultResult"]
    for field, attr in (("RoleARN", "role_arn"), ("NotificationTargetARN", "notification_target_arn"),
                        ("NotificationMetadata", "notification_metadata")):
        if field in spec:  # [API] PutLifecycleHook: an empty string clears the value
            setattr(hook, attr, spec[field] or None)
    return hook


def _test_notification(backend, group_name: str, hook: LifecycleHook) -> None:
    """[API] PutLifecycleHook, NotificationTargetARN: "When you specify a
    notification target, Amazon EC2 Auto Scaling sends it a test message",
    which carries "Event": "autoscaling:TEST_NOTIFICATION"."""
    if not hook.notification_target_arn:
        return
    group = backend.autoscaling_groups.get(group_name)
    body = {"AccountId": backend.account_id, "RequestId": str(uuid.uuid4()),
            "AutoScalingGroupARN": group.arn if group else None,
            "AutoScalingGroupName": group_name, "Service": "AWS Auto Scaling",
            "Event": "autoscaling:TEST_NOTIFICATION", "Time": _now_iso()}
    try:
        _send_notification(hook, body)
    except Exception as e:  # AWS refuses a hook whose target it cannot publish to
        raise ValidationError(f"Unable to publish test message to notification target "
                              f"{hook.notification_target_arn} using IAM role {hook.role_arn}. "
                              f"Please check your target and role configuration and try to "
                              f"put lifecycle hook again.") from e


def put_lifecycle_hook(self):
    with _LOCK:
        spec = {k: v for k, v in self._get_params().items() if k != "Action" and k != "Version"}
        group_name = spec.pop("AutoScalingGroupName")
        key = f"{group_name}_{spec.get('LifecycleHookName')}"
        existed = key in self.autoscaling_backend.lifecycle_hooks
        hook = _put_hook(self.autoscaling_backend, group_name, spec)
        if spec.get("NotificationTargetARN"):
            try:
                _test_notification(self.autoscaling_backend, group_name, hook)
            except ValidationError:
                if not existed:  # a refused hook is not created
                    self.autoscaling_backend.lifecycle_hooks.pop(key, None)
                raise
        return EmptyResult()


_orig_create_group_response = AutoScalingResponse.create_auto_scaling_group


def create_auto_scaling_group(self):
    # [API] CreateAutoScalingGroup LifecycleHookSpecificationList: the hooks
    # exist before the first instances launch, so those wait too.
    with _LOCK:
        name = self._get_param("AutoScalingGroupName")
        specs = self._get_param("LifecycleHookSpecificationList", []) or []
        if name in self.autoscaling_backend.autoscaling_groups:
            specs = []  # moto answers AlreadyExists below; don't touch the existing hooks
        hooks = [_put_hook(self.autoscaling_backend, name, s) for s in specs]
        result = _orig_create_group_response(self)
        for hook in hooks:
            try:
                _test_notification(self.autoscaling_backend, name, hook)
            except ValidationError as e:  # the group exists by now: say so, don't fail
                log.warning("%s", e)
        return result


def _caller(self) -> str:
    """The access key id of a SigV4-signed request (Credential=KEY/...)."""
    auth = self.headers.get("Authorization", "")
    _, _, rest = auth.partition("Credential=")
    return rest.split("/", 1)[0]


def _record_call(self, result: str, found: bool) -> None:
    if not CALLS_LOG:
        return
    line = json.dumps({
        "time": time.time(), "caller": _caller(self), "group": self._get_param("AutoScalingGroupName"),
        "hook": self._get_param("LifecycleHookName"), "instance": self._get_param("InstanceId"),
        "result": result, "found": found,
    })
    with open(CALLS_LOG, "a", encoding="utf-8") as f:
        f.write(line + "\n")


def complete_lifecycle_action(self):
    """[API] CompleteLifecycleAction, by LifecycleActionToken or InstanceId."""
    with _LOCK:
        result = self._get_param("LifecycleActionResult")
        if result not in ("CONTINUE", "ABANDON"):
            raise ValidationError(f"Invalid LifecycleActionResult: {result}. "
                                  "Valid values are CONTINUE and ABANDON.")
        try:
            action = _find_action(self._get_param("AutoScalingGroupName"), self._get_param("LifecycleHookName"),
                                  self._get_param("InstanceId"), self._get_param("LifecycleActionToken"))
        except ValidationError:
            _record_call(self, result, found=False)
            raise
        _record_call(self, result, found=True)
        _complete(action, result)
        return EmptyResult()


def record_lifecycle_action_heartbeat(self):
    """[API] RecordLifecycleActionHeartbeat restarts the heartbeat timeout
    (never past the global timeout)."""
    with _LOCK:
        action = _find_action(self._get_param("AutoScalingGroupName"), self._get_param("LifecycleHookName"),
                              self._get_param("InstanceId"), self._get_param("LifecycleActionToken"))
        action.deadline = time.monotonic() + action.hook.heartbeat_timeout
        return EmptyResult()


_installed = False


def install() -> None:
    """Patch moto (idempotent) and start the timer thread."""
    global _installed
    if _installed:
        return
    _installed = True
    FakeAutoScalingGroup.active_instances = active_instances
    FakeAutoScalingGroup.set_desired_capacity = set_desired_capacity
    FakeAutoScalingGroup.replace_autoscaling_group_instances = replace_autoscaling_group_instances
    asg_models.AutoScalingBackend.delete_auto_scaling_group = delete_auto_scaling_group
    asg_models.AutoScalingBackend.terminate_instance = terminate_instance
    LifecycleHook.__init__ = lifecycle_hook_init
    AutoScalingResponse.put_lifecycle_hook = put_lifecycle_hook
    AutoScalingResponse.create_auto_scaling_group = create_auto_scaling_group
    AutoScalingResponse.complete_lifecycle_action = complete_lifecycle_action
    AutoScalingResponse.record_lifecycle_action_heartbeat = record_lifecycle_action_heartbeat
    threading.Thread(target=_timer, name="lifecycle-hook-timer", daemon=True).start()
