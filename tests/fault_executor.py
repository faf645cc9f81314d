"""An executor plug-in for the server's failure tests (`--executor-plugin
tests.fault_executor:faulty_executor`): the real in-process executor, with a fault injected
inside the engine-core process on cue.

QWENSERVE_TEST_FAULT picks the fault; QWENSERVE_TEST_FAULT_FILE is the cue (the test creates
the file):
  fail-warm-up      the first step raises
  hold-warm-up      the first step waits for the cue, then runs
  crash-on-command  the step after the first one that returned a user request's token waits
                    for the cue, then raises (warm-up requests' ids start with "warmup-")
"""
import dataclasses
import os
import time

from qwenserve.worker.executor import InProcessExecutor

INJECTED = "injected engine failure"


def _wait_for_cue() -> None:
    path = os.environ["QWENSERVE_TEST_FAULT_FILE"]
    while not os.path.exists(path):
        time.sleep(0.01)


def faulty_executor(config, model_dir, progress=None):
    executor = InProcessExecutor(dataclasses.replace(config, executor_plugin=None), model_dir, progress)
    fault = os.environ["QWENSERVE_TEST_FAULT"]
    execute = executor.execute_model
    state = {"steps": 0, "user_output": False}

    def faulty_execute(scheduler_output):
        state["steps"] += 1
        if fault == "fail-warm-up":
            raise RuntimeError(INJECTED)
        if fault == "hold-warm-up" and state["steps"] == 1:
            _wait_for_cue()
        if fault == "crash-on-command" and state["user_output"]:
            _wait_for_cue()
            raise RuntimeError(INJECTED)
        output = execute(scheduler_output)
        if output is not None and any(not rid.startswith("warmup-") for rid in output.request_ids):
            state["user_output"] = True
        return output

    executor.execute_model = faulty_execute
    return executor
