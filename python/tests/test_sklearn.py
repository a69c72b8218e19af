"""CALM as scikit-learn expects an estimator to behave."""

import numpy as np
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from calm_gpu import CALM


# Every check of scikit-learn's suite passes: none is listed as expected to fail. The checks
# feed 2-D data of a few columns, so each row is a 1 x F image (image_shape=(1, -1)) and the
# kernels are single pixels.
@parametrize_with_checks(
    [CALM(kernels=3, width=1, pad=0, epochs=2, backend="cpu", image_shape=(1, -1))]
)
def test_scikit_learn_checks(estimator, check):
    check(estimator)


def labelled(images):
    """A label the features can predict: whether the image's mass lies left or right."""
    x = images.astype(np.float64)
    half = x.shape[-1] // 2
    return (x[..., :half].sum(axis=(1, 2)) > x[..., half:].sum(axis=(1, 2))).astype(int)


def test_pipeline_grid_search_and_clone(images):
    y = labelled(images)
    pipe = make_pipeline(
        CALM(kernels=8, width=5, pad=0, epochs=2, backend="cpu", pool=2),
        StandardScaler(),
        LogisticRegression(max_iter=500),
    )
    search = GridSearchCV(pipe, {"calm__kernels": [4, 8]}, cv=2)
    search.fit(images, y)
    assert search.best_params_["calm__kernels"] in (4, 8)
    assert search.score(images, y) > 0.8
    fitted = search.best_estimator_.named_steps["calm"]
    assert fitted.transform(images).shape == (len(images), fitted.kernels * 4)
    twin = clone(fitted)
    assert twin.get_params() == fitted.get_params()
    assert not hasattr(twin, "theta_")


def test_flattened_rows_need_image_shape(images):
    rows = images.reshape(len(images), -1)
    square = CALM(kernels=4, width=5, pad=0, epochs=1, backend="cpu", image_shape=(16, 16))
    a = square.fit(rows).transform(rows)
    b = clone(square).set_params(image_shape=None).fit(images).transform(images)
    np.testing.assert_array_equal(a, b)
    assert square.n_features_in_ == 256
    assert square.get_feature_names_out().shape == (4,)
