#!/usr/bin/env python3
"""Write a node's boot definitions: broker_config/definitions.json plus its users.

Stdlib only, so it runs before the project's virtualenv exists. Passwords are written as
RabbitMQ's salted SHA-256 hashes, never in clear. The loopback-only ``guest`` user (the
local development account, password ``guest``) is kept so that local tools work as before;
``loopback_users.guest = true`` in rabbitmq.conf stops it from logging in remotely.

Usage: node_definitions.py REPO_DEFINITIONS OUT [EXTRA_DEFINITIONS ...]
Extra definitions (e.g. client users made by ``splitmq broker add-client``) are merged in.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import sys


def password_hash(password: str) -> str:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt + sha256(salt + password))."""
    salt = os.urandom(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode()).digest()).decode()


def main(argv: list[str]) -> int:
    base, out, *extras = argv
    with open(base) as f:
        defs = json.load(f)
    defs.setdefault("users", []).append({
        "name": "guest", "password_hash": password_hash("guest"),
        "hashing_algorithm": "rabbit_password_hashing_sha256", "tags": ["administrator"],
    })
    defs.setdefault("permissions", []).append(
        {"user": "guest", "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"})
    for path in extras:
        with open(path) as f:
            extra = json.load(f)
        for key, items in extra.items():
            if isinstance(items, list):
                defs.setdefault(key, []).extend(items)
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(defs, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
