"""The API over the Consul store when Consul is not there: clear 503s, and recovery."""

from __future__ import annotations

import json

import pytest

from .conftest import app_client, free_port, make_settings
from .fakes import FakeRunner
from .tarfiles import make_tar

pytestmark = [pytest.mark.anyio, pytest.mark.consul]

UPLOAD = {
    "files": {"tar": ("code.tar", make_tar({"main.py": "print(1)\n"}), "application/x-tar")},
    "data": {"metadata": json.dumps({})},
}


async def test_consul_unreachable_answers_503_with_a_code() -> None:
    """With Consul down the service still starts; submits and reads answer 503 store_unavailable."""
    settings = make_settings(consul_addr=f"127.0.0.1:{free_port()}", consul_prefix="pyexec-down")
    async with app_client(settings, runner=FakeRunner()) as client:
        health = await client.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["store"] != "ok"
        assert health.json()["checks"]["runner"] == "ok"
        for response in (
            await client.post("/api/v1/exec/async", **UPLOAD),
            await client.get("/api/v1/executions/exe_00000000-0000-0000-0000-000000000000"),
        ):
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "store_unavailable"
