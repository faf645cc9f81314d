"""The front end's side of the engine-core process: starting it, talking to it, watching it.

`CoreProcess` starts `process.run_engine_core` in a fresh interpreter (no forked threads or
CUDA state) with ipc addresses in a private temporary directory, and stops it. `AsyncCoreClient`
(asyncio, zmq.asyncio) sends requests, aborts and utility calls, receives the per-step
outputs, and reports the process's exit the moment it happens (its pidfd is watched by the
event loop; elsewhere a thread waits on it), so a dead core is noticed within milliseconds;
its last message (why it failed) is still read for up to `LAST_WORDS_GRACE_S` before the
exit is reported.
The client drives any *core launcher* with `CoreProcess`'s interface (`output_bind_address`,
`start(output_address)` setting `input_address` and `pid`, `watch_exit(callback)`,
`unwatch_exit()`, `exit_reason()`, `join`, `kill`, `cleanup`): a data-parallel replica's core
is a Ray actor (`ray_replica.RayCoreReplica`), reached over tcp.
`SyncCoreClient` is the same for the offline `LLMEngine`, with the `EngineCore` interface
(`add_request`, `abort_requests`, `step`, `stats`, ...), so the engine can hold either.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import msgspec
import zmq
import zmq.asyncio

from qwenserve.config import EngineConfig
from qwenserve.engine_core import protocol as P

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0
# How long the messages of a core that exited are still read before its exit is reported: a
# core that fails sends why (a startup failure, `engine_dead`) and then exits, and the exit can
# be seen before that message is read.
LAST_WORDS_GRACE_S = 1.0


class EngineCoreStartupError(Exception):
    """The engine core could not load the model: `error_type` is the core's exception type,
    `bad_setting` whether it was a ValueError/OSError (a bad setting, path or checkpoint)."""

    def __init__(self, error_type: str, message: str, bad_setting: bool):
        super().__init__(message)
        self.error_type, self.bad_setting = error_type, bad_setting


class EngineCoreDead(Exception):
    """The engine-core process failed or exited."""


class PidWatch:
    """Calls `on_exit()` on the running event loop when process `pid` (on this machine) exits:
    its pidfd is watched by the loop; where there is no pidfd, `fallback_wait` (if given) runs
    in a thread and the loop is told when it returns."""

    def __init__(self, pid: int, on_exit: Callable[[], None], fallback_wait: Optional[Callable[[], Any]] = None):
        self._loop = asyncio.get_running_loop()
        self._on_exit: Optional[Callable[[], None]] = on_exit
        try:
            self._fd: Optional[int] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self._fd = None
        if self._fd is not None:
            self._loop.add_reader(self._fd, self._fire)
        elif fallback_wait is not None:
            asyncio.ensure_future(asyncio.to_thread(fallback_wait)).add_done_callback(lambda _: self._fire())

    def _fire(self) -> None:
        on_exit = self._on_exit
        self.close()
        if on_exit is not None:
            on_exit()

    def close(self) -> None:
        """Stops watching: `on_exit` will not be called."""
        self._on_exit = None
        fd, self._fd = self._fd, None
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)


class CoreProcess:
    """One engine-core process (`python -m qwenserve.engine_core.process`) and the ipc
    addresses of its sockets.

    A fresh interpreter rather than multiprocessing's spawn: spawn re-imports the parent's
    `__main__`, which breaks for `python -` and `-c`, and re-runs a user's script that lacks a
    main guard. The child gets this process's sys.path, as spawn would give it (executor
    plug-ins and the source tree stay importable), and its arguments pickled on its stdin."""

    def __init__(self, config: EngineConfig, model_dir: str, log_level: str = "INFO",
                 show_load_progress: bool = True):
        self.show_load_progress = show_load_progress
        self._dir = tempfile.mkdtemp(prefix="qwenserve-core-")
        self.input_address = f"ipc://{self._dir}/input"
        self.output_address = f"ipc://{self._dir}/output-0"
        self.config, self.model_dir, self.log_level = config, model_dir, log_level
        self.process: Optional[subprocess.Popen] = None
        self._exit_watch: Optional[PidWatch] = None

    @property
    def output_bind_address(self) -> str:
        """Where client 0 binds its output socket (before `start`)."""
        return self.output_address

    def start(self, output_address: Optional[str] = None) -> None:
        """Starts the process (returns at once; the core says when its model is loaded)."""
        if output_address is not None and output_address != self.output_address:
            raise ValueError(f"output_address: this core sends to {self.output_address}, not {output_address}")
        paths = [os.path.abspath(p) if p else os.getcwd() for p in sys.path]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qwenserve.engine_core.process"], stdin=subprocess.PIPE, env=env)
        arguments = (self.config, self.model_dir, self.input_address, self.output_address, os.getpid(),
                     self.log_level, self.show_load_progress)
        self.process.stdin.write(pickle.dumps(arguments))
        self.process.stdin.close()

    @property
    def pid(self) -> Optional[int]:
        return None if self.process is None else self.process.pid

    @property
    def exitcode(self) -> Optional[int]:
        return None if self.process is None else self.process.poll()

    def watch_exit(self, on_exit: Callable[[], None]) -> None:
        """Calls `on_exit()` on the running event loop the moment the process exits."""
        self._exit_watch = PidWatch(self.process.pid, on_exit,
                                    fallback_wait=lambda: self.process.wait())

    def unwatch_exit(self) -> None:
        if self._exit_watch is not None:
            self._exit_watch.close()
            self._exit_watch = None

    def exit_reason(self) -> str:
        self.join(1)
        return f"the engine core process exited unexpectedly (exit code {self.exitcode})"

    def join(self, timeout: float) -> bool:
        """Waits for the process to exit; True when it has."""
        if self.process is None:
            return True
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class AsyncCoreClient:
    """A front end's connection to an engine core, on the running event loop: client 0 of a
    `CoreProcess` it starts (`start`), or another client of a running core (`attach` +
    `connect`: several front ends can share one core; each gets its own requests' outputs)."""

    def __init__(self, core_process: Optional[CoreProcess], on_outputs: Callable[[P.EngineCoreOutputs], None],
                 on_dead: Callable[[str], None], *, input_address: Optional[str] = None,
                 client_index: int = 0):
        self.core_process = core_process
        self.client_index = client_index
        self._own_dir = None
        if core_process is not None:
            output_address = core_process.output_bind_address
        else:
            self._own_dir = tempfile.mkdtemp(prefix="qwenserve-client-")
            output_address = f"ipc://{self._own_dir}/output-{client_index}"
        self.on_outputs, self.on_dead = on_outputs, on_dead
        self.context = zmq.asyncio.Context()
        self.output_socket = self.context.socket(zmq.PULL)
        self.output_socket.bind(output_address)
        # The address bound ("tcp://IP:*" becomes a port).
        self.output_address = self.output_socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self.input_socket = self.context.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_address = input_address  # a started core's is known once it listens
        if input_address is not None:
            self.input_socket.connect(input_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {tag: msgspec.msgpack.Decoder(kind) for tag, kind in P.OUTPUT_TYPES.items()}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._receiver: Optional[asyncio.Task] = None
        self._ready: Optional[asyncio.Future] = None
        self._exit_watch: Optional[PidWatch] = None  # an attached client's watch of the core
        self.dead_reason: Optional[str] = None
        self._stopping = False

    @classmethod
    def attach(cls, input_address: str, client_index: int, on_outputs: Callable[[P.EngineCoreOutputs], None],
               on_dead: Callable[[str], None]) -> "AsyncCoreClient":
        """Another front end's client of the core listening at `input_address`; `client_index`
        (>= 1) must be unique among the core's clients. Call `connect` next."""
        if client_index < 1:
            raise ValueError("client_index: 0 is the client that started the core; use 1 or more")
        return cls(None, on_outputs, on_dead, input_address=input_address, client_index=client_index)

    async def start(self, timeout: float) -> P.EngineCoreReady:
        """Starts the process and waits until its model is loaded; raises
        `EngineCoreStartupError` (the core's own error) or `EngineCoreDead`."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._receiver = asyncio.ensure_future(self._receive())
        process = self.core_process
        await asyncio.to_thread(process.start, self.output_address)
        self.input_address = process.input_address
        self.input_socket.connect(self.input_address)
        process.watch_exit(self._on_exit)
        return await asyncio.wait_for(self._ready, timeout)

    async def connect(self, timeout: float = 30.0) -> P.EngineCoreReady:
        """Joins a running core (after `attach`): says where this client's outputs go, and
        returns what the core says about itself."""
        self._ready = asyncio.get_running_loop().create_future()
        self._receiver = asyncio.ensure_future(self._receive())
        await self._send(P.TAG_HELLO, P.EngineCoreHello(self.client_index, self.output_address))
        ready, pid = await self.call("describe", timeout)
        self._exit_watch = PidWatch(pid, self._on_exit)
        return msgspec.convert(ready, P.EngineCoreReady)

    # ------------------------------------------------------------------ sending
    async def add_requests(self, requests: list[P.EngineCoreRequest]) -> None:
        """One message: a request's n completions reach the core's loop together."""
        await self._send(P.TAG_REQUEST, requests)

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.dead_reason is None:
            await self._send(P.TAG_ABORT, P.EngineCoreAbort(list(request_ids)))

    async def call(self, method: str, timeout: float = 10.0) -> Any:
        """A utility call answered by the core's loop (between steps)."""
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            await self._send(P.TAG_UTILITY, P.EngineCoreUtility(call_id, method, self.client_index))
            return await asyncio.wait_for(future, timeout)
        finally:
            self._calls.pop(call_id, None)

    async def _send(self, tag: bytes, message) -> None:
        if self.dead_reason is not None:
            raise EngineCoreDead(self.dead_reason)
        await self.input_socket.send_multipart((tag, self._encoder.encode(message)), copy=False)

    # ------------------------------------------------------------------ receiving
    async def _receive(self) -> None:
        try:
            while True:
                tag, body = await self.output_socket.recv_multipart(copy=False)
                tag = tag.bytes
                message = self._decoders[tag].decode(body.buffer)
                if tag == P.TAG_OUTPUTS:
                    if message.engine_dead is not None:
                        self._die(message.engine_dead)
                    else:
                        self.on_outputs(message)
                elif tag == P.TAG_UTILITY_RESULT:
                    future = self._calls.get(message.call_id)
                    if future is not None and not future.done():
                        if message.error is not None:
                            future.set_exception(RuntimeError(message.error))
                        else:
                            future.set_result(message.result)
                elif tag == P.TAG_READY:
                    if not self._ready.done():
                        self._ready.set_result(message)
                elif tag == P.TAG_STARTUP_FAILED:
                    if not self._ready.done():
                        self._ready.set_exception(EngineCoreStartupError(message.error_type, message.message,
                                                                         message.bad_setting))
        except asyncio.CancelledError:
            pass
        except Exception as e:  # noqa: BLE001 - a garbled message is as bad as a dead core
            logger.exception("receiving from the engine core failed")
            self._die(f"receiving from the engine core failed: {type(e).__name__}: {e}")

    def _on_exit(self) -> None:
        self._close_exit_watch()
        if self._stopping:
            return
        reason = (self.core_process.exit_reason() if self.core_process is not None
                  else "the engine core process exited unexpectedly (exit code None)")
        asyncio.get_running_loop().call_later(LAST_WORDS_GRACE_S, self._die, reason)

    def _die(self, reason: str) -> None:
        if self.dead_reason is not None:
            return
        self.dead_reason = reason
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(EngineCoreDead(reason))
        for future in self._calls.values():
            if not future.done():
                future.set_exception(EngineCoreDead(reason))
        self.on_dead(reason)

    def _close_exit_watch(self) -> None:
        if self.core_process is not None:
            self.core_process.unwatch_exit()
        if self._exit_watch is not None:
            self._exit_watch.close()
            self._exit_watch = None

    # ------------------------------------------------------------------ stopping
    async def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Client 0: asks the core to stop (it aborts what runs and stops its workers), waits for
        the process, kills it if it does not exit in time. Another client: leaves the core
        running and says goodbye."""
        self._stopping = True
        process = self.core_process
        if process is None:
            if self.dead_reason is None:
                try:
                    await self._send(P.TAG_GOODBYE, P.EngineCoreHello(self.client_index, self.output_address))
                except Exception:  # noqa: BLE001 - leaving anyway
                    pass
        elif process.pid is not None and process.exitcode is None and self.dead_reason is None:
            try:
                await self.call("shutdown", timeout=5.0)
            except Exception:  # noqa: BLE001 - it may be dead or stuck: the kill below handles both
                pass
        if process is not None and process.pid is not None:
            if not await asyncio.to_thread(process.join, timeout):
                logger.warning("the engine core did not exit within %.0f s: killing it", timeout)
                await asyncio.to_thread(process.kill)
        self._close_exit_watch()
        if self._receiver is not None:
            self._receiver.cancel()
        self.output_socket.close(linger=0)
        self.input_socket.close(linger=0)
        self.context.term()
        if process is not None:
            process.cleanup()
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)


class SyncCoreClient:
    """An engine core in its own process behind `EngineCore`'s interface (blocking calls)."""

    POLL_MS = 200

    def __init__(self, config: EngineConfig, model_dir: str, log_level: str = "WARNING",
                 timeout: float = 3600.0):
        self.core_process = CoreProcess(config, model_dir, log_level, show_load_progress=False)
        self.context = zmq.Context()
        self.output_socket = self.context.socket(zmq.PULL)
        self.output_socket.bind(self.core_process.output_address)
        self.input_socket = self.context.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.connect(self.core_process.input_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {tag: msgspec.msgpack.Decoder(kind) for tag, kind in P.OUTPUT_TYPES.items()}
        self._call_ids = itertools.count()
        self._results: dict[int, P.EngineCoreUtilityResult] = {}
        self._outputs: list[P.EngineCoreOutputs] = []
        self.latest_stats = P.SchedulerStats()
        self.dead_reason: Optional[str] = None
        self.core_process.start()
        try:
            self.ready = self._wait_ready(timeout)
        except BaseException:
            self.shutdown()
            raise
        self.max_model_len = self.ready.max_model_len
        self.model_dir = model_dir

    def _wait_ready(self, timeout: float) -> P.EngineCoreReady:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = self._receive(self.POLL_MS)
            if isinstance(message, P.EngineCoreReady):
                return message
            if isinstance(message, P.EngineCoreStartupFailed):
                raise EngineCoreStartupError(message.error_type, message.message, message.bad_setting)
        raise EngineCoreDead(f"the engine core did not load within {timeout:g} s")

    def _receive(self, timeout_ms: int):
        """One message (None when none came within the timeout); raises once the core is dead."""
        if self.dead_reason is not None:
            raise EngineCoreDead(self.dead_reason)
        if not self.output_socket.poll(timeout_ms):
            code = self.core_process.exitcode
            # An exited core's last message can still be on its way: read it if it comes.
            if code is not None and not self.output_socket.poll(int(LAST_WORDS_GRACE_S * 1000)):
                self.dead_reason = f"the engine core process exited unexpectedly (exit code {code})"
                raise EngineCoreDead(self.dead_reason)
            return None
        tag, body = self.output_socket.recv_multipart(copy=False)
        tag = tag.bytes
        message = self._decoders[tag].decode(body.buffer)
        if tag == P.TAG_OUTPUTS:
            if message.engine_dead is not None:
                self.dead_reason = message.engine_dead
                raise EngineCoreDead(message.engine_dead)
            if message.stats is not None:
                self.latest_stats = message.stats
            self._outputs.append(message)
        elif tag == P.TAG_UTILITY_RESULT:
            self._results[message.call_id] = message
        return message

    def _send(self, tag: bytes, message) -> None:
        if self.dead_reason is not None:
            raise EngineCoreDead(self.dead_reason)
        self.input_socket.send_multipart((tag, self._encoder.encode(message)), copy=False)

    # ------------------------------------------------------------------ EngineCore's interface
    def add_requests(self, requests: list[P.EngineCoreRequest]) -> None:
        """One message: a request's n completions reach the core's loop together."""
        self._send(P.TAG_REQUEST, requests)

    def abort_requests(self, request_ids) -> None:
        request_ids = list(request_ids)
        if request_ids and self.dead_reason is None:
            self._send(P.TAG_ABORT, P.EngineCoreAbort(request_ids))

    def step(self) -> list[P.EngineCoreOutput]:
        """The outputs of the next step that has any (waits for it)."""
        while True:
            while self._outputs:
                message = self._outputs.pop(0)
                if message.outputs:
                    return message.outputs
            self._receive(self.POLL_MS)

    def call(self, method: str, timeout: float = 30.0):
        call_id = next(self._call_ids)
        self._send(P.TAG_UTILITY, P.EngineCoreUtility(call_id, method))
        deadline = time.monotonic() + timeout
        while call_id not in self._results:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core did not answer {method!r} within {timeout:g} s")
            self._receive(self.POLL_MS)
        result = self._results.pop(call_id)
        if result.error is not None:
            raise RuntimeError(result.error)
        return result.result

    def stats(self) -> P.SchedulerStats:
        return msgspec.convert(self.call("stats"), P.SchedulerStats)

    def ready_message(self) -> P.EngineCoreReady:
        return self.ready

    def check_health(self) -> None:
        self.call("check_health")

    def shutdown(self) -> None:
        process = self.core_process
        if process.process is not None and process.exitcode is None and self.dead_reason is None:
            try:
                self.call("shutdown", timeout=10.0)
            except Exception:  # noqa: BLE001 - dead or stuck: the kill below handles both
                pass
        if process.process is not None and not process.join(STOP_TIMEOUT_S):
            logger.warning("the engine core did not exit within %.0f s: killing it", STOP_TIMEOUT_S)
            process.kill()
        self.output_socket.close(linger=0)
        self.input_socket.close(linger=0)
        self.context.term()
        process.cleanup()
