"""A request the engine rejects (e.g. too many tokens for max_model_len) is freed when its call
ends, not at some later garbage collection: the bridge hands the caller the engine's ValueError
without the engine thread's traceback, whose frames (holding the request's token ids, up to
max_prompt_chars of them) formed a reference cycle with the caller's future."""
import gc
import threading
import time
import weakref

from test_server_bridge import ScriptedEngine
from qwenserve.server.engine_bridge import EngineBridge


class Tokens:
    """Stands in for the token ids of a long prompt (a list cannot be weakly referenced)."""


class RejectingEngine(ScriptedEngine):
    def __init__(self):
        super().__init__()
        self.token_refs = []

    def add_request(self, request_id, prompt=None, params=None, **_):
        ids = Tokens()  # a local of this frame, as the engine's add_request holds its ids
        self.token_refs.append(weakref.ref(ids))
        raise ValueError("prompt: 16001 tokens leave no room to generate within max_model_len (256)")


def test_a_rejected_requests_tokens_are_freed_without_a_garbage_collection():
    engine = RejectingEngine()
    bridge = EngineBridge(engine, max_waiting_requests=8)
    bridge.start()
    gc.disable()
    try:
        for i in range(3):
            future = bridge.add(f"r{i}", lambda item: None, prompt="long", params={"n": 1, "max_tokens": 1})
            try:
                future.result(5)
            except ValueError as e:
                assert str(e).startswith("prompt: 16001 tokens")
            else:
                raise AssertionError("the engine's rejection did not reach the caller")
            del future
        deadline = time.monotonic() + 5
        while any(ref() is not None for ref in engine.token_refs) and time.monotonic() < deadline:
            time.sleep(0.01)  # the engine thread leaves _apply
        assert [ref() for ref in engine.token_refs] == [None] * 3
    finally:
        gc.enable()
        bridge.close(5)
    assert not [t for t in threading.enumerate() if t.name == "qwenserve-engine"]
