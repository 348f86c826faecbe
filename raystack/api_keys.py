"""API keys for the HTTP API: where they come from, and a constant-time check (no Ray, no web framework).

Keys come from an environment variable (comma-separated) and/or a key file (one per line). Loading fails closed:
a named key file that is missing or holds no key is an error, and so is ``required`` with no key at all. Keys are
never logged or echoed in an error, not even a malformed line of the key file.
"""

from __future__ import annotations

import hmac
import os
from typing import Optional


def load_api_keys(env_name: str, key_file: Optional[str] = None, required: bool = False) -> list[bytes]:
    """The keys in environment variable ``env_name`` (comma-separated) and ``key_file``; raises ``ValueError``
    (naming no key) where keys were asked for and none are there."""
    keys = [k.strip() for k in os.environ.get(env_name, "").split(",") if k.strip()]
    if key_file:
        path = os.path.expanduser(key_file)
        try:
            with open(path) as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(f"api_key_file {path!r} cannot be read ({e.strerror}); create it with one key per line "
                             "on every node, or drop api_key_file") from None
        from_file = parse_key_file(lines, path)
        if not from_file:
            raise ValueError(f"api_key_file {path!r} holds no key; put one key per line in it")
        keys += from_file
    if not keys and required:
        raise ValueError(f"require_api_key is set but this replica found no API key: set {env_name} in "
                         "its environment or point api_key_file at a key file")
    return [k.encode() for k in keys]


def parse_key_file(lines: list[str], path: str) -> list[str]:
    """One key per line; blank lines and lines that are ``#`` or start with ``# `` are comments, so a key may itself
    start with ``#``. A line with inner whitespace is refused by number (never echoing it: it may be a key)."""
    keys = []
    for number, line in enumerate(lines, 1):
        text = line.strip()
        if not text or text == "#" or text.startswith("# "):
            continue
        if any(c.isspace() for c in text):
            raise ValueError(f"api_key_file {path!r}, line {number}: a key must not contain whitespace "
                             "(comment lines start with '# ')")
        keys.append(text)
    return keys


def key_matches(presented: bytes, keys: list[bytes]) -> bool:
    """Constant time in the presented key: every configured key is compared, with ``hmac.compare_digest``."""
    match = False
    for key in keys:
        match |= hmac.compare_digest(presented, key)
    return match
