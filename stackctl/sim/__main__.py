"""Entry point: ``python -m stackctl.sim [serve] [MODEL] [vLLM flags] [--hardware --model-profile --time-scale]``."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from typing import TYPE_CHECKING

from stackctl.sim.config import KvEventsError, SimConfig, parse_args

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("stackctl.sim")


async def serve(config: SimConfig) -> None:
    """Serve until SIGTERM or SIGINT."""
    from aiohttp import web  # imported here so that a bad flag is reported fast

    from stackctl.sim.server import create_app

    app = create_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, config.host, config.port, backlog=1024)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        cpu_chunks = config.engine_config().cpu_capacity_chunks  # None exactly when lmcache is
        cpu_tier = (
            f"{cpu_chunks * config.lmcache.chunk_size} tokens"
            if cpu_chunks is not None and config.lmcache
            else "off"
        )
        log.info(
            "serving %s on http://%s:%d (%s on %s, tp=%d): %d GPU blocks of %d tokens (%d tokens), CPU tier %s, "
            "time scale %g",
            config.served_model_name, config.host, config.port, config.model_profile.name, config.hardware.name,
            config.tensor_parallel_size, config.num_gpu_blocks, config.block_size,
            config.num_gpu_blocks * config.block_size,
            cpu_tier,
            config.time_scale,
        )  # fmt: skip
        await stop.wait()
        await _drain(app, site)
    finally:
        await runner.cleanup()


DRAIN_TIMEOUT_S = 30.0  # below supervisord's stopwaitsecs for engines (60 s)


async def _drain(app: web.Application, site: web.TCPSite) -> None:
    """Stop accepting connections, then let in-flight requests finish, as vLLM's server does
    on SIGTERM; a rolling restart then costs clients nothing (the router retries refused
    connections on another engine)."""
    from stackctl.sim.server import DRAINING_KEY, ENGINE_KEY

    app[DRAINING_KEY].set()
    await site.stop()
    engine = app[ENGINE_KEY]
    deadline = asyncio.get_running_loop().time() + DRAIN_TIMEOUT_S
    while (engine.running or engine.waiting) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    log.info(
        "stopped: %d request(s) still in flight after draining",
        len(engine.running) + len(engine.waiting),
    )


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def main(argv: list[str] | None = None) -> int:
    """Run the simulator; returns the process exit code (2 for bad flags)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = parse_args(argv)
    except SystemExit as exc:  # argparse already printed usage and the reason
        return exc.code if isinstance(exc.code, int) else 2
    _install_uvloop()
    import prometheus_client

    # vLLM's /metrics has no *_created series (prometheus_client leaves this unannotated)
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    try:
        asyncio.run(serve(config))
    except KvEventsError as exc:
        print(f"stackctl sim: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"stackctl sim: cannot listen on {config.host}:{config.port}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
