"""Engine cores as Ray actors: the data-parallel replicas of `qwenserve launch --dp N`.

    front end (Ray driver)                              replica i: Ray actor in placement group i
    AsyncCoreClient i ── PUSH tcp://<replica IP>:p ───► EngineCoreActor: EngineCoreProc (the same
      PULL tcp://<front-end IP>:q ◄──────────── PUSH     input/output threads and busy loop as the
      watches: the actor's `run` call (Ray),             core process), EngineCore, its executor
      its pidfd when on this machine                     (tp > 1: RayExecutor, ranks in bundles 1..tp)

An actor's process runs the core's own loop (`EngineCoreProc.run`) inside one long `run` call:
nothing of the engine changes, only where the process comes from (Ray places it, by placement
group, on any node) and its sockets (tcp on its node's IP, so a replica on another node is
reached the same way; 127.0.0.1 when the local cluster is loopback-only). Requests and outputs
never go through Ray: Ray places, starts, kills and watches the actors.

Liveness. A replica is dead the moment (a) its `run` call ends (Ray reports an actor whose
process died, or whose node was lost, as a failed call; the front end awaits it), or (b) its
process exits, seen through a pidfd when the actor runs on the front end's machine (within
milliseconds, whether or not Ray has noticed), or (c) the core sends `engine_dead` (a failure it
caught itself, e.g. a rank died). Its life is tied to the front end's: Ray kills an actor whose
owner (the front end, the driver) dies, and a local cluster goes with the process that started it.

`RayCoreReplica` is the front end's handle on one replica, with `CoreProcess`'s interface, so
`AsyncCoreClient` drives either. `start_ray_replicas` joins or starts Ray, plans the placement
(`replica_placement.py`) and makes one placement group per replica; `RayReplicaSet.close`
removes the groups (and stops a Ray it started) once every replica's client has shut down.
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import sys
import threading
from typing import Callable, Optional

import ray
from ray.exceptions import RayError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from qwenserve.config import EngineConfig
from qwenserve.engine_core.client import PidWatch
from qwenserve.engine_core.replica_placement import pinned, replica_bundles, spread_replicas
from qwenserve.worker import ray_cluster

logger = logging.getLogger(__name__)

PLACEMENT_TIMEOUT_S = float(os.environ.get("QWENSERVE_RAY_PLACEMENT_TIMEOUT_S", "120"))
START_TIMEOUT_S = 120.0          # an actor's process to start and bind its socket (not the model)
DP_RANK_ENV = "QWENSERVE_DP_RANK"  # set in each replica's environment: its index


class EngineCoreActor:
    """One replica's engine core, inside its Ray actor's process."""

    def start(self, config: EngineConfig, model_dir: str, output_address: str, log_level: str,
              replica: int, front_end: tuple[str, int]) -> tuple[str, int, str]:
        """Binds the core's input socket and connects its output to the front end (`front_end`:
        its Ray node id and pid); returns (input address, this process's pid, Ray node id). The
        model loads in `run`."""
        from qwenserve.engine_core.process import EngineCoreProc

        logging.basicConfig(level=log_level, stream=sys.stderr,
                            format=f"%(asctime)s %(levelname)s %(name)s [engine core {replica}]: %(message)s")
        ip = ray.util.get_node_ip_address()
        node_id = ray.get_runtime_context().get_node_id()
        # On the front end's machine the core also watches the front end's process: a local
        # cluster dies with the front end, and Ray then has nobody left to stop its actors.
        owner_pid = front_end[1] if front_end[0] == node_id else None
        self.proc = EngineCoreProc(config, model_dir, f"tcp://{_zmq_host(ip)}:*", output_address,
                                   parent_pid=None, show_load_progress=False, owner_pid=owner_pid)
        return self.proc.input_address, os.getpid(), node_id

    def run(self) -> int:
        """The core's loop: loads the model, serves until told to stop; returns its exit code
        (or ends this process, when it stopped because the front end is gone)."""
        code = self.proc.run()
        if self.proc.front_end_gone.is_set():
            sys.stderr.flush()
            os._exit(code)
        return code


_CoreActor = ray.remote(EngineCoreActor)


def _zmq_host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


class RayCoreReplica:
    """The front end's handle on replica `index`: its actor in `placement_group` (bundle 0)."""

    def __init__(self, index: int, config: EngineConfig, model_dir: str, pg, gpu: bool,
                 log_level: str, env: dict[str, str]):
        self.index, self.config, self.model_dir = index, config, model_dir
        self.pg, self.gpu, self.log_level = pg, gpu, log_level
        self.env = dict(env, **{DP_RANK_ENV: str(index)})
        self.actor = None
        self.input_address: Optional[str] = None
        self.pid: Optional[int] = None
        self.local = False            # whether the actor's process is on this machine
        self._run_ref = None
        self._pid_watch: Optional[PidWatch] = None
        self._on_exit: Optional[Callable[[], None]] = None

    @property
    def output_bind_address(self) -> str:
        """The front end's output socket for this replica: tcp on this node's IP, any port."""
        return f"tcp://{_zmq_host(ray.util.get_node_ip_address())}:*"

    def start(self, output_address: str) -> None:
        """Starts the actor and its core's sockets, then its loop (blocking; the model loads
        after this returns, and the core says when it is ready)."""
        core_gpus = 1 if self.gpu and self.config.tensor_parallel_size == 1 else 0
        self.actor = _CoreActor.options(
            num_cpus=1, num_gpus=core_gpus, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=0),
            runtime_env={"env_vars": self.env},
        ).remote()
        front_end = (ray.get_runtime_context().get_node_id(), os.getpid())
        ref = self.actor.start.remote(self.config, self.model_dir, output_address, self.log_level, self.index,
                                      front_end)
        try:
            self.input_address, self.pid, node_id = ray.get(ref, timeout=START_TIMEOUT_S)
        except RayError as e:
            raise RuntimeError(f"data-parallel replica {self.index} did not start: {_first_line(e)}") from e
        self.local = node_id == ray.get_runtime_context().get_node_id()
        self._run_ref = self.actor.run.remote()

    # ------------------------------------------------------------------ liveness
    def watch_exit(self, on_exit: Callable[[], None]) -> None:
        """Calls `on_exit()` on the running event loop when the actor's `run` call ends (Ray)
        or, on this machine, when its process exits (pidfd), whichever is first."""
        import asyncio

        loop = asyncio.get_running_loop()
        self._on_exit = on_exit
        if self.local:
            self._pid_watch = PidWatch(self.pid, self._fire)
        future: concurrent.futures.Future = self._run_ref.future()
        future.add_done_callback(lambda _: loop.call_soon_threadsafe(self._fire))

    def _fire(self) -> None:
        on_exit = self._on_exit
        self.unwatch_exit()
        if on_exit is not None:
            on_exit()

    def unwatch_exit(self) -> None:
        self._on_exit = None
        if self._pid_watch is not None:
            self._pid_watch.close()
            self._pid_watch = None

    def exit_reason(self) -> str:
        where = f"data-parallel replica {self.index} (pid {self.pid})"
        try:
            code = ray.get(self._run_ref, timeout=2.0)
        except RayError as e:
            return f"{where} died: {_first_line(e)}"
        except Exception:  # noqa: BLE001 - e.g. the pidfd saw the exit before Ray did
            return f"{where} exited unexpectedly (its process is gone)"
        return f"{where} stopped (exit code {code})"

    @property
    def exitcode(self) -> Optional[int]:
        """None while the core's loop runs; else its exit code (1 when the actor died)."""
        if self._run_ref is None:
            return None
        ready, _ = ray.wait([self._run_ref], timeout=0)
        if not ready:
            return None
        try:
            return ray.get(self._run_ref, timeout=0)
        except RayError:
            return 1

    # ------------------------------------------------------------------ stopping
    def join(self, timeout: float) -> bool:
        """Waits for the core's loop to end; True when it has."""
        if self._run_ref is None:
            return True
        ready, _ = ray.wait([self._run_ref], timeout=timeout)
        return bool(ready)

    def kill(self) -> None:
        if self.actor is not None:
            try:
                ray.kill(self.actor)
            except Exception:  # noqa: BLE001 - already dead
                pass

    def cleanup(self) -> None:
        """Frees the actor (its loop has ended or it is dead); the group goes with the set."""
        self.kill()
        self.actor = None


class RayReplicaSet:
    """The replicas of one front end and what they hold in Ray."""

    def __init__(self, replicas: list[RayCoreReplica], placement_groups: list, owns_ray: bool):
        self.replicas, self.placement_groups, self.owns_ray = replicas, placement_groups, owns_ray

    def close(self) -> None:
        """Removes the placement groups and stops Ray if `start_ray_replicas` started it; bounded
        (a raylet already gone, e.g. after a Ctrl-C to the process group, blocks Ray's calls)."""
        groups, self.placement_groups = self.placement_groups, []
        owns_ray, self.owns_ray = self.owns_ray, False

        def teardown() -> None:
            for replica in self.replicas:
                replica.cleanup()
            for pg in groups:
                try:
                    remove_placement_group(pg)
                except Exception:  # noqa: BLE001 - already gone with the cluster
                    pass
            if owns_ray:
                ray.shutdown()

        thread = threading.Thread(target=teardown, name="ray-replicas-teardown", daemon=True)
        thread.start()
        thread.join(10.0)
        if thread.is_alive():
            logger.warning("Ray teardown of the replicas did not finish within 10 s; leaving it to process exit")


def start_ray_replicas(config: EngineConfig, model_dir: str, log_level: str = "INFO") -> RayReplicaSet:
    """Joins or starts Ray and makes one placement group per replica (PACK; replicas spread over
    nodes where the cluster allows); blocking. The actors start in `RayCoreReplica.start`."""
    dp, tp = config.data_parallel_size, config.tensor_parallel_size
    bundles = replica_bundles(tp, gpu=False)
    owns_ray = ray_cluster.init_ray(config, num_cpus=dp * len(bundles) + 1)  # + the front end's CPU
    groups: list = []
    try:
        gpu = ray_cluster.use_gpus(config, dp * tp, f"data_parallel_size {dp} x tensor_parallel_size {tp}")
        bundles = replica_bundles(tp, gpu)
        plan = spread_replicas(_available_per_node(), bundles, dp)
        groups = [placement_group(pinned(bundles, node), strategy="PACK") for node in plan]
        ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=PLACEMENT_TIMEOUT_S)
        if len(ready) < len(groups):
            raise RuntimeError(f"Ray could not place {dp} replicas of {bundles} within {PLACEMENT_TIMEOUT_S:g}s; "
                               f"cluster resources: {ray.cluster_resources()}")
        logger.info("data-parallel replicas placed: %s", ", ".join(node or "anywhere" for node in plan))
        # The front end's sys.path: executor plug-ins (e.g. the benchmarks' simulated device) and
        # the source tree stay importable in the actors, as in a core process.
        paths = tuple(os.path.abspath(p) if p else os.getcwd() for p in sys.path)
        env = ray_cluster.actor_env(threads=max(1, (os.cpu_count() or 1) // (dp * max(tp, 1))), extra_paths=paths)
        config = _replica_config(config, gpu)
        replicas = [RayCoreReplica(i, config, model_dir, pg, gpu, log_level, env) for i, pg in enumerate(groups)]
    except BaseException:
        RayReplicaSet([], groups, owns_ray).close()
        raise
    return RayReplicaSet(replicas, groups, owns_ray)


def _replica_config(config: EngineConfig, gpu: bool) -> EngineConfig:
    import dataclasses

    # Each replica is a single engine core; its ranks (tp > 1) join the cluster it runs in.
    return dataclasses.replace(config, data_parallel_size=1, device="cuda" if gpu else "cpu")


def _available_per_node() -> dict[str, dict[str, float]]:
    try:
        from ray._private.state import available_resources_per_node

        return available_resources_per_node()
    except Exception:  # noqa: BLE001 - a private API: without it, every replica is left to Ray
        logger.warning("cannot read Ray's free resources per node: replicas are placed by Ray alone")
        return {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


__all__ = ["EngineCoreActor", "RayCoreReplica", "RayReplicaSet", "start_ray_replicas"]
