"""A simulated GPU for measuring the host path without one (benchmarks only, never serving).

Owns four things:

  * the device model: `step_time_s(T, C)`, the time an H100 80GB needs for one step of Qwen-7B
    in bf16 that computes T tokens for sequences holding C context tokens in all after the
    step, and `H100_7B`, the profile it comes from (also the KV-cache capacity);
  * `SimulatedStream`: one CUDA stream. `launch(seconds)` returns at once and queues the work
    behind what is already queued; `record_event()` gives the time the queued work completes
    and `wait_event`/`synchronize` sleep until then (time.sleep releases the GIL, so host
    threads run meanwhile, as they would beside a GPU; the last 0.2 ms is a yielding spin, for
    precision). It keeps every launch's busy interval on CLOCK_MONOTONIC (`time.monotonic`,
    comparable across processes on Linux), so the busy time inside any wall-clock window can
    be computed afterwards;
  * `SimulatedExecutor` and the plug-in `h100_7b_executor` (for `EngineConfig.executor_plugin`
    and `qwenserve launch --executor-plugin benchmarks.simulated_device:h100_7b_executor`):
    the engine's own Worker and ModelRunner (scheduler, KV bookkeeping, input preparation stay
    real, on the built-in tiny model's config and tokenizer, no KV tensors), with the model's
    forward replaced by a launch of the step's modelled time, the sampler by random ordinary
    tokens (ids below 151643, from a generator seeded by the engine seed; a structured row's
    from those its real mask allows, the mask computed as the real sampler does), and the runner's
    device events by events on the simulated stream, so reading a step's samples back waits
    for that step's modelled work and no more (later steps may be queued behind it);
  * the stats file that carries the busy intervals out of a server process (below).

Stats file (`QWENSERVE_SIM_STATS=PATH` in the simulating process's environment; a data-parallel
replica, whose environment also has `QWENSERVE_DP_RANK=i`, simulates a device of its own and
writes `PATH.dp<i>`: `stats_file_path`): append-only
native float64 pairs. A pair (start, end) is one launch's modelled busy interval; a pair
(-1, t) is a marker: every launch made before t is in the file above it. A daemon thread
appends the launches made since its last write plus a marker every `STATS_PERIOD_S`, and once
more when the executor shuts down or the process exits; a reader (`read_stats_file`) waits for
a marker at or after the end of its window, so it never misses work inside the window. Each
write is O(new launches), a few hundred bytes per period.
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import threading
import time
from array import array
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

STATS_ENV = "QWENSERVE_SIM_STATS"
DP_RANK_ENV = "QWENSERVE_DP_RANK"  # set by qwenserve in each data-parallel replica (engine_core/ray_replica.py)
STATS_PERIOD_S = 0.5
_MARKER = -1.0
_SPIN_S = 200e-6
NUM_ORDINARY_TOKENS = 151643  # ids below <|endoftext|>: never a special token
LOGITS_WIDTH = 151936  # Qwen-7B's LM head rows (the padded vocabulary)
MASK_BYTES_PER_ROW = 4746 * 4  # structured_output.vocabulary.MASK_WORDS int32 words
# Per logit of a structured step, beyond the plain greedy argmax over bf16: the fp32 copy (2 read
# + 4 written), the unpacked bool mask (1 written + 1 read), the masked fill (4 + 4), the fp32
# argmax instead of the bf16 one (+2).
MASK_APPLY_BYTES_PER_LOGIT = 18


# ---------------------------------------------------------------- the device model
@dataclass(frozen=True)
class DeviceProfile:
    """One GPU running one model: what a step costs and how much KV cache fits."""

    name: str
    weight_bytes_per_step: float  # every weight but the embedding table, read once per step
    weight_read_bytes_per_s: float  # the measured rate of a CUDA-graphed cuBLAS chain
    linear_flops_per_token: float  # 2 x parameters
    linear_flops_per_s: float
    kv_bytes_per_token: float  # K and V of every layer
    kv_read_bytes_per_s: float
    memory_bytes: float
    memory_utilization: float
    resident_weight_bytes: float
    activation_reserve_bytes: float
    host_to_device_bytes_per_s: float = 25e9  # pinned memory over PCIe 5 x16, in practice

    def step_time_s(self, num_tokens: int, num_context_tokens: int) -> float:
        """Weights read or linear FLOPs, whichever takes longer, plus reading the K/V cache."""
        linears = max(self.weight_bytes_per_step / self.weight_read_bytes_per_s,
                      num_tokens * self.linear_flops_per_token / self.linear_flops_per_s)
        return linears + num_context_tokens * self.kv_bytes_per_token / self.kv_read_bytes_per_s

    def mask_apply_time_s(self, num_rows: int) -> float:
        """A structured step's extra device time: the pinned bitmask [B, 4746] int32 copied to the
        device, and the passes over [B, V] the plain greedy path does not make (bf16 -> fp32 copy,
        bit unpacking to bool, masked fill, argmax over fp32), at the memory's read rate."""
        copy = num_rows * MASK_BYTES_PER_ROW / self.host_to_device_bytes_per_s
        passes = num_rows * LOGITS_WIDTH * MASK_APPLY_BYTES_PER_LOGIT / self.kv_read_bytes_per_s
        return copy + passes

    @property
    def kv_cache_tokens(self) -> int:
        budget = (self.memory_bytes * self.memory_utilization - self.resident_weight_bytes
                  - self.activation_reserve_bytes)
        return int(budget // self.kv_bytes_per_token)


H100_7B = DeviceProfile(
    name="h100-7b", weight_bytes_per_step=14.2e9, weight_read_bytes_per_s=2.55e12,
    linear_flops_per_token=2 * 7.7e9, linear_flops_per_s=600e12,
    kv_bytes_per_token=0.52e6, kv_read_bytes_per_s=2.5e12,
    memory_bytes=80e9, memory_utilization=0.9, resident_weight_bytes=15.4e9, activation_reserve_bytes=2e9)
PROFILES = {H100_7B.name: H100_7B}


def step_time_s(num_tokens: int, num_context_tokens: int) -> float:
    """Seconds of one step on an H100 running Qwen-7B bf16 (profile "h100-7b"): T tokens
    computed, C context tokens of the step's sequences in all, after the step."""
    return H100_7B.step_time_s(num_tokens, num_context_tokens)


# ---------------------------------------------------------------- the stream
def busy_within(starts: np.ndarray, ends: np.ndarray, t0: float, t1: float) -> float:
    """Seconds of the disjoint intervals [starts[i], ends[i]) that fall inside [t0, t1]."""
    overlap = np.minimum(ends, t1) - np.maximum(starts, t0)
    return float(overlap[overlap > 0].sum())


class SimulatedStream:
    """One simulated CUDA stream (thread-safe). Times are `time.monotonic()` seconds."""

    def __init__(self):
        self._lock = threading.Lock()
        self._free_at = 0.0  # when everything queued so far completes
        self._starts, self._ends = array("d"), array("d")  # one interval per launch, in order
        self.busy_s = 0.0  # modelled device seconds launched in all

    def launch(self, seconds: float) -> float:
        """Queues `seconds` of device work behind what is queued; returns its completion time."""
        with self._lock:
            start = max(time.monotonic(), self._free_at)
            self._free_at = start + seconds
            self._starts.append(start)
            self._ends.append(self._free_at)
            self.busy_s += seconds
            return self._free_at

    def record_event(self) -> float:
        """An event after the work queued so far: the time at which it completes."""
        with self._lock:
            return self._free_at

    @staticmethod
    def wait_event(event: float) -> None:
        """Blocks the calling thread (not the GIL) until the event's work has completed: sleeps,
        then yields in a loop for the last `_SPIN_S` (a sleep overshoots by ~0.1 ms; CUDA's
        default synchronization also spins, then yields)."""
        remaining = event - time.monotonic()
        if remaining > _SPIN_S:
            time.sleep(remaining - _SPIN_S)
        while time.monotonic() < event:
            os.sched_yield()  # releases the GIL; time.sleep(0) would add ~50 us of timer slack

    def synchronize(self) -> None:
        self.wait_event(self.record_event())

    def busy_between(self, t0: float, t1: float) -> float:
        """Modelled device seconds inside the wall-clock window [t0, t1]."""
        with self._lock:
            # Copies: a numpy view would pin the arrays' buffers and make the next append fail.
            return busy_within(np.array(self._starts), np.array(self._ends), t0, t1)

    def launches_since(self, index: int) -> tuple[np.ndarray, float]:
        """[n, 2] (start, end) of launches index.. and the time before which all were made."""
        with self._lock:
            now = time.monotonic()
            pairs = np.empty((len(self._starts) - index, 2), dtype=np.float64)
            pairs[:, 0] = self._starts[index:]
            pairs[:, 1] = self._ends[index:]
            return pairs, now


# ---------------------------------------------------------------- the stats file
class StatsFileWriter:
    """Appends the stream's launches to `path` (format: module docstring) from a daemon thread."""

    def __init__(self, path: str, stream: SimulatedStream, period_s: float = STATS_PERIOD_S):
        self.stream, self.period_s = stream, period_s
        self._file = open(path, "wb")
        self._written = 0
        self._write_lock = threading.Lock()
        self._stop = threading.Event()
        self.flush()
        self._thread = threading.Thread(target=self._run, name="sim-stats", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.flush()

    def flush(self) -> None:
        with self._write_lock:
            if self._file.closed:
                return
            pairs, made_before = self.stream.launches_since(self._written)
            self._written += len(pairs)
            self._file.write(np.vstack([pairs, [[_MARKER, made_before]]]).tobytes())
            self._file.flush()

    def close(self) -> None:
        self._stop.set()
        self.flush()
        with self._write_lock:
            self._file.close()
        atexit.unregister(self.close)


def stats_file_path(path: str, dp_rank: Optional[int] = None) -> str:
    """The stats file of the device simulated by data-parallel replica `dp_rank` (None: the
    only one)."""
    return path if dp_rank is None else f"{path}.dp{dp_rank}"


def read_stats_file(path: str, covering: float, timeout_s: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) of every launch made before a marker at or after `covering`, waiting up
    to `timeout_s` for the writer to get there."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        pairs = np.frombuffer(data[:len(data) // 16 * 16], dtype=np.float64).reshape(-1, 2)
        markers = np.flatnonzero(pairs[:, 0] == _MARKER)
        if len(markers) and pairs[markers[-1], 1] >= covering:
            done = pairs[:markers[-1]]
            done = done[done[:, 0] != _MARKER]
            return done[:, 0].copy(), done[:, 1].copy()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no device stats up to t={covering:.3f} after {timeout_s:g} s "
                               f"(is {STATS_ENV} set for the simulating process, and is it alive?)")
        time.sleep(0.05)


# ---------------------------------------------------------------- the engine glue
class SimulatedModel:
    """Stands in for `QWenLMHeadModel` inside the ModelRunner: a forward launches the step's
    modelled time and returns a placeholder hidden state; the LM head passes it on."""

    def __init__(self, config, stream: SimulatedStream, step_time: Callable[[int, int], float],
                 max_tokens: int):
        import torch
        self.config, self.stream, self.step_time = config, stream, step_time
        self._placeholder = torch.zeros(max_tokens, 1)  # [tokens, 1]: nothing reads its values

    def __call__(self, input_ids, positions, meta):
        num_tokens = input_ids.shape[0]
        self.stream.launch(self.step_time(num_tokens, sum(meta.seq_lens_list)))
        if num_tokens > self._placeholder.shape[0]:
            self._placeholder = self._placeholder.new_zeros(num_tokens, 1)
        return self._placeholder[:num_tokens]

    def compute_logits(self, hidden):
        return hidden

    def attention_layers(self) -> list:
        return []  # no KV tensors: the cache is bookkeeping only


class SimulatedEvent:
    """A point on the simulated stream; `synchronize()` waits until the device reaches it."""

    def __init__(self, stream: SimulatedStream):
        self.stream, self.at = stream, stream.record_event()

    def synchronize(self) -> None:
        self.stream.wait_event(self.at)


class SimulatedEvents:
    """Stands in for the ModelRunner's `DeviceEvents`: events on the simulated stream, so the
    runner's read-back of a step's samples waits for that step's modelled forward, as
    synchronizing on a CUDA event after the sampling would."""

    def __init__(self, stream: SimulatedStream):
        self.stream = stream

    def record(self) -> SimulatedEvent:
        return SimulatedEvent(self.stream)


class SimulatedSampler:
    """Random ordinary tokens, seeded. Drawing them costs no modelled time (the formula does not
    model sampling); the runner reads them only after its event says the step is done.

    Structured rows (`params.structured_output`) cost what they cost in the real sampler on the
    host: the real `fill_bitmask` (matchers catch up with the output tokens, llguidance computes
    every row's mask), here, at the same point of the runner's order. The device's share (copying
    the bitmask over PCIe, the float32 copy, unpacking and masking [B, V] logits) is launched as
    `DeviceProfile.mask_apply_time_s`. Each structured row then draws a random token its mask
    allows (benchmarks/grammar_walk.py), so its matcher walks through the structure as a real
    one does; `picker.seconds` is that draw's host time, simulation overhead to subtract. The
    draw runs on a thread of its own while the host goes on, and reading the samples back
    waits for it (`_DrawnOnReadBack`): a GPU draws on the device, so between launching the
    sampling and launching the next forward the real sampler's host does no such work, and
    neither does this one's main thread."""

    def __init__(self, stream: SimulatedStream, seed: int, profile: Optional[DeviceProfile] = None):
        from benchmarks.grammar_walk import AllowedTokenPicker
        self.stream = stream
        self.profile = profile or H100_7B
        self._rng = np.random.default_rng(seed)
        self.picker = AllowedTokenPicker(seed)
        self.mask_seconds = 0.0  # host time in fill_bitmask
        self.num_structured_rows = 0
        # Where the allowed tokens are drawn: the device's share of the step, run beside the host.
        self._draw_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sim-draw")

    def sample_on_device(self, logits, states):
        import torch

        from qwenserve.worker.sampler import DeviceSamples
        tokens = self._rng.integers(0, NUM_ORDINARY_TOKENS, size=len(states))
        structured = [i for i, s in enumerate(states) if s.params.structured_output is not None]
        draw = self._launch_mask(states, structured, tokens) if structured else None
        # Logprobs are not modelled: a row that asks gets its token at log-probability 0.
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        top_n = [min(states[i].params.logprobs, 1) for i in rows]
        sampled_logprobs = torch.zeros(len(rows)) if rows else None
        top_vals = torch.zeros(len(rows), 1) if rows else None
        # `tokens` is shared with the tensor, so the draw on read-back fills token_ids in place.
        samples = DeviceSamples(torch.from_numpy(tokens), rows, top_n, sampled_logprobs, top_vals, None)
        return _DrawnOnReadBack(samples, draw)

    def sample(self, logits, states):
        return self.sample_on_device(logits, states).to_host()

    def _launch_mask(self, states, structured: list, tokens: np.ndarray):
        """The real sampler's host share of a structured step (the fill) and its device share
        (launched on the stream); starts the draw of the allowed tokens, which read-back waits for."""
        from qwenserve.structured_output.batch import fill_bitmask
        start = time.perf_counter()
        bitmask = fill_bitmask(states)  # the real sampler's step (s), plain rows included
        self.mask_seconds += time.perf_counter() - start
        self.stream.launch(self.profile.mask_apply_time_s(len(states)))
        self.num_structured_rows += len(structured)

        def draw() -> None:
            tokens[structured] = self.picker.pick(bitmask.numpy(), structured)
        return self._draw_thread.submit(draw)


class _DrawnOnReadBack:
    """Simulated samples (a `DeviceSamples` and what the runner reads of it) whose structured
    rows are being drawn on the sampler's draw thread; reading them back waits for the draw."""

    def __init__(self, samples, draw: Optional[Future]):
        self.samples, self.token_ids, self._draw = samples, samples.token_ids, draw

    def to_host(self, token_ids=None):
        if self._draw is not None:
            self._draw.result()  # it has filled token_ids in place
            self._draw = None
        if self.samples.logprob_rows:
            self.samples.top_ids = self.token_ids[self.samples.logprob_rows].unsqueeze(1)
        return self.samples.to_host(None)


class SimulatedExecutor:
    """The in-process executor with the model and sampler simulated (see the module docstring)."""

    def __init__(self, config, model_dir: str, profile: DeviceProfile = H100_7B):
        from qwenserve.worker.worker import Worker
        if config.tensor_parallel_size != 1:
            raise ValueError(f"tensor_parallel_size: the simulated device {profile.name!r} is one GPU; "
                             f"use 1, got {config.tensor_parallel_size}")
        host_config = dataclasses.replace(config, device="cpu", dtype="float32", executor_plugin=None)
        self.profile, self.stream = profile, SimulatedStream()
        self.worker = Worker(host_config, model_dir)
        self.worker.model = SimulatedModel(self.worker.model_config, self.stream, profile.step_time_s,
                                           config.max_num_batched_tokens)
        self.num_blocks = config.num_kv_blocks or profile.kv_cache_tokens // config.block_size
        self.worker.init_kv_cache(self.num_blocks)
        self.worker.runner.sampler = SimulatedSampler(self.stream, config.seed, profile)
        self.worker.runner.events = SimulatedEvents(self.stream)
        self.device, self.dtype = f"simulated {profile.name}", "bfloat16"
        stats_path = os.environ.get(STATS_ENV)
        if stats_path and os.environ.get(DP_RANK_ENV):  # one simulated device per replica
            stats_path = stats_file_path(stats_path, int(os.environ[DP_RANK_ENV]))
        self.stats_writer: Optional[StatsFileWriter] = StatsFileWriter(stats_path, self.stream) if stats_path else None

    def execute_model(self, scheduler_output):
        return self.worker.execute_model(scheduler_output)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        if self.stats_writer is not None:
            self.stats_writer.close()
            self.stats_writer = None
        self.worker = None


def h100_7b_executor(config, model_dir: str, progress=None) -> SimulatedExecutor:
    """`EngineConfig.executor_plugin` entry: "benchmarks.simulated_device:h100_7b_executor"."""
    return SimulatedExecutor(config, model_dir, H100_7B)


PLUGINS = {H100_7B.name: "benchmarks.simulated_device:h100_7b_executor"}
