"""Training checkpoints (full state) and the model artifact (what serving and batch inference load).

Checkpoint directory (one per reported checkpoint; Ray Train persists it to ``storage_path`` and keeps the K latest):
    model.safetensors     model weights
    optimizer.pt          AdamW state (tensors and numbers only; read back with ``weights_only=True``)
    rng_rank{R}.pt        each rank's torch RNG states (ranks' files are merged into one directory by Ray Train)
    .metadata             JSON {step, files, ...}, written last: the commit marker. A directory without it, or with a
                          file it lists missing, is refused, so a half-written checkpoint is never loaded.
The LR schedule is a pure function of the step and the data position is the step (``raystack.data.batch_indices``),
so ``step`` completes the state.

Model artifact (a directory, local path or object-store URI):
    config.json           ``ModelConfig`` fields plus ``{"format": "raystack-gpt", "format_version": 1}``
    model.safetensors     weights (never a pickle)
    tokenizer.json        the tokenizer description
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile

import torch
from safetensors.torch import load_file, save_file

from raystack import storage
from raystack.model import GPT, ModelConfig
from raystack.tokenizer import ByteTokenizer

MARKER = ".metadata"
ARTIFACT_FORMAT = "raystack-gpt"
ARTIFACT_VERSION = 1


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
    meta = {"step": step, "files": ["model.safetensors", "optimizer.pt"], **(extra or {})}
    tmp = os.path.join(directory, MARKER + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, MARKER))


def read_checkpoint_meta(directory: str) -> dict:
    marker = os.path.join(directory, MARKER)
    if not os.path.isfile(marker):
        raise CheckpointError(f"checkpoint {directory!r} has no {MARKER} commit marker: it was never completed")
    with open(marker) as f:
        meta = json.load(f)
    missing = [name for name in meta["files"] if not os.path.isfile(os.path.join(directory, name))]
    if missing:
        raise CheckpointError(f"checkpoint {directory!r} is incomplete: {missing} missing")
    return meta


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
    """Write a model artifact to ``uri`` (local path or object-store URI); return the resolved location."""
    fs, path = storage.filesystem(uri)
    fs.create_dir(path, recursive=True)
    config = {"format": ARTIFACT_FORMAT, "format_version": ARTIFACT_VERSION, **model_config.to_dict()}
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "model.safetensors")
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, local)
        with open(local, "rb") as src, fs.open_output_stream(posixpath.join(path, "model.safetensors")) as dst:
            dst.write(src.read())
    with fs.open_output_stream(posixpath.join(path, "tokenizer.json")) as f:
        f.write(json.dumps(ByteTokenizer().to_dict(), indent=2).encode())
    with fs.open_output_stream(posixpath.join(path, "config.json")) as f:  # written last: a complete artifact
        f.write(json.dumps(config, indent=2).encode())
    return uri if storage.is_uri(uri) else path


def export_checkpoint(checkpoint_dir: str, model_config: ModelConfig, uri: str) -> str:
    read_checkpoint_meta(checkpoint_dir)
    return save_artifact(uri, model_config, load_file(os.path.join(checkpoint_dir, "model.safetensors")))


def load_artifact(uri: str, device="cpu", dtype: torch.dtype | None = None) -> tuple[GPT, ByteTokenizer]:
    """The model (in eval mode) and tokenizer of the artifact at ``uri``; ``CheckpointError`` naming what is wrong."""
    fs, path = storage.filesystem(uri)

    def read(name: str) -> bytes:
        try:
            with fs.open_input_stream(posixpath.join(path, name)) as f:
                return f.read()
        except (FileNotFoundError, OSError) as e:
            raise CheckpointError(f"model artifact {uri!r} has no readable {name} ({e})") from None

    try:
        config = json.loads(read("config.json"))
        tokenizer = ByteTokenizer.from_dict(json.loads(read("tokenizer.json")))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"model artifact {uri!r} holds invalid JSON: {e}") from None
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"model artifact {uri!r}: {e}") from None
    if config.pop("format", None) != ARTIFACT_FORMAT:
        raise CheckpointError(f"{uri!r} is not a raystack model artifact (config.json lacks format={ARTIFACT_FORMAT!r})")
    config.pop("format_version", None)
    try:
        model_config = ModelConfig.from_dict(config)
    except ValueError as e:
        raise CheckpointError(f"model artifact {uri!r} has a bad config.json: {e}") from None
    from safetensors.torch import load as load_bytes

    model = GPT(model_config)
    try:
        model.load_state_dict(load_bytes(read("model.safetensors")))
    except Exception as e:  # wrong shapes or a corrupt file
        raise CheckpointError(f"model artifact {uri!r} has weights that do not fit its config: {e}") from None
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tokenizer
