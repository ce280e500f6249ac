"""The cluster's engine key: the one secret every engine requires and the router sends.

Where it lives: a 0600 file in the secrets dir of the router host and of every engine host
(``HostPlan.engine_key_file``). Unless the operator gives it (``router.engine_key_env``), `up`
makes it once (``secrets.token_urlsafe``) and afterwards reads it back from the hosts, so that a
second `up`, from this machine or another operator's, keeps it and restarts nothing. The hosts
are the one place it is kept: nothing on the operator's machine, nothing in a plan.

The router host's copy wins (it is what the running router sends); without one, any host of the
run that holds a copy; with none anywhere, a new key, but only when the router host is in the
run (a key made while the router host is left out or unreachable would lock the router out of
the engines that got it). The value is read with ``cat`` as the service user and never logged:
`-v` shows the command, never its output.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from .apply import ChangeKind, HostDiff, secret_content
from .connect import Connector, q
from .facts import Facts
from .inventory import Cluster
from .plan import GENERATED_ENGINE_KEY, HostPlan

KEY_BYTES = 32  # 256 bits of randomness, 43 URL-safe characters


def generate() -> str:
    return secrets.token_urlsafe(KEY_BYTES)


def read_back(conn: Connector, path: str) -> str:
    """The key as a host holds it ("" for an empty file)."""
    return conn.run(f"cat -- {q(path)}", timeout=30).stdout.strip()


def resolve(
    cluster: Cluster,
    plans: Sequence[HostPlan],
    facts: Mapping[str, Facts],
    conns: Mapping[str, Connector],
) -> tuple[dict[str, str], str | None]:
    """(``{GENERATED_ENGINE_KEY: key}`` for `up`'s secrets, or ``{}`` when the operator gives it
    (``router.engine_key_env``: read from the environment with the other secrets); None), or
    ({}, why) when no key can be settled: every reachable host of the run is then refused with
    that reason, the unreachable ones keep their own.

    ``facts``: the hosts of this run that answered (their ``secrets`` say which hold a copy)."""
    if cluster.router.engine_key_env:
        return {}, None
    router = cluster.router_host.name
    holders = [
        p
        for p in plans
        if p.host.name in facts and facts[p.host.name].secrets.get(p.engine_key_file)
    ]
    holders.sort(key=lambda p: p.host.name != router)  # the router host's copy first
    for plan in holders:
        key = read_back(conns[plan.host.name], plan.engine_key_file)
        if key:
            return {GENERATED_ENGINE_KEY: key}, None
    if router in facts:  # a new cluster (or every copy was purged): the router gets it too
        return {GENERATED_ENGINE_KEY: generate()}, None
    why = (
        "is unreachable"
        if any(p.host.name == router for p in plans)
        else "is not in this run's --hosts"
    )
    names = ",".join(dict.fromkeys([*(p.host.name for p in plans), router]))
    return {}, (
        f"the cluster's engine key is kept on the router host {router}, which {why}, and no host "
        f"of this run holds a copy yet. Run `up` with {router} included (e.g. -l {names}), or "
        "give the key yourself: router.engine_key_env names the environment variable that "
        "holds it"
    )


def router_copy_first(
    cluster: Cluster, diff: HostDiff, conn: Connector, values: Mapping[str, str]
) -> bool:
    """A rolling run that brings the key to a running cluster without one (the first `up` of a
    version with engine keys) writes the router host's copy first: the drain's reload makes the
    running router send it before the first engine restarts requiring it (an engine without a
    key ignores the header), so the change costs no failed request. Not for a new key where one
    was (a rotation): engines not yet restarted would refuse it. Returns whether it wrote (the
    host's own apply writes the same again)."""
    plan = diff.plan
    if (
        diff.problems
        or diff.facts.secrets.get(plan.engine_key_file) is not None
        or not any(
            c.kind == ChangeKind.SECRET and c.target == plan.engine_key_file for c in diff.changes
        )
    ):
        return False
    secret = next(s for s in plan.secrets if s.path == plan.engine_key_file)
    value = secret_content(cluster, secret, values[secret.env_var])
    conn.put_bytes(value.encode(), secret.path, 0o600)
    return True
