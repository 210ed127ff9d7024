"""Makes moto's DynamoDB conditional writes atomic, as DynamoDB's are.

moto_server answers requests on several threads and evaluates a
ConditionExpression and then writes the item without a lock, so two
conditional UpdateItems sent at the same moment can both pass the
condition: two controller replicas both "took" the lease (tokens 1 and 2)
in tests/ha.rs. On DynamoDB a conditional write is atomic per item; here
every write of the DynamoDB backend is serialised by one lock.
"""
from __future__ import annotations

import functools
import threading

from moto.dynamodb.models import DynamoDBBackend

_LOCK = threading.RLock()

_WRITES = ("put_item", "update_item", "delete_item", "transact_write_items")


def install() -> None:
    for name in _WRITES:
        original = getattr(DynamoDBBackend, name, None)
        if original is None or getattr(original, "_signpost_atomic", False):
            continue

        @functools.wraps(original)
        def locked(self, *args, __original=original, **kwargs):
            with _LOCK:
                return __original(self, *args, **kwargs)

        locked._signpost_atomic = True
        setattr(DynamoDBBackend, name, locked)
