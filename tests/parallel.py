"""A pytest plugin (loaded by pytest.ini's `-p parallel`): where pytest-xdist is installed
(requirements-dev.txt), `python -m pytest -q tests` runs on every core, each test file in one
worker process, so that a module's fixtures (its training runs) are built once. Where it is
not (the GPU machine's bare environment), the suite runs in one process as before.
`-n 0` or `-p no:xdist` turn it off; an explicit `-n N` or `--dist` wins."""


def pytest_load_initial_conftests(early_config, parser, args):
    if not early_config.pluginmanager.has_plugin("xdist"):
        return
    explicit = any(a.startswith(("-n", "--numprocesses", "--dist", "--pdb", "--collect-only", "--co")) for a in args)
    if not explicit:
        # --no-loadscope-reorder: xdist (3.6+) otherwise hands out files by their number of tests,
        # whatever the order below, and the longest files ran last, one core idle meanwhile
        args[:] = ["-n", "auto", "--dist", "loadfile", "--no-loadscope-reorder", *args]


# The files that take longest, longest first (measured at 3e41bd8 on 2 cores on a fresh machine,
# where test_gan_step.py's torch.compile finds no kernel cache; the rest keep their order after
# them). xdist hands files to workers in collection order: a long file handed out last would
# run alone at the end while the other cores idle.
LONGEST_FIRST = ("test_slurm.py", "test_gan_step.py", "test_sweep.py", "test_distributed.py", "test_trainer.py",
                 "test_metrics.py", "test_features.py", "test_gpu_path.py", "test_fid.py", "test_run.py",
                 "test_runlog.py", "test_api.py", "test_sagan_models.py", "test_bench.py", "test_inception.py",
                 "test_report_html.py", "test_checkpoint.py", "test_compare.py", "test_main.py", "test_parameter.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
