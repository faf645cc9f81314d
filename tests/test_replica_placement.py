"""Where `--dp N` replicas go, without Ray: one PACK group per replica (the core's bundle, then
one per rank), replicas spread over nodes while nodes with room remain."""
from qwenserve.engine_core.replica_placement import pinned, replica_bundles, spread_replicas


def node(ip, cpus, gpus=0):
    return {"CPU": float(cpus), "GPU": float(gpus), f"node:{ip}": 1.0, "memory": 1e10}


def test_a_replicas_bundles():
    assert replica_bundles(1, gpu=True) == [{"CPU": 1.0, "GPU": 1.0}]      # the core runs the model
    assert replica_bundles(1, gpu=False) == [{"CPU": 1.0}]
    assert replica_bundles(2, gpu=True) == [{"CPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0, "GPU": 1.0}]


def test_replicas_spread_over_nodes_before_sharing_one():
    cluster = {"a": node("10.0.0.1", 16, 8), "b": node("10.0.0.2", 16, 8), "c": node("10.0.0.3", 16, 4)}
    tp4 = replica_bundles(4, gpu=True)
    # Four replicas of 4 GPUs: one per node first (most GPUs left first), then the nodes with room.
    assert spread_replicas(cluster, tp4, 4) == ["node:10.0.0.1", "node:10.0.0.2", "node:10.0.0.3",
                                                "node:10.0.0.1"]
    # A fifth has room on b only; a sixth nowhere: left to Ray.
    assert spread_replicas(cluster, tp4, 6)[4:] == ["node:10.0.0.2", None]


def test_one_node_holds_every_replica_that_fits():
    # 2 x (core + 2 ranks) = 6 CPUs: on 5, the second replica is left to Ray (it waits for room).
    assert spread_replicas({"x": node("127.0.0.1", 5)}, replica_bundles(2, gpu=False), 2) == \
        ["node:127.0.0.1", None]
    assert spread_replicas({"x": node("127.0.0.1", 6)}, replica_bundles(2, gpu=False), 2) == \
        ["node:127.0.0.1", "node:127.0.0.1"]


def test_pinning_asks_every_bundle_for_a_sliver_of_the_node():
    bundles = pinned(replica_bundles(2, gpu=False), "node:10.0.0.2")
    assert all(b["node:10.0.0.2"] == 0.001 for b in bundles) and bundles[0]["CPU"] == 1.0
    assert pinned(replica_bundles(2, gpu=False), None) == replica_bundles(2, gpu=False)
