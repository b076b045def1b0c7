"""Serving benchmark against a running OpenAI-compatible server, in the manner of
``vllm bench serve``.

    python -m bench.serve --base-url http://127.0.0.1:8000 --dataset-name random \\
        --random-input-len 512 --random-output-len 128 --num-prompts 1024 \\
        --max-concurrency 256 --num-warmups 32 --save-result --result-dir bench/results

Load: --request-rate R (Poisson arrivals; inf, the default, sends everything at
once) and/or --max-concurrency N. Every request asks for exactly its output
length (max_tokens + ignore_eos) and is streamed; warm-up requests run first and
count in no figure.

Prompts: on /v1/completions they are token ids (exact input lengths; the
vocabulary comes from --tokenizer DIR, else from the model folder the server names
in /v1/models when it exists on this machine, or the embedded model's cache
folder, else --vocab-size). With
--text-prompts, and always on /v1/chat/completions, they are text of exact length
built with that folder's tokenizer (chat adds its template's tokens on top; the
figures use the server's usage counts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx

from bench import plots
from bench.client import COMPLETIONS, ENDPOINTS, Endpoint, make_client, send
from bench.datasets import DATASETS, DatasetSpec, SampleRequest, generate
from bench.load import arrival_offsets, run_load
from bench.metrics import (
    RequestRecord,
    calculate_metrics,
    format_table,
    parse_goodput,
)
from bench.progress import ProgressBar
from bench.prompts import TextPrompts, TokenIdPrompts, elide
from bench.results import build_result, result_path, save_result

# vLLM's client timeout: a benchmark at a saturating load may wait very long.
DEFAULT_TIMEOUT_S = 6 * 60 * 60


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.serve", description=__doc__.splitlines()[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    server = p.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000")
    server.add_argument("--endpoint", default=COMPLETIONS, choices=ENDPOINTS)
    server.add_argument("--model", default="", help="model id (default: the first of /v1/models)")
    server.add_argument("--label", default="", help="result name prefix (default: endpoint kind)")
    server.add_argument("--temperature", type=float, default=0.0)
    server.add_argument("--extra-body", default="{}", help="JSON merged into every request body")
    server.add_argument("--request-timeout", type=float, default=DEFAULT_TIMEOUT_S, help="seconds")

    data = p.add_argument_group("dataset")
    data.add_argument("--dataset-name", default="random", choices=DATASETS)
    data.add_argument("--num-prompts", type=int, default=1000)
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--random-input-len", type=int, default=1024)
    data.add_argument("--random-output-len", type=int, default=128)
    data.add_argument("--random-range-ratio", type=float, default=0.0)
    data.add_argument("--prefix-len", type=int, default=256, help="prefix set: shared tokens")
    data.add_argument("--num-prefixes", type=int, default=8, help="prefix set: distinct prefixes")
    data.add_argument("--sharegpt-output-len", type=int, default=None,
                      help="sharegpt-like: fixed output length instead of the drawn one")
    data.add_argument("--tokenizer", default="", help="Hugging Face folder (tokenizer.json)")
    data.add_argument("--vocab-size", type=int, default=0,
                      help="token-id prompts without a model folder: ids 0..N-1")
    data.add_argument("--text-prompts", action="store_true",
                      help="text prompts on /v1/completions too (needs a tokenizer)")

    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=float("inf"),
                      help="requests per second (Poisson); inf: all at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the arrivals: 1 is Poisson, < 1 burstier")
    load.add_argument("--max-concurrency", type=int, default=None)
    load.add_argument("--num-warmups", type=int, default=0)

    out = p.add_argument_group("results")
    out.add_argument("--goodput", nargs="+", default=[], metavar="SLO",
                     help="SLOs in ms, e.g. ttft:500 tpot:50 e2el:10000")
    out.add_argument("--metric-percentiles", default="50,90,99")
    out.add_argument("--save-result", action="store_true")
    out.add_argument("--result-dir", default=".")
    out.add_argument("--result-filename", default=None)
    out.add_argument("--metadata", nargs="*", default=[], metavar="KEY=VALUE")
    out.add_argument("--plot", action="store_true", help="latency CDF and throughput PNGs")
    out.add_argument("--verbose", action="store_true", help="print every request")
    out.add_argument("--no-progress", action="store_true")
    return p


async def served_model(client: httpx.AsyncClient, base_url: str, wanted: str) -> tuple[str, str]:
    """(model id, its ``root`` folder or "") from /v1/models."""
    response = await client.get(base_url.rstrip("/") + "/v1/models")
    response.raise_for_status()
    cards: list[dict[str, Any]] = response.json()["data"]
    if not cards:
        raise SystemExit(f"{base_url}/v1/models lists no model")
    for card in cards:
        if not wanted or card["id"] == wanted:
            return card["id"], str(card.get("root") or "")
    return wanted, ""  # a server may serve ids it does not list


def model_folder(args: argparse.Namespace, model: str, root: str) -> Path | None:
    """--tokenizer, else the served model's folder when it is on this machine (the
    embedded default is named, not a path: found in its cache folder)."""
    if args.tokenizer:
        return Path(args.tokenizer)
    if root and Path(root).is_dir():
        return Path(root)
    # Imported here: shared.embedded_model imports torch, which a client benchmarking
    # some other server need not have.
    from shared.embedded_model import SERVED_NAME, embedded_model_dir

    if model == SERVED_NAME and embedded_model_dir().is_dir():
        return embedded_model_dir()
    return None


def prompt_source(args: argparse.Namespace, folder: Path | None) -> TokenIdPrompts | TextPrompts:
    if args.endpoint != COMPLETIONS or args.text_prompts:
        if folder is None:
            raise SystemExit("text prompts need a tokenizer: pass --tokenizer DIR")
        return TextPrompts.from_model_dir(folder)
    if args.vocab_size:
        return TokenIdPrompts.of_vocab(args.vocab_size)
    if folder is None:
        raise SystemExit(
            "token-id prompts need the vocabulary: pass --tokenizer DIR or --vocab-size N "
            "(the server names no model folder on this machine)"
        )
    return TokenIdPrompts.from_model_dir(folder)


def print_request(index: int, sample: SampleRequest, record: RequestRecord, text: str) -> None:
    outcome = (f"ttft {1000 * record.ttft_s:.1f} ms, {record.output_tokens} tokens, "
               f"e2e {1000 * record.latency_s:.1f} ms" if record.success else record.error)
    reply = text if len(text) <= 80 else f"{text[:60]!r} ... ({len(text)} chars)"
    print(f"[{index}] prompt {elide(sample.prompt)} ({record.prompt_len} tokens, "
          f"{sample.output_len} asked) -> {outcome}; {reply!r}")


@dataclass(frozen=True, slots=True)
class Settings:
    """What the flags mean, checked before any request is sent."""

    spec: DatasetSpec
    slos: dict[str, float]
    percentiles: list[float]
    extra_body: dict[str, Any]
    metadata: dict[str, str]


def checked_settings(args: argparse.Namespace) -> Settings:
    """Raises ValueError naming the flag that is wrong."""
    if args.num_prompts < 1 or args.num_warmups < 0:
        raise ValueError("--num-prompts must be >= 1 and --num-warmups >= 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    extra_body = json.loads(args.extra_body)
    if not isinstance(extra_body, dict):
        raise ValueError("--extra-body must be a JSON object")
    metadata = {}
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--metadata {item!r}: write KEY=VALUE")
        metadata[key] = value
    arrival_offsets(1, args.request_rate, args.burstiness, args.seed)  # checks rate, burstiness
    percentiles = [float(q) for q in args.metric_percentiles.split(",") if q.strip()]
    if not all(0.0 <= q <= 100.0 for q in percentiles):
        raise ValueError(f"--metric-percentiles {args.metric_percentiles!r}: each in 0..100")
    return Settings(
        spec=DatasetSpec(
            name=args.dataset_name, input_len=args.random_input_len,
            output_len=args.random_output_len, range_ratio=args.random_range_ratio,
            prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
            sharegpt_output_len=args.sharegpt_output_len,
        ),
        slos=parse_goodput(args.goodput),
        percentiles=percentiles,
        extra_body=extra_body,
        metadata=metadata,
    )


async def benchmark(args: argparse.Namespace, settings: Settings) -> int:
    spec, slos = settings.spec, settings.slos
    total = args.num_prompts + args.num_warmups
    pool = min(args.max_concurrency or total, total)
    async with make_client(pool, args.request_timeout) as client:
        model, root = await served_model(client, args.base_url, args.model)
        folder = model_folder(args, model, root)
        source = prompt_source(args, folder)
        samples = generate(spec, source, total, args.seed)
        measured, warmups = samples[: args.num_prompts], samples[args.num_prompts :]
        endpoint = Endpoint(args.base_url, args.endpoint, model, args.temperature,
                            settings.extra_body)
        print(f"{args.num_prompts} requests ({args.dataset_name}; mean input "
              f"{sum(s.prompt_len for s in measured) / max(len(measured), 1):.0f} tokens, "
              f"mean output {sum(s.output_len for s in measured) / max(len(measured), 1):.0f}) "
              f"to {endpoint.url} model {model}; request rate {args.request_rate}, "
              f"max concurrency {args.max_concurrency}, {len(warmups)} warm-ups")

        async def run(batch: list[SampleRequest], records: list[RequestRecord],
                      offsets: list[float], label: str, verbose: bool) -> float:
            async def send_one(i: int, run_start: float) -> bool:
                text = await send(client, endpoint, batch[i], records[i], run_start)
                if verbose:
                    print_request(i, batch[i], records[i], text)
                return records[i].success

            # --verbose prints a line per request: that is the progress, and a bar
            # redrawn between those lines would garble them.
            progress = ProgressBar(len(batch), label, enabled=not (args.no_progress or verbose))
            return await run_load(send_one, offsets, args.max_concurrency, progress)

        def fresh(batch: list[SampleRequest]) -> list[RequestRecord]:
            return [RequestRecord(i, s.prompt_len, s.output_len) for i, s in enumerate(batch)]

        if warmups:
            warm = fresh(warmups)
            await run(warmups, warm, [0.0] * len(warmups), "warm-up", False)
            if not any(r.success for r in warm):
                print(f"every warm-up request failed, e.g. {warm[0].error}", file=sys.stderr)
                return 1
        records = fresh(measured)
        offsets = arrival_offsets(len(measured), args.request_rate, args.burstiness, args.seed)
        duration = await run(measured, records, offsets, "benchmark", args.verbose)

    metrics = calculate_metrics(records, duration, slos, settings.percentiles)
    print(format_table(metrics, slos))
    errors = Counter(r.error for r in records if not r.success)
    for error, count in errors.most_common(5):
        print(f"{count} request(s) failed: {error}", file=sys.stderr)
    run_settings = {
        "label": args.label or ("openai-chat" if endpoint.is_chat else "openai"),
        "base_url": args.base_url, "endpoint": args.endpoint, "model_id": model,
        "tokenizer_id": str(folder or ""), "dataset_name": args.dataset_name,
        "dataset": asdict(spec),
        "num_prompts": args.num_prompts, "num_warmups": args.num_warmups, "seed": args.seed,
        "request_rate": args.request_rate, "burstiness": args.burstiness,
        "max_concurrency": args.max_concurrency, "temperature": args.temperature,
        "prompt_kind": "token ids" if isinstance(source, TokenIdPrompts) else "text",
    }
    result = build_result(run_settings, metrics, records, slos, settings.metadata)
    path = result_path(Path(args.result_dir), result, args.result_filename)
    if args.save_result:
        save_result(path, result)
        print(f"result: {path}")
    if args.plot:
        try:
            for png in plots.draw(records, duration, path.with_suffix("")):
                print(f"plot: {png}")
        except ImportError as e:
            print(e, file=sys.stderr)
    return 0 if metrics.completed else 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = checked_settings(args)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    return anyio.run(benchmark, args, settings)


if __name__ == "__main__":
    sys.exit(main())
