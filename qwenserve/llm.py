"""`LLM`: the offline Python API: generate for prompts or token ids, and ChatML chat."""
from __future__ import annotations

import sys
import time
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
                 prompt_token_ids: Optional[Sequence[Sequence[int]]] = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Completions in the order of the inputs."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("input: give exactly one of prompts, prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        inputs = ([{"prompt": p} for p in prompts] if prompts is not None
                  else [{"prompt_token_ids": ids} for ids in prompt_token_ids])
        return self._run(inputs, sampling_params, use_tqdm)

    def chat(self, messages: Union[list[dict], Sequence[list[dict]]],
             sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
             system: Optional[str] = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Replies to one conversation (a list of messages) or to several."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([{"messages": c, "system": system} for c in conversations], sampling_params, use_tqdm)

    def _run(self, inputs: list[dict], sampling_params, use_tqdm: bool) -> list[RequestOutput]:
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params = [sampling_params or self.engine.default_params()] * len(inputs)
        else:
            params = list(sampling_params)
            if len(params) != len(inputs):
                raise ValueError(f"sampling_params: {len(params)} given for {len(inputs)} inputs")
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
