"""Run under torchrun by test_ddp.py to check that a hung job fails with its ranks' stacks:
rank 1 sleeps, rank 0 waits for it in a barrier. Each rank touches ``<DIR>/rank<r>`` (DIR: the
first argument) just before it gets stuck."""

import sys
import time
from pathlib import Path

import torch.distributed as dist


def sleep_forever() -> None:
    time.sleep(3600)


if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    (Path(sys.argv[1]) / f"rank{rank}").touch()
    if rank == 1:
        sleep_forever()
    dist.barrier()
