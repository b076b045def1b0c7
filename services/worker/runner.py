"""``ModelRunner``: executes ``StepPlan``s on the model. Pure: no I/O, no asyncio, so a
benchmark or a test drives it in process exactly as the worker service does.

The runner keeps each request's state between steps (the protocol sends only
deltas, see shared/protocol/step.py):

    token_ids     prompt, then every sampled token (the last one is the next input)
    num_computed  how many of token_ids have K/V in the cache
    block_ids     the request's block table (append-only while it lives)

``execute`` checks the whole plan before touching anything: an inconsistent plan
is answered with an error result and leaves every request as it was.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.worker.device import (
    default_num_kv_blocks,
    prefer_shape_agnostic_attention,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
)
from services.worker.grammar import GrammarMatchers, StepMask
from services.worker.kv_cache import HostKVStore, PagedKVCache
from services.worker.models.config import load_config
from services.worker.models.llama import LlamaModel
from services.worker.models.quantization import check_quantization
from services.worker.models.weights import load_weights
from services.worker.sampling import Sampler, validate_sampling
from services.worker.step_batch import PENDING, RequestState, blocks_for, build_step_batch
from services.worker.step_sampling import DeviceLogprobs, StepSampler, prompt_spans
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import pack_i32
from shared.protocol.step import NewRequest, StepPlan, StepResult
from shared.protocol.tables import TableError, check_ids, unpack_ints

if TYPE_CHECKING:
    from services.worker.cuda_step import CudaStep


@dataclass(slots=True)
class _CheckedPlan:
    """A plan that passed every check, with its tables unpacked."""

    new: list[RequestState]
    num_tokens: list[int]
    appends: list[list[int]]  # per batch request, blocks appended to its table
    copy_src: list[int]
    copy_dst: list[int]
    replaces: dict[str, list[tuple[int, int]]]  # request -> (table position, block)
    swap_out: dict[str, tuple[list[int], list[int]]]  # request -> (device, host) blocks
    swap_in: dict[str, tuple[list[int], list[int]]]  # request -> (host, device) blocks


@dataclass(slots=True)
class LaunchedStep:
    """A step whose computation is queued on the device (or a ready ``result``:
    refused, or nothing to compute)."""

    step_id: int
    result: StepResult | None = None
    request_ids: list[str] = field(default_factory=list)  # requests that sampled, plan order
    slots: list[tuple[RequestState, int]] = field(default_factory=list)  # where each token goes
    device_ids: torch.Tensor | None = None
    host_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))
    copied: torch.cuda.Event | None = None
    logprobs: DeviceLogprobs | None = None  # on the host once ``copied`` fired
    plan_ids: list[str] = field(default_factory=list)  # the step's requests, plan order


class PlanError(ValueError):
    """A plan that cannot run; its message goes back in ``StepResult.error``."""


def _unpack(data: bytes, what: str) -> list[int]:
    try:
        return unpack_ints(data, what)
    except TableError as e:
        raise PlanError(str(e)) from e


class ModelRunner:
    """Loads a model folder and runs steps of paged, batched inference on it."""

    def __init__(
        self,
        model_dir: str | Path,
        device: str = "auto",
        dtype: str = "auto",
        num_kv_blocks: int = 0,
        block_size: int = 16,
        max_model_len: int = 0,
        seed: int | None = None,
        graph_max_batch: int = 256,
        graph_max_tokens: int = 2048,
        kernels: bool | None = None,
        quantization: str = "",
        kv_cache_dtype: str = "auto",
    ) -> None:
        """``kernels``: run steps through the Triton kernels and graphs (default:
        on CUDA only; tests turn it on for the CPU under Triton's interpreter).
        ``quantization``: "" or "fp8" (``models/quantization.py``); ``kv_cache_dtype``:
        auto or fp8 (``kv_cache.py``)."""
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        prefer_shape_agnostic_attention(self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        check_quantization(quantization, self.dtype)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype, self.dtype)
        config = load_config(self.model_dir)
        limit = config.max_position_embeddings
        if max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}"
            )
        self.max_model_len = max_model_len or limit
        weights = load_weights(self.model_dir, self.device, self.dtype)
        # Rope tables cover max_model_len positions, not the model's whole range.
        self.model = LlamaModel(config, weights, self.device, self.dtype, self.max_model_len,
                                quantization)
        del weights
        if self.device.type == "cuda":
            # The full-precision weights quantized away go back to the device, so
            # that the KV pool sized below can use their memory.
            torch.cuda.empty_cache()
        self.block_size = block_size
        per_block = PagedKVCache.bytes_per_block(
            config.num_layers, block_size, config.num_kv_heads, config.head_dim,
            self.kv_cache_dtype,
        )
        self.kv_block_bytes = per_block
        if num_kv_blocks <= 0:
            num_kv_blocks = default_num_kv_blocks(self.device, per_block)
        self.num_kv_blocks = num_kv_blocks
        # On CUDA one block more than the scheduler is told of: CUDA-graph padding
        # rows write their K/V there, never into a request's block.
        use_kernels = self.device.type == "cuda" if kernels is None else kernels
        spare = 1 if use_kernels else 0
        self.kv_cache = self.model.new_kv_cache(num_kv_blocks + spare, block_size,
                                                self.kv_cache_dtype)
        self.host_cache = HostKVStore(self.kv_cache)
        self.sampler = Sampler(self.device, seed)
        self.step_sampler = StepSampler(self.sampler, config.vocab_size, self.device)
        self.grammars = GrammarMatchers(self.model_dir, config.vocab_size,
                                        config.eos_token_ids, self.device)
        self.requests: dict[str, RequestState] = {}
        # The launched step not collected yet (CUDA): where pending tokens come from.
        self._uncollected: LaunchedStep | None = None
        # Tokens sampled by a launched, uncollected step: request -> (ids, row).
        self._feeds: dict[str, tuple[torch.Tensor, int]] = {}
        self._cuda: CudaStep | None = None
        if use_kernels:
            # Imported here: Triton ships only with CUDA builds of torch.
            from services.worker.cuda_step import CudaStep

            self._cuda = CudaStep(self.model, self.kv_cache, block_size, self.max_model_len,
                                  graph_max_batch, scratch_block=num_kv_blocks,
                                  graph_max_tokens=graph_max_tokens)

    @property
    def launches_async(self) -> bool:
        """Whether ``launch`` returns before the step is computed (CUDA): only then
        does launching the next step before collecting this one gain anything. On
        the CPU a launch computes the whole step, so collecting late would only hold
        the result back by a step."""
        return self._cuda is not None and self.device.type == "cuda"

    def details(self) -> WorkerDetails:
        config = self.model.config
        return WorkerDetails(
            model=self.model_dir.name,
            num_kv_blocks=self.num_kv_blocks,
            block_size=self.block_size,
            max_model_len=self.max_model_len,
            vocab_size=config.vocab_size,
            eos_token_ids=list(config.eos_token_ids),
            device=str(self.device),
            kv_block_bytes=self.kv_block_bytes,
        )

    def reset(self) -> None:
        """Forget every request (the scheduler that planned them is gone)."""
        self.requests.clear()
        self._feeds.clear()
        self._uncollected = None
        self.step_sampler.reset()
        self.grammars.reset()

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. Results list, in plan order, the requests whose computed
        count reached their token count; each sampled one token. The plan's parts
        apply in the order of its fields (see ``StepPlan``)."""
        return self.collect(self.launch(plan))

    def launch(self, plan: StepPlan) -> LaunchedStep:
        """Apply the plan and start its computation; ``collect`` waits for the
        sampled tokens. On CUDA the next plan may be launched before this one is
        collected: its decode inputs are fed from this step's ids on the device."""
        try:
            checked = self._check(plan)
        except (PlanError, TableError) as e:
            return LaunchedStep(plan.step_id, StepResult(plan.step_id, [], b"", error=str(e)))
        for request_id in plan.finished:
            self.requests.pop(request_id, None)
            self.step_sampler.drop(request_id)
            self.grammars.drop(request_id)
        for state in checked.new:
            self.requests[state.request_id] = state
            self.step_sampler.register(state)
            self.grammars.register(state)
        if plan.host_num_blocks >= 0:
            self.host_cache.resize(plan.host_num_blocks)
        # Host tier: a swapped-out request stays registered with an empty table; a
        # swapped-in one gets its whole table back (new device blocks).
        for request_id in checked.swap_out:
            self.requests[request_id].block_ids = []
        for request_id, (_, device) in checked.swap_in.items():
            self.requests[request_id].block_ids = list(device)
        self.host_cache.swap(
            [b for d, _ in checked.swap_out.values() for b in d],
            [b for _, h in checked.swap_out.values() for b in h],
            [b for h, _ in checked.swap_in.values() for b in h],
            [b for _, d in checked.swap_in.values() for b in d],
        )
        for request_id, edits in checked.replaces.items():
            for position, block_id in edits:
                self.requests[request_id].block_ids[position] = block_id
        # Copy-on-write: the copies land before any of this step's K/V writes.
        self.kv_cache.copy_blocks(checked.copy_src, checked.copy_dst)
        states = [self.requests[request_id] for request_id in plan.batch.request_ids]
        for state, blocks in zip(states, checked.appends, strict=True):
            state.block_ids.extend(blocks)
        if not states:
            return LaunchedStep(plan.step_id, StepResult(plan.step_id, [], b""))
        return self._launch_compute(plan.step_id, states, checked.num_tokens)

    def collect(self, launched: LaunchedStep) -> StepResult:
        """Wait for a launched step's tokens and record them in the requests."""
        if launched.result is not None:
            return launched.result
        if launched.copied is not None:
            launched.copied.synchronize()
        if self._uncollected is launched:
            self._uncollected = None
        tokens: list[int] = launched.host_ids.tolist()
        for (state, position), token in zip(launched.slots, tokens, strict=True):
            state.token_ids[position] = token
            if self._feeds.get(state.request_id, (None, 0))[0] is launched.device_ids:
                del self._feeds[state.request_id]
        return self._result(launched.step_id, launched.request_ids, tokens,
                            launched.logprobs, launched.plan_ids)

    @staticmethod
    def _result(step_id: int, request_ids: list[str], tokens: list[int],
                logprobs: DeviceLogprobs | None, plan_ids: list[str]) -> StepResult:
        if logprobs is None:
            return StepResult(step_id, request_ids, pack_i32(tokens))
        # Plan indices -> result positions: results list the samplers in plan order.
        sampled, prompt = logprobs.unpack()
        position = {r: k for k, r in enumerate(request_ids)}
        return StepResult(
            step_id, request_ids, pack_i32(tokens),
            logprobs=sorted(((position[plan_ids[i]], lp) for i, lp in sampled.items()),
                            key=lambda entry: entry[0]),
            prompt_logprobs=[(plan_ids[i], lp) for i, lp in prompt],
        )

    def _settled_outputs(self, state: RequestState) -> list[int]:
        """The request's output ids, its pending last one read from the device (a
        wait for the step before: only requests with multi-token bad words pay it)."""
        prompt_len = len(state.token_ids) - state.num_output_tokens
        outputs = state.token_ids[prompt_len:]
        if outputs and outputs[-1] == PENDING:
            ids, row = self._feeds[state.request_id]
            outputs[-1] = int(ids[row])
        return outputs

    # -- checks -------------------------------------------------------------------

    def _check_new(self, new: NewRequest, finished: set[str]) -> RequestState:
        if new.request_id in self.requests and new.request_id not in finished:
            raise PlanError(f"request {new.request_id!r} is already running")
        token_ids = _unpack(new.token_ids, f"token_ids of {new.request_id!r}")
        if not token_ids:
            raise PlanError(f"request {new.request_id!r} has no tokens")
        vocab = self.model.config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise PlanError(f"request {new.request_id!r} has token ids outside [0, {vocab})")
        if len(token_ids) > self.max_model_len:
            raise PlanError(
                f"request {new.request_id!r} has {len(token_ids)} tokens, "
                f"max_model_len is {self.max_model_len}"
            )
        if not 0 <= new.num_output_tokens < len(token_ids):
            raise PlanError(
                f"request {new.request_id!r}: num_output_tokens {new.num_output_tokens} "
                f"with {len(token_ids)} tokens (the prompt needs at least one)"
            )
        reason = (validate_sampling(new.sampling, self.model.config.vocab_size)
                  or self.grammars.check(new.sampling.grammar))
        if reason is not None:
            raise PlanError(f"request {new.request_id!r}: {reason}")
        if not 0 <= new.num_computed_tokens < len(token_ids):
            raise PlanError(
                f"request {new.request_id!r}: num_computed_tokens {new.num_computed_tokens} "
                f"with {len(token_ids)} tokens (the last one must be computed)"
            )
        return RequestState(
            request_id=new.request_id,
            token_ids=token_ids,
            # A prefix-cache hit: the first blocks of its table already hold these.
            num_computed=new.num_computed_tokens,
            block_ids=[],
            sampling=new.sampling,
            num_output_tokens=new.num_output_tokens,
            # After a recompute with outputs the prompt's logprobs were sent already.
            prompt_logprobs_end=(len(token_ids) - 1 if new.sampling.prompt_logprobs >= 0
                                 and new.num_output_tokens == 0 else 0),
        )

    def _check(self, plan: StepPlan) -> _CheckedPlan:
        """Every part of the plan, checked against the state it will meet when its
        turn comes (the order of the plan's fields). Raises PlanError/TableError."""
        finished = set(plan.finished)
        new: dict[str, RequestState] = {}
        for request in plan.new:
            if request.request_id in new:
                raise PlanError(f"request {request.request_id!r} is new twice")
            new[request.request_id] = self._check_new(request, finished)
        host_blocks = (plan.host_num_blocks if plan.host_num_blocks >= 0
                       else self.host_cache.num_blocks)
        swap_out = self._check_swaps(plan.swap_out.unpack("swap_out"), "swap_out",
                                     self.num_kv_blocks, host_blocks, finished)
        swap_in = self._check_swaps(plan.swap_in.unpack("swap_in"), "swap_in",
                                    host_blocks, self.num_kv_blocks, finished)
        tables = {r: len(s.block_ids) for r, s in self.requests.items() if r not in finished}
        tables.update((r, 0) for r in new)
        tables.update((r, 0) for r in swap_out)
        tables.update((r, len(device)) for r, (_, device) in swap_in.items())
        replaces = plan.replaces.unpack("replaces")
        for request_id, edits in replaces.items():
            if request_id not in tables:
                raise PlanError(f"replaces: unknown request {request_id!r}")
            if any(not 0 <= position < tables[request_id] for position, _ in edits):
                raise PlanError(f"request {request_id!r}: replaces a block beyond its table")
            check_ids((b for _, b in edits), self.num_kv_blocks, "block id")
        copy_src, copy_dst = plan.copies.unpack("copy")
        check_ids((*copy_src, *copy_dst), self.num_kv_blocks, "copied block")
        num_tokens, appends = plan.batch.unpack()
        for blocks in appends:
            check_ids(blocks, self.num_kv_blocks, "block id")
        for i, request_id in enumerate(plan.batch.request_ids):
            if request_id in swap_out:
                raise PlanError(f"request {request_id!r} is swapped out and computed at once")
            state = new.get(request_id)
            if state is None and request_id not in finished:
                state = self.requests.get(request_id)
            if state is None:
                raise PlanError(f"unknown request {request_id!r}")
            self._check_compute(state, num_tokens[i], tables[request_id] + len(appends[i]))
        return _CheckedPlan(list(new.values()), num_tokens, appends, copy_src, copy_dst,
                            replaces, swap_out, swap_in)

    def _check_compute(self, state: RequestState, n: int, table: int) -> None:
        """``state`` may compute ``n`` more tokens with a block table of ``table``."""
        request_id = state.request_id
        end = state.num_computed + n
        if n < 1:
            raise PlanError(f"request {request_id!r}: num_tokens {n} < 1")
        if end > len(state.token_ids):
            raise PlanError(
                f"request {request_id!r}: computing to {end} but only "
                f"{len(state.token_ids)} tokens are known"
            )
        if end > self.max_model_len:
            raise PlanError(
                f"request {request_id!r}: position {end - 1} is beyond max_model_len "
                f"{self.max_model_len}"
            )
        need = blocks_for(end, self.block_size)
        if table < need:
            raise PlanError(
                f"request {request_id!r}: {end} positions need {need} blocks, "
                f"its block table has {table}"
            )

    def _check_swaps(self, swaps: dict[str, tuple[list[int], list[int]]], what: str,
                     src_blocks: int, dst_blocks: int, finished: set[str],
                     ) -> dict[str, tuple[list[int], list[int]]]:
        for request_id, (sources, targets) in swaps.items():
            if request_id not in self.requests or request_id in finished:
                raise PlanError(f"{what}: unknown request {request_id!r}")
            for source, target in zip(sources, targets, strict=True):
                if not 0 <= source < src_blocks or not 0 <= target < dst_blocks:
                    raise PlanError(f"{what}: block {source} -> {target} outside the pools "
                                    f"({src_blocks} and {dst_blocks} blocks)")
        return swaps

    # -- compute ------------------------------------------------------------------

    def _launch_compute(
        self, step_id: int, states: list[RequestState], num_tokens: list[int]
    ) -> LaunchedStep:
        spans = prompt_spans(states, num_tokens)
        with torch.inference_mode():
            if self._cuda is not None:
                starts = [sum(num_tokens[:i]) for i in range(len(states))] if spans else []
                extra = [starts[s.index] + s.first - states[s.index].num_computed + k
                         for s in spans for k in range(s.count)]
                samplers, hidden = self._cuda.hidden_states(states, num_tokens, self._feeds,
                                                            extra)
            else:
                batch = build_step_batch(states, num_tokens, self.block_size, self.device)
                samplers = batch.samplers
                rows = batch.sample_rows
                if spans:
                    extra = [batch.row_start[s.index] + s.first - states[s.index].num_computed
                             + k for s in spans for k in range(s.count)]
                    rows = torch.cat([rows, torch.tensor(extra, device=rows.device)])
                hidden = self.model.forward(
                    batch.input_ids, batch.positions, batch.meta, self.kv_cache, rows,
                )
            # Built while the forward runs on the device (CUDA).
            mask = self._grammar_mask(states, samplers)
            ids, logprobs = self.step_sampler.sample(
                self.model.logits(hidden), states, samplers, spans, self._settled_outputs,
                mask)
            # Results in plan order (the reference batch is decodes first).
            order = sorted(range(len(samplers)), key=samplers.__getitem__)
            if order != list(range(len(order))):
                ids = ids[torch.tensor(order, device=ids.device)]
                samplers = [samplers[j] for j in order]
        for state, n in zip(states, num_tokens, strict=True):
            state.num_computed += n
        request_ids = [states[i].request_id for i in samplers]
        plan_ids = [s.request_id for s in states]
        if self._cuda is None:
            # The reference path: the tokens are known now (nothing to overlap).
            tokens = ids.tolist()
            for i, token in zip(samplers, tokens, strict=True):
                states[i].token_ids.append(token)
                states[i].num_output_tokens += 1
            return LaunchedStep(step_id, self._result(
                step_id, request_ids, tokens, logprobs and logprobs.to_host(pinned=False),
                plan_ids))
        launched = LaunchedStep(step_id, request_ids=request_ids, device_ids=ids,
                                plan_ids=plan_ids)
        for i in samplers:
            state = states[i]
            state.token_ids.append(PENDING)
            state.num_output_tokens += 1
            launched.slots.append((state, len(state.token_ids) - 1))
        for row, i in enumerate(samplers):
            self._feeds[states[i].request_id] = (ids, row)
        self._uncollected = launched
        if self.device.type != "cuda":
            launched.host_ids = ids  # (the kernels under Triton's interpreter, in tests)
            launched.logprobs = logprobs and logprobs.to_host(pinned=False)
            return launched
        # One device-to-host copy of the step's ids, waited for only in collect.
        launched.host_ids = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)
        launched.host_ids.copy_(ids, non_blocking=True)
        launched.logprobs = logprobs and logprobs.to_host(pinned=True)
        launched.copied = torch.cuda.Event()
        launched.copied.record()
        return launched

    def _grammar_mask(self, states: list[RequestState], samplers: list[int]) -> StepMask | None:
        """The grammar mask of this step's constrained sampled rows. A matcher needs
        every output id on the host: a constrained request fed its last token on the
        device waits here for the step before (its id copy only, not this step's
        forward, which is queued behind it); other requests never wait."""
        sampled = [states[i] for i in samplers]
        rows = self.grammars.constrained_rows(sampled)
        if not rows:
            return None
        pending = [sampled[j] for j in rows if sampled[j].token_ids[-1] == PENDING]
        if pending:
            step = self._uncollected
            assert step is not None, "a pending token without an uncollected step"
            if step.copied is not None:
                step.copied.synchronize()
            host = step.host_ids.tolist()
            for state in pending:
                ids, row = self._feeds[state.request_id]
                assert ids is step.device_ids
                state.token_ids[-1] = host[row]
        return self.grammars.step_mask(sampled, rows)
