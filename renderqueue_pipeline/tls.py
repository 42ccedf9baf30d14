"""One TLS client context per CA bundle, shared by every outgoing HTTPS client.

httpx builds a new SSL context for each client or transport and loads the whole CA bundle
into it: about 0.1 s for a bundle the size of production's (certifi's roots, or
SSL_CERT_FILE: the local simulator's CA added to them). A batch at concurrency 32 built
four such clients and fal's file deletes one per call; all of them now share this one.
A context is safe to share between connections and threads.
"""

from __future__ import annotations

import functools
import os
import ssl

import certifi


def ssl_context() -> ssl.SSLContext:
    """Public roots, or SSL_CERT_FILE when set (as Python's ssl and httpx read it).

    Cached per bundle file and its modification time and size, so a bundle that changes
    (a test's simulator writing its own CA) gets a new context."""
    cafile = os.environ.get("SSL_CERT_FILE") or certifi.where()
    stat = os.stat(cafile)
    return _context_for(cafile, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _context_for(cafile: str, mtime_ns: int, size: int) -> ssl.SSLContext:
    del mtime_ns, size  # the cache key only
    return ssl.create_default_context(cafile=cafile)
