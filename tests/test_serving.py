"""serve.py: the OpenAI-compatible API, driven by the real `openai` client and httpx against a real server
process (uvicorn), its batching, its errors, its metrics and the page; the queue's bound in process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import REPO, run_in_process, script_env, tiny_config

KEY = "test-key"
pytestmark = pytest.mark.xdist_group("serving")  # one server for the module's tests


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(model, *flags: str) -> tuple[subprocess.Popen, str]:
    """serve.py in its own process, once /health answers; returns it and its base URL."""
    port = free_port()
    command = [sys.executable, str(REPO / "serve.py"), "--model-path", str(model), "--port", str(port), *flags]
    process = subprocess.Popen(command, env=script_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        if process.poll() is not None:
            raise AssertionError(f"serve.py exited {process.returncode}: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.25)
    process.kill()
    raise AssertionError("serve.py did not answer /health within a minute")


CONTEXT = 2048  # the served model's: a prompt and up to 1,024 new tokens fit, so rows run long enough to leave


@pytest.fixture(scope="module")
def served_model_dir(tmp_path_factory, tokenizer):
    """The tiny GPT-2 with a 2,048-token context, saved with the real tokenizer."""
    import torch
    from transformers import GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("tiny-gpt2-long")
    torch.manual_seed(0)
    GPT2LMHeadModel(tiny_config(n_positions=CONTEXT)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def server(served_model_dir):
    process, url = start_server(served_model_dir, "--api-key", KEY, "--model-name", "tiny", "--max-tokens", "1024")
    yield url
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


def post(server: str, path: str, body, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {**headers, "Content-Type": "application/json"}
    return httpx.post(f"{server}{path}", content=content, headers=headers, timeout=60)


def metric(server: str, name: str) -> float:
    """A metric's value in /metrics (summed over its labels)."""
    lines = httpx.get(f"{server}/metrics").text.splitlines()
    values = [float(line.split()[-1]) for line in lines if line.startswith(name) and not line.startswith("#")]
    assert values, name
    return sum(values)


def test_the_openai_client_gets_inference_pys_samples_whole_and_streamed(client, served_model_dir, tokenizer, tmp_path):
    import inference

    assert [model.id for model in client.models.list()] == ["tiny"]
    prompt = "It was a fine morning"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, n=2, seed=7)
    assert [c.index for c in whole.choices] == [0, 1]
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + the paragraph's start
    assert whole.usage.prompt_tokens == 2 * prompt_tokens and 2 <= whole.usage.completion_tokens <= 60
    out = tmp_path / "samples.jsonl"
    argv = ["--model-path", str(served_model_dir), "--prompt", prompt, "--max-new-tokens", "30", "--seed", "7"]
    assert inference.main([*argv, "--n-return-seqs", "2", "--output", str(out)]) == 0
    drawn = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert drawn == [(prompt + choice.text).strip() for choice in whole.choices]  # the same sampling code
    chunks = list(client.completions.create(model="tiny", prompt=prompt, max_tokens=30, seed=7, stream=True))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    long = client.completions.create(
        model="tiny", prompt=prompt, max_tokens=30, seed=7, extra_body={"paragraphs": None}
    )
    assert long.usage.completion_tokens == 30 and long.choices[0].finish_reason == "length"


def test_chat_continues_the_last_user_message_as_prose(client, server):
    messages = [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Emma was"}]
    chat = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, seed=3)
    plain = client.completions.create(model="tiny", prompt="Emma was", max_tokens=20, seed=3)
    assert chat.choices[0].message.content == plain.choices[0].text and chat.choices[0].message.role == "assistant"
    assert chat.model_extra["prose_prompt"]["text"] == "Emma was"
    assert "last user message" in chat.model_extra["prose_prompt"]["rule"]
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, seed=3, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert "".join(pieces) == chat.choices[0].message.content
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    refused = post(server, "/v1/chat/completions", {"model": "tiny", "messages": messages, "tools": tools})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tools"


def test_requests_sent_together_share_batches_and_get_their_own_text(server):
    requests = [
        {"model": "tiny", "prompt": prompt, "max_tokens": 40, "seed": seed, "temperature": temperature}
        for prompt, seed, temperature in [("Emma", 1, 1.0), ("It was", 2, 0.7), ("Mr. Knightley", 3, 1.0)] * 2
    ]
    alone = [post(server, "/v1/completions", body).json()["choices"][0]["text"] for body in requests]
    before = metric(server, "austen_batch_rows_sum") - metric(server, "austen_batch_rows_count")
    together: list[str | None] = [None] * len(requests)

    def send(i: int) -> None:
        together[i] = post(server, "/v1/completions", requests[i]).json()["choices"][0]["text"]

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone  # each row its own generator: the same text alone or batched
    shared = metric(server, "austen_batch_rows_sum") - metric(server, "austen_batch_rows_count") - before
    assert shared > 0  # some batch held more than one row


@pytest.mark.parametrize(
    "body, key, status, param, words",
    [
        ('{"model": "tiny", "prompt": ', KEY, 400, None, "not valid JSON"),
        ({"model": "tiny", "prompt": 5}, KEY, 400, "prompt", "prompt"),
        ({"model": "tiny", "prompt": "Emma", "temperature": 3}, KEY, 400, "temperature", "less than or equal to 2"),
        ({"model": "tiny", "prompt": "Emma", "max_tokens": 5000}, KEY, 400, "max_tokens", "cap of 1024"),
        ({"model": "tiny", "prompt": "Emma " * 2100}, KEY, 400, "prompt", "reads at most 2048 and must have room"),
        ({"model": "tiny", "prompt": "Emma " * 1500, "max_tokens": 1000}, KEY, 400, "max_tokens", "context of 2048"),
        ({"model": "tiny", "prompt": "Emma", "stop": "x" * 257}, KEY, 400, "stop", "at most 256 characters"),
        ({"model": "tiny", "prompt": "Emma", "stop": ["\n", "y" * 300]}, KEY, 400, "stop", "at most 256 char"),
        ({"model": "gpt-4", "prompt": "Emma"}, KEY, 404, "model", "serves 'tiny'"),
        ({"model": "tiny", "prompt": "Emma", "logprobs": 2}, KEY, 400, "logprobs", "not implemented"),
        ({"model": "tiny", "prompt": "Emma", "echo": True}, KEY, 400, "echo", "not implemented"),
        ({"model": "tiny", "prompt": "Emma", "presence_penalty": 0.5}, KEY, 400, "presence_penalty", "not impl"),
        ({"model": "tiny", "prompt": "Emma", "colour": "red"}, KEY, 400, "colour", "does not know the field"),
        (
            {"model": "tiny", "prompt": ["Emma", "It was"], "n": 9},
            KEY,
            400,
            "n",
            "18 samples (prompts times n times rerank)",
        ),
        ({"model": "tiny", "prompt": "Emma"}, None, 401, None, "no API key"),
        ({"model": "tiny", "prompt": "Emma"}, "nope", 401, None, "a wrong API key"),
    ],
)
def test_bad_requests_get_one_line_in_openais_error_shape(server, body, key, status, param, words):
    response = post(server, "/v1/completions", body, key)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
    assert words in error["message"] and "\n" not in error["message"]
    fine = post(server, "/v1/completions", {"model": "tiny", "prompt": "Emma", "max_tokens": 3, "frequency_penalty": 0})
    assert fine.status_code == 200  # neutral values of unimplemented fields pass; nothing is left busy


def test_a_client_that_leaves_mid_stream_stops_its_row(server):
    drawn = metric(server, 'austen_tokens_total{kind="completion"}')
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 1000, "paragraphs": None, "stream": True, "seed": 1}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, headers=headers) as response:
        events = (line for line in response.iter_lines() if line.startswith("data:"))
        assert all(next(events) for _ in range(3))
    for _ in range(100):  # the row stops at its batch's next step once the server sees the client gone
        if (
            metric(server, "austen_active_rows") == 0
            and metric(server, 'austen_tokens_total{kind="completion"}') > drawn
        ):
            break
        time.sleep(0.1)
    assert metric(server, "austen_active_rows") == 0
    assert metric(server, 'austen_tokens_total{kind="completion"}') - drawn < 1000  # it did not run to its end


def test_health_metrics_and_the_page(server):
    assert httpx.get(f"{server}/health").json()["status"] == "ok"
    assert post(server, "/v1/completions", {"model": "tiny", "prompt": "Emma", "max_tokens": 5}).status_code == 200
    text = httpx.get(f"{server}/metrics").text
    for name in ("austen_requests_total", "austen_tokens_total", "austen_queue_length", "austen_active_rows"):
        assert name in text
    assert metric(server, "austen_time_to_first_token_seconds_count") > 0
    assert "austen_tokens_per_second_bucket" in text
    page = httpx.get(server)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert all(f'id="{name}"' in page.text for name in ("prompt", "generate", "stop", "output"))
    assert "http://" not in page.text and "https://" not in page.text  # no external assets: it works offline


def in_process(model_dir, limits, key: str | None = None, max_batch: int = 4, max_queue: int = 4, judge=None):
    """An engine on the model and the app on it, for FastAPI's TestClient as a loopback client
    (http://localhost): (the engine, the client)."""
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.serving.app import Metrics, create_app
    from austen_gpt.serving.engine import Engine

    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), load_tokenizer(str(model_dir))
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=max_batch, max_queue=max_queue, observe=metrics.observe)
    app = create_app(engine, "tiny", limits, key, metrics, judge)
    return engine, TestClient(app, base_url="http://localhost")


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir):
    import asyncio

    from austen_gpt.sampling.generation import prompt_ids
    from austen_gpt.serving.app import Limits
    from austen_gpt.serving.engine import Job, Row
    from austen_gpt.settings import SamplingSettings

    engine, client = in_process(tiny_model_dir, Limits(100, 128, 1), max_batch=1, max_queue=1)
    long = SamplingSettings(max_new_tokens=5000, paragraphs=None)
    loop = asyncio.new_event_loop()
    jobs = [Job([Row(prompt_ids(engine.tokenizer, "Emma"), 0, k, long, 5000)], loop) for k in range(2)]
    engine.submit(jobs[0])
    while engine.waiting:  # the worker has taken the first: it runs, and the second waits
        time.sleep(0.01)
    engine.submit(jobs[1])
    with client as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "Emma", "max_tokens": 5})
        assert response.status_code == 429 and response.headers["retry-after"] == "1"
        assert response.json()["error"]["type"] == "rate_limit_error"
        for job in jobs:
            job.cancel()
    loop.close()


def test_a_host_other_than_loopback_needs_a_key(capsys, monkeypatch):
    import serve

    monkeypatch.delenv(serve.KEY_VARIABLE, raising=False)
    assert "give --api-key KEY" in run_in_process(serve.main, ["--host", "0.0.0.0"], capsys)
    assert "--port must be between 1 and 65535" in run_in_process(serve.main, ["--port", "0"], capsys)


@pytest.mark.slow
def test_sigterm_finishes_the_requests_in_flight_and_exits_0(served_model_dir):
    process, url = start_server(served_model_dir, "--model-name", "tiny")
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 300, "paragraphs": None, "stream": True, "seed": 2}
    lines: list[str] = []

    def read() -> None:
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
            for line in response.iter_lines():
                lines.extend([line] if line.startswith("data:") else [])

    reader = threading.Thread(target=read)
    reader.start()
    while not lines and reader.is_alive():
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)  # mid-stream
    sent_at = len(lines)
    assert process.wait(timeout=60) == 0
    reader.join(timeout=10)
    assert sent_at < len(lines) - 1 and lines[-1] == "data: [DONE]"  # finished after the signal, closed cleanly
    with pytest.raises(httpx.ConnectError):  # and no new request is taken
        httpx.get(f"{url}/health", timeout=2)


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium, headless, driven by its chromium-driver through selenium."""
    import shutil

    from conftest import skip_unless_installed

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    skip_unless_installed(None if chromium and driver else "chromium and chromium-driver are not installed")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    quiet = ("--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking")
    quiet += ("--disable-component-update", "--disable-sync")  # no calls out of this offline machine
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800", *quiet):
        options.add_argument(argument)
    browser = webdriver.Chrome(service=Service(driver), options=options)
    yield browser
    browser.quit()


@pytest.mark.slow
def test_the_page_writes_streams_stops_and_asks_for_the_key_once(browser, server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def element(name: str):
        return browser.find_element(By.ID, name)

    def settle(what, timeout: float = 30) -> None:
        WebDriverWait(browser, timeout, poll_frequency=0.02).until(lambda _: what())

    def fill(name: str, value: str) -> None:
        element(name).clear()
        element(name).send_keys(value)

    browser.get(server)
    fill("prompt", "It was a fine morning")
    fill("max-tokens", "300")
    fill("paragraphs", "20")
    element("generate").click()
    settle(lambda: element("key-box").is_displayed())  # the server needs a key: the page asks for it
    element("api-key").send_keys(KEY)
    element("save-key").click()
    lengths = []
    settle(lambda: lengths.append(len(element("output").text)) or element("status").text == "done", timeout=60)
    assert len(set(lengths)) > 2  # the text grew while it was written: streamed, not all at once
    assert element("output").text.startswith("It was a fine morning") and len(element("output").text) > 40

    browser.refresh()  # the key stays for the tab's session: no second question
    fill("prompt", "Emma")
    fill("max-tokens", "1000")
    fill("paragraphs", "100")
    element("generate").click()
    settle(lambda: len(element("output").text) > 30)
    assert not element("key-box").is_displayed()
    element("stop").click()
    settle(lambda: element("status").text == "stopped")
    stopped_at = element("output").text
    time.sleep(0.5)
    assert element("output").text == stopped_at and not element("generate").get_attribute("disabled")
    settle(lambda: metric(server, "austen_active_rows") == 0, timeout=10)  # the server stopped drawing it too
    element("copy").click()
    settle(lambda: element("status").text.startswith(("copied", "copy failed")))


def test_fields_left_out_sample_as_the_run_that_trained_the_model(tiny_model_dir):
    """Top-k and top-p left out of a request take the server's defaults: the run's recorded ones (serve.py reads
    them as inference.py does); here top-k 1, so two seeds write the same text unless the request asks for more."""
    from austen_gpt.serving.app import Limits
    from austen_gpt.settings import SamplingSettings

    _, client = in_process(tiny_model_dir, Limits(100, 128, 4, SamplingSettings(top_k=1)))
    with client as http:

        def text(**fields) -> str:
            body = {"model": "tiny", "prompt": "Emma", "max_tokens": 12, "paragraphs": None, **fields}
            return http.post("/v1/completions", json=body).json()["choices"][0]["text"]

        assert text(seed=1) == text(seed=2)
        assert text(seed=1, top_k=50) != text(seed=2, top_k=50)


# ---- one bad client cannot stall the server ---------------------------------------------------------------


def raw_request(url: str, body: dict, key: str | None = KEY) -> socket.socket:
    """A POST sent over a socket of its own, left open: closing the socket is the client going away."""
    host, port = url.removeprefix("http://").split(":")
    payload = json.dumps(body).encode()
    head = f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
    head += f"Authorization: Bearer {key}\r\n" if key else ""
    connection = socket.create_connection((host, int(port)))
    connection.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return connection


def wait_for(what, timeout: float = 30) -> None:
    """Until `what()` holds, looked at every 10 ms (fails after `timeout` seconds)."""
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "it did not happen in time"
        time.sleep(0.01)


def test_a_client_that_leaves_a_whole_response_stops_its_row(server):
    """Not streamed: the server looks for the client every half second while tokens come, and stops its row."""
    drawn = metric(server, 'austen_tokens_total{kind="completion"}')
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 1000, "paragraphs": None, "seed": 4}
    connection = raw_request(server, body)
    wait_for(lambda: metric(server, "austen_active_rows") == 1)  # its row is being drawn
    connection.close()
    wait_for(lambda: metric(server, "austen_active_rows") == 0)
    wait_for(lambda: metric(server, 'austen_tokens_total{kind="completion"}') > drawn)  # (counted once it ends)
    # a thousand tokens take this tiny model seconds; the row stopped within a second of the client leaving
    assert metric(server, 'austen_tokens_total{kind="completion"}') - drawn < 1000


@pytest.fixture(scope="module")
def one_slot_server(served_model_dir):
    """serve.py without a key (loopback only), one row at a time and one request waiting at most."""
    process, url = start_server(served_model_dir, "--model-name", "tiny", "--max-batch", "1", "--max-queue", "1")
    yield url
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0


@pytest.mark.slow
def test_a_waiting_request_whose_client_leaves_frees_its_place_in_the_queue(one_slot_server):
    url = one_slot_server
    long = {"model": "tiny", "prompt": "Emma", "max_tokens": 1000, "paragraphs": None, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=long, timeout=60) as running:
        events = (line for line in running.iter_lines() if line.startswith("data:"))
        next(events)  # it holds the only row
        waiting = raw_request(url, {"model": "tiny", "prompt": "Emma", "max_tokens": 5}, key=None)
        wait_for(lambda: metric(url, "austen_queue_length") == 1)
        assert post(url, "/v1/completions", {"model": "tiny", "prompt": "Emma"}, None).status_code == 429
        waiting.close()
        wait_for(lambda: metric(url, "austen_queue_length") == 0)  # its place is free while the stream runs
        next(events)  # (still streaming)
        queued = raw_request(url, {"model": "tiny", "prompt": "Emma", "max_tokens": 5}, key=None)
        wait_for(lambda: metric(url, "austen_queue_length") == 1)  # taken, not refused
    reply = queued.makefile("rb").readline()  # the stream closed: the queued request is answered
    queued.close()
    assert reply.startswith(b"HTTP/1.1 200")


@pytest.mark.slow
def test_without_a_key_only_loopback_host_names_are_served_and_metrics_name_routes(one_slot_server):
    url = one_slot_server
    port = url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "127.0.0.2", "LOCALHOST"):
        assert httpx.get(f"{url}/health", headers={"Host": host}).status_code == 200, host
    for host in (f"evil.example:{port}", "localhost.evil.example", "127.0.0.1.nip.io", f"10.0.0.1:{port}"):
        response = httpx.get(f"{url}/health", headers={"Host": host})  # a page's own name, resolved to 127.0.0.1
        assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_host", host
        assert "loopback names only" in response.json()["error"]["message"]
    for number in range(20):
        assert httpx.get(f"{url}/made-up/{number}").status_code == 404
    labels = [line for line in httpx.get(f"{url}/metrics").text.splitlines() if line.startswith("austen_requests")]
    assert not any("made-up" in line for line in labels)  # the raw path is never a label
    assert any('route="other",status="404"' in line and line.endswith(" 20.0") for line in labels)
    assert any('route="/health",status="400"' in line for line in labels)


def test_the_key_is_checked_before_the_body_is_read_in_constant_time(tiny_model_dir, monkeypatch):
    from austen_gpt.serving import gate
    from austen_gpt.serving.app import Limits

    compared = []
    real = gate.hmac.compare_digest
    monkeypatch.setattr(gate.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    _, client = in_process(tiny_model_dir, Limits(100, 128, 4, max_body=1000), key=KEY)
    with client as http:
        refused = http.post("/v1/completions", content=b'{"model": "tiny", "prompt": ', headers={"Host": "x.example"})
        assert refused.status_code == 401 and "no API key" in refused.json()["error"]["message"]  # not the body's 400
        big = json.dumps({"model": "tiny", "prompt": "Emma " * 1000})
        assert http.post("/v1/completions", content=big, headers={"Authorization": "Bearer nope"}).status_code == 401
        keyed = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
        too_large = http.post("/v1/completions", content=big, headers=keyed)
        assert too_large.status_code == 413 and "limit of 1,000 bytes" in too_large.json()["error"]["message"]
        fine = http.post("/v1/completions", json={"model": "tiny", "prompt": "Emma", "max_tokens": 2}, headers=keyed)
        assert fine.status_code == 200
    assert (f"Bearer {KEY}".encode(), f"Bearer {KEY}".encode()) in compared and (
        b"Bearer nope",
        b"Bearer " + KEY.encode(),
    ) in compared


def test_the_same_prompt_twice_in_one_request_is_two_samples(tiny_model_dir):
    """Numbered as inference.py numbers them: the same prompt's copies are samples 0, 1, ..., as n=2 draws them."""
    from austen_gpt.serving.app import Limits

    _, client = in_process(tiny_model_dir, Limits(100, 128, 4))
    with client as http:

        def texts(**fields) -> list[str]:
            body = {"model": "tiny", "max_tokens": 20, "paragraphs": None, "seed": 5, **fields}
            return [choice["text"] for choice in http.post("/v1/completions", json=body).json()["choices"]]

        twice = texts(prompt=["Emma", "Emma"])
        assert twice[0] != twice[1] and twice == texts(prompt="Emma", n=2)
        assert texts(prompt=["Emma", "It was", "Emma"]) == [twice[0], texts(prompt="It was")[0], twice[1]]


def test_left_out_max_tokens_asks_for_what_fits(tiny_model_dir):
    """A 128-token context: a prompt with max_tokens that together overrun it is refused, and a request that
    leaves max_tokens out gets as many new tokens as fit after its prompt (the model reads the whole prompt)."""
    from austen_gpt.serving.app import Limits

    _, client = in_process(tiny_model_dir, Limits(1024, 128, 4))
    with client as http:
        prompt = "Emma " * 100
        read = http.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "paragraphs": None}).json()
        assert read["usage"]["prompt_tokens"] + read["usage"]["completion_tokens"] == 128
        body = {"model": "tiny", "prompt": prompt, "max_tokens": 100}
        refused = http.post("/v1/completions", json=body).json()["error"]
        room = 128 - read["usage"]["prompt_tokens"]
        assert refused["param"] == "max_tokens" and f"ask for {room} or fewer" in refused["message"]


@pytest.mark.slow
def test_a_stream_keeps_streaming_while_bad_requests_are_refused(server):
    """By order, not by time: the stream's events keep arriving before, during and after each refusal: a body
    over the limit (sent whole, or in chunks), a 900 kB prompt tokenized off the event loop and refused as too
    long, a long stop string, no key."""
    events: list[str] = []
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 1000, "paragraphs": None, "stream": True, "seed": 8}

    def read() -> None:
        with httpx.stream(
            "POST", f"{server}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as r:
            events.extend(line for line in r.iter_lines() if line.startswith("data:"))

    reader = threading.Thread(target=read)
    reader.start()
    wait_for(lambda: len(events) >= 3)
    huge = json.dumps({"model": "tiny", "prompt": "Emma " * 300_000})  # 1.5 MB: over the 1 MiB limit
    long_prompt = {"model": "tiny", "prompt": "Emma was a fine young woman. " * 30_000}  # 900 kB: under it
    refusals = [
        (lambda: post(server, "/v1/completions", huge), 413),
        (
            lambda: httpx.post(
                f"{server}/v1/completions",
                content=iter([huge.encode()] * 2),
                headers={"Authorization": f"Bearer {KEY}"},
            ),
            413,
        ),  # fmt: skip
        (lambda: post(server, "/v1/completions", long_prompt), 400),
        (lambda: post(server, "/v1/completions", {"model": "tiny", "prompt": "E", "stop": "s" * 100_000}), 400),
        (lambda: post(server, "/v1/completions", {"model": "tiny", "prompt": "E"}, key=None), 401),
    ]
    seen = []
    for send, status in refusals:
        before = len(events)
        assert send().status_code == status
        seen.append((before, len(events)))
    wait_for(lambda: len(events) > seen[-1][1])  # after the last refusal the stream goes on
    assert reader.is_alive() and all(before > 0 for before, _ in seen)
    assert seen[2][1] > seen[2][0]  # events came while the long prompt was tokenized
    reader.join(timeout=120)
    assert events[-1] == "data: [DONE]"


def test_stop_strings_are_found_as_a_plain_search_finds_them():
    """The stop check reads each character once; it ends the text where a search of the whole text would: at
    the first stop string to end, and it holds back only what may begin one."""
    import random

    from austen_gpt.serving.engine import StopStrings

    draw = random.Random(0)
    for _ in range(3000):
        stops = tuple("".join(draw.choice("ab") for _ in range(draw.randint(1, 4))) for _ in range(draw.randint(1, 3)))
        text = "".join(draw.choice("ab") for _ in range(draw.randint(0, 12)))
        matcher, found = StopStrings(stops), None
        for end in range(len(text) + 1):  # the text grows a character at a time
            found = matcher.find(text[:end])
            if found is not None:
                break
        ends = [end for end in range(1, len(text) + 1) if any(text[:end].endswith(stop) for stop in stops)]
        expected = None
        if ends:
            expected = ends[0] - max(len(stop) for stop in stops if text[: ends[0]].endswith(stop))
        assert found == expected, (stops, text)
        if found is None:
            longest = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
            assert matcher.pending() == longest, (stops, text)


def test_the_stop_check_is_linear_in_the_stop_strings_length(tokenizer):
    """Four stop strings of 100,000 characters (past the API's limit, straight to the engine) over 300 tokens:
    a check whose cost grows with a stop's length squared on every token takes hours here; a linear one, a
    fraction of a second. Run in a process of its own, so that the quadratic check fails by its time limit."""
    code = (
        "from austen_gpt.models.loading import load_tokenizer\n"
        "from austen_gpt.serving.engine import TextSoFar\n"
        "tokenizer = load_tokenizer('configs/austen-tiny')\n"
        "ids = tokenizer('It was a truth universally acknowledged. ' * 40, add_special_tokens=False)['input_ids']\n"
        "text = TextSoFar(tokenizer, tuple('x' * 99_999 + end for end in 'abcd'), strip_start=True)\n"
        "pieces = [text.push(token) for token in ids[:300]]\n"
        "assert ''.join(pieces) + text.flush() == tokenizer.decode(ids[:300]).strip()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_rerank_keeps_one_of_each_samples_candidates_by_the_judge(tiny_model_dir):
    """The extension field rerank N: sample k is one of the prompt's samples kN .. kN+N-1, reproducibly; refused
    without a judge, and with stream."""
    import torch

    from austen_gpt.serving.app import Limits
    from austen_gpt.style.judge import Judge

    torch.manual_seed(0)
    judge = Judge(
        {"weight": torch.randn(66), "bias": torch.zeros(1), "mean": torch.zeros(66), "std": torch.ones(66)}, {}
    )
    body = {"model": "tiny", "prompt": "Emma", "max_tokens": 12, "paragraphs": None, "seed": 5}
    _, client = in_process(tiny_model_dir, Limits(100, 128, 16), judge=judge)
    with client as http:

        def texts(**fields) -> list[str]:
            answer = http.post("/v1/completions", json={**body, **fields}).json()
            return [choice["text"] for choice in answer["choices"]]

        candidates = texts(n=6)
        kept = texts(n=2, rerank=3)
        assert len(kept) == 2 and kept[0] in candidates[:3] and kept[1] in candidates[3:]
        assert texts(n=2, rerank=3) == kept and texts(n=2, rerank=3, rerank_choice="best") != []
        refused = http.post("/v1/completions", json={**body, "rerank": 2, "stream": True}).json()["error"]
        assert refused["param"] == "rerank" and "cannot stream" in refused["message"]
    _, client = in_process(tiny_model_dir, Limits(100, 128, 16))
    with client as http:
        refused = http.post("/v1/completions", json={**body, "rerank": 2}).json()["error"]
        assert refused["param"] == "rerank" and "no judge" in refused["message"]
