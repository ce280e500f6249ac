"""``stackctl router --config PATH`` / ``python -m stackctl.router --config PATH``."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

from .app import Router
from .config import (
    RouterConfigError,
    connections_within,
    load_client_keys,
    load_config,
    load_engine_key,
)
from .listener import raise_fd_limit, start_listener
from .requests import ParserErrorLog
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
    limit, needed = raise_fd_limit(config.connections)
    if limit < needed:
        log.warning(
            "open-file limit %d is below the %d that connections.max %d needs: the router "
            "holds at most %d client connections (the rest get 503); raise the limit "
            "(LimitNOFILE, or the hard nofile limit of the account that starts supervisord) "
            "or lower connections.max",
            limit,
            needed,
            config.connections.max,
            connections_within(limit),
        )
    runner, _ = await start_listener(router, limit)  # caps, read deadlines (listener.py)
    try:
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
    # A request aiohttp's HTTP parser rejects: one line, rate-limited, not a traceback.
    logging.getLogger("aiohttp.server").addFilter(ParserErrorLog())
    try:
        config = load_config(args.config)
        keys = load_client_keys(config.api_keys_file)
        load_engine_key(config.engine_key_file)  # a missing or bad file: exit 2, not a traceback
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
