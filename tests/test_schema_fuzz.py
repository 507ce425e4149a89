"""schemathesis against the app's own OpenAPI schema, signed in as a reader: whatever it sends,
within or outside the schema, the server answers without a 5xx, no 4xx body shows a Python
exception name, a file path or a traceback, and a reader never gets a feedback export (403, not
data)."""

from __future__ import annotations

import re

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from neurocbir.app.access import AccessControl
from neurocbir.app.api import create_app
from neurocbir.app.audit import AuditLog
from neurocbir.app.users import UserStore
from neurocbir.serving.service import RetrievalService

READER: dict[str, object] = {}
#: what an error body must never show: a traceback, a Python file path, an exception class name
LEAK = re.compile(r"Traceback|File \"|\.py\b|/site-packages/|\b[A-Z][A-Za-z]*(Error|Exception)\b")


@pytest.fixture(scope="module")
def api_schema(small_run, small_cases, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    users = UserStore(folder / "auth.db")
    READER["token"] = users.add("fuzzer", "reader")
    control = AccessControl(users=users, audit=AuditLog(folder / "audit.db"))
    READER["control"] = control
    app = create_app(RetrievalService.from_run(small_run, table=small_cases), access=control)
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_no_server_errors_for_a_reader(api_schema):
    """Every operation of the schema, 15 generated requests each (schemathesis's strategies, driven
    by hypothesis directly: its pytest plugin does not load on this pytest)."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15
    wrong: list[str] = []

    def fuzz(op) -> None:
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        @given(op.as_strategy())
        def check(case):
            READER["control"].throttle.clear()  # POST /auth/session with made-up tokens counts as failed sign-ins
            response = case.call(headers={"Authorization": f"Bearer {READER['token']}"})
            if response.status_code >= 500:
                wrong.append(f"{case.method} {case.formatted_path}: {response.status_code} {response.text[:200]}")
            elif response.status_code >= 400 and LEAK.search(response.text):
                wrong.append(f"{case.method} {case.formatted_path}: {response.status_code} shows {response.text[:200]}")
            if op.path in ("/feedback.csv", "/audit.csv", "/users") and response.status_code != 403:
                wrong.append(f"{case.method} {case.formatted_path}: {response.status_code} for a reader")

        check()

    for op in operations:
        fuzz(op)
    assert not wrong, "\n".join(sorted(set(wrong))[:20])
