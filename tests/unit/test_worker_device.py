"""Which device a worker replica computes on."""

from __future__ import annotations

import pytest
import torch

from services.worker.device import gpu_count, replica_device, resolve_device


@pytest.mark.parametrize(("name", "replica", "gpus", "expected"), [
    ("auto", 0, 2, "cuda:0"),
    ("auto", 1, 2, "cuda:1"),
    ("cuda", 5, 4, "cuda:1"),  # more workers than GPUs: round robin
    ("cuda", 3, 1, "cuda"),  # one GPU: every replica shares it
    ("auto", 1, 0, "auto"),  # no GPU: the CPU, as auto says
    ("cuda:1", 0, 2, "cuda:1"),  # a device named outright is kept
    ("cpu", 1, 8, "cpu"),
])
def test_data_parallel_workers_spread_over_the_gpus(name: str, replica: int, gpus: int,
                                                    expected: str) -> None:
    assert replica_device(name, replica, gpus) == expected


def test_this_host_resolves_its_own_count() -> None:
    device = resolve_device(replica_device("auto", 1, gpu_count()))
    assert device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.device_count() > 1:
        assert device.index == 1
