"""`pipelines.pool`: how many model actors a job runs on a cluster, with what GPU share, CPUs and threads."""

from __future__ import annotations

from pipelines.args import PipelineArgs
from pipelines.pool import TASK_CPUS, NodeShape, model_calls, pool_sizes
from sentiment.config import ModelConfig

ABSENT_MODEL = ModelConfig(model_id="/nonexistent/model")

GIB = 2**30


def test_default_pools_put_an_actor_on_every_core_and_one_on_every_gpu() -> None:
    args = PipelineArgs(model=ABSENT_MODEL, input="in", output="out")
    on_cpus = pool_sizes(args, cluster_gpus=0, nodes=[NodeShape(2, 16 * GIB)], calls=40, actor_bytes=0.6 * GIB)
    assert (on_cpus.num_gpus, on_cpus.min_actors, on_cpus.max_actors, on_cpus.cpu_threads) == (0.0, 2, 2, 1)
    # The actors leave one logical CPU to Ray Data's reads and writes.
    assert on_cpus.num_cpus * 2 + TASK_CPUS == 2
    # A job of one model call: one actor, with every core.
    small = pool_sizes(args, 0, [NodeShape(2, 16 * GIB)], calls=1, actor_bytes=0.6 * GIB)
    assert (small.max_actors, small.cpu_threads, small.num_cpus) == (1, 2, 1.0)
    # Three CPU nodes: an actor per core of the smallest, on each.
    three = pool_sizes(args, 0, [NodeShape(16), NodeShape(16), NodeShape(8)], calls=1000)
    assert (three.min_actors, three.max_actors, three.cpu_threads) == (24, 24, 1)
    # BERT-large in fp32 (1.8 GiB with its process) on 16 cores and 16 GiB: 7 copies, 2 threads each.
    large = pool_sizes(args, 0, [NodeShape(16, 16 * GIB)], calls=1000, actor_bytes=1.8 * GIB)
    assert (large.max_actors, large.cpu_threads) == (7, 2)
    assert "7 per node by memory" in large.reason
    on_gpus = pool_sizes(args, cluster_gpus=4, nodes=[NodeShape(8), NodeShape(32), NodeShape(32)])
    assert (on_gpus.num_gpus, on_gpus.min_actors, on_gpus.max_actors, on_gpus.cpu_threads) == (1.0, 1, 4, None)
    assert on_gpus.num_cpus == 1.0
    # GPU nodes that start at zero: a number asks for GPU actors all the same (the autoscaler adds the
    # nodes); one actor unless --actors asks for more.
    from_zero = pool_sizes(args.model_copy(update={"num_gpus": 1.0}), 0, [NodeShape(8)])
    assert (from_zero.num_gpus, from_zero.min_actors, from_zero.max_actors) == (1.0, 1, 1)
    four = pool_sizes(args.model_copy(update={"num_gpus": 1.0, "min_actors": 1, "max_actors": 4}), 0, [NodeShape(8)])
    assert (four.num_gpus, four.min_actors, four.max_actors) == (1.0, 1, 4)
    # Flags win.
    fixed = pool_sizes(
        args.model_copy(update={"min_actors": 2, "max_actors": 2, "cpu_threads": 3, "num_cpus": 1.5}),
        0,
        [NodeShape(16)],
        calls=1,
    )
    assert (fixed.min_actors, fixed.max_actors, fixed.cpu_threads, fixed.num_cpus) == (2, 2, 3, 1.5)
    # --actors alone: the node's cores shared among them.
    two = pool_sizes(args.model_copy(update={"max_actors": 4}), 0, [NodeShape(16)])
    assert (two.min_actors, two.max_actors, two.cpu_threads) == (1, 4, 4)


def test_small_slices_share_a_model_call() -> None:
    assert model_calls([1024] * 39 + [64], 1024) == 40  # one 40,000-row file
    assert model_calls([500] * 4, 1024) == 2  # four 500-row files: 1,500 rows, then 500
    assert model_calls([80, 80, 86], 1024) == 1
    assert model_calls([], 1024) == 0


def test_auto_on_a_cluster_without_gpus_says_at_start_that_it_runs_on_cpus_and_how_to_ask_for_gpus() -> None:
    from pipelines.pool import auto_on_cpu_warning

    auto = PipelineArgs(input="in", output="out")
    # A head-only autoscaling cluster the job joined (ray job submit sets RAY_ADDRESS), or several nodes.
    for node_count, joined in ((1, True), (3, False)):
        warning = auto_on_cpu_warning(auto, 0, node_count, joined)
        assert warning is not None
        assert "runs on CPU actors" in warning
        assert "--num-gpus 1" in warning
    # A laptop's own Ray, GPUs up, or an explicit number: nothing to say.
    assert auto_on_cpu_warning(auto, 0, 1, joined=False) is None
    assert auto_on_cpu_warning(auto, 2, 3, joined=True) is None
    assert auto_on_cpu_warning(auto.model_copy(update={"num_gpus": 0.0}), 0, 3, joined=True) is None
    assert auto_on_cpu_warning(auto.model_copy(update={"num_gpus": 1.0}), 0, 3, joined=True) is None
