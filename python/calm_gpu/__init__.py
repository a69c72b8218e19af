"""calm-gpu from Python: convolutional Gaussian-mixture layers fitted by EM, without labels.

``CALM`` is a scikit-learn transformer: ``fit(X)`` learns the kernels of one CALM layer by EM
on images ``(N, H, W)`` or ``(N, C, H, W)`` (uint8 scaled by 1/255, or float32/float64), and
``transform(X)`` returns ``(N, F)`` float32 features by the model's recipe. ``load`` reads the
model files of ``calm-gpu train``; ``CALM.save`` writes them; ``CALM.to_torch`` gives the same
features as a ``torch.nn.Module``.

>>> from calm_gpu import CALM
>>> calm = CALM(preset="recommended", backend="cpu").fit(images)   # doctest: +SKIP
>>> features = calm.transform(images)                                # doctest: +SKIP
"""

from ._estimator import CALM, load
from ._native import __version__, backends

__all__ = ["CALM", "load", "backends", "__version__"]
