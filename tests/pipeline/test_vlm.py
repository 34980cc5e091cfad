"""The VLM captioner against a scripted loopback server: retries, failures, cache, key handling, concurrency."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from pipeline.curation.vlm import VlmCaptioner, VlmConfig, VlmRequest, VlmResult, cache_key, render_prompt
from pipeline.errors import ParamsError
from tests.vlm_server import (
    VlmServer,
    empty_content,
    expected_caption,
    hang,
    no_choices,
    not_json,
    ok,
    status,
    vlm_server,
)

PROMPT = "Hints: gsd={gsd}; location={location}; scene={scene_class}."
KEY_ENV = "T2E_TEST_VLM_KEY"
SECRET = "sk-test-0123456789abcdefSECRET"


@pytest.fixture()
def server() -> Iterator[VlmServer]:
    with vlm_server() as srv:
        yield srv


def _config(base_url: str, **overrides: Any) -> VlmConfig:
    values: dict[str, Any] = {
        "base_url": base_url, "model": "test-vlm", "api_key_env": None, "prompt": PROMPT, "max_concurrency": 4,
        "max_retries": 3, "backoff_s": 0.01, "max_backoff_s": 0.05, "timeout_s": 2.0,
    }
    values.update(overrides)
    return VlmConfig(**values)


def _req(n: int, fmt: str = "jpg", **hints: str | None) -> VlmRequest:
    image = bytes([n % 256]) * (100 + n)
    return VlmRequest(image, fmt, hashlib.sha256(image).hexdigest(), hints)


def _caption(config: VlmConfig, requests: list[VlmRequest], cache_dir: str | None = None) -> list[VlmResult]:
    with VlmCaptioner(config, cache_dir) as captioner:
        return captioner.caption(requests)


def _expected(req: VlmRequest, model: str = "test-vlm", prompt: str = PROMPT) -> str:
    mime = "image/png" if req.image_format == "png" else "image/jpeg"
    return expected_caption(model, req.image, mime, render_prompt(prompt, req.hints))


# -- prompt and key -------------------------------------------------------------------------------


def test_render_prompt_fills_hints_and_unknown() -> None:
    text = render_prompt(PROMPT, {"gsd": "0.5 m", "location": None, "sensor": "x", "other": "ignored"})
    assert text == "Hints: gsd=0.5 m; location=unknown; scene=unknown."
    assert "unknown" in render_prompt(VlmConfig(base_url="http://x/v1", model="m").prompt, {})


@pytest.mark.parametrize("prompt, named", [
    ("Describe {place} at {gsd}", "{place}"),
    ("Describe {} please", "positional"),
    ("Describe {gsd.unit}", "{gsd.unit}"),
])
def test_unknown_placeholder_rejected_at_validation(prompt: str, named: str) -> None:
    with pytest.raises(ValueError, match="placeholder") as info:
        VlmConfig(base_url="http://x/v1", model="m", prompt=prompt)
    assert named in str(info.value) and "{scene_class}" in str(info.value)


def test_malformed_prompt_and_url_rejected() -> None:
    with pytest.raises(ValueError, match="format string"):
        VlmConfig(base_url="http://x/v1", model="m", prompt="Describe {gsd")
    with pytest.raises(ValueError, match="http"):
        VlmConfig(base_url="localhost:8000/v1", model="m")
    with pytest.raises(ValueError, match="extra"):
        VlmConfig(base_url="http://x/v1", model="m", max_retry=3)  # type: ignore[call-arg]


def test_cache_key_is_unambiguous() -> None:
    key = cache_key("ab", "c", "d")
    assert len(key) == 64 and key == cache_key("ab", "c", "d")
    assert key != cache_key("a", "bc", "d") and key != cache_key("ab", "cd", "")


# -- happy path -----------------------------------------------------------------------------------


def test_concurrent_batch_keeps_order_and_sends_the_right_request(server: VlmServer) -> None:
    requests = [_req(i, "png" if i % 3 == 0 else "jpg", gsd=f"{i} m", location="France, Europe") for i in range(10)]
    for i, req in enumerate(requests):
        server.script_image(req.image, ok(delay_s=0.01 * (10 - i)))  # later images finish first
    results = _caption(_config(server.base_url, max_tokens=77, temperature=0.2), requests)
    assert [r.caption for r in results] == [_expected(r) for r in requests]
    assert all(r.reason is None and not r.cached and r.detail == "ok after 1 attempt" for r in results)
    assert server.calls() == 10 and server.max_in_flight > 1
    by_image = {rec.image[1]: rec for rec in server.requests if rec.image}
    for req in requests:
        rec = by_image[req.image]
        assert rec.path == "/v1/chat/completions"
        assert rec.body["model"] == "test-vlm" and rec.body["max_tokens"] == 77 and rec.body["temperature"] == 0.2
        assert rec.image == ("image/png" if req.image_format == "png" else "image/jpeg", req.image)
        assert rec.prompt == render_prompt(PROMPT, req.hints) and "France, Europe" in (rec.prompt or "")
        assert "authorization" not in rec.headers


def test_empty_batch_and_bad_format() -> None:
    config = _config("http://127.0.0.1:9/v1")
    assert _caption(config, []) == []
    with pytest.raises(ValueError, match="image_format"):
        _caption(config, [_req(1, "tif")])


# -- retries --------------------------------------------------------------------------------------


def test_429_then_success(server: VlmServer) -> None:
    server.script(status(429), status(429))
    [result] = _caption(_config(server.base_url), [_req(1)])
    assert result.caption == _expected(_req(1)) and result.detail == "ok after 3 attempts"
    assert server.calls() == 3


def test_retry_after_is_honoured(server: VlmServer) -> None:
    server.script(status(429, retry_after="0.3"))
    [result] = _caption(_config(server.base_url, max_backoff_s=5.0), [_req(1)])
    assert result.caption is not None
    first, second = server.requests
    assert second.at - first.at >= 0.3


@pytest.mark.parametrize("retry_after", [
    "3600",
    email.utils.formatdate(time.time() + 3600, usegmt=True),
])
def test_retry_after_is_capped(server: VlmServer, retry_after: str) -> None:
    server.script(status(429, retry_after=retry_after), status(503, retry_after=retry_after))
    start = time.monotonic()
    [result] = _caption(_config(server.base_url, max_backoff_s=0.05), [_req(1)])
    assert result.caption is not None and server.calls() == 3
    assert time.monotonic() - start < 2.0


def test_5xx_then_success(server: VlmServer) -> None:
    server.script(status(500), status(503), status(502))
    [result] = _caption(_config(server.base_url, max_retries=3), [_req(1)])
    assert result.caption == _expected(_req(1)) and result.reason is None and server.calls() == 4


def test_persistent_500_is_a_failed_result(server: VlmServer, caplog: pytest.LogCaptureFixture) -> None:
    server.default = status(500)
    caplog.set_level(logging.DEBUG, logger="pipeline.curation.vlm")
    [result] = _caption(_config(server.base_url, max_retries=2), [_req(1)])
    assert result.caption is None and result.reason == "vlm_failed" and not result.cached
    assert "HTTP 500" in result.detail and "3 attempts" in result.detail
    assert server.calls() == 3
    levels = [r.levelno for r in caplog.records if r.name == "pipeline.curation.vlm"]
    assert levels.count(logging.DEBUG) == 2 and levels.count(logging.WARNING) == 1


def test_client_error_is_not_retried(server: VlmServer) -> None:
    server.default = status(400, body='{"error": {"message": "image too large"}}')
    [result] = _caption(_config(server.base_url), [_req(1)])
    assert result.reason == "vlm_failed" and "HTTP 400" in result.detail and "image too large" in result.detail
    assert "1 attempt)" in result.detail and server.calls() == 1


def test_timeout_retried_then_success(server: VlmServer) -> None:
    server.script(hang(2.0))
    [result] = _caption(_config(server.base_url, timeout_s=0.1), [_req(1)])
    assert result.caption == _expected(_req(1)) and server.calls() == 2


def test_timeout_then_failure(server: VlmServer) -> None:
    server.default = hang(2.0)
    start = time.monotonic()
    [result] = _caption(_config(server.base_url, timeout_s=0.1, max_retries=1), [_req(1)])
    assert result.reason == "vlm_failed" and "timeout" in result.detail and "2 attempts" in result.detail
    assert server.calls() == 2 and time.monotonic() - start < 1.5


def test_connection_error_is_a_failed_result() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    [result] = _caption(_config(f"http://127.0.0.1:{port}/v1", max_retries=1), [_req(1)])
    assert result.reason == "vlm_failed" and "connection error" in result.detail


@pytest.mark.parametrize("bad", [not_json(), no_choices(), empty_content()], ids=lambda a: a.kind)
def test_malformed_replies(server: VlmServer, bad: Any) -> None:
    server.default = bad
    [result] = _caption(_config(server.base_url, max_retries=2), [_req(1)])
    assert result.caption is None and result.reason == "vlm_bad_reply" and "3 attempts" in result.detail
    assert server.calls() == 3
    server.default = ok()
    server.script(bad)
    [result] = _caption(_config(server.base_url, max_retries=2), [_req(1)])
    assert result.caption == _expected(_req(1))


def test_one_failing_image_does_not_spoil_the_batch(server: VlmServer) -> None:
    requests = [_req(i) for i in range(5)]
    server.script_image(requests[2].image, *[status(500)] * 10)
    results = _caption(_config(server.base_url, max_retries=2), requests)
    assert [r.reason for r in results] == [None, None, "vlm_failed", None, None]
    assert [r.caption for r in results] == [_expected(r) if i != 2 else None for i, r in enumerate(requests)]


# -- cache ----------------------------------------------------------------------------------------


def test_cache_hit_makes_no_request(server: VlmServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    requests = [_req(i, gsd="1 m") for i in range(3)]
    first = _caption(_config(server.base_url), requests, cache)
    assert server.calls() == 3 and not any(r.cached for r in first)
    second = _caption(_config(server.base_url), requests, cache)
    assert server.calls() == 3
    assert all(r.cached and r.reason is None for r in second)
    assert [r.caption for r in second] == [r.caption for r in first]
    key = cache_key(requests[0].sha256, "test-vlm", render_prompt(PROMPT, requests[0].hints))
    doc = json.loads((tmp_path / "cache" / key[:2] / f"{key}.json").read_text())
    assert doc == {"caption": first[0].caption, "model": "test-vlm", "created_by": "text2earth"}
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 3


def test_prompt_model_or_hints_change_misses_the_cache(server: VlmServer, tmp_path: Path) -> None:
    cache = str(tmp_path / "cache")
    _caption(_config(server.base_url), [_req(1, gsd="1 m")], cache)
    [r] = _caption(_config(server.base_url, prompt="Other prompt {gsd}"), [_req(1, gsd="1 m")], cache)
    assert not r.cached and server.calls() == 2
    [r] = _caption(_config(server.base_url, model="other-vlm"), [_req(1, gsd="1 m")], cache)
    assert not r.cached and server.calls() == 3 and r.caption == _expected(_req(1, gsd="1 m"), "other-vlm")
    [r] = _caption(_config(server.base_url), [_req(1, gsd="2 m")], cache)
    assert not r.cached and server.calls() == 4


def test_failures_are_not_cached(server: VlmServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    server.default = status(500)
    [r] = _caption(_config(server.base_url, max_retries=0), [_req(1)], str(cache))
    assert r.reason == "vlm_failed" and not list(cache.rglob("*.json"))
    server.default = ok()
    [r] = _caption(_config(server.base_url), [_req(1)], str(cache))
    assert r.caption is not None and not r.cached and server.calls() == 2


def test_corrupt_cache_entry_is_a_miss(server: VlmServer, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    _caption(_config(server.base_url), [_req(1)], str(cache))
    [entry] = cache.rglob("*.json")
    entry.write_text("{not json")
    [r] = _caption(_config(server.base_url), [_req(1)], str(cache))
    assert not r.cached and r.caption == _expected(_req(1)) and server.calls() == 2
    [r] = _caption(_config(server.base_url), [_req(1)], str(cache))
    assert r.cached and server.calls() == 2


def test_cache_on_an_fsspec_url(server: VlmServer) -> None:
    cache = "memory://t2e-vlm-test-cache"
    try:
        _caption(_config(server.base_url), [_req(1)], cache)
        [r] = _caption(_config(server.base_url), [_req(1)], cache)
        assert r.cached and server.calls() == 1
    finally:
        fs = fsspec.filesystem("memory")
        if fs.exists("/t2e-vlm-test-cache"):
            fs.rm("/t2e-vlm-test-cache", recursive=True)


def test_no_cache_dir_means_no_cache(server: VlmServer) -> None:
    _caption(_config(server.base_url), [_req(1)])
    [r] = _caption(_config(server.base_url), [_req(1)])
    assert not r.cached and server.calls() == 2


# -- API key --------------------------------------------------------------------------------------


def test_key_is_sent_as_bearer_and_never_leaks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    caplog.set_level(logging.DEBUG)
    cache = tmp_path / "cache"
    requests = [_req(i) for i in range(4)]
    with vlm_server(api_key=SECRET) as srv:
        srv.script_image(requests[1].image, status(500, echo_auth=True), status(429))
        srv.script_image(requests[3].image, *[status(503, echo_auth=True)] * 5)
        results = _caption(_config(srv.base_url, api_key_env=KEY_ENV, max_retries=2), requests, str(cache))
        assert all(rec.headers["authorization"] == f"Bearer {SECRET}" for rec in srv.requests)
        echoed = [rec for rec in srv.requests if rec.image and rec.image[1] == requests[3].image]
        assert len(echoed) == 3
    assert [r.reason for r in results] == [None, None, None, "vlm_failed"]
    assert "***" in results[3].detail  # the server echoed the key; the detail masks it
    assert SECRET not in repr(results)
    assert caplog.records and any(r.levelno == logging.WARNING for r in caplog.records)
    for record in caplog.records:
        assert SECRET not in record.getMessage() and SECRET not in (record.exc_text or "")
        assert base64.b64encode(requests[0].image).decode() not in record.getMessage()
    assert SECRET not in caplog.text
    files = list(cache.rglob("*"))
    assert files and all(SECRET not in f.read_text() for f in files if f.is_file())


def test_wrong_key_fails_without_retry_and_without_echo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    with vlm_server(api_key="sk-the-right-one") as srv:
        [r] = _caption(_config(srv.base_url, api_key_env=KEY_ENV), [_req(1)])
        assert srv.calls() == 1
    assert r.reason == "vlm_failed" and "HTTP 401" in r.detail and SECRET not in r.detail


def test_key_not_in_exceptions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, SECRET)
    captioner = VlmCaptioner(_config("http://127.0.0.1:9/v1", api_key_env=KEY_ENV), None)
    captioner.close()
    with pytest.raises(Exception) as info:  # a closed client refuses to send
        captioner.caption([_req(1)])
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert SECRET not in repr(captioner.__dict__.get("_client"))


@pytest.mark.parametrize("value", [None, "", "  "])
def test_missing_key_env_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv(KEY_ENV, raising=False)
    else:
        monkeypatch.setenv(KEY_ENV, value)
    with pytest.raises(ParamsError, match=KEY_ENV) as info:
        VlmCaptioner(_config("http://127.0.0.1:9/v1", api_key_env=KEY_ENV), None)
    assert "api_key_env: null" in str(info.value) and "export" in str(info.value)


# -- concurrency ----------------------------------------------------------------------------------


def test_concurrency_limit_is_respected(server: VlmServer) -> None:
    server.default = ok(delay_s=0.05)
    results = _caption(_config(server.base_url, max_concurrency=3), [_req(i) for i in range(12)])
    assert all(r.caption for r in results) and server.calls() == 12
    assert server.max_in_flight == 3
