"""The input is read in place and transform's memory is bounded by the batch: the features of
60,000 uint8 images of 28 x 28 (47 MB) never hold them as float32 (188 MB)."""

import subprocess
import sys

SCRIPT = r"""
import resource, numpy as np
from calm_gpu import CALM
rng = np.random.default_rng(0)
x = rng.integers(0, 256, size=(60000, 28, 28), dtype=np.uint8)
calm = CALM(kernels=4, width=5, pad=0, epochs=1, backend="cpu").fit(x[:500])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
f = calm.transform(x)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert f.shape == (60000, 4)
print((after - before) / 1024)
"""


def test_transform_of_60000_images_does_not_copy_them():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    grown_mb = float(done.stdout.split()[-1])
    # A float32 copy of the input alone would be 188 MB; the batches and the features are a
    # few MB.
    assert grown_mb < 60, f"peak memory grew by {grown_mb:.0f} MB"
