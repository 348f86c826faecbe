"""One commit protocol for every directory-shaped output: batch outputs, packed corpora, model artifacts.

Correct on local disks and on object stores (S3, GCS), which have no directory rename and no atomic multi-object
operation, only atomic single-object writes. Layout of a committed output at ``LOCATION``:

    LOCATION/_SUCCESS                  the manifest (JSON): every file, its size and (optionally) sha256, and the
                                       writer's metadata. The only object ever replaced; readers trust only it.
    LOCATION/<attempt>/<name>          the committed files, under their attempt's directory: never overwritten
    LOCATION/_temporary/<attempt>/     an attempt in progress, hidden from readers (Hadoop's and Spark's convention)

Writer (``begin`` ... ``Attempt.commit``):
    1. files are written under ``_temporary/<attempt>/`` (the slow part: a whole batch job);
    2. each is moved to ``<attempt>/`` beside the manifest (a rename locally, a server-side copy on S3);
    3. the new manifest is staged, then moved onto ``_SUCCESS`` in one step: the commit point;
    4. what the new manifest does not list (the previous output, orphans of crashed attempts, ``_temporary``) is
       deleted.
A crash before step 3 leaves the previous manifest, whose files are untouched: readers see the old output (or
none). A crash after it leaves the new one. The next commit to the location removes what a crash left behind.
One writer per location at a time: a commit removes other attempts' staging.

Readers (``read_manifest``, ``read_files``, ``listed_paths``) go through the manifest and check each file's size
(and checksum when recorded); if a file is missing or differs because a newer commit replaced the output while
they read, they start again from the new manifest, so they never mix two outputs.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import posixpath
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

import pyarrow.fs as pafs

from raystack import storage

MANIFEST = "_SUCCESS"
STAGING = "_temporary"
FORMAT = "raystack-commit"
VERSION = 1
_ATTEMPT = re.compile(r"[0-9a-f]{12}")  # the name of an attempt's directory


class CommitError(ValueError):
    """An output that was never committed, or whose files no longer match its manifest."""


def _committed_name(name: str, attempt: str) -> str:
    return posixpath.join(attempt, name)


def _sha256(fs: pafs.FileSystem, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class Attempt:
    """One write to ``location``: put files under ``staging`` (``path(name)``), then ``commit``."""

    location: str
    fs: pafs.FileSystem
    root: str
    id: str
    written: dict[str, str] = field(default_factory=dict)
    """sha256 of each file ``write`` staged, so ``commit`` need not read it back from storage."""

    @property
    def staging(self) -> str:
        return posixpath.join(self.root, STAGING, self.id)

    def path(self, name: str) -> str:
        return posixpath.join(self.staging, name)

    def write(self, name: str, data: bytes) -> None:
        self.fs.create_dir(posixpath.dirname(self.path(name)), recursive=True)
        with self.fs.open_output_stream(self.path(name)) as f:
            f.write(data)
        self.written[name] = hashlib.sha256(data).hexdigest()

    def abort(self) -> None:
        """Remove this attempt's staging; the previous output is untouched."""
        self.fs.delete_dir_contents(self.staging, missing_dir_ok=True)
        _delete(self.fs, self.staging)

    def commit(self, meta: Optional[dict] = None, checksums: bool = True,
               rows: Optional[Callable[[pafs.FileSystem, str], int]] = None, replace_all: bool = False) -> dict:
        """Publish the staged files as the output at ``location``; return the manifest.

        ``checksums`` records each file's sha256 (known from ``write``, else read back once; off for large outputs
        that are not read whole);
        ``rows(fs, path)`` records a per-file row count; ``replace_all`` also deletes what this protocol did not write
        (a batch output replaced whole), where otherwise only earlier attempts' directories are removed.
        """
        fs, root = self.fs, self.root
        staged = [info for info in fs.get_file_info(pafs.FileSelector(self.staging, recursive=True))
                  if info.type == pafs.FileType.File]
        files = {}
        for info in sorted(staged, key=lambda i: i.path):
            name = posixpath.relpath(info.path, self.staging)
            entry = {"path": _committed_name(name, self.id), "bytes": info.size}
            if checksums:
                entry["sha256"] = self.written.get(name) or _sha256(fs, info.path)
            if rows is not None:
                entry["rows"] = rows(fs, info.path)
            files[name] = entry
        for name, entry in files.items():  # step 2: beside the manifest, under names no other attempt uses
            target = posixpath.join(root, entry["path"])
            fs.create_dir(posixpath.dirname(target), recursive=True)
            _move_file(fs, self.path(name), target)
        manifest = {"format": FORMAT, "version": VERSION, "attempt": self.id,
                    "committed_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "files": files, "meta": meta or {}}
        staged_manifest = posixpath.join(root, STAGING, f"{MANIFEST}-{self.id}")
        with fs.open_output_stream(staged_manifest) as f:
            f.write(json.dumps(manifest, indent=1, sort_keys=True).encode())
        _move_file(fs, staged_manifest, posixpath.join(root, MANIFEST))  # step 3: the commit point
        for info in fs.get_file_info(pafs.FileSelector(root)):  # step 4: earlier attempts, then all staging
            name = posixpath.basename(info.path)
            if name not in (MANIFEST, STAGING, self.id) and (replace_all or _ATTEMPT.fullmatch(name)):
                _delete(fs, info.path)
        fs.delete_dir_contents(posixpath.join(root, STAGING), missing_dir_ok=True)
        _delete(fs, posixpath.join(root, STAGING))
        return manifest


def _move_file(fs: pafs.FileSystem, source: str, target: str) -> None:
    """One file to another name, the target appearing whole: a rename on a local disk; a server-side copy (itself
    an atomic single-object write) and a delete on an object store, which has no rename."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.move(source, target)
    else:
        fs.copy_file(source, target)
        fs.delete_file(source)


def _delete(fs: pafs.FileSystem, path: str) -> None:
    info = fs.get_file_info(path)
    try:
        if info.type == pafs.FileType.File:
            fs.delete_file(path)
        elif info.type == pafs.FileType.Directory:
            fs.delete_dir(path)
    except FileNotFoundError:
        pass


def begin(location: str) -> Attempt:
    """Start a write to ``location`` (a local path or object-store URI)."""
    fs, root = storage.filesystem(location)
    attempt = Attempt(location, fs, root, uuid.uuid4().hex[:12])
    try:
        fs.create_dir(attempt.staging, recursive=True)
    except OSError as e:  # read-only, not permitted, not a directory; a store that refuses these credentials
        raise CommitError(f"cannot write to {location!r}: {e}; choose a location this job can write (a directory it "
                          "may create, or a bucket its credentials reach)") from None
    return attempt


# ----------------------------------------------------------------------------------------------------------------
# Reading


def _manifest_or_none(fs: pafs.FileSystem, root: str) -> Optional[dict]:
    """The manifest at ``root``; None when there is none, or it is an empty ``_SUCCESS`` (Hadoop's marker, which
    lists nothing)."""
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as f:
            raw = f.read()
    except (FileNotFoundError, IsADirectoryError):
        return None
    except OSError as e:
        if fs.get_file_info(posixpath.join(root, MANIFEST)).type == pafs.FileType.NotFound:
            return None
        raise CommitError(f"cannot read the manifest {MANIFEST} at {root!r}: {e}") from None
    if not raw.strip():
        return None
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise CommitError(f"the manifest {MANIFEST} at {root!r} is not valid JSON ({e}); re-run the job that "
                          "wrote it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"),
                                                                                           dict):
        raise CommitError(f"{MANIFEST} at {root!r} is not a {FORMAT} manifest")
    if manifest.get("version") != VERSION:
        raise CommitError(f"{MANIFEST} at {root!r} has version {manifest.get('version')!r}; this raystack reads "
                          f"version {VERSION}")
    for name, entry in manifest["files"].items():
        if not _valid_entry(entry):
            raise CommitError(f"{MANIFEST} at {root!r} lists {name!r} as {entry!r}: each file needs a relative 'path' "
                              "inside the output (no '..') and a 'bytes' count; re-run the job that wrote it")
    return manifest


def _valid_entry(entry) -> bool:
    """A manifest's file entry: a relative path that stays inside the output, and a size (a checksum and a row count
    when present of the right type); a crafted manifest must not point a reader anywhere else."""
    if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
        return False
    path, size = entry["path"], entry.get("bytes")
    inside = bool(path) and not path.startswith("/") and ".." not in path.split("/") and "\\" not in path
    return (inside and isinstance(size, int) and not isinstance(size, bool) and size >= 0
            and isinstance(entry.get("sha256", ""), str)
            and (entry.get("rows") is None or (isinstance(entry["rows"], int) and not isinstance(entry["rows"], bool))))


def read_manifest(location: str) -> Optional[dict]:
    """The manifest of the output at ``location``, or None when nothing was committed there."""
    fs, root = storage.filesystem(location)
    return _manifest_or_none(fs, root)


def _check(fs: pafs.FileSystem, root: str, manifest: dict, name: str, data: Optional[bytes] = None) -> None:
    entry = manifest["files"][name]
    path = posixpath.join(root, entry["path"])
    size = len(data) if data is not None else fs.get_file_info(path).size
    if size is None:
        raise FileNotFoundError(path)
    if size != entry["bytes"]:
        raise _Torn(f"{entry['path']} has {size} bytes, its manifest says {entry['bytes']}")
    if data is not None and "sha256" in entry and hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise _Torn(f"{entry['path']} does not match its manifest's sha256")


class _Torn(Exception):
    pass


def _consistent(location: str, read: Callable[[pafs.FileSystem, str, dict], object], retries: int = 5):
    """Run ``read(fs, root, manifest)`` against one manifest, starting again when a newer commit replaced the
    output mid-read; ``CommitError`` when nothing is committed or the files do not match an unchanged manifest."""
    fs, root = storage.filesystem(location)
    for attempt in range(retries):
        manifest = _manifest_or_none(fs, root)
        if manifest is None:
            raise CommitError(f"{location!r} holds no committed output (no {MANIFEST} manifest): it was never "
                              "written, or its writer did not finish; re-run the job that writes it")
        try:
            return manifest, read(fs, root, manifest)
        except (FileNotFoundError, _Torn) as e:
            if (_manifest_or_none(fs, root) or {}).get("attempt") == manifest["attempt"]:
                raise CommitError(f"{location!r} is torn: {e}; re-run the job that writes it") from None
            time.sleep(0.05 * (attempt + 1))  # a newer output was committed while we read: read that one
    raise CommitError(f"{location!r} kept changing while being read ({retries} commits in a row)")


def _require(location: str, manifest: dict, names: list[str]) -> None:
    missing = [n for n in names if n not in manifest["files"]]
    if missing:
        raise CommitError(f"{location!r} has no {missing} (it holds {sorted(manifest['files'])})")


def read_files(location: str, names: list[str]) -> tuple[dict, dict[str, bytes]]:
    """``(manifest, {name: bytes})`` for the named files of the committed output at ``location``, each checked
    against the manifest; ``CommitError`` naming what is missing or torn."""
    def read(fs, root, manifest):
        _require(location, manifest, names)
        out = {}
        for name in names:
            try:
                with fs.open_input_stream(posixpath.join(root, manifest["files"][name]["path"])) as f:
                    out[name] = f.read()
            except OSError as e:
                raise FileNotFoundError(f"{manifest['files'][name]['path']}: {e}") from None
            _check(fs, root, manifest, name, out[name])
        return out
    return _consistent(location, read)


def check_sizes(location: str, names: list[str]) -> dict:
    """The manifest of the committed output at ``location``, once the named files are there at the sizes it lists
    (nothing is read); ``CommitError`` naming what is missing or torn."""
    def read(fs, root, manifest):
        _require(location, manifest, names)
        for name in names:
            _check(fs, root, manifest, name)
    return _consistent(location, read)[0]


def listed_paths(fs: pafs.FileSystem, root: str) -> Optional[list[str]]:
    """The full paths (inside ``fs``) of the files the manifest at ``root`` lists, sizes checked; None when there
    is no manifest. For readers that stream the files themselves (parquet)."""
    manifest = _manifest_or_none(fs, root)
    if manifest is None:
        return None
    for name in manifest["files"]:
        try:
            _check(fs, root, manifest, name)
        except (FileNotFoundError, _Torn) as e:
            raise CommitError(f"{root!r} is torn or being replaced: {e}; re-run the job that writes it, or read it "
                              "again once that job has finished") from None
    return sorted(posixpath.join(root, entry["path"]) for entry in manifest["files"].values())


def is_hidden(relative: str) -> bool:
    """Whether a path inside a directory is not data: any part starting with ``.``, the ``_temporary`` staging
    directory, or the markers ``_SUCCESS``, ``_metadata``, ``_common_metadata``."""
    parts = relative.split("/")
    return (any(p.startswith(".") for p in parts) or STAGING in parts[:-1]
            or parts[-1] in (MANIFEST, "_metadata", "_common_metadata"))


def has_data(location: str) -> bool:
    """Whether ``location`` holds an output: a manifest, or any visible file (staging leftovers do not count)."""
    fs, root = storage.filesystem(location)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return False
    if info.type == pafs.FileType.File:
        return True
    if _manifest_or_none(fs, root) is not None:
        return True
    return any(info.type == pafs.FileType.File and not is_hidden(posixpath.relpath(info.path, root))
               for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)))
