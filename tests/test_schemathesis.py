"""Property-based tests of the whole HTTP surface with schemathesis: a real ``llmk serve``
(tiny models, the management API on) is sent requests generated from its own
``/openapi.json``, valid ones (positive) and invalid ones (negative), for every
operation. No answer may be a 5xx, and every answer must be documented: its status,
its content type and (for JSON) its body's schema.

Bounded and deterministic: ``MAX_EXAMPLES`` per operation and mode, derandomized
(no example database, no shrinking), on loopback; the management API's loads get
bogus sources, refused at once, so nothing here loads a model.
"""

from __future__ import annotations

import os
import re
import time

import httpx
import pytest
from conftest import ServeProcess

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

TOKEN = "schemathesis-token"
#: Examples per operation and mode; LLMK_SCHEMATHESIS_EXAMPLES=500 for a longer search.
MAX_EXAMPLES = int(os.environ.get("LLMK_SCHEMATHESIS_EXAMPLES", "25"))

#: Every operation the daemon documents; ``test_every_operation_is_covered`` keeps this whole.
OPERATIONS = [
    ("GET", "/v1/models"), ("GET", "/v1/models/{name}"),
    ("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/embeddings"),
    ("POST", "/v1/responses"), ("GET", "/v1/responses/{response_id}"), ("DELETE", "/v1/responses/{response_id}"),
    ("GET", "/admin/models"), ("POST", "/admin/models"), ("PUT", "/admin/models/{name}"),
    ("DELETE", "/admin/models/{name}"), ("POST", "/admin/reload"),
    ("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"),
]

#: 5xx answers from known defects not fixed yet: what the daemon logs for one (a regular
#: expression) -> the defect. A generated request that hits one is set aside (its operation ends
#: as an xfail naming it, once all its examples ran); any other 5xx fails the test. Empty: every
#: defect found so far is fixed, and any 5xx fails.
KNOWN_5XX: dict[str, str] = {}


@pytest.fixture(scope="module")
def daemon(tiny_llama, tiny_bert, tmp_path_factory):
    directory = tmp_path_factory.mktemp("schemathesis")
    config = directory / "llmk.yaml"
    # Small caps so that generated requests stay cheap: a long prompt or a big max_tokens is a quick 400.
    config.write_text(f"""
server: {{port: 0, watch_config: false, max_completion_tokens: 8, max_prompt_tokens: 64, request_timeout: 60,
          max_choices: 4, max_embedding_inputs: 8, model_roots: [{directory / "roots"}]}}
kernel: {{cache_dir: {directory / "cache"}}}
plugins: {{autoload: false}}
models:
  chat: {{source: {tiny_llama}, backend: torch, max_batch_size: 8}}
  embed: {{source: {tiny_bert}, backend: torch}}
""")
    daemon = ServeProcess(["serve", "--config", str(config)],
                          env={"LLMK_ADMIN_TOKEN": TOKEN, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    daemon.roots = directory / "roots"
    daemon.roots.mkdir()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="module")
def api(daemon):
    return schemathesis.openapi.from_url(f"{daemon.url}/openapi.json", timeout=30)


def test_every_operation_is_covered(api):
    documented = {(method.upper(), path) for path, item in api.raw_schema["paths"].items() for method in item
                  if method in ("get", "put", "post", "delete", "patch")}
    assert documented == set(OPERATIONS)


def test_the_schema_documents_the_error_answers(api):
    raw = api.raw_schema
    assert "ErrorBody" in raw["components"]["schemas"]
    for path, item in raw["paths"].items():
        for method, operation in item.items():
            answers = operation["responses"]
            assert "422" not in answers or path.startswith("/admin/models"), (method, path)
            assert {"400", "404", "413", "500"} <= set(answers), (method, path)
            assert answers["413"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            if path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"):
                assert {"429", "503", "504"} <= set(answers), (method, path)
            if path.startswith("/admin/"):
                assert {"401", "403"} <= set(answers) and operation["security"] == [{"adminToken": []}]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        assert "text/event-stream" in raw["paths"][path]["post"]["responses"]["200"]["content"]


#: The model each operation serves: most generated cases name it, so that they reach the
#: model (a random name is only ever a 404).
MODELS = {"/v1/chat/completions": "chat", "/v1/completions": "chat", "/v1/responses": "chat",
          "/v1/embeddings": "embed"}
ADMIN_LOADS = (("POST", "/admin/models"), ("PUT", "/admin/models/{name}"))


def served(cases, method: str, path: str, roots):
    """``cases`` with the model a served one in 3 of 4; a ``{name}`` too, but for the unload
    (``DELETE /admin/models/{name}`` with a served name would unload it). A load's source is,
    in 1 of 3, a path under ``server.model_roots`` where nothing is: past the permission check,
    a load that fails at once (a random source is refused before it)."""

    def named(drawn):
        case, serve, name, missing = drawn
        if serve:
            if path in MODELS and isinstance(case.body, dict):
                case.body["model"] = MODELS[path]
            if (method, path) in (("GET", "/v1/models/{name}"), ("PUT", "/admin/models/{name}")):
                case.path_parameters["name"] = name
        if missing and (method, path) in ADMIN_LOADS and isinstance(case.body, dict):
            case.body["source"] = str(roots / "nothing-here")
        return case

    return st.tuples(cases, st.sampled_from([True, True, True, False]), st.sampled_from(["chat", "embed"]),
                     st.sampled_from([False, False, True])).map(named)


def known_defect(daemon: ServeProcess, since: int) -> str | None:
    """The known defect behind the 5xx just answered, from what the daemon logged since line ``since``."""
    time.sleep(0.3)  # an unhandled error's traceback is logged just after its answer is sent
    logged = "".join(daemon.lines[since:])
    why = next((why for pattern, why in KNOWN_5XX.items() if re.search(pattern, logged)), None)
    if why is None:
        print(f"the daemon's log of an unknown 5xx:\n{logged}")  # shown with the failure
    return why


@pytest.mark.parametrize("mode", ["positive", "negative"])
@pytest.mark.parametrize("method, path", OPERATIONS, ids=[f"{m}-{p}" for m, p in OPERATIONS])
def test_no_5xx_and_every_answer_documented(api, daemon, method, path, mode):
    from schemathesis import GenerationMode

    operation = api[path][method]
    generation_mode = GenerationMode.POSITIVE if mode == "positive" else GenerationMode.NEGATIVE
    headers = {"Authorization": f"Bearer {TOKEN}"} if path.startswith("/admin/") else None

    @given(case=served(operation.as_strategy(generation_mode), method, path, daemon.roots))
    @settings(max_examples=MAX_EXAMPLES, derandomize=True, database=None, deadline=None,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    def run(case):
        since = len(daemon.lines)
        response = case.call(base_url=daemon.url, headers=headers, timeout=60)
        if response.status_code >= 500:
            why = known_defect(daemon, since)
            if why is not None:
                defects.setdefault(why, case.as_curl_command(headers=headers))
                return
        checks = [not_a_server_error, status_code_conformance, content_type_conformance]
        # An event stream (stream: true) is no JSON document: the schema can only say "a string", so
        # response_schema_conformance has nothing to hold it to (test_server.py checks its chunks).
        if not response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
            checks.append(response_schema_conformance)
        case.validate_response(response, checks=checks, headers=headers)

    defects: dict[str, str] = {}
    try:
        run()
    except Unsatisfiable:
        if mode == "positive":
            raise
        pytest.skip(f"schemathesis finds nothing to make invalid in {method} {path}")
    if defects:
        pytest.xfail("; ".join(f"{why} (a 500), e.g. {curl}" for why, curl in defects.items()))


def test_the_daemon_still_serves_what_it_did(daemon):
    assert sorted(m.id for m in daemon.client().models.list()) == ["chat", "embed"]
    assert daemon.client().completions.create(model="chat", prompt="Hi", max_tokens=2).choices
    assert httpx.get(daemon.url + "/ready").status_code == 200
