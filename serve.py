"""Serve the writer: an OpenAI-compatible HTTP API and a web page to write with it.

  python serve.py --model-path GPT2_fine_tuned_Austen            # http://127.0.0.1:8000 : the page; /v1 : the API
  python serve.py --model-path my_adapters --port 8080           # an adapter folder, on its base model
  AUSTEN_GPT_API_KEY=secret python serve.py --host 0.0.0.0       # any other host than loopback needs a key

  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' --data \\
    '{"model": "GPT2_fine_tuned_Austen", "prompt": "It was a fine morning", "max_tokens": 60, "seed": 1}'

The model is loaded once. Requests that arrive together share `generate` calls (up to --max-batch samples);
the same prompt, settings and seed give the same text as inference.py. docs/serving.md has the endpoints,
the fields, the openai client, and what to put in front of it for TLS.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys

from austen_gpt.cli import (
    ArgumentParser,
    UserError,
    add_bool_flag,
    add_flag,
    quiet_libraries,
    require,
    run_cli,
)
from austen_gpt.serving.gate import is_loopback_name  # (the standard library only: --help stays quick)

KEY_VARIABLE = "AUSTEN_GPT_API_KEY"


def build_parser() -> ArgumentParser:
    p = ArgumentParser(run_files=True, description=__doc__)
    add_flag(p, "--model-path", default="GPT2_fine_tuned_Austen", help="model or adapter folder, or a Hub id")
    add_flag(p, "--base-model", default=None, help="base model of an adapter folder (default: its adapter_config.json)")
    add_bool_flag(p, "--load-in-4bit", help="quantize the (base) model to 4-bit NF4 with bitsandbytes")
    add_flag(p, "--model-name", default=None, help="the model's id in the API (default: the folder's name)")
    add_flag(p, "--host", default="127.0.0.1", help="address to listen on; any but loopback needs --api-key")
    add_flag(p, "--port", type=int, default=8000, help="port to listen on")
    add_flag(
        p,
        "--api-key",
        default=None,
        help=f"requests must carry it as 'Authorization: Bearer KEY' (default: ${KEY_VARIABLE}, if set)",
    )
    add_flag(p, "--max-batch", type=int, default=16, help="samples drawn together in one batch, at most")
    add_flag(p, "--max-queue", type=int, default=64, help="requests waiting at most; more get 429 and Retry-After")
    add_flag(
        p,
        "--batch-window-ms",
        type=float,
        default=10,
        help="once a request arrives, wait this long for others sent at the same moment to share its batch",
    )
    add_flag(p, "--max-tokens", type=int, default=1024, help="the most new tokens one sample may ask for")
    add_flag(
        p, "--max-request-kb", type=int, default=1024, help="the largest request body, in KiB; larger ones get 413"
    )
    return p


def check_port_free(host: str, port: int) -> None:
    """Refuse, before the model loads, a port another program holds."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            raise UserError(
                f"--host {host} --port {port}: cannot listen there ({error.strerror}); choose another"
            ) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    api_key = args.api_key or os.environ.get(KEY_VARIABLE) or None
    require(
        [
            (1 <= args.port <= 65535, "--port must be between 1 and 65535"),
            (args.max_batch >= 1 and args.max_queue >= 1, "--max-batch and --max-queue must be at least 1"),
            (args.max_tokens >= 1, "--max-tokens must be at least 1"),
            (args.max_request_kb >= 1, "--max-request-kb must be at least 1"),
            (args.batch_window_ms >= 0, "--batch-window-ms must be 0 or more"),
            (
                api_key or is_loopback_name(args.host),
                f"--host {args.host} is reachable from other machines: give --api-key KEY (or set {KEY_VARIABLE})",
            ),
        ]
    )
    check_port_free(args.host, args.port)
    quiet_libraries()
    # imported once the flags are good: torch and transformers take seconds, --help and a bad flag answer at once
    import uvicorn

    from austen_gpt.models.loading import load_tokenizer
    from austen_gpt.sampling.generation import context_length
    from austen_gpt.sampling.loading import load_for_sampling, sampling_of_run
    from austen_gpt.serving.app import Limits, Metrics, create_app
    from austen_gpt.serving.engine import Engine
    from austen_gpt.settings import SamplingSettings

    model = load_for_sampling(args.model_path, args.base_model, args.load_in_4bit)
    defaults, where = sampling_of_run(args.model_path, SamplingSettings(), set())  # as inference.py's
    print(where.replace("flags given here", "fields of a request"))
    tokenizer = load_tokenizer(args.model_path)
    name = args.model_name or os.path.basename(os.path.normpath(args.model_path))
    metrics = Metrics()
    engine = Engine(model, tokenizer, args.max_batch, args.max_queue, metrics.observe, args.batch_window_ms / 1000)
    limits = Limits(args.max_tokens, context_length(model), args.max_batch, defaults, args.max_request_kb * 1024)
    app = create_app(engine, name, limits, api_key, metrics, saved_judge(args.model_path))
    where = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"
    print(f"serving {name} at {where} (the page at /, the API at /v1){' with an API key' if api_key else ''}")
    sys.stdout.flush()
    # uvicorn stops taking requests on SIGTERM, lets those in flight finish (for up to 30 s), then raises the
    # signal again for the handler it found: this one, so that a graceful stop exits 0
    signal.signal(signal.SIGTERM, lambda number, frame: None)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    print("stopped")
    return 0


def saved_judge(model_path: str):
    """The judge saved beside the model (inference.py --rerank fits one), for requests that rerank; None if none."""
    from austen_gpt.style.judge import Judge, judge_folder, weights_fingerprint

    judge = Judge.load(judge_folder(model_path), weights_fingerprint(model_path))
    found = f"the judge saved beside {model_path}" if judge else "no judge saved beside the model: requests cannot"
    print(f"rerank: {found}")
    return judge


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


if __name__ == "__main__":
    run_cli(main)
