"""The estimator on a GPU adapter (lavapipe in CI; CALM_TEST_BACKEND picks another API): the
same features as the CPU engine's, and a fit that follows the CPU's. Without an adapter the
tests are skipped, unless CALM_REQUIRE_GPU=1 (CI sets it), which makes that a failure."""

import os

import numpy as np
import pytest

from calm_gpu import CALM

BACKEND = os.environ.get("CALM_TEST_BACKEND", "vulkan")
# The tolerance of the library's GPU-against-CPU tests (tests/gpu_vs_cpu.rs), relative to the
# largest value: f32 sums in another order.
TOL = 2e-4


def gpu_or_skip(calm, x):
    try:
        return calm.fit(x)
    except RuntimeError as e:
        if os.environ.get("CALM_REQUIRE_GPU") == "1":
            raise AssertionError(f"CALM_REQUIRE_GPU=1 but {BACKEND} failed: {e}") from e
        pytest.skip(f"no {BACKEND} adapter: {e}")


def test_gpu_fit_and_features_follow_the_cpu(images):
    params = dict(kernels=8, width=5, pad=1, epochs=2, batch=100, init_method="patches")
    gpu = gpu_or_skip(CALM(backend=BACKEND, **params), images)
    assert not gpu.backend_.startswith("CPU engine"), gpu.backend_
    cpu = CALM(backend="cpu", **params).fit(images)
    scale = np.abs(cpu.theta_).max()
    np.testing.assert_allclose(gpu.theta_, cpu.theta_, rtol=TOL, atol=TOL * scale)
    np.testing.assert_allclose(gpu.loglik_, cpu.loglik_, rtol=TOL)
    # The CPU's model encoded on the GPU: SPEC's features and the triangle on a 2 x 2 grid.
    for pool, encode in ((None, None), (2, "triangle")):
        cpu.set_params(pool=pool, encode=encode)
        want = cpu._layer.features(images.reshape(len(images), 1, 16, 16), "cpu", "scale",
                                   pool=pool, encode=encode)
        got = cpu._layer.features(images.reshape(len(images), 1, 16, 16), BACKEND, "scale",
                                  pool=pool, encode=encode)
        np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL * np.abs(want).max())
