"""Fitting: the attributes, the preprocessing, progress, Ctrl-C and the GIL."""

import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

from calm_gpu import CALM


def small(**kw):
    opts = dict(kernels=6, width=5, pad=0, epochs=3, backend="cpu")
    opts.update(kw)
    return CALM(**opts)


def test_fitted_attributes(images):
    calm = small().fit(images)
    assert calm.theta_.shape == (6, 1, 5, 5) and calm.theta_.dtype == np.float32
    assert calm.counts_.shape == (6,)
    # SPEC's update: B'[k] = (B[k] + 1/S) S / (S + 1) with S = sum_k B[k] = N.
    n, k = len(images), 6
    np.testing.assert_allclose(calm.counts_.sum(), (n * n + k) / (n + 1), rtol=1e-5)
    assert calm.loglik_.shape == (3,)
    # EM's log likelihood does not decrease.
    assert np.all(np.diff(calm.loglik_) >= -1e-6 * np.abs(calm.loglik_[1:]))
    assert calm.backend_.startswith("CPU engine")
    assert calm.image_shape_ == (1, 16, 16) and calm.n_features_in_ == 256
    f = calm.transform(images)
    assert f.shape == (len(images), 6) and f.dtype == np.float32


def test_uint8_is_scaled_and_floats_are_not(images):
    a = small().fit(images)
    b = small().fit(images.astype(np.float64) / 255.0)
    np.testing.assert_allclose(a.theta_, b.theta_, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        a.transform(images), b.transform(images / 255.0), rtol=1e-5, atol=1e-5
    )
    # Explicit preprocessing: 0..255 floats scaled by the library.
    c = small(preprocess="scale").fit(images.astype(np.float32))
    np.testing.assert_array_equal(a.theta_, c.theta_)


def test_the_same_fit_twice_is_the_same_model(images):
    a = small(preset="recommended", kernels=8, epochs=2).fit(images)
    b = small(preset="recommended", kernels=8, epochs=2).fit(images)
    np.testing.assert_array_equal(a.theta_, b.theta_)
    # The recommended recipe: triangle encoding on a 4 x 4 grid.
    assert a.transform(images).shape == (len(images), 8 * 16)


def test_channels(images):
    from conftest import strokes

    rgb = strokes(60, channels=3)
    calm = small().fit(rgb)
    assert calm.theta_.shape == (6, 3, 5, 5)
    with pytest.raises(ValueError, match="3-channel"):
        calm.transform(images)


def test_callback_hears_epochs_and_batches(images):
    events = []
    small(batch=100, callback=events.append).fit(images)
    kinds = [e["event"] for e in events]
    assert kinds.count("epoch_start") == 3 and kinds.count("epoch_end") == 3
    # 240 images in batches of 100: three progress reports per epoch.
    assert [e["images"] for e in events if e["event"] == "progress"][:3] == [100, 200, 240]
    ends = [e for e in events if e["event"] == "epoch_end"]
    assert all(np.isfinite(e["loglik_per_image"]) for e in ends)


def test_an_exception_in_the_callback_stops_the_fit_and_keeps_the_old_model(images):
    calm = small().fit(images)
    before = calm.theta_.copy()

    def boom(info):
        if info["event"] == "progress":
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        calm.set_params(callback=boom, kernels=4).fit(images)
    np.testing.assert_array_equal(calm.theta_, before)


def long_fit():
    from conftest import strokes

    return small(kernels=32, epochs=5000, batch=50), strokes(1000, seed=3)


def test_ctrl_c_raises_keyboard_interrupt_after_the_batch():
    calm, x = long_fit()
    # Python's own Ctrl-C handler, even where this process was started with SIGINT ignored
    # (a background job of a non-interactive shell, as CI may run it).
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        t0 = time.perf_counter()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            calm.fit(x)
        timer.join()
    finally:
        signal.signal(signal.SIGINT, old)
    # 5,000 epochs would take about a minute; the batch after the signal ends it.
    assert time.perf_counter() - t0 < 20
    assert not hasattr(calm, "theta_")


def test_fit_releases_the_gil():
    calm, x = long_fit()
    calm.set_params(epochs=100)
    old = sys.getswitchinterval()
    # While another thread holds the GIL for 10 s at a time, this one could not run at all;
    # it runs freely only because fit releases the GIL.
    sys.setswitchinterval(10.0)
    try:
        worker = threading.Thread(target=calm.fit, args=(x,))
        t0 = time.perf_counter()
        worker.start()
        ticks = 0
        while worker.is_alive():
            time.sleep(0.002)
            ticks += 1
        worker.join()
        seconds = time.perf_counter() - t0
    finally:
        sys.setswitchinterval(old)
    assert hasattr(calm, "theta_")
    # Ticks of about 2 ms each: the main thread ran for most of the fit, not only between
    # the worker's callbacks.
    assert seconds > 0.2 and ticks > seconds / 0.002 / 4, f"{ticks} ticks in {seconds:.2f} s"


def test_verbose_shows_a_progress_bar(images, capsys):
    small(verbose=True).fit(images).transform(images)
    err = capsys.readouterr().err
    assert "epoch 3/3" in err and "features" in err
