"""The front end's side of the engine-core process: starting it, talking to it, watching it.

`CoreProcess` spawns `process.run_engine_core` (a fresh interpreter: no forked threads or CUDA
state) with ipc addresses in a private temporary directory, and stops it. `AsyncCoreClient`
(asyncio, zmq.asyncio) sends requests, aborts and utility calls, receives the per-step
outputs, and reports the process's exit the moment it happens (the process sentinel is
watched by the event loop), so a dead core is noticed within milliseconds, idle or busy.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import os
import shutil
import tempfile
from typing import Any, Callable, Optional

import msgspec
import zmq
import zmq.asyncio

from qwenserve.config import EngineConfig
from qwenserve.engine_core import protocol as P

logger = logging.getLogger(__name__)

STOP_TIMEOUT_S = 30.0


class EngineCoreStartupError(Exception):
    """The engine core could not load the model: `error_type` is the core's exception type,
    `bad_setting` whether it was a ValueError/OSError (a bad setting, path or checkpoint)."""

    def __init__(self, error_type: str, message: str, bad_setting: bool):
        super().__init__(message)
        self.error_type, self.bad_setting = error_type, bad_setting


class EngineCoreDead(Exception):
    """The engine-core process failed or exited."""


class CoreProcess:
    """One engine-core process and the ipc addresses of its sockets."""

    def __init__(self, config: EngineConfig, model_dir: str, log_level: str = "INFO"):
        self._dir = tempfile.mkdtemp(prefix="qwenserve-core-")
        self.input_address = f"ipc://{self._dir}/input"
        self.output_address = f"ipc://{self._dir}/output-0"
        self.config, self.model_dir, self.log_level = config, model_dir, log_level
        self.process: Optional[multiprocessing.process.BaseProcess] = None

    def start(self) -> None:
        from qwenserve.engine_core.process import run_engine_core

        context = multiprocessing.get_context("spawn")
        self.process = context.Process(
            target=run_engine_core, name="qwenserve-engine-core",
            args=(self.config, self.model_dir, self.input_address, self.output_address, os.getpid(),
                  self.log_level))
        self.process.start()

    @property
    def exitcode(self) -> Optional[int]:
        return None if self.process is None else self.process.exitcode

    def join(self, timeout: float) -> bool:
        """Waits for the process to exit; True when it has."""
        if self.process is None:
            return True
        self.process.join(timeout)
        return self.process.exitcode is not None

    def kill(self) -> None:
        if self.process is not None and self.process.exitcode is None:
            self.process.kill()
            self.process.join(5)

    def cleanup(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)


class AsyncCoreClient:
    """Client 0 of a `CoreProcess`, on the running event loop."""

    def __init__(self, core_process: CoreProcess, on_outputs: Callable[[P.EngineCoreOutputs], None],
                 on_dead: Callable[[str], None]):
        self.core_process = core_process
        self.on_outputs, self.on_dead = on_outputs, on_dead
        self.context = zmq.asyncio.Context()
        self.output_socket = self.context.socket(zmq.PULL)
        self.output_socket.bind(core_process.output_address)
        self.input_socket = self.context.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.LINGER, 0)
        self.input_socket.connect(core_process.input_address)
        self._encoder = msgspec.msgpack.Encoder()
        self._decoders = {tag: msgspec.msgpack.Decoder(kind) for tag, kind in P.OUTPUT_TYPES.items()}
        self._calls: dict[int, asyncio.Future] = {}
        self._call_ids = itertools.count()
        self._receiver: Optional[asyncio.Task] = None
        self._ready: Optional[asyncio.Future] = None
        self.dead_reason: Optional[str] = None
        self._stopping = False

    async def start(self, timeout: float) -> P.EngineCoreReady:
        """Starts the process and waits until its model is loaded; raises
        `EngineCoreStartupError` (the core's own error) or `EngineCoreDead`."""
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        self._receiver = asyncio.ensure_future(self._receive())
        await asyncio.to_thread(self.core_process.start)
        loop.add_reader(self.core_process.process.sentinel, self._on_exit)
        return await asyncio.wait_for(self._ready, timeout)

    # ------------------------------------------------------------------ sending
    async def add_requests(self, requests: list[P.EngineCoreRequest]) -> None:
        for request in requests:
            await self._send(P.TAG_REQUEST, request)

    async def abort(self, request_ids: list[str]) -> None:
        if request_ids and self.dead_reason is None:
            await self._send(P.TAG_ABORT, P.EngineCoreAbort(list(request_ids)))

    async def call(self, method: str, timeout: float = 10.0) -> Any:
        """A utility call answered by the core's loop (between steps)."""
        call_id = next(self._call_ids)
        future = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            await self._send(P.TAG_UTILITY, P.EngineCoreUtility(call_id, method))
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
        loop = asyncio.get_event_loop()
        loop.remove_reader(self.core_process.process.sentinel)
        self.core_process.process.join(1)
        code = self.core_process.exitcode
        if not self._stopping:
            self._die(f"the engine core process exited unexpectedly (exit code {code})")

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

    # ------------------------------------------------------------------ stopping
    async def shutdown(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Asks the core to stop (it aborts what runs and stops its workers), waits for the
        process, kills it if it does not exit in time."""
        self._stopping = True
        process = self.core_process
        if process.process is not None and process.exitcode is None and self.dead_reason is None:
            try:
                await self.call("shutdown", timeout=5.0)
            except Exception:  # noqa: BLE001 - it may be dead or stuck: the kill below handles both
                pass
        if process.process is not None:
            if not await asyncio.to_thread(process.join, timeout):
                logger.warning("the engine core did not exit within %.0f s: killing it", timeout)
                process.kill()
            try:
                asyncio.get_running_loop().remove_reader(process.process.sentinel)
            except (ValueError, OSError):
                pass
        if self._receiver is not None:
            self._receiver.cancel()
        self.output_socket.close(linger=0)
        self.input_socket.close(linger=0)
        self.context.term()
        process.cleanup()
