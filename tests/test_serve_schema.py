"""Property-based testing of ``tierkernel serve`` against its own OpenAPI schema
(schemathesis): for requests generated from the schema, valid and not, no answer is a server
error and every answer is one the schema documents (status, content type, body)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis

# Loaded while the tests are collected (see the same import in tests/test_serve.py).
import schemathesis.specs.openapi.schemas  # isort: skip
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.serve_support import MAIN, Server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(tmp_path_factory.mktemp("serve-schema"))
    try:
        yield server
    finally:
        server.stop()


def test_no_server_error_and_every_answer_as_documented(live: Server) -> None:
    # Driven through schemathesis's Python API, one operation after another (its pytest
    # integration does not work with this pytest).
    api = schemathesis.openapi.from_url(live.url + "/openapi.json")
    operations = [result.ok() for result in api.get_all_operations()]
    assert len(operations) >= 15
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=12, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case: Any) -> None:
            case.call_and_validate(
                headers={"Authorization": f"Bearer {MAIN}"}, timeout=120,
                checks=[not_a_server_error, status_code_conformance, content_type_conformance,
                        response_schema_conformance])

        check()
