"""dkmeans: distributed, out-of-core K-means clustering on Dask."""

from .estimator import KMeans, fit_many

__all__ = ["KMeans", "fit_many"]
__version__ = "0.1.0"
