"""register_async: apps, blueprints, config, and errors of use."""

from __future__ import annotations

import typing as t
from pathlib import Path

import pytest
from flask import Blueprint, Flask
from flask_restful import Api

from flask_restful_async import (
    AsyncResource,
    MemoryStore,
    ThreadExecutor,
    register_async,
)
from flask_restful_async.extension import DEFAULTS
from flask_restful_async.state import get_state
from flask_restful_async.stores.sqlite import SQLiteStore

from .conftest import wait_done


class Hello(AsyncResource):
    def get(self, name: str) -> t.Any:
        return {"hello": name}


def test_works_for_an_api_on_a_blueprint_with_a_prefix(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    blueprint = Blueprint("v1", __name__, url_prefix="/v1")
    api = Api(blueprint)
    register_async(api, owner=lambda: "alice")
    api.add_resource(Hello, "/hello/<name>")
    app.register_blueprint(blueprint)
    try:
        client = app.test_client()
        accepted = client.get("/v1/hello/bp")
        assert accepted.status_code == 202
        assert accepted.headers["Location"].startswith("/v1/tasks/")
        assert wait_done(client, accepted.headers["Location"]).json == {"hello": "bp"}
        assert client.get("/v1/tasks").status_code == 200
    finally:
        get_state(app).close()


def test_a_custom_status_url_serves_the_list_one_level_up(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["RESTFUL_ASYNC_PUBLIC_LIST"] = True
    api = Api(app)
    register_async(api, url="/status/<task_id>")
    api.add_resource(Hello, "/hello/<name>")
    try:
        client = app.test_client()
        location = client.get("/hello/x").headers["Location"]
        assert location.startswith("/status/")
        wait_done(client, location)
        listed = client.get("/status").json
        assert listed is not None
        assert len(listed["tasks"]) == 1
    finally:
        get_state(app).close()


def test_an_id_of_one_segment_is_routed_by_the_status_url_itself(tmp_path: Path) -> None:
    # The catch-all rule (ids with slashes, the empty id) costs the router a
    # pattern match on every poll; the status URL's own rule is tried first.
    app = Flask(__name__, instance_path=str(tmp_path))
    api = Api(app)
    register_async(api, url="/jobs/<task_id>")
    try:
        adapter = app.url_map.bind("localhost")
        rule, args = adapter.match("/jobs/" + "A" * 22, return_rule=True)
        assert (rule.rule, args) == ("/jobs/<task_id>", {"task_id": "A" * 22})
        rule, args = adapter.match("/jobs/a/b", return_rule=True)
        assert (rule.rule, args) == ("/jobs/<restful_async_task_path:task_id>", {"task_id": "a/b"})
        response = app.test_client().get("/jobs/a/b")
        assert (response.status_code, response.json) == (404, {"message": "No such task."})
    finally:
        get_state(app).close()


def test_twice_on_one_app_is_a_runtime_error_that_says_why(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    api = Api(app)
    register_async(api)
    with pytest.raises(RuntimeError, match="already called"):
        register_async(api)
    with pytest.raises(RuntimeError, match="already called for the app"):
        register_async(Api(app), url="/jobs/<task_id>")


def test_twice_through_two_blueprints_is_a_runtime_error(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    first, second = Blueprint("a", __name__), Blueprint("b", __name__, url_prefix="/b")
    register_async(Api(first))
    register_async(Api(second))
    app.register_blueprint(first)
    with pytest.raises(RuntimeError, match="already called for the app"):
        app.register_blueprint(second)


def test_the_url_must_end_with_the_task_id(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="<task_id>"):
        register_async(Api(Flask(__name__, instance_path=str(tmp_path))), url="/tasks/<id>")


def test_an_api_made_without_an_app_needs_the_app_and_says_how(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"register_async\(api, app=app\) in your app factory"):
        register_async(Api())


def _factory_app(tmp_path: Path, name: str, config: dict[str, t.Any]) -> Flask:
    app = Flask(name, instance_path=str(tmp_path / name))
    app.config.update(config)
    return app


@pytest.mark.parametrize("order", ["init_app first", "register_async first"])
def test_app_factory_two_apps_from_one_module_level_api_each_with_its_own_state(
    tmp_path: Path, order: str
) -> None:
    # As in an app factory: one Api at module level, resources added to it there,
    # and create_app() called once per app (per test, per process, ...).
    api = Api()
    api.add_resource(Hello, "/hello/<name>")

    def create_app(name: str, config: dict[str, t.Any]) -> Flask:
        app = _factory_app(tmp_path, name, config)
        if order == "init_app first":
            api.init_app(app)
            register_async(api, app=app)
        else:
            register_async(api, app=app)
            api.init_app(app)
        return app

    first = create_app("first", {"RESTFUL_ASYNC_STORE": "memory://"})
    second = create_app("second", {"RESTFUL_ASYNC_MAX_WAIT": 7})
    try:
        first_state, second_state = get_state(first), get_state(second)
        assert isinstance(first_state.store, MemoryStore)
        assert isinstance(second_state.store, SQLiteStore)
        assert (first_state.max_wait, second_state.max_wait) == (20, 7)
        assert first_state.executor is not second_state.executor
        for app, name in ((first, "one"), (second, "two")):
            client = app.test_client()
            accepted = client.get(f"/hello/{name}")
            assert accepted.status_code == 202
            assert wait_done(client, accepted.headers["Location"]).json == {"hello": name}
            # each app reads its own store: the other app's task is unknown here
            other = second if app is first else first
            assert other.test_client().get(accepted.headers["Location"]).status_code == 404
        assert (tmp_path / "second" / "restful_async.db").exists()
    finally:
        first_state.close()
        second_state.close()


def test_app_factory_twice_for_one_app_is_a_runtime_error_that_says_how_to_fix(
    tmp_path: Path,
) -> None:
    api = Api()
    app = _factory_app(tmp_path, "app", {"RESTFUL_ASYNC_STORE": "memory://"})
    api.init_app(app)
    register_async(api, app=app)
    try:
        with pytest.raises(RuntimeError, match="call register_async only once per app"):
            register_async(api, app=app)
    finally:
        get_state(app).close()


def test_app_is_refused_where_the_api_knows_its_app(tmp_path: Path) -> None:
    app = _factory_app(tmp_path, "app", {})
    other = _factory_app(tmp_path, "other", {})
    with pytest.raises(ValueError, match="another app"):
        register_async(Api(app), app=other)
    with pytest.raises(ValueError, match="blueprint"):
        register_async(Api(Blueprint("bp", __name__)), app=app)


def test_a_store_or_executor_object_serves_one_app_only(tmp_path: Path) -> None:
    api = Api()
    store = MemoryStore()
    executor = ThreadExecutor(max_workers=1, max_pending=1)
    first = _factory_app(tmp_path, "first", {})
    register_async(api, app=first, store=store, executor=executor)
    second = _factory_app(tmp_path, "second", {})
    try:
        with pytest.raises(RuntimeError, match="store object already serves another app"):
            register_async(api, app=second, store=store)
        with pytest.raises(RuntimeError, match="executor object already serves another app"):
            register_async(api, app=second, store="memory://", executor=executor)
    finally:
        get_state(first).close()


def test_a_blueprint_on_two_apps_gives_each_app_its_own_state(tmp_path: Path) -> None:
    blueprint = Blueprint("v1", __name__, url_prefix="/v1")
    api = Api(blueprint)
    register_async(api)
    api.add_resource(Hello, "/hello/<name>")
    first = _factory_app(tmp_path, "first", {"RESTFUL_ASYNC_STORE": "memory://"})
    second = _factory_app(tmp_path, "second", {"RESTFUL_ASYNC_STORE": "memory://"})
    first.register_blueprint(blueprint)
    second.register_blueprint(blueprint)
    try:
        assert get_state(first).store is not get_state(second).store
        for app in (first, second):
            client = app.test_client()
            location = client.get("/v1/hello/bp").headers["Location"]
            assert wait_done(client, location).json == {"hello": "bp"}
    finally:
        get_state(first).close()
        get_state(second).close()


def test_a_blueprint_with_a_store_object_refuses_a_second_app(tmp_path: Path) -> None:
    blueprint = Blueprint("v1", __name__)
    register_async(Api(blueprint), store=MemoryStore())
    first = _factory_app(tmp_path, "first", {})
    first.register_blueprint(blueprint)
    try:
        with pytest.raises(RuntimeError, match="store object already serves another app"):
            _factory_app(tmp_path, "second", {}).register_blueprint(blueprint)
    finally:
        get_state(first).close()


def test_an_unknown_store_url_names_the_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="memory://"):
        register_async(Api(Flask(__name__, instance_path=str(tmp_path))), store="mongodb://x")


def test_config_defaults_are_set_and_keywords_win_over_config(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["RESTFUL_ASYNC_STORE"] = "nosuch://"
    store = MemoryStore()
    executor = ThreadExecutor(max_workers=2, max_pending=3)
    register_async(Api(app), store=store, executor=executor)
    state = get_state(app)
    assert state.store is store
    assert state.executor is executor
    for key, value in DEFAULTS.items():
        if key != "RESTFUL_ASYNC_STORE":
            assert app.config[key] == value


def test_the_default_executor_is_sized_by_config(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config.update(RESTFUL_ASYNC_MAX_WORKERS=3, RESTFUL_ASYNC_MAX_PENDING=7)
    register_async(Api(app))
    executor = get_state(app).executor
    assert isinstance(executor, ThreadExecutor)
    assert (executor.max_workers, executor.max_pending) == (3, 7)


def test_an_app_without_register_async_gets_a_clear_error(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    api = Api(app)
    api.add_resource(Hello, "/hello/<name>")
    app.config["PROPAGATE_EXCEPTIONS"] = True
    with pytest.raises(RuntimeError, match="register_async"):
        app.test_client().get("/hello/x")


def test_a_non_string_identity_is_a_type_error(tmp_path: Path) -> None:
    app = Flask(__name__, instance_path=str(tmp_path))
    app.config["PROPAGATE_EXCEPTIONS"] = True
    api = Api(app)
    register_async(api, owner=lambda: 42)  # type: ignore[arg-type, return-value]
    api.add_resource(Hello, "/hello/<name>")
    with pytest.raises(TypeError, match="owner"):
        app.test_client().get("/hello/x")


def test_every_config_key_is_in_the_readme_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key in DEFAULTS if f"| `{key}` |" not in readme]
    assert missing == []


def test_decorators_wrap_the_status_result_and_list_resources_as_api_decorators_do(
    tmp_path: Path,
) -> None:
    calls: list[str] = []

    def tagged(tag: str) -> t.Callable[..., t.Any]:
        def decorator(view: t.Callable[..., t.Any]) -> t.Callable[..., t.Any]:
            def wrapper(*args: t.Any, **kwargs: t.Any) -> t.Any:
                calls.append(tag)
                return view(*args, **kwargs)

            return wrapper

        return decorator

    app = _factory_app(tmp_path, "app", {"RESTFUL_ASYNC_STORE": "memory://"})
    api = Api(app)
    register_async(api, owner=lambda: None, decorators=[tagged("inner"), tagged("outer")])
    api.add_resource(Hello, "/hello/<name>")
    try:
        client = app.test_client()
        location = client.get("/hello/x").headers["Location"]
        assert calls == []  # the resources' own submit is not wrapped
        for url in (location, location + "/result", "/tasks"):
            calls.clear()
            client.get(url)
            # the last decorator is the outermost, as with Api(decorators=...)
            assert calls == ["outer", "inner"], url
    finally:
        get_state(app).close()


def test_decorators_must_be_callables(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="decorators"):
        register_async(Api(_factory_app(tmp_path, "app", {})), decorators=["auth"])  # type: ignore[list-item]
