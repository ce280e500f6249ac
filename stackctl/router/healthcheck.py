"""``python -m stackctl.router.healthcheck URL [--timeout S]``: exit 0 iff GET URL answers 200.

keepalived's vrrp_script runs this every couple of seconds to decide whether this host may hold
the router VIP, so it stays stdlib-only and imports nothing of the router (no aiohttp): start-up
time is most of its cost. Silent on success; one short line on stderr on failure, which
keepalived logs.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request

DEFAULT_TIMEOUT_S = 2.0


def check(url: str, timeout_s: float) -> str | None:
    """Why ``url`` is not healthy, or None when it answered 200 (``timeout_s`` bounds each
    socket operation; keepalived's script timeout bounds the whole run)."""
    # no proxy: an http_proxy in the environment must not answer for the local router
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout_s) as response:
            status = response.status
    except urllib.error.HTTPError as error:  # a non-2xx answer: urlopen raises for it
        status = error.code
        error.close()
    except (OSError, ValueError) as error:  # refused, timed out, unreachable, bad URL
        reason = getattr(error, "reason", None) or error
        return f"{url}: {reason}"
    if status != 200:
        return f"{url}: HTTP {status}"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m stackctl.router.healthcheck",
        description="Exit 0 iff an HTTP GET of URL answers 200 within the timeout, else 1.",
    )
    parser.add_argument("url")
    parser.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds (default %(default)s)"
    )
    args = parser.parse_args(argv)
    problem = check(args.url, args.timeout)
    if problem is None:
        return 0
    print(f"healthcheck: {problem}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
