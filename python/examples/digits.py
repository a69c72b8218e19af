"""CALM features in a scikit-learn pipeline, beside the same pipeline on raw pixels.

    python python/examples/digits.py

scikit-learn's own 8 x 8 digits (1,797 images, shipped inside scikit-learn): a CALM layer
fitted without labels, its features standardised, then a logistic regression.
"""

from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from calm_gpu import CALM

digits = load_digits()
images = digits.images / 16.0  # (1797, 8, 8), values in [0, 1]
# The recommended layer (whitening, data-patch kernels, the triangle encoding), sized for 8 x 8.
calm = CALM(preset="recommended", width=3, pad=1, whiten=3, pool=2, backend="cpu")
pipe = make_pipeline(calm, StandardScaler(), LogisticRegression(max_iter=500))
raw = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
print(f"CALM features: {cross_val_score(pipe, images, digits.target, cv=3).mean():.3f}")
print(f"raw pixels:    {cross_val_score(raw, digits.data, digits.target, cv=3).mean():.3f}")
