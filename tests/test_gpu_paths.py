"""Every GPU branch, tested without a GPU (issue 21): Ray nodes that declare GPUs they do not have
(``ray.cluster_utils.Cluster``), the ``meta`` device for device placement, and mocks where CUDA itself is
needed. One test (or more) per row of the issue's table, named after it."""

import argparse
import io
import json
import os
import types
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from PIL import Image

from rebalance.kernels.sinkhorn import sinkhorn_knopp_torch, soft_sinkhorn
from rebalance.losses import LDAMLoss
from rebalance.runtime.placement import ClusterCapacity, autoscaler_capacity, plan_embed, resolve_device
from rebalance.runtime.pool import ActorPool, PlacementError
from rebalance.runtime.session import ClusterResources, live_resources
from rebalance.spec import ClusterSpec, EmbedSpec, KMeansSpec, SpecError

ROOT = Path(__file__).resolve().parents[1]


def _probe() -> type:
    """An actor class that reports what it sees of the GPUs: CUDA_VISIBLE_DEVICES, Ray's GPU ids, its actor
    id. Defined in a function so that it travels to the workers by value (tests/ is not importable there)."""

    class Probe:
        def call(self, x: int) -> tuple:
            ctx = ray.get_runtime_context()
            return os.environ.get("CUDA_VISIBLE_DEVICES"), tuple(ray.get_gpu_ids()), ctx.get_actor_id(), x

    return Probe


Probe = _probe()


@pytest.fixture(scope="module")
def gpu_cluster():
    """A CPU-only head (1 CPU) and a node that declares 2 CPUs and 2 GPUs it does not have. A Ray already
    initialised in this process (the session's ``ray_local``) is put back afterwards."""
    from ray.cluster_utils import Cluster

    was_local = ray.is_initialized()
    if was_local:
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    cluster.add_node(num_cpus=2, num_gpus=2)
    ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
    cluster.wait_for_nodes()
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    if was_local:
        ray.init(
            address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False
        )


def resources(cpus=8, gpus=0, cpus_per_gpu=None, capacity=None, autoscaling=True):
    return ClusterResources(cpus, gpus, cpus_per_gpu, capacity or ClusterCapacity(), autoscaling)


# --- row 1: GPUs read from the live cluster only; the autoscaler is never asked for a GPU -----------------


def test_autoscaler_capacity_of_the_documented_cluster_yaml():
    # cluster.yaml: ray.worker.gpu, max_workers 4 (the anchor), resources {"CPU": 4, "GPU": 1}; CPU-only head
    assert autoscaler_capacity(ROOT / "cluster.yaml") == ClusterCapacity(gpus=4, cpus_per_gpu=4)
    assert autoscaler_capacity(ROOT / "no-such-file.yaml") == ClusterCapacity()


def test_cuda_requests_gpu_actors_when_none_is_live():
    capacity = autoscaler_capacity(ROOT / "cluster.yaml")
    plan = plan_embed("cuda", "auto", "auto", 10, resources(cpus=8, gpus=0, capacity=capacity))
    assert (plan.device, plan.workers, plan.num_gpus, plan.num_cpus, plan.threads) == ("cuda", 4, 1, 4, 4)
    # at most one actor per shard; an explicit count is what is asked for, placed or not
    assert plan_embed("cuda", "auto", "auto", 3, resources(capacity=capacity)).workers == 3
    assert plan_embed("cuda", 6, 2, 10, resources(capacity=capacity)).workers == 6
    # a joined cluster without a config: still asks (the pool fails after the placement timeout if never placed)
    assert plan_embed("cuda", "auto", "auto", 10, resources()).num_gpus == 1


def test_auto_resolves_from_the_cluster_config_not_the_moment():
    config = ClusterCapacity(gpus=4, cpus_per_gpu=4)
    assert resolve_device("auto", 0, config) == "cuda"  # 0 live GPUs, the autoscaler may add 4
    assert resolve_device("auto", 2, ClusterCapacity()) == "cuda"
    assert resolve_device("auto", 0, ClusterCapacity()) == "cpu"
    assert resolve_device("cpu", 2, config) == "cpu"
    cpu = plan_embed("auto", "auto", "auto", 10, resources(cpus=6))
    assert (cpu.device, cpu.workers, cpu.num_gpus, cpu.threads) == ("cpu", 6, 0, 1)
    assert plan_embed("auto", 2, "auto", 10, resources(cpus=6)).threads == 3


def test_cuda_on_a_local_ray_without_gpus_fails_at_once():
    with pytest.raises(RuntimeError, match="no GPU and no autoscaler"):
        plan_embed("cuda", "auto", "auto", 4, resources(autoscaling=False))


def test_live_resources_on_a_cluster_with_a_gpu_node(gpu_cluster):
    live = live_resources(autoscaling=False)
    assert (live.cpus, live.gpus, live.cpus_per_gpu) == (3, 2, 1)  # the GPU node: 2 CPUs / 2 GPUs
    assert plan_embed("auto", "auto", "auto", 8, live).num_cpus == 1


# --- row 2: one CPU per GPU actor; decode on one thread --------------------------------------------------


def test_cpus_per_gpu_auto_and_given():
    assert plan_embed("cuda", 1, "auto", 1, resources(gpus=1, cpus_per_gpu=16)).num_cpus == 16
    assert plan_embed("cuda", 1, "auto", 1, resources(gpus=8, cpus_per_gpu=96)).num_cpus == 16  # at most 16
    assert plan_embed("cuda", 1, "auto", 1, resources(gpus=1)).num_cpus == 4  # nothing known: 4
    assert plan_embed("cuda", 1, 6, 1, resources(gpus=1)).threads == 6
    with pytest.raises(SpecError, match="embed.cpus_per_gpu"):
        EmbedSpec(cpus_per_gpu=0)


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((40 + i, 30, 3), 10 * i, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_gpu_actor_decodes_on_a_pool_of_cpus_per_gpu_threads(monkeypatch, tmp_path):
    import threading

    import rebalance.models
    from rebalance.data.rows import RowBatch
    from rebalance.spec import DataSpec
    from rebalance.stages.embed import EmbedWorker

    real_load = rebalance.models.load_model
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(rebalance.models, "load_model", lambda name, pre, device, seed: real_load(name, pre))
    embed = EmbedSpec(model="rebalance-tiny", pretrained=None)
    worker = EmbedWorker(embed, DataSpec(path=str(tmp_path)), "parquet", "jpg", None, 3, "cuda")
    assert worker.decoders._max_workers == 3
    assert worker.encoder() == {"device": "cuda", "dtype": "bfloat16"}
    threads = set()
    decode = worker._decode_preprocess
    monkeypatch.setattr(
        worker, "_decode_preprocess", lambda d: (threads.add(threading.current_thread().name), decode(d))[1]
    )
    images = [_png(i) for i in range(12)] + [b"not an image"]
    prepared = worker._prepare(RowBatch(keys=[str(i) for i in range(13)], images=images))
    assert all(name.startswith("decode") for name in threads)
    assert prepared.reasons[:12] == [None] * 12 and prepared.reasons[12].startswith(
        "image:unsupported format"
    )
    for data, tensor in zip(images[:12], prepared.images[:12], strict=True):  # in order, as one thread would
        assert torch.equal(tensor, worker.model.preprocess(Image.open(io.BytesIO(data)).convert("RGB")))


def test_gpu_actor_without_a_visible_cuda_device_fails_clearly(tmp_path):
    from rebalance.spec import DataSpec
    from rebalance.stages.embed import EmbedWorker

    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match="torch sees no CUDA device"):
        EmbedWorker(EmbedSpec(), DataSpec(path=str(tmp_path)), "embeddings", None, None, 2, "cuda")


# --- row 3: workers above the GPU count wait forever ------------------------------------------------------


def test_gpu_pool_sizes_itself_to_what_ray_places(gpu_cluster):
    with ActorPool(Probe, 3, num_cpus=0, num_gpus=1, placement_timeout_s=60) as pool:
        results = pool.map("call", [(i,) for i in range(6)])
    assert [r[3] for r in results] == list(range(6))
    assert len({r[2] for r in results}) <= 2  # only 2 GPUs: the third actor is never placed, never waited on
    for visible, ids, _, _ in results:  # each placed actor sees exactly its own (declared) GPU
        assert len(ids) == 1 and visible == str(ids[0])


def test_unplaceable_pool_fails_with_a_message(gpu_cluster):
    message = r"placed none of 2 Probe actor\(s\) of 1 CPU\(s\) and 3 GPU"
    with (
        ActorPool(Probe, 2, num_gpus=3, placement_timeout_s=2) as pool,
        pytest.raises(PlacementError, match=message),
    ):
        pool.map("call", [(0,)])


# --- row 4: CPU actors see every GPU ----------------------------------------------------------------------


def test_cpu_actors_see_no_gpu_on_a_gpu_node(gpu_cluster):
    with ActorPool(Probe, 3, num_cpus=1) as pool:  # the head has 1 CPU: at least two land on the GPU node
        results = pool.map("call", [(i,) for i in range(9)])
    assert {(r[0], r[1]) for r in results} == {("", ())}


# --- row 5: k-means always in the driver, on faiss-cpu ----------------------------------------------------


def test_kmeans_placement():
    from rebalance.stages.cluster import kmeans_placement

    assert kmeans_placement(resources(capacity=ClusterCapacity(4, 4)), driver_gpu=False) == "gpu actor"
    assert kmeans_placement(resources(gpus=2), driver_gpu=False) == "gpu actor"
    assert kmeans_placement(resources(gpus=2), driver_gpu=True) == "driver"
    assert kmeans_placement(resources(), driver_gpu=False) == "driver"


def test_kmeans_on_a_gpu_actor_matches_the_driver(gpu_cluster, tmp_path):
    from rebalance.stages.cluster import _train

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    spec = types.SimpleNamespace(
        cluster=ClusterSpec(image=KMeansSpec(k=5), niter=5, sample_per_centroid=80),
        ray=types.SimpleNamespace(placement_timeout_s=60),
    )
    out = {}
    for placement in ("driver", "gpu actor"):
        run = types.SimpleNamespace(path=lambda name, p=placement: tmp_path / p.replace(" ", "_") / name)
        (tmp_path / placement.replace(" ", "_") / "clusters").mkdir(parents=True)
        out[placement] = _train(
            types.SimpleNamespace(spec=spec, run=run), {"image": 5}, {"image": x}, placement
        )
    (driver, _, info_d), (actor, _, info_a) = out["driver"], out["gpu actor"]
    np.testing.assert_array_equal(driver["image"], actor["image"])  # one computation, wherever it runs
    # faiss-cpu on the actor here: recorded as such, never passed off as GPU k-means
    assert (info_a["image"]["device"], info_a["image"]["placement"]) == ("cpu", "gpu actor")
    assert info_d["image"]["placement"] == "driver"
    saved = np.load(tmp_path / "gpu_actor" / "clusters" / "image_centroids.npy")
    np.testing.assert_array_equal(saved, actor["image"])


def test_assign_placement():
    from rebalance.stages.cluster import assign_placement

    assert assign_placement(resources()) == "cpu actors"
    assert assign_placement(resources(gpus=2)) == "gpu actors"
    assert assign_placement(resources(capacity=ClusterCapacity(4, 4))) == "gpu actors"  # the autoscaler adds


def test_torch_assignment_matches_faiss():
    # the GPU actors' kernel, run here on the CPU: faiss's exact flat search is the reference
    from rebalance.kernels.kmeans import assign, assign_torch

    rng = np.random.default_rng(3)
    x = rng.normal(size=(2500, 24)).astype(np.float32)
    c = rng.normal(size=(37, 24)).astype(np.float32)
    labels, distances = assign(x, c)
    t_labels, t_distances = assign_torch(x, c, device="cpu", batch_size=1000)  # three batches, one short
    np.testing.assert_array_equal(t_labels, labels)
    np.testing.assert_allclose(t_distances, distances, rtol=1e-5, atol=1e-5)
    exact = ((x[:, None, :].astype(np.float64) - c[None, :, :]) ** 2).sum(-1)
    np.testing.assert_array_equal(labels, exact.argmin(1))
    assert t_labels.dtype == np.int32 and t_distances.dtype == np.float32
    np.testing.assert_array_equal(assign(x, c, device="cpu")[0], labels)


def test_rows_are_assigned_on_gpu_actors(gpu_cluster, tmp_path):
    from test_bad_input import run_spec, write_laion

    import rebalance
    from rebalance.data.parts import read_parts
    from rebalance.kernels.kmeans import assign

    keys = [[f"a{j}" for j in range(40)], [f"b{j}" for j in range(36)]]
    write_laion(tmp_path / "laion", (40, 36), keys)
    spec = run_spec(tmp_path / "laion", k=3)
    spec["embed"]["device"] = "cpu"
    spec["cluster"]["sample_per_centroid"] = 5  # 15 sampled rows of 76: the actors assign, not the driver
    spec["ray"] = {"placement_timeout_s": 60}
    rebalance.run(spec, tmp_path / "out", until="cluster")
    cluster = json.loads((tmp_path / "out" / "manifest.json").read_text())["stages"]["cluster"]
    # no CUDA behind the declared GPUs: the GPU actors assigned on their CPU and say so
    assert cluster["assign"] == {"placement": "gpu actors", "device": "cpu"}
    assert cluster["placement"] == "gpu actor"
    emb = read_parts(tmp_path / "out" / "embeddings")
    got = read_parts(tmp_path / "out" / "assignments")
    assert got.column("key").to_pylist() == emb.column("key").to_pylist()
    for side in ("image", "text"):
        centroids = np.load(tmp_path / "out" / "clusters" / f"{side}_centroids.npy")
        x = emb.column(side).combine_chunks().flatten().to_numpy().reshape(emb.num_rows, -1)
        np.testing.assert_array_equal(got.column(f"{side}_cluster").to_numpy(), assign(x, centroids)[0])


# --- row 6: --loss ldam --gpu: the margins stay on the CPU ------------------------------------------------


def test_ldam_margins_follow_the_logits_device():
    loss = LDAMLoss([100, 10, 1])  # the module itself stays on the CPU, as in train_longtail
    logits = torch.randn(4, 3, device="meta")
    assert loss(logits, torch.zeros(4, dtype=torch.long, device="meta")).device.type == "meta"
    # and the value on the CPU: CE(s (z - Delta_y e_y), y), by hand
    z, y = torch.tensor([[0.5, -0.2, 0.1]]), torch.tensor([2])
    m = torch.tensor([100.0, 10.0, 1.0]).pow(-0.25)
    m = m * 0.5 / m.max()
    expected = -torch.log_softmax(30 * (z - torch.tensor([[0, 0, 1.0]]) * m), dim=1)[0, 2]
    torch.testing.assert_close(loss(z, y), expected)


# --- row 7: resumed train_gan --gpu: Adam state loaded while the models are on the CPU ------------------


def test_train_gan_resumed_optimizer_state_is_on_the_models_device():
    from jobs.train_gan import build_gan

    args = argparse.Namespace(seed=0, nz=8, ngf=4, ndf=4, image_size=32, lr=2e-4, beta1=0.5)
    G, D, opt_g, opt_d = build_gan(args, "cpu")
    loss = G(torch.randn(2, 8)).square().mean() + D(torch.randn(2, 3, 32, 32)).square().mean()
    loss.backward()
    opt_g.step()
    opt_d.step()
    saved = {"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict()}  # what a checkpoint holds
    G, D, opt_g, opt_d = build_gan(args, "meta")  # then resumed as jobs.training.load_checkpoint does
    opt_g.load_state_dict(saved["opt_g"])
    opt_d.load_state_dict(saved["opt_d"])
    for model, opt in ((G, opt_g), (D, opt_d)):
        assert {p.device.type for p in model.parameters()} == {"meta"}
        moments = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
        assert moments and {v.device.type for v in moments} == {"meta"}


# --- row 8: the torch Sinkhorn in bf16 / fp16 --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_torch_sinkhorn_low_precision_inputs_match_float64(dtype):
    rng = np.random.default_rng(5)
    z = rng.normal(size=(256, 16))
    scores = torch.tensor(z / np.linalg.norm(z, axis=1, keepdims=True), dtype=dtype)  # cosines, as in GH
    pi = np.linspace(1, 3, 16)
    codes = sinkhorn_knopp_torch(scores, torch.tensor(pi), 0.05, 300)
    assert codes.dtype == torch.float32
    # float64 on the same (rounded) scores: the input's rounding is the input's, the computation adds < 1e-4
    expected = soft_sinkhorn(scores.double().numpy(), pi, 0.05, 300).codes
    assert np.abs(codes.double().numpy() - expected).max() < 1e-4


# --- row 9: benchmarks' baselines hard-wired to the CPU ---------------------------------------------------


def test_benchmark_baselines_take_the_device():
    import inspect

    import benchmarks.cluster
    import benchmarks.embed_throughput

    assert "device" in inspect.signature(benchmarks.embed_throughput.plain_loop).parameters
    assert "gpu" in inspect.signature(benchmarks.cluster.bare_faiss).parameters
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8)).astype(np.float32)
    train_s, search_s, centroids = benchmarks.cluster.bare_faiss(x, x, 4, 3, gpu=False)
    assert centroids.shape == (4, 8) and train_s >= 0 and search_s >= 0


# --- row 10: manifest.json does not say which device and dtype embedded the run ---------------------------


def test_manifest_records_embed_device_and_dtype(demo_run):
    summary = json.loads((demo_run / "manifest.json").read_text())["stages"]["embed"]
    assert (summary["device"], summary["dtype"]) == ("cpu", "float32")
    part = json.loads((demo_run / "embeddings" / "_part-00000.json").read_text())
    assert (part["device"], part["dtype"]) == ("cpu", "float32")
