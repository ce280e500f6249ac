"""The simulator's API key check, as vLLM 0.32 does it (vllm/entrypoints/serve/middleware/).

vLLM takes its keys from ``--api-key`` (one or more), else the ``VLLM_API_KEY`` environment
variable; with a key set, every request under ``/v1``, ``/v2``, ``/inference`` or ``/cohere``
(except OPTIONS) needs ``Authorization: Bearer <key>`` and otherwise gets 401
``{"error": "Unauthorized"}``; ``/health``, ``/metrics``, ``/version`` and ``/ping`` stay open.
Keys are compared as SHA-256 digests with ``secrets.compare_digest``, against every key.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

GUARDED_PREFIX = ("/v1", "/v2", "/inference", "/cohere")  # vLLM's authenticate.py
UNAUTHORIZED = json.dumps({"error": "Unauthorized"})


def api_key_middleware(keys: Sequence[str]) -> Middleware:
    """An aiohttp middleware that refuses guarded paths without one of ``keys``."""
    digests = [hashlib.sha256(k.encode()).digest() for k in keys]

    def verified(request: web.Request) -> bool:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            return False
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        match = False
        for digest in digests:  # every key: the time does not tell which one matched
            match |= secrets.compare_digest(presented, digest)
        return match

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method != "OPTIONS"
            and request.path.startswith(GUARDED_PREFIX)
            and not verified(request)
        ):
            return web.Response(status=401, text=UNAUTHORIZED, content_type="application/json")
        return await handler(request)

    return middleware
