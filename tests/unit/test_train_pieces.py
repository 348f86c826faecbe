"""Training pieces without Ray: LR schedule, global-batch weighting, checkpoints and artifacts."""

import contextlib
import json
import os

import pytest
import torch

from raystack.checkpoint import (CheckpointError, load_artifact, load_checkpoint, save_artifact, save_checkpoint)
from raystack.model import GPT, ModelConfig
from raystack.train import OptimSection, build_optimizer, lr_at, rank_slice, train_step


def test_lr_warms_up_then_decays_to_the_floor():
    cfg = OptimSection(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    lrs = [lr_at(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_rank_slices_cover_the_global_batch_once():
    for world in (1, 2, 3, 5):
        covered = [i for r in range(world) for i in range(16)[rank_slice(16, r, world)]]
        assert covered == list(range(16))


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_gradient_is_the_global_mean_whatever_the_world_size():
    """Two simulated ranks (DDP averages their gradients) give one rank's gradient on the whole batch."""
    torch.manual_seed(0)
    cfg = OptimSection(batch_size=6, micro_batch_size=2, grad_clip=0.0)
    blocks = torch.randint(0, 257, (6, 17))
    no_autocast = contextlib.nullcontext

    def grads_for(world):
        per_rank = []
        for rank in range(world):
            torch.manual_seed(1)
            model = GPT(ModelConfig.from_preset("tiny"))
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: keep the weights, read the grads
            optimizer.step = lambda: None
            optimizer.zero_grad = lambda set_to_none=True: None
            train_step(model, optimizer, blocks[rank_slice(6, rank, world)], cfg, world, no_autocast)
            per_rank.append(_grads(model))
        return torch.stack(per_rank).mean(0)

    torch.testing.assert_close(grads_for(2), grads_for(1), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads_for(3), grads_for(1), rtol=1e-5, atol=1e-7)


def test_checkpoint_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny"))
    optimizer = build_optimizer(model, OptimSection())
    model.loss(torch.randint(0, 257, (2, 9))).backward()
    optimizer.step()
    save_checkpoint(str(tmp_path), step=42, model=model, optimizer=optimizer, rank=0)
    expected_draw = torch.rand(3)

    restored = GPT(ModelConfig.from_preset("tiny"))
    restored_opt = build_optimizer(restored, OptimSection())
    meta = load_checkpoint(str(tmp_path), restored, restored_opt)
    assert meta["step"] == 42 and meta["rng_restored"]
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where it was saved
    for a, b in zip(model.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert restored_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_a_checkpoint_without_its_commit_marker_is_never_loaded(tmp_path):
    model = GPT(ModelConfig.from_preset("tiny"))
    save_checkpoint(str(tmp_path), 1, model, build_optimizer(model, OptimSection()))
    os.remove(tmp_path / ".metadata")
    with pytest.raises(CheckpointError, match="commit marker"):
        load_checkpoint(str(tmp_path), model)
    save_checkpoint(str(tmp_path), 1, model, build_optimizer(model, OptimSection()))
    os.remove(tmp_path / "optimizer.pt")
    with pytest.raises(CheckpointError, match="incomplete"):
        load_checkpoint(str(tmp_path), model)


def test_artifact_round_trip_and_clear_errors(tmp_path):
    config = ModelConfig.from_preset("tiny")
    model = GPT(config)
    location = save_artifact(str(tmp_path / "art"), config, model.state_dict())
    assert sorted(os.listdir(location)) == ["config.json", "model.safetensors", "tokenizer.json"]
    loaded, tokenizer = load_artifact(location)
    tokens = torch.tensor([tokenizer.encode("hello")])
    torch.testing.assert_close(loaded(tokens), model.eval()(tokens))

    with pytest.raises(CheckpointError, match="no readable config.json"):
        load_artifact(str(tmp_path / "nowhere"))
    cfg = json.loads((tmp_path / "art" / "config.json").read_text())
    (tmp_path / "art" / "config.json").write_text(json.dumps({**cfg, "n_layer": 3}))
    with pytest.raises(CheckpointError, match="weights that do not fit"):
        load_artifact(location)
