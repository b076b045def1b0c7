from __future__ import annotations

import msgspec


class WorkerConfig(msgspec.Struct, frozen=True):
    """GPU worker settings (env MESHSERVE_<FIELD>)."""

    model: str = ""  # Hugging Face folder or hub id; empty: the embedded default
    revision: str = ""  # a hub model's branch, tag or commit; empty: main
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (cpu: float32, cuda: bfloat16) | float32 | bfloat16 | float16
    # "" (weights in dtype) | fp8: the projections quantized to FP8 at load, per
    # output channel, activations per token (services/worker/models/quantization.py).
    quantization: str = ""
    # auto (the model's dtype) | fp8: K/V stored as float8 e4m3, half the bytes a
    # block (services/worker/kv_cache.py).
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int = 0  # 0: sized from free memory (cpu: 4096 blocks)
    max_model_len: int = 0  # 0: the model's max_position_embeddings
    # CUDA: decode steps of up to this many requests replay captured CUDA graphs
    # (0: never; every step runs eagerly).
    cuda_graph_max_batch: int = 256
    # CUDA: steps with prefill chunks of up to this many tokens (and at most
    # cuda_graph_max_batch requests) replay captured graphs too (0: eager).
    cuda_graph_max_tokens: int = 2048
    # CUDA: launch step N+1 before collecting step N, so host work overlaps the
    # GPU's (false: each step is collected before the next is launched). The CPU
    # computes at launch, so it never overlaps.
    overlap_steps: bool = True
    torch_threads: int = 0  # 0: all cores but one on CPU (the mesh needs one), torch's on CUDA
    # Testing the watchdog only: the first step to find this file removes it and
    # never completes, as a hung kernel would (empty: off).
    fault_stall_file: str = ""
    # KV transfers between workers (services/worker/README.md): where this worker's
    # transfer socket binds and is advertised (the supervisor hands out one per
    # worker; empty: no transfer engine, transfer commands fail).
    transfer_addr: str = ""
    transfer_chunk_bytes: int = 8 << 20  # one chunk frame (K and V of whole blocks)
    transfer_window: int = 4  # chunks in flight per transfer (the receiver's credit)
    # zmq: blocks through host staging over the transfer socket; nccl: the block
    # data over torch.distributed NCCL between GPUs (kv_transfer/nccl.py), for
    # multi-GPU runs, both workers of a pair on one host; it needs CUDA and NCCL
    # and the worker refuses to start without them.
    transfer_backend: str = "zmq"
    # nccl: where a sender makes each worker pair's rendezvous file (FileStore),
    # shared by both workers of a pair (one host). Empty: <tmp>/meshserve-nccl-<uid>.
    transfer_nccl_store_dir: str = ""
    # prefill | decode | both: the part of each request the scheduler gives this
    # worker (services/scheduler/README.md, Roles). The supervisor sets it per replica
    # from `--worker-roles`.
    worker_role: str = "both"

    def __post_init__(self) -> None:
        if self.worker_role not in ("prefill", "decode", "both"):
            raise ValueError(
                f"worker_role must be prefill, decode or both, not {self.worker_role!r}")
