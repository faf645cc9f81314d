"""`RayExecutor`: tensor parallelism over Ray actors, one actor per rank (rank 0 included).

    driver (engine)                      Ray placement group, one bundle per rank (PACK)
    ───────────────                      ┌──────────────┐ ┌──────────────┐
    execute_model(out) ── out ─────────► │ rank 0 actor │ │ rank 1 actor │ ...
      one pickle, same bytes to every    │ Worker shard │◄┼►Worker shard │  gloo / NCCL
      rank over the step channel ◄─────  │ samples      │ │ acks         │  all-reduces
                                         └──────────────┘ └──────────────┘

Ray places the ranks, starts and kills the actors and reports their deaths; it carries no
per-step traffic. At start-up each actor runs one long `serve_steps` call whose loop connects
to the driver's `StepChannel` (`step_channel.py`: TCP on the driver's node IP, so it works
across nodes) and then serves every step over that socket.

Rank 0 lives in an actor too, so the driver process never joins the process group and its
global tensor-parallel group stays the single-rank one (a tp = 1 engine can share the process).

Fail fast: a step waits on every rank's socket in short polls. EOF or a reset on a rank's socket
(its process died: killed, OOM), or its `serve_steps` call ending (Ray saw the actor die, e.g.
a lost node), fails the step at once with a `RuntimeError` naming the rank, although its peers
are still blocked in a collective (they give up after the process group's timeout, or are
killed by `shutdown`); an exception inside a rank's step comes back with the rank and its
traceback. After a failure the executor stays failed: every later call raises the same error.

Ray is imported only here and in `ray_cluster.py` (joining or starting the cluster);
`make_executor` imports this module only when tp > 1. Inside a data-parallel replica (the core
is a Ray actor in its replica's placement group) the ranks take that group's bundles 1..tp.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import threading
import time
from typing import Callable, Optional, Sequence

import ray
from ray.exceptions import RayActorError, RayError
from ray.util.placement_group import get_current_placement_group, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwenserve.config import EngineConfig
from qwenserve.kernels._triton import AUTO_MARKER, INTERPRET_VAR
from qwenserve.model.config import QwenConfig
from qwenserve.model.loader import checkpoint_files
from qwenserve.scheduler.output import SchedulerOutput
from qwenserve.worker import ray_cluster
from qwenserve.worker.distributed import check_tp_size, destroy_distributed, free_port, init_distributed
from qwenserve.worker.model_runner import ModelRunnerOutput
from qwenserve.worker.step_channel import RankError, StepChannel, serve_steps

# How often a waiting start-up call looks for ranks that failed while their peers are still busy.
POLL_S = 0.5
CONNECT_TIMEOUT_S = 60.0
PLACEMENT_TIMEOUT_S = float(os.environ.get("QWENSERVE_RAY_PLACEMENT_TIMEOUT_S", "120"))
HEALTH_TIMEOUT_S = 10.0
SHUTDOWN_TIMEOUT_S = 10.0
logger = logging.getLogger(__name__)


class RankWorker:
    """One rank inside its Ray actor: process group, `Worker` (weights shard, KV cache, runner)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.worker = None

    def node_address(self) -> tuple[str, int]:
        """This node's IP and a free port on it: the rendezvous address when this is rank 0."""
        ip = ray.util.get_node_ip_address()
        return ip, free_port(ip)

    @ray.method(concurrency_group="health")
    def pid(self) -> int:
        return os.getpid()

    def load(self, config: EngineConfig, model_dir: str, master_addr: str, master_port: int) -> int:
        """Joins the process group, loads this rank's shard; returns the KV blocks that fit here."""
        from qwenserve.worker.worker import Worker, resolve_device

        # Ray exposes only this actor's GPU (CUDA_VISIBLE_DEVICES), so it is always device 0.
        device = resolve_device(config, 0)
        init_distributed(self.rank, self.world_size, master_addr, master_port, device)
        self.worker = Worker(config, model_dir, local_rank=0)
        if self.rank == 0:  # the sampler's rank: structured-output masks need the vocabulary
            from qwenserve.structured_output.vocabulary import warm_up_in_background
            warm_up_in_background()
        self.worker.load_model()
        return self.worker.determine_num_blocks()

    def init_kv_cache(self, num_blocks: int):
        self.worker.init_kv_cache(num_blocks)
        return self.worker.device, self.worker.dtype

    def serve_steps(self, address: tuple[str, int], authkey: bytes) -> int:
        """Serves every step sent over the driver's step channel until it closes (occupies
        this actor's default concurrency group for the engine's lifetime)."""
        return serve_steps(address, authkey, self.rank, self.worker.execute_model, CONNECT_TIMEOUT_S)

    @ray.method(concurrency_group="health")
    def ping(self) -> int:
        # Its own concurrency group: answers while the step loop (or a stuck collective) runs.
        return self.rank

    def shutdown(self) -> None:
        destroy_distributed()


_RankActor = ray.remote(concurrency_groups={"health": 1})(RankWorker)


class RayExecutor:
    def __init__(self, config: EngineConfig, model_dir: str,
                 progress: Optional[Callable[[int, int], None]] = None):
        self.tp = config.tensor_parallel_size
        check_tp_size(QwenConfig.from_dir(model_dir), self.tp)  # before anything starts Ray
        self.actors: list = []
        self._channel: Optional[StepChannel] = None
        self._serve_refs: list = []
        self.num_blocks = 0
        self._pg = None
        self._owns_ray = False
        self._failure: Optional[str] = None
        self._starting = True
        try:
            self._start(config, model_dir)
        except BaseException:
            self.shutdown()
            raise
        self._starting = False
        if progress:
            # The ranks load in their own processes; the driver reports only completion.
            total = sum(len(names) for names in checkpoint_files(model_dir).values())
            progress(total, total)

    def _start(self, config: EngineConfig, model_dir: str) -> None:
        tp = self.tp
        self._owns_ray = ray_cluster.init_ray(config, num_cpus=tp + 1)  # + the driver's CPU
        gpu = ray_cluster.use_gpus(config, tp, f"tensor_parallel_size {tp}")
        worker_config = dataclasses.replace(config, device="cuda" if gpu else "cpu")
        bundle = {"CPU": 1, "GPU": 1} if gpu else {"CPU": 1}
        # A data-parallel replica's core runs in bundle 0 of its replica's placement group,
        # which holds a bundle per rank after it (engine_core/replica_placement.py).
        pg, first_bundle = get_current_placement_group(), 1
        if pg is None:
            self._pg = pg = placement_group([dict(bundle) for _ in range(tp)], strategy="PACK")
            first_bundle = 0
        ready, _ = ray.wait([pg.ready()], timeout=PLACEMENT_TIMEOUT_S)
        if not ready:
            raise RuntimeError(f"Ray could not place {tp} ranks of {bundle} within "
                               f"{PLACEMENT_TIMEOUT_S:g}s; cluster resources: {ray.cluster_resources()}")
        if len(pg.bundle_specs) < first_bundle + tp:
            raise RuntimeError(f"the replica's placement group has {len(pg.bundle_specs)} bundles; "
                               f"{tp} ranks need {first_bundle + tp}")
        env = ray_cluster.actor_env(threads=(os.cpu_count() or 1) // tp, gpu=gpu,
                                    node_ip=ray.util.get_node_ip_address())
        self.actors = [
            _RankActor.options(
                num_cpus=1, num_gpus=1 if gpu else 0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=first_bundle + r),
                runtime_env={"env_vars": env},
            ).remote(r, tp)
            for r in range(tp)
        ]
        (addr, port), = self._wait([self.actors[0].node_address.remote()], "finding the rendezvous address")
        blocks = self._wait([a.load.remote(worker_config, model_dir, addr, port) for a in self.actors],
                            "loading the model")
        self.num_blocks = min(blocks)  # every rank must hold the same block ids
        described = self._wait([a.init_kv_cache.remote(self.num_blocks) for a in self.actors],
                               "allocating the KV cache")
        self.device, self.dtype = described[0]
        self._channel = StepChannel(ray.util.get_node_ip_address(), tp)
        self._serve_refs = [a.serve_steps.remote(self._channel.address, self._channel.authkey)
                            for a in self.actors]
        try:
            self._channel.accept(CONNECT_TIMEOUT_S, self._dead_ranks)
        except RankError as e:
            self._raise_rank_error(e, "connecting to the step channel")

    # ------------------------------------------------------------------ waiting on ranks
    def _wait(self, refs: Sequence, what: str, timeout: Optional[float] = None) -> list:
        """Results of `refs` (one per rank, in rank order), or a RuntimeError naming the first
        rank that failed as soon as it fails, even while the other ranks are still running."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            ready, not_ready = ray.wait(list(refs), num_returns=len(refs), timeout=POLL_S)
            if not not_ready:
                try:
                    return ray.get(list(refs))
                except RayError:
                    self._raise_failure(refs, rank_of, what)
                    raise
            self._raise_failure(ready, rank_of, what)
            if deadline is not None and time.monotonic() > deadline:
                late = ", ".join(str(rank_of[r]) for r in not_ready)
                raise RuntimeError(f"tensor-parallel rank(s) {late} did not answer within {timeout:g}s "
                                   f"while {what}")

    def _raise_failure(self, ready_refs: Sequence, rank_of: dict, what: str) -> None:
        """Raises for the failed ranks among `ready_refs`; returns if none failed. A dead rank
        is named in preference to a peer whose collective broke because of that death."""
        errors = _errors(ready_refs, rank_of)
        if not errors:
            return
        pending = [r for r in rank_of if r not in ready_refs]
        if pending and not any(isinstance(e, RayActorError) for e in errors.values()):
            # A broken collective usually means a peer died; Ray may report that a moment later.
            more, _ = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            errors.update(_errors(more, rank_of))
        dead = sorted(r for r, e in errors.items() if isinstance(e, RayActorError))
        rank = dead[0] if dead else min(errors)
        error = errors[rank]
        if isinstance(error, RayActorError):
            message = f"tensor-parallel worker rank {rank} died while {what}: {_first_line(error)}"
        else:
            cause = getattr(error, "cause", None) or error
            message = (f"tensor-parallel worker rank {rank} failed while {what}: "
                       f"{type(cause).__name__}: {_first_line(cause)}")
            if self._starting and isinstance(cause, ValueError):
                # A bad setting (e.g. a KV budget below 2 blocks) is the same ValueError as at tp = 1.
                raise ValueError(message) from error
        self._failure = message
        raise RuntimeError(message) from error

    def _dead_ranks(self) -> dict:
        """{rank: (died, why)} for the ranks whose `serve_steps` call has ended: the actor died
        (Ray says so), or the loop raised or returned. Never blocks."""
        refs = self._serve_refs
        if not refs:
            return {}
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0)
        gone = {}
        for ref in ready:
            rank = refs.index(ref)
            try:
                steps = ray.get(ref, timeout=0)
                gone[rank] = (False, f"its step loop ended after {steps} steps")
            except RayActorError as e:
                gone[rank] = (True, _first_line(e))
            except RayError as e:
                cause = getattr(e, "cause", None) or e
                gone[rank] = (False, f"its step loop failed: {type(cause).__name__}: {_first_line(cause)}")
        return gone

    def _raise_rank_error(self, error: RankError, what: str) -> None:
        verb = "died" if error.died else "failed"
        detail = error.detail.rstrip()
        sep = "\n" if "\n" in detail else " "  # a remote traceback starts on its own line
        self._failure = f"tensor-parallel worker rank {error.rank} {verb} while {what}:{sep}{detail}"
        raise RuntimeError(self._failure) from error

    # ------------------------------------------------------------------ executor interface
    def execute_model(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        if self._failure is not None:
            raise RuntimeError(self._failure)
        # One control message per step: pickled once, the same bytes to every rank.
        try:
            return self._channel.step(scheduler_output, self._dead_ranks)
        except RankError as e:
            self._raise_rank_error(e, "executing a step")

    def check_health(self) -> None:
        """Raises RuntimeError when a rank is dead or does not answer (or a step failed)."""
        if self._failure is not None:
            raise RuntimeError(self._failure)
        if not self.actors:
            raise RuntimeError("the Ray executor is shut down")
        gone = self._dead_ranks()
        if gone:
            rank = min(gone)
            self._raise_rank_error(RankError(rank, *gone[rank]), "serving steps")
        self._wait([a.ping.remote() for a in self.actors], "answering a health check",
                   timeout=HEALTH_TIMEOUT_S)

    def worker_pids(self) -> list[int]:
        """Each rank's process id, in rank order (tests kill one to check fail-fast)."""
        return self._wait([a.pid.remote() for a in self.actors], "reporting its pid")

    def shutdown(self) -> None:
        actors, self.actors = self.actors, []
        channel, self._channel = self._channel, None
        failed = self._failure is not None
        if self._failure is None:
            self._failure = "the Ray executor is shut down"
        if channel is not None:
            channel.close()  # each rank's step loop sees EOF and returns
        if actors and not failed:
            # Leave the process group cleanly where the ranks can still answer (after the step
            # loop, in the same concurrency group); then kill, which frees a rank's memory even
            # while it is stuck in a collective.
            refs = self._serve_refs + [a.shutdown.remote() for a in actors]
            ray.wait(refs, num_returns=len(refs), timeout=5)
        self._serve_refs = []
        pg, self._pg = self._pg, None
        owns_ray, self._owns_ray = self._owns_ray, False

        def teardown() -> None:
            for actor in actors:
                try:
                    ray.kill(actor)
                except Exception:  # already dead
                    pass
            if pg is not None:
                try:
                    remove_placement_group(pg)
                except Exception:
                    pass
            if owns_ray:
                ray.shutdown()

        # A Ctrl-C or a service manager's SIGTERM reaches the whole process group, local
        # raylet included; with the raylet gone these calls block forever, so bound them.
        thread = threading.Thread(target=teardown, name="ray-teardown", daemon=True)
        thread.start()
        thread.join(SHUTDOWN_TIMEOUT_S)
        if thread.is_alive():
            logger.warning("Ray teardown did not finish within %.0f s (is the local Ray already gone?); "
                           "leaving it to process exit", SHUTDOWN_TIMEOUT_S)


def _errors(refs: Sequence, rank_of: dict) -> dict:
    """rank -> the RayError held by each finished ref that failed."""
    errors = {}
    for ref in refs:
        try:
            ray.get(ref, timeout=0)
        except RayError as e:
            errors[rank_of[ref]] = e
    return errors


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
