"""dkmeans: distributed, out-of-core K-means clustering on Dask."""

__all__ = ["KMeans", "fit_many"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """KMeans and fit_many, imported on first use: workers import dkmeans for its kernels alone, and the
    estimator brings dask.array (data.store.dask_rows says what that costs a worker)."""
    if name in __all__:
        from . import estimator

        return getattr(estimator, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
