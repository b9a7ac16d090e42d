# dkmeans on the official Dask image: the scheduler, the workers and the `dkmeans fit` job all run this
# image, so the client, scheduler and workers have the same dask/distributed versions (Dask requires it).
ARG DASK_IMAGE=ghcr.io/dask/dask:2024.8.2-py3.12
FROM ${DASK_IMAGE}

WORKDIR /opt/dkmeans
COPY pyproject.toml README.md ./
COPY dkmeans ./dkmeans
# Installs dkmeans and only what the image lacks (bokeh for the dashboard, platformdirs, click...).
RUN pip install --no-cache-dir . && dkmeans --version

WORKDIR /work
