"""Executors: how the engine reaches its workers. `InProcessExecutor` holds one worker (tp = 1);
`make_executor` picks the Ray executor when tp > 1, or calls `EngineConfig.executor_plugin`
when one is named (benchmarks' simulated device replaces the executor that way).

Every executor offers: `num_blocks`, `execute_model(SchedulerOutput) -> ModelRunnerOutput`,
`check_health()` and `shutdown()`.
"""
from __future__ import annotations

from typing import Callable, Optional

from qwenserve.config import EngineConfig, resolve_executor_plugin
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.worker.model_runner import ModelRunnerOutput
from qwenserve.worker.worker import Worker


class InProcessExecutor:
    def __init__(self, config: EngineConfig, model_dir: str,
                 progress: Optional[Callable[[int, int], None]] = None):
        self.worker = Worker(config, model_dir)
        self.worker.load_model(progress)
        self.num_blocks = self.worker.determine_num_blocks()
        self.worker.init_kv_cache(self.num_blocks)
        self.device, self.dtype = self.worker.device, self.worker.dtype

    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduler_output)

    def check_health(self) -> None:
        return None

    def shutdown(self) -> None:
        self.worker = None


def make_executor(config: EngineConfig, model_dir: str,
                  progress: Optional[Callable[[int, int], None]] = None):
    if config.executor_plugin is not None:
        return resolve_executor_plugin(config.executor_plugin)(config, model_dir, progress)
    if config.tensor_parallel_size == 1:
        return InProcessExecutor(config, model_dir, progress)
    from qwenserve.worker.ray_executor import RayExecutor  # ray is imported only when tp > 1

    return RayExecutor(config, model_dir, progress)
