"""The commit protocol (raystack.commit): a crash between any two steps leaves the old output or the new one."""

import json
import os

import pyarrow.fs as pafs
import pytest

from raystack import commit, storage
from raystack.config import ConfigError
from raystack.data import DataError, resolve_source


class Crash(Exception):
    pass


class CrashingFileSystem:
    """A real local filesystem that dies before its ``crash_at``-th change (write, copy, move, delete, mkdir). Not a
    ``LocalFileSystem`` to ``raystack.commit``, so it takes the object-store path: copy then delete, no rename."""

    CHANGES = {"open_output_stream", "move", "delete_file", "delete_dir", "delete_dir_contents", "create_dir",
               "copy_file"}

    def __init__(self, crash_at: int):
        self.real, self.crash_at, self.changes = pafs.LocalFileSystem(), crash_at, 0

    def __getattr__(self, name):
        method = getattr(self.real, name)
        if name not in self.CHANGES:
            return method

        def change(*args, **kwargs):
            if self.changes == self.crash_at:
                raise Crash(f"crash before change {self.changes}: {name}{args}")
            self.changes += 1
            return method(*args, **kwargs)
        return change


def write(location: str, files: dict[str, bytes], fs=None, **commit_args) -> dict:
    attempt = commit.begin(location)
    if fs is not None:
        attempt.fs = fs
    for name, data in files.items():
        attempt.write(name, data)
    return attempt.commit(meta={"files": sorted(files)}, **commit_args)


def read(location: str) -> dict[str, bytes]:
    manifest = commit.read_manifest(location)
    return commit.read_files(location, sorted(manifest["files"]))[1]


OLD = {"a.txt": b"old a", "b/c.txt": b"old c"}
NEW = {"a.txt": b"new a, longer", "d.txt": b"new d"}


@pytest.mark.parametrize("replace_all", [False, True])
def test_a_crash_between_any_two_steps_leaves_the_old_output_or_the_new_one(tmp_path, replace_all):
    location = str(tmp_path / "out")
    write(location, OLD)
    seen, crash_at = set(), 0
    while True:
        try:
            write(location, NEW, fs=CrashingFileSystem(crash_at), replace_all=replace_all)
        except Crash:
            contents = read(location)
            assert contents in (OLD, NEW), f"crash at change {crash_at} left {contents}"
            seen.add("old" if contents == OLD else "new")
            crash_at += 1
            continue
        break
    assert crash_at >= 8 and seen == {"old", "new"}  # crashes landed before and after the commit point
    # The crashed attempts left staging and orphans behind; the next commit removes them all.
    manifest = write(location, NEW, replace_all=replace_all)
    assert read(location) == NEW
    assert sorted(os.listdir(location)) == sorted(["_SUCCESS", manifest["attempt"]])


def test_readers_trust_only_the_manifest(tmp_path):
    location = tmp_path / "out"
    assert not commit.has_data(str(location))
    with pytest.raises(commit.CommitError, match="no committed output"):
        commit.read_files(str(location), ["a.txt"])
    manifest = write(str(location), OLD)
    assert manifest["files"]["a.txt"]["bytes"] == len(OLD["a.txt"])
    assert json.loads((location / "_SUCCESS").read_text())["meta"] == {"files": sorted(OLD)}
    # A stale attempt and a file a crash left outside any manifest are not data.
    (location / "_temporary" / "0123456789ab").mkdir(parents=True)
    (location / "_temporary" / "0123456789ab" / "x.txt").write_bytes(b"stale")
    fs, paths = resolve_source(str(location))
    assert [os.path.relpath(p, location) for p in paths] == sorted(
        os.path.join(manifest["attempt"], name) for name in OLD)
    with pytest.raises(commit.CommitError, match="has no \\['zzz'\\]"):
        commit.read_files(str(location), ["zzz"])
    # A file changed under an unchanged manifest is torn: refused, never read as the output.
    target = location / manifest["attempt"] / "a.txt"
    target.write_bytes(b"OLD A")  # same size, other bytes: the checksum catches it
    with pytest.raises(commit.CommitError, match="torn: .*sha256"):
        read(str(location))
    target.write_bytes(b"old")
    with pytest.raises(DataError, match="torn or being replaced: .*has 3 bytes, its manifest says 5"):
        resolve_source(str(location))


def test_staging_leftovers_alone_are_no_output_and_a_plain_directory_is_read_whole(tmp_path):
    (tmp_path / "out" / "_temporary" / "0123456789ab").mkdir(parents=True)
    (tmp_path / "out" / "_temporary" / "0123456789ab" / "part.parquet").write_bytes(b"x")
    assert not commit.has_data(str(tmp_path / "out"))
    (tmp_path / "out" / "_SUCCESS").write_bytes(b"")  # Hadoop's empty marker lists nothing: the directory counts
    (tmp_path / "out" / "part-0.parquet").write_bytes(b"y")
    (tmp_path / "out" / ".hidden").write_bytes(b"z")
    assert commit.has_data(str(tmp_path / "out"))
    assert resolve_source(str(tmp_path / "out"))[1] == [str(tmp_path / "out" / "part-0.parquet")]
    assert commit.is_hidden("_temporary/a/b.parquet") and commit.is_hidden("_common_metadata")
    assert not commit.is_hidden("__init__.py") and not commit.is_hidden("pkg/_private.py")


def test_a_reader_that_races_a_commit_reads_one_whole_output(tmp_path, monkeypatch):
    location = str(tmp_path / "out")
    write(location, OLD)
    real = pafs.LocalFileSystem()

    class CommitsMidRead:
        """The first file read triggers a commit of NEW: the reader's manifest goes stale under it."""
        fired = False

        def __getattr__(self, name):
            return getattr(real, name)

        def open_input_stream(self, path):
            if not self.fired and not path.endswith("_SUCCESS"):
                type(self).fired = True
                write(location, NEW)
            return real.open_input_stream(path)

    monkeypatch.setattr(commit.storage, "filesystem", lambda loc: (CommitsMidRead(), str(tmp_path / "out")))
    manifest, files = commit.read_files(location, ["a.txt"])
    assert CommitsMidRead.fired and files == {"a.txt": NEW["a.txt"]} and manifest["meta"]["files"] == sorted(NEW)


@pytest.mark.parametrize("entry", [{"path": "../../etc/passwd", "bytes": 5}, {"path": "/etc/passwd", "bytes": 5},
                                   {"path": "a.txt"}, {"path": "a.txt", "bytes": "5"}, {"path": "a.txt", "bytes": -1},
                                   {"path": "a.txt", "bytes": 5, "sha256": 7}, "a.txt", {"path": ""}])
def test_a_crafted_manifest_is_refused_never_followed(tmp_path, entry):
    location = tmp_path / "out"
    manifest = write(str(location), OLD)
    (location / "_SUCCESS").write_text(json.dumps({**manifest, "files": {"a.txt": entry}}))
    with pytest.raises(commit.CommitError, match="lists 'a.txt' as .* relative 'path' inside the output"):
        commit.read_files(str(location), ["a.txt"])
    with pytest.raises(DataError, match="relative 'path' inside the output"):
        resolve_source(str(location))


def test_a_location_that_cannot_be_written_is_named_before_anything_is_written(tmp_path):
    """A training run's storage_path, a batch job's --output: a CommitError (one line from the CLI), not pyarrow's."""
    (tmp_path / "a-file").write_text("x")
    for location in ("/proc/raystack/out", str(tmp_path / "a-file" / "out")):
        with pytest.raises(commit.CommitError, match=f"cannot write to '{location}': .*choose a location this job can"):
            commit.begin(location)
        with pytest.raises(ConfigError, match=f"storage_path: cannot create '{location}' "):  # a sweep's, a run's
            storage.make_local_dir(location, "storage_path")
