"""``AsyncResource``: a Flask-RESTful resource whose methods run as background tasks."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import typing as t
from collections.abc import Mapping

from flask import current_app, request
from flask_restful import Resource
from werkzeug.exceptions import RequestEntityTooLarge

from .state import get_state

#: Methods an AsyncResource runs in the background when it implements them.
BACKGROUND_METHODS = frozenset({"get", "post", "put", "patch", "delete"})


@dataclasses.dataclass
class Replay:
    """Tells ``dispatch_request`` that it runs in a worker, replaying an accepted task."""

    method: str
    args: tuple[t.Any, ...]
    kwargs: dict[str, t.Any]
    resource: Resource | None = None


_cv_replay: contextvars.ContextVar[Replay | None] = contextvars.ContextVar(
    "flask_restful_async.replay", default=None
)


class AsyncResource(Resource):
    """Subclass instead of :class:`flask_restful.Resource`; add it with ``api.add_resource``.

    Each of ``get``, ``post``, ``put``, ``patch`` and ``delete`` that the class
    implements runs as a background task: the request is checked (the
    ``method_decorators`` run here, in the request thread), copied, and answered
    with ``202 Accepted`` and a ``Location`` to poll. HEAD and OPTIONS are always
    answered synchronously, as by a plain ``Resource``.

    ``method_decorators`` run once, around the submission: what they do to the
    arguments reaches the handler, but they do not see its return value (decorate
    the method itself, e.g. with ``marshal_with``, to transform results).
    """

    #: Lowercase names of methods that stay synchronous, e.g. ``("get",)``.
    sync_methods: t.ClassVar[t.Collection[str]] = ()

    def dispatch_request(self, *args: t.Any, **kwargs: t.Any) -> t.Any:
        replay = _cv_replay.get()
        if replay is not None:
            _cv_replay.set(None)
            replay.resource = self
            handler = getattr(self, replay.method)
            return current_app.ensure_sync(handler)(*replay.args, **replay.kwargs)

        method = request.method.lower()
        handler = getattr(self, method, None)
        if handler is None or method not in BACKGROUND_METHODS or method in self.sync_methods:
            return super().dispatch_request(*args, **kwargs)

        state = get_state(current_app)
        # The body is held until the task starts: bound it before reading. werkzeug
        # stops a chunked body at the limit without complaint, so read one byte
        # more than allowed and refuse the body if that byte came: never a task
        # with a silently truncated body.
        limit = request.max_content_length
        if limit is None or limit > state.max_body:
            limit = state.max_body
        request.max_content_length = limit + 1
        # Read the whole body first, before a decorator can consume the stream:
        # werkzeug then parses form and files from this cached copy.
        body = request.get_data(cache=True)
        if len(body) > limit:
            raise RequestEntityTooLarge()

        if isinstance(self.method_decorators, Mapping):
            decorators = self.method_decorators.get(method, [])
        else:
            decorators = self.method_decorators
        if not decorators:
            return state.submit(self, method, args, kwargs, body)

        def accept(*accepted_args: t.Any, **accepted_kwargs: t.Any) -> t.Any:
            return state.submit(self, method, accepted_args, accepted_kwargs, body)

        # Decorators may look at the function they wrap (name, docstring, markers).
        functools.update_wrapper(accept, handler)
        for decorator in decorators:
            accept = decorator(accept)
        return accept(*args, **kwargs)
