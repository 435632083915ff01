"""A real OpenAI-compatible vLLM server with the plugin, on 127.0.0.1: chat completions with base64 images from a
client, answers equal to transformers with ``vtprune.prune`` (the offline reference), 64 concurrent requests,
requests with and without images in the same engine steps, and bad requests answered with an error while the
server keeps serving. The server is started with vLLM's own CLI and stopped by its PID.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("vllm", reason="the vLLM plugin's tests run in the vLLM venv (scripts/setup_vllm.sh)")

import vtprune  # noqa: E402
from vtprune.bench.accuracy import DEFAULT_MODEL, load  # noqa: E402
from vtprune.synthetic.eval import predict  # noqa: E402
from vtprune.synthetic.scenes import heldout  # noqa: E402

CONFIG = {"method": "kcenter", "keep": 64}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "vtprune.integrations.vllm.cli", "serve", str(DEFAULT_MODEL),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
           "--max-model-len", "1024", "--max-num-seqs", "64", "--seed", "0",
           "--additional-config", json.dumps({"vtprune": CONFIG})]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(1)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail(f"the server did not start in 300 s:\n{log.read_text()[-3000:]}")
    yield url, proc, log
    os.killpg(proc.pid, signal.SIGTERM)  # stop the server (and its engine processes) by its PID
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode is not None


def _image_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(url: str, question: str, image_url: str | None = None, timeout: float = 300) -> tuple[int, dict]:
    content = [{"type": "text", "text": question}]
    if image_url is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": image_url}})
    body = {"model": str(DEFAULT_MODEL), "max_tokens": 1, "temperature": 0, "add_special_tokens": True,
            "messages": [{"role": "user", "content": content}]}
    req = urllib.request.Request(f"{url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def _answer(reply: dict) -> str:
    words = reply["choices"][0]["message"]["content"].split()
    return words[0] if words else ""


@pytest.fixture(scope="module")
def samples():
    return heldout(64)


@pytest.fixture(scope="module")
def reference(samples):
    model, processor = load(DEFAULT_MODEL)
    with vtprune.prune(model, CONFIG["method"], keep=CONFIG["keep"]):
        return predict(model, processor, samples[:16]) + predict(model, processor, samples[16:32])


def test_chat_answers_equal_offline(server, samples, reference):
    url, _, _ = server
    for s, want in zip(samples[:32], reference):
        status, reply = chat(url, s.question, _image_url(s.image))
        assert status == 200, reply
        assert _answer(reply) == want
        assert reply["usage"]["prompt_tokens"] <= CONFIG["keep"] + 16  # 576 image tokens became 64


def test_64_concurrent_requests_mixed_with_text_only(server, samples):
    url, proc, _ = server
    one_by_one = [_answer(chat(url, s.question, _image_url(s.image))[1]) for s in samples]
    jobs = [(s.question, _image_url(s.image)) for s in samples] + [(s.question, None) for s in samples[:8]]
    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        replies = list(pool.map(lambda job: chat(url, *job), jobs))
    assert all(status == 200 for status, _ in replies), [r for st, r in replies if st != 200][:2]
    assert [_answer(r) for _, r in replies[: len(samples)]] == one_by_one
    assert proc.poll() is None  # no restart: the same server process answered everything


@pytest.mark.parametrize(("bad", "cause"), [("data:image/png;base64,bm90IGFuIGltYWdl", "image"),
                                            ("data:image/png;base64,%%%", "base64")])
def test_bad_image_gets_an_error_and_the_server_keeps_serving(server, samples, bad, cause):
    url, proc, _ = server
    status, reply = chat(url, "what color is the circle?", bad)
    assert 400 <= status < 500, reply
    assert cause in reply["error"]["message"].lower(), reply
    status, reply = chat(url, samples[0].question, _image_url(samples[0].image))
    assert status == 200 and proc.poll() is None
