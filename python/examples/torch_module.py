"""A fitted CALM layer as a PyTorch module, through a model file calm-gpu reads.

    python python/examples/torch_module.py
"""

import os
import tempfile

import numpy as np
import torch
from sklearn.datasets import load_digits

import calm_gpu

images = load_digits().images / 16.0  # (1797, 8, 8) in [0, 1]
calm = calm_gpu.CALM(kernels=32, width=3, pad=1, epochs=5, backend="cpu").fit(images)
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "digits.safetensors")
    calm.save(path)  # `calm-gpu show`, `features` and `eval` read this file
    module = calm_gpu.load(path, backend="cpu").to_torch()
with torch.no_grad():
    features = module(torch.from_numpy(images.astype(np.float32))).numpy()
print(module)
print(f"features {features.shape}, max |torch - transform| = "
      f"{np.abs(features - calm.transform(images)).max():.2e}")
