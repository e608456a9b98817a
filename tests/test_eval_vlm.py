"""The VLM relation-accuracy client against a local fake chat-completions server (127.0.0.1, ephemeral port)."""
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler

import numpy as np
import pytest

from conftest import local_vlm_server
from dr_train.catalog import load_catalog
from dr_train.eval.vlm import (PAPER_TEMPLATE, SHORT_TEMPLATE, VLMClient, VLMError, catalog_phrase,
                               keyframe_indices, make_question, parse_answer, relation_accuracy, summarise)

KEY = "sk-test-DO-NOT-LEAK-7f3a91"
MAX_REQUESTS = 40


class _Handler(BaseHTTPRequestHandler):
    """Plays the server's script: ("answer", text) | ("status", code) | ("hang", seconds)."""

    def do_POST(self):
        state = self.server.state
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with state["lock"]:
            state["requests"].append({"path": self.path, "headers": dict(self.headers), "body": json.loads(body)})
            over = len(state["requests"]) > MAX_REQUESTS
            kind, value = state["script"].pop(0) if state["script"] and not over else ("status", 503)
        if kind == "hang":
            state["release"].wait(value)
            kind, value = "answer", "yes"
        if kind == "answer":
            self._send(200, {"id": "x", "choices": [{"index": 0, "message": {"role": "assistant", "content": value}}]})
        else:   # error bodies echo the key, as some real servers do ("Incorrect API key provided: sk-...")
            self._send(value, {"error": {"message": f"failure for key {KEY}"}})

    def _send(self, code, payload):
        data = json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):   # the client timed out and left
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server(monkeypatch):
    with local_vlm_server(monkeypatch, _Handler, KEY) as (httpd, base_url):
        httpd.state = {"script": [], "requests": [], "lock": threading.Lock(), "release": threading.Event()}
        httpd.base_url = base_url
        try:
            yield httpd
        finally:
            httpd.state["release"].set()
    assert len(httpd.state["requests"]) <= MAX_REQUESTS


def _client(server, **kw):
    sleeps = []
    kw = {"temperature": 0.7, "timeout": 5.0, "max_attempts": 3, "backoff": 0.01, "sleep": sleeps.append, "seed": 0,
          **kw}
    client = VLMClient(server.base_url, "qwen-vl-max", **kw)
    return client, sleeps


def _video(frames=61):
    rng = np.random.default_rng(0)
    return rng.integers(0, 255, (frames, 24, 32, 3), dtype=np.uint8)


def test_answers_are_parsed_and_the_request_carries_images_question_and_settings(server, caplog):
    caplog.set_level(logging.DEBUG)
    answers = ["Yes.", "no", "**YES**, they shake hands", "'No'", "yes", "No, they do not.", "Yes", "yes!", "NO",
               "Yes"]
    server.state["script"] = [("answer", a) for a in answers]
    client, _ = _client(server, temperature=0.9)
    result = relation_accuracy(client, _video(), "handshaking", repeats=10)
    assert (result["yes"], result["no"], result["other"]) == (6, 4, 0)
    assert result["yes_rate"] == pytest.approx(0.6) and result["answers"] == answers
    assert result["model"] == "qwen-vl-max" and result["temperature"] == 0.9 and result["repeats"] == 10
    assert result["endpoint"] == server.base_url + "/chat/completions"
    assert result["keyframe_indices"] == [0, 15, 30, 45, 60]
    requests = server.state["requests"]
    assert len(requests) == 10 and all(r["path"] == "/v1/chat/completions" for r in requests)
    body = requests[0]["body"]
    assert body["model"] == "qwen-vl-max" and body["temperature"] == 0.9
    parts = body["messages"][0]["content"]
    images = [p for p in parts if p["type"] == "image_url"]
    texts = [p["text"] for p in parts if p["type"] == "text"]
    assert len(images) == 5 and all(p["image_url"]["url"].startswith("data:image/jpeg;base64,") for p in images)
    assert texts == [PAPER_TEMPLATE.replace("{}", "handshaking")] == [result["question"]]
    assert requests[0]["headers"]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in json.dumps(result) and KEY not in caplog.text and KEY not in repr(client)
    assert KEY not in json.dumps(vars(client), default=str)


def test_neither_yes_nor_no_is_counted_as_other_and_reported(server, caplog):
    server.state["script"] = [("answer", a) for a in ["Maybe.", "yes", "Yesterday they met", "", "I cannot tell"]]
    client, _ = _client(server)
    result = relation_accuracy(client, _video(9), "hugging", repeats=5, template=SHORT_TEMPLATE)
    assert (result["yes"], result["no"], result["other"]) == (1, 0, 4)
    assert result["yes_rate"] == pytest.approx(0.2) and result["yes_rate_of_decided"] == 1.0
    assert result["verdicts"] == ["other", "yes", "other", "other", "other"]
    assert result["question"] == "Does this video show hugging? Answer yes or no."
    assert "neither yes nor no" in caplog.text


def test_a_server_error_is_retried_with_backoff(server, caplog):
    server.state["script"] = [("status", 500), ("status", 429), ("answer", "No")]
    client, sleeps = _client(server, backoff=0.5)
    assert client.ask([_video(1)[0]], "Is it?") == "No"
    assert len(server.state["requests"]) == 3
    assert len(sleeps) == 2 and 0.25 <= sleeps[0] < 0.75 and 0.5 <= sleeps[1] < 1.5     # 0.5 * 2**k * [0.5, 1.5)
    assert "HTTP 500" in caplog.text and KEY not in caplog.text


def test_a_hanging_server_times_out_is_retried_then_given_up(server):
    server.state["script"] = [("hang", 10), ("answer", "yes")]
    client, sleeps = _client(server, timeout=0.3, max_attempts=2)
    assert client.ask([_video(1)[0]], "Is it?") == "yes"
    assert len(sleeps) == 1

    server.state["script"] = [("hang", 10), ("hang", 10)]
    with pytest.raises(VLMError, match="gave up after 2 attempts") as error:
        client.ask([_video(1)[0]], "Is it?")
    assert "timed out" in str(error.value).lower() or "timeout" in str(error.value).lower()
    assert client.endpoint in str(error.value) and KEY not in str(error.value)


def test_an_unauthorised_request_fails_at_once_without_quoting_the_key(server, caplog):
    server.state["script"] = [("status", 401), ("answer", "yes")]
    client, sleeps = _client(server, max_attempts=5)
    with pytest.raises(VLMError) as error:
        relation_accuracy(client, _video(), "handshaking", repeats=3)
    message = str(error.value)
    assert "401" in message and client.endpoint in message and KEY not in message and "***" in message
    assert len(server.state["requests"]) == 1 and sleeps == []
    assert KEY not in caplog.text


def test_the_key_comes_only_from_the_environment(server, monkeypatch):
    monkeypatch.delenv("DR_TRAIN_VLM_API_KEY")
    with pytest.raises(ValueError, match="DR_TRAIN_VLM_API_KEY"):
        VLMClient(server.base_url, "qwen-vl-max")
    monkeypatch.setenv("MY_VLM_KEY", "other-secret")
    client = VLMClient(server.base_url, "qwen-vl-max", api_key_env="MY_VLM_KEY", sleep=lambda s: None)
    server.state["script"] = [("answer", "no")]
    assert client.ask([_video(1)[0]], "Is it?") == "no"
    assert server.state["requests"][0]["headers"]["Authorization"] == "Bearer other-secret"
    with pytest.raises(ValueError, match="credentials"):
        VLMClient("https://user:pass@example.com/v1", "m", api_key_env=None)
    with pytest.raises(ValueError, match="http"):
        VLMClient("ftp://example.com/v1", "m", api_key_env=None)


def test_keyframes_questions_answers_and_summaries():
    assert keyframe_indices(61) == [0, 15, 30, 45, 60]
    assert keyframe_indices(25) == [0, 6, 12, 18, 24]
    assert keyframe_indices(3) == [0, 1, 2]
    assert [parse_answer(a) for a in ["Yes", " yes.", "*No*", "Nope", "Maybe", "", "YES, clearly", "no!"]] == \
        ["yes", "yes", "no", "other", "other", "other", "yes", "no"]
    catalog = load_catalog()
    assert catalog_phrase(catalog["handshaking"]) == "handshaking"
    assert make_question(PAPER_TEMPLATE, catalog_phrase(catalog["walking_apart"])).count("walking apart") == 1
    with pytest.raises(ValueError, match="exactly one"):
        make_question("Is this {} or {}?", "x")
    base = {"model": "m", "temperature": 0.7, "endpoint": "e"}
    pooled = summarise([{**base, "yes": 3, "no": 7, "other": 0, "repeats": 10, "yes_rate": 0.3},
                        {**base, "yes": 8, "no": 1, "other": 1, "repeats": 10, "yes_rate": 0.8}])
    assert pooled["yes_rate"] == pytest.approx(0.55) and pooled["other"] == 1 and pooled["videos"] == 2
    with pytest.raises(ValueError, match="mix"):
        summarise([{**base, "yes": 1, "no": 0, "other": 0, "repeats": 1, "yes_rate": 1.0},
                   {**base, "model": "n", "yes": 1, "no": 0, "other": 0, "repeats": 1, "yes_rate": 1.0}])
