"""Reading the ``RESTFUL_ASYNC_*`` config values, checked once, at ``register_async``.

Config often comes from the environment, as text: ``app.config.from_prefixed_env()``
decodes ``FLASK_RESTFUL_ASYNC_MAX_WAIT=20`` as JSON (the number 20), but keeps
``False`` or ``abc`` as strings, and ``os.environ.get`` gives only strings. A
switch read with ``bool()`` would take the string ``"False"`` for on: the task
list shown to anyone (``PUBLIC_LIST``), or other sites allowed to delete tasks
(``CROSS_SITE_DELETE``). So each value is read here by its kind, and one that
does not read as that kind, or lies outside its range, is refused at start-up
with its key named, never taken for something else, nor left to fail a request.
"""

from __future__ import annotations

import math
import typing as t

#: Spellings of a switch, compared without case or surrounding spaces.
_ON = frozenset(("1", "true", "yes", "on"))
_OFF = frozenset(("0", "false", "no", "off", ""))


def flag(config: t.Mapping[str, t.Any], key: str) -> bool:
    """A switch: True or False; 1 or 0; or a string such as ``"true"``, ``"False"``,
    ``"1"``, ``"off"`` (any case). Raises ``ValueError`` naming ``key`` for
    anything else."""
    value = config[key]
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _ON:
            return True
        if word in _OFF:
            return False
    raise ValueError(
        f"{key} must be True or False (or a string such as 'true', 'false', '1', '0'),"
        f" not {value!r}"
    )


def number(
    config: t.Mapping[str, t.Any],
    key: str,
    *,
    least: float = 0,
    above: bool = False,
    whole: bool = False,
    what: str = "a number of seconds",
) -> float:
    """A number (or a string of one) of at least ``least`` (above it, with
    ``above``); a whole one with ``whole``. Raises ``ValueError`` naming ``key``."""
    value = config[key]
    parsed: float | None = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        parsed = float(value)
    elif isinstance(value, str):
        try:
            parsed = float(value.strip())
        except ValueError:
            parsed = None
    bound = f"above {least:g}" if above else f"{least:g} or more"
    kind = f"a whole {what.removeprefix('a ')}" if whole else what
    if (
        parsed is None
        or not math.isfinite(parsed)
        or (parsed <= least if above else parsed < least)
        or (whole and not parsed.is_integer())
    ):
        raise ValueError(f"{key} must be {kind}, {bound}, not {value!r}")
    return parsed


def whole(
    config: t.Mapping[str, t.Any], key: str, *, least: int = 0, what: str = "a number"
) -> int:
    """:func:`number`, a whole one, as an int."""
    return int(number(config, key, least=least, whole=True, what=what))
