"""The admin API fuzzed from its own OpenAPI schema (schemathesis) against a real node: never a 5xx.

Each operation gets a fixed number of generated requests (valid and invalid bodies,
integers past 64 bits, odd strings), then a stateful run chains operations (create a
key or team, then read, patch and revoke it). Any answer of 500 or more fails.
"""

from __future__ import annotations

import json

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation.modes import GenerationMode

NO_MODELS = ""
EXAMPLES = 40
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                    suppress_health_check=list(HealthCheck))


def _fresh_node(tmp_path_factory):
    from tests.conftest import start_node, wait_until, write_config

    node = start_node(write_config(tmp_path_factory.mktemp("adminfuzz"), NO_MODELS))
    try:
        assert wait_until(lambda: _healthy(node.url), timeout=60)
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def admin_node(tmp_path_factory):
    yield from _fresh_node(tmp_path_factory)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _schema(node):
    auth = {"authorization": f"Bearer {node.admin_key}"}
    return schemathesis.openapi.from_url(node.url + "/admin/v1/openapi.json", headers=auth), auth


def _no_server_error(response, case) -> None:
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:500]}\n"
        f"body: {case.body!r}\nquery: {case.query!r}")


WRITES = [("POST", "/admin/v1/keys"), ("PATCH", "/admin/v1/keys/{key_id}"), ("POST", "/admin/v1/teams"),
          ("PATCH", "/admin/v1/teams/{name}"), ("GET", "/admin/v1/usage")]


@pytest.mark.parametrize("method,path", WRITES, ids=[f"{m} {p}" for m, p in WRITES])
def test_admin_operations_never_5xx(admin_node, method, path) -> None:
    schema, auth = _schema(admin_node)
    operation = schema[path][method]
    with httpx.Client(base_url=admin_node.url, headers=auth, timeout=30) as c:
        key_id = c.post("/admin/v1/keys", json={"name": "fuzz-target"}).json()["id"]
        c.post("/admin/v1/teams", json={"name": "fuzz-team"})
    seen: list[int] = []
    # A real key and team, so that bodies reach validation and the database.
    fixed = {"key_id": key_id} if "{key_id}" in path else {"name": "fuzz-team"} if "{name}" in path else None
    cases = st.one_of(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=fixed),
                      operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=fixed))

    @given(case=cases)
    @SETTINGS
    def run(case) -> None:
        response = case.call(base_url=admin_node.url, headers=auth, timeout=30)
        seen.append(response.status_code)
        _no_server_error(response, case)

    run()
    assert len(seen) >= 10 and any(400 <= s < 500 for s in seen) and any(s < 300 for s in seen), seen


def test_huge_integers_are_422_not_500(admin_node) -> None:
    auth = {"authorization": f"Bearer {admin_node.admin_key}"}
    with httpx.Client(base_url=admin_node.url, headers=auth, timeout=30) as c:
        for body in ({"name": "k", "rpm": 2**64}, {"name": "k", "budget_tokens": 10**30}, {"name": "k", "tpm": -1},
                     {"name": "k", "max_parallel": 2**63}, {"name": "k", "expires_at": 1e300},
                     {"name": "\ud800"}, {"name": "a\x00b"}, {"name": "k", "metadata": {"n": 2**80}}):
            # json.dumps escapes a lone surrogate as "\ud800" (valid JSON) where httpx's encoder would fail.
            r = c.post("/admin/v1/keys", content=json.dumps(body), headers={"content-type": "application/json"})
            assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_request_error", (body, r.text)
        r = c.post("/admin/v1/teams", json={"name": "t-big", "budget_tokens": 2**63})
        assert r.status_code == 422 and "budget_tokens" in r.json()["error"]["message"]
        # The largest 64-bit value is stored and read back on the database.
        r = c.post("/admin/v1/teams", json={"name": "t-max", "budget_tokens": 2**63 - 1})
        assert r.status_code == 201 and c.get("/admin/v1/teams/t-max").json()["budget_tokens"] == 2**63 - 1
        r = c.get("/admin/v1/usage", params={"since": "nan"})
        assert r.status_code == 422


def test_admin_api_stateful_never_5xx(admin_node, tmp_path_factory) -> None:
    from tests.conftest import start_node, wait_until, write_config

    schema, _ = _schema(admin_node)
    base = schema.as_state_machine()

    class AdminMachine(base):  # type: ignore[valid-type, misc]
        # Each scenario runs against a node of its own: what the state machine draws next depends on
        # what the server answered, so a server that earlier scenarios changed makes hypothesis see
        # "inconsistent data generation" rather than a bug.
        def setup(self) -> None:
            self.node = start_node(write_config(tmp_path_factory.mktemp("stateful"), NO_MODELS), lock=False)
            assert wait_until(lambda: _healthy(self.node.url), timeout=60)

        def teardown(self) -> None:
            self.node.stop()

        def get_call_kwargs(self, case):
            return {"base_url": self.node.url, "headers": {"authorization": f"Bearer {self.node.admin_key}"},
                    "timeout": 30}

        def validate_response(self, response, case, **kwargs) -> None:
            _no_server_error(response, case)

    AdminMachine.run(settings=settings(max_examples=12, stateful_step_count=6, deadline=None, database=None,
                                       derandomize=True, phases=[Phase.generate],
                                       suppress_health_check=list(HealthCheck)))
