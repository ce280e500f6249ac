"""``stackctl router --config PATH`` / ``python -m stackctl.router --config PATH``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from aiohttp import web

from .app import Router
from .config import RouterConfigError, load_api_keys, load_config
from .upstream import UpstreamClient, UpstreamPool

log = logging.getLogger("stackctl.router")


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # e.g. Windows; the router still works, only slower
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


async def serve(router: Router) -> None:
    """Serve until SIGINT/SIGTERM; SIGHUP reloads the config file."""
    config = router.config
    # handler_cancellation: a client that disconnects cancels its handler, which closes the
    # upstream connection, which makes the engine abort the request.
    runner = web.AppRunner(router.build_app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=2048, reuse_address=True)
    try:
        await site.start()
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGHUP, router.reload)
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "router listening on %s:%s, policy %s, %d engines",
            config.host,
            config.port,
            config.policy,
            len(config.engines),
        )
        await stop.wait()
    finally:
        await runner.cleanup()


def main(
    argv: list[str] | None = None,
    upstream_factory: Callable[[float, float], UpstreamClient[Any]] = UpstreamPool,
) -> int:
    """Run the router; ``upstream_factory`` builds its proxy client (an UpstreamClient from
    connect and first-byte timeouts), replaced only by benchmarks/aiohttp_upstream.py."""
    parser = argparse.ArgumentParser(
        prog="stackctl router", description="KV-aware OpenAI-compatible router"
    )
    parser.add_argument("--config", required=True, help="router.yaml")
    parser.add_argument(
        "--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"]
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_config(args.config)
        keys = load_api_keys(config.api_keys_file)
    except RouterConfigError as exc:
        print(f"stackctl router: error: {exc}", file=sys.stderr)
        return 2
    router = Router(
        config, config_path=args.config, api_keys=keys, upstream_factory=upstream_factory
    )
    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            runner.run(serve(router))
    except OSError as exc:  # e.g. the port is taken
        print(
            f"stackctl router: error: cannot listen on {config.host}:{config.port}: "
            f"{exc.strerror or exc}",
            file=sys.stderr,
        )
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
