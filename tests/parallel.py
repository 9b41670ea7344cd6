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
