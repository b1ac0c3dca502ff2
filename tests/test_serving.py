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
from conftest import REPO, run_in_process, script_env

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


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    process, url = start_server(tiny_model_dir, "--api-key", KEY, "--model-name", "tiny", "--max-tokens", "1024")
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
    return httpx.post(f"{server}{path}", content=content, headers={**headers, "Content-Type": "application/json"})


def metric(server: str, name: str) -> float:
    """A metric's value in /metrics (summed over its labels)."""
    lines = httpx.get(f"{server}/metrics").text.splitlines()
    values = [float(line.split()[-1]) for line in lines if line.startswith(name) and not line.startswith("#")]
    assert values, name
    return sum(values)


def test_the_openai_client_gets_inference_pys_samples_whole_and_streamed(client, tiny_model_dir, tokenizer, tmp_path):
    import inference

    assert [model.id for model in client.models.list()] == ["tiny"]
    prompt = "It was a fine morning"
    whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=30, n=2, seed=7)
    assert [c.index for c in whole.choices] == [0, 1]
    prompt_tokens = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # + the paragraph's start
    assert whole.usage.prompt_tokens == 2 * prompt_tokens and 2 <= whole.usage.completion_tokens <= 60
    out = tmp_path / "samples.jsonl"
    argv = ["--model-path", str(tiny_model_dir), "--prompt", prompt, "--max-new-tokens", "30", "--seed", "7"]
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
        ({"model": "tiny", "prompt": "Emma " * 200}, KEY, 400, "prompt", "reads at most 128"),
        ({"model": "gpt-4", "prompt": "Emma"}, KEY, 404, "model", "serves 'tiny'"),
        ({"model": "tiny", "prompt": "Emma", "logprobs": 2}, KEY, 400, "logprobs", "not implemented"),
        ({"model": "tiny", "prompt": "Emma", "echo": True}, KEY, 400, "echo", "not implemented"),
        ({"model": "tiny", "prompt": "Emma", "presence_penalty": 0.5}, KEY, 400, "presence_penalty", "not impl"),
        ({"model": "tiny", "prompt": "Emma", "colour": "red"}, KEY, 400, "colour", "does not know the field"),
        ({"model": "tiny", "prompt": ["Emma", "It was"], "n": 9}, KEY, 400, "n", "18 samples (prompts times n)"),
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


def test_a_full_queue_answers_429_with_retry_after(tiny_model_dir):
    import asyncio

    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.generation import prompt_ids
    from austen_gpt.serving.app import Limits, Metrics, create_app
    from austen_gpt.serving.engine import Engine, Job, Row
    from austen_gpt.settings import SamplingSettings

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1, observe=metrics.observe)
    long = SamplingSettings(max_new_tokens=5000, paragraphs=None)
    loop = asyncio.new_event_loop()
    jobs = [Job([Row(prompt_ids(tokenizer, "Emma"), 0, k, long, 5000)], loop) for k in range(2)]
    engine.submit(jobs[0])
    while engine.waiting:  # the worker has taken the first: it runs, and the second waits
        time.sleep(0.01)
    engine.submit(jobs[1])
    with TestClient(create_app(engine, "tiny", Limits(100, 128, 1), None, metrics)) as http:
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
def test_sigterm_finishes_the_requests_in_flight_and_exits_0(tiny_model_dir):
    process, url = start_server(tiny_model_dir, "--model-name", "tiny")
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
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.serving.app import Limits, Metrics, create_app
    from austen_gpt.serving.engine import Engine
    from austen_gpt.settings import SamplingSettings

    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), load_tokenizer(str(tiny_model_dir))
    metrics = Metrics()
    engine = Engine(model, tokenizer, max_batch=4, max_queue=4, observe=metrics.observe)
    limits = Limits(100, 128, 4, SamplingSettings(top_k=1))
    with TestClient(create_app(engine, "tiny", limits, None, metrics)) as http:

        def text(**fields) -> str:
            body = {"model": "tiny", "prompt": "Emma", "max_tokens": 12, "paragraphs": None, **fields}
            return http.post("/v1/completions", json=body).json()["choices"][0]["text"]

        assert text(seed=1) == text(seed=2)
        assert text(seed=1, top_k=50) != text(seed=2, top_k=50)
