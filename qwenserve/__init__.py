"""qwenserve: a serving engine for the Qwen (v1) model family."""
__version__ = "0.1.0"

from qwenserve.config import EngineConfig
from qwenserve.outputs import CompletionOutput, RequestOutput
from qwenserve.sampling_params import SamplingParams
from qwenserve.structured_output import StructuredOutput


def __getattr__(name):
    # The engine pulls in torch and the model: import it only when asked for.
    if name == "LLM":
        from qwenserve.llm import LLM
        return LLM
    if name == "LLMEngine":
        from qwenserve.engine import LLMEngine
        return LLMEngine
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "EngineConfig", "SamplingParams", "StructuredOutput", "RequestOutput", "CompletionOutput"]
