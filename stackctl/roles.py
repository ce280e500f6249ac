"""Role templates: one Jinja environment over roles/<role>/templates and the shared templates/.

Template names are ``<role>/<file>`` for a role's own templates and ``shared/<file>`` for the
shared ones. Rendering is strict (an undefined variable is an error, not an empty string).
"""

from __future__ import annotations

import functools
import shlex

import jinja2

from .resources import roles_dir, templates_dir


def supervisor_command(argv: list[str]) -> str:
    """A command line for supervisor's ``command=``: shell-quoted, with ``%`` escaped.

    supervisord splits ``command`` with shlex and expands ``%(name)s`` in it, so an argument
    such as a JSON --kv-transfer-config must be quoted and any ``%`` doubled.
    """
    return shlex.join(argv).replace("%", "%%")


def supervisor_env(environment: dict[str, str]) -> str:
    """``KEY="value",...`` for supervisor's ``environment=``, quoted and %-escaped."""
    items = []
    for key, value in environment.items():
        text = str(value).replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        items.append(f'{key}="{text}"')
    return ",".join(items)


def systemd_quote(arg: str) -> str:
    """One argument for a systemd unit's command line: ``%`` and ``$`` escaped, double-quoted
    when it holds anything but plain path characters (systemd.syntax(7), "Quoting")."""
    text = str(arg).replace("%", "%%").replace("$", "$$")
    if text and all(c.isalnum() or c in "/._-+=:,@" for c in text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def systemd_command(argv: list[str]) -> str:
    return " ".join(systemd_quote(arg) for arg in argv)


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    loaders = {"shared": jinja2.FileSystemLoader(str(templates_dir()))}
    for role_dir in sorted(p for p in roles_dir().iterdir() if (p / "templates").is_dir()):
        loaders[role_dir.name] = jinja2.FileSystemLoader(str(role_dir / "templates"))
    env = jinja2.Environment(
        loader=jinja2.PrefixLoader(loaders),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    env.filters["supervisor_command"] = supervisor_command
    env.filters["supervisor_env"] = supervisor_env
    env.filters["systemd_quote"] = systemd_quote
    env.filters["systemd_command"] = systemd_command
    return env


def render(template: str, **context) -> str:
    return environment().get_template(template).render(**context)
