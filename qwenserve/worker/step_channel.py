"""The step channel: one persistent TCP connection per tensor-parallel rank, opened once at
start-up, that carries every step's `SchedulerOutput` to the ranks and the results back,
without a Ray call per step.

    driver: StepChannel                                rank r: serve_steps(...)
    ───────────────────                                ────────────────────────
    listen on (node ip, free port)
                        ◄──── connect, hello = authkey ‖ rank ────   (once, at start-up)
    step(out):
      frame = len ‖ pickle(out, protocol 5)   (pickled once)
      same frame ──────────────────────────────────────────────►   recv frame (blocks while idle)
                                                                   result = handler(out)
      select() over all ranks  ◄──── len ‖ pickle(("ok", result)) ─  rank 0: ModelRunnerOutput
                               ◄──── len ‖ pickle(("ok", None))  ──  others: a tiny ack
                               ◄──── len ‖ pickle(("error", traceback text)) on an exception
      returns rank 0's result
    close(): closes the sockets ──────────────────────────────►   EOF: the loop returns

Every frame is an 8-byte big-endian length and a pickle. The driver waits for every rank's
reply in `select` with a short timeout; between timeouts it asks `dead_ranks` (the executor
looks at Ray) which ranks are gone, so a rank lost without a closed socket is noticed too. A
rank whose socket reaches EOF or is reset has died; a rank that replies with an error failed.
Either way `step` raises `RankError` naming the rank (a dead rank is named in preference to a
peer whose collective broke because of that death).

The authkey (random, sent to the ranks through Ray) keeps other connections to the port out;
unpickling is safe only because of it.
"""
from __future__ import annotations

import hmac
import os
import pickle
import select
import socket
import struct
import time
import traceback
from typing import Any, Callable, Optional

_LEN = struct.Struct("!Q")
_RANK = struct.Struct("!I")
AUTHKEY_BYTES = 32
# How often a waiting step asks `dead_ranks` while no rank has answered.
POLL_S = 0.5
# A frame that has begun must arrive whole within this (a send blocks only on a stuck peer).
IO_TIMEOUT_S = 30.0
# After a rank reports an error, how long to look for a peer death that would explain it.
GRACE_S = 2.0
HELLO_TIMEOUT_S = 5.0

# () -> {rank: (died, why)} for the ranks known to be gone (an actor death, a loop that ended).
DeadRanks = Callable[[], dict]


class RankError(RuntimeError):
    """A rank died (`died`) or failed a step; `detail` is why (the remote traceback text)."""

    def __init__(self, rank: int, died: bool, detail: str):
        self.rank, self.died, self.detail = rank, died, detail
        verb = "died" if died else "failed"
        super().__init__(f"rank {rank} {verb}: {detail}")


class _Closed(Exception):
    pass


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise _Closed("connection closed")
        got += k
    return buf


def _recv_frame(sock: socket.socket) -> bytearray:
    (size,) = _LEN.unpack(_recv_exact(sock, _LEN.size))
    return _recv_exact(sock, size)


def _frame(payload: bytes) -> bytes:
    return _LEN.pack(len(payload)) + payload


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small frames go out at once
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a lost node ends a blocked recv


# ---------------------------------------------------------------------- driver side
class StepChannel:
    """The driver's end: listens, accepts one connection per rank, runs steps over them."""

    def __init__(self, host: str, world_size: int):
        self.world_size = world_size
        self.authkey = os.urandom(AUTHKEY_BYTES)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, 0), family=family)
        self.address = (host, self._listener.getsockname()[1])
        self._socks: list[Optional[socket.socket]] = [None] * world_size
        self._rank_of: dict[socket.socket, int] = {}
        self._in_step = False  # still set when a step was left half-way (an interrupt)

    def accept(self, timeout: float, dead_ranks: DeadRanks = dict) -> None:
        """Waits until every rank has connected (raises RankError for a rank that is gone,
        TimeoutError when some rank has not connected within `timeout` seconds)."""
        deadline = time.monotonic() + timeout
        self._listener.settimeout(POLL_S)
        while any(s is None for s in self._socks):
            self._raise_dead(dead_ranks)
            if time.monotonic() > deadline:
                missing = [r for r, s in enumerate(self._socks) if s is None]
                raise TimeoutError(f"rank(s) {missing} did not connect to the step channel at "
                                   f"{self.address} within {timeout:g}s")
            try:
                conn, _ = self._listener.accept()
            except socket.timeout:
                continue
            try:
                conn.settimeout(HELLO_TIMEOUT_S)
                hello = _recv_exact(conn, AUTHKEY_BYTES + _RANK.size)
                (rank,) = _RANK.unpack(hello[AUTHKEY_BYTES:])
                if not hmac.compare_digest(bytes(hello[:AUTHKEY_BYTES]), self.authkey) \
                        or rank >= self.world_size or self._socks[rank] is not None:
                    raise ValueError("not one of our ranks")
            except (OSError, _Closed, ValueError):
                conn.close()
                continue
            conn.settimeout(IO_TIMEOUT_S)
            _tune(conn)
            self._socks[rank] = conn
            self._rank_of[conn] = rank
        self._listener.close()

    def step(self, obj: Any, dead_ranks: DeadRanks = dict) -> Any:
        """Sends `obj` (pickled once) to every rank, waits for every rank's reply and returns
        rank 0's result; raises RankError naming a rank that died or failed."""
        if self._in_step:
            raise RuntimeError("the step channel is out of step: an earlier step was interrupted")
        if not self._rank_of:
            raise RuntimeError("the step channel is closed")
        self._in_step = True
        result = self._step(obj, dead_ranks)
        self._in_step = False
        return result

    def _step(self, obj: Any, dead_ranks: DeadRanks) -> Any:
        frame = _frame(pickle.dumps(obj, protocol=5))
        for rank, sock in enumerate(self._socks):
            try:
                sock.sendall(frame)
            except socket.timeout:
                raise RankError(rank, False, f"did not take a step within {IO_TIMEOUT_S:g}s") from None
            except OSError as e:
                raise RankError(rank, True, f"step channel: {e}") from None
        pending = dict(self._rank_of)
        result, errors, dead = None, {}, {}
        grace_until = None
        while pending:
            timeout = POLL_S if grace_until is None else max(0.0, min(POLL_S, grace_until - time.monotonic()))
            readable, _, _ = select.select(list(pending), [], [], timeout)
            for sock in readable:
                rank = pending.pop(sock)
                try:
                    status, value = pickle.loads(_recv_frame(sock))
                except (_Closed, OSError) as e:
                    dead[rank] = f"step channel: {e}"
                    continue
                if status == "ok":
                    if rank == 0:
                        result = value
                else:
                    errors[rank] = value
            if not readable or errors or dead:
                for rank, (died, why) in dead_ranks().items():
                    (dead if died else errors).setdefault(rank, why)
            if dead:
                rank = min(dead)
                raise RankError(rank, True, dead[rank])
            if errors:
                # A broken collective usually means a peer died: give its death a moment to show.
                if grace_until is None:
                    grace_until = time.monotonic() + GRACE_S
                if time.monotonic() >= grace_until:
                    break
        if errors:
            rank = min(errors)
            raise RankError(rank, False, errors[rank])
        return result

    def _raise_dead(self, dead_ranks: DeadRanks) -> None:
        dead = dead_ranks()
        if dead:
            rank = min(dead)
            raise RankError(rank, *dead[rank])

    def close(self) -> None:
        """Closes every connection: each rank's loop sees EOF and returns."""
        try:
            self._listener.close()
        except OSError:
            pass
        for sock in self._socks:
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._socks = [None] * self.world_size
        self._rank_of = {}


# ---------------------------------------------------------------------- rank side
def serve_steps(address: tuple[str, int], authkey: bytes, rank: int,
                handler: Callable[[Any], Any], connect_timeout: float = 60.0) -> int:
    """A rank's loop: connects to the driver, then for each step frame runs `handler` on the
    unpickled object and replies (rank 0 with the result, other ranks with a tiny ack; an
    exception with its traceback text). Blocks in recv while idle; returns the number of steps
    served when the driver closes the channel."""
    sock = socket.create_connection(tuple(address), timeout=connect_timeout)
    sock.settimeout(None)
    _tune(sock)
    steps = 0
    try:
        sock.sendall(bytes(authkey) + _RANK.pack(rank))
        while True:
            try:
                payload = _recv_frame(sock)
            except (_Closed, ConnectionResetError):
                return steps
            try:
                result = handler(pickle.loads(payload))
                reply = pickle.dumps(("ok", result if rank == 0 else None), protocol=5)
            except Exception:  # any failure of the step goes back to the driver
                reply = pickle.dumps(("error", traceback.format_exc()), protocol=5)
            sock.sendall(_frame(reply))
            steps += 1
    finally:
        sock.close()
