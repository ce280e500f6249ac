"""keepalived.conf for router.vip: golden files, priorities and peers per router host, values
that could inject config refused, and every rendered file accepted by keepalived's own checker
(which must also reject a broken one, or accepting proves nothing)."""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from stackctl.inventory import Cluster, load_inventory
from stackctl.keepalived import keepalived_conf

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"
HEALTH_URL = "http://127.0.0.1:8080/health"
HEALTH = (  # as plan._plan_router gives it
    "/usr/bin/env",
    "/opt/stackctl/venv/bin/python",
    "-m",
    "stackctl.router.healthcheck",
    HEALTH_URL,
)
INVENTORY = """
cluster: vip{routers}
model: {{name: tiny, path: /srv/models/tiny}}
engine: {{kind: sim}}
router: {{vip: {{address: 10.0.0.100/24, interface: eth0}}}}
{extra}
hosts:
{router_hosts}
  - {{name: gpu1, address: 10.0.0.11, roles: [engine]}}
"""


def cluster_of(tmp_path: Path, routers: int, extra: str = "") -> Cluster:
    hosts = "\n".join(
        f"  - {{name: r{i}, address: 10.0.0.{i}, roles: [router]}}" for i in range(1, routers + 1)
    )
    path = tmp_path / f"vip{routers}.yaml"
    path.write_text(INVENTORY.format(routers=routers, extra=extra, router_hosts=hosts))
    return load_inventory(path)


def rendered(cluster: Cluster, health=HEALTH) -> dict[str, str]:
    return {h.name: keepalived_conf(cluster, h, health) for h in cluster.router_hosts}


@pytest.mark.parametrize("routers", [2, 3])
def test_golden(tmp_path, routers):
    """Set STACKCTL_UPDATE_GOLDEN=1 to rewrite the golden files after an intended change."""
    confs = rendered(cluster_of(tmp_path, routers))
    assert sorted(confs) == [f"r{i}" for i in range(1, routers + 1)]
    for host, text in confs.items():
        golden = GOLDEN / f"keepalived-{routers}-{host}.conf"
        if os.environ.get("STACKCTL_UPDATE_GOLDEN"):
            golden.write_text(text)
        assert text == golden.read_text(), f"{golden.name} differs from the rendering"


def setting(text: str, key: str) -> list[str]:
    return re.findall(rf"^\s*{key}\s+(.+?)\s*$", text, re.M)


def peers(text: str) -> list[str]:
    block = re.search(r"unicast_peer \{\n(.*?)\n\s*\}", text, re.S)
    return block.group(1).split() if block else []


def test_priorities_and_peers_per_router_host(tmp_path):
    cluster = cluster_of(tmp_path, 3)
    confs = rendered(cluster)
    addresses = {"r1": "10.0.0.1", "r2": "10.0.0.2", "r3": "10.0.0.3"}
    priorities = [int(setting(confs[h], "priority")[0]) for h in ("r1", "r2", "r3")]
    assert priorities == sorted(priorities, reverse=True) and len(set(priorities)) == 3
    assert all(1 <= p <= 254 for p in priorities)
    for host, text in confs.items():
        assert setting(text, "unicast_src_ip") == [addresses[host]]
        assert re.search(r"^\s*check_unicast_src$", text, re.M)  # adverts from peers only
        assert sorted(peers(text)) == sorted(a for h, a in addresses.items() if h != host)
        assert setting(text, "state") == ["BACKUP"] and re.search(r"^\s*nopreempt$", text, re.M)
        assert setting(text, "interface") == ["eth0"]
        assert setting(text, "virtual_router_id") == ["51"]
        assert setting(text, "advert_int") == ["1"]
        assert re.search(r"virtual_ipaddress \{\n\s*10\.0\.0\.100/24 dev eth0\n", text)
        assert setting(text, "script_user") == ["stackctl"]
        assert setting(text, "script") == [f'"{" ".join(HEALTH)}"']
        assert setting(text, "router_id") == [f"stackctl-vip3-{host}"]
    assert "gpu1" not in "".join(confs.values()) and "10.0.0.11" not in "".join(confs.values())


def test_cluster_address_is_what_vrrp_uses(tmp_path):
    cluster = cluster_of(tmp_path, 2)
    hosts = tuple(
        dataclasses.replace(h, cluster_address=f"192.168.5.{h.name[1:]}") if h.name[0] == "r" else h
        for h in cluster.hosts
    )
    cluster = dataclasses.replace(cluster, hosts=hosts)
    text = keepalived_conf(cluster, cluster.host("r2"), HEALTH)
    assert setting(text, "unicast_src_ip") == ["192.168.5.2"] and peers(text) == ["192.168.5.1"]


def test_script_user_without_a_service_user(tmp_path):
    """service_user: null: the router runs as the SSH user, or root when none is named."""
    cluster = cluster_of(tmp_path, 2, extra="service_user: null\nssh: {user: ops}")
    assert setting(rendered(cluster)["r1"], "script_user") == ["ops"]
    cluster = cluster_of(tmp_path, 2, extra="service_user: null")
    assert setting(rendered(cluster)["r1"], "script_user") == ["root"]


BAD = ['a"b', "a{b", "a}b", "a#b", "a!b", "a b", "a\tb", "a\nb", "a$b", "a'b", "a\\b"]


@pytest.mark.parametrize("bad", BAD)
def test_values_that_could_inject_config_are_refused(tmp_path, bad):
    cluster = cluster_of(tmp_path, 2)
    r1 = cluster.host("r1")
    with pytest.raises(ValueError, match="health command"):
        keepalived_conf(cluster, r1, (*HEALTH[:-1], HEALTH_URL + bad))
    with pytest.raises(ValueError, match="interface"):
        vip = dataclasses.replace(cluster.router.vip, interface=f"eth0{bad}")
        keepalived_conf(with_vip(cluster, vip), r1, HEALTH)
    with pytest.raises(ValueError, match="router.vip.address"):
        vip = dataclasses.replace(cluster.router.vip, address=f"10.0.0.100/24{bad}")
        keepalived_conf(with_vip(cluster, vip), r1, HEALTH)
    for field in ("cluster_address", "service_user"):
        value = f"10.0.0.1{bad}" if field == "cluster_address" else f"stackctl{bad}"
        changed = with_host(cluster, dataclasses.replace(r1, **{field: value}))
        with pytest.raises(ValueError, match="address|script_user"):
            keepalived_conf(changed, changed.host("r1"), HEALTH)


def test_names_from_the_inventory_become_plain_identifiers(tmp_path):
    cluster = dataclasses.replace(cluster_of(tmp_path, 2), name='a "b" {c} #d')
    text = keepalived_conf(cluster, cluster.host("r1"), HEALTH)
    assert setting(text, "router_id") == ["stackctl-a__b___c___d-r1"]
    assert setting(text, "vrrp_instance") == ["stackctl_a__b___c___d_router {"]
    assert '"b"' not in text and "{c}" not in text


def test_other_impossible_configs_are_refused(tmp_path):
    cluster = cluster_of(tmp_path, 2)
    r1 = cluster.host("r1")
    with pytest.raises(ValueError, match="runs no router"):
        keepalived_conf(cluster, cluster.host("gpu1"), HEALTH)
    with pytest.raises(ValueError, match="no VIP"):
        keepalived_conf(
            with_vip(cluster, dataclasses.replace(cluster.router.vip, address=None)), r1, HEALTH
        )
    with pytest.raises(ValueError, match="absolute path"):
        keepalived_conf(cluster, r1, ("python3", *HEALTH[1:]))
    with pytest.raises(ValueError, match="health command argument ''"):
        keepalived_conf(cluster, r1, (*HEALTH, ""))
    named = with_host(cluster, dataclasses.replace(r1, address="router1.example"))
    with pytest.raises(ValueError, match="not an IP address"):
        keepalived_conf(named, named.host("r1"), HEALTH)
    for address in ("fd00::100/64", "10.0.0.1/24"):  # another IP version; a router's own address
        vip = dataclasses.replace(cluster.router.vip, address=address)
        with pytest.raises(ValueError, match="router.vip.address"):
            keepalived_conf(with_vip(cluster, vip), r1, HEALTH)
    for key, value in (
        ("virtual_router_id", 0),
        ("virtual_router_id", 256),
        ("advert_int_s", 0),
        ("advert_int_s", 0.5),
    ):
        vip = dataclasses.replace(cluster.router.vip, **{key: value})
        with pytest.raises(ValueError, match=key):
            keepalived_conf(with_vip(cluster, vip), r1, HEALTH)


def with_vip(cluster: Cluster, vip) -> Cluster:
    return dataclasses.replace(cluster, router=dataclasses.replace(cluster.router, vip=vip))


def with_host(cluster: Cluster, host) -> Cluster:
    hosts = tuple(host if h.name == host.name else h for h in cluster.hosts)
    return dataclasses.replace(cluster, hosts=hosts)


# --------------------------------------------------------------------------- keepalived itself


@pytest.fixture
def keepalived() -> str:
    path = shutil.which("keepalived") or "/usr/sbin/keepalived"
    if not os.access(path, os.X_OK):
        pytest.fail("keepalived is not installed: apt-get install keepalived (scripts/test does)")
    if os.geteuid() != 0:  # in a user namespace every root-owned path looks foreign to it
        pytest.fail("keepalived's config check runs in a network namespace of its own: run as root")
    return path


def config_test(keepalived: str, conf: Path) -> subprocess.CompletedProcess:
    """``keepalived --config-test`` in a fresh network namespace that has an ``eth0``: the
    checker refuses an interface the machine lacks (and a loopback one)."""
    script = (
        'ip link add eth0 type veth peer name kapeer0 && exec "$0" --config-test --use-file="$1"'
    )
    return subprocess.run(
        ["unshare", "--net", "sh", "-c", script, keepalived, str(conf)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def checked_confs(tmp_path: Path, routers: int) -> dict[str, Path]:
    """Rendered confs whose health command is a real root-owned 0755 script in a 0700 dir:
    with enable_script_security and script_user root, keepalived wants every part of the path
    owned by root and writable by nobody else (a sticky /tmp passes)."""
    health = tmp_path / "bin" / "router-health"
    health.parent.mkdir(mode=0o700, exist_ok=True)
    health.write_text("#!/bin/sh\nexit 0\n")
    health.chmod(0o755)
    cluster = cluster_of(tmp_path, routers, extra="service_user: null\nssh: {user: root}")
    paths = {}
    for host, text in rendered(cluster, (str(health), HEALTH_URL)).items():
        assert setting(text, "script_user") == ["root"]
        paths[host] = tmp_path / f"{host}.conf"
        paths[host].write_text(text)
    return paths


@pytest.mark.parametrize("routers", [2, 3])
def test_keepalived_accepts_every_rendered_config(tmp_path, keepalived, routers):
    for host, conf in checked_confs(tmp_path, routers).items():
        result = config_test(keepalived, conf)
        assert result.returncode == 0, f"{host}: {result.stdout}{result.stderr}"


def test_the_hosts_keepalived_conf_may_include_it(tmp_path, keepalived):
    """What docs/inventory.md tells operators to write in /etc/keepalived/keepalived.conf."""
    conf = checked_confs(tmp_path, 2)["r1"]
    main = tmp_path / "keepalived.conf"
    main.write_text(f"include {conf}\n")
    result = config_test(keepalived, main)
    assert result.returncode == 0, result.stdout + result.stderr
    conf.write_text(conf.read_text().replace("    fall ", "    fal ", 1))  # it is read, too
    assert config_test(keepalived, main).returncode != 0


def test_keepalived_config_test_rejects_broken_configs(tmp_path, keepalived):
    """The checker is real: a lost brace, an unknown keyword and a health script anyone may
    write (root would run it) each fail it, while the file they come from passes."""
    conf = checked_confs(tmp_path, 2)["r1"]
    good = conf.read_text()
    assert config_test(keepalived, conf).returncode == 0
    broken = {
        "lost brace": good.replace("    unicast_peer {\n", "    unicast_peer\n", 1),
        "unknown keyword": good.replace("    fall ", "    fal ", 1),
    }
    for what, text in broken.items():
        assert text != good
        conf.write_text(text)
        result = config_test(keepalived, conf)
        assert result.returncode != 0, f"{what}: {result.stdout}{result.stderr}"
    conf.write_text(good)
    (tmp_path / "bin" / "router-health").chmod(0o777)
    result = config_test(keepalived, conf)
    assert result.returncode != 0 and "insecure" in result.stdout + result.stderr


# --------------------------------------------------------------------------- the health check


def test_healthcheck_exits_0_only_on_200():
    """What the vrrp_script runs: silent exit 0 on 200; exit 1 and one line otherwise."""
    import http.server
    import socket
    import sys
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            code = {"/ok": 200, "/down": 503, "/empty": 204}.get(self.path, 404)
            self.send_response(code)
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        closed_port = unused.getsockname()[1]  # nothing listens once the socket is closed
    base = f"http://127.0.0.1:{server.server_address[1]}"

    def check(url: str) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "stackctl.router.healthcheck", url, "--timeout", "5"]
        return subprocess.run(argv, capture_output=True, text=True, timeout=30)

    try:
        ok = check(f"{base}/ok")
        assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
        for url in (f"{base}/down", f"{base}/empty", f"http://127.0.0.1:{closed_port}/ok"):
            bad = check(url)
            assert bad.returncode == 1 and bad.stdout == "", url
            assert len(bad.stderr.splitlines()) == 1 and url in bad.stderr
    finally:
        server.shutdown()
        server.server_close()
