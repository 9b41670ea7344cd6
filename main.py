"""Entry point: `python main.py [flags]` trains (or samples, with --train false; or runs a
sweep, with --span / --seed lists). Under torchrun (`torchrun --nproc_per_node K main.py
...`) it trains with DistributedDataParallel; --parallel starts that for all visible GPUs.
The flags are parsed before torch is imported: `--help` and a bad flag answer at once."""
import os
import sys

from parameter import parse_flags
from utils import UserError


def relaunch_with_torchrun():
    """--parallel outside torchrun: run this same command under torchrun, one process per
    GPU. With fewer than two GPUs there is nothing to spread over."""
    import torch
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


def init_distributed(device: str) -> bool:
    import torch
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    return True


def main(argv=None):
    try:
        return run(sys.argv[1:] if argv is None else list(argv))
    except KeyboardInterrupt:  # Ctrl-C before training took over the signal (start-up): nothing to save
        print("main.py: interrupted", file=sys.stderr)
        return 130
    except UserError as e:  # from the flags, the start, the data, training: one line each
        fail(e)
    finally:
        if "run" in sys.modules:
            sys.modules["run"].unlock_run()


def run(argv):
    flags = parse_flags(argv)
    from device import configure_backends, pick_device
    from run import configure, with_config
    flags = with_config(flags, argv)  # --config FILE: reads the file, so after the fast answer to bad flags
    if flags.sweep and int(os.environ.get("WORLD_SIZE", "1")) > 1:  # each rank would run the whole sweep
        raise UserError("--span/--seed lists make a sweep, which starts each cell as its own process: run it with "
                        "python main.py, not under torchrun")
    if flags.sweep and flags.launcher == "slurm":  # one Slurm job per cell
        from slurm import submit_sweep
        return submit_sweep(configure(flags=flags), argv, os.path.abspath(__file__))
    if flags.sweep:  # --span / --seed lists: one run per cell, each in its own process
        from sweep import run_sweep
        return run_sweep(configure(flags=flags), argv, os.path.abspath(__file__))
    if flags.parallel and "WORLD_SIZE" not in os.environ:
        relaunch_with_torchrun()
    distributed = init_distributed(pick_device(flags.device).type)
    try:
        cfg = configure(flags=flags)  # after the process group: the random seed drawn is rank 0's
        configure_backends(cfg)
        from trainer import Trainer
        trainer = Trainer(cfg)
        trainer.train() if cfg.train else trainer.sample()
    finally:
        if distributed:
            import torch.distributed as dist
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
