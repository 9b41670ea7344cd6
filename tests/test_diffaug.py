"""DiffAugment: each transform against a direct per-image reference written from the
paper's definitions, gradients, and where the trainer applies it."""
import math

import numpy as np
import torch

import choices
import diffaug
from conftest import TINY, run_main
from run import configure


def fixed_rand(u):
    """A rand(n, k) that returns the given (n, k) uniforms (so tests know every draw)."""
    u = torch.as_tensor(u, dtype=torch.float32)
    return lambda n, k: u[:n, :k]


def test_translation_moves_pixels_and_fills_zeros():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 16, 16, generator=g) * 2 - 1
    u = torch.rand(6, 2, generator=g)
    u[0], u[1] = torch.tensor([0.0, 0.0]), torch.tensor([0.9999, 0.5])  # the extreme shifts
    out = diffaug.translation(x, fixed_rand(u))
    r = 2  # int(16 / 8 + 0.5)
    for b in range(6):
        dy, dx = (int(math.floor(v * (2 * r + 1))) - r for v in u[b].tolist())
        ref = torch.zeros(3, 16, 16)
        for i in range(16):
            for j in range(16):
                if 0 <= i - dy < 16 and 0 <= j - dx < 16:
                    ref[:, i, j] = x[b, :, i - dy, j - dx]
        assert torch.equal(out[b], ref), (b, dy, dx)
    assert {int(math.floor(v * 5)) - 2 for v in u[:, 0].tolist()} >= {-2, 2}


def test_cutout_zeros_a_half_size_square_around_a_uniform_centre():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g) + 1  # no zeros of its own
    u = torch.rand(8, 2, generator=g)
    u[0] = torch.tensor([0.0, 0.99])  # a corner: the square is clipped
    out = diffaug.cutout(x, fixed_rand(u))
    for b in range(8):
        cy, cx = int(u[b, 0] * 16), int(u[b, 1] * 16)
        ref = x[b].clone()
        for i in range(16):
            for j in range(16):
                if cy - 4 <= i < cy + 4 and cx - 4 <= j < cx + 4:  # side 8 = 16 / 2
                    ref[:, i, j] = 0
        assert torch.equal(out[b], ref), b
    assert (out[0] == 0).all(0).sum() == 4 * 5  # clipped at the corner: rows 0-3, columns 11-15


def test_color_is_brightness_saturation_contrast_as_defined():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    u = torch.tensor([[0.75, 0.5, 0.5],  # +0.25, saturation ×1, contrast ×1
                      [0.5, 0.0, 0.5],  # saturation ×0: every pixel its channel mean
                      [0.0, 0.99, 0.0]])  # brightness −0.5, saturation ×1.98, contrast ×0.5
    out = diffaug.color(x, fixed_rand(u)).double()
    xd = x.double().numpy()
    torch.testing.assert_close(out[0], torch.from_numpy(xd[0] + 0.25))
    grey = xd[1].mean(axis=0, keepdims=True)
    torch.testing.assert_close(out[1], torch.from_numpy(np.repeat(grey, 3, axis=0)))
    y = xd[2] - 0.5
    y = (y - y.mean(0, keepdims=True)) * 1.98 + y.mean(0, keepdims=True)
    y = (y - y.mean()) * 0.5 + y.mean()
    torch.testing.assert_close(out[2], torch.from_numpy(y), rtol=1e-5, atol=1e-6)


def test_draws_are_independent_per_image_and_in_range():
    torch.manual_seed(0)
    x = torch.zeros(256, 3, 8, 8)
    shifted = diffaug.color(x, lambda n, k: torch.rand(n, k))[:, 0, 0, 0]  # grey images: brightness only
    assert shifted.min() >= -0.5 and shifted.max() < 0.5 and shifted.std() > 0.2
    ones = torch.ones(256, 1, 16, 16)
    moved = diffaug.augment(ones, "translation,cutout")
    assert len({tuple(m.flatten().tolist()) for m in moved}) > 200  # different per image


def test_gradients_flow_to_the_input():
    torch.manual_seed(0)
    x = (torch.rand(4, 3, 16, 16) * 2 - 1).requires_grad_(True)
    u = torch.rand(4, 2)
    diffaug.translation(x, fixed_rand(u)).sum().backward()
    for b in range(4):  # d sum / d x = 1 exactly where a source pixel lands inside the image
        dy, dx = (int(math.floor(v * 5)) - 2 for v in u[b].tolist())
        ref = torch.zeros(16, 16)
        ref[max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)] = 1
        assert torch.equal(x.grad[b, 0], ref)
    x.grad = None
    diffaug.augment(x, "color,translation,cutout").square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad != 0).any()


def test_policy_is_parsed_in_canonical_order_and_bad_names_are_one_line(tmp_path):
    assert choices.parse_policy("cutout, color") == "color,cutout"
    assert choices.parse_policy("none") == choices.parse_policy("") == ""
    r = run_main([*TINY, "--diffaug", "colour"], cwd=tmp_path)
    assert r.returncode == 2 and "--diffaug 'colour': unknown transform(s) colour" in r.stderr
    r = run_main([*TINY, "--diffaug", "none,color"], cwd=tmp_path)  # not quietly color
    assert r.returncode == 2 and "--diffaug 'none,color': none turns augmentation off, so it goes alone" in r.stderr
    assert configure(["--dataset", "emoji"]).diffaug == "color,translation,cutout"
    assert configure(["--dataset", "celeb"]).diffaug == ""
    assert configure(["--diffaug", "none"]).version == "sagan_emoji_span0_nodiffaug"


