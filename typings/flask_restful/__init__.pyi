# Type stubs for the parts of flask-restful 0.3.10 this package uses: the library
# ships no type information and has no further releases.
import typing as t
from collections import OrderedDict

from flask import Blueprint, Flask
from flask.views import MethodView
from werkzeug.wrappers import Response as ResponseBase

_Representation = t.Callable[..., ResponseBase]

def abort(http_status_code: int, **kwargs: t.Any) -> t.NoReturn: ...

class Api:
    representations: OrderedDict[str, _Representation]
    default_mediatype: str | None
    errors: dict[str, t.Any]
    prefix: str
    endpoints: set[str]
    app: Flask | Blueprint | None
    blueprint: Blueprint | None
    decorators: list[t.Callable[..., t.Any]]
    def __init__(
        self,
        app: Flask | Blueprint | None = None,
        prefix: str = "",
        default_mediatype: str = "application/json",
        decorators: list[t.Callable[..., t.Any]] | None = None,
        catch_all_404s: bool = False,
        serve_challenge_on_401: bool = False,
        url_part_order: str = "bae",
        errors: dict[str, t.Any] | None = None,
    ) -> None: ...
    def init_app(self, app: Flask | Blueprint) -> None: ...
    def add_resource(self, resource: type[Resource], *urls: str, **kwargs: t.Any) -> None: ...
    def url_for(self, resource: type[Resource], **values: t.Any) -> str: ...
    def make_response(self, data: t.Any, *args: t.Any, **kwargs: t.Any) -> ResponseBase: ...
    def handle_error(self, e: Exception) -> ResponseBase: ...
    def representation(self, mediatype: str) -> t.Callable[[_Representation], _Representation]: ...

class Resource(MethodView):
    representations: t.ClassVar[t.Mapping[str, _Representation] | None]
    method_decorators: t.ClassVar[
        t.Sequence[t.Callable[..., t.Any]] | t.Mapping[str, t.Sequence[t.Callable[..., t.Any]]]
    ]
    endpoint: t.ClassVar[str]
    def dispatch_request(self, *args: t.Any, **kwargs: t.Any) -> t.Any: ...
