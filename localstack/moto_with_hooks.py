"""moto_server with lifecycle hooks: `python moto_with_hooks.py -H HOST -p PORT`.

Takes exactly moto_server's arguments. Patches moto with lifecycle_hooks.py
and atomic_dynamodb.py (next to this file) and then runs moto's own server
main().
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import atomic_dynamodb  # noqa: E402
import lifecycle_hooks  # noqa: E402

lifecycle_hooks.install()
atomic_dynamodb.install()

from moto.server import main  # noqa: E402

if __name__ == "__main__":
    main()
