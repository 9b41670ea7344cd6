import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Two cores: one intra-op thread keeps parallel test processes from thrashing.
torch.set_num_threads(1)

TINY = ["--imsize", "32", "--batch_size", "8", "--num_workers", "0", "--g_conv_dim", "16", "--d_conv_dim", "16",
        "--z_dim", "32", "--device", "cpu", "--seed", "3"]


def run_cli(args, cwd, script="main.py", timeout=300, env=None):
    """Run one of the repo's scripts as a user would; returns the CompletedProcess."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "default", **(env or {})}
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=e)


def out_dirs(tmp):
    return ["--log_path", f"{tmp}/logs", "--model_save_path", f"{tmp}/models", "--sample_path", f"{tmp}/samples",
            "--attn_path", f"{tmp}/attn"]


@pytest.fixture
def image_folder(tmp_path):
    """Nested folder of mixed images: RGB JPEGs of two sizes, a greyscale PNG, an RGBA PNG,
    a palette GIF and one corrupt file."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    for i in range(12):
        arr = rng.integers(0, 256, (40 + 8 * (i % 2), 36, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / ("a" if i % 2 else "a/b") / f"rgb{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(root / "grey.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).convert("P").save(root / "pal.gif")
    (root / "a" / "broken.jpg").write_bytes(b"this is not a jpeg")
    return root
