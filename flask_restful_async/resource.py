"""``AsyncResource``: a Flask-RESTful resource whose methods run as background tasks."""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import typing as t
from collections.abc import Mapping

from flask import current_app, request
from flask_restful import Resource
from werkzeug.exceptions import MethodNotAllowed
from werkzeug.wrappers import Response

from .body import BodyReader
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
    with ``202 Accepted`` and a ``Location`` to poll.

    HEAD and OPTIONS never create a task. OPTIONS answers as on a plain
    ``Resource``. HEAD runs the resource's own ``head`` if it has one, ``get`` if
    ``get`` is synchronous (see :attr:`sync_methods`), and otherwise answers
    ``405 Method Not Allowed`` with ``Allow``: a background ``get`` never runs in
    the request thread.

    ``method_decorators`` run once, around the submission: what they do to the
    arguments reaches the handler, but they do not see its return value (decorate
    the method itself, e.g. with ``marshal_with``, to transform results). Then the
    body is read (only for a request the decorators let through), and then
    ``validate_<method>`` (e.g. ``validate_post``) if the resource has one: it
    runs in the request thread with the handler's arguments, rejects the request
    with ``flask_restful.abort`` or by returning a response (as a Flask
    ``before_request`` function can), and accepts it by returning None. What it
    puts in ``g`` reaches the handler.
    """

    #: Names of methods that stay synchronous and answer as on a plain
    #: ``Resource``, e.g. ``("get",)``, in any case. An unknown name is refused
    #: when the class is created.
    sync_methods: t.ClassVar[t.Collection[str]] = frozenset()

    #: Whether a task of this resource may run again, from the start, when the
    #: process running it dies without a graceful stop (SIGKILL, out of memory,
    #: power loss): another process takes it over once the lease lapses. Only for
    #: idempotent handlers, which a second run does no harm. By default such a task
    #: ends ``lost``: it never runs twice behind the client's back. Needs a shared
    #: store and the thread executor (tasks whose view arguments are not JSON data
    #: are never taken over).
    rerun_on_crash: t.ClassVar[bool] = False

    # flask-restful ships no types: the class attributes users set on a Resource
    # are declared here too, so that a subclass's are type-checked (see the
    # README's "Type checking").

    #: As on a plain ``Resource``: decorators of every method, or a mapping from
    #: a method's lower-case name to its own. They run in the request thread,
    #: around the submit (see above).
    method_decorators: t.ClassVar[
        t.Sequence[t.Callable[..., t.Any]] | t.Mapping[str, t.Sequence[t.Callable[..., t.Any]]]
    ]
    #: As on a plain ``Resource``: media type to representation function, for
    #: this resource's results, taking the Api's place.
    representations: t.ClassVar[t.Mapping[str, t.Callable[..., Response]] | None]

    def __init_subclass__(cls, **kwargs: t.Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.sync_methods = _method_names(cls.sync_methods, cls.__name__)

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
            if handler is None and method == "head" and self._runs_get_in_background():
                raise MethodNotAllowed(
                    valid_methods=_allowed_methods(),
                    description="HEAD is not served here: GET runs as a background task.",
                )
            return super().dispatch_request(*args, **kwargs)

        state = get_state(current_app)
        # The body is held until the task starts: bound it (by the smaller of
        # MAX_CONTENT_LENGTH and the task body cap) before anything reads it.
        limit = request.max_content_length
        if limit is None or limit > state.max_body:
            limit = state.max_body
        if isinstance(self.method_decorators, Mapping):
            decorators = self.method_decorators.get(method, [])
        else:
            decorators = self.method_decorators
        body = BodyReader.watch(limit, record=bool(decorators))
        validate = getattr(self, f"validate_{method}", None)

        def accept(*accepted_args: t.Any, **accepted_kwargs: t.Any) -> t.Any:
            data = body.read()
            if validate is not None:
                answer = state.app.ensure_sync(validate)(*accepted_args, **accepted_kwargs)
                if answer is not None:
                    return answer
            return state.submit(self, method, accepted_args, accepted_kwargs, data)

        if decorators:
            # Decorators may look at the function they wrap (name, docstring, markers).
            functools.update_wrapper(accept, handler)
            for decorator in decorators:
                accept = decorator(accept)
        return accept(*args, **kwargs)

    def _runs_get_in_background(self) -> bool:
        return "get" not in self.sync_methods and getattr(self, "get", None) is not None


def _method_names(names: t.Collection[str], owner: str) -> frozenset[str]:
    if isinstance(names, str | bytes) or not all(isinstance(name, str) for name in names):
        raise TypeError(
            f"{owner}.sync_methods must be a collection of method names, e.g. ('get',),"
            f" not {names!r}"
        )
    lowered = frozenset(name.lower() for name in names)
    unknown = sorted(name for name in names if name.lower() not in BACKGROUND_METHODS)
    if unknown:
        valid = ", ".join(sorted(BACKGROUND_METHODS))
        raise ValueError(
            f"{owner}.sync_methods: {', '.join(map(repr, unknown))} is not the name of a"
            f" method that runs in the background; use some of {valid} (any case)."
            " HEAD and OPTIONS never run in the background."
        )
    return lowered


def _allowed_methods() -> list[str]:
    """What the route allows, but HEAD: the ``Allow`` of a refused HEAD."""
    rule = request.url_rule
    methods = rule.methods if rule is not None and rule.methods is not None else set()
    return sorted(methods - {"HEAD"})
