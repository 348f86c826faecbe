"""The model runner alone, without the engine's scheduler: rows are plain objects, as the contract says."""

from dataclasses import dataclass, field
from typing import Optional

import torch

from raystack.engine import EngineConfig, GenerationParams
from raystack.model import GPT, ModelConfig
from raystack.runner import ModelRunner


@dataclass
class Row:
    id: int
    slot: int
    prompt: list[int]
    params: GenerationParams
    seed: int = 0
    generated: list[int] = field(default_factory=list)
    bias: Optional[torch.Tensor] = None
    counts: Optional[torch.Tensor] = None
    cached: int = 0

    @property
    def context(self) -> list[int]:
        return self.prompt + self.generated

    @property
    def position(self) -> int:
        return len(self.prompt) + len(self.generated) - 1


def test_a_step_prefills_decodes_and_samples_rows_it_is_handed():
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", max_seq_len=64)).eval()
    _steps_equal_the_whole_forward(model, ModelRunner(model, EngineConfig(max_batch_size=4)))


class RecordingEvent:
    """Stands in for a ``torch.cuda.Event``: logs its calls."""

    def __init__(self, log: list, name: str):
        self.log, self.name = log, name

    def synchronize(self):
        self.log.append((self.name, "wait"))

    def record(self):
        self.log.append((self.name, "record"))


def test_the_cuda_staging_path_gives_the_same_steps_and_refills_a_buffer_only_after_its_copy():
    """The CUDA path's code, run on CPU: decode through ``DecodeGraphs`` (its fixed-shape step run eagerly) and the
    step's integers through staging buffers, with events that log their calls. Every step gives what the whole
    forward gives, and each buffer waits for its last copy before it is refilled and records after each copy."""
    from raystack.decode_graphs import DecodeGraphs

    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", max_seq_len=64)).eval()
    runner = ModelRunner(model, EngineConfig(max_batch_size=4))
    log: list = []
    runner.graphs = DecodeGraphs(runner.model, runner.cache, capture=False)
    runner.graphs._copied = RecordingEvent(log, "inputs")
    runner._pinned = {name: (torch.zeros(4, dtype=torch.int64), RecordingEvent(log, name))
                      for name in ("rows", "step")}
    _steps_equal_the_whole_forward(model, runner)
    # a prefill step (sampling only), then three decodes over slots 0, 2, 3 (slot 1 idle: the rows' index staged)
    decode = [("inputs", "wait"), ("inputs", "record"), ("rows", "wait"), ("rows", "record"), ("step", "wait"),
              ("step", "record")]
    assert log == [("step", "wait"), ("step", "record")] + decode * 3


def _steps_equal_the_whole_forward(model, runner):
    greedy = GenerationParams(temperature=0.0, logprobs=True, top_logprobs=2)
    rows = [Row(0, 0, list(b"def f(x):"), greedy), Row(1, 2, list(b"import os"), greedy),
            Row(2, 3, list(b"class A"), GenerationParams(temperature=0.0))]

    def check(results) -> None:
        """Each row's token is the argmax of the whole forward over its context, and its log-probability that
        forward's (to float tolerance: a wrong cache position or slot changes it even where the argmax holds)."""
        assert [r for r, _, _ in results] == rows
        for row, token, (logprob, top) in results:
            with torch.no_grad():
                expected = torch.log_softmax(model(torch.tensor([row.context]))[0, -1], -1)
            assert token == int(expected.argmax())
            if row.params.logprobs:
                assert abs(logprob - expected[token].item()) < 1e-4
                assert [t for t, _ in top] == expected.topk(2).indices.tolist()
            else:
                assert (logprob, top) == (None, None)

    results, failures = runner.step(rows, [])  # two prompt lengths: two prefill forwards, one sampling call
    assert not failures
    check(results)
    for _ in range(3):  # decodes over slots 0, 2, 3: read in place, slot 1 an idle row
        for row, token, _ in results:
            row.generated.append(token)
        results, failures = runner.step([], rows)
        assert not failures
        check(results)


def test_a_prefill_over_a_cached_prefix_reads_it_from_the_slot_and_equals_the_whole_forward():
    """Rows whose first ``cached`` tokens are in their slots (prefix caching) feed only the rest: their tokens and
    log-probabilities are the whole forward's over their contexts. Beyond the prefix the slots hold garbage, and the
    rows that share a length but not a cached prefix prefill apart."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", max_seq_len=64)).eval()
    runner = ModelRunner(model, EngineConfig(max_batch_size=4))
    greedy = GenerationParams(temperature=0.0, logprobs=True)
    _, failures = runner.step([Row(0, 1, list(b"def f(x):"), greedy), Row(1, 3, list(b"def g(y):"), greedy)], [])
    assert not failures
    runner.cache.k[:, :, :, 9:] = 1e4  # what a longer sequence left there before: overwritten, never read
    runner.cache.v[:, :, :, 9:] = -1e4
    rows = [Row(2, 1, list(b"def f(x): return x"), greedy, cached=9),
            Row(3, 3, list(b"def g(y): pass!!!!"), greedy, cached=9),
            Row(4, 0, list(b"def f(x): return x"), greedy)]
    results, failures = runner.step(rows, [])
    assert not failures and [r for r, _, _ in results] == rows
    for row, token, (logprob, _) in results:
        with torch.no_grad():
            expected = torch.log_softmax(model(torch.tensor([row.context]))[0, -1], -1)
        assert token == int(expected.argmax()) and abs(logprob - expected[token].item()) < 1e-4
    runner.cache.v[:, 1, :, :9] = 1.0  # the prefix really is read from the slot: other values, other logits
    again, _ = runner.step([Row(5, 1, list(b"def f(x): return x"), greedy, cached=9)], [])
    assert abs(again[0][2][0] - results[0][2][0]) > 1e-3


def test_a_row_whose_parameters_the_sampler_refuses_fails_alone():
    torch.manual_seed(0)
    runner = ModelRunner(GPT(ModelConfig.from_preset("tiny", max_seq_len=64)), EngineConfig(max_batch_size=2))
    good = Row(0, 0, list(b"abc"), GenerationParams(temperature=0.0))
    bad = Row(1, 1, list(b"abd"), GenerationParams(top_p=0.0))  # out of range: the API layer never sends it
    results, failures = runner.step([good, bad], [])
    assert [r for r, _, _ in results] == [good]
    (row, message, client_error), = failures
    assert row is bad and client_error and "top_p" in message


def test_swapping_two_slots_exchanges_their_first_positions_and_leaves_the_rest():
    """``swap_slots(a, b, n)`` exchanges positions 0..n-1 of two slots, keys and values, every layer; the other slots
    and positions are untouched (the scheduler moves a cached prefix into the lowest free slot this way)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_preset("tiny", max_seq_len=32)).eval()
    runner = ModelRunner(model, EngineConfig(max_batch_size=4))
    for cache in (runner.cache.k, runner.cache.v):
        cache.copy_(torch.randn_like(cache))
    k, v = runner.cache.k.clone(), runner.cache.v.clone()
    runner.swap_slots(3, 1, 20)
    for after, before in ((runner.cache.k, k), (runner.cache.v, v)):
        assert torch.equal(after[:, 1, :, :20], before[:, 3, :, :20])
        assert torch.equal(after[:, 3, :, :20], before[:, 1, :, :20])
        assert torch.equal(after[:, :, :, 20:], before[:, :, :, 20:])
        assert torch.equal(after[:, [0, 2]], before[:, [0, 2]])
    runner.swap_slots(2, 2, 20)
    runner.swap_slots(0, 2, 0)
    assert torch.equal(runner.cache.k[:, [0, 2]], k[:, [0, 2]])
