"""Where files live: a local path or an object-store URI (anything ``pyarrow.fs`` opens: ``s3://``, ``gs://``, ...).

``filesystem(location)`` gives the filesystem and the path inside it (local paths made absolute, ``~`` expanded);
``join(base, *parts)`` joins under a location the same way, so every module treats paths and URIs alike.
``check_name`` keeps a run or sweep name one path component, so it can never point outside ``storage_path``.
"""

from __future__ import annotations

import os
import posixpath
import re

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


def make_local_dir(path: str, setting: str) -> None:
    """``os.makedirs(path, exist_ok=True)``; a failure is a ``ConfigError`` naming ``setting``, the config key the
    path comes from (``storage_path``), rather than a traceback."""
    from raystack.config import ConfigError

    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{setting}: cannot create {path!r} ({e.strerror or e}); choose a directory this job can "
                          "write") from None


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(kind: str, name: str) -> None:
    """``ValueError`` unless ``name`` is one safe path component: letters, digits, ``.``, ``_``, ``-``, starting
    with a letter or digit, at most 128 characters (so never ``..``, a separator or a hidden directory)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError(f"name must be a single path component of letters, digits, '.', '_' and '-' that starts "
                         f"with a letter or digit (at most 128 characters) naming the {kind}, got {name!r}")
