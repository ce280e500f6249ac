"""Who runs what on a host: the connecting user, root (``become``) or the service user.

Two levels, chosen per command by the connector:
``as_root``     creating the service account and the deploy dir, purging it, systemd units:
                through ``sudo -n -u <become_user>`` when ``become`` is set and the SSH user is
                not root; as the SSH user otherwise.
``as_service``  everything inside the deploy dir (the probe, venv, pip, files, supervisord and
                supervisorctl): as the service user, so every file there is its own and root
                never executes code the service user could have changed. From root (or through
                ``sudo``) with ``runuser``; directly when the SSH user is the service user or
                there is none (``service_user: null``: the connecting user, the local demo).

One preflight command per connection learns the SSH user, whether the service account exists
and whether ``sudo -n`` works, so a host that cannot become is refused before anything on it
changes. Everything here is pure (strings in, strings out) except running the preflight.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace

from .errors import StackctlError
from .inventory import Host


class BecomeError(StackctlError):
    """The host cannot run the privileged steps (no sudo, sudo wants a password, no runuser)."""


# sbin is not on a non-root user's PATH on Debian; sudo's secure_path and root's PATH have it.
_SBIN_PATH = 'PATH="$PATH:/usr/sbin:/sbin"'


@dataclass(frozen=True)
class Identity:
    """What one connection to a host runs as, and how to run a command as root or the service user."""

    host_name: str
    login_user: str
    login_uid: int
    become: bool = False
    become_user: str = "root"
    service_user: str | None = None
    service_uid: int | None = None  # None: the account does not exist (yet)
    sudo: str = "unchecked"  # ok | missing | failed | unchecked
    sudo_error: str = ""
    runuser: bool = True

    @classmethod
    def plain(cls, host: Host) -> Identity:
        """No switching at all: no service user and no become (the local demo)."""
        return cls(host.name, "", -1)

    @property
    def is_plain(self) -> bool:
        return self.login_uid == -1

    @property
    def is_root(self) -> bool:
        return self.login_uid == 0

    @property
    def uses_sudo(self) -> bool:
        return self.become and not self.is_root

    @property
    def service_is_login(self) -> bool:
        """Commands for the service user run as the SSH user itself (nothing to switch)."""
        return self.service_user is None or self.service_user == self.login_user or self.is_plain

    @property
    def handoff(self) -> bool:
        """Uploaded files must be handed over to the service user (staged, then installed by it)."""
        return not self.service_is_login and self.service_uid is not None

    def as_root(self, command: str) -> str:
        if self.uses_sudo:
            return shlex.join(["sudo", "-n", "-u", self.become_user, "--", "sh", "-c", command])
        return command

    def as_service(self, command: str) -> str:
        user = self.service_user
        if user is None or self.service_is_login:  # (service_is_login covers None too)
            return command
        if self.service_uid is None:  # no such account yet, so nothing of it exists to protect
            return self.as_root(command)
        inner = f"cd / && {command}"  # the SSH user's home may be closed to the service user
        if self.uses_sudo and self.become_user != "root":
            return shlex.join(["sudo", "-n", "-u", user, "--", "sh", "-c", inner])
        return self.as_root(shlex.join(["runuser", "-u", user, "--", "sh", "-c", inner]))

    def with_service_uid(self, uid: int) -> Identity:
        return replace(self, service_uid=uid)

    def problem(self) -> str | None:
        """Why this host cannot be deployed as configured: one paragraph naming host and fix."""
        name, login = self.host_name, self.login_user
        if self.uses_sudo and self.sudo == "missing":
            return (
                f"{name}: become is set but sudo is not installed, so the SSH user {login} cannot run the "
                f"privileged steps (creating the service account {self.service_user or ''} and the deploy dir). "
                f"Install sudo on the host (apt-get install sudo) and give {login} passwordless sudo, or connect "
                f"as root (ssh.user: root) with become: false. Nothing was changed on this host."
            )
        if self.uses_sudo and self.sudo == "failed":
            wants_password = "password" in self.sudo_error.lower()
            what = "wants a password" if wants_password else "refuses"
            return (
                f"{name}: become is set but `sudo -n -u {self.become_user}` {what} for the SSH user {login} "
                f"({self.sudo_error.strip() or 'no message'}). stackctl never types passwords: allow {login} "
                f"passwordless sudo, e.g. a line `{login} ALL=(ALL) NOPASSWD: ALL` in /etc/sudoers.d/stackctl "
                f"(visudo -f), or connect as a user who has it (ssh.user). Nothing was changed on this host."
            )
        switching = not self.service_is_login
        if switching and not self.is_root and not self.become:
            return (
                f"{name}: programs should run as the service user {self.service_user}, but the SSH user {login} "
                f"is not root and become is not set, so it can neither create that account nor act as it. "
                f"Set become: true (with passwordless sudo for {login}), or service_user: {login} "
                f"(or null) to run programs as {login}. Nothing was changed on this host."
            )
        if switching and not self.runuser and (self.is_root or self.become_user == "root"):
            return (
                f"{name}: runuser (util-linux) is not installed, so root cannot run commands as the service user "
                f"{self.service_user}. Install util-linux on the host. Nothing was changed on this host."
            )
        return None


def preflight_command(host: Host) -> str:
    """One shell command, run as the SSH user, whose output ``parse_preflight`` reads."""
    lines = [
        'printf "login_user=%s\\nlogin_uid=%s\\n" "$(id -un)" "$(id -u)"',
        f"{_SBIN_PATH} command -v runuser >/dev/null 2>&1 && echo runuser=yes",
    ]
    if host.service_user:
        lines.append(
            f"uid=$(id -u -- {shlex.quote(host.service_user)} 2>/dev/null) && echo service_uid=$uid"
        )
    if host.become:
        probe = shlex.join(["sudo", "-n", "-u", host.become_user, "--", "true"])
        lines.append(
            'if [ "$(id -u)" != 0 ]; then '
            "if ! command -v sudo >/dev/null 2>&1; then echo sudo=missing; "
            f"elif err=$({probe} 2>&1); then echo sudo=ok; "
            'else echo sudo=failed; printf "sudo_error=%s\\n" "$(printf %s "$err" | tr "\\n" " ")"; fi; fi'
        )
    return "; ".join(lines) + "; true"


def parse_preflight(host: Host, output: str) -> Identity:
    values = {}
    for line in output.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value
    if "login_uid" not in values:
        raise StackctlError(
            f"{host.name}: could not tell which user the SSH session runs as (the output of `id` was {output[-300:]!r})."
        )
    service_uid = values.get("service_uid")
    return Identity(
        host_name=host.name,
        login_user=values.get("login_user", ""),
        login_uid=int(values["login_uid"]),
        become=host.become,
        become_user=host.become_user,
        service_user=host.service_user,
        service_uid=int(service_uid) if service_uid and service_uid.isdigit() else None,
        sudo=values.get("sudo", "unchecked"),
        sudo_error=values.get("sudo_error", ""),
        runuser=values.get("runuser") == "yes",
    )


def needs_preflight(host: Host) -> bool:
    return host.become or host.service_user is not None


def useradd_command(user: str, home: str) -> str:
    """Create the service account when it is missing (a system account without a login shell).

    ``id || useradd || id``: hosts sharing one /etc (containers, the testbed) may race to create it."""
    u = shlex.quote(user)
    add = shlex.join(
        [
            "useradd",
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            home,
            "--shell",
            "/usr/sbin/nologin",
            user,
        ]
    )
    return f"id -u -- {u} >/dev/null 2>&1 || {add} || id -u -- {u} >/dev/null"


def own_dir_command(path: str, user: str, recursive: bool) -> str:
    """Create ``path`` (as root) and give it to ``user``; ``recursive`` for a dir an older,
    root-run stackctl left behind (never run over a tree the service user already owned)."""
    flags = "-hR" if recursive else "-h"
    return f"mkdir -p -- {shlex.quote(path)} && chown {flags} -- {shlex.quote(user + ':')} {shlex.quote(path)}"


def handoff_command(identity: Identity, staged: str, tmp: str, path: str, mode: int) -> str:
    """Move an uploaded file (``staged``, owned by the SSH user) to ``path`` as the service user,
    atomically (install to a temp name next to it, then rename), and remove the staged copy."""
    user = identity.service_user
    assert user is not None  # a handoff is only made to a service user (Identity.handoff)
    chown = identity.as_root(f"chown -- {shlex.quote(user + ':')} {shlex.quote(staged)}")
    place = identity.as_service(
        f"install -m {mode:o} -- {shlex.quote(staged)} {shlex.quote(tmp)} && mv -f -- {shlex.quote(tmp)} {shlex.quote(path)}"
    )
    return f"{chown} && {place}; rc=$?; rm -f -- {shlex.quote(staged)}; exit $rc"
