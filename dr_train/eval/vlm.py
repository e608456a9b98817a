"""Relation Accuracy with a vision-language model (paper Sec. 4.1 and appendix A.1).

Five keyframes of a generated video, evenly spaced with the first and last included, go as base64 data-URL images
to any OpenAI-compatible chat-completions endpoint (DashScope's compatible mode for qwen-vl-max, vLLM, OpenAI)
together with a yes/no question about the relation; the question is asked `repeats` times with sampling on and
the yes-rate is the fraction of answers whose first word is "yes". Definitions: docs/metrics_relation.md.

The API key is read from an environment variable at each request and only ever placed in the request's
Authorization header (not carried over redirects); it is never stored on the client, logged, written into results
or quoted in errors. Whatever the server sends back (answers, error bodies, reasons) is redacted before it is
returned, logged or quoted, so a server that echoes the request cannot leak the key either (the key as sent, and
JSON-, URL- and base64-encoded). Only the standard library is used for HTTP.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import os
import random
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Sequence

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

# The paper's question (appendix A.1), "{}" is the relation name (the catalog's `verb`, e.g. "handshaking").
PAPER_TEMPLATE = ("Based on the keyframes of the video, analyze whether the two subjects are performing human-like "
                  "{} interactions. The answer should be 'yes' or 'no'.")
# A shorter question, "{}" is a relation phrase ("shaking hands").
SHORT_TEMPLATE = "Does this video show {}? Answer yes or no."
DEFAULT_KEY_ENV = "DR_TRAIN_VLM_API_KEY"
KEYFRAMES = 5
IMAGE_FORMATS = ("jpeg", "png")
_MAX_DELAY = 60.0          # seconds: cap of one backoff delay, Retry-After included
_ERROR_BODY_CHARS = 300    # how much of a server's error body an exception quotes
_ERROR_BODY_READ = 1 << 16  # how much of it is read (and redacted as a whole) before that cut


class VLMError(RuntimeError):
    """A request to the VLM endpoint failed for good (a 4xx other than 429, or retries exhausted)."""


# ------------------------------------------------------------------------------------------ inputs

def keyframe_indices(num_frames: int, count: int = KEYFRAMES) -> list[int]:
    """`count` frame indices evenly spaced over the video, first and last included (all frames if fewer)."""
    if num_frames < 1 or count < 1:
        raise ValueError(f"need at least one frame and one keyframe, got {num_frames} frames, {count} keyframes")
    if num_frames <= count:
        return list(range(num_frames))
    return [int(i) for i in np.linspace(0, num_frames - 1, count).round()]


def encode_image(frame_HWC: np.ndarray, image_format: str = "jpeg", quality: int = 90) -> str:
    """uint8 (H, W, 3) RGB -> `data:image/...;base64,...` URL."""
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
    buffer = io.BytesIO()
    image = Image.fromarray(np.ascontiguousarray(frame_HWC), mode="RGB")
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format="PNG")
    return f"data:image/{image_format};base64,{base64.b64encode(buffer.getvalue()).decode('ascii')}"


def video_keyframes(frames_FHWC: np.ndarray, count: int = KEYFRAMES) -> tuple[list[int], np.ndarray]:
    """(indices, uint8 (K, H, W, 3) keyframes) of a uint8 video."""
    frames = np.asarray(frames_FHWC)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or not len(frames):
        raise ValueError(f"expected uint8 (F, H, W, 3) frames, got {frames.dtype} {frames.shape}")
    indices = keyframe_indices(len(frames), count)
    return indices, frames[indices]


def catalog_phrase(relation) -> str:
    """The phrase a question names for a catalog `Relation`: its `verb` ("handshaking"), else its prompt."""
    phrase = (getattr(relation, "verb", "") or getattr(relation, "prompt", "")).strip().rstrip(".")
    if not phrase:
        raise ValueError(f"relation {getattr(relation, 'name', relation)!r} has neither a verb nor a prompt")
    return phrase


def make_question(template: str, phrase: str) -> str:
    if template.count("{}") != 1:
        raise ValueError(f"the question template needs exactly one '{{}}' for the relation phrase: {template!r}")
    if not phrase.strip():
        raise ValueError("the relation phrase is empty")
    return template.replace("{}", phrase.strip())


def parse_answer(text: str) -> str:
    """'yes', 'no' or 'other': the answer's first word, case-insensitive, after leading punctuation, quotes and
    markdown ("**Yes**, ..." -> yes; "Yesterday" and "Maybe" -> other)."""
    match = re.match(r"[\W_]*([a-z]+)", text.strip().lower())
    word = match.group(1) if match else ""
    return word if word in ("yes", "no") else "other"


# ------------------------------------------------------------------------------------------ the client

def _endpoint(base_url: str) -> str:
    parts = urllib.parse.urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"VLM base_url must be an http(s) URL, got {base_url!r}")
    if parts.username or parts.password or parts.query or parts.fragment:
        raise ValueError("VLM base_url must not carry credentials, a query or a fragment; the API key comes from "
                         "an environment variable")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path += "/chat/completions"
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _secret_forms(secret: str) -> list[str]:
    """The ways an echoing server may spell the secret: as sent, JSON-escaped, URL-quoted, base64; longest first."""
    forms = {secret, json.dumps(secret)[1:-1], urllib.parse.quote(secret, safe=""), urllib.parse.quote_plus(secret),
             base64.b64encode(secret.encode("utf-8")).decode("ascii")}
    return sorted((f for f in forms if f), key=len, reverse=True)


def _redact(text: str, secret: str | None) -> str:
    """`text` with every form of `secret` replaced by '***' (the whole text first, so no cut can split the key)."""
    if not secret:
        return text
    for form in _secret_forms(secret):
        text = text.replace(form, "***")
    return text


class VLMClient:
    """Chat-completions client for yes/no questions about images.

    base_url: the API root (".../v1") or the full ".../chat/completions" URL, without credentials.
    api_key_env: environment variable holding the API key (sent as a Bearer token); None for servers without auth.
    temperature: sampling temperature (the metric samples); timeout: seconds per request (connect and each read).
    max_attempts: tries per question; 429, 5xx, timeouts and connection errors are retried after
        backoff * 2**(attempt - 1) seconds times a random factor in [0.5, 1.5) (at least Retry-After, at most 60 s).
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = DEFAULT_KEY_ENV,
                 temperature: float = 0.7, timeout: float = 60.0, max_attempts: int = 5, backoff: float = 1.0,
                 max_tokens: int = 16, image_format: str = "jpeg", sleep: Callable[[float], None] = time.sleep,
                 seed: int | None = None):
        if not model:
            raise ValueError("VLM model name is empty")
        if not (temperature >= 0 and timeout > 0 and max_attempts >= 1 and backoff >= 0 and max_tokens >= 1):
            raise ValueError(f"need temperature >= 0, timeout > 0, max_attempts >= 1, backoff >= 0, max_tokens >= 1;"
                             f" got {temperature}, {timeout}, {max_attempts}, {backoff}, {max_tokens}")
        if image_format not in IMAGE_FORMATS:
            raise ValueError(f"image_format must be one of {', '.join(IMAGE_FORMATS)}, got {image_format!r}")
        self.endpoint = _endpoint(base_url)
        self.model = model
        self.api_key_env = api_key_env
        self.temperature = float(temperature)
        self.timeout = float(timeout)
        self.max_attempts = int(max_attempts)
        self.backoff = float(backoff)
        self.max_tokens = int(max_tokens)
        self.image_format = image_format
        self._sleep = sleep
        self._random = random.Random(seed)
        self._api_key()                                   # fail early when the variable is unset

    def __repr__(self) -> str:
        return f"VLMClient(endpoint={self.endpoint!r}, model={self.model!r}, temperature={self.temperature})"

    def describe(self) -> dict:
        """What a score must be recorded with (no credentials)."""
        return {"model": self.model, "temperature": self.temperature, "endpoint": self.endpoint,
                "max_tokens": self.max_tokens, "image_format": self.image_format}

    def _api_key(self) -> str | None:
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise ValueError(f"the VLM API key is read from the environment variable {self.api_key_env}, which is "
                             f"unset or empty")
        return key

    def ask(self, images: Sequence[np.ndarray | str], question: str) -> str:
        """The model's answer (text) to the question about the images (uint8 (H, W, 3) frames or data URLs)."""
        if not question.strip():
            raise ValueError("the question is empty")
        urls = [im if isinstance(im, str) else encode_image(im, self.image_format) for im in images]
        content = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
        content.append({"type": "text", "text": question})
        payload = {"model": self.model, "messages": [{"role": "user", "content": content}],
                   "temperature": self.temperature, "max_tokens": self.max_tokens}
        return self._post(json.dumps(payload).encode("utf-8"))

    def _request(self, body: bytes, key: str | None) -> urllib.request.Request:
        request = urllib.request.Request(self.endpoint, data=body, method="POST",
                                         headers={"Content-Type": "application/json", "Accept": "application/json"})
        if key is not None:
            request.add_unredirected_header("Authorization", f"Bearer {key}")
        return request

    def _post(self, body: bytes) -> str:
        key = self._api_key()
        for attempt in range(1, self.max_attempts + 1):
            retry_after = 0.0
            try:
                with urllib.request.urlopen(self._request(body, key), timeout=self.timeout) as response:
                    raw = response.read()
                return self._answer(raw, key)
            except urllib.error.HTTPError as e:
                detail = _redact(e.read(_ERROR_BODY_READ).decode("utf-8", "replace"), key).strip()
                if e.code != 429 and not 500 <= e.code < 600:
                    raise VLMError(_redact(f"VLM endpoint {self.endpoint} answered HTTP {e.code} {e.reason}: ", key)
                                   + detail[:_ERROR_BODY_CHARS]) from None
                reason = f"HTTP {e.code}"
                retry_after = _seconds(e.headers.get("Retry-After") if e.headers else None)
            except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = _redact(f"{type(e).__name__}: {getattr(e, 'reason', e)}", key)
            if attempt == self.max_attempts:
                raise VLMError(f"VLM endpoint {self.endpoint}: gave up after {self.max_attempts} attempts; last "
                               f"error: {reason}") from None
            delay = min(_MAX_DELAY, max(retry_after, self.backoff * 2 ** (attempt - 1) *
                                        (0.5 + self._random.random())))
            log.warning("VLM request to %s failed (%s); attempt %d of %d, retrying in %.2f s", self.endpoint,
                        reason, attempt, self.max_attempts, delay)
            self._sleep(delay)
        raise AssertionError("unreachable")

    def _answer(self, raw: bytes, key: str | None) -> str:
        try:
            message = json.loads(raw)["choices"][0]["message"]
            content = message["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            snippet = _redact(raw.decode("utf-8", "replace"), key)[:_ERROR_BODY_CHARS]
            raise VLMError(f"VLM endpoint {self.endpoint} sent no chat completion: {snippet}") from None
        if isinstance(content, list):          # some servers answer with content parts
            content = "".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
        return _redact(str(content or ""), key)


def _seconds(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0


# ------------------------------------------------------------------------------------------ the metric

def relation_accuracy(client: VLMClient, frames_FHWC: np.ndarray, relation_phrase: str, repeats: int = 10,
                      template: str = PAPER_TEMPLATE, keyframes: int = KEYFRAMES) -> dict:
    """Ask about one video `repeats` times; yes_rate = yes answers / repeats (answers that are neither yes nor no
    count as not-yes and are reported in `other`). The record carries the settings, never the API key."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    question = make_question(template, relation_phrase)
    indices, images = video_keyframes(frames_FHWC, keyframes)
    urls = [encode_image(im, client.image_format) for im in images]
    answers = [client.ask(urls, question) for _ in range(repeats)]
    verdicts = [parse_answer(a) for a in answers]
    counts = {v: verdicts.count(v) for v in ("yes", "no", "other")}
    decided = counts["yes"] + counts["no"]
    if counts["other"]:
        log.warning("%d of %d VLM answers were neither yes nor no (counted as not yes): %s", counts["other"],
                    repeats, [a for a, v in zip(answers, verdicts) if v == "other"][:3])
    return {"yes_rate": counts["yes"] / repeats, **counts,
            "yes_rate_of_decided": counts["yes"] / decided if decided else None,
            "repeats": repeats, "answers": answers, "verdicts": verdicts, "question": question, "template": template,
            "relation_phrase": relation_phrase, "keyframe_indices": indices, **client.describe()}


def summarise(results: Sequence[dict]) -> dict:
    """Relation Accuracy over many videos (the paper pools the answers of all videos): yes_rate = all yes answers /
    all answers. The results must come from one model, temperature and endpoint."""
    if not results:
        raise ValueError("no results to summarise")
    settings = {(r["model"], r["temperature"], r["endpoint"]) for r in results}
    if len(settings) != 1:
        raise ValueError(f"results mix VLM settings (model, temperature, endpoint): {sorted(settings)}")
    model, temperature, endpoint = settings.pop()
    totals = {k: sum(r[k] for r in results) for k in ("yes", "no", "other", "repeats")}
    return {"yes_rate": totals["yes"] / totals["repeats"], **totals, "videos": len(results),
            "mean_video_yes_rate": float(np.mean([r["yes_rate"] for r in results])),
            "model": model, "temperature": temperature, "endpoint": endpoint}
