"""Block staging (services/worker/kv_transfer/staging.py) on the CPU, and on CUDA
when there is one: gather then scatter moves every byte to the right blocks and
touches no other; the NCCL data path refuses to start where it cannot run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.kv_transfer_peer import seeded_cache
from services.worker.kv_cache import PagedKVCache
from services.worker.kv_transfer.nccl import NcclDataPath, nccl_available
from services.worker.kv_transfer.staging import BlockStager

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gather_then_scatter_moves_exactly_the_named_blocks(device: str,
                                                            dtype: torch.dtype) -> None:
    source = BlockStager(seeded_cache(3, 40, 16, 2, 8, dtype, 5, device))
    target_cache = PagedKVCache(3, 40, 16, 2, 8, torch.device(device), dtype)
    target = BlockStager(target_cache)
    assert source.layout == target.layout and source.block_bytes == target.block_bytes
    staged = source.gather([7, 3, 30])
    assert staged.device.type == "cpu" and staged.is_contiguous()
    assert staged.is_pinned() == (device == "cuda")
    payload = memoryview(staged.view(-1).view(torch.uint8).numpy())
    assert payload.nbytes == 3 * source.block_bytes
    target.scatter([0, 39, 12], payload)
    src_k, dst_k = source._k, target_cache._k
    for src, dst in ((7, 0), (3, 39), (30, 12)):
        assert torch.equal(src_k[:, src].cpu(), dst_k[:, dst].cpu())
        assert torch.equal(source._v[:, src].cpu(), target_cache._v[:, dst].cpu())
    others = [b for b in range(40) if b not in (0, 39, 12)]
    assert not target_cache._k[:, others].any() and not target_cache._v[:, others].any()


@pytest.mark.skipif(nccl_available(), reason="this host can run NCCL")
def test_the_nccl_data_path_refuses_to_start_without_cuda_and_nccl(tmp_path: Path) -> None:
    stager = BlockStager(PagedKVCache(1, 2, 16, 1, 8, torch.device("cpu"), torch.float32))
    with pytest.raises(RuntimeError, match="transfer_backend=zmq"):
        NcclDataPath(stager, str(tmp_path))
