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
        args[:] = ["-n", "auto", "--dist", "loadfile", *args]


# The files that take longest, longest first (measured on 2 cores; the rest keep their order
# after them). xdist hands files to workers in collection order: a long file handed out last
# would run alone at the end while the other cores idle.
LONGEST_FIRST = ("test_slurm.py", "test_distributed.py", "test_sweep.py", "test_features.py", "test_trainer.py",
                 "test_metrics.py", "test_gpu_path.py", "test_fid.py", "test_api.py", "test_run.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: a file's tests keep their order
