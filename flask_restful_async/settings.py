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

import decimal
import math
import numbers
import typing as t

#: Spellings of a switch, compared without case or surrounding spaces.
_ON = frozenset(("1", "true", "yes", "on"))
_OFF = frozenset(("0", "false", "no", "off", ""))


def flag(config: t.Mapping[str, t.Any], key: str) -> bool:
    """A switch: True or False (None: off); 1 or 0; or a string such as ``"true"``,
    ``"False"``, ``"1"``, ``"off"`` (any case). Raises ``ValueError`` naming ``key``
    for anything else."""
    value = config[key]
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float) and value in (0, 1):
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


def maybe_flag(config: t.Mapping[str, t.Any], key: str, takes: str) -> bool | None:
    """A three-way setting: None as it is, else the switch :func:`flag` reads.
    Anything else raises ``ValueError`` saying that ``key`` must be ``takes``."""
    value = config[key]
    if value is None:
        return None
    try:
        return flag(config, key)
    except ValueError:
        raise ValueError(f"{key} must be {takes}, not {value!r}") from None


def _parsed(value: object) -> int | float | None:
    """``value`` as an int (exactly, when it is a whole number given as one) or a
    finite float; None when it is no number."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            pass
    elif not isinstance(value, numbers.Real | decimal.Decimal):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _checked(
    config: t.Mapping[str, t.Any],
    key: str,
    *,
    least: float,
    above: bool,
    whole: bool,
    what: str,
) -> int | float:
    value = config[key]
    parsed = _parsed(value)
    if whole and isinstance(parsed, float):
        parsed = int(parsed) if parsed.is_integer() else None
    if parsed is None or (parsed <= least if above else parsed < least):
        bound = f"above {least:g}" if above else f"{least:g} or more"
        kind = f"a whole {what.removeprefix('a ')}" if whole else what
        raise ValueError(f"{key} must be {kind}, {bound}, not {value!r}")
    return parsed


def number(
    config: t.Mapping[str, t.Any],
    key: str,
    *,
    least: float = 0,
    above: bool = False,
    what: str = "a number of seconds",
) -> float:
    """A number (or a string of one) of at least ``least`` (above it, with
    ``above``). Raises ``ValueError`` naming ``key``."""
    parsed = _checked(config, key, least=least, above=above, whole=False, what=what)
    try:
        return float(parsed)
    except OverflowError:
        raise ValueError(f"{key} is too large: {config[key]!r}") from None


def whole(
    config: t.Mapping[str, t.Any], key: str, *, least: int = 0, what: str = "a number"
) -> int:
    """A whole number (or a string of one; ``20.0`` will do) of at least
    ``least``, as an int. Raises ``ValueError`` naming ``key``."""
    return int(_checked(config, key, least=least, above=False, whole=True, what=what))
