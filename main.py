"""Entry point: `python main.py [flags]` trains (or samples, with --train false).
Under torchrun (`torchrun --nproc_per_node K main.py ...`) it trains with
DistributedDataParallel; --parallel starts that for all visible GPUs."""
import os
import sys

import torch
import torch.distributed as dist

from experiment import run_sweep
from parameter import get_parameters
from trainer import Trainer
from utils import UserError, configure_backends, unlock_run


def relaunch_with_torchrun():
    """--parallel outside torchrun: run this same command under torchrun, one process per
    GPU. With fewer than two GPUs there is nothing to spread over."""
    n = torch.cuda.device_count()
    if n < 2:
        print(f"--parallel: {n} GPU(s) visible, training in one process "
              f"(several machines: torchrun --nnodes N --nproc_per_node K main.py ...)")
        return
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
            os.path.abspath(__file__), *sys.argv[1:]]
    os.execv(sys.executable, args)


def fail(error):
    """A user mistake: one line and exit code 2, no traceback."""
    print(f"main.py: error: {error}", file=sys.stderr)
    sys.exit(2)


def init_distributed(cfg):
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = cfg.device == "cuda"  # resolved by parameter.py
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def main(argv=None):
    try:
        return run(argv)
    except KeyboardInterrupt:  # Ctrl-C before training took over the signal (start-up): nothing to save
        print("main.py: interrupted", file=sys.stderr)
        return 130
    finally:
        unlock_run()


def run(argv):
    try:
        cfg = get_parameters(argv)
    except UserError as e:
        fail(e)
    if cfg.sweep:  # --span / --seed lists: one run per cell, each in its own process
        try:
            return run_sweep(cfg, sys.argv[1:] if argv is None else list(argv), os.path.abspath(__file__))
        except UserError as e:  # e.g. a cell's fid.csv the final report cannot read
            fail(e)
    if cfg.parallel and "WORLD_SIZE" not in os.environ:
        relaunch_with_torchrun()
    distributed = init_distributed(cfg)
    configure_backends(cfg)
    try:
        trainer = Trainer(cfg)
        trainer.train() if cfg.train else trainer.sample()
    except UserError as e:
        fail(e)
    finally:
        if distributed:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
