"""Caption images with a vision-language model behind an OpenAI-compatible chat-completions endpoint.

Remote captioning is slow, rate-limited and flaky, so requests run concurrently, retry with capped
backoff, never raise for one bad image, and successes are cached so a rerun costs no API calls.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import json
import logging
import os
import string
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline import storage
from pipeline.errors import ParamsError

logger = logging.getLogger(__name__)

HINT_NAMES = ("gsd", "location", "sensor", "acquired", "scene_class")
UNKNOWN = "unknown"

DEFAULT_PROMPT = (
    "Describe this remote-sensing image in one factual paragraph of about 50 words, in plain prose with no "
    "lists, headings or preamble. Say what is actually visible: land cover and land use, the main objects and "
    "structures, their layout, colours and textures. Context, to use only where it agrees with the image "
    "(ignore any value given as unknown): ground sample distance {gsd}; location {location}; sensor {sensor}; "
    "acquired {acquired}; scene class {scene_class}. Do not invent details that are not visible."
)

_MIME = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png"}
_RETRYABLE_STATUS = frozenset({408, 409, 425, 429})
_SNIPPET = 200


def _check_template(template: str) -> None:
    """Raise ValueError unless every placeholder of `template` is one of HINT_NAMES and it renders."""
    allowed = ", ".join("{" + n + "}" for n in HINT_NAMES)
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"prompt is not a valid format string ({exc}); write literal braces as {{{{ and }}}}") from exc
    for name in fields:
        if name not in HINT_NAMES:
            shown = "{" + name + "}" if name else "{} (positional)"
            raise ValueError(f"prompt placeholder {shown} is unknown; allowed placeholders: {allowed}")
    try:
        template.format_map(dict.fromkeys(HINT_NAMES, UNKNOWN))
    except (ValueError, KeyError, IndexError) as exc:
        raise ValueError(f"prompt does not render with text hints ({exc}); allowed placeholders: {allowed}") from exc


class _HintValues(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return UNKNOWN


def render_prompt(template: str, hints: Mapping[str, str | None]) -> str:
    """Fill the prompt's placeholders from `hints`; a missing, None or blank hint renders as "unknown"."""
    _check_template(template)
    values = _HintValues({k: v.strip() for k, v in hints.items() if k in HINT_NAMES and v and v.strip()})
    return template.format_map(values)


def cache_key(sha256: str, model: str, prompt: str) -> str:
    """Hex sha256 identifying one (image, model, rendered prompt) caption."""
    doc = json.dumps(["text2earth.vlm/1", sha256, model, prompt], ensure_ascii=False)
    return hashlib.sha256(doc.encode("utf-8")).hexdigest()


class VlmConfig(BaseModel):
    """Where and how to ask an OpenAI-compatible vision-language model for captions."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = Field(description="API root, e.g. https://api.openai.com/v1 or http://localhost:8000/v1.")
    model: str = Field(min_length=1, description="Model name sent with every request, e.g. gpt-4o.")
    api_key_env: str | None = Field(default="OPENAI_API_KEY", description="Env var with the key; null = no auth.")
    prompt: str = Field(default=DEFAULT_PROMPT, description="Format string over the hints.")
    max_concurrency: int = Field(default=8, ge=1, description="Simultaneous requests per worker.")
    max_retries: int = Field(default=5, ge=0, description="Retries on 429, 5xx, timeouts, bad replies.")
    backoff_s: float = Field(default=1.0, ge=0, description="First retry delay; doubles each retry.")
    max_backoff_s: float = Field(default=60.0, ge=0, description="Cap on one retry delay, Retry-After included.")
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout.")
    max_tokens: int = Field(default=160, ge=1)
    temperature: float = Field(default=0.0, ge=0, le=2)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"{value!r} is not an http(s) URL; write e.g. https://api.openai.com/v1")
        return value

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("api_key_env is empty; name an environment variable, or write null for no auth")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        _check_template(value)
        return value


@dataclass(frozen=True)
class VlmRequest:
    """One image to caption, with the hints its prompt is filled from."""

    image: bytes
    image_format: str
    sha256: str
    hints: Mapping[str, str | None]


@dataclass(frozen=True)
class VlmResult:
    """A caption, or why there is none (`reason` "vlm_failed" or "vlm_bad_reply")."""

    caption: str | None
    reason: str | None
    detail: str
    cached: bool


@dataclass(frozen=True)
class _Failure:
    reason: str
    detail: str
    retryable: bool
    retry_after: float | None = None


class VlmCaptioner:
    """Captions batches of images concurrently through one shared HTTP client, with retries and a cache."""

    def __init__(self, config: VlmConfig, cache_dir: str | None) -> None:
        self.config = config
        self.cache_dir = cache_dir
        self._api_key: str | None = None
        headers = {"User-Agent": "text2earth"}
        if config.api_key_env is not None:
            key = os.environ.get(config.api_key_env, "").strip()
            if not key:
                raise ParamsError(
                    f"VLM captioning needs an API key in the environment variable {config.api_key_env}, which is "
                    f"not set or empty: export {config.api_key_env}=<key>, or set api_key_env: null for a server "
                    "that needs no key"
                )
            self._api_key = key
            headers["Authorization"] = f"Bearer {key}"
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        limits = httpx.Limits(max_connections=config.max_concurrency, max_keepalive_connections=config.max_concurrency)
        self._client = httpx.Client(headers=headers, timeout=httpx.Timeout(config.timeout_s), limits=limits)

    def __enter__(self) -> VlmCaptioner:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP client; the captioner cannot be used afterwards."""
        self._client.close()

    def caption(self, requests: Sequence[VlmRequest]) -> list[VlmResult]:
        """One result per request, in request order; per-image failures become failed results, not exceptions."""
        for req in requests:
            if req.image_format.lower() not in _MIME:
                raise ValueError(f"image_format {req.image_format!r} is not one of {sorted(_MIME)}")
        prompts = [render_prompt(self.config.prompt, req.hints) for req in requests]
        keys = [cache_key(req.sha256, self.config.model, p) for req, p in zip(requests, prompts, strict=True)]
        results: list[VlmResult | None] = [self._cache_get(k) for k in keys]
        todo = [i for i, r in enumerate(results) if r is None]
        if todo:
            workers = min(self.config.max_concurrency, len(todo))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlm") as pool:
                fresh = pool.map(lambda i: self._caption_one(requests[i], prompts[i], keys[i]), todo)
                for i, result in zip(todo, fresh, strict=True):
                    results[i] = result
        return [r for r in results if r is not None]

    # -- one image -------------------------------------------------------------------------------

    def _caption_one(self, req: VlmRequest, prompt: str, key: str) -> VlmResult:
        body = self._body(req, prompt)
        attempts = self.config.max_retries + 1
        failure: _Failure | None = None
        for attempt in range(1, attempts + 1):
            outcome = self._attempt(body)
            if isinstance(outcome, str):
                self._cache_put(key, outcome)
                return VlmResult(outcome, None, f"ok after {attempt} attempt{'s' if attempt > 1 else ''}", False)
            failure = outcome
            if not failure.retryable or attempt == attempts:
                break
            delay = self._delay(key, attempt, failure.retry_after)
            logger.debug("VLM attempt %d/%d for image %s failed (%s); retrying in %.2fs",
                         attempt, attempts, req.sha256[:12], failure.detail, delay)
            time.sleep(delay)
        assert failure is not None
        detail = f"{failure.detail} (after {attempt} attempt{'s' if attempt > 1 else ''})"
        logger.warning("VLM caption failed for image %s: %s: %s", req.sha256[:12], failure.reason, detail)
        return VlmResult(None, failure.reason, detail, False)

    def _body(self, req: VlmRequest, prompt: str) -> dict[str, Any]:
        data_url = f"data:{_MIME[req.image_format.lower()]};base64,{base64.b64encode(req.image).decode('ascii')}"
        content = [{"type": "text", "text": prompt}, {"type": "image_url", "image_url": {"url": data_url}}]
        return {
            "model": self.config.model,
            "messages": [{"role": "user", "content": content}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }

    def _attempt(self, body: dict[str, Any]) -> str | _Failure:
        """One POST: the stripped caption, or what went wrong and whether to retry."""
        try:
            resp = self._client.post(self._url, json=body)
        except httpx.TimeoutException as exc:
            return _Failure("vlm_failed", f"timeout after {self.config.timeout_s:g}s ({type(exc).__name__})", True)
        except httpx.RequestError as exc:
            return _Failure("vlm_failed", self._scrub(f"connection error: {type(exc).__name__}: {exc}"), True)
        status = resp.status_code
        if not 200 <= status < 300:
            retryable = status in _RETRYABLE_STATUS or status >= 500
            retry_after = _retry_after(resp.headers.get("Retry-After")) if status in (429, 503) else None
            return _Failure("vlm_failed", f"HTTP {status}: {self._snippet(resp.text)}", retryable, retry_after)
        try:
            doc = resp.json()
        except ValueError:
            return _Failure("vlm_bad_reply", f"reply is not JSON: {self._snippet(resp.text)}", True)
        content = _message_content(doc)
        if content is None:
            return _Failure("vlm_bad_reply", f"reply has no choices[0].message.content: {self._snippet(resp.text)}",
                            True)
        if not content.strip():
            return _Failure("vlm_bad_reply", "reply caption is empty", True)
        return content.strip()

    def _delay(self, key: str, attempt: int, retry_after: float | None) -> float:
        """Seconds before retry `attempt`+1: Retry-After if given, else exponential with deterministic jitter."""
        cap = self.config.max_backoff_s
        if retry_after is not None:
            return min(retry_after, cap)
        spread = int(hashlib.sha256(f"{key}:{attempt}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        return min(self.config.backoff_s * 2 ** (attempt - 1) * (1 + 0.25 * spread), cap)

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "***") if self._api_key else text

    def _snippet(self, text: str) -> str:
        flat = " ".join(text.split())
        flat = flat if len(flat) <= _SNIPPET else flat[:_SNIPPET] + "..."
        return self._scrub(flat) or "(empty body)"

    # -- cache -----------------------------------------------------------------------------------

    def _cache_url(self, key: str) -> str | None:
        return None if self.cache_dir is None else storage.join(self.cache_dir, key[:2], f"{key}.json")

    def _cache_get(self, key: str) -> VlmResult | None:
        url = self._cache_url(key)
        if url is None:
            return None
        try:
            doc = json.loads(storage.read_bytes(url))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.debug("VLM cache entry %s unreadable (%s); asking the model again", url, exc)
            return None
        caption = doc.get("caption") if isinstance(doc, dict) else None
        if not isinstance(caption, str) or not caption.strip() or doc.get("model") != self.config.model:
            logger.debug("VLM cache entry %s is not a caption for %s; asking the model again", url, self.config.model)
            return None
        return VlmResult(caption, None, "cache hit", True)

    def _cache_put(self, key: str, caption: str) -> None:
        url = self._cache_url(key)
        if url is None:
            return
        doc = {"caption": caption, "model": self.config.model, "created_by": "text2earth"}
        try:
            with storage.atomic_write(url) as tmp, open(tmp, "w", encoding="utf-8") as fh:
                json.dump(doc, fh, ensure_ascii=False)
        except OSError as exc:
            logger.warning("could not write VLM cache entry %s: %s", url, exc)


def _message_content(doc: Any) -> str | None:
    """choices[0].message.content as text (a string, or a list of text parts), or None when absent."""
    try:
        content = doc["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        return None
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [str(p["text"]) for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)]
        return "".join(parts) if parts else None
    return None


def _retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta seconds or an HTTP date), or None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())
