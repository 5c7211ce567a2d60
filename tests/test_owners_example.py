"""The README's "Owners" example end to end: token authentication on the submit,
the status URL, its ``/result`` and the task list; an app per test from one
module-level Api (the app-factory pattern)."""

from __future__ import annotations

import re
import typing as t
from pathlib import Path

import pytest
from flask import Flask

from flask_restful_async.state import get_state
from flask_restful_async.task import new_task_id

from .apps import token_app

ROOT = Path(__file__).resolve().parents[1]
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}
NOBODY: dict[str, str] = {}


def test_the_readme_owners_section_shows_this_example_verbatim() -> None:
    readme = (ROOT / "README.md").read_text()
    section = re.split(r"\n#{1,3} ", readme.split("\n### Owners\n", 1)[1], maxsplit=1)[0]
    code = (ROOT / "tests" / "apps" / "token_app.py").read_text()
    assert f"```python\n{code}```" in section


@pytest.fixture
def app(tmp_path: Path) -> t.Iterator[Flask]:
    app = token_app.create_app({"RESTFUL_ASYNC_STORE": f"sqlite:///{tmp_path}/tasks.db"})
    yield app
    get_state(app).close()


def test_anonymous_gets_401_the_owner_200_another_user_404(app: Flask) -> None:
    client = app.test_client()
    assert client.post("/reports").status_code == 401
    accepted = client.post("/reports", headers=ALICE)
    assert accepted.status_code == 202
    location = accepted.headers["Location"]
    task_id = location.rsplit("/", 1)[1]

    final = client.get(f"{location}?wait=10", headers=ALICE)
    assert final.status_code == 200
    assert final.json == {"owner": "alice", "rows": 42}
    unknown = client.get(f"/tasks/{new_task_id()}", headers=ALICE)
    for url in (location, location + "/result"):
        anonymous = client.get(url)
        assert anonymous.status_code == 401
        assert anonymous.json is not None
        assert "token" in anonymous.json["message"]
        other = client.get(url, headers=BOB)
        assert (other.status_code, other.data) == (unknown.status_code, unknown.data)
        assert client.get(url, headers=ALICE).json == final.json

    assert client.get("/tasks").status_code == 401
    listed = {
        name: client.get("/tasks", headers=headers).json
        for name, headers in (("alice", ALICE), ("bob", BOB))
    }
    assert listed["alice"] is not None
    assert [doc["id"] for doc in listed["alice"]["tasks"]] == [task_id]
    assert listed["bob"] == {"tasks": [], "next": None}

    assert client.delete(location).status_code == 401
    assert client.delete(location, headers=BOB).status_code == 404
    assert client.get(location, headers=ALICE).status_code == 200
    assert client.delete(location, headers=ALICE).status_code == 204
    assert client.get(location, headers=ALICE).status_code == 404


def test_each_app_of_the_factory_keeps_its_own_tasks(app: Flask, tmp_path: Path) -> None:
    other_app = token_app.create_app({"RESTFUL_ASYNC_STORE": "memory://"})
    try:
        location = app.test_client().post("/reports", headers=ALICE).headers["Location"]
        other = other_app.test_client()
        assert other.get(location, headers=ALICE).status_code == 404
        accepted = other.post("/reports", headers=BOB)
        final = other.get(accepted.headers["Location"] + "?wait=10", headers=BOB)
        assert final.json == {"owner": "bob", "rows": 42}
    finally:
        get_state(other_app).close()
