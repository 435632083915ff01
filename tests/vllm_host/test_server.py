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


def _serve(model: str, config: dict, log, *args: str):
    """``vllm serve model`` with the plugin on 127.0.0.1 (vLLM's own CLI): yields (url, process); stopped by its PID."""
    port = _free_port()
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "-m", "vtprune.integrations.vllm.cli", "serve", model,
           "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager", "--seed", "0",
           *args, "--additional-config", json.dumps({"vtprune": config})]
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
    yield url, proc
    os.killpg(proc.pid, signal.SIGTERM)  # stop the server (and its engine processes) by its PID
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode is not None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    for url, proc in _serve(str(DEFAULT_MODEL), CONFIG, log, "--max-model-len", "1024", "--max-num-seqs", "64"):
        yield url, proc, log


def _image_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def chat(url: str, question: str, image_url: str | None = None, timeout: float = 300, model: str = str(DEFAULT_MODEL),
         media: str = "image_url", **extra) -> tuple[int, dict]:
    content = [{"type": "text", "text": question}]
    if image_url is not None:
        content.insert(0, {"type": media, media: {"url": image_url}})
    body = {"model": model, "max_tokens": 1, "temperature": 0, "add_special_tokens": model == str(DEFAULT_MODEL),
            "messages": [{"role": "user", "content": content}], **extra}
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


# ---------------------------------------------------------------------------- videos (Qwen3-VL)
QWEN3 = {"method": "kcenter", "ratio": 0.5, "budget": "per_image"}
QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|{0}_pad|><|vision_end|>w7 w8<|im_end|>\n<|im_start|>assistant\n"


def _jpeg(frame) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(frame).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _frames(n: int, seed: int):
    """``n`` frames of 64 x 128 pixels (whole merged patches), as JPEG bytes and as the frames they decode to."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    jpegs = [_jpeg(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)) for _ in range(n)]
    return jpegs, np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])


def _video_url(jpegs: list[bytes]) -> str:
    return "data:video/jpeg;base64," + ",".join(base64.b64encode(j).decode() for j in jpegs)


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    from vtprune.testing.checkpoints import save_qwen

    root = tmp_path_factory.mktemp("qwen3")
    ckpt, kept = save_qwen("qwen3_vl", root / "ckpt"), root / "kept.jsonl"
    for url, proc in _serve(str(ckpt), {**QWEN3, "record": str(kept)}, root / "server.log", "--max-model-len", "512"):
        yield url, proc, ckpt, kept


def test_video_chat_equals_transformers_and_an_unservable_video_gets_an_error(qwen3_server):
    """A video sent to the server as JPEG frames (``data:video/jpeg``, vLLM's lossless-to-decode frame list, 1 fps)
    keeps the tokens and gives the first token transformers gives on the same frames. With the budget pooled over
    the video (``per_image``), a Qwen3-VL video of two temporal patches is two prompt blocks whose counts are only
    known after selection: that request gets an error naming the cause, and the server serves the next one."""
    import math

    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    url, proc, ckpt, kept_log = qwen3_server
    jpegs, frames = _frames(2, seed=3)  # 2 frames = one temporal patch = one block
    video_url = _video_url(jpegs)
    status, reply = chat(url, "w7 w8", video_url, model=str(ckpt), media="video_url", logprobs=True)
    assert status == 200, reply
    got = reply["choices"][0]["logprobs"]["content"][0]

    model, processor = AutoModelForImageTextToText.from_pretrained(ckpt).eval(), AutoProcessor.from_pretrained(ckpt)
    meta = {"fps": 1.0, "frames_indices": [0, 1], "total_num_frames": 2, "duration": 2.0}
    with vtprune.prune(model, QWEN3["method"], ratio=QWEN3["ratio"], budget=QWEN3["budget"]) as handle, \
            torch.inference_mode():
        inputs = processor(videos=[frames], text=[QWEN_PROMPT.format("video")], return_tensors="pt",
                           do_sample_frames=False, video_metadata=[meta])
        lp = torch.log_softmax(model(**inputs).logits[0, -1].float(), -1)
        pos = (inputs["input_ids"][0] == model.config.video_token_id).nonzero()[:, 0]
        want = torch.isin(pos, handle.stats.kept_positions[0]).nonzero()[:, 0].tolist()
    tok = int(lp.argmax())
    assert got["token"] == processor.tokenizer.decode([tok])
    assert math.isclose(got["logprob"], float(lp[tok]), abs_tol=1e-4), (got["logprob"], float(lp[tok]))
    from vtprune.integrations.vllm.offline import read_kept

    assert [k for _, k in read_kept(kept_log)][-1] == want and len(want) == pos.numel() // 2

    status, reply = chat(url, "w7 w8", _video_url(_frames(4, seed=4)[0]), model=str(ckpt),  # 2 temporal patches
                         media="video_url")
    assert 400 <= status < 500, reply
    assert "per_frame" in reply["error"]["message"], reply
    status, reply = chat(url, "w7 w8", video_url, model=str(ckpt), media="video_url", logprobs=True)
    assert status == 200 and reply["choices"][0]["logprobs"]["content"][0]["token"] == got["token"]
    assert proc.poll() is None
