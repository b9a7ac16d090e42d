"""dkmeans: distributed, out-of-core K-means clustering on Dask."""

from .estimator import KMeans

__all__ = ["KMeans"]
__version__ = "0.1.0"
