"""`to_torch()` computes `transform`'s features."""

import numpy as np
import pytest
import torch

from calm_gpu import CALM


@pytest.mark.parametrize(
    "params",
    [
        dict(kernels=8, width=5, pad=2),  # SPEC's features: log-sum-exp over the image
        dict(preset="recommended", kernels=8, epochs=2),  # whitening, triangle, 4 x 4
        dict(kernels=8, width=4, pad=1, whiten=4, pool=3, encode="lse"),  # even widths
        dict(kernels=6, width=5, pad=0, learn_variance=True, learn_weights=True, pool=2),
        # Contrast-normalised patches (the recommended preset's too), padding, both encodings.
        dict(kernels=6, width=4, pad=1, patch_norm=0.05, pool=2, encode="triangle"),
        dict(kernels=6, width=3, pad=0, patch_norm=0.01, whiten=3, pool=3, encode="lse"),
    ],
)
def test_module_matches_transform(images, params):
    opts = dict(epochs=3, backend="cpu")
    opts.update(params)
    calm = CALM(**opts).fit(images)
    expected = calm.transform(images)
    module = calm.to_torch()
    assert isinstance(module, torch.nn.Module)
    with torch.no_grad():
        got = module(torch.from_numpy(images.astype(np.float32) / 255.0)).numpy()
    assert got.shape == expected.shape
    # Within 1e-4 relative to the features' scale: the two sum the same products in another
    # order (f32 GEMM against PyTorch's convolution).
    scale = np.abs(expected).max()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * scale)


def test_module_on_three_channels():
    from conftest import strokes

    rgb = strokes(40, channels=3)
    calm = CALM(kernels=5, width=3, pad=1, epochs=2, backend="cpu", whiten=3).fit(rgb)
    with torch.no_grad():
        got = calm.to_torch()(torch.from_numpy(rgb.astype(np.float32) / 255.0)).numpy()
    expected = calm.transform(rgb)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_normalised_module_sees_only_the_normalised_patches(images):
    # A normalised patch sums to 0, so a constant added to every weight leaves L unchanged: the
    # module must take each patch's mean out (fitted kernels sum to about 0, which hides it).
    calm = CALM(kernels=6, width=4, pad=1, epochs=2, backend="cpu", patch_norm=0.05).fit(images)
    module = calm.to_torch()
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    with torch.no_grad():
        before = module(x).numpy()
        module.weight += 0.5
        after = module(x).numpy()
    np.testing.assert_allclose(after, before, rtol=1e-4, atol=1e-4 * np.abs(before).max())
