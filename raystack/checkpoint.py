"""Training checkpoints (full state) and the model artifact (what serving and batch inference load).

Checkpoint directory (one per reported checkpoint; Ray Train persists it to ``storage_path`` and keeps the K latest):
    model.safetensors     model weights
    optimizer.pt          AdamW state (tensors and numbers only; read back with ``weights_only=True``)
    rng_rank{R}.pt        each rank's torch RNG states (ranks' files are merged into one directory by Ray Train)
    .metadata             JSON {step, files, ...}, written last: the commit marker. A directory without it, or with a
                          file it lists missing, is refused, so a half-written checkpoint is never loaded.
The LR schedule is a pure function of the step and the data position is the step (``raystack.data.batch_indices``),
so ``step`` completes the state.

Model artifact (a directory, local path or object-store URI, committed by ``raystack.commit``):
    _SUCCESS                    the manifest, written last: the files below with their sizes and sha256
    <attempt>/config.json       ``ModelConfig`` fields plus ``{"format": "raystack-gpt", "format_version": 1}``
    <attempt>/model.safetensors weights (never a pickle)
    <attempt>/tokenizer.json    the tokenizer, in Hugging Face ``tokenizers`` format (``raystack.tokenizer``)
    <attempt>/tokenizer_config.json  its ``transformers`` config (chat template included): ``AutoTokenizer``
                                loads the attempt directory as it is, or what ``raystack tokenizer`` exports
``load_artifact`` reads only what the manifest lists and checks every checksum: an artifact that was never
committed, or whose files were truncated or replaced, is refused with a ``CheckpointError``; re-exporting to the
same location replaces it at one step.
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import Optional

import pyarrow.fs as pafs
import torch
from safetensors.torch import load, load_file, save, save_file

from raystack import commit, storage
from raystack.model import GPT, ModelConfig
from raystack.tokenizer import ByteTokenizer

MARKER = ".metadata"
ARTIFACT_FORMAT = "raystack-gpt"
ARTIFACT_VERSION = 1
ARTIFACT_FILES = ("config.json", "tokenizer.json", "model.safetensors")  # what loading a model reads
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # ray.train.v2._internal.constants (Ray 2.60)


class CheckpointError(ValueError):
    """A checkpoint or artifact is incomplete, of another format, or unreadable."""


def _state_dict_for_save(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    # Tied embeddings share storage; safetensors refuses shared tensors, and the tie is rebuilt by GPT itself.
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(directory: str, step: int, model=None, optimizer=None, rank: int = 0, extra: dict | None = None):
    """Write this rank's part of a checkpoint; rank 0 also writes the model, optimizer and the commit marker."""
    os.makedirs(directory, exist_ok=True)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, os.path.join(directory, f"rng_rank{rank}.pt"))
    if rank != 0:
        return
    save_file(_state_dict_for_save(model), os.path.join(directory, "model.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    files = ["model.safetensors", "optimizer.pt"]
    meta = {"step": step, "files": files, "bytes": {name: os.path.getsize(os.path.join(directory, name))
                                                     for name in files}, **(extra or {})}
    tmp = os.path.join(directory, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MARKER))


def check_checkpoint(fs: pafs.FileSystem, path: str) -> dict:
    """The metadata of the checkpoint at ``path`` inside ``fs`` (local or object store, nothing downloaded but the
    marker); ``CheckpointError`` unless the marker is there and every file it lists has its recorded size."""
    try:
        with fs.open_input_stream(posixpath.join(path, MARKER)) as f:
            meta = json.loads(f.read())
    except (FileNotFoundError, OSError) as e:
        raise CheckpointError(f"checkpoint {path!r} has no readable {MARKER} commit marker: it was never "
                              f"completed ({e})") from None
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r} has a corrupt {MARKER} ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or not isinstance(meta.get("files"), list):
        raise CheckpointError(f"checkpoint {path!r} has a {MARKER} without step and files")
    infos = fs.get_file_info([posixpath.join(path, name) for name in meta["files"]])
    missing = [name for name, info in zip(meta["files"], infos) if info.type != pafs.FileType.File]
    if missing:
        raise CheckpointError(f"checkpoint {path!r} is incomplete: {missing} missing")
    sizes = meta.get("bytes", {})
    wrong = [f"{name} has {info.size} bytes, not {sizes[name]}" for name, info in zip(meta["files"], infos)
             if name in sizes and info.size != sizes[name]]
    if wrong:
        raise CheckpointError(f"checkpoint {path!r} is torn: {'; '.join(wrong)}")
    return meta


def read_checkpoint_meta(directory: str) -> dict:
    return check_checkpoint(pafs.LocalFileSystem(), os.path.abspath(directory))


def config_differences(meta: dict, expected: dict) -> list[str]:
    """``section.key: checkpoint X, config Y`` for every key of ``expected`` (``{"model": {...}, "data": {...}}``)
    that the checkpoint recorded with another value."""
    out = []
    for section, values in expected.items():
        saved = meta.get(section)
        if not isinstance(saved, dict):
            continue  # a checkpoint from before the section was recorded
        for key in sorted(set(values) | set(saved)):
            if saved.get(key) != values.get(key):
                out.append(f"{section}.{key}: checkpoint {saved.get(key)!r}, config {values.get(key)!r}")
    return out


def list_checkpoints(fs: pafs.FileSystem, run_path: str) -> list[str]:
    """The checkpoint directories (``checkpoint_*``) Ray Train keeps under ``run_path``, newest first."""
    infos = fs.get_file_info(pafs.FileSelector(run_path, allow_not_found=True))
    return sorted((i.path for i in infos if i.type == pafs.FileType.Directory
                   and posixpath.basename(i.path).startswith("checkpoint_")), reverse=True)


def registered_checkpoints(run_location: str) -> Optional[list[str]]:
    """The checkpoints Ray Train registered for the run at ``run_location`` (in its checkpoint-manager snapshot),
    newest first: the ones a re-run resumes from. None when there is no snapshot (a re-run starts afresh); a
    directory Ray Train never registered (an upload a crash cut short) is not among them."""
    fs, run_path = storage.filesystem(run_location)
    try:
        with fs.open_input_stream(posixpath.join(run_path, RAY_TRAIN_SNAPSHOT)) as f:
            snapshot = json.loads(f.read())
    except (FileNotFoundError, OSError):
        return None
    except ValueError as e:
        raise CheckpointError(f"Ray Train's {RAY_TRAIN_SNAPSHOT} under {run_location} is corrupt ({e})") from None
    names = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    return sorted((posixpath.join(run_path, name) for name in names), reverse=True)


def newest_valid_checkpoint(run_location: str) -> tuple[Optional[str], Optional[dict], list[str]]:
    """``(path, meta, problems)``: the newest of the run's registered checkpoints that passes ``check_checkpoint``
    (None when none does, or none is registered) and what was wrong with each newer one."""
    fs, _ = storage.filesystem(run_location)
    problems = []
    for path in registered_checkpoints(run_location) or []:
        try:
            return path, check_checkpoint(fs, path), problems
        except CheckpointError as e:
            problems.append(str(e))
    return None, None, problems


def load_checkpoint(directory: str, model, optimizer=None, rank: int = 0, device="cpu") -> dict:
    """Restore model (and optimizer, and this rank's RNG when present) from ``directory``; return its metadata."""
    meta = read_checkpoint_meta(directory)
    state = load_file(os.path.join(directory, "model.safetensors"), device=str(device))
    model.load_state_dict(state)
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(os.path.join(directory, "optimizer.pt"), map_location=device, weights_only=True))
    rng_path = os.path.join(directory, f"rng_rank{rank}.pt")
    meta["rng_restored"] = os.path.isfile(rng_path)
    if meta["rng_restored"]:
        rng = torch.load(rng_path, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return meta


# ----------------------------------------------------------------------------------------------------------------
# Model artifact


def save_artifact(uri: str, model_config: ModelConfig, weights: dict[str, torch.Tensor]) -> str:
    """Commit a model artifact to ``uri`` (local path or object-store URI); return the resolved location.

    Staged, then published at one step by ``raystack.commit``: a replica that starts while a new artifact is
    exported to the same place loads the old one or the new one, never a mix."""
    config = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **model_config.to_dict()}
    attempt = commit.begin(uri)
    attempt.write("model.safetensors", save({k: v.detach().cpu().contiguous() for k, v in weights.items()}))
    attempt.write("tokenizer.json", json.dumps(ByteTokenizer().to_dict(), indent=2).encode())
    attempt.write("tokenizer_config.json",
                  json.dumps(ByteTokenizer.hf_tokenizer_config(max_length=model_config.max_seq_len), indent=2).encode())
    attempt.write("config.json", json.dumps(config, indent=2).encode())
    attempt.commit(meta={"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION})
    return uri if storage.is_uri(uri) else attempt.root


def export_checkpoint(checkpoint_dir: str, model_config: ModelConfig, uri: str) -> str:
    read_checkpoint_meta(checkpoint_dir)
    return save_artifact(uri, model_config, load_file(os.path.join(checkpoint_dir, "model.safetensors")))


def artifact_tokenizer_files(uri: str) -> dict[str, bytes]:
    """The tokenizer files of the artifact at ``uri`` (tokenizer.json, and tokenizer_config.json when the artifact
    has one: older artifacts do not), checksums checked."""
    try:
        manifest = commit.read_manifest(uri)
        if manifest is None:
            raise CheckpointError(f"{uri!r} is not a committed model artifact (no {commit.MANIFEST} manifest)")
        names = [n for n in ("tokenizer.json", "tokenizer_config.json") if n in manifest["files"]]
        _, files = commit.read_files(uri, names)
    except commit.CommitError as e:
        raise CheckpointError(f"model artifact: {e}") from None
    try:
        ByteTokenizer.from_dict(json.loads(files["tokenizer.json"]))
    except ValueError as e:
        raise CheckpointError(f"model artifact {uri!r}: tokenizer.json: {e}") from None
    if "tokenizer_config.json" not in files:
        files["tokenizer_config.json"] = json.dumps(ByteTokenizer.hf_tokenizer_config(), indent=2).encode()
    if json.loads(files["tokenizer.json"]) != ByteTokenizer().to_dict():  # an older artifact's description
        files["tokenizer.json"] = json.dumps(ByteTokenizer().to_dict(), indent=2).encode()
    return files


def _read_artifact(uri: str, names: list[str]) -> dict[str, bytes]:
    try:
        return commit.read_files(uri, names)[1]
    except commit.CommitError as e:
        raise CheckpointError(f"model artifact: {e}") from None
    except OSError as e:  # an unreachable store, missing credentials
        raise CheckpointError(f"cannot read the model artifact {uri!r}: {e}") from None


def _model_config(uri: str, raw: bytes) -> ModelConfig:
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model artifact {uri!r} holds invalid JSON: {e}") from None
    if not isinstance(config, dict) or config.pop("format", None) != ARTIFACT_FORMAT:
        raise CheckpointError(f"{uri!r} is not a raystack model artifact (config.json lacks format={ARTIFACT_FORMAT!r})")
    config.pop("format_version", None)
    try:
        return ModelConfig.from_dict(config)
    except ValueError as e:
        raise CheckpointError(f"model artifact {uri!r} has a bad config.json: {e}") from None


def artifact_model_config(uri: str) -> ModelConfig:
    """The ``ModelConfig`` of the artifact at ``uri`` (its config.json alone, checksum checked; no weights read)."""
    return _model_config(uri, _read_artifact(uri, ["config.json"])["config.json"])


def check_artifact(uri: str) -> ModelConfig:
    """The ``ModelConfig`` of the artifact at ``uri``, once its files are all there at their manifest's sizes (the
    weights are not read): what can be checked before the processes that load it start."""
    try:
        commit.check_sizes(uri, list(ARTIFACT_FILES))
    except commit.CommitError as e:
        raise CheckpointError(f"model artifact: {e}") from None
    except OSError as e:  # an unreachable store, missing credentials
        raise CheckpointError(f"cannot read the model artifact {uri!r}: {e}") from None
    return artifact_model_config(uri)


def load_artifact(uri: str, device="cpu", dtype: torch.dtype | None = None) -> tuple[GPT, ByteTokenizer]:
    """The model (in eval mode) and tokenizer of the artifact at ``uri``; ``CheckpointError`` naming what is wrong."""
    files = _read_artifact(uri, list(ARTIFACT_FILES))
    try:
        tokenizer = ByteTokenizer.from_dict(json.loads(files["tokenizer.json"]))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model artifact {uri!r} holds invalid JSON: {e}") from None
    except ValueError as e:
        raise CheckpointError(f"model artifact {uri!r}: {e}") from None
    model = GPT(_model_config(uri, files["config.json"]))
    try:
        model.load_state_dict(load(files["model.safetensors"]))
    except Exception as e:  # wrong shapes or a corrupt file
        raise CheckpointError(f"model artifact {uri!r} has weights that do not fit its config: {e}") from None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer
