"""Model files both ways with the CLI, pickling, and features equal to `calm-gpu features`."""

import pickle
import subprocess

import numpy as np

import calm_gpu
from calm_gpu import CALM

LAYER = ["--kernels", "8", "--width", "5", "--pad", "1", "--epochs", "3"]


def run(binary, *args):
    subprocess.run([binary, *args], check=True, capture_output=True)


def test_cli_and_python_fit_the_same_model(tmp_path, images, binary):
    data = tmp_path / "images.npy"
    np.save(data, images)
    model = tmp_path / "cli.safetensors"
    run(binary, "train", "--backend", "cpu", "--data", str(data), *LAYER, "--out", str(model), "-q")
    cli = calm_gpu.load(model, backend="cpu")
    py = CALM(kernels=8, width=5, pad=1, epochs=3, backend="cpu").fit(images)
    # The same library on the same uint8 pixels (both scaled by 1/255): the same bytes.
    np.testing.assert_array_equal(py.theta_, cli.theta_)
    np.testing.assert_array_equal(py.counts_, cli.counts_)
    np.testing.assert_allclose(py.loglik_, cli.loglik_, rtol=1e-12)

    # Python's features of the CLI's model equal `calm-gpu features` of it.
    out = tmp_path / "features.npy"
    run(binary, "features", "--backend", "cpu", "--model", str(model), "--data", str(data),
        "--out", str(out), "--pool", "2", "--encode", "triangle")
    cli_features = np.load(out)
    py_model = CALM(kernels=8, width=5, pad=1, epochs=3, backend="cpu", pool=2,
                    encode="triangle").fit(images)
    np.testing.assert_allclose(py_model.transform(images), cli_features, rtol=1e-6, atol=1e-6)

    # And the CLI reads a model Python saved, with its recipe.
    saved = tmp_path / "py.safetensors"
    py_model.save(saved)
    out2 = tmp_path / "features2.npy"
    run(binary, "features", "--backend", "cpu", "--model", str(saved), "--data", str(data),
        "--out", str(out2))
    np.testing.assert_array_equal(np.load(out2), py_model.transform(images))

    # The PyTorch module of the CLI's model against the CLI's own features.
    import torch

    out3 = tmp_path / "features3.npy"
    run(binary, "features", "--backend", "cpu", "--model", str(model), "--data", str(data),
        "--out", str(out3))
    want = np.load(out3)
    with torch.no_grad():
        got = cli.to_torch()(torch.from_numpy(images.astype(np.float32) / 255.0)).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_save_load_and_pickle_round_trip(tmp_path, images):
    calm = CALM(preset="recommended", kernels=8, epochs=2, backend="cpu").fit(images)
    f = calm.transform(images)
    path = tmp_path / "m.safetensors"
    calm.save(path)
    again = calm_gpu.load(path, backend="cpu")
    np.testing.assert_array_equal(again.theta_, calm.theta_)
    np.testing.assert_array_equal(again.transform(images), f)
    assert again.get_params()["pool"] == 4 and again.get_params()["encode"] == "triangle"
    clone = pickle.loads(pickle.dumps(calm))
    np.testing.assert_array_equal(clone.transform(images), f)
    np.testing.assert_array_equal(clone.loglik_, calm.loglik_)
    calm.save(path, force=True)


def test_the_recommended_preset_is_the_clis(tmp_path, images, binary):
    data = tmp_path / "images.npy"
    np.save(data, images)
    model = tmp_path / "rec.safetensors"
    run(binary, "train", "--backend", "cpu", "--data", str(data), "--preset", "recommended",
        "--kernels", "8", "--epochs", "2", "--out", str(model), "-q")
    cli = calm_gpu.load(model, backend="cpu")
    py = CALM(preset="recommended", kernels=8, epochs=2, backend="cpu").fit(images)
    np.testing.assert_array_equal(py.theta_, cli.theta_)
    assert py._layer.meta() | {"calm_gpu_version": ""} == cli._layer.meta() | {"calm_gpu_version": ""}
    np.testing.assert_array_equal(py.transform(images), cli.transform(images))
