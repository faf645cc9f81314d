"""Decode CUDA graphs at tp > 1 are decided by all ranks together: every rank captures, or none
does. Checked on the CPU with two processes on gloo: the model is a stand-in whose forward runs
one all-reduce per call (as the TP layers do), the capture itself is faked, and a capture failure is
simulated on one rank. Before, such a failure was swallowed by that rank alone, which then decoded
eagerly while its peer replayed graphs: their collectives no longer paired."""
import logging
import multiprocessing
import socket
from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist

from qwenserve.model.parallel import TensorParallelGroup
from qwenserve.worker import cuda_graphs
from qwenserve.worker.cuda_graphs import DecodeGraphs, capture_decode_graphs, capture_sizes

MAX_BATCH = 20  # capture sizes 20, 16, 8, 4, 2, 1 (largest first)


class StandInModel:
    """A forward that all-reduces once per call, like every TP layer's all_reduce."""

    def __init__(self, tp):
        self.tp, self.calls = tp, []
        self.config = SimpleNamespace(use_logn_attn=False)

    def __call__(self, input_ids, positions, meta):
        self.calls.append(input_ids.shape[0])
        x = torch.ones(input_ids.shape[0])
        self.tp.all_reduce(x)
        assert torch.all(x == self.tp.size)  # paired with the same collective on every rank
        return torch.zeros(input_ids.shape[0], 4)


def _fake_capture(fail_rank, fail_size, rank, captured):
    def capture_size(self, size):
        if rank == fail_rank and size == fail_size:
            raise RuntimeError("simulated: operation not permitted when stream is capturing")
        captured.append(size)
        self.replays[size] = lambda: None
        self.outputs[size] = torch.zeros(size, 4)
    return capture_size


def _rank_main(rank, world, port, fail_rank, fail_size, graph_safe, results):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=30))
    tp = TensorParallelGroup(rank=rank, size=world, group=dist.group.WORLD)
    records = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("qwenserve.worker.cuda_graphs").addHandler(handler)
    logging.getLogger("qwenserve.worker.cuda_graphs").setLevel(logging.INFO)
    torch.cuda.synchronize = lambda device=None: None  # no GPU here: the rest is real
    torch.cuda.empty_cache = lambda: None
    if graph_safe:
        tp.graph_capture_safe = lambda: (True, "")
    captured = []
    DecodeGraphs.capture_size = _fake_capture(fail_rank, fail_size, rank, captured)
    model = StandInModel(tp)
    graphs = capture_decode_graphs(model, MAX_BATCH, 64, 16, torch.device("cpu"), tp)
    # The ranks are still in step: one more collective pairs up.
    after = torch.tensor([float(rank)])
    tp.all_reduce(after)
    results.put((rank, graphs is not None, captured, model.calls, float(after), records))
    dist.destroy_process_group()


def _run_two_ranks(fail_rank=None, fail_size=None, graph_safe=True):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank_main, args=(r, 2, port, fail_rank, fail_size, graph_safe, results))
             for r in range(2)]
    for p in procs:
        p.start()
    out = {}
    for _ in procs:
        rank, *rest = results.get(timeout=120)
        out[rank] = rest
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    return out


SIZES = capture_sizes(MAX_BATCH)[::-1]


def test_every_rank_captures_when_all_succeed():
    out = _run_two_ranks()
    for rank in (0, 1):
        has_graphs, captured, calls, after, logs = out[rank]
        assert has_graphs and captured == SIZES
        assert calls == SIZES  # one eager warm-up forward per size, before its capture
        assert after == 1.0
        assert any("on all 2 ranks" in line for line in logs)


def test_a_capture_failure_on_one_rank_turns_graphs_off_on_every_rank():
    out = _run_two_ranks(fail_rank=1, fail_size=8)
    at = SIZES.index(8)
    for rank in (0, 1):
        has_graphs, captured, calls, after, logs = out[rank]
        assert not has_graphs, f"rank {rank} kept its graphs"
        assert calls == SIZES[:at + 1]  # both stopped after the same step
        assert after == 1.0  # and their collectives still pair
        assert any("rank(s) [1] failed to capture" in line for line in logs), logs
    assert out[0][1] == SIZES[:at + 1]  # rank 0 had captured 8 too, and dropped it
    assert out[1][1] == SIZES[:at]
    assert any("batch size 8: RuntimeError: simulated" in line for line in out[1][4])


def test_no_rank_captures_when_the_all_reduce_is_not_graph_safe():
    out = _run_two_ranks(graph_safe=False)  # gloo: not capturable
    for rank in (0, 1):
        has_graphs, captured, calls, after, logs = out[rank]
        assert not has_graphs and captured == [] and calls == [] and after == 1.0
        assert any("cannot capture the tensor-parallel all-reduce (its all-reduce runs on gloo" in line
                   for line in logs), logs


def test_single_rank_failure_decodes_eagerly(monkeypatch, caplog):
    tp = TensorParallelGroup()
    captured = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(DecodeGraphs, "capture_size", _fake_capture(0, 4, 0, captured))
    with caplog.at_level(logging.WARNING, logger="qwenserve.worker.cuda_graphs"):
        assert capture_decode_graphs(StandInModel(tp), 8, 64, 16, torch.device("cpu"), tp) is None
    assert "rank 0: CUDA graph capture failed at batch size 4" in caplog.text
    monkeypatch.setattr(DecodeGraphs, "capture_size", _fake_capture(None, None, 0, captured))
    graphs = capture_decode_graphs(StandInModel(tp), 8, 64, 16, torch.device("cpu"), tp)
    assert graphs is not None and sorted(graphs.replays) == [1, 2, 4, 8]


@pytest.mark.parametrize("backend,version,safe", [
    ("nccl", (2, 21, 5), True), ("nccl", (2, 9, 6), True), ("nccl", (2, 9, 5), False),
    ("nccl", 2708, False), ("nccl", 21903, True), ("gloo", (2, 21, 5), False),
])
def test_graph_capture_safe(monkeypatch, backend, version, safe):
    assert TensorParallelGroup().graph_capture_safe() == (True, "")
    monkeypatch.setattr(dist, "get_backend", lambda group=None: backend)
    monkeypatch.setattr(torch.cuda.nccl, "version", lambda: version)
    ok, why = TensorParallelGroup(rank=0, size=2, group=object()).graph_capture_safe()
    assert ok is safe and (why == "") is safe
    if backend == "nccl" and not safe:
        assert "2.9.6 or newer" in why


def test_failed_ranks_is_the_same_list_on_every_rank_at_tp1():
    tp = TensorParallelGroup()
    assert cuda_graphs.failed_ranks(True, tp, torch.device("cpu")) == []
    assert cuda_graphs.failed_ranks(False, tp, torch.device("cpu")) == [0]
