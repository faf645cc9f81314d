"""How much GPU memory the KV cache may take, measured by a profiling run (as vLLM and
nano-vllm do) instead of estimated by a formula.

After the weights are loaded and before the KV cache exists, one rank runs the largest step the
scheduler can hand it: `max_num_batched_tokens` tokens over `max_num_seqs` requests (decode rows
first and the rest as prompt chunks, as a mixed step is laid out), through the real kernels with
a two-block stand-in cache (every block table points at it, nothing is stored), then the logits
of every request and the costliest sampling there is: the sampler's kept work buffers all
allocated at once (a top-k step, then a full-vocabulary top-p + min-p step), penalties with
presence/frequency counts, and the top-20 log-probabilities of every row. The budget is then

    KV = total x gpu_memory_utilization
         - memory in use before the run (weights, CUDA context, other processes)
         - the run's peak of torch allocations above that
         - what the run made outside torch (cuBLAS workspaces, NCCL buffers, modules)
         - RESERVE (the decode CUDA graphs' pool, captured later; allocator fragmentation)

and one INFO line at start-up says every term. Memory figures come from torch.cuda (faked in the
CPU tests). At tp > 1 every rank runs the same step (its collectives must match); only rank 0
samples, and the executor takes the smallest budget of all ranks.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from qwenserve.config import EngineConfig
from qwenserve.model.attention import AttentionMetadata, logn_scales
from qwenserve.model.qwen import NUM_REAL_TOKENS
from qwenserve.sampling_params import MAX_LOGPROBS, SamplingParams
from qwenserve.worker.sampler import Sampler, SamplingState

logger = logging.getLogger(__name__)
GiB = 1024 ** 3
RESERVE_BYTES = 512 * 1024 ** 2


@dataclass
class KVBudget:
    total: int
    utilization: float
    in_use_before: int
    profile_peak: int
    outside_torch: int
    reserve: int
    num_tokens: int
    num_seqs: int

    @property
    def bytes(self) -> int:
        return int(self.total * self.utilization - self.in_use_before - self.profile_peak
                   - self.outside_torch - self.reserve)

    def describe(self, per_block: int, rank: int = 0) -> str:
        def gib(n):
            return f"{n / GiB:.2f} GiB"

        blocks = max(0, self.bytes // per_block)
        return (f"rank {rank}: KV cache budget {gib(self.bytes)} = {gib(self.total)} x "
                f"gpu_memory_utilization {self.utilization:g} - {gib(self.in_use_before)} in use before "
                f"profiling (weights, CUDA context, other processes) - {gib(self.profile_peak)} peak of a "
                f"profiled step ({self.num_tokens} tokens over {self.num_seqs} sequences, costliest "
                f"sampling) - {gib(self.outside_torch)} allocated outside torch - {gib(self.reserve)} "
                f"reserve (CUDA graphs, fragmentation): {blocks} blocks of {per_block / 1024 ** 2:.2f} MiB")


def profile_query_lens(num_tokens: int, num_seqs: int, max_model_len: int) -> list[int]:
    """Query lengths of the profiled step: `num_tokens` over min(num_seqs, num_tokens) requests,
    one token each for the decode rows (first) and the rest in prompt chunks of at most
    max_model_len tokens."""
    num_seqs = min(num_seqs, num_tokens)
    lens = [1] * num_seqs
    extra = num_tokens - num_seqs
    for i in range(num_seqs - 1, -1, -1):  # fill from the last row: decodes stay a prefix
        if extra <= 0:
            break
        add = min(extra, max_model_len - 1)
        lens[i] += add
        extra -= add
    return lens


def costliest_states(num_rows: int, kind: str) -> list[SamplingState]:
    """Sampling states whose step allocates the most: every filter, penalties with presence and
    frequency counts, a min_tokens ban and the most log-probabilities. kind "top_k" takes the
    sampler's candidates path, "full" its full-vocabulary path."""
    filters = dict(top_k=50) if kind == "top_k" else dict(top_p=0.9, min_p=0.05)
    params = SamplingParams(temperature=0.8, repetition_penalty=1.1, presence_penalty=0.1,
                            frequency_penalty=0.1, min_tokens=8, logprobs=MAX_LOGPROBS, **filters)
    return [SamplingState(params, prompt_token_ids=[1, 2, 3], output_token_ids=[4, 5],
                          banned_token_ids=[151643]) for _ in range(num_rows)]


def run_profile_step(model, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                     max_model_len: int, is_driver: bool) -> tuple[int, int]:
    """Runs the profiled step (forward, logits, sampling on the driver rank); returns
    (tokens, sequences)."""
    q_lens = profile_query_lens(config.max_num_batched_tokens, config.max_num_seqs, max_model_len)
    num_tokens, num_seqs = sum(q_lens), len(q_lens)
    mc = model.config
    block_size = config.block_size
    layers = model.attention_layers()
    heads = layers[0].num_heads
    stand_in = torch.zeros((2, block_size, heads, mc.head_dim), dtype=dtype, device=device)
    positions = torch.cat([torch.arange(n, dtype=torch.int64) for n in q_lens]).to(device)
    starts = [0]
    for n in q_lens:
        starts.append(starts[-1] + n)
    width = math.ceil(max(q_lens) / block_size)
    meta = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(q_lens, dtype=torch.int32, device=device),
        max_query_len=max(q_lens), max_seq_len=max(q_lens),
        rope_theta=torch.full((num_tokens,), mc.rope_theta(1.0), dtype=torch.float32, device=device),
        logn_scale=logn_scales(positions.cpu(), mc.seq_length).to(device) if mc.use_logn_attn else None,
        block_tables=torch.ones((num_seqs, width), dtype=torch.int32, device=device),
        slot_mapping=torch.full((num_tokens,), -1, dtype=torch.int64, device=device),
        num_decodes=sum(1 for n in q_lens if n == 1) if max(q_lens) > 1 else 0,
        query_start_loc_list=starts, seq_lens_list=q_lens)
    for layer in layers:
        layer.k_cache, layer.v_cache = stand_in, stand_in
    try:
        with torch.inference_mode():
            hidden = model(torch.zeros(num_tokens, dtype=torch.int64, device=device), positions, meta)
            last = torch.tensor(starts[1:], device=device) - 1
            logits = model.compute_logits(hidden.index_select(0, last))
            del hidden
            if is_driver:
                sampler = Sampler(vocab_size_real=min(NUM_REAL_TOKENS, mc.vocab_size), seed=0)
                for kind in ("top_k", "full"):  # both paths' kept buffers end up allocated together
                    sampler.sample(logits, costliest_states(num_seqs, kind))
                del sampler
            del logits
    finally:
        for layer in layers:
            layer.k_cache = layer.v_cache = None
    return num_tokens, num_seqs


def profile_kv_budget(model, config: EngineConfig, device: torch.device, dtype: torch.dtype,
                      max_model_len: int, is_driver: bool, per_block: int, rank: int = 0) -> KVBudget:
    """Measures the KV budget on a CUDA device (see the module docstring) and logs it."""
    cuda = torch.cuda
    cuda.synchronize(device)
    cuda.empty_cache()
    free_before, total = cuda.mem_get_info(device)
    allocated_before, reserved_before = cuda.memory_allocated(device), cuda.memory_reserved(device)
    cuda.reset_peak_memory_stats(device)
    num_tokens, num_seqs = run_profile_step(model, config, device, dtype, max_model_len, is_driver)
    cuda.synchronize(device)
    peak = cuda.max_memory_allocated(device) - allocated_before
    free_after, _ = cuda.mem_get_info(device)
    outside_torch = max(0, (free_before - free_after) - (cuda.memory_reserved(device) - reserved_before))
    cuda.empty_cache()
    budget = KVBudget(total=total, utilization=config.gpu_memory_utilization,
                      in_use_before=total - free_before, profile_peak=max(0, peak),
                      outside_torch=outside_torch, reserve=RESERVE_BYTES, num_tokens=num_tokens,
                      num_seqs=num_seqs)
    logger.info(budget.describe(per_block, rank))
    return budget
