"""KV and scheduling benchmark. Prints:

1. scheduler planning time per step with 1,024 running requests (decode steps,
   the pure ``Scheduler`` with the real KV manager logic, a no-op worker);
2. KV exchange time per step at batch 256: building the step's ``KvSync``,
   msgpack both ways, the KV manager applying it, and the lease applied back;
3. prefix-cache hit rate and throughput on a shared-prefix workload with the
   cache on and off, in the same run, through ``InProcessEngine`` (the real
   scheduler, KV manager and model runner in one process).

    python -m bench.kv_bench [--device cpu|cuda] [--requests 64] [--prefix-len 256]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import msgspec

from bench.inprocess import InProcessEngine
from services.kvcache.manager import KvManager
from services.scheduler.config import SchedulerConfig
from services.scheduler.scheduler import Scheduler
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.generation import DetokenizeSpec, SamplingParams, Submit
from shared.protocol.kv import KvLease, KvSync
from shared.protocol.step import StepPlan, StepResult

WORKER = "worker/0"


def fake_step(plan: StepPlan, computed: dict[str, int], lengths: dict[str, int]) -> StepResult:
    """What a worker answers, without a model: one token per request whose computed
    count reaches its length."""
    for new in plan.new:
        computed[new.request_id] = new.num_computed_tokens
        lengths[new.request_id] = len(new.token_ids) // 4
    for rid in plan.finished:
        computed.pop(rid, None)
        lengths.pop(rid, None)
    ids: list[str] = []
    for rid, n in zip(plan.batch.request_ids, unpack_i32(plan.batch.num_tokens), strict=True):
        computed[rid] += n
        if computed[rid] >= lengths[rid]:
            lengths[rid] = computed[rid] + 1
            ids.append(rid)
    return StepResult(plan.step_id, ids, pack_i32([7] * len(ids)))


def steady_decode(running: int, block_size: int = 16, prompt_len: int = 100,
                  steps: int = 200, wire: bool = False) -> tuple[list[float], list[float]]:
    """Run ``running`` requests into steady decoding; per step, the time spent in
    ``plan`` and in the KV exchange (with ``wire``, through the msgpack encoding)."""
    config = SchedulerConfig(max_num_seqs=running, max_num_batched_tokens=max(2048, running),
                             max_prefill_chunk=512, max_waiting=running, lease_blocks=512,
                             steps_in_flight=1)
    scheduler, kv = Scheduler(config), KvManager()
    blocks = running * (-(-(prompt_len + steps + 64) // block_size)) + 1024
    details = WorkerDetails(model="bench", num_kv_blocks=blocks, block_size=block_size,
                            max_model_len=4096, vocab_size=32000, eos_token_ids=[2],
                            device="none")
    scheduler.on_lease(kv.open_pool(scheduler.add_worker(WORKER, details)))
    exchange = wire_exchange(kv) if wire else kv.sync
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=10_000, temperature=0.0, ignore_eos=True)
    for i in range(running):
        prompt = [rng.randrange(3, 32000) for _ in range(prompt_len)]
        scheduler.submit(Submit(f"r{i}", pack_i32(prompt), sampling, DetokenizeSpec()), "bench")
    computed: dict[str, int] = {}
    lengths: dict[str, int] = {}
    slot = scheduler.workers[WORKER]
    plan_times: list[float] = []
    sync_times: list[float] = []
    warm = 0
    while len(plan_times) < steps:
        t0 = time.perf_counter()
        plan = scheduler.plan(WORKER)
        t1 = time.perf_counter()
        sync = slot.lease.sync_message()
        if sync is not None:
            scheduler.on_lease(exchange(sync))
        t2 = time.perf_counter()
        if plan is None:
            continue
        scheduler.on_result(WORKER, fake_step(plan, computed, lengths))
        scheduler.take_outputs()
        decoding = len(plan.batch.request_ids) == running and not plan.new
        warm = warm + 1 if decoding else 0
        if warm > 2:  # every request decodes: the steady state being measured
            plan_times.append(t1 - t0)
            sync_times.append(t2 - t1)
    return plan_times, sync_times


def wire_exchange(kv: KvManager) -> Callable[[KvSync], KvLease]:
    """The KV exchange as the mesh does it, minus the socket: encode, decode,
    apply, encode the lease, decode it."""
    encoder = msgspec.msgpack.Encoder()
    sync_decoder = msgspec.msgpack.Decoder(KvSync)
    lease_decoder = msgspec.msgpack.Decoder(KvLease)

    def exchange(sync: KvSync) -> KvLease:
        lease = kv.sync(sync_decoder.decode(encoder.encode(sync)))
        return lease_decoder.decode(encoder.encode(lease))

    return exchange


def ms(values: list[float]) -> str:
    values = sorted(values)
    p50 = statistics.median(values) * 1e3
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))] * 1e3
    return f"mean {statistics.fmean(values) * 1e3:.3f} ms  p50 {p50:.3f} ms  p99 {p99:.3f} ms"


def shared_prefix_workload(args: argparse.Namespace) -> None:
    from services.worker.runner import ModelRunner
    from shared.embedded_model import ensure_embedded_model

    model_dir = args.model or ensure_embedded_model()
    runner = ModelRunner(model_dir, device=args.device, num_kv_blocks=args.kv_blocks,
                         block_size=16)
    rng = random.Random(1)
    vocab = runner.model.config.vocab_size
    prefixes = [[rng.randrange(3, vocab) for _ in range(args.prefix_len)]
                for _ in range(args.prefixes)]
    prompts = [rng.choice(prefixes) + [rng.randrange(3, vocab) for _ in range(args.suffix_len)]
               for _ in range(args.requests)]
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    print(f"\nshared-prefix workload: {args.requests} requests, {args.prefixes} prefixes of "
          f"{args.prefix_len} tokens + {args.suffix_len} own tokens, {args.max_tokens} "
          f"outputs each, device {runner.device}")
    outputs = {}
    for caching in (False, True, False, True):  # interleaved: drift hits both alike
        runner.reset()
        config = SchedulerConfig(enable_prefix_caching=caching, max_num_seqs=256,
                                 max_num_batched_tokens=2048)
        engine = InProcessEngine(runner, config)
        start = time.perf_counter()
        done = engine.generate(prompts, sampling)
        elapsed = time.perf_counter() - start
        scheduler = engine.scheduler
        tokens = sum(len(p) for p in prompts) + sum(len(c.token_ids) for c in done)
        rate = (scheduler.stats.prefix_cache_hits / scheduler.stats.prefix_cache_queries
                if scheduler.stats.prefix_cache_queries else 0.0)
        print(f"  prefix cache {'on ' if caching else 'off'}: hit rate {rate:6.1%}  "
              f"{elapsed:7.2f} s  {args.requests / elapsed:7.2f} req/s  "
              f"{tokens / elapsed:9.0f} tok/s (prompt+output)")
        outputs.setdefault(caching, [c.token_ids for c in done])
    print(f"  outputs identical with the cache on and off: {outputs[True] == outputs[False]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="")
    parser.add_argument("--kv-blocks", type=int, default=4096)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prefixes", type=int, default=4)
    parser.add_argument("--prefix-len", type=int, default=256)
    parser.add_argument("--suffix-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--skip-model", action="store_true")
    args = parser.parse_args()

    plan_times, _ = steady_decode(1024, steps=args.steps)
    print(f"planning time per step, 1,024 running requests: {ms(plan_times)}")
    _, sync_times = steady_decode(256, steps=args.steps, wire=True)
    print(f"KV exchange per step, batch 256 (encode, apply, lease back): {ms(sync_times)}")
    if not args.skip_model:
        shared_prefix_workload(args)


if __name__ == "__main__":
    main()
