"""Tests for dkmeans.data against the real MNIST files in $DKMEANS_DATA_DIR."""

import gzip
import json
import pickle
import re
import shutil
import struct

import dask.array as da
import numpy as np
import pytest

from dkmeans.data import (
    MNIST,
    MNIST_FILES,
    ChecksumError,
    DownloadError,
    IDXFormatError,
    NpyRows,
    StoreError,
    default_cache_dir,
    load_mnist,
    locate_mnist,
    read_idx,
)
from dkmeans.data.store import STORE_NAME, build_store

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
SOURCES = {name: spec.sha256 for name, spec in MNIST_FILES.items()}


@pytest.fixture(autouse=True)
def isolated_env(monkeypatch, tmp_path):
    """No test may touch the real user cache or pick up the data dir by accident."""
    monkeypatch.setenv("DKMEANS_CACHE_DIR", str(tmp_path / "env-cache"))
    monkeypatch.delenv("DKMEANS_DATA_DIR", raising=False)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory, mnist_dir):
    """One converted store for the tests that only read it."""
    cache = tmp_path_factory.mktemp("shared-cache")
    load_mnist(data_dir=mnist_dir, cache_dir=cache)
    return cache


@pytest.fixture(scope="module")
def raw(mnist_dir):
    return {name: read_idx(mnist_dir / spec.filename) for name, spec in MNIST_FILES.items()}


def idx_bytes(array, type_code=0x08, dtype="u1"):
    array = np.asarray(array, dtype=dtype)
    header = bytes([0, 0, type_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.tobytes()


def write(path, data):
    path.write_bytes(data)
    return path


def snapshot(folder):
    return sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()) + [
        ("<dir>", folder.stat().st_mtime_ns, 0)
    ]


def corrupt_copy(src, dst):
    data = bytearray(src.read_bytes())
    data[-20] ^= 0xFF
    dst.write_bytes(bytes(data))


# --- idx --------------------------------------------------------------------


def test_read_idx_real_files(raw):
    assert raw["train-images"].shape == (60000, 28, 28)
    assert raw["train-labels"].shape == (60000,)
    assert raw["test-images"].shape == (10000, 28, 28)
    assert raw["test-labels"].shape == (10000,)
    assert all(a.dtype == np.uint8 for a in raw.values())
    assert np.bincount(raw["train-labels"]).tolist() == TRAIN_COUNTS
    assert np.bincount(raw["test-labels"]).tolist() == TEST_COUNTS
    assert raw["train-labels"][:5].tolist() == [5, 0, 4, 1, 9]


def test_read_idx_detects_gzip_by_content_not_suffix(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    zipped = write(tmp_path / "plain-name.idx", gzip.compress(idx_bytes(array)))
    unzipped = write(tmp_path / "looks-zipped.gz", idx_bytes(array))
    np.testing.assert_array_equal(read_idx(zipped), array)
    np.testing.assert_array_equal(read_idx(unzipped), array)


@pytest.mark.parametrize(("code", "dtype"), [(0x09, "i1"), (0x0B, ">i2"), (0x0C, ">i4"), (0x0D, ">f4"), (0x0E, ">f8")])
def test_read_idx_other_type_codes(tmp_path, code, dtype):
    array = np.array([[-3, 1], [2, 100]], dtype=dtype)
    result = read_idx(write(tmp_path / "x.idx", idx_bytes(array, code, dtype)))
    assert result.dtype.isnative
    np.testing.assert_array_equal(result, array)


def _deflate_corrupted(payload):
    data = bytearray(gzip.compress(payload))
    data[len(data) // 2] ^= 0xFF
    return bytes(data)


GOOD = idx_bytes(np.zeros((10, 5, 2), dtype=np.uint8))  # 16-byte header + 100-byte payload
BAD_FILES = {
    "truncated-gz": (gzip.compress(GOOD)[:-30], "corrupt or truncated gzip stream"),
    "gz-short-payload": (gzip.compress(GOOD[:-10]), r"payload is 90 bytes, expected 100 for shape \(10, 5, 2\)"),
    "truncated-raw": (GOOD[:-10], r"payload is 90 bytes, expected 100 for shape \(10, 5, 2\)"),
    "trailing-raw": (GOOD + b"extra", r"payload is 105 bytes, expected 100"),
    "trailing-gz": (gzip.compress(GOOD + b"extra"), r"payload is 105 bytes, expected 100"),
    "wrong-magic": (b"\x01\x00" + GOOD[2:], "bad magic number 0x01000803"),
    "unknown-type": (b"\x00\x00\x07\x03" + GOOD[4:], "unknown IDX type code 0x07"),
    "corrupt-deflate": (_deflate_corrupted(GOOD), "corrupt or truncated gzip stream"),
    "zero-ndim": (b"\x00\x00\x08\x00", "0 dimensions"),
    "short-dims": (b"\x00\x00\x08\x03" + struct.pack(">2I", 10, 5), "header is truncated"),
    "empty": (b"", "too short for an IDX header"),
    "dims-disagree": (b"\x00\x00\x08\x03" + struct.pack(">3I", 10, 5, 3) + GOOD[16:], "expected 150"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_read_idx_rejects_malformed_files(tmp_path, case):
    data, problem = BAD_FILES[case]
    path = write(tmp_path / f"{case}-idx3-ubyte.gz", data)
    with pytest.raises(IDXFormatError, match=re.escape(str(path)) + ".*" + problem):
        read_idx(path)


def test_read_idx_truncated_real_labels(tmp_path, mnist_dir):
    labels = gzip.decompress((mnist_dir / "train-labels-idx1-ubyte.gz").read_bytes())
    path = write(tmp_path / "train-labels-idx1-ubyte.gz", gzip.compress(labels[: 8 + 1000]))
    with pytest.raises(IDXFormatError, match=r"train-labels-idx1-ubyte.gz: payload is 1000 bytes, expected 60000"):
        read_idx(path)


# --- store build validation --------------------------------------------------


def test_store_rejects_count_mismatch(tmp_path, mnist_dir):
    files = {name: mnist_dir / spec.filename for name, spec in MNIST_FILES.items()}
    files["train-images"] = write(tmp_path / "few-images.idx", idx_bytes(np.zeros((100, 28, 28))))
    dest = tmp_path / "cache" / STORE_NAME
    with pytest.raises(StoreError, match=r"few-images.idx has 100 images.*train-labels-idx1-ubyte.gz has 60000"):
        build_store(files, dest, SOURCES)
    assert not dest.exists()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary build was cleaned up


def test_store_rejects_non_28x28_images(tmp_path, mnist_dir):
    files = {name: mnist_dir / spec.filename for name, spec in MNIST_FILES.items()}
    files["test-images"] = write(tmp_path / "odd.idx", idx_bytes(np.zeros((10000, 20, 20))))
    with pytest.raises(StoreError, match=r"odd.idx: expected uint8 images of shape \(n, 28, 28\)"):
        build_store(files, tmp_path / STORE_NAME, SOURCES)


# --- locate / fetch ----------------------------------------------------------


def test_default_cache_dir(monkeypatch, tmp_path):
    assert default_cache_dir() == tmp_path / "env-cache"
    monkeypatch.delenv("DKMEANS_CACHE_DIR")
    assert "dkmeans" in str(default_cache_dir())


def test_locate_prefers_data_dir_from_env(monkeypatch, tmp_path, mnist_dir):
    monkeypatch.setenv("DKMEANS_DATA_DIR", str(mnist_dir))
    cache = tmp_path / "cache"
    found = locate_mnist(cache_dir=cache, mirrors=[])
    assert found == {name: mnist_dir / spec.filename for name, spec in MNIST_FILES.items()}
    assert not cache.exists()


def test_locate_never_writes_into_data_dir(tmp_path, mnist_dir):
    data = tmp_path / "readonly"
    data.mkdir()
    for name in ("train-images", "train-labels", "test-images"):  # test-labels is missing
        shutil.copy(mnist_dir / MNIST_FILES[name].filename, data)
    for p in data.iterdir():
        p.chmod(0o444)
    data.chmod(0o555)  # root ignores this, hence the snapshot below
    before = snapshot(data)
    try:
        found = locate_mnist(data_dir=data, cache_dir=tmp_path / "cache", mirrors=[mnist_dir.as_uri()])
        assert snapshot(data) == before
    finally:
        data.chmod(0o755)
    assert found["train-images"] == data / "train-images-idx3-ubyte.gz"
    assert found["test-labels"] == tmp_path / "cache" / "raw" / "t10k-labels-idx1-ubyte.gz"
    assert found["test-labels"].read_bytes() == (mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_locate_missing_data_dir_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        locate_mnist(data_dir=tmp_path / "nope", cache_dir=tmp_path / "cache")


def test_locate_reports_corrupt_file_in_data_dir_and_keeps_it(tmp_path, mnist_dir):
    data = tmp_path / "data"
    shutil.copytree(mnist_dir, data)
    bad = data / "t10k-labels-idx1-ubyte.gz"
    bad.chmod(0o644)
    corrupt_copy(mnist_dir / bad.name, bad)
    expected = MNIST_FILES["test-labels"].sha256
    with pytest.raises(ChecksumError, match=rf"{re.escape(str(bad))}: SHA-256 is [0-9a-f]{{64}}, expected {expected}"):
        locate_mnist(data_dir=data, cache_dir=tmp_path / "cache", mirrors=[mnist_dir.as_uri()])
    assert bad.exists()


def test_locate_downloads_from_mirror(tmp_path, mnist_dir):
    cache = tmp_path / "cache"
    found = locate_mnist(cache_dir=cache, mirrors=[mnist_dir.as_uri()])
    assert sorted(p.name for p in (cache / "raw").iterdir()) == sorted(s.filename for s in MNIST_FILES.values())
    for name, spec in MNIST_FILES.items():
        assert found[name] == cache / "raw" / spec.filename
        assert found[name].read_bytes() == (mnist_dir / spec.filename).read_bytes()
    # A second call finds the cache and needs no mirror.
    assert locate_mnist(cache_dir=cache, mirrors=[]) == found


@pytest.fixture
def bad_mirror(tmp_path, mnist_dir):
    mirror = tmp_path / "bad-mirror"
    mirror.mkdir()
    for spec in MNIST_FILES.values():
        corrupt_copy(mnist_dir / spec.filename, mirror / spec.filename)
    return mirror


def test_bad_mirror_is_rejected_and_next_used(tmp_path, mnist_dir, bad_mirror):
    cache = tmp_path / "cache"
    expected = MNIST_FILES["train-images"].sha256
    with pytest.warns(RuntimeWarning) as record:
        found = locate_mnist(cache_dir=cache, mirrors=[bad_mirror.as_uri(), mnist_dir.as_uri() + "/"])
    messages = [str(w.message) for w in record]
    assert len(messages) == 4
    bad_url = f"{bad_mirror.as_uri()}/train-images-idx3-ubyte.gz"
    assert any(bad_url in m and f"expected {expected}, got " in m for m in messages)
    assert sorted(p.name for p in (cache / "raw").iterdir()) == sorted(s.filename for s in MNIST_FILES.values())
    for name, spec in MNIST_FILES.items():
        assert found[name].read_bytes() == (mnist_dir / spec.filename).read_bytes()


def test_all_mirrors_bad(tmp_path, bad_mirror):
    cache = tmp_path / "cache"
    gone = (tmp_path / "no-such-mirror").as_uri()
    with pytest.warns(RuntimeWarning), pytest.raises(DownloadError) as info:
        locate_mnist(cache_dir=cache, mirrors=[bad_mirror.as_uri(), gone])
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert f"{bad_mirror.as_uri()}/train-images-idx3-ubyte.gz: SHA-256 mismatch" in message
    assert f"{gone}/train-images-idx3-ubyte.gz: " in message
    assert list((cache / "raw").iterdir()) == []  # no partial or unverified file left behind


def test_corrupt_cached_file_is_downloaded_again(tmp_path, mnist_dir):
    raw_dir = tmp_path / "cache" / "raw"
    raw_dir.mkdir(parents=True)
    write(raw_dir / "t10k-labels-idx1-ubyte.gz", b"garbage")
    found = locate_mnist(cache_dir=tmp_path / "cache", mirrors=[mnist_dir.as_uri()])
    assert found["test-labels"].read_bytes() == (mnist_dir / "t10k-labels-idx1-ubyte.gz").read_bytes()


# --- store / load_mnist --------------------------------------------------------


def test_load_mnist_values(shared_cache, raw, mnist_dir):
    mnist = load_mnist(data_dir=mnist_dir, cache_dir=shared_cache, chunk_rows=7000)
    assert isinstance(mnist, MNIST)
    assert mnist.image_shape == (28, 28)
    for images, name, n in ((mnist.train_images, "train", 60000), (mnist.test_images, "test", 10000)):
        assert isinstance(images, da.Array)
        assert images.dtype == np.uint8
        assert images.shape == (n, 784)
        assert set(images.chunks[0][:-1]) == {7000} and images.chunks[1] == (784,)
        np.testing.assert_array_equal(images.compute(), raw[f"{name}-images"].reshape(n, 784))
    np.testing.assert_array_equal(mnist.train_labels, raw["train-labels"])
    np.testing.assert_array_equal(mnist.test_labels, raw["test-labels"])
    assert not mnist.train_labels.flags.writeable


def test_load_mnist_uses_env_dirs(monkeypatch, tmp_path, mnist_dir):
    monkeypatch.setenv("DKMEANS_DATA_DIR", str(mnist_dir))
    mnist = load_mnist()
    assert (tmp_path / "env-cache" / STORE_NAME / "manifest.json").is_file()
    assert mnist.train_images.shape == (60000, 784)


def test_store_is_built_once_and_keys_are_stable(tmp_path, mnist_dir):
    cache = tmp_path / "cache"
    first = load_mnist(data_dir=mnist_dir, cache_dir=cache)
    manifest = cache / STORE_NAME / "manifest.json"
    mtime = manifest.stat().st_mtime_ns
    second = load_mnist(data_dir=mnist_dir, cache_dir=cache)
    assert manifest.stat().st_mtime_ns == mtime
    assert first.train_images.name == second.train_images.name
    assert first.train_images.name != load_mnist(data_dir=mnist_dir, cache_dir=cache, chunk_rows=5000).train_images.name
    manifest_data = json.loads(manifest.read_text())
    assert manifest_data["sources"]["train-images"]["sha256"] == MNIST_FILES["train-images"].sha256
    assert manifest_data["arrays"]["train-images"]["shape"] == [60000, 784]


def _break_manifest_missing(store):
    (store / "manifest.json").unlink()


def _break_manifest_stale(store):
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["sources"]["train-images"]["sha256"] = "0" * 64
    (store / "manifest.json").write_text(json.dumps(manifest))


def _break_array_truncated(store):
    path = store / "test-images.npy"
    path.write_bytes(path.read_bytes()[:1000])


def _break_half_built(store):
    shutil.rmtree(store)
    store.mkdir()
    np.save(store / "train-images.npy", np.zeros((3, 784), np.uint8))


@pytest.mark.parametrize(
    "damage", [_break_manifest_missing, _break_manifest_stale, _break_array_truncated, _break_half_built]
)
def test_damaged_store_is_rebuilt(tmp_path, mnist_dir, raw, damage):
    cache = tmp_path / "cache"
    load_mnist(data_dir=mnist_dir, cache_dir=cache)
    damage(cache / STORE_NAME)
    mnist = load_mnist(data_dir=mnist_dir, cache_dir=cache)
    assert json.loads((cache / STORE_NAME / "manifest.json").read_text())["sources"]["train-images"] == {
        "sha256": MNIST_FILES["train-images"].sha256
    }
    np.testing.assert_array_equal(mnist.test_images.compute(), raw["test-images"].reshape(10000, 784))
    assert [p.name for p in cache.iterdir() if p.name.startswith(".")] == []


def test_leftover_temporary_build_is_ignored(tmp_path, mnist_dir, raw):
    cache = tmp_path / "cache"
    leftover = cache / f".{STORE_NAME}.tmp-1-deadbeef"
    leftover.mkdir(parents=True)
    np.save(leftover / "test-images.npy", np.zeros((10000, 784), np.uint8))
    write(leftover / "manifest.json", b"{}")
    mnist = load_mnist(data_dir=mnist_dir, cache_dir=cache)
    np.testing.assert_array_equal(mnist.test_images.compute(), raw["test-images"].reshape(10000, 784))


def test_npy_rows_pickles_as_a_path(shared_cache, raw):
    rows = NpyRows.open(shared_cache / STORE_NAME / "train-images.npy")
    assert (rows.shape, rows.dtype, rows.ndim) == ((60000, 784), np.uint8, 2)
    blob = pickle.dumps(rows)
    assert len(blob) < 1024
    clone = pickle.loads(blob)
    part = clone[100:110]
    assert type(part) is np.ndarray and part.flags.writeable
    np.testing.assert_array_equal(part, raw["train-images"][100:110].reshape(10, 784))


def test_dask_graph_carries_no_pixels(shared_cache, mnist_dir):
    mnist = load_mnist(data_dir=mnist_dir, cache_dir=shared_cache)
    assert len(pickle.dumps(dict(mnist.train_images.__dask_graph__()))) < 20_000


# --- subsampling ----------------------------------------------------------------


def test_subsample(shared_cache, mnist_dir, raw):
    def load(seed):
        return load_mnist(
            data_dir=mnist_dir, cache_dir=shared_cache, chunk_rows=300, train_per_digit=100, test_size=50, seed=seed
        )

    sub = load(72)
    assert sub.train_images.shape == (1000, 784) and sub.test_images.shape == (50, 784)
    assert sub.train_images.chunks[0] == (300, 300, 300, 100)
    assert np.bincount(sub.train_labels, minlength=10).tolist() == [100] * 10
    assert len(sub.test_labels) == 50

    # Every selected image is a real training image carrying its own label.
    labels_of = {}
    for image, label in zip(raw["train-images"].reshape(60000, 784), raw["train-labels"]):
        labels_of.setdefault(image.tobytes(), set()).add(int(label))
    train_x = sub.train_images.compute()
    assert all(int(y) in labels_of[x.tobytes()] for x, y in zip(train_x, sub.train_labels))

    again = load(72)
    assert again.train_images.name == sub.train_images.name
    np.testing.assert_array_equal(again.train_images.compute(), train_x)
    np.testing.assert_array_equal(again.test_labels, sub.test_labels)
    np.testing.assert_array_equal(again.test_images.compute(), sub.test_images.compute())

    other = load(73)
    assert not np.array_equal(other.train_images.compute(), train_x)
    assert not np.array_equal(other.test_images.compute(), sub.test_images.compute())

    # The test sample does not depend on whether the training set is subsampled.
    test_only = load_mnist(data_dir=mnist_dir, cache_dir=shared_cache, test_size=50, seed=72)
    assert test_only.train_images.shape == (60000, 784)
    np.testing.assert_array_equal(test_only.test_labels, sub.test_labels)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"chunk_rows": 0}, ValueError, "chunk_rows must be at least 1, got 0"),
        ({"chunk_rows": 1.5}, TypeError, "chunk_rows must be an integer"),
        ({"train_per_digit": 0}, ValueError, "train_per_digit must be at least 1"),
        ({"train_per_digit": 5422}, ValueError, r"train_per_digit must be between 1 and 5421 \(digit 5 has only"),
        ({"test_size": 0}, ValueError, "test_size must be at least 1"),
        ({"test_size": 10001}, ValueError, "test_size must be between 1 and 10000, got 10001"),
    ],
)
def test_bad_arguments(shared_cache, mnist_dir, kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        load_mnist(data_dir=mnist_dir, cache_dir=shared_cache, **kwargs)


def test_workers_read_their_own_rows(shared_cache, mnist_dir, raw):
    distributed = pytest.importorskip("distributed")
    mnist = load_mnist(data_dir=mnist_dir, cache_dir=shared_cache, chunk_rows=10000)
    with distributed.Client(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as client:
        sums = client.compute(mnist.train_images.sum(axis=0, dtype=np.int64)).result()
    np.testing.assert_array_equal(sums, raw["train-images"].reshape(60000, 784).sum(axis=0, dtype=np.int64))


def test_checksum_is_zlibs_crc32(mnist_dir):
    """Stores record zlib's CRC-32; zlib-ng's must give the same values, in one call or chained."""
    import zlib

    from dkmeans import checksum

    raw = (mnist_dir / "train-images-idx3-ubyte.gz").read_bytes()
    pixels = np.frombuffer(gzip.decompress(raw), dtype=np.uint8)
    assert checksum.crc32(raw) == zlib.crc32(raw)
    assert checksum.crc32(pixels.data) == zlib.crc32(pixels.data)
    half = pixels.size // 2
    assert checksum.crc32(pixels[half:].data, checksum.crc32(pixels[:half].data)) == zlib.crc32(pixels.data)
    assert checksum.crc32(pixels[1:].data) != zlib.crc32(pixels.data)
