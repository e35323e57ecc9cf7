"""Property-based fuzzing of the server from its own OpenAPI spec (schemathesis + hypothesis).

Every generated request, valid by the spec (positive) or not (negative), must get a documented,
spec-conforming non-5xx answer, and the server must still serve afterwards. The default suite
runs a short pass (FAST examples per operation and mode); `-m slow` runs FULL (a few hundred
requests; the status counts are printed with -s).
"""
from collections import Counter

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import positive_data_acceptance  # noqa: E402

from tests.serve.conftest import serving  # noqa: E402

KEY = "fuzz-key"
FAST, FULL = 10, 120
# valid-by-spec requests the engine still refuses (an empty prompt, token ids outside the
# vocabulary, a prompt past max_model_len) are 400s, which this check would count as failures
EXCLUDED = [positive_data_acceptance]


@pytest.fixture(scope="module")
def fuzz_server(model_dir):
    with serving(model_dir, api_key=KEY, engine_args={"max_model_len": 48}) as server:
        yield server


def fuzz(server, examples: int) -> Counter:
    """Run `examples` cases per operation and mode; the status codes seen."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    statuses = Counter()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if operation.method.upper() == "POST" else [])
        for mode in modes:
            @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck),
                      derandomize=True, database=None)
            @given(operation.as_strategy(generation_mode=mode))
            def run(case):
                response = case.call_and_validate(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"},
                                                  timeout=60, excluded_checks=EXCLUDED)
                statuses[response.status_code] += 1
                assert response.status_code < 500, response.text

            run()
    return statuses


def _alive(server):
    assert httpx.get(server.url + "/health").status_code == 200
    r = httpx.post(server.url + "/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                   json={"prompt": "the cat", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert server.idle() and server.engine.kv.num_free_blocks == server.engine.kv.num_blocks


def test_fuzz_fast(fuzz_server):
    statuses = fuzz(fuzz_server, FAST)
    assert sum(statuses.values()) >= 20 and not any(s >= 500 for s in statuses)
    _alive(fuzz_server)


@pytest.mark.slow
def test_fuzz_full(fuzz_server):
    statuses = fuzz(fuzz_server, FULL)
    print(f"\nfuzz: {sum(statuses.values())} requests, status counts {dict(sorted(statuses.items()))}")
    assert sum(statuses.values()) >= 300 and not any(s >= 500 for s in statuses)
    _alive(fuzz_server)
