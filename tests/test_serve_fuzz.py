"""A bounded schemathesis run over the service's OpenAPI schema: no input gives a 5xx."""

import shutil
import socket
import threading
import time

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base_url(served, planted, tmp_path_factory):
    import uvicorn

    from rmbert.serve.app import Limits, create_app

    store = tmp_path_factory.mktemp("fuzz") / "store"
    shutil.copytree(served / "store", store)
    limits = Limits(max_news_per_post=20, max_candidates=200, max_history=200)
    app = create_app(served / "run", store, behaviors=planted / "dev" / "behaviors.tsv", limits=limits)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_no_input_gives_a_server_error(base_url):
    """Every operation, 60 generated cases each (schemathesis strategies driven by hypothesis)."""
    from hypothesis import given

    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    failures, ran = [], 0
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            nonlocal ran
            ran += 1
            response = case.call(base_url=base_url, timeout=30)
            if response.status_code >= 500:
                failures.append((case.method, case.path, response.status_code, response.text[:200]))

        check()
    print("schemathesis cases:", ran)
    assert ran >= 200 and failures == []
