"""Intrinsic dimension of a point cloud (e.g. a model's clean features): three estimators.

* :func:`twonn` (Facco et al., Sci. Rep. 2017): the ratio of each point's second to first
  nearest-neighbour distance is Pareto(d); d is the slope of -log(1 - F(mu)) against log(mu)
  through the origin, fitted on the smallest 90% of ratios.
* :func:`mle` (Levina & Bickel, NeurIPS 2004, with MacKay & Ghahramani's correction: average the
  inverse local estimates, then invert).
* :func:`pca`: the number of principal components that explain ``variance`` of the variance (a linear
  upper bound).

Compare models with the same number of points: every estimator drifts with N.
"""

from __future__ import annotations

import numpy as np
import torch


def _neighbour_distances(points: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    distances, _ = NearestNeighbors(n_neighbors=k + 1).fit(points).kneighbors(points)
    return distances[:, 1:]  # drop each point itself


def _as_array(features) -> np.ndarray:
    array = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    return np.unique(array.reshape(len(array), -1), axis=0)  # duplicates make r1 = 0


def twonn(features, fraction: float = 0.9) -> float:
    points = _as_array(features)
    distances = _neighbour_distances(points, 2)
    mu = np.sort(distances[:, 1] / distances[:, 0])
    keep = int(np.floor(len(mu) * fraction))
    mu = mu[:keep]
    empirical = np.arange(1, keep + 1) / len(distances)
    x, y = np.log(mu), -np.log(1 - empirical)
    return float((x @ y) / (x @ x))


def mle(features, k: int = 20) -> float:
    points = _as_array(features)
    distances = _neighbour_distances(points, k)
    logs = np.log(distances[:, -1:] / distances[:, :-1])  # log(T_k / T_j), j < k
    inverse_local = logs.sum(1) / (k - 1)
    return float(1.0 / inverse_local.mean())


def pca(features, variance: float = 0.9) -> float:
    points = _as_array(features)
    centred = points - points.mean(0)
    singular = np.linalg.svd(centred, compute_uv=False)
    explained = np.cumsum(singular ** 2) / np.sum(singular ** 2)
    return float(np.searchsorted(explained, variance) + 1)


ESTIMATORS = {"twonn": twonn, "mle": mle, "pca": pca}
