"""keepalived.conf for ``router.vip``: one VRRP instance per router host that keeps the VIP on
one healthy router.

All router hosts start as BACKUP with ``nopreempt`` and priorities falling in inventory order,
and talk unicast to each other. A vrrp_script (the router's health check, run as the account
the router runs as) that fails ``FALL`` times in a row puts the host in FAULT, so a dead
router gives the VIP up within about ``FALL`` check intervals (2.8-3.1 s measured at 1 s).

Every value from the inventory is checked against a small set of characters before it is
written: keepalived's parser has comments (``#``, ``!``), blocks (``{``, ``}``), quotes,
``$`` substitutions and whitespace-separated words, so anything else could add config.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Sequence

from .inventory import INTERFACE_NAME, VIP_MAX_ROUTERS, Cluster, Host
from .roles import render
from .router.healthcheck import DEFAULT_TIMEOUT_S

TEMPLATE = "shared/keepalived.conf.j2"
PRIORITY_FIRST = 200  # the first router host's; VRRP priorities are 1-254 (255: address owner)
PRIORITY_STEP = PRIORITY_FIRST // VIP_MAX_ROUTERS
FALL = 3  # failed checks in a row before the host gives the VIP up (~3 s at interval 1)
RISE = 2  # passed checks in a row before a recovered host may hold it again
# the script's own limit: the health check's timeout plus a margin for Python's start-up
SCRIPT_TIMEOUT_S = math.ceil(DEFAULT_TIMEOUT_S) + 1
# what an interpolated value may hold: enough for paths, URLs, user and interface names
_WORD = re.compile(r"[A-Za-z0-9_./:@%+=,\[\]-]+")


def keepalived_conf(cluster: Cluster, host: Host, health_command: Sequence[str]) -> str:
    """The keepalived.conf of router host ``host`` for ``cluster.router.vip``; ValueError for a
    value that cannot be written safely (the inventory refuses those first).

    keepalived resolves symbolic links in ``health_command[0]`` and runs the target: a venv's
    ``bin/python`` (a link) becomes the base interpreter without the venv's packages."""
    vip = cluster.router.vip
    routers = cluster.router_hosts
    if not vip.enabled:
        raise ValueError("router.vip.address is null: there is no VIP to keep")
    if host not in routers:
        raise ValueError(f"host {host.name} runs no router: it takes no part in the VIP")
    index = routers.index(host)
    priority = PRIORITY_FIRST - PRIORITY_STEP * index
    if priority < 1:
        most = (PRIORITY_FIRST - 1) // PRIORITY_STEP + 1
        raise ValueError(f"router.vip: at most {most} router hosts can share the VIP")
    address = _vip_address(vip.address)
    addresses = [_cluster_address(h) for h in routers]
    for h, ip in zip(routers, addresses, strict=True):
        if ip.version != address.version:
            raise ValueError(
                f"router.vip.address {address} and host {h.name}'s address {ip} are not of one IP version; VRRP needs them to be"
            )
        if ip == address.ip:
            raise ValueError(f"router.vip.address {address.ip} is host {h.name}'s own address")
    interface = vip.interface
    if interface is None or not INTERFACE_NAME.fullmatch(interface):
        raise ValueError(
            f"router.vip.interface {interface!r}: name the network interface that carries the VIP on every router host (letters, digits, '_', '.', '-'; at most 15)"
        )
    if isinstance(vip.virtual_router_id, bool) or not 1 <= vip.virtual_router_id <= 255:
        raise ValueError(f"router.vip.virtual_router_id {vip.virtual_router_id!r}: 1-255")
    advert = vip.advert_int_s  # VRRPv2 (keepalived's default) advertises in whole seconds
    if isinstance(advert, bool) or not 1 <= advert <= 255 or advert != int(advert):
        raise ValueError(f"router.vip.advert_int_s {advert!r}: whole seconds, 1-255 (VRRPv2)")
    if not health_command or not health_command[0].startswith("/"):
        raise ValueError(
            f"health command {list(health_command)!r}: must start with an absolute path"
        )
    script = " ".join(_word(arg, "health command argument") for arg in health_command)
    return render(
        TEMPLATE,
        cluster_name=_identifier(cluster.name),
        host_name=_identifier(host.name),
        router_id=_identifier(f"stackctl-{cluster.name}-{host.name}"),
        script_user=_word(script_user(host), "script_user"),
        script_name=_identifier(f"stackctl_{cluster.name}_router_health"),
        script=script,
        interval=int(advert),
        timeout=SCRIPT_TIMEOUT_S,
        fall=FALL,
        rise=RISE,
        instance_name=_identifier(f"stackctl_{cluster.name}_router"),
        interface=interface,
        virtual_router_id=vip.virtual_router_id,
        priority=priority,
        advert_int=int(advert),
        src_ip=_word(str(addresses[index]), "address"),
        peers=[
            _word(str(ip), "address") for h, ip in zip(routers, addresses, strict=True) if h != host
        ],
        vip=_word(address.with_prefixlen, "router.vip.address"),
    )


def script_user(host: Host) -> str:
    """The account the router runs as, which runs its health check: the service user, else the
    connecting SSH user, else root (then keepalived's script security refuses a check whose
    path a non-root user can write)."""
    return host.service_user or host.ssh.user or "root"


def _word(value: str, what: str) -> str:
    """``value`` unchanged when keepalived reads it back as one plain word, else ValueError."""
    if not _WORD.fullmatch(value):
        raise ValueError(
            f"{what} {value!r} cannot be written into keepalived.conf: only letters, digits and ._/:@%+=,[]- are allowed (no quotes, braces, '#', '!', '$' or whitespace)"
        )
    return value


def _identifier(text: str) -> str:
    """A keepalived name (router_id, instance, script) made from inventory names: characters
    other than letters, digits and ``_.-`` become ``_``."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def _vip_address(text: str | None) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(_word(str(text), "router.vip.address"))
    except ValueError as error:
        raise ValueError(
            f"router.vip.address {text!r}: an IP address with its prefix length, e.g. 10.0.0.100/24 ({error})"
        ) from None


def _cluster_address(host: Host) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """The address the other routers reach ``host`` at: VRRP unicast needs an IP, not a name."""
    text = host.cluster_address or host.address
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(
            f"host {host.name}: address {text!r} is not an IP address; VRRP unicast needs one (set its cluster_address)"
        ) from None
