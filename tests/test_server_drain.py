"""SIGTERM drains: health turns NOT_SERVING at once while the port stays open, so a probe sees
it; new Generate calls get UNAVAILABLE; running streams go on until they finish or the grace
period ends (then "abort"), and the process exits 0 as soon as nothing runs."""
import concurrent.futures
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qwenserve.server.client import QwenClient
from test_server import GREEDY, STARTUP_TIMEOUT, Server

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:  # a new connection, as a probe makes
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status


class Stream:
    """A stream on its own thread; `received` counts its messages, `after_signal` those that
    arrived after `mark()`."""

    def __init__(self, address: str, prompt: str, max_tokens: int):
        self.received = 0
        self.marked_at = None
        self.first = threading.Event()
        self.client = QwenClient(address)
        self.future = concurrent.futures.ThreadPoolExecutor(1).submit(self._run, prompt, max_tokens)

    def _run(self, prompt, max_tokens):
        deltas = []
        for delta in self.client.generate_stream(prompt, max_tokens=max_tokens, **GREEDY):
            deltas.append(delta)
            self.received += 1
            self.first.set()
        return deltas

    def mark(self) -> None:
        self.marked_at = self.received

    @property
    def after_signal(self) -> int:
        return self.received - self.marked_at


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_sigterm_turns_health_not_serving_while_streams_drain(tmp_path):
    grace = 8.0
    srv = Server(tmp_path, "--shutdown-grace", str(grace), "--max-model-len", "8192")
    stream = Stream(srv.address, "Count to a thousand", 8000)  # runs past any grace on this CPU
    try:
        assert stream.first.wait(60)
        stream.mark()
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        status = None
        while status != NOT_SERVING and time.monotonic() - signalled < 3:
            status = _health(srv.address)  # the port still accepts connections
        assert status == NOT_SERVING
        with QwenClient(srv.address) as c, pytest.raises(grpc.RpcError) as err:
            c.generate("a new call during the drain", max_tokens=1)
        assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAVAILABLE, "server is shutting down")
        assert time.monotonic() - signalled < grace - 2  # all of the above happened inside the drain
        time.sleep(1.0)
        assert stream.after_signal > 0  # the running stream kept streaming
        deltas = stream.future.result(timeout=grace + 30)
        assert deltas[-1].finish_reason == "abort"  # at the end of the grace period
        assert srv.proc.wait(30) == 0, srv.log()
        assert time.monotonic() - signalled >= grace
    finally:
        srv.stop(signal.SIGKILL)
        stream.client.close()


@pytest.mark.timeout(STARTUP_TIMEOUT + 120)
def test_sigterm_lets_a_short_stream_finish_and_exits_without_waiting_out_the_grace(tmp_path):
    grace = 120.0
    srv = Server(tmp_path, "--shutdown-grace", str(grace))
    stream = Stream(srv.address, "A short answer", 40)
    try:
        assert stream.first.wait(60)
        signalled = time.monotonic()
        srv.proc.send_signal(signal.SIGTERM)
        deltas = stream.future.result(timeout=60)
        assert deltas[-1].finish_reason == "length" and sum(len(d.token_ids) for d in deltas) == 40
        assert srv.proc.wait(60) == 0, srv.log()
        assert time.monotonic() - signalled < 30  # not the 120 s grace
    finally:
        srv.stop(signal.SIGKILL)
        stream.client.close()
