"""The engine-core process: an `EngineCore` behind ZMQ sockets, in a loop that runs while
there is work and blocks while there is none.

    front end(s)                                 engine-core process
    PUSH ─ input address (ipc; tcp for a Ray replica) ─► PULL ─ input thread ─► queue ─┐
                                                                 ▼
                                          main thread: busy loop (EngineCore.step)
                                                                 │
    PULL ◄─ client's output address ◄─ PUSH ◄─ output thread ◄─ queue

Each message is two frames: a one-byte tag and a msgpack body (`protocol.py`). The input and
output threads only (de)serialize and move bytes, so the loop never waits on a socket and
its step overlaps their work. A front end joins with a hello naming its output address
(the first front end's is given at start); outputs go to the client each request came from.

Lifetime. The process ignores SIGINT/SIGTERM: a Ctrl-C or a service manager's SIGTERM reaches
the whole process group, and the front end, which drains its calls first, decides when the
core stops (a "shutdown" utility call). If the front end dies instead, a watcher thread sees
the parent process change and stops the core (workers included) within a second. A core that
runs as a data-parallel replica (`ray_replica.py`) is a Ray actor instead, whose lifetime Ray
ties to its owner, the front end; it has no parent to watch.

Failure. Any exception from a step, or from the periodic worker health check (every
`HEALTH_CHECK_S` while idle; a step notices a dead worker by itself), is sent to every client
as `EngineCoreOutputs(engine_dead=reason)`; then the workers are shut down and the process
exits 1. A failure while loading is sent as `EngineCoreStartupFailed` instead of the ready
message.
"""
from __future__ import annotations

import logging
import os
import queue
import select
import signal
import sys
import threading
import time
from typing import Optional

import msgspec
import zmq

from qwenserve.config import EngineConfig
from qwenserve.engine_core import protocol as P
from qwenserve.model.load_progress import LoadProgress
from qwenserve.structured_output.vocabulary import warm_up_in_background

logger = logging.getLogger(__name__)

HEALTH_CHECK_S = 1.0
PARENT_POLL_S = 0.5
# While busy, a client without outputs of its own still gets fresh stats this often.
STATS_PERIOD_S = 0.2
# How long the core's exit waits for its last messages to reach a front end that reads them.
OUTPUT_LINGER_S = 2.0


class _Shutdown(Exception):
    """Raised inside the loop to stop it (a shutdown call, or the parent is gone)."""


def run_engine_core(config: EngineConfig, model_dir: str, input_address: str, output_address: str,
                    parent_pid: int, log_level: str = "INFO", show_load_progress: bool = True) -> None:
    """The process's entry point (see `__main__` below). Exits the process when done."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(level=log_level, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s [engine core]: %(message)s")
    proc = EngineCoreProc(config, model_dir, input_address, output_address, parent_pid, show_load_progress)
    code = proc.run()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # no atexit or lingering non-daemon threads (Ray's) can hold the exit


class EngineCoreProc:
    def __init__(self, config: EngineConfig, model_dir: str, input_address: str, output_address: str,
                 parent_pid: Optional[int], show_load_progress: bool = True, owner_pid: Optional[int] = None):
        """`input_address`: where to listen ("ipc://PATH", or "tcp://IP:*" for any free port:
        `self.input_address` is the address bound). `parent_pid`: stop when this process's
        parent is no longer that process. `owner_pid` (a Ray replica, whose parent is Ray's):
        stop when that process, the front end on this machine, exits. Neither: Ray alone ties
        the core's life to its front end's (an actor on another node)."""
        self.config, self.model_dir = config, model_dir
        self.show_load_progress = show_load_progress
        self.parent_pid = parent_pid
        self.front_end_gone = threading.Event()
        self.context = zmq.Context()
        # The output sockets' own context: terminating it (`_close_output`) waits until their
        # last messages (a startup failure, `engine_dead`) are handed to the kernel. A socket's
        # linger alone does not: `os._exit` stops zmq's I/O thread wherever it is, and on a busy
        # machine that was before the last words were written.
        self.output_context = zmq.Context()
        # Bound here, before anything can be sent to it, then handed to the input thread.
        input_socket = self.context.socket(zmq.PULL)
        input_socket.bind(input_address)
        self.input_address = input_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.inputs: queue.Queue = queue.Queue()
        self.outputs: queue.Queue = queue.Queue()
        self.core = None
        # Which client each live request came from (written by the input thread, which sees a
        # request before the loop does; dict operations are atomic).
        self._client_of: dict[str, int] = {}
        # Per client: when it was last sent anything, and whether it has the stats of the core
        # as they are now (False once an input or a step may have changed them).
        self._last_sent: dict[int, float] = {0: 0.0}
        self._stats_current: dict[int, bool] = {0: False}
        self._step_tokens: dict[int, list[int]] = {0: []}  # per client: steps not yet reported
        threading.Thread(target=self._input_thread, args=(input_socket,), name="core-input", daemon=True).start()
        self._output_thread = threading.Thread(target=self._output_thread_main, name="core-output", daemon=True)
        self._output_thread.start()
        self.outputs.put(("connect", 0, output_address))
        if parent_pid is not None:
            threading.Thread(target=self._watch_parent, name="core-parent-watch", daemon=True).start()
        elif owner_pid is not None:
            threading.Thread(target=self._watch_owner, args=(owner_pid,), name="core-owner-watch", daemon=True).start()
        # Structured-output masks need llguidance's view of the vocabulary (~1 s to build):
        # build it now, beside the model loading, rather than inside the first such step.
        warm_up_in_background()

    # ------------------------------------------------------------------ the loop
    def run(self) -> int:
        from qwenserve.engine_core.core import EngineCore

        try:
            progress = LoadProgress() if self.show_load_progress else None
            self.core = EngineCore(self.config, self.model_dir, load_progress=progress)
        except BaseException as e:  # noqa: BLE001 - told to the front end, which reports it
            if not isinstance(e, (ValueError, OSError)):  # a bad setting needs no traceback
                logger.exception("engine core failed to start")
            self._send(0, P.TAG_STARTUP_FAILED, P.EngineCoreStartupFailed(
                type(e).__name__, str(e), isinstance(e, (ValueError, OSError))))
            self._close_output()
            return 1
        self._send(0, P.TAG_READY, self.core.ready_message())
        code = 0
        try:
            self._loop()
        except _Shutdown:
            pass
        except BaseException as e:  # noqa: BLE001 - any failure ends the engine
            logger.exception("engine core failed")
            dead = P.EngineCoreOutputs(engine_dead=f"{type(e).__name__}: {e}", timestamp=time.monotonic())
            for client in list(self._last_sent):
                self._send(client, P.TAG_OUTPUTS, dead)
            code = 1
        try:
            self.core.shutdown()
        except Exception:
            logger.exception("shutting down the workers failed")
        self._close_output()
        return code

    def _loop(self) -> None:
        core = self.core
        last_health = time.monotonic()
        while True:
            if not core.has_work():
                try:  # idle: block, waking up for the worker health check
                    self._handle(self.inputs.get(timeout=HEALTH_CHECK_S))
                except queue.Empty:
                    pass
                if time.monotonic() - last_health >= HEALTH_CHECK_S:
                    core.check_health()
                    last_health = time.monotonic()
            while True:
                try:
                    self._handle(self.inputs.get_nowait())
                except queue.Empty:
                    break
            if core.has_work():
                outputs = core.step()
                if core.last_step_num_tokens:
                    for steps in self._step_tokens.values():
                        steps.append(core.last_step_num_tokens)
                self._publish(outputs)
            else:
                self._publish([])

    def _handle(self, item) -> None:
        tag, message = item
        core = self.core
        for client in self._stats_current:
            self._stats_current[client] = False
        if tag == P.TAG_REQUEST:
            try:
                core.add_requests(message)
            except ValueError as e:  # the front end checks first; this is the last line
                rejected = []
                for request in message:
                    self._client_of.pop(request.request_id, None)
                    rejected.append(P.EngineCoreOutput(request.request_id, [], finish_reason="abort", error=str(e)))
                self._send(message[0].client_index, P.TAG_OUTPUTS,
                           P.EngineCoreOutputs(outputs=rejected, timestamp=time.monotonic()))
        elif tag == P.TAG_ABORT:
            core.abort_requests(message.request_ids)
            for request_id in message.request_ids:
                self._client_of.pop(request_id, None)
        elif tag == P.TAG_HELLO:
            self._last_sent[message.client_index] = 0.0
            self._stats_current[message.client_index] = False
            self._step_tokens[message.client_index] = []
            self.outputs.put(("connect", message.client_index, message.output_address))
        elif tag == P.TAG_GOODBYE:
            self._forget_client(message.client_index)
        elif tag == P.TAG_UTILITY:
            self._utility(message)
        elif tag == _STOP:
            raise _Shutdown

    def _forget_client(self, client: int) -> None:
        """A front end left: abort its requests, stop sending to it."""
        gone = [rid for rid, owner in list(self._client_of.items()) if owner == client]
        self.core.abort_requests(gone)
        for request_id in gone:
            self._client_of.pop(request_id, None)
        for table in (self._last_sent, self._stats_current, self._step_tokens):
            table.pop(client, None)
        self.outputs.put(("disconnect", client, None))

    def _utility(self, call: P.EngineCoreUtility) -> None:
        client = call.client_index
        if call.method == "shutdown":
            self._send(client, P.TAG_UTILITY_RESULT, P.EngineCoreUtilityResult(call.call_id, True))
            raise _Shutdown
        result, error = None, None
        try:
            if call.method == "stats":
                result = msgspec.to_builtins(self.core.stats())
            elif call.method == "describe":
                result = [msgspec.to_builtins(self.core.ready_message()), os.getpid()]
            elif call.method == "check_health":
                self.core.check_health()
                result = True
            else:
                error = f"unknown utility method {call.method!r}"
        except Exception as e:  # noqa: BLE001 - the caller gets it
            error = f"{type(e).__name__}: {e}"
        self._send(client, P.TAG_UTILITY_RESULT, P.EngineCoreUtilityResult(call.call_id, result, error))

    def _publish(self, outputs: list) -> None:
        """Sends each client its requests' deltas with the scheduler's stats. A client with no
        deltas gets the stats alone: every STATS_PERIOD_S while the core is busy, and once when
        something changed while it is idle."""
        by_client: dict[int, list] = {}
        for output in outputs:
            if output.finish_reason is not None:
                client = self._client_of.pop(output.request_id, 0)
            else:
                client = self._client_of.get(output.request_id, 0)
            by_client.setdefault(client, []).append(output)
        now = time.monotonic()
        idle = not self.core.has_work()
        stats = None
        for client, last_sent in list(self._last_sent.items()):
            mine = by_client.get(client)
            if mine is None and (self._stats_current[client] if idle else now - last_sent < STATS_PERIOD_S):
                continue
            stats = stats or self.core.stats()
            steps, self._step_tokens[client] = self._step_tokens[client], []
            self._send(client, P.TAG_OUTPUTS, P.EngineCoreOutputs(
                outputs=mine or [], stats=stats, timestamp=now, step_num_tokens=steps))
            self._stats_current[client] = idle

    # ------------------------------------------------------------------ threads
    def _input_thread(self, socket: zmq.Socket) -> None:
        decoders = {tag: msgspec.msgpack.Decoder(kind) for tag, kind in P.INPUT_TYPES.items()}
        while True:
            tag, body = socket.recv_multipart(copy=False)
            tag = tag.bytes
            try:
                # A request's SamplingParams are rebuilt and validated here, which compiles its
                # structured output (cached; llguidance releases the GIL): on this thread, so a
                # new grammar never stalls the loop, and a failure rejects only its request.
                message = decoders[tag].decode(body.buffer)
            except (msgspec.ValidationError, msgspec.DecodeError) as e:
                self._reject_undecodable(tag, body.buffer, e)
                continue
            if tag == P.TAG_REQUEST:
                for request in message:
                    self._client_of[request.request_id] = request.client_index
            self.inputs.put((tag, message))

    def _reject_undecodable(self, tag: bytes, body, error: Exception) -> None:
        """A message that does not decode (a request whose params fail validation here, e.g. a
        grammar over its compile time limit on a loaded core): each request in it is answered
        with an abort carrying the error; anything else is logged. The input thread goes on."""
        reason = str(error).split(" - at `$", 1)[0]  # msgspec's location suffix: noise here
        if tag != P.TAG_REQUEST:
            logger.error("dropped an undecodable %r message: %s", tag, reason)
            return
        fields = P.EngineCoreRequest.__struct_fields__
        id_at, client_at = fields.index("request_id"), fields.index("client_index")
        try:  # the message as plain lists: one array per request (array_like structs)
            ids = [(r[id_at], r[client_at] if len(r) > client_at else 0) for r in msgspec.msgpack.decode(body)]
        except Exception:  # noqa: BLE001 - not even the ids: nobody to answer
            logger.error("dropped an undecodable request message: %s", reason)
            return
        logger.warning("rejected %s: %s", ", ".join(request_id for request_id, _ in ids), reason)
        for request_id, client in ids:
            rejected = P.EngineCoreOutput(request_id, [], finish_reason="abort", error=reason)
            self._send(client, P.TAG_OUTPUTS, P.EngineCoreOutputs(outputs=[rejected], timestamp=time.monotonic()))

    def _output_thread_main(self) -> None:
        encoder = msgspec.msgpack.Encoder()
        sockets: dict[int, zmq.Socket] = {}
        while True:
            item = self.outputs.get()
            if item is None:
                break
            if item[0] == "connect":
                _, client, address = item
                socket = self.output_context.socket(zmq.PUSH)
                socket.setsockopt(zmq.LINGER, int(OUTPUT_LINGER_S * 1000))  # the last words' bound
                socket.connect(address)
                sockets[client] = socket
                continue
            if item[0] == "disconnect":
                socket = sockets.pop(item[1], None)
                if socket is not None:
                    socket.close(linger=0)
                continue
            client, tag, message = item
            socket = sockets.get(client)
            if socket is None:
                continue
            try:  # never block on a front end that stopped reading: drop its outputs instead
                socket.send_multipart((tag, encoder.encode(message)), flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                logger.warning("client %d is not reading its outputs: dropping them", client)
        for socket in sockets.values():
            socket.close()

    def _send(self, client: int, tag: bytes, message) -> None:
        self._last_sent[client] = time.monotonic()
        self.outputs.put((client, tag, message))

    def _close_output(self) -> None:
        """Sends what is queued, then waits (at most OUTPUT_LINGER_S past the output thread's
        end) until zmq has written it, so that the process may exit at once."""
        self.outputs.put(None)
        self._output_thread.join(5)
        if not self._output_thread.is_alive():  # else a socket is still open: term would hang
            self.output_context.term()  # returns once every socket's linger is over or flushed

    def _watch_parent(self) -> None:
        while os.getppid() == self.parent_pid:
            time.sleep(PARENT_POLL_S)
        self._stop_without_front_end(self.parent_pid)

    def _watch_owner(self, pid: int) -> None:
        try:
            fd = os.pidfd_open(pid)  # readable once the process has exited, whatever reuses its pid
        except (AttributeError, OSError):
            fd = None
        if fd is not None:
            select.select([fd], [], [])
        else:
            while _exists(pid):
                time.sleep(PARENT_POLL_S)
        self._stop_without_front_end(pid)

    def _stop_without_front_end(self, pid: int) -> None:
        logger.warning("the front end (pid %d) is gone: stopping the engine core", pid)
        self.front_end_gone.set()
        self.inputs.put((_STOP, None))
        # A step stuck on a worker would never read the queue: leave anyway after a grace.
        time.sleep(STOP_GRACE_S)
        os._exit(1)


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_STOP = b"stop"  # the parent watcher's message to the loop
STOP_GRACE_S = 10.0


if __name__ == "__main__":  # started by engine_core.client.CoreProcess; arguments pickled on stdin
    import pickle

    run_engine_core(*pickle.loads(sys.stdin.buffer.read()))
