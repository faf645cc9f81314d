"""The soak test in CI (benchmarks/soak.py, shortened): 64 concurrent streams for 30 s against a
real `qwenserve launch` on the built-in model, with cancels, short deadlines, n > 1, stop
strings, logprobs and hostile requests mixed in. At most 90 s of wall time in all: the server
starts in about 15 s, and normal requests ask for at most 16 tokens so that the calls still
open when the traffic stops end within about 20 s on a busy 2-core machine."""
import sys
from pathlib import Path

import pytest

from qwenserve.server.client import QwenClient
from test_server import Server

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ is not installed
from benchmarks.soak import DEFAULT_SERVER_FLAGS, print_figures, process_tree, run_soak  # noqa: E402

STREAMS, DURATION_S, MAX_TOKENS = 64, 30.0, 16
MAX_SILENCE_S = 30.0
# The server's RSS at the end (every block free) may exceed its peak in the first half of the
# traffic by at most this much. A leak of 0.4 MiB per request would pass 100 MiB over the run's
# ~270 requests; the working set itself moves by up to ~100 MiB with the batch size, hence the
# first-half peak as the reference (measured on the 2-core machine: the end 15 MiB below it).
RSS_GROWTH_BOUND_MIB = 100.0


@pytest.mark.soak
@pytest.mark.timeout(300)
def test_soak(tmp_path):
    # Server flags of the soak script; Server adds test_server's engine flags first, and a
    # later flag wins in argparse, so the soak's --max-model-len and KV budget apply.
    srv = Server(tmp_path, *DEFAULT_SERVER_FLAGS)
    try:
        # Premise: the RSS read is the whole server's, the engine-core process included.
        below = [Path(f"/proc/{pid}/cmdline").read_text(errors="replace") for pid in process_tree(srv.proc.pid)[1:]]
        assert any("qwenserve.engine_core.process" in cmdline for cmdline in below), below
        figures = run_soak(srv.address, srv.proc.pid, streams=STREAMS, duration=DURATION_S, seed=0,
                           max_tokens=MAX_TOKENS)
        print_figures(figures)
        assert figures.unexpected == 0, figures.unexpected_examples
        assert figures.health_not_serving == 0 and figures.health_checks >= DURATION_S / 2
        assert figures.max_silence_s < MAX_SILENCE_S
        assert figures.blocks_free_at_end, figures.final_stats
        assert figures.rss_growth_mib < RSS_GROWTH_BOUND_MIB, figures
        kinds = figures.requests
        assert min(kinds.values()) >= 5 and sum(kinds.values()) >= 2 * STREAMS, kinds  # every kind ran
        assert figures.outcomes.get("cancel CANCELLED", 0) > 0 and figures.outcomes.get("deadline DEADLINE_EXCEEDED", 0) > 0
        with QwenClient(srv.address) as c:  # the engine is alive and still generates
            assert len(c.generate("still alive?", max_tokens=3, ignore_eos=True).token_ids) == 3
    finally:
        assert srv.stop() == 0, srv.log()
