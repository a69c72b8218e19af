"""Shared fixtures: small synthetic images and the calm-gpu binary the parity tests compare
against (CALM_GPU_BIN, else the workspace's target/release/calm-gpu)."""

import os
import pathlib

# scikit-learn's array-API check runs only with this set before scipy is imported.
os.environ.setdefault("SCIPY_ARRAY_API", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]


def strokes(n, size=16, seed=0, channels=None):
    """``n`` uint8 images of a few random bright bars and blobs on a dark ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((n, size, size), dtype=np.float64)
    for i in range(n):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(2, size - 2, 2)
            a = rng.uniform(0, np.pi)
            d = np.abs((yy - cy) * np.cos(a) - (xx - cx) * np.sin(a))
            along = np.abs((yy - cy) * np.sin(a) + (xx - cx) * np.cos(a))
            out[i] += np.exp(-(d**2) / 1.5) * (along < rng.uniform(2, size / 2))
    out = np.clip(out * 255 + rng.normal(0, 8, out.shape), 0, 255).astype(np.uint8)
    if channels:
        out = np.stack([np.roll(out, c, axis=2) for c in range(channels)], axis=1)
    return out


@pytest.fixture(scope="session")
def images():
    return strokes(240)


@pytest.fixture(scope="session")
def binary():
    path = pathlib.Path(os.environ.get("CALM_GPU_BIN", ROOT / "target" / "release" / "calm-gpu"))
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: build the CLI first (cargo build --release) or set CALM_GPU_BIN"
        )
    return str(path)
