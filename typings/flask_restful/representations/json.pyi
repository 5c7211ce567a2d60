import typing as t

from flask import Response

def output_json(data: t.Any, code: int, headers: t.Any = None) -> Response: ...
