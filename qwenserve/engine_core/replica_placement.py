"""Where data-parallel replicas go on a Ray cluster (`--dp N`): the bundles of one replica's
placement group, and which node each replica is pinned to. Plain data in, plain data out: no
Ray here (`ray_replica.py` asks Ray for the cluster's free resources and makes the groups).

One placement group per replica, strategy PACK: bundle 0 holds the engine core (the actor that
runs the core's loop; with tp = 1 it also holds the GPU its in-process worker uses), bundles
1..tp the tensor-parallel ranks when tp > 1 (the core's `RayExecutor` finds them there).

Across replicas, SPREAD where the cluster allows: replicas are pinned to nodes in turn, each
to the node that fits a whole replica and holds the fewest replicas so far (ties: the most of
the scarce resource left, GPUs or else CPUs; then the node's name), so two replicas share a
node only when no other node has room. A replica no node has room for is left to Ray (its
PACK group may then span nodes, or wait for resources). Pinning is Ray's node resource
("node:<ip>", which every node has one of) asked for in a tiny amount by every bundle.
"""
from __future__ import annotations

from typing import Optional

NODE_RESOURCE_PREFIX = "node:"
_PIN_AMOUNT = 0.001
_HEAD_MARKER = "node:__internal_head__"


def replica_bundles(tensor_parallel_size: int, gpu: bool) -> list[dict[str, float]]:
    """The placement-group bundles of one replica: the core, then one per rank when tp > 1."""
    rank = {"CPU": 1.0, "GPU": 1.0} if gpu else {"CPU": 1.0}
    if tensor_parallel_size == 1:
        return [dict(rank)]  # the core runs the model itself
    return [{"CPU": 1.0}] + [dict(rank) for _ in range(tensor_parallel_size)]


def node_resource(resources: dict[str, float]) -> Optional[str]:
    """The "node:<ip>" resource among a node's resources (None when it has none)."""
    for name in resources:
        if name.startswith(NODE_RESOURCE_PREFIX) and name != _HEAD_MARKER:
            return name
    return None


def _need(bundles: list[dict[str, float]]) -> dict[str, float]:
    need: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            need[name] = need.get(name, 0.0) + amount
    return need


def spread_replicas(available: dict[str, dict[str, float]], bundles: list[dict[str, float]],
                    num_replicas: int) -> list[Optional[str]]:
    """Per replica, the node resource ("node:<ip>") to pin it to, or None to let Ray place it.
    `available`: free resources per node (any key; each node's dict lists its "node:<ip>")."""
    need = _need(bundles)
    scarce = "GPU" if "GPU" in need else "CPU"
    left = {node: dict(resources) for node, resources in available.items() if node_resource(resources)}
    placed = {node: 0 for node in left}
    plan: list[Optional[str]] = []
    for _ in range(num_replicas):
        fits = [node for node, res in left.items()
                if all(res.get(name, 0.0) >= amount - 1e-9 for name, amount in need.items())]
        if not fits:
            plan.append(None)
            continue
        node = min(fits, key=lambda n: (placed[n], -left[n].get(scarce, 0.0), node_resource(left[n])))
        for name, amount in need.items():
            left[node][name] -= amount
        placed[node] += 1
        plan.append(node_resource(left[node]))
    return plan


def pinned(bundles: list[dict[str, float]], node: Optional[str]) -> list[dict[str, float]]:
    """The bundles, each also asking for a sliver of `node`'s node resource (none: unchanged)."""
    if node is None:
        return [dict(b) for b in bundles]
    return [dict(b, **{node: _PIN_AMOUNT}) for b in bundles]
