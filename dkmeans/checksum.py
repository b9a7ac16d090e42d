"""CRC-32 of stored chunks and state files: zlib's checksum, computed by zlib-ng.

Every streamed pass checks the CRC-32 of every chunk it reads. The zlib that
CPython links (1.2.13 here) computes it at 2.4-2.9 GB/s: 1.6-2.0 ms of each
4.7 MB MNIST chunk's read, more than the read itself. zlib-ng's SIMD
version gives the same values (the same polynomial, so stores and their
manifests are unchanged) at about 50 GB/s on the same machine.
"""

from __future__ import annotations

from zlib_ng.zlib_ng import crc32

__all__ = ["crc32"]
