"""``create_app`` on its own: the API without pages, and a first start with no model to serve.

Routing is checked without starting the app (no lifespan: no Redis, no engine); the failed start
runs the lifespan up to the registry, which is where it stops.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from serve.app import create_app
from serve.settings import Settings

NOT_FOUND = {"message": "Not Found", "type": "not_found_error", "param": None, "code": None}


def test_without_pages_every_unknown_path_answers_in_openai_error_shape(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=tmp_path, model=str(tmp_path))))
    for method, path in [("GET", "/"), ("GET", "/chat"), ("GET", "/admin/x"), ("POST", "/x/y")]:
        response = client.request(method, path, follow_redirects=False)
        assert response.status_code == 404, path
        assert response.json() == {"error": NOT_FOUND}
    wrong_method = client.post("/admin/checkpoints")
    assert wrong_method.status_code == 405
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"


def test_a_first_start_without_a_model_says_what_to_configure(
    tmp_path: Path, redis_url: str
) -> None:
    app = create_app(Settings(data_dir=tmp_path, redis_url=redis_url, engine="hf", model=None))
    with pytest.raises(RuntimeError, match="set LOOPCHAT_MODEL"), TestClient(app):
        pass
