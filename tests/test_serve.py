"""``probekit serve``: answers as ``predict`` for a run and an export, micro-batches concurrent
requests into shared forward passes (each request gets its own rows), refuses bad requests with
JSON errors and keeps serving, answers 503 when the queue is full, checks the bearer token,
exposes Prometheus metrics and the OpenAPI schema, and stops on SIGTERM without losing an
accepted request."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from probekit.errors import UserError

from .engine_fixtures import (
    ToyData,
    assert_one_line_error,
    bert_dir,
    run_cli,
    tiny_binary_run,
    toy_data,
)

__all__ = ["bert_dir", "toy_data"]

pytest.importorskip("fastapi", reason="probekit serve needs the serve extra")
pytest.importorskip("prometheus_client", reason="probekit serve needs the serve extra")
httpx = pytest.importorskip("httpx", reason="the tests talk to the app with httpx")

from fastapi.testclient import TestClient  # noqa: E402

from probekit.serve import EXTRA_MISSING, create_app, require_extra  # noqa: E402

TEXTS = [
    "the cat sat on the mat",
    "a bomb in the park",
    "we like green tea",
    "poison in the river",
    "blue sky",
    "the dog ran in the park today and the sun is warm",
    "book",
]


@pytest.fixture(scope="module")
def trained(bert_dir: Path, toy_data: ToyData, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained binary run (1 epoch, linear head)."""
    return tiny_binary_run(bert_dir, toy_data, tmp_path_factory.mktemp("trained"))


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("onnx", reason="export needs the onnx extra")
    pytest.importorskip("onnxruntime", reason="export needs the onnx extra")
    from probekit.export import export_onnx

    out = tmp_path_factory.mktemp("export") / "onnx"
    export_onnx(trained, out, log=lambda _line: None)
    return out


@pytest.fixture(scope="module")
def probe(trained: Path) -> Any:
    from probekit.probe import Probe

    return Probe.from_pretrained(trained).eval()


class Echo:
    """A fast stand-in probe: one row per text, its length in it."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        self.calls.append(list(texts))
        return [{"text": text, "label": len(text) % 2, "length": len(text)} for text in texts]


class Blocking(Echo):
    """An `Echo` whose ``predict`` waits for ``release`` (it sets ``entered`` first)."""

    def __init__(self) -> None:
        super().__init__()
        self.entered, self.release = threading.Event(), threading.Event()

    def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
        self.entered.set()
        assert self.release.wait(10), "never released"
        return super().predict(texts, batch_size)


def same_rows(got: list[dict[str, Any]], expected: list[dict[str, Any]], tol: float = 1e-5) -> None:
    """Rows equal key for key: texts and labels exactly, numbers within ``tol``."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert json.loads(json.dumps(b)).keys() == a.keys()
        assert a["text"] == b["text"] and a["label"] == b["label"]
        for key, value in b.items():
            if isinstance(value, float):
                assert math.isclose(a[key], value, abs_tol=tol), (key, a[key], value)
            elif isinstance(value, dict):
                assert {str(k): v for k, v in value.items()} == pytest.approx(a[key], abs=tol)


def metric(text: str, name: str) -> float:
    """The value of one sample line ``name`` (with its labels) of a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not in the metrics:\n{text}")


# -- answers -----------------------------------------------------------------------------------------
def answers_as_predict(model: Any) -> None:
    with TestClient(create_app(model)) as client:
        whole = client.post("/v1/classify", json={"texts": TEXTS})
        assert whole.status_code == 200, whole.text
        same_rows(whole.json()["results"], model.predict(TEXTS))
        for text in TEXTS[:3]:
            one = client.post("/v1/classify", json={"text": text})
            assert one.status_code == 200, one.text
            same_rows(one.json()["results"], [model.predict(text)])


def test_a_run_folder_answers_as_its_predict(probe: Any) -> None:
    answers_as_predict(probe)


def test_an_export_answers_as_its_own_predict(exported: Path) -> None:
    from probekit.exported import ExportedProbe
    from probekit.serve import load

    model = load(exported)
    assert isinstance(model, ExportedProbe)
    answers_as_predict(model)


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows(probe: Any) -> None:
    app = create_app(probe, max_wait_ms=300, max_batch=64)
    asked = [TEXTS[i % len(TEXTS) : i % len(TEXTS) + 1 + i % 3] for i in range(20)]
    expected = dict(zip(TEXTS, probe.predict(TEXTS), strict=True))

    async def ask_all() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return await asyncio.gather(*(client.post("/v1/classify", json={"texts": t}) for t in asked))

    try:
        responses = asyncio.run(ask_all())
    finally:
        app.state.batcher.close(10)
    for texts, response in zip(asked, responses, strict=True):
        assert response.status_code == 200, response.text
        same_rows(response.json()["results"], [expected[t] for t in texts])
    with TestClient(app) as client:
        exposition = client.get("/metrics").text
    passes = metric(exposition, "probekit_serve_batch_requests_count")
    alone = metric(exposition, 'probekit_serve_batch_requests_bucket{le="1.0"}')
    assert alone < passes < 20, exposition  # at least one forward pass served several requests
    assert metric(exposition, "probekit_serve_batch_texts_sum") == sum(len(t) for t in asked)


# -- refusals ----------------------------------------------------------------------------------------
BAD = {
    "malformed JSON": {"content": b'{"text": "a', "headers": {"content-type": "application/json"}},
    "not an object": {"json": ["a"]},
    "a number": {"json": {"text": 3}},
    "a number in the list": {"json": {"texts": ["a", 4]}},
    "neither field": {"json": {}},
    "both fields": {"json": {"text": "a", "texts": ["b"]}},
    "an unknown field": {"json": {"txt": "a"}},
    "an empty text": {"json": {"text": ""}},
    "a blank text": {"json": {"texts": ["a", " \u200b "]}},
    "an empty list": {"json": {"texts": []}},
    "too many texts": {"json": {"texts": ["a"] * 5}},
    "a too long text": {"json": {"text": "x" * 41}},
    "an oversized body": {"json": {"text": "x" * 3000}},
    "an oversized chunked body": {"content": iter([b'{"text": "', b"x" * 3000, b'"}'])},
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_is_a_json_error_and_the_next_one_succeeds(case: str) -> None:
    model = Echo()
    app = create_app(model, max_texts=4, max_text_chars=40, max_body_bytes=1000)
    with TestClient(app) as client:
        response = client.post("/v1/classify", **BAD[case])
        assert response.status_code == (413 if "oversized" in case else 422), response.text
        assert response.headers["content-type"] == "application/json"
        assert set(response.json()) == {"error", "detail"}
        assert model.calls == []
        good = client.post("/v1/classify", json={"texts": ["ab", "c"]})
        assert good.status_code == 200
        assert good.json() == {
            "model": "Echo",
            "results": [{"text": "ab", "label": 0, "length": 2}, {"text": "c", "label": 1, "length": 1}],
        }
        errors = client.get("/metrics").text
    assert re.search(r'probekit_serve_errors_total\{endpoint="/v1/classify",error="\w+"\} 1.0', errors)


def test_a_full_queue_answers_503_with_retry_after() -> None:
    model = Blocking()
    app = create_app(model, queue_size=1, max_wait_ms=0)

    async def scenario() -> tuple[Any, Any, Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            first = asyncio.create_task(client.post("/v1/classify", json={"text": "one"}))
            assert await asyncio.to_thread(model.entered.wait, 10)  # the worker is busy with it
            second = asyncio.create_task(client.post("/v1/classify", json={"text": "two"}))
            for _ in range(500):
                if app.state.batcher.pending == 1:  # "two" waits in the queue
                    break
                await asyncio.sleep(0.01)
            third = await client.post("/v1/classify", json={"text": "three"})
            model.release.set()
            return await first, await second, third

    try:
        first, second, third = asyncio.run(scenario())
    finally:
        model.release.set()
        app.state.batcher.close(10)
    assert third.status_code == 503 and third.headers["retry-after"] == "1"
    assert third.json()["error"] == "queue_full"
    assert [first.status_code, second.status_code] == [200, 200]
    assert first.json()["results"][0]["text"] == "one" and second.json()["results"][0]["text"] == "two"


def test_the_bearer_token_guards_classify_and_metrics_not_healthz() -> None:
    with TestClient(create_app(Echo(), token="s3cret-token")) as client:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic s3cret-token"}):
            refused = client.post("/v1/classify", json={"text": "a"}, headers=headers)
            assert refused.status_code == 401 and refused.json()["error"] == "unauthorized"
            assert refused.headers["www-authenticate"] == "Bearer"
            assert client.get("/metrics", headers=headers).status_code == 401
        # no body is read before the token is checked: a malformed one is still a 401
        assert client.post("/v1/classify", content=b"{").status_code == 401
        right = {"Authorization": "Bearer s3cret-token"}
        assert client.post("/v1/classify", json={"text": "a"}, headers=right).status_code == 200
        assert client.get("/metrics", headers=right).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


def test_metrics_and_the_openapi_schema() -> None:
    with TestClient(create_app(Echo())) as client:
        assert client.post("/v1/classify", json={"texts": ["a", "b", "c"]}).status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}
        response = client.get("/metrics")
        assert response.headers["content-type"].startswith("text/plain")
        text = response.text
        schema = client.get("/openapi.json").json()
        assert client.get("/docs").status_code == 200
    assert metric(text, 'probekit_serve_requests_total{endpoint="/v1/classify",status="200"}') == 1
    assert metric(text, 'probekit_serve_requests_total{endpoint="/healthz",status="200"}') == 1
    for name in ("request_duration_seconds", "batch_texts", "batch_requests", "inference_seconds"):
        assert f"# TYPE probekit_serve_{name} histogram" in text
    assert metric(text, "probekit_serve_batch_texts_sum") == 3
    assert metric(text, "probekit_serve_queue_texts") == 0
    assert "# TYPE probekit_serve_errors_total counter" in text
    assert "/v1/classify" in schema["paths"] and "post" in schema["paths"]["/v1/classify"]


def test_a_probe_error_fails_only_its_own_request() -> None:
    class Picky(Echo):
        def predict(self, texts: list[str], batch_size: int = 64) -> list[dict[str, Any]]:
            if "bad" in texts:
                raise RuntimeError("no")
            return super().predict(texts, batch_size)

    app = create_app(Picky(), max_wait_ms=200)

    async def ask() -> list[Any]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            bodies = [{"texts": ["ok", "fine"]}, {"text": "bad"}, {"text": "good"}]
            return await asyncio.gather(*(client.post("/v1/classify", json=body) for body in bodies))

    try:
        ok, bad, good = asyncio.run(ask())
    finally:
        app.state.batcher.close(10)
    assert ok.status_code == 200 and good.status_code == 200
    assert [row["text"] for row in ok.json()["results"]] == ["ok", "fine"]
    assert bad.status_code == 500 and bad.json()["error"] == "predict_failed"


# -- the command -------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_sigterm_under_load_answers_every_accepted_request(trained: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "probekit", "serve", str(trained), "--port", str(port)]
    command += ["--max-wait-ms", "3000", "--max-batch", "256"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results: dict[int, Any] = {}
    try:
        deadline = time.monotonic() + 90
        while True:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        asked = [TEXTS[i % len(TEXTS) : i % len(TEXTS) + 1 + i % 2] for i in range(12)]

        def ask(i: int) -> None:
            try:
                results[i] = httpx.post(f"{base}/v1/classify", json={"texts": asked[i]}, timeout=30)
            except httpx.HTTPError as exc:
                results[i] = exc

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asked))]
        for thread in threads:
            thread.start()
        waiting = 0.0
        while waiting != sum(len(t) for t in asked):  # every request accepted and queued
            assert time.monotonic() < deadline, waiting
            waiting = metric(httpx.get(f"{base}/metrics", timeout=5).text, "probekit_serve_queue_texts")
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(40)
        code = process.wait(40)
        _, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate(timeout=10)
    assert code == 0, err
    assert "Traceback" not in err, err
    for i, texts in enumerate(asked):
        response = results[i]
        assert isinstance(response, httpx.Response), response
        assert response.status_code == 200, response.text
        assert [row["text"] for row in response.json()["results"]] == texts


@pytest.mark.parametrize("content", [None, "", " \n"])
def test_a_missing_or_empty_token_file_is_one_line(
    content: str | None, trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    code, out, err = run_cli(capsys, "serve", str(trained), "--token-file", str(token))
    assert_one_line_error(code, out, err, "--token-file", "no such file" if content is None else "empty")


def test_a_bad_setting_is_one_line(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(capsys, "serve", str(trained), "--max-batch", "0")
    assert_one_line_error(code, out, err, "--max-batch 0")


def test_a_missing_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    with pytest.raises(UserError, match=re.escape(EXTRA_MISSING)):
        require_extra()


def test_the_command_line_imports_no_server_package() -> None:
    code = (
        "import sys, probekit, probekit.cli\n"
        "print(sorted({'fastapi', 'uvicorn', 'prometheus_client'} & set(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "[]"
