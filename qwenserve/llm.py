"""`LLM`: the offline Python API: generate for prompts or token ids, and ChatML chat."""
from __future__ import annotations

import operator
import sys
import time
from collections.abc import Iterable, Mapping, Set as AbstractSet
from typing import Optional, Sequence, Union

from qwenserve.config import EngineConfig
from qwenserve.engine import LLMEngine
from qwenserve.outputs import RequestOutput
from qwenserve.sampling_params import SamplingParams


class _ProgressBar:
    """A one-line progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.start = total, 0, time.monotonic()
        self.enabled = enabled and sys.stderr.isatty()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            rate = self.done / max(time.monotonic() - self.start, 1e-9)
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                             f"({rate:.1f} req/s)")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


class LLM:
    def __init__(self, model: Optional[str] = None, tensor_parallel_size: int = 1, **kwargs):
        self.engine = LLMEngine(EngineConfig.from_kwargs(model=model, tensor_parallel_size=tensor_parallel_size,
                                                         **kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: Union[str, Sequence[str], None] = None,
                 sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
                 prompt_token_ids: Union[Sequence[int], Sequence[Sequence[int]], None] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completions in the order of the inputs.

        `prompts`: one string or a list of strings. `prompt_token_ids`: one prompt's ids (a flat
        list, as vLLM reads it) or a list of them. `sampling_params`: one `SamplingParams` for
        all, a list of them (one per prompt), or None for the model's defaults. Wrong types raise
        TypeError and wrong values ValueError, each naming the argument; nothing is queued then.
        """
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("input: give exactly one of prompts, prompt_token_ids")
        if prompts is not None:
            inputs = [{"prompt": p} for p in _prompt_list(prompts)]
        else:
            inputs = [{"prompt_token_ids": ids} for ids in _token_id_lists(prompt_token_ids)]
        return self._run(inputs, sampling_params, use_tqdm)

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             system: Optional[str] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Replies to one conversation (a list of {"role", "content"} dicts) or to several (a
        list of such lists). An empty conversation is a ValueError, as it is over gRPC."""
        if not _is_list(messages):
            raise TypeError("messages: expected a list of {'role': ..., 'content': ...} dicts (one "
                            f"conversation) or a list of such lists, got {type(messages).__name__}")
        messages = list(messages)
        if not messages:
            raise ValueError("messages: must contain at least one message")
        if isinstance(messages[0], dict):
            conversations = [messages]
        else:
            conversations = list(messages)
            for i, c in enumerate(conversations):
                if not _is_list(c):
                    raise TypeError(f"messages[{i}]: expected a conversation (a list of message "
                                    f"dicts), got {type(c).__name__}")
        return self._run([{"messages": c, "system": system} for c in conversations], sampling_params, use_tqdm)

    def _run(self, inputs: list[dict], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.engine.default_params()] * len(inputs)
        elif _is_list(sampling_params):
            params = list(sampling_params)
            for i, p in enumerate(params):
                if not isinstance(p, SamplingParams):
                    raise TypeError(f"sampling_params[{i}]: expected a SamplingParams, "
                                    f"got {type(p).__name__}")
            if len(params) != len(inputs):
                raise ValueError(f"sampling_params: {len(params)} given for {len(inputs)} inputs")
        else:
            raise TypeError("sampling_params: expected a SamplingParams (e.g. "
                            "SamplingParams(max_tokens=16)), a list of them (one per input) or "
                            f"None, got {type(sampling_params).__name__}")
        engine = self.engine
        ids = []
        try:
            for item, p in zip(inputs, params):
                ids.append(engine.add_request(params=p, **item))
            finished: dict[str, RequestOutput] = {}
            bar = _ProgressBar(len(ids), use_tqdm)
            while len(finished) < len(ids):
                for out in engine.step(finished_only=True):
                    finished[out.request_id] = out
                    bar.update()
            bar.close()
        except BaseException:
            for rid in ids:  # a failed or interrupted batch leaves nothing behind
                engine.abort_request(rid)
            raise
        return [finished[rid] for rid in ids]

    def get_stats(self) -> dict:
        return self.engine.get_stats()

    def shutdown(self) -> None:
        self.engine.shutdown()


def _is_list(value) -> bool:
    """A list-like batch: not a string, bytes, mapping or set (whose iteration would be wrong)."""
    return (isinstance(value, Iterable) and not isinstance(value, (str, bytes, bytearray, Mapping, AbstractSet))
            and not isinstance(value, SamplingParams))


def _is_token_id(value) -> bool:
    """An int-like scalar (numpy and torch integers included); a list or array is not."""
    if isinstance(value, (str, bytes)):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


def _prompt_list(prompts) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    if not _is_list(prompts):
        raise TypeError(f"prompts: expected a string or a list of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: the list is empty; give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            hint = "; pass token ids as prompt_token_ids=" if _is_token_id(p) or _is_list(p) else ""
            raise TypeError(f"prompts[{i}]: expected a string, got {type(p).__name__}{hint}")
    return prompts


def _token_id_lists(prompt_token_ids) -> list:
    """One prompt (a flat sequence of ids, as vLLM reads it) or a list of prompts. The ids
    themselves are checked by the engine (`validate_ids`: integers in the vocabulary)."""
    if not _is_list(prompt_token_ids):
        raise TypeError("prompt_token_ids: expected a list of token ids or a list of such lists, "
                        f"got {type(prompt_token_ids).__name__}")
    items = list(prompt_token_ids)
    if not items:
        raise ValueError("prompt_token_ids: the list is empty; give at least one prompt")
    if _is_token_id(items[0]):
        return [items]  # one prompt
    for i, ids in enumerate(items):
        if not _is_list(ids):
            raise TypeError(f"prompt_token_ids[{i}]: expected a list of token ids, got {type(ids).__name__}")
    return items
