"""The stackctl router with aiohttp's ClientSession as its upstream client (an A/B baseline).

    python -m benchmarks.aiohttp_upstream --config router.yaml

benchmarks/router_overhead.py runs this as target ``ours-kv-aiohttp`` to measure what the
lean client in stackctl/router/upstream.py saves. Not shipped: production routers always use
``UpstreamPool``; this class implements the same ``UpstreamClient`` interface on one
``aiohttp.ClientSession`` with ``TCPConnector(limit=0)``.
"""

from __future__ import annotations

import asyncio
import sys

import aiohttp

from stackctl.router.__main__ import main
from stackctl.router.upstream import UpstreamError


class AiohttpResponse:
    """aiohttp's ClientResponse behind the UpstreamResponse interface."""

    __slots__ = ("resp", "status", "headers", "content_length")

    def __init__(self, resp: aiohttp.ClientResponse):
        self.resp = resp
        self.status = resp.status
        self.headers = {k.lower(): v for k, v in resp.headers.items()}
        self.content_length = resp.content_length

    async def read(self, timeout: float) -> bytes:
        try:
            return await self.resp.content.readany()
        except aiohttp.ClientError as exc:  # the interface raises UpstreamError, not aiohttp's
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc

    @property
    def complete(self) -> bool:
        return self.resp.content.at_eof()


class AiohttpUpstreamClient:
    """UpstreamClient on one aiohttp ClientSession (TCPConnector(limit=0))."""

    def __init__(self, connect_s: float, first_byte_s: float, idle_s: float = 4.0):
        self.connect_s, self.read_s = connect_s, first_byte_s
        self.engine_key: str | None = None  # set by the router from its engine_key_file
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=idle_s),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",),
        )
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_s, sock_read=first_byte_s
        )

    async def request(
        self, url: str, path: str, body: bytes, timeout: float | None = None
    ) -> AiohttpResponse:
        limits = self._timeout
        if timeout is not None:  # the head's timeout (the router's first_byte_s or total_s)
            limits = aiohttp.ClientTimeout(
                total=None, sock_connect=self.connect_s, sock_read=timeout
            )
        try:
            resp = await self.session.post(
                url + path,
                data=body,
                timeout=limits,
                headers={"Content-Type": "application/json"}
                | ({"Authorization": f"Bearer {self.engine_key}"} if self.engine_key else {}),
            )
        except aiohttp.ClientConnectorError as exc:
            raise ConnectionRefusedError(str(exc)) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc
        return AiohttpResponse(resp)

    def release(self, response: AiohttpResponse, url: str) -> None:
        if response.complete:
            response.resp.release()
        else:
            response.resp.close()

    def close(self) -> None:
        asyncio.get_event_loop().create_task(self.session.close())


if __name__ == "__main__":
    sys.exit(main(upstream_factory=AiohttpUpstreamClient))
