"""Find the four MNIST files locally, or download them, and prove they are intact.

Every file is checked against a pinned SHA-256 before use, wherever it came
from: mirrors come and go, and a truncated or altered copy would otherwise
surface much later as a puzzling clustering result.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import urllib.request
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import platformdirs

from ..atomic import atomic_path

__all__ = [
    "MIRRORS",
    "MNIST_FILES",
    "ChecksumError",
    "DownloadError",
    "MnistFile",
    "default_cache_dir",
    "locate_mnist",
    "sha256_file",
]

log = logging.getLogger(__name__)


class MnistFile(NamedTuple):
    filename: str
    sha256: str


MNIST_FILES: Mapping[str, MnistFile] = MappingProxyType(
    {
        "train-images": MnistFile(
            "train-images-idx3-ubyte.gz",
            "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
        ),
        "train-labels": MnistFile(
            "train-labels-idx1-ubyte.gz",
            "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
        ),
        "test-images": MnistFile(
            "t10k-images-idx3-ubyte.gz",
            "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
        ),
        "test-labels": MnistFile(
            "t10k-labels-idx1-ubyte.gz",
            "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
        ),
    }
)

# Tried in order; the original site is last because it often refuses bots.
MIRRORS: tuple[str, ...] = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)

TIMEOUT_S = 30.0
_HASH_CHUNK = 1 << 20


class ChecksumError(ValueError):
    """A local file's SHA-256 differs from the pinned one."""


class DownloadError(OSError):
    """No mirror delivered a file with the pinned SHA-256."""


def default_cache_dir() -> Path:
    """`$DKMEANS_CACHE_DIR`, else the per-OS user cache directory."""
    env = os.environ.get("DKMEANS_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("dkmeans"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(_HASH_CHUNK):
            digest.update(piece)
    return digest.hexdigest()


def locate_mnist(
    data_dir: str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    mirrors: Iterable[str] | None = None,
) -> dict[str, Path]:
    """Map each logical MNIST name to a verified file, downloading only what is missing.

    Looks in `data_dir` (or `$DKMEANS_DATA_DIR`) first, then `<cache>/raw/`.
    `data_dir` is never written to, since it may be a shared read-only copy;
    files missing there are fetched into the cache instead.
    """
    if data_dir is None:
        data_dir = os.environ.get("DKMEANS_DATA_DIR") or None
    if data_dir is not None:
        data_dir = Path(data_dir).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"MNIST data_dir {data_dir} does not exist or is not a directory")
    raw_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    raw_dir = raw_dir / "raw"
    mirrors = tuple(MIRRORS if mirrors is None else mirrors)

    found: dict[str, Path] = {}
    for name, (filename, sha256) in MNIST_FILES.items():
        if data_dir is not None and (data_dir / filename).is_file():
            found[name] = _verified(data_dir / filename, sha256)
        else:
            found[name] = _cached_or_downloaded(raw_dir, filename, sha256, mirrors)
    return found


def _verified(path: Path, expected: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise ChecksumError(
            f"{path}: SHA-256 is {actual}, expected {expected}; the file is corrupt "
            "or not the original MNIST file (it was left in place)"
        )
    return path


def _cached_or_downloaded(raw_dir: Path, filename: str, sha256: str, mirrors: tuple[str, ...]) -> Path:
    dest = raw_dir / filename
    if dest.is_file():
        actual = sha256_file(dest)
        if actual == sha256:
            return dest
        # The cache is ours, so a bad copy there is replaced rather than reported.
        log.warning("cached %s has SHA-256 %s, expected %s; downloading again", dest, actual, sha256)
        dest.unlink()
    raw_dir.mkdir(parents=True, exist_ok=True)
    _download(filename, sha256, mirrors, dest)
    return dest


def _download(filename: str, sha256: str, mirrors: tuple[str, ...], dest: Path) -> None:
    if not mirrors:
        raise DownloadError(f"{filename} is not available locally and no mirrors were given")
    failures: list[str] = []
    for mirror in mirrors:
        url = mirror if mirror.endswith("/") else mirror + "/"
        url += filename
        log.info("downloading %s", url)
        try:
            _download_one(url, sha256, dest)
            return
        # URLError and timeouts are OSErrors; a bad URL or checksum is a ValueError.
        except (OSError, ValueError, http.client.HTTPException) as exc:
            failures.append(f"  {url}: {exc}")
            warnings.warn(f"MNIST mirror failed: {url}: {exc}", RuntimeWarning, stacklevel=2)
    raise DownloadError(f"could not download {filename} with SHA-256 {sha256} from any mirror:\n" + "\n".join(failures))


def _download_one(url: str, sha256: str, dest: Path) -> None:
    """Stream into a temporary file beside `dest`, verify, then rename atomically."""
    digest = hashlib.sha256()
    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as out, urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            while piece := response.read(_HASH_CHUNK):
                digest.update(piece)
                out.write(piece)
        actual = digest.hexdigest()
        if actual != sha256:  # raising here makes atomic_path delete the download
            raise ChecksumError(f"SHA-256 mismatch: expected {sha256}, got {actual} (download deleted)")
    log.info("downloaded %s (%.1f MB, SHA-256 verified)", dest.name, dest.stat().st_size / 1e6)
