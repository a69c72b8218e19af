"""Bad input reaches Python as a one-line ValueError or RuntimeError, never a panic."""

import numpy as np
import pytest

import calm_gpu
from calm_gpu import CALM


def one_line(excinfo):
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(kernels=0), "kernels must be at least 1"),
        (dict(width=0), "width must be at least 1"),
        (dict(width=40), "width"),
        (dict(epochs=0), "epochs must be at least 1"),
        (dict(batch=0), "batch must be at least 1"),
        (dict(backend="tpu"), "backend: invalid device `tpu`"),
        (dict(preset="best"), "preset must be"),
        (dict(init_method="zeros"), "init_method must be"),
        (dict(encode="max"), "encode must be"),
        (dict(kernels=2.5), "kernels must be an integer"),
        (dict(pad=-1), "pad must not be negative"),
        (dict(preprocess="gamma"), "preprocess"),
        (dict(variance=0.0), "variance must be a positive number"),
        (dict(variance="hot"), "variance must be a number"),
        (dict(revive="yes"), "revive must be True, False or None"),
        (dict(backend=3), "backend must be a string"),
        (dict(tol=-1.0), "tol must be a non-negative number"),
        (dict(pool=0), "pool must be at least 1"),
        (dict(posterior="pixel"), "posterior must be 'image' or 'patch'"),
        (dict(posterior=1), "posterior must be a string"),
        (dict(patch_norm="x"), "patch_norm must be a number"),
        (dict(patch_norm=-1), "patch_norm must be a positive number"),
    ],
)
def test_bad_parameters(images, params, message):
    opts = dict(kernels=4, width=5, pad=0, epochs=1, backend="cpu")
    opts.update(params)
    with pytest.raises(ValueError) as e:
        CALM(**opts).fit(images)
    assert message in one_line(e)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda x: np.where(x > 200, np.nan, x / 255.0), "NaN"),
        (lambda x: x[:0], "0 sample"),
        (lambda x: x[0, 0], "Expected 2D array"),
        (lambda x: x.reshape(len(x), -1), "image_shape"),
        (lambda x: x[None, None], "dimensions"),
        (lambda x: x.astype(np.complex64), "Complex data not supported"),
    ],
)
def test_bad_images(images, make, message):
    with pytest.raises(ValueError) as e:
        CALM(kernels=4, width=5, pad=0, epochs=1, backend="cpu").fit(make(images))
    # scikit-learn's own input checks (NaN, empty, 1-D, complex) speak first, in its words:
    # their first line says what is wrong.
    assert message in str(e.value).splitlines()[0]


def test_transform_before_fit(images):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        CALM().transform(images)


def test_model_files(tmp_path, images):
    with pytest.raises(RuntimeError) as e:
        calm_gpu.load(tmp_path / "missing.safetensors")
    assert "missing.safetensors" in one_line(e)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a model at all")
    with pytest.raises(ValueError) as e:
        calm_gpu.load(junk)
    one_line(e)
    calm = CALM(kernels=4, width=5, pad=0, epochs=1, backend="cpu").fit(images)
    good = tmp_path / "model.safetensors"
    calm.save(good)
    # Half a model file is refused, and a save never replaces a file unless forced.
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(ValueError):
        calm_gpu.load(truncated)
    before = good.read_bytes()
    with pytest.raises(ValueError) as e:
        calm.set_params(kernels=5).fit(images).save(good)
    assert "already exists" in one_line(e)
    assert good.read_bytes() == before


@pytest.mark.parametrize("bad", ["not images", None, [["a", "b"], ["c", "d"]], {"x": 1}])
def test_not_an_array(bad):
    with pytest.raises((ValueError, TypeError)) as e:
        CALM(kernels=2, width=1, pad=0, epochs=1, backend="cpu", image_shape=(1, -1)).fit(bad)
    assert str(e.value).splitlines()[0]


def test_per_patch_posterior_fits_other_kernels(images):
    opts = dict(kernels=4, width=5, pad=0, epochs=2, backend="cpu")
    spec = CALM(**opts).fit(images)
    patch = CALM(posterior="patch", **opts).fit(images)
    assert patch.transform(images).shape == spec.transform(images).shape
    assert not np.allclose(patch.theta_, spec.theta_)


def test_patch_norm_features_ignore_contrast(images):
    # eps far below the patches' variance (the noise alone gives about 1e-3), so that the
    # contrast's change moves the features only through eps, by about 1e-4 of them.
    opts = dict(kernels=4, width=5, pad=0, epochs=2, backend="cpu", patch_norm=1e-7)
    x = images.astype(np.float32) / 255
    est = CALM(**opts).fit(x)
    raw = CALM(**{**opts, "patch_norm": None}).fit(x)
    brighter = x * 3.0 + 0.5
    f, g = est.transform(x), est.transform(brighter)
    assert np.abs(f - g).max() < 1e-3 * np.abs(f).max()
    assert not np.allclose(raw.transform(x), raw.transform(brighter), rtol=1e-2)
    # The recommended preset normalises with 0.01; 0 turns that off.
    rec = dict(preset="recommended", kernels=4, epochs=1, backend="cpu")
    assert CALM(**rec).fit(x)._layer.meta()["patch_norm"] == pytest.approx(0.01)
    assert CALM(patch_norm=0, **rec).fit(x)._layer.meta()["patch_norm"] is None
