"""Connecting to a running Dask scheduler: TLS security, bounded waits, and errors that say what failed.

A remote scheduler can be unreachable, speak TLS when we do not (or the
reverse), have no workers, or go away in the middle of a fit. Each of these
must end in a short message naming the address, never a hang or a traceback.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import time
from collections.abc import Iterator

from distributed import Client, Security

__all__ = ["ClusterError", "remote_client", "tls_security"]


class ClusterError(RuntimeError):
    """The scheduler could not be used; the message says why and names the address."""


def tls_security(ca_file=None, cert=None, key=None) -> Security | None:
    """Dask TLS security from the three files, or None to fall back on Dask's own config.

    Dask's TLS is mutual: the scheduler and workers accept only peers whose
    certificate is signed by the cluster's CA, so the client needs all three.
    """
    given = {"--tls-ca-file": ca_file, "--tls-cert": cert, "--tls-key": key}
    if not any(given.values()):
        return None
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise ClusterError(f"TLS needs --tls-ca-file, --tls-cert and --tls-key together; missing {', '.join(missing)}")
    for flag, value in given.items():
        if not os.path.isfile(value) or not os.access(value, os.R_OK):
            raise ClusterError(f"{flag} {value}: not a readable file")
    return Security(
        tls_ca_file=str(ca_file), tls_client_cert=str(cert), tls_client_key=str(key), require_encryption=True
    )


def _scheduler_gone(client: Client, grace: float = 3.0) -> bool:
    """Whether the client has lost its scheduler; a comm error can reach us a moment before the client notices."""
    deadline = time.monotonic() + grace
    while client.status == "running" and time.monotonic() < deadline:
        time.sleep(0.05)
    return client.status != "running"


def _drop_closed_comm(record: logging.LogRecord) -> bool:
    """Logging filter: leave out errors that only say the scheduler's comm is closed."""
    from distributed.comm.core import CommClosedError

    return not (record.exc_info and isinstance(record.exc_info[1], CommClosedError))


def _scheme(address: str) -> str:
    return address.split("://", 1)[0] if "://" in address else "tcp"


@contextlib.contextmanager
def remote_client(address: str, timeout: float, security: Security | None = None) -> Iterator[Client]:
    """A client of the scheduler at `address` with at least one worker, waiting at most `timeout` per step.

    Inside the block, losing the scheduler (it stopped, or the network failed)
    becomes a ClusterError as soon as the client notices, instead of whatever
    cancelled future or closed comm happened to be waiting.
    """
    scheme = _scheme(address)
    if security is None:
        security = Security()  # Dask's config: distributed.comm.tls.* / DASK_DISTRIBUTED__COMM__TLS__*
        if scheme == "tls" and not (security.tls_client_cert and security.tls_ca_file):
            raise ClusterError(
                f"The Dask scheduler at {address} uses TLS: give --tls-ca-file, --tls-cert and --tls-key "
                "(or Dask's distributed.comm.tls config)"
            )
    elif scheme != "tls":
        raise ClusterError(f"TLS certificates were given but the scheduler address {address} is not tls://HOST:PORT")
    hint = "" if scheme == "tls" else " (if the scheduler uses TLS, connect to tls://... with --tls-* certificates)"
    try:
        client = Client(address, timeout=timeout, security=security)
    except (OSError, TimeoutError) as exc:
        raise ClusterError(
            f"Could not connect to the Dask scheduler at {address} within {timeout:g} s: {exc}{hint}"
        ) from exc
    # A lost scheduler makes the batched comm log its closure, and tornado any message still being sent,
    # with a traceback before any error reaches us; the one-line error below says what happened.
    logging.getLogger("distributed.batched").setLevel(logging.CRITICAL)
    logging.getLogger("tornado.application").addFilter(_drop_closed_comm)
    with client:
        try:
            client.wait_for_workers(1, timeout=timeout)
        except TimeoutError as exc:
            raise ClusterError(
                f"The Dask scheduler at {address} has no workers (waited {timeout:g} s); "
                f"start some with: dask worker {address}"
            ) from exc
        try:
            yield client
        except (asyncio.CancelledError, concurrent.futures.CancelledError, OSError, TimeoutError) as exc:
            if not _scheduler_gone(client):
                raise
            # Closing the client cancels its reconnection attempts, which distributed logs with a
            # traceback; the one-line error below already says what happened.
            logging.getLogger("distributed.client").setLevel(logging.CRITICAL)
            notes = "".join(f" {note}" for note in getattr(exc, "__notes__", []))
            raise ClusterError(
                f"Lost the connection to the Dask scheduler at {address} during the fit "
                f"(the scheduler stopped or the network failed): {exc}.{notes}"
            ) from exc
