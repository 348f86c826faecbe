"""Where files live: a local path or an object-store URI (anything ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ...).

``filesystem(location)`` gives the filesystem and the path inside it (local paths made absolute, ``~`` expanded);
``join(base, *parts)`` joins under a location the same way, so every module treats paths and URIs alike.
"""

from __future__ import annotations

import os
import posixpath

import pyarrow.fs as pafs


def is_uri(location: str) -> bool:
    return "://" in location


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(location))


def join(base: str, *parts: str) -> str:
    if is_uri(base):
        return posixpath.join(base, *parts)
    return os.path.join(os.path.abspath(os.path.expanduser(base)), *parts)
