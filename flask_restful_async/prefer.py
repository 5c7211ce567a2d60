"""The ``Prefer`` request header (RFC 7240).

Grammar (RFC 7240 section 2, with ``word``, ``token``, ``quoted-string``, ``OWS``
and ``BWS`` from RFC 7230 sections 3.2.3 and 3.2.6)::

    Prefer     = 1#preference
    preference = token [ BWS "=" BWS word ]
                 *( OWS ";" [ OWS parameter ] )
    parameter  = token [ BWS "=" BWS word ]

:func:`parse_prefer` never raises on what a client sends: list elements that do
not match the grammar are skipped, the others are kept.

Resolved points where the RFC leaves room:

- Element boundaries: a comma or semicolon inside a quoted string does not
  separate anything. A quoted string left unterminated runs to the end of its
  header field value, so that element is malformed and everything after it in
  the same field value is part of it and lost; elements before it, and other
  ``Prefer`` header fields, are unaffected. Guessing where the string "should"
  have ended would invent preferences the client may not have sent.
- Malformed elements (an invalid token, garbage after a quoted string, a bad
  parameter, ...) are dropped whole and do not count as an occurrence for the
  "first one wins" rule (section 2): a later well-formed ``wait=5`` still
  applies after a broken ``wait="1``.
- Empty values (section 2: "Empty or zero-length values ... are equivalent to no
  value being specified at all"): ``foo=""`` and ``foo=`` both give the value
  ``None``, for preferences and parameters alike.
- Duplicate parameter names within one preference: the first one wins, as for
  preferences (section 2 only says so for preferences).
- Parameter names, like preference names, are compared case-insensitively and
  returned lowercased; values keep their case (section 2).
- ``obs-text`` in quoted strings (RFC 7230 section 3.2.6) is any character from
  U+0080 up, not only up to U+00FF, since callers may hand in text that was
  decoded as something other than Latin-1. Tokens stay strictly ASCII.
"""

from __future__ import annotations

import functools
import typing as t
from dataclasses import dataclass, field

__all__ = [
    "MAX_WAIT_SECONDS",
    "Preference",
    "delta_seconds",
    "parse_prefer",
    "request_prefer",
    "respond_async",
    "wait_seconds",
]

#: Largest ``wait`` that :func:`wait_seconds` returns; larger values are capped to it.
MAX_WAIT_SECONDS = 2**31

# tchar, RFC 7230 section 3.2.6. Spelled out rather than str.isalnum(), which is
# true for non-ASCII letters and digits too.
_TCHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DIGITS = frozenset("0123456789")
_OWS = " \t"


@dataclass(frozen=True)
class Preference:
    """One preference of a ``Prefer`` header: ``name[=value][; param[=value]]...``.

    ``name`` and the keys of ``params`` are lowercased tokens. ``value`` and the
    values of ``params`` are the token or the unquoted, unescaped quoted string,
    case preserved; ``None`` when absent or empty.

    Instances hash by ``name`` and ``value`` only (``params`` is a dict).
    """

    name: str
    value: str | None = None
    params: dict[str, str | None] = field(default_factory=dict, hash=False)


def parse_prefer(values: t.Iterable[str]) -> dict[str, Preference]:
    """Parse all the ``Prefer`` header field values of a request.

    ``values`` is every ``Prefer`` field value in the order received (for example
    ``request.headers.getlist("Prefer")``); a single string is taken as one field
    value. Returns the preferences by lowercased name, in order of first
    appearance. When a name occurs more than once, within one field value or
    across several, the first well-formed occurrence wins. Empty list elements
    and malformed ones are skipped; this function does not raise on any input.
    """
    if isinstance(values, str):
        # A str is an Iterable[str] of characters; a caller passing one header
        # value means that value, not one field per character.
        values = [values]
    prefs: dict[str, Preference] = {}
    for value in values:
        for element in _split_unquoted(value, ","):
            pref = _parse_element(element)
            if pref is not None and pref.name not in prefs:
                prefs[pref.name] = pref
    return prefs


def request_prefer(environ: t.Mapping[str, t.Any]) -> dict[str, Preference]:
    """The preferences of a WSGI request.

    A WSGI server joins repeated ``Prefer`` fields into one ``HTTP_PREFER`` value
    (as werkzeug's ``request.headers.getlist`` would find it, but without going
    through every header of the request).
    """
    value = environ.get("HTTP_PREFER")
    if not value:
        return {}
    if len(value) > _CACHED_VALUE_MAX:
        return parse_prefer((value,))
    return dict(_parse_cached(value))


#: Header values up to this length are parsed once per process (clients send the
#: same few, e.g. ``wait=20``, over and over); longer ones every time.
_CACHED_VALUE_MAX = 256


@functools.lru_cache(maxsize=256)
def _parse_cached(value: str) -> tuple[tuple[str, Preference], ...]:
    return tuple(parse_prefer((value,)).items())


def wait_seconds(prefs: t.Mapping[str, Preference]) -> int | None:
    """The ``wait`` preference in seconds (RFC 7240 section 4.3), or ``None``.

    The value must be ``delta-seconds``: one or more ASCII digits, nothing else
    (no sign, no fraction, no spaces inside). ``None`` when ``wait`` is absent,
    has no value or an invalid one. Values above :data:`MAX_WAIT_SECONDS`
    (2**31), however many digits they have, are capped to it, as RFC 7234
    section 1.2.1 prescribes for ``delta-seconds`` too large to represent.
    A quoted value (``wait="10"``) is accepted like the token form, since
    section 2 treats token and quoted-string values alike.
    """
    pref = prefs.get("wait")
    if pref is None or pref.value is None:
        return None
    return delta_seconds(pref.value)


def delta_seconds(text: str) -> int | None:
    """``text`` as ``delta-seconds`` (RFC 9111 section 1.2.2): one or more ASCII
    digits and nothing else, else None. Values above :data:`MAX_WAIT_SECONDS`,
    however many digits they have, are capped to it: a number too large is still
    a number, which every caller bounds further."""
    if not text or not all(c in _DIGITS for c in text):
        return None
    # Bound the length before int(): a digit string of any length is valid
    # delta-seconds, but int() of thousands of digits is slow, and above
    # sys.int_info.str_digits_check_threshold raises ValueError.
    significant = text.lstrip("0")
    if len(significant) > len(str(MAX_WAIT_SECONDS)):
        return MAX_WAIT_SECONDS
    return min(int(significant), MAX_WAIT_SECONDS) if significant else 0


def respond_async(prefs: t.Mapping[str, Preference]) -> bool:
    """Whether the client sent ``respond-async`` (RFC 7240 section 4.1).

    True whenever the preference is present, even with a value or parameters,
    which section 4.1 does not define and which are ignored.
    """
    return "respond-async" in prefs


def _split_unquoted(text: str, sep: str) -> list[str]:
    """``text`` split at each ``sep`` that is not inside a quoted string.

    Inside a quoted string a backslash escapes the next character (so ``\\"``
    does not end it). An unterminated quoted string runs to the end of ``text``.
    The pieces are not stripped or validated.
    """
    pieces: list[str] = []
    start = 0
    in_quotes = False
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if in_quotes:
            if c == "\\":
                i += 1  # skip the escaped character, whatever it is
            elif c == '"':
                in_quotes = False
        elif c == '"':
            in_quotes = True
        elif c == sep:
            pieces.append(text[start:i])
            start = i + 1
        i += 1
    pieces.append(text[start:])
    return pieces


def _parse_element(element: str) -> Preference | None:
    """One list element as a :class:`Preference`; ``None`` if empty or malformed."""
    first, *rest = _split_unquoted(element, ";")
    if not first.strip(_OWS):
        # An empty list element (RFC 7230 section 7), or parameters with no
        # preference token before them.
        return None
    head = _parse_pair(first)
    if head is None:
        return None
    params: dict[str, str | None] = {}
    for piece in rest:
        if not piece.strip(_OWS):
            continue  # *( OWS ";" [ OWS parameter ] ): the parameter is optional
        param = _parse_pair(piece)
        if param is None:
            return None
        params.setdefault(param[0], param[1])
    return Preference(name=head[0], value=head[1], params=params)


def _parse_pair(text: str) -> tuple[str, str | None] | None:
    """``token [ BWS "=" BWS word ]`` with surrounding OWS, as (lowercased name,
    value); ``None`` if malformed."""
    # A token cannot contain "=" or '"', so the first "=" ends the name even if
    # a quoted value follows that contains more of them.
    name, eq, raw = text.partition("=")
    name = name.strip(_OWS)
    if not _is_token(name):
        return None
    # Lowercase only after checking: str.lower() maps some non-ASCII characters
    # to ASCII ones (KELVIN SIGN to "k"), which must not turn into valid names.
    name = name.lower()
    if not eq:
        return name, None
    raw = raw.strip(_OWS)
    if not raw:
        return name, None
    if raw[0] == '"':
        value = _unquote(raw)
        if value is None:
            return None
        return name, value or None
    if not _is_token(raw):
        return None
    return name, raw


def _is_token(text: str) -> bool:
    return bool(text) and all(c in _TCHARS for c in text)


def _unquote(text: str) -> str | None:
    """The content of ``text`` if it is exactly one quoted-string (RFC 7230
    section 3.2.6), with quoted-pairs resolved; else ``None``."""
    out: list[str] = []
    i = 1  # text[0] is the opening quote
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            # Anything after the closing quote (other than the OWS already
            # stripped) makes the element malformed.
            return "".join(out) if i == n - 1 else None
        if c == "\\":
            i += 1
            if i == n or not _is_quotable(text[i], pair=True):
                return None
            out.append(text[i])
        elif _is_quotable(c, pair=False):
            out.append(c)
        else:
            return None
        i += 1
    return None  # unterminated


def _is_quotable(c: str, *, pair: bool) -> bool:
    """qdtext, or with ``pair`` the character after a backslash in a quoted-pair."""
    code = ord(c)
    if c in _OWS or code >= 0x80:  # HTAB, SP, obs-text
        return True
    if 0x21 <= code <= 0x7E:  # VCHAR
        return pair or c not in '"\\'
    return False  # controls, DEL
