"""Checkpoints of a fit: the resumable state after every Lloyd update, written atomically.

A checkpoint holds what `engine.lloyd` needs to go on exactly where it stopped
(the centres after n updates and the losses of the passes before them), which
restart of ``n_init`` it belongs to and the best finished restart so far. It
also records the estimator's parameters and a fingerprint of the data, so a
checkpoint is never resumed against another problem: that is an error that
names what differs.

One ``.npz`` file, replaced by write-then-rename after every update, so a
reader (or a resume after a crash) sees the previous checkpoint or the new
one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .atomic import atomic_path

FORMAT_VERSION = 1

__all__ = ["Checkpoint", "CheckpointError", "FitState", "data_fingerprint"]


class CheckpointError(ValueError):
    """A checkpoint that is missing, unreadable, or belongs to another fit."""


@dataclass
class BestRun:
    """The lowest-inertia finished restart so far (labels are recomputed from the centres)."""

    restart: int
    centers: np.ndarray
    inertia: float
    n_iter: int
    loss_history: list[float]


@dataclass
class FitState:
    """Where a fit stands: restart `restart` has had `n_iter` updates, giving `centers`.

    ``restart == n_init`` means every restart has finished (``centers`` is then None).
    """

    restart: int
    n_iter: int
    centers: np.ndarray | None
    loss_history: list[float]
    seed_entropy: int | None = None
    best: BestRun | None = None
    extra: dict = field(default_factory=dict)

    def describe(self, n_init: int) -> str:
        if self.centers is None:
            return f"all {n_init} restart(s) finished"
        run = f"restart {self.restart + 1} of {n_init}, " if n_init > 1 else ""
        return f"{run}after {self.n_iter} update(s)"


def data_fingerprint(X) -> dict:
    """Shape, dtype and a content token of X: a Dask array's name, else a hash of the bytes."""
    token = getattr(X, "name", None)
    if not isinstance(token, str):
        array = np.ascontiguousarray(X)
        token = "sha256:" + hashlib.sha256(array.view(np.uint8).reshape(-1)).hexdigest()
    return {"shape": [int(n) for n in X.shape], "dtype": np.dtype(X.dtype).str, "token": token}


def params_fingerprint(params: dict) -> dict:
    """JSON-comparable form of the parameters that decide the result; an init array is hashed."""
    out = {}
    for name, value in params.items():
        if isinstance(value, np.ndarray):
            value = "array-sha256:" + hashlib.sha256(np.ascontiguousarray(value, dtype=np.float64)).hexdigest()
        elif isinstance(value, np.generic):
            value = value.item()
        out[name] = value
    return json.loads(json.dumps(out))


class Checkpoint:
    """The checkpoint file of one fit: `params` and `data` fingerprints must match to resume."""

    def __init__(self, path, params: dict, data: dict):
        self.path = Path(path)
        self.params = params_fingerprint(params)
        self.data = data
        self.last: FitState | None = None  # the last state written or read

    def save(self, state: FitState) -> None:
        meta = {
            "format_version": FORMAT_VERSION,
            "params": self.params,
            "data": self.data,
            "restart": state.restart,
            "n_iter": state.n_iter,
            "loss_history": [float(v) for v in state.loss_history],
            "seed_entropy": None if state.seed_entropy is None else str(state.seed_entropy),
            "best": None,
        }
        arrays = {}
        if state.centers is not None:
            arrays["centers"] = np.asarray(state.centers, dtype=np.float64)
        if state.best is not None:
            best = state.best
            meta["best"] = {
                "restart": best.restart,
                "inertia": float(best.inertia),
                "n_iter": best.n_iter,
                "loss_history": [float(v) for v in best.loss_history],
            }
            arrays["best_centers"] = np.asarray(best.centers, dtype=np.float64)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.path) as tmp, open(tmp, "wb") as f:
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        self.last = state

    def load(self) -> FitState:
        """The saved state, after checking it belongs to this fit; CheckpointError names any mismatch."""
        if not self.path.is_file():
            raise CheckpointError(f"No checkpoint to resume from at {self.path}")
        try:
            with np.load(self.path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                centers = z["centers"] if "centers" in z.files else None
                best_centers = z["best_centers"] if "best_centers" in z.files else None
        except (OSError, ValueError, KeyError, EOFError) as exc:
            raise CheckpointError(f"Checkpoint {self.path} is unreadable: {exc}") from exc
        if meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"Checkpoint {self.path} has format {meta.get('format_version')!r}, expected 1")
        if meta["params"] != self.params:
            diff = _differences(meta["params"], self.params)
            raise CheckpointError(
                f"Checkpoint {self.path} was written by a fit with other parameters ({diff}); "
                "use the same parameters or another checkpoint path"
            )
        if meta["data"] != self.data:
            diff = _differences(meta["data"], self.data)
            raise CheckpointError(
                f"Checkpoint {self.path} was written for other data ({diff}); "
                "resume on the same data (and chunking) or use another checkpoint path"
            )
        best = None
        if meta["best"] is not None:
            b = meta["best"]
            best = BestRun(b["restart"], best_centers, b["inertia"], b["n_iter"], b["loss_history"])
        entropy = meta.get("seed_entropy")
        state = FitState(
            restart=meta["restart"],
            n_iter=meta["n_iter"],
            centers=centers,
            loss_history=meta["loss_history"],
            seed_entropy=None if entropy is None else int(entropy),
            best=best,
        )
        self.last = state
        return state


def _differences(saved: dict, current: dict) -> str:
    names = sorted(set(saved) | set(current))
    return "; ".join(
        f"{n}: checkpoint {saved.get(n)!r}, now {current.get(n)!r}" for n in names if saved.get(n) != current.get(n)
    )
