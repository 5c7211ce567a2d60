from flask import Flask, g, request
from flask_restful import Api, abort

from flask_restful_async import AsyncResource, register_async

TOKENS = {"alice-token": "alice", "bob-token": "bob"}  # your user database


def token_required(view):
    """Loads g.user_id from `Authorization: Bearer <token>`, or answers 401."""

    def authenticated(*args, **kwargs):
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or token not in TOKENS:
            abort(401, message="A valid bearer token is required.")
        g.user_id = TOKENS[token]
        return view(*args, **kwargs)

    return authenticated


class Report(AsyncResource):
    method_decorators = [token_required]  # in the request thread, before the 202

    def post(self):
        return {"owner": g.user_id, "rows": 42}


api = Api()
api.add_resource(Report, "/reports")


def create_app(config=None):
    app = Flask(__name__)
    app.config.from_mapping(config or {})
    api.init_app(app)
    # decorators= authenticates the status URL, its /result and the task list,
    # so that owner= finds g.user_id there too.
    register_async(api, app=app, owner=lambda: g.user_id, decorators=[token_required])
    return app
