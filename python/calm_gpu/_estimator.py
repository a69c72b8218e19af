"""The scikit-learn estimator over the compiled module."""

from __future__ import annotations

import math
import os

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_array, check_is_fitted

from . import _native

# The parameters fit passes to the library as they are (None keeps the preset's value).
_FIT_OPTIONS = (
    "preset",
    "kernels",
    "width",
    "pad",
    "epochs",
    "batch",
    "seed",
    "backend",
    "init_method",
    "revive",
    "whiten",
    "tol",
    "learn_variance",
    "learn_weights",
    "variance",
    "posterior",
    "patch_norm",
    "pool",
    "encode",
)


class CALM(TransformerMixin, BaseEstimator):
    """One CALM layer fitted by EM, as a scikit-learn transformer.

    Every parameter mirrors ``calm-gpu train``'s option of the same name; ``None`` keeps the
    preset's value: SPEC's (the paper's protocol: K 64 kernels of 20 x 20, padding 2, 15
    epochs, N(0, 1) initialisation) or, with ``preset="recommended"``, the layer
    docs/results.md chose (K 128, 8 x 8, no padding, 10 epochs, data-patch initialisation with
    revival, 7 x 7 whitening, patches contrast-normalised with eps 0.01, the triangle encoding
    on a 4 x 4 grid).

    Parameters
    ----------
    kernels, width, pad : int, optional
        The number of kernels K, their width w (kernels are w x w) and the zero padding p.
    epochs : int, optional
        EM iterations (passes over the data).
    batch : int, optional
        Images per batch; bounds memory only (default 1,000).
    seed : int, optional
        Seed of the initial weights, of revival and of the whitening filter (default 0).
    backend : str
        Where fit and transform run: "auto" (a hardware GPU if there is one, else the CPU
        engine), "vulkan", "metal", "dx12", "gl" or "cpu".
    preset : {None, "spec", "recommended"}
        The values the other parameters take when None.
    init_method : {"normal", "patches", "kmeans"}, optional
        N(0, 1) weights (SPEC), patches of the data, or the k-means centroids of its patches.
    revive : bool, optional
        Re-seed unused or duplicate kernels after each epoch.
    whiten : int, optional
        Whiten the images with a ZCA filter fitted on W x W patches (0: no whitening).
    tol : float, optional
        Stop once the relative change of the log likelihood between epochs is below tol.
    learn_variance, learn_weights : bool, optional
        Let the M-step learn the patches' variance and the mixing weights (SPEC: neither).
    variance : float, optional
        The patches' variance sigma^2 the fit starts from (SPEC: 1), fixed unless
        learn_variance: the posterior's temperature.
    posterior : {"image", "patch"}, optional
        Over what each posterior is normalised: "image" (SPEC: an image's kernels and
        positions) or "patch" (the kernels at every patch, a Gaussian mixture over patches;
        the CPU engine only, for now).
    patch_norm : float, optional
        Contrast-normalise every patch, (x - mean) / sqrt(var + patch_norm), in training and
        in the features (Coates, Lee & Ng 2011; the recommended preset's is 0.01; 0: raw
        patches).
    pool : int, optional
        The features' grid: the encoding is pooled over pool x pool regions (SPEC: 1).
    encode : {"lse", "triangle"}, optional
        The features' encoding: the log-sum-exp of L (SPEC) or the triangle encoding.
    image_shape : tuple of int, optional
        How a row of a 2-D ``X`` is an image: ``(H, W)`` or ``(C, H, W)``, one entry may be -1
        (numpy's reshape). 2-D input needs it; ``(N, H, W)`` and ``(N, C, H, W)`` arrays do not.
    preprocess : {None, "scale", "zca-image", "none"}
        What the library does to the pixels before fit and transform, as ``calm-gpu train
        --preprocess``: ``x / 255``, the per-image ZCA of the STL-10 protocol, or nothing.
        None: "scale" for uint8 input, "none" for float input. The model records it, so
        ``calm-gpu features`` on the same data gives the same features.
    verbose : bool
        Show a progress bar (tqdm, when it is installed) during fit and transform.
    callback : callable, optional
        Called with a dict for every epoch start and end and every batch (``event``:
        "epoch_start", "progress", "epoch_end", "revived", "precision_limit"). An exception it
        raises stops the work and propagates.

    Attributes
    ----------
    theta_ : ndarray of shape (K, C, w, w)
        The kernels, PyTorch's conv2d weight layout.
    counts_ : ndarray of shape (K,)
        Each kernel's effective count after the last update.
    loglik_ : ndarray of shape (epochs,)
        The log likelihood per image of every epoch.
    backend_ : str
        The adapter or engine that ran the fit.
    image_shape_ : tuple (C, H, W)
        The shape of the training images.
    n_features_in_ : int
        Values per input image (C * H * W).

    Notes
    -----
    uint8 input is scaled by 1/255 and float input used as it is, unless ``preprocess`` says
    otherwise; ``transform`` preprocesses its input by the same rule. ``transform`` returns
    the features by the recipe, not standardised: put a ``StandardScaler`` after it where the
    recipe says so (``preset="recommended"``), as ``calm-gpu eval`` does.
    """

    def __init__(
        self,
        kernels=None,
        width=None,
        pad=None,
        epochs=None,
        batch=None,
        seed=None,
        backend="auto",
        preset=None,
        init_method=None,
        revive=None,
        whiten=None,
        tol=None,
        learn_variance=None,
        learn_weights=None,
        variance=None,
        posterior=None,
        patch_norm=None,
        pool=None,
        encode=None,
        image_shape=None,
        preprocess=None,
        verbose=False,
        callback=None,
    ):
        self.kernels = kernels
        self.width = width
        self.pad = pad
        self.epochs = epochs
        self.batch = batch
        self.seed = seed
        self.backend = backend
        self.preset = preset
        self.init_method = init_method
        self.revive = revive
        self.whiten = whiten
        self.tol = tol
        self.learn_variance = learn_variance
        self.learn_weights = learn_weights
        self.variance = variance
        self.posterior = posterior
        self.patch_norm = patch_norm
        self.pool = pool
        self.encode = encode
        self.image_shape = image_shape
        self.preprocess = preprocess
        self.verbose = verbose
        self.callback = callback

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # Features are always float32, whatever the input's float type.
        tags.transformer_tags.preserves_dtype = ["float32"]
        return tags

    # -- input ----------------------------------------------------------------------------

    def _images(self, X, reset):
        """``X`` as C-contiguous images (N, C, H, W), uint8 or float32 (a view of the input
        where its layout and dtype allow: the library reads it in place), unscaled, and the
        preprocessing the library is to apply to them."""
        X = check_array(
            X,
            allow_nd=True,
            dtype="numeric",
            ensure_all_finite=True,
            estimator=self,
            input_name="X",
        )
        rows = X.ndim == 2
        if rows:
            if not reset and getattr(self, "_rows", False) and X.shape[1] != self.n_features_in_:
                raise ValueError(
                    f"X has {X.shape[1]} features, but {type(self).__name__} is expecting "
                    f"{self.n_features_in_} features as input"
                )
            X = X.reshape((X.shape[0],) + self._row_shape(X.shape[1]))
        elif X.ndim == 3:
            X = X[:, None]
        elif X.ndim != 4:
            raise ValueError(
                f"X must be (N, H, W) or (N, C, H, W) images, or (N, F) rows with "
                f"image_shape; got {X.ndim} dimensions {X.shape}"
            )
        u8 = X.dtype == np.uint8
        X = np.ascontiguousarray(X, dtype=np.uint8 if u8 else np.float32)
        if reset:
            self._rows = rows
        elif X.shape[1] != self.image_shape_[0]:
            raise ValueError(
                f"X has {X.shape[1]} channels, but the model was fitted on "
                f"{self.image_shape_[0]}-channel images"
            )
        kind = self.preprocess if self.preprocess is not None else ("scale" if u8 else "none")
        return X, kind

    def _row_shape(self, features):
        shape = self.image_shape
        if shape is None:
            raise ValueError(
                "2-D X needs image_shape to say how each row is an image, e.g. "
                "image_shape=(28, 28) for flattened 28 x 28 images"
            )
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (2, 3):
            raise ValueError(f"image_shape must be (H, W) or (C, H, W), not {shape}")
        if shape.count(-1) > 1 or any(s == 0 or s < -1 for s in shape):
            raise ValueError(f"image_shape {shape}: sizes must be positive, one may be -1")
        known = math.prod(s for s in shape if s != -1)
        if -1 in shape:
            if features % known:
                raise ValueError(f"rows of {features} values are not images of shape {shape}")
            shape = tuple(features // known if s == -1 else s for s in shape)
        if math.prod(shape) != features:
            raise ValueError(f"rows of {features} values are not images of shape {shape}")
        return shape if len(shape) == 3 else (1,) + shape

    def _options(self):
        opts = {name: getattr(self, name) for name in _FIT_OPTIONS}
        for name in ("kernels", "width", "pad", "epochs", "batch", "seed", "whiten", "pool"):
            v = opts[name]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ValueError(f"{name} must be an integer, not {v!r}")
            if v is not None and v < 0:
                raise ValueError(f"{name} must not be negative, not {v}")
            if v is not None:
                opts[name] = int(v)
        if opts["pool"] == 0:
            raise ValueError("pool must be at least 1")
        for name in ("revive", "learn_variance", "learn_weights"):
            v = opts[name]
            if v is not None and not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"{name} must be True, False or None, not {v!r}")
            if v is not None:
                opts[name] = bool(v)
        for name in ("preset", "backend", "init_method", "encode", "posterior"):
            v = opts[name]
            if v is not None and not isinstance(v, str):
                raise ValueError(f"{name} must be a string, not {v!r}")
        for name in ("tol", "variance", "patch_norm"):
            if opts[name] is not None:
                try:
                    opts[name] = float(opts[name])
                except (TypeError, ValueError):
                    raise ValueError(f"{name} must be a number, not {opts[name]!r}") from None
        if opts["backend"] is None:
            opts["backend"] = "auto"
        return opts

    # -- fit and transform ----------------------------------------------------------------

    def fit(self, X, y=None):
        """Fit the layer's kernels by EM on the images ``X`` (``y`` is ignored).

        Ctrl-C stops at the next batch and raises ``KeyboardInterrupt``; the estimator is
        then as it was before the call.
        """
        images, kind = self._images(X, reset=True)
        options = self._options()
        with _Progress(self, "fit", images.shape[0]) as progress:
            layer = _native.fit(images, options, kind, progress.callback)
        self._set_layer(layer)
        self.backend_ = layer.engine
        self.image_shape_ = tuple(int(v) for v in images.shape[1:])
        self.n_features_in_ = int(math.prod(self.image_shape_))
        return self

    def _set_layer(self, layer):
        self._layer = layer
        self.theta_ = layer.theta
        self.counts_ = layer.counts
        self.loglik_ = layer.loglik

    def transform(self, X):
        """Features ``(N, F)`` float32 of the images ``X`` by the model's recipe."""
        check_is_fitted(self, "theta_")
        images, kind = self._images(X, reset=False)
        with _Progress(self, "features", images.shape[0]) as progress:
            return self._layer.features(
                images, self.backend or "auto", kind, callback=progress.callback
            )

    def get_feature_names_out(self, input_features=None):
        """``calm{k}_{a}_{b}``: kernel k on region (a, b) of the grid."""
        check_is_fitted(self, "theta_")
        meta = self._layer.meta()
        grid = meta.get("pool", 1)
        return np.asarray(
            [
                f"calm{k}_{a}_{b}"
                for k in range(meta["kernels"])
                for a in range(grid)
                for b in range(grid)
            ],
            dtype=object,
        )

    # -- files, pickling, PyTorch ---------------------------------------------------------

    def save(self, path, force=False):
        """Write the model file ``calm-gpu`` reads (safetensors); ``force`` replaces one."""
        check_is_fitted(self, "theta_")
        self._layer.save(os.fspath(path), force)

    def to_torch(self):
        """A ``torch.nn.Module`` whose ``forward(x)`` gives ``transform``'s features."""
        check_is_fitted(self, "theta_")
        from ._torch import module

        return module(self._layer)

    def __getstate__(self):
        # A copy: BaseEstimator's is the instance's own __dict__.
        state = dict(super().__getstate__())
        if "_layer" in state:
            state["_layer"] = bytes(state["_layer"].to_bytes())
        return state

    def __setstate__(self, state):
        if "_layer" in state:
            state = dict(state)
            state["_layer"] = _native.Layer.from_bytes(state["_layer"], "pickled CALM")
        super().__setstate__(state)


def load(path, backend="auto"):
    """A fitted ``CALM`` from a model file written by ``calm-gpu train`` or ``CALM.save``."""
    layer = _native.Layer.load(os.fspath(path))
    meta = layer.meta()
    calm = CALM(
        kernels=meta["kernels"],
        width=meta["width"],
        pad=meta["pad"],
        seed=meta["seed"],
        backend=backend,
        whiten=meta["whiten"] or 0,
        pool=meta.get("pool"),
        encode=meta.get("encode"),
        # Per-image ZCA applies to any input; "scale" and "none" follow the input's dtype.
        preprocess="zca-image" if meta["preprocess"] == "zca-image" else None,
    )
    calm._set_layer(layer)
    calm.backend_ = layer.engine
    calm.image_shape_ = tuple(int(v) for v in meta["image_shape"])
    calm.n_features_in_ = int(math.prod(calm.image_shape_))
    calm._rows = False
    return calm


class _Progress:
    """The callback fit and transform give the library: the user's callback, and a tqdm
    bar when ``verbose`` is on and tqdm is installed."""

    def __init__(self, est, what, images):
        self.user = est.callback
        self.bar = None
        self.images = images
        self.done = 0
        if est.verbose:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=images, desc=what, unit="img", leave=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

    def callback(self, info):
        if self.bar is not None:
            event = info["event"]
            if event == "epoch_start":
                self.bar.reset(total=self.images)
                self.bar.set_description(f"epoch {int(info['epoch'])}/{int(info['epochs'])}")
                self.done = 0
            elif event == "progress":
                done = int(info["images"])
                self.bar.update(done - self.done)
                self.done = done
            elif event == "epoch_end":
                self.bar.set_postfix(ll=f"{info['loglik_per_image']:.3f}")
        if self.user is not None:
            self.user(info)
