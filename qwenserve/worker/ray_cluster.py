"""Reaching a Ray cluster: joining `ray_address` (bounded), or starting a small local one; whether
actors get GPUs; the environment every actor needs. Shared by the tensor-parallel executor
(ranks) and the data-parallel launcher (engine cores).

A local cluster started with `EngineConfig.ray_local_loopback` listens on 127.0.0.1 only:
Ray's single-node mode (`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`, the default on macOS and
Windows), set in this process's environment before `ray.init`, so that the GCS, the raylet and
every worker inherit it and `ray.util.get_node_ip_address()` is 127.0.0.1 everywhere (Ray would
otherwise swap 127.0.0.1 for the machine's routable address). Joining a cluster never changes
its addresses.

Ray is imported by this module: import it only when Ray is wanted (dp > 1 or tp > 1).
"""
from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
from typing import Optional

import ray
from ray._private import ray_constants

import qwenserve
from qwenserve.config import EngineConfig
from qwenserve.kernels._triton import AUTO_MARKER, INTERPRET_VAR

# Joining a cluster (`ray_address`): the TCP check of the address, per host tried, and the
# attempts Ray's GCS connect loop makes (Ray reads this variable at ray.init; one attempt
# waits ~40 s for a GCS that does not answer; its default of 20 attempts is ~15 minutes).
RAY_CONNECT_TIMEOUT_S = float(os.environ.get("QWENSERVE_RAY_CONNECT_TIMEOUT_S", "5"))
RAY_GCS_WAIT_ENV = "RAY_gcs_server_port_wait_time_s"
RAY_GCS_WAIT_ATTEMPTS = "1"
RAY_SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(qwenserve.__file__)))


@contextlib.contextmanager
def env_default(name: str, value: str):
    """Sets environment variable `name` to `value` for the block, unless the user set it."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def split_address(address: str) -> Optional[tuple[str, int]]:
    """(host, port) of "host:port", "[v6]:port" or "ray://host:port"; None when there is no
    port to check (e.g. "auto", which Ray resolves itself)."""
    rest = address.split("://", 1)[1] if "://" in address else address
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]") or "127.0.0.1", int(port)


def check_reachable(address: str, setting: str) -> None:
    """Fails in at most RAY_CONNECT_TIMEOUT_S per host when nothing accepts TCP connections at
    the cluster address (Ray itself would retry for many minutes). Ray swaps a loopback host for
    this node's IP, so either answering is enough."""
    parsed = split_address(address)
    if parsed is None:
        return
    host, port = parsed
    hosts = [host]
    if host == "localhost" or host.startswith("127.") or host == "::1":
        hosts.append(ray.util.get_node_ip_address())
    problems = []
    for h in hosts:
        try:
            with socket.create_connection((h, port), timeout=RAY_CONNECT_TIMEOUT_S):
                return
        except socket.timeout:
            problems.append(f"{h}:{port}: no answer within {RAY_CONNECT_TIMEOUT_S:g}s")
        except OSError as e:
            problems.append(f"{h}:{port}: {e.strerror or e}")
    raise ConnectionError(f"{setting}: cannot reach a Ray cluster at {address!r} "
                          f"({'; '.join(problems)}); is `ray start --head` running there?")


def init_ray(config: EngineConfig, num_cpus: int) -> bool:
    """Joins `config.ray_address` or $RAY_ADDRESS, else starts a small local Ray with `num_cpus`
    logical CPUs (on 127.0.0.1 only with `config.ray_local_loopback`). Returns whether this call
    started Ray (and so whether shutdown should stop it); False when Ray is already initialized
    here (e.g. inside an actor of the cluster).

    Joining is bounded: an address where nothing listens fails at once (`check_reachable`),
    and Ray's own GCS connect loop (20 attempts of ~40 s each by default) gets one attempt, so
    something that listens but is not a Ray GCS fails in about 40 s, not 15 minutes. Either
    failure is a ConnectionError naming the setting."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    setting = "ray_address" if config.ray_address else "ray_address ($RAY_ADDRESS)"
    address = config.ray_address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        check_reachable(address, setting)
        try:
            with env_default(RAY_GCS_WAIT_ENV, RAY_GCS_WAIT_ATTEMPTS), _no_sigterm_handler_warning():
                ray.init(address=address, log_to_driver=False)
        except (ConnectionError, RuntimeError, TimeoutError) as e:
            raise ConnectionError(f"{setting}: could not join the Ray cluster at {address!r}: "
                                  f"{type(e).__name__}: {e}") from e
        return True
    if config.ray_local_loopback:
        # The processes the cluster starts read the variable; this one read it when Ray was
        # imported, so its copy is set too. Both stay: this process's Ray is that cluster.
        os.environ[RAY_SINGLE_NODE_ENV] = "0"
        ray_constants.ENABLE_RAY_CLUSTER = False
    # A small object store: steps and requests cross on sockets of their own, not through Ray.
    with _no_sigterm_handler_warning():
        ray.init(address="local", num_cpus=num_cpus, object_store_memory=200 * 1024 ** 2,
                 include_dashboard=False, log_to_driver=False)
    return True


class _DropSigtermWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


@contextlib.contextmanager
def _no_sigterm_handler_warning():
    """Ray warns that it cannot install its SIGTERM handler (sys.exit) when started off the main
    thread, as a server starts it; the server handles SIGTERM itself (a drain), so that is as wanted."""
    ray_logger = logging.getLogger("ray._private.worker")
    quiet = _DropSigtermWarning()
    ray_logger.addFilter(quiet)
    try:
        yield
    finally:
        ray_logger.removeFilter(quiet)


def use_gpus(config: EngineConfig, num_gpus: int, what: str) -> bool:
    """GPU actors on "cuda", or on "auto" when the cluster has GPUs; too few GPUs is an error
    (`what` says who needs them), not a silent fall back to CPU actors."""
    if config.device == "cpu":
        return False
    gpus = ray.cluster_resources().get("GPU", 0)
    if config.device == "auto" and gpus == 0:
        return False
    if gpus < num_gpus:
        raise ValueError(f"device: {what} on CUDA needs {num_gpus} GPUs; the Ray cluster has {gpus:g} "
                         f"(device='cpu' runs on CPUs)")
    return True


def actor_env(threads: int, extra_paths: tuple = (), gpu: bool = False,
              node_ip: Optional[str] = None) -> dict[str, str]:
    """What an actor needs from the driver's environment: the source tree (and `extra_paths`,
    e.g. the driver's sys.path, where executor plug-ins live), the caches, one thread pool of
    `threads` (actors sharing cores must not each spawn one thread per core); on a loopback-only
    node (`node_ip`), gloo's and NCCL's sockets on the loopback interface too.

    Not the driver's TRITON_INTERPRET: each actor decides its own device environment. A GPU
    actor compiles its kernels (TRITON_INTERPRET=0, whatever the driver or the raylet it started
    has: a CPU-only driver switches the interpreter on for itself); a CPU actor leaves it to
    `kernels/_triton.py` in its own process (the interpreter, as it sees no CUDA)."""
    paths = [SOURCE_ROOT, *extra_paths, *os.environ.get("PYTHONPATH", "").split(os.pathsep)]
    env = {"PYTHONPATH": os.pathsep.join(dict.fromkeys(p for p in paths if p)),
           "OMP_NUM_THREADS": str(max(1, threads))}
    env.update({k: v for k, v in os.environ.items()
                if (k.startswith("QWENSERVE_") and k != AUTO_MARKER) or k == "HF_HOME"})
    if gpu:
        env[INTERPRET_VAR] = "0"
    loopback = _loopback_interface()
    if node_ip is not None and _is_loopback_ip(node_ip) and loopback is not None:
        for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            env[name] = os.environ.get(name, loopback)
    return env


def _is_loopback_ip(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _loopback_interface() -> Optional[str]:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), if this host has one."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)
