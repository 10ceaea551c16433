"""Smoke tests: the benchmarks run and report every case (no timing asserted)."""

import logging
import math

import pytest

import pde_keras
from pde_keras import fused_solver
from benchmarks import layer, timing, train

pytestmark = pytest.mark.multibackend


def test_layer_benchmark_reports_ratios_to_the_conv():
    medians, ratios = layer.run(batch_size=2, size=8, channels=4, steps=[1, 2], rounds=1,
                                warmup=1, jit_compile=False)
    paths = fused_solver.available_paths()
    assert set(medians) == {"conv2d_3x3"} | {
        f"{case}/{path}" for case in ("global_K1", "global_K2", "solver_K5") for path in paths}
    assert ratios["conv2d_3x3"] == 1.0
    assert all(t > 0 and math.isfinite(t) for t in medians.values())


def test_layer_benchmark_pieces():
    medians, _ = layer.run(batch_size=2, size=8, channels=4, steps=[1], rounds=1, warmup=1,
                           jit_compile=False, pieces=True)
    paths = fused_solver.available_paths()
    assert set(medians) == {"conv2d_3x3", "relu"} | {
        f"{case}/{path}" for case in ("global_K1", "solver_K5", "solver_K1", "depthwise_4",
                                      "norm_relu") for path in paths}
    assert all(t > 0 and math.isfinite(t) for t in medians.values())


@pytest.mark.slow  # builds and trains two ResNets (~40 s)
def test_train_benchmark_reports_throughput_and_latency():
    results = train.run(["resnet32", "resnet32_global_K1"], batch_size=2, rounds=1,
                        steps_per_round=1, warmup=1, jit_compile=False)
    assert results["resnet32"]["train_speedup_vs_resnet32"] == 1.0
    for path in fused_solver.available_paths():
        assert results[f"resnet32_global_K1/{path}"]["trainable_params"] == 161_402
    for r in results.values():
        assert r["train_images_per_s"] > 0 and r["latency_ms_batch1"] > 0


def test_train_benchmark_skeleton_is_resnet32_global_without_its_global_layers():
    full = train.MODELS["resnet32_global_K1"]()
    skeleton = train.MODELS["resnet32_global_skeleton"]()
    global_layers = [layer for layer in full.layers if isinstance(layer, pde_keras.GlobalLayer)]
    assert len(global_layers) == 3
    assert not any(isinstance(layer, pde_keras.GlobalLayer) for layer in skeleton.layers)
    assert [layer.name for layer in skeleton.layers] == [
        layer.name for layer in full.layers if layer not in global_layers]
    assert skeleton.count_params() == full.count_params() - sum(
        layer.count_params() for layer in global_layers)


def test_benchmarks_drop_only_the_retracing_warning(caplog):
    """Each case is its own tf.function traced once; TensorFlow's warning of
    retracing across functions is dropped, its other warnings are not."""
    logger = logging.getLogger("tensorflow")
    before = list(logger.filters)
    try:
        timing.quiet_retracing_warnings()
        timing.quiet_retracing_warnings()  # once is enough: no second filter
        assert len(logger.filters) == len(before) + 1
        with caplog.at_level(logging.WARNING, logger="tensorflow"):
            logger.warning("5 out of the last 13 calls to <function step> triggered "
                           "tf.function retracing. Tracing is expensive")
            logger.warning("another warning")
        assert [r.getMessage() for r in caplog.records] == ["another warning"]
    finally:
        logger.filters[:] = before
