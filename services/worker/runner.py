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

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from services.worker.device import (
    default_num_kv_blocks,
    prefer_shape_agnostic_attention,
    resolve_device,
    resolve_dtype,
)
from services.worker.kv_cache import HostKVStore, PagedKVCache
from services.worker.models.config import load_config
from services.worker.models.llama import LlamaModel
from services.worker.models.weights import load_weights
from services.worker.sampling import Sampler, validate_sampling
from services.worker.step_batch import RequestState, blocks_for, build_step_batch
from shared.protocol.common import WorkerDetails
from shared.protocol.envelope import pack_i32, unpack_i32
from shared.protocol.step import NewRequest, StepPlan, StepResult

if TYPE_CHECKING:
    from services.worker.cuda_step import CudaStep


@dataclass(slots=True)
class _CheckedPlan:
    """A plan that passed every check, with its arrays unpacked."""

    new: list[RequestState]
    num_tokens: list[int]
    block_owner: list[int]
    block_ids: list[int]
    copy_src: list[int]
    copy_dst: list[int]
    replaces: list[tuple[int, int, int]]  # (request index, table position, block)
    swap_out: dict[str, tuple[list[int], list[int]]]  # request -> (device, host) blocks
    swap_in: dict[str, tuple[list[int], list[int]]]  # request -> (host, device) blocks


class PlanError(ValueError):
    """A plan that cannot run; its message goes back in ``StepResult.error``."""


def _unpack(data: bytes, what: str) -> list[int]:
    if len(data) % 4:
        raise PlanError(f"{what}: {len(data)} bytes is not a whole number of int32")
    return unpack_i32(data).tolist()


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
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.model_dir = Path(model_dir)
        self.device = resolve_device(device)
        prefer_shape_agnostic_attention(self.device)
        self.dtype = resolve_dtype(dtype, self.device)
        config = load_config(self.model_dir)
        limit = config.max_position_embeddings
        if max_model_len > limit:
            raise ValueError(
                f"max_model_len {max_model_len} exceeds the model's max_position_embeddings {limit}"
            )
        self.max_model_len = max_model_len or limit
        weights = load_weights(self.model_dir, self.device, self.dtype)
        # Rope tables cover max_model_len positions, not the model's whole range.
        self.model = LlamaModel(config, weights, self.device, self.dtype, self.max_model_len)
        self.block_size = block_size
        per_block = PagedKVCache.bytes_per_block(
            config.num_layers, block_size, config.num_kv_heads, config.head_dim, self.dtype
        )
        self.kv_block_bytes = per_block
        if num_kv_blocks <= 0:
            num_kv_blocks = default_num_kv_blocks(self.device, per_block)
        self.num_kv_blocks = num_kv_blocks
        # On CUDA one block more than the scheduler is told of: CUDA-graph padding
        # rows write their K/V there, never into a request's block.
        spare = 1 if self.device.type == "cuda" else 0
        self.kv_cache = self.model.new_kv_cache(num_kv_blocks + spare, block_size)
        self.host_cache = HostKVStore(self.kv_cache)
        self.sampler = Sampler(self.device, seed)
        self.requests: dict[str, RequestState] = {}
        self._cuda: CudaStep | None = None
        if self.device.type == "cuda":
            # Imported here: Triton ships only with CUDA builds of torch.
            from services.worker.cuda_step import CudaStep

            self._cuda = CudaStep(self.model, self.kv_cache, block_size, self.max_model_len,
                                  graph_max_batch, scratch_block=num_kv_blocks)

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

    def execute(self, plan: StepPlan) -> StepResult:
        """Run one step. Results list, in plan order, the requests whose computed
        count reached their token count; each sampled one token."""
        try:
            checked = self._check(plan)
        except PlanError as e:
            return StepResult(plan.step_id, [], b"", error=str(e))
        for request_id in plan.finished:
            self.requests.pop(request_id, None)
        for state in checked.new:
            self.requests[state.request_id] = state
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
        states = [self.requests[request_id] for request_id in plan.request_ids]
        for owner, block_id in zip(checked.block_owner, checked.block_ids, strict=True):
            states[owner].block_ids.append(block_id)
        for owner, position, block_id in checked.replaces:
            states[owner].block_ids[position] = block_id
        # Copy-on-write: the copies land before any of this step's K/V writes.
        self.kv_cache.copy_blocks(checked.copy_src, checked.copy_dst)
        if not states:
            return StepResult(plan.step_id, [], b"")
        sampled_ids, tokens = self._compute(states, checked.num_tokens)
        return StepResult(plan.step_id, sampled_ids, pack_i32(tokens))

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
        reason = validate_sampling(new.sampling)
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
        )

    def _check(self, plan: StepPlan) -> _CheckedPlan:
        num_tokens = _unpack(plan.num_tokens, "num_tokens")
        block_owner = _unpack(plan.block_owner, "block_owner")
        block_ids = _unpack(plan.block_ids, "block_ids")
        count = len(plan.request_ids)
        if len(num_tokens) != count:
            raise PlanError(f"{len(num_tokens)} num_tokens for {count} request_ids")
        if len(block_owner) != len(block_ids):
            raise PlanError(f"{len(block_owner)} block_owner for {len(block_ids)} block_ids")
        if len(set(plan.request_ids)) != count:
            raise PlanError("request_ids has duplicates")
        finished = set(plan.finished)
        new: dict[str, RequestState] = {}
        for request in plan.new:
            if request.request_id in new:
                raise PlanError(f"request {request.request_id!r} is new twice")
            new[request.request_id] = self._check_new(request, finished)
        appended = [0] * count
        for owner, block_id in zip(block_owner, block_ids, strict=True):
            if not 0 <= owner < count:
                raise PlanError(f"block_owner {owner} outside request_ids (0..{count - 1})")
            if not 0 <= block_id < self.num_kv_blocks:
                raise PlanError(
                    f"block id {block_id} outside the pool (0..{self.num_kv_blocks - 1})"
                )
            appended[owner] += 1
        copy_src = _unpack(plan.copy_src, "copy_src")
        copy_dst = _unpack(plan.copy_dst, "copy_dst")
        if len(copy_src) != len(copy_dst):
            raise PlanError(f"{len(copy_src)} copy_src for {len(copy_dst)} copy_dst")
        for block_id in (*copy_src, *copy_dst):
            if not 0 <= block_id < self.num_kv_blocks:
                raise PlanError(
                    f"copied block {block_id} outside the pool (0..{self.num_kv_blocks - 1})"
                )
        replace_owner = _unpack(plan.replace_owner, "replace_owner")
        replace_index = _unpack(plan.replace_index, "replace_index")
        replace_block = _unpack(plan.replace_block, "replace_block")
        if not len(replace_owner) == len(replace_index) == len(replace_block):
            raise PlanError("replace_owner, replace_index and replace_block differ in length")
        replaces = list(zip(replace_owner, replace_index, replace_block, strict=True))
        for owner, _position, block_id in replaces:
            if not 0 <= owner < count:
                raise PlanError(f"replace_owner {owner} outside request_ids (0..{count - 1})")
            if not 0 <= block_id < self.num_kv_blocks:
                raise PlanError(
                    f"block id {block_id} outside the pool (0..{self.num_kv_blocks - 1})"
                )
        host_blocks = (plan.host_num_blocks if plan.host_num_blocks >= 0
                       else self.host_cache.num_blocks)
        swap_out = self._check_swaps(plan.swap_out_requests, plan.swap_out_owner,
                                     plan.swap_out_src, plan.swap_out_dst, "swap_out",
                                     self.num_kv_blocks, host_blocks, finished)
        swap_in = self._check_swaps(plan.swap_in_requests, plan.swap_in_owner,
                                    plan.swap_in_src, plan.swap_in_dst, "swap_in",
                                    host_blocks, self.num_kv_blocks, finished)
        for i, request_id in enumerate(plan.request_ids):
            state = new.get(request_id)
            if state is None and request_id not in finished:
                state = self.requests.get(request_id)
            if state is None:
                raise PlanError(f"unknown request {request_id!r}")
            n = num_tokens[i]
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
            if request_id in swap_out:
                raise PlanError(f"request {request_id!r} is swapped out and computed at once")
            table = (len(swap_in[request_id][1]) if request_id in swap_in
                     else len(state.block_ids))
            have = table + appended[i]
            if any(not 0 <= p < have for o, p, _ in replaces if o == i):
                raise PlanError(f"request {request_id!r}: replaces a block beyond its table")
            need = blocks_for(end, self.block_size)
            if have < need:
                raise PlanError(
                    f"request {request_id!r}: {end} positions need {need} blocks, "
                    f"its block table has {have}"
                )
        return _CheckedPlan(list(new.values()), num_tokens, block_owner, block_ids,
                            copy_src, copy_dst, replaces, swap_out, swap_in)

    def _check_swaps(self, request_ids: list[str], owner: bytes, src: bytes, dst: bytes,
                     what: str, src_blocks: int, dst_blocks: int, finished: set[str],
                     ) -> dict[str, tuple[list[int], list[int]]]:
        owners = _unpack(owner, f"{what}_owner")
        sources = _unpack(src, f"{what}_src")
        targets = _unpack(dst, f"{what}_dst")
        if not len(owners) == len(sources) == len(targets):
            raise PlanError(f"{what}_owner, {what}_src and {what}_dst differ in length")
        if len(set(request_ids)) != len(request_ids):
            raise PlanError(f"{what}_requests has duplicates")
        for request_id in request_ids:
            if request_id not in self.requests or request_id in finished:
                raise PlanError(f"{what}: unknown request {request_id!r}")
        swaps: dict[str, tuple[list[int], list[int]]] = {r: ([], []) for r in request_ids}
        for index, source, target in zip(owners, sources, targets, strict=True):
            if not 0 <= index < len(request_ids):
                raise PlanError(f"{what}_owner {index} outside {what}_requests")
            if not 0 <= source < src_blocks or not 0 <= target < dst_blocks:
                raise PlanError(f"{what}: block {source} -> {target} outside the pools "
                                f"({src_blocks} and {dst_blocks} blocks)")
            swaps[request_ids[index]][0].append(source)
            swaps[request_ids[index]][1].append(target)
        return swaps

    # -- compute ------------------------------------------------------------------

    def _compute(
        self, states: list[RequestState], num_tokens: list[int]
    ) -> tuple[list[str], list[int]]:
        with torch.inference_mode():
            if self._cuda is not None:
                samplers, hidden = self._cuda.hidden_states(states, num_tokens)
            else:
                batch = build_step_batch(states, num_tokens, self.block_size, self.device)
                samplers = batch.samplers
                hidden = self.model.forward(
                    batch.input_ids, batch.positions, batch.meta, self.kv_cache,
                    batch.sample_rows,
                )
            tokens = self.sampler.sample(
                self.model.logits(hidden),
                [states[i].sampling for i in samplers],
                [states[i].num_output_tokens for i in samplers],
            )
        for state, n in zip(states, num_tokens, strict=True):
            state.num_computed += n
        for i, token in zip(samplers, tokens, strict=True):
            states[i].token_ids.append(token)
            states[i].num_output_tokens += 1
        # Results in plan order, not the batch's decode-first order.
        by_plan = sorted(zip(samplers, tokens, strict=True))
        return [states[i].request_id for i, _ in by_plan], [t for _, t in by_plan]
