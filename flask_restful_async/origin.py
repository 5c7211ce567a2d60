"""Telling a browser's cross-site request from a same-site one.

A browser marks every request with ``Sec-Fetch-Site`` (Fetch Metadata, sent by
Chromium since 76, Firefox since 90, Safari since 16.4): ``same-origin``,
``same-site``, ``cross-site``, or ``none`` (typed by the user). Older browsers
send only ``Origin``, and there it must name this very host. A request with
neither comes from something that is not a browser (curl, a script, a test
client), which no other site can make act in a user's name.
"""

from __future__ import annotations

import typing as t

_SAME_SITE = frozenset(("same-origin", "same-site", "none"))


def is_cross_site(environ: t.Mapping[str, t.Any], host_url: str) -> bool:
    """Whether a browser sent this request on behalf of another site.

    ``host_url`` is this request's own origin as the app sees it
    (``request.host_url``); behind a proxy that rewrites the host, use werkzeug's
    ``ProxyFix`` so that it matches what the browser shows.
    """
    fetch_site: str | None = environ.get("HTTP_SEC_FETCH_SITE")
    if fetch_site is not None:
        return fetch_site.strip().lower() not in _SAME_SITE
    origin: str | None = environ.get("HTTP_ORIGIN")
    if origin is None:
        return False
    return origin.rstrip("/").lower() != host_url.rstrip("/").lower()
