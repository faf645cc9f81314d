"""How a GPU worker sizes its KV cache and picks its dtype, checked on the CPU: the profiled step
(worker/memory_profile.py) runs the real model and sampler on the CPU, and the CUDA memory figures
and device properties are faked (monkeypatched torch.cuda functions)."""
import logging

import pytest
import torch

from qwenserve.config import EngineConfig
from qwenserve.model.config import QwenConfig
from qwenserve.sampling_params import MAX_LOGPROBS
from qwenserve.worker import memory_profile
from qwenserve.worker.memory_profile import KVBudget, profile_kv_budget, profile_query_lens
from qwenserve.worker.sampler import Sampler
from qwenserve.worker.worker import resolve_dtype

GiB = 1024 ** 3


@pytest.mark.parametrize("tokens,seqs,max_len", [(8192, 256, 8192), (300, 40, 2048), (10, 40, 2048),
                                                  (20000, 4, 8192), (64, 64, 32)])
def test_profile_query_lens(tokens, seqs, max_len):
    lens = profile_query_lens(tokens, seqs, max_len)
    assert sum(lens) == tokens and len(lens) == min(seqs, tokens)
    assert max(lens) <= max(1, max_len)
    decodes = [n for n in lens if n == 1]
    assert lens[:len(decodes)] == decodes  # decode rows first, as the runner orders them


class FakeCudaMemory:
    """torch.cuda's memory functions, with figures set by the test."""

    def __init__(self, monkeypatch, free_before, free_after, total, allocated, reserved_before,
                 reserved_after, peak):
        self.free = [free_before, free_after]
        self.reserved = [reserved_before, reserved_after]
        self.calls = []
        for name, fn in dict(
                synchronize=lambda device=None: None, empty_cache=lambda: None,
                mem_get_info=lambda device=None: (self.free.pop(0), total),
                memory_allocated=lambda device=None: allocated,
                memory_reserved=lambda device=None: self.reserved.pop(0),
                reset_peak_memory_stats=lambda device=None: self.calls.append("reset"),
                max_memory_allocated=lambda device=None: peak).items():
            monkeypatch.setattr(torch.cuda, name, fn)


def test_budget_from_the_measured_figures_and_its_log_line(tiny_model, monkeypatch, caplog):
    fake = FakeCudaMemory(monkeypatch, free_before=100 * GiB, free_after=97 * GiB, total=140 * GiB,
                          allocated=15 * GiB, reserved_before=16 * GiB, reserved_after=18 * GiB,
                          peak=int(17.5 * GiB))
    config = EngineConfig(max_num_batched_tokens=64, max_num_seqs=8, gpu_memory_utilization=0.9)
    with caplog.at_level(logging.INFO, logger="qwenserve.worker.memory_profile"):
        budget = profile_kv_budget(tiny_model, config, torch.device("cpu"), torch.float32, 2048,
                                   is_driver=True, per_block=2 * 1024 ** 2, rank=0)
    assert fake.calls == ["reset"]
    # 140 x 0.9 - 40 in use - 2.5 peak above the 15 allocated - (3 - 2) outside torch - 0.5 reserve
    assert budget.bytes == int(126 * GiB - 40 * GiB - 2.5 * GiB - 1 * GiB - 0.5 * GiB)
    assert (budget.num_tokens, budget.num_seqs) == (64, 8)
    line = caplog.records[-1].getMessage()
    for part in ("KV cache budget 82.00 GiB", "140.00 GiB x gpu_memory_utilization 0.9",
                 "40.00 GiB in use", "2.50 GiB peak", "64 tokens over 8 sequences", "1.00 GiB allocated outside",
                 "0.50 GiB reserve", f"{int(82 * GiB) // (2 * 1024 ** 2)} blocks of 2.00 MiB"):
        assert part in line, (part, line)


def _spy_profile(model, monkeypatch, config, is_driver=True):
    forwards, samples = [], []
    original_forward = model.forward

    def forward(input_ids, positions, meta):
        forwards.append((input_ids.shape[0], list(meta.query_start_loc_list), meta.num_decodes,
                         meta.slot_mapping.tolist(), [layer.k_cache.shape[0] for layer in model.attention_layers()]))
        return original_forward(input_ids, positions, meta)

    original_sample = Sampler.sample

    def sample(self, logits, states):
        samples.append((tuple(logits.shape), states))
        return original_sample(self, logits, states)

    monkeypatch.setattr(model, "forward", forward)
    monkeypatch.setattr(Sampler, "sample", sample)
    tokens, seqs = memory_profile.run_profile_step(model, config, torch.device("cpu"), torch.float32,
                                                   2048, is_driver)
    monkeypatch.undo()
    return tokens, seqs, forwards, samples


def test_profiled_step_is_the_largest_step_and_the_costliest_sampling(tiny_model, monkeypatch):
    config = EngineConfig(max_num_batched_tokens=300, max_num_seqs=40, block_size=16)
    tokens, seqs, forwards, samples = _spy_profile(tiny_model, monkeypatch, config)
    assert (tokens, seqs) == (300, 40)
    (num_tokens, qsl, num_decodes, slots, cache_blocks), = forwards
    assert num_tokens == 300 and len(qsl) == 41 and num_decodes == 39
    assert set(slots) == {-1}  # nothing is written into the stand-in cache
    assert set(cache_blocks) == {2}
    assert all(layer.k_cache is None for layer in tiny_model.attention_layers())  # unbound again
    # Rank 0 samples every request twice: the candidates path, then the full-vocabulary path,
    # with every penalty, a ban, and the most log-probabilities.
    vocab = tiny_model.config.vocab_size
    assert [shape for shape, _ in samples] == [(40, vocab), (40, vocab)]
    top_k, full = samples[0][1][0].params, samples[1][1][0].params
    assert top_k.top_k == 50 and full.top_p < 1.0 and full.min_p > 0.0
    for p in (top_k, full):
        assert p.logprobs == MAX_LOGPROBS and p.repetition_penalty != 1.0
        assert p.presence_penalty and p.frequency_penalty and p.min_tokens > 2
    # Other ranks run the same forward (their collectives must match) and do not sample.
    _, _, forwards_1, samples_1 = _spy_profile(tiny_model, monkeypatch, config, is_driver=False)
    assert [f[:3] for f in forwards_1] == [f[:3] for f in forwards] and samples_1 == []


def test_profiled_step_through_the_triton_kernels(tiny_checkpoint):
    """The stand-in cache and block tables work through the Triton path too (interpreted here):
    a mixed step of decode rows and prompt chunks."""
    from qwenserve.kernels import get_ops
    from qwenserve.model.loader import load_weights
    from qwenserve.model.qwen import QWenLMHeadModel

    model = QWenLMHeadModel(QwenConfig.from_dir(tiny_checkpoint), get_ops(True), torch.float32)
    load_weights(model, tiny_checkpoint)
    config = EngineConfig(max_num_batched_tokens=40, max_num_seqs=6, block_size=16)
    assert memory_profile.run_profile_step(model.eval(), config, torch.device("cpu"), torch.float32,
                                           2048, is_driver=True) == (40, 6)


def test_worker_uses_the_profiled_budget(tiny_checkpoint, monkeypatch):
    from qwenserve.worker import worker as worker_module

    worker = worker_module.Worker(EngineConfig(device="cpu", max_num_seqs=4), tiny_checkpoint)
    worker.model = object()
    worker.device = torch.device("cuda", 0)
    per_block = worker_module.kv_bytes_per_block(worker.model_config, 16, worker.dtype, 1)
    seen = {}

    def fake_profile(model, config, device, dtype, max_model_len, is_driver, per_block, rank):
        seen.update(device=device, is_driver=is_driver, per_block=per_block)
        return KVBudget(total=100 * per_block, utilization=1.0, in_use_before=10 * per_block,
                        profile_peak=5 * per_block, outside_torch=0, reserve=0, num_tokens=1, num_seqs=1)

    monkeypatch.setattr(worker_module, "profile_kv_budget", fake_profile)
    assert worker.determine_num_blocks() == 85
    assert seen == dict(device=torch.device("cuda", 0), is_driver=True, per_block=per_block)
    monkeypatch.setattr(worker_module, "profile_kv_budget", lambda *a, **k: KVBudget(
        total=per_block, utilization=1.0, in_use_before=0, profile_peak=0, outside_torch=0, reserve=0,
        num_tokens=1, num_seqs=1))
    with pytest.raises(ValueError, match="fewer than 2 blocks"):
        worker.determine_num_blocks()


# ---------------------------------------------------------------- dtype
def _model_config(torch_dtype):
    return QwenConfig.from_dict({"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2,
                                 "intermediate_size": 512, "vocab_size": 1024, "torch_dtype": torch_dtype},
                                source="test")


@pytest.fixture
def gpu(monkeypatch):
    """A fake GPU of the compute capability the test sets."""
    state = {"capability": (8, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: state["capability"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    return state


def test_bfloat16_asked_for_on_a_pre_ampere_gpu_is_a_clear_error(gpu):
    gpu["capability"] = (7, 5)
    with pytest.raises(ValueError, match=r"^dtype: bfloat16 needs a GPU of compute capability 8\.0.*"
                                         r"Tesla T4 \(compute capability 7\.5\).*dtype='float16'"):
        resolve_dtype(EngineConfig(dtype="bfloat16"), _model_config("bfloat16"), torch.device("cuda", 0))
    assert resolve_dtype(EngineConfig(dtype="float16"), _model_config("bfloat16"),
                         torch.device("cuda", 0)) == torch.float16


def test_auto_picks_float16_on_a_pre_ampere_gpu_and_says_so(gpu, caplog):
    gpu["capability"] = (7, 0)
    with caplog.at_level(logging.WARNING, logger="qwenserve.worker.worker"):
        dtype = resolve_dtype(EngineConfig(dtype="auto"), _model_config("bfloat16"), torch.device("cuda", 0))
    assert dtype == torch.float16
    assert "running in float16" in caplog.text and "Tesla T4 (compute capability 7.0)" in caplog.text


def test_bfloat16_on_ampere_and_newer_and_on_the_cpu(gpu):
    for capability in ((8, 0), (9, 0)):
        gpu["capability"] = capability
        for dtype in ("auto", "bfloat16"):
            assert resolve_dtype(EngineConfig(dtype=dtype), _model_config("bfloat16"),
                                 torch.device("cuda", 0)) == torch.bfloat16
    gpu["capability"] = (7, 5)  # never asked about on the CPU
    assert resolve_dtype(EngineConfig(dtype="bfloat16"), _model_config("bfloat16"), torch.device("cpu")) == torch.bfloat16
    assert resolve_dtype(EngineConfig(dtype="auto"), _model_config("bfloat16"), torch.device("cpu")) == torch.float32
