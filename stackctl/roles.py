"""Role templates: one Jinja environment over roles/<role>/templates and the shared templates/.

Template names are ``<role>/<file>`` for a role's own templates and ``shared/<file>`` for the
shared ones. Rendering is strict (an undefined variable is an error, not an empty string).
"""

from __future__ import annotations

import functools
import re
import shlex
import unicodedata

import jinja2

from .resources import roles_dir, templates_dir


def _ini_safe_quote(arg: str) -> str:
    """shlex-quote one argument so that supervisor reads it back unchanged: its config parser
    cuts a value at whitespace followed by ``;`` or ``#`` (an inline comment), and replaces
    ``%(here)s`` in every value as it reads the file, even where ``%`` was doubled. Such a
    ``;``/``#``, and the ``(`` after a ``%``, start a separately quoted piece."""
    pieces = re.split(r"(?<=\s)(?=[;#])|(?<=%)(?=\()", arg)
    if len(pieces) == 1:
        return shlex.quote(arg)
    return "".join(shlex.quote(piece) for piece in pieces if piece)


def supervisor_command(argv: list[str]) -> str:
    """A command line for supervisor's ``command=``: shell-quoted, with ``%`` escaped.

    supervisord splits ``command`` with shlex and expands ``%(name)s`` in it, so an argument
    such as a JSON --kv-transfer-config must be quoted and any ``%`` doubled.
    """
    return " ".join(_ini_safe_quote(str(arg)) for arg in argv).replace("%", "%%")


def control_char(text: str) -> str | None:
    """The first control character or line break in ``text`` (what would end an INI line, a
    systemd directive or a shell word), or None."""
    return next((c for c in text if unicodedata.category(c) in ("Cc", "Zl", "Zp")), None)


def supervisor_env_problem(value: str) -> str | None:
    """Why ``value`` cannot be written in supervisor's ``environment=``, or None.

    supervisor splits ``environment=`` with a non-POSIX shlex (no escapes: a value is quoted
    with a quote character it does not contain), strips quote characters from both ends of
    each value, and its config parser cuts the line at whitespace followed by ``;`` or ``#``.
    """
    if control_char(value) is not None:
        return "it holds a control character or a line break"
    if '"' in value and "'" in value:
        return "it holds both ' and \" quotes"
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        return "it starts or ends with a quote character"
    if re.search(r"\s[;#]", value):
        return "it has whitespace before a ';' or '#' (supervisor would cut the line there)"
    if "%(here)s" in value:
        return "it holds %(here)s, which supervisor replaces in every value"
    return None


def supervisor_env(environment: dict[str, str]) -> str:
    """``KEY="value",...`` for supervisor's ``environment=``, quoted and %-escaped."""
    items = []
    for key, value in environment.items():
        text = str(value)
        problem = supervisor_env_problem(text)
        if problem:  # the inventory check refuses these first; never write a config that misreads
            raise ValueError(
                f"environment variable {key}: cannot be written for supervisor: {problem}"
            )
        quote = "'" if '"' in text else '"'
        items.append(f"{key}={quote}{text.replace('%', '%%')}{quote}")
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
