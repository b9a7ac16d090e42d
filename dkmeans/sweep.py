"""Elbow sweeps: one K-means model per (k, init), all fitted together in shared passes over the data."""

from __future__ import annotations

import functools
import numbers
import re
from dataclasses import dataclass

import numpy as np

from .estimator import KMeans, fit_many
from .metrics import accuracy, centroid_labels, predict_labels
from .seeding import INIT_NAMES


def parse_k_range(text: str) -> list[int]:
    """'5:20' (both ends included), '8:64:8' (with a step) or '10,20,64,256', as sorted distinct ks."""
    text = str(text).strip()
    if re.fullmatch(r"\d+:\d+(:\d+)?", text):
        start, stop, *step = (int(v) for v in text.split(":"))
        step = step[0] if step else 1
        if step < 1:
            raise ValueError(f"k range {text!r}: the step must be at least 1")
        if start > stop:
            raise ValueError(f"k range {text!r} is inverted: {start} > {stop}")
        ks = list(range(start, stop + 1, step))
    elif re.fullmatch(r"\d+(,\d+)*", text):
        ks = sorted({int(v) for v in text.split(",")})
    else:
        raise ValueError(f"k range {text!r}: expected START:STOP, START:STOP:STEP or a list like 10,20,64")
    if ks[0] < 1:
        raise ValueError(f"k range {text!r}: every k must be at least 1")
    return ks


def parse_inits(text: str) -> list[str]:
    """'sample,random' as a list of init names, checked against the known ones."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    if not names:
        raise ValueError("no init given; expected a comma-separated list of " + ", ".join(INIT_NAMES))
    unknown = [name for name in names if name not in INIT_NAMES]
    if unknown:
        raise ValueError(f"unknown init {', '.join(map(repr, unknown))}; expected some of {', '.join(INIT_NAMES)}")
    return list(dict.fromkeys(names))


@dataclass
class ElbowPoint:
    """One fitted model of a sweep and what the elbow plot and table show of it."""

    k: int
    init: str
    model: KMeans
    train_accuracy: float | None = None
    test_accuracy: float | None = None

    @property
    def j_clust(self) -> float:
        return float(self.model.loss_history_[-1])

    def summary(self) -> dict:
        return {
            "k": self.k,
            "init": self.init,
            "J_clust": self.j_clust,
            "inertia": float(self.model.inertia_),
            "n_iter": int(self.model.n_iter_),
            "train_accuracy": self.train_accuracy,
            "test_accuracy": self.test_accuracy,
        }


def elbow(
    X,
    ks,
    inits=("sample", "random"),
    *,
    y=None,
    X_test=None,
    y_test=None,
    random_state=0,
    max_iter: int = 300,
    tol: float = 1e-4,
    chunk_rows: int | None = None,
    algorithm: str = "auto",
    client=None,
    callback=None,
) -> list[ElbowPoint]:
    """Fit KMeans for every k in ``ks`` and every init, together, and score them.

    Each model is exactly ``KMeans(k, init=init, random_state=random_state,
    ...).fit(X)``, but every Lloyd pass reads the data once for all models
    still running. With labels ``y`` (and ``X_test``, ``y_test``) each point
    also gets the majority-vote accuracy. ``callback(k, init, iteration,
    j_clust, shift, seconds)`` reports every model's every iteration; one that
    takes ``kernel_seconds`` also learns the pass's compute time (as KMeans's).
    """
    ks = [ks] if isinstance(ks, numbers.Integral) else list(ks)
    if not ks:
        raise ValueError("elbow needs at least one k")
    if any(not isinstance(k, numbers.Integral) or isinstance(k, bool) or k < 1 for k in ks):
        raise ValueError(f"every k must be an integer >= 1, got {ks}")
    inits = [inits] if isinstance(inits, str) else list(inits)
    parse_inits(",".join(inits))
    if X_test is not None and y is None:
        raise ValueError("test accuracy needs the training labels y to name the clusters")
    points = []
    for init in inits:
        for k in ks:
            # KMeans passes kernel_seconds (and restart) to a callback whose signature takes them; the
            # partial shows the caller's own remaining parameters, so it gets what it asks for.
            report = None if callback is None else functools.partial(callback, k, init)
            model = KMeans(
                k,
                init=init,
                max_iter=max_iter,
                tol=tol,
                random_state=random_state,
                chunk_rows=chunk_rows,
                algorithm=algorithm,
                callback=report,
            )
            points.append(ElbowPoint(int(k), init, model))
    fit_many([p.model for p in points], X, client=client)
    if y is not None:
        y = np.asarray(y)
        test = None if X_test is None else np.asarray(X_test)
        for p in points:
            mapping = centroid_labels(p.model.labels_, y, p.k)
            p.train_accuracy = accuracy(y, predict_labels(p.model.labels_, mapping))
            if test is not None:
                p.test_accuracy = accuracy(y_test, predict_labels(p.model.predict(test), mapping))
    return points
