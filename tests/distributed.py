"""launch_local, a torchrun stand-in for the tests that train on two processes
(test_training.py, test_ddp_caption.py)."""

import os
import socket
import tempfile

import torch

import training as T


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launched(rank, world_size, port, out_dir, fn, args):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # the processes share the machine's cores
    try:
        result = fn(*args)
    finally:
        T.cleanup_distributed()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def launch_local(fn, *args, world_size=2):
    """Run fn(*args) in world_size fresh processes on this machine, each with the environment
    torchrun would give it (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1, a free
    MASTER_PORT), so fn calls training.setup_distributed("cpu") as a training script would.
    fn must be defined at module level (it is pickled by name). Returns fn's return values by
    rank; they travel through torch.save, so keep them to tensors and plain values. An
    exception on any rank is raised here."""
    with tempfile.TemporaryDirectory() as out_dir:
        torch.multiprocessing.spawn(_launched, args=(world_size, _free_port(), out_dir, fn, args),
                                    nprocs=world_size)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=True) for r in range(world_size)]
