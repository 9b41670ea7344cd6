"""Attention layer and networks against independent references (issue 2)."""
import copy
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from choices import NO_ATTENTION
from sagan_models import (Discriminator, Generator, Self_Attn, attention_layers, count_parameters, has_keyless_queries,
                          span_mask)
from spectral import spectral_normed_layers


def brute_force_attention(layer, x, span, mode, fully_masked="mean"):
    """Independent float64 reference: explicit loops over every (query, key) pair."""
    xd = x.detach().double().numpy()
    B, C, H, W = xd.shape

    def conv1x1(conv):
        w = conv.weight.detach().double().numpy()[:, :, 0, 0]
        b = conv.bias.detach().double().numpy()
        return np.einsum("oc,bchw->bohw", w, xd) + b[None, :, None, None]

    q, k, v = conv1x1(layer.query_conv), conv1x1(layer.key_conv), conv1x1(layer.value_conv)
    gamma = layer.gamma.item()
    out = np.zeros_like(xd)
    weights = np.zeros((B, H * W, H * W))
    for b in range(B):
        for i, j in itertools.product(range(H), range(W)):
            scores, masked = [], []
            for r, c in itertools.product(range(H), range(W)):
                scores.append(float(q[b, :, i, j] @ k[b, :, r, c]))
                masked.append(span > 0 and max(abs(r - i), abs(c - j)) <= span)
            scores, masked = np.array(scores), np.array(masked)
            if mode == "pre":
                w = np.zeros(H * W)
                if (~masked).any():
                    e = np.exp(scores[~masked] - scores[~masked].max())
                    w[~masked] = e / e.sum()
                elif fully_masked == "mean":  # no key left: every key with equal weight
                    w[:] = 1.0 / (H * W)
            else:
                e = np.exp(scores - scores.max())
                w = np.where(masked, 0.0, e / e.sum())
            weights[b, i * W + j] = w
            out[b, :, i, j] = v[b].reshape(C, -1) @ w
    return gamma * out + xd, weights


def random_layer(C, span, mode, seed=0, fully_masked="mean"):
    torch.manual_seed(seed)
    layer = Self_Attn(C, span=span, mask_mode=mode, fully_masked=fully_masked)
    for p in layer.parameters():
        nn.init.normal_(p, std=0.5)
    return layer


MAPS = [(2, 2), (3, 5), (4, 4), (5, 3), (8, 8), (7, 10), pytest.param((16, 16), marks=pytest.mark.slow)]


@pytest.mark.parametrize("hw", MAPS, ids=lambda hw: "x".join(map(str, hw)) if isinstance(hw, tuple) else None)
@pytest.mark.parametrize("mode,fully_masked", [("pre", "mean"), ("pre", "skip"), ("post", "mean")])
def test_attention_matches_brute_force(hw, mode, fully_masked):
    H, W = hw
    for span in range(5):
        layer = random_layer(16, span, mode, seed=span, fully_masked=fully_masked)
        x = torch.randn(2, 16, H, W)
        ref_out, ref_w = brute_force_attention(layer, x, span, mode, fully_masked)
        with torch.no_grad():
            layer.fused = False
            out_dense, w_dense = layer(x, return_attention=True)
            layer.fused = True
            out_fused = layer(x)
        np.testing.assert_allclose(w_dense.double().numpy(), ref_w, atol=1e-5, rtol=0)
        for out in (out_dense, out_fused):
            np.testing.assert_allclose(out.double().numpy(), ref_out, atol=1e-5, rtol=1e-5)
        # Queries with every key masked pass x through exactly (pre mode by renormalising
        # nothing, post mode because every weight is zeroed).
        dead = ref_w.reshape(2, H * W, -1).sum(-1) == 0
        if dead.any():
            flat_x, flat_out = x.flatten(2).transpose(1, 2), out_fused.flatten(2).transpose(1, 2)
            assert torch.equal(flat_out[torch.from_numpy(dead)], flat_x[torch.from_numpy(dead)])


def test_fully_masked_map_is_identity_and_has_finite_grads():
    # The discriminator's 4x4 map at span 3: every key of every query is masked.
    for mode, fused in [("pre", True), ("pre", False), ("post", False)]:
        layer = random_layer(32, 3, mode, fully_masked="skip")
        layer.fused = fused
        x = torch.randn(3, 32, 4, 4, requires_grad=True)
        y, w = layer(x, return_attention=True) if not fused else (layer(x), None)
        assert torch.equal(y, x)
        if w is not None:
            assert torch.equal(w, torch.zeros_like(w))
        (y * torch.randn_like(y)).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        assert torch.isfinite(x.grad).all()


def test_span0_is_plain_unmasked_softmax_attention():
    layer = random_layer(16, 0, "pre")
    x = torch.randn(2, 16, 6, 6)
    q = layer.query_conv(x).flatten(2)
    k = layer.key_conv(x).flatten(2)
    v = layer.value_conv(x).flatten(2)
    attn = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k), dim=-1)
    expected = layer.gamma * torch.einsum("bcm,bnm->bcn", v, attn).view_as(x) + x
    for fused in (True, False):
        layer.fused = fused
        torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    _, w = layer(x, return_attention=True)
    torch.testing.assert_close(w, attn, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_masked_weights_are_exactly_zero_and_rows_sum(mode):
    H, W, span = 9, 7, 2
    layer = random_layer(16, span, mode)
    x = torch.randn(2, 16, H, W)
    _, w = layer(x, return_attention=True)
    r = torch.arange(H).repeat_interleave(W)
    c = torch.arange(W).repeat(H)
    near = (r[:, None] - r[None]).abs().maximum((c[:, None] - c[None]).abs()) <= span
    assert (w[:, near] == 0).all()
    sums = w.sum(-1)
    if mode == "pre":
        torch.testing.assert_close(sums, torch.ones_like(sums))
    else:  # not renormalised: the mass the unmasked softmax put on the square is gone
        q, k = layer.query_conv(x).flatten(2), layer.key_conv(x).flatten(2)
        full = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k), dim=-1)
        torch.testing.assert_close(sums, 1 - (full * near).sum(-1))


def test_mask_is_built_once_and_moves_with_the_layer():
    layer = Self_Attn(16, span=2)
    x = torch.randn(2, 16, 8, 8)
    layer(x)
    first = layer.mask_8x8
    for _ in range(3):
        layer(x)
    assert layer.mask_8x8 is first
    # A buffer (moves with .to()), but not saved in checkpoints.
    assert any(b is first for b in layer.buffers())
    assert "mask_8x8" not in layer.state_dict()
    layer.to(torch.float64)
    layer(x.double())
    assert layer.mask_8x8.dtype == torch.bool
    # Networks build their masks at construction, never in forward.
    G = Generator(32, span=3)
    built = [dict(m.named_buffers()) for _, m in attention_layers(G)]
    assert [sorted(b) for b in built] == [["mask_8x8", "mask_8x8_live", "mask_8x8_softmax"],
                                          ["mask_16x16", "mask_16x16_live", "mask_16x16_softmax"]]
    G(torch.randn(2, 128))
    G(torch.randn(3, 128))
    after = [dict(m.named_buffers()) for _, m in attention_layers(G)]
    assert all(a[k] is b[k] for a, b in zip(after, built) for k in b) and [len(a) for a in after] == [3, 3]


def test_first_and_last_layers_equal_the_convolutions_they_replace():
    # G's z -> 4x4 layer and D's 4x4 -> logit layer are computed as matrix products; they
    # must equal the transposed conv / conv with the same weights (torch's own conv ops).
    from sagan_models import LatentToMap, MapToLogit
    torch.manual_seed(0)
    up, down = LatentToMap(32, 24, 4), MapToLogit(24, 1, 4)
    z, x = torch.randn(5, 32), torch.randn(5, 24, 4, 4)
    torch.testing.assert_close(up(z), torch.nn.functional.conv_transpose2d(z.view(5, 32, 1, 1), up.weight, up.bias))
    torch.testing.assert_close(down(x), torch.nn.functional.conv2d(x, down.weight, down.bias).view(5))
    # channels_last weights give channels_last maps (the format the next conv uses)
    up.to(memory_format=torch.channels_last)
    y = up(z)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_channels_last_networks_compute_the_same_function():
    torch.manual_seed(0)
    G, D = Generator(32, 32, 16, span=1), Discriminator(32, 16, span=1)
    z = torch.randn(4, 32)
    G.eval(), D.eval()
    with torch.no_grad():
        ref = D(G(z))
        G.to(memory_format=torch.channels_last), D.to(memory_format=torch.channels_last)
        img = G(z)
        assert img.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(D(img), ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("size", [32, 64, pytest.param(128, marks=pytest.mark.slow)])
def test_network_shapes(size):
    G, D = Generator(size, span=2), Discriminator(size, span=2)
    for B in (1, 5):
        img = G(torch.randn(B, 128))
        assert img.shape == (B, 3, size, size)
        assert img.abs().max() <= 1
        assert D(img).shape == (B,)
    # Attention placement: G after the size/4 and size/2 maps, D after 8x8 and 4x4.
    assert [n for n, _ in attention_layers(G)] == [f"attn{size // 4}", f"attn{size // 2}"]
    assert [n for n, _ in attention_layers(D)] == ["attn8", "attn4"]


def test_parameter_counts_match_the_seed():
    assert count_parameters(Generator(64, z_dim=128, conv_dim=64)) == 3_832_885
    assert count_parameters(Discriminator(64, conv_dim=64)) == 3_175_299
    # u/v vectors are buffers
    G = Generator(64)
    assert not any("_u" in n or "_v" in n for n, _ in G.named_parameters())


def test_no_attention_networks_are_the_span0_networks_without_their_attention_layers():
    # closed form of one attention layer on C channels: query and key C -> C/8, value C -> C
    # (1x1 convs with biases), and gamma
    attn = lambda C: 2 * (C * C // 8 + C // 8) + C * C + C + 1
    G, D = Generator(64, span=NO_ATTENTION), Discriminator(64, span=NO_ATTENTION)
    assert attention_layers(G) == [] and attention_layers(D) == []
    assert count_parameters(G) == 3_832_885 - attn(128) - attn(64)
    assert count_parameters(D) == 3_175_299 - attn(256) - attn(512)
    for net, span0 in ((G, Generator(64)), (D, Discriminator(64))):
        kept = {k: v.shape for k, v in span0.state_dict().items() if ".attn" not in k}
        assert {k: v.shape for k, v in net.state_dict().items()} == kept
    G, D = Generator(32, 32, 16, span=NO_ATTENTION), Discriminator(32, 16, span=NO_ATTENTION)
    img, maps = G(torch.randn(3, 32), return_attention=True)
    assert img.shape == (3, 3, 32, 32) and maps == {} and D(img).shape == (3,)


def test_seed_architecture_at_64():
    G, D = Generator(64), Discriminator(64)
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    assert [(m.in_channels, m.out_channels) for m in g_convs] == [
        (128, 512), (512, 256), (256, 128), (128, 64), (64, 3)]
    assert [m.value_conv.in_channels for _, m in attention_layers(G)] == [128, 64]
    d_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d) and m.kernel_size == (4, 4)]
    assert [(m.in_channels, m.out_channels) for m in d_convs] == [
        (3, 64), (64, 128), (128, 256), (256, 512), (512, 1)]
    assert [m.value_conv.in_channels for _, m in attention_layers(D)] == [256, 512]
    # spectral norm on every conv but G's last and D's last
    assert len(spectral_normed_layers(G)) == 4 and len(spectral_normed_layers(D)) == 4
    assert not hasattr(g_convs[-1], "parametrizations") and not hasattr(d_convs[-1], "parametrizations")


def test_g_and_d_take_their_own_span():
    G, D = Generator(32, span=1), Discriminator(32, span=4, mask_mode="post")
    assert {m.span for _, m in attention_layers(G)} == {1}
    assert {(m.span, m.mask_mode) for _, m in attention_layers(D)} == {(4, "post")}


@pytest.mark.slow
def test_spectral_norm_largest_singular_value_is_one():
    torch.manual_seed(0)
    G, D = Generator(32), Discriminator(32)
    for _ in range(40):  # one power iteration per training forward
        D(G(torch.randn(4, 128)))
    for net in (G, D):
        for name, m in spectral_normed_layers(net):
            w = m.weight.detach()
            sigma = torch.linalg.matrix_norm(w.reshape(w.shape[0], -1), ord=2)
            assert abs(float(sigma) - 1) < 0.02, (name, float(sigma))


def test_eval_mode_does_not_touch_spectral_vectors():
    G = Generator(32)
    G(torch.randn(4, 128))
    before = {n: b.clone() for n, b in G.named_buffers() if n.endswith(("_u", "_v"))}
    G.eval()
    with torch.no_grad():
        G(torch.randn(4, 128))
    after = dict(G.named_buffers())
    assert all(torch.equal(before[n], after[n]) for n in before)
    G.train()
    G(torch.randn(4, 128))
    assert not all(torch.equal(before[n], dict(G.named_buffers())[n]) for n in before)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_autocast_is_finite_for_every_span(dtype):
    torch.manual_seed(0)
    for span in range(5):
        G, D = Generator(32, span=span), Discriminator(32, span=span)
        for m in list(attention_layers(G)) + list(attention_layers(D)):
            nn.init.constant_(m[1].gamma, 1.0)
        with torch.autocast("cpu", dtype=dtype):
            img = G(torch.randn(3, 128))
            logits = D(img)
            _, maps = G(torch.randn(3, 128), return_attention=True)
        assert torch.isfinite(img).all() and torch.isfinite(logits).all()
        assert all(torch.isfinite(w).all() for w in maps.values())
        for fully_masked in ("skip", "mean"):
            layer = random_layer(32, span, "pre", fully_masked=fully_masked)
            with torch.autocast("cpu", dtype=dtype):
                y, w = layer(torch.randn(2, 32, 4, 4), return_attention=True)
            assert torch.isfinite(y).all()
            # span >= 3 leaves no key on a 4x4 map: exactly zero weights (skip), or exactly
            # equal ones (mean), never the rounding-dependent weights of a large negative fill
            if span >= 3:
                assert (w == 0).all() if fully_masked == "skip" else (w == 1 / 16).all()


def test_fully_masked_rows_attend_to_the_mean_of_v_with_finite_grads():
    # pre mode, --fully_masked mean: D's 4x4 map at span 3 has no key left for any query;
    # every query then takes the mean of v over the map (closed form), on both paths.
    for fused in (True, False):
        layer = random_layer(32, 3, "pre", fully_masked="mean")
        layer.fused = fused
        x = torch.randn(3, 32, 4, 4, requires_grad=True)
        v = torch.einsum("oc,bchw->bohw", layer.value_conv.weight[:, :, 0, 0], x) + layer.value_conv.bias.view(1, -1, 1, 1)
        expected = layer.gamma * v.mean(dim=(2, 3), keepdim=True) + x
        y = layer(x)
        torch.testing.assert_close(y, expected.expand_as(y), atol=1e-5, rtol=1e-5)
        (y * torch.randn_like(y)).sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
        assert layer.value_conv.weight.grad.abs().sum() > 0  # the layer trains (it is dead under skip)


def test_mean_mode_equals_the_seeds_minus_1e9_arithmetic_on_small_energies():
    # The original code adds -1e9 to masked energies in float32. On a map where some queries keep
    # keys and others keep none (5x5, span 3: the centre 1x1... rows), with energies
    # |e| < 32 the fully masked rows become uniform and the others ignore masked keys.
    torch.manual_seed(0)
    H = W = 5
    layer = random_layer(16, 3, "pre", fully_masked="mean")
    with torch.no_grad():
        layer.query_conv.weight.mul_(0.1), layer.key_conv.weight.mul_(0.1)
    x = torch.randn(2, 16, H, W)
    q = layer.query_conv(x).flatten(2).transpose(1, 2)
    k = layer.key_conv(x).flatten(2)
    v = layer.value_conv(x).flatten(2)
    energy = torch.bmm(q, k)
    assert energy.abs().max() < 32
    allowed = torch.tensor([[max(abs(r1 - r2), abs(c1 - c2)) > 3 for r2 in range(H) for c2 in range(W)]
                            for r1 in range(H) for c1 in range(W)])
    assert (~allowed.any(1)).any() and allowed.any(1).any()  # both kinds of rows present
    seed_attn = torch.softmax(energy + (~allowed).float() * -1e9, dim=-1)  # float32, as the original code
    seed_out = layer.gamma * torch.bmm(v, seed_attn.transpose(1, 2)).view_as(x) + x
    for fused in (True, False):
        layer.fused = fused
        with torch.no_grad():
            torch.testing.assert_close(layer(x), seed_out, atol=1e-5, rtol=1e-5)
    _, w = layer(x, return_attention=True)
    torch.testing.assert_close(w, seed_attn, atol=1e-6, rtol=1e-5)


def test_fully_masked_query_counts_of_the_discriminator_maps():
    # README's counts, from the definition: a query's (2s+1)^2 square covers an h x w map
    # when s reaches every border from it.
    def dead(h, w, s):
        return sum(s >= max(i, h - 1 - i) and s >= max(j, w - 1 - j) for i in range(h) for j in range(w))
    energy = torch.randn(1, 64, 64, generator=torch.Generator().manual_seed(0))
    for h, counts in ((4, [0, 0, 4, 16, 16, 16]), (8, [0, 0, 0, 0, 4, 16])):
        assert [dead(h, h, s) for s in range(6)] == counts
        # what the layer itself does, span 0 included: under "skip" a query with no key left
        # gets all-zero weights, every other query weights summing to 1
        rows = []
        for s in range(6):
            w = Self_Attn(16, s, fully_masked="skip").attention_weights(energy[:, :h * h, :h * h], h, h)
            sums = w.sum(-1)
            assert torch.all((sums == 0) | torch.isclose(sums, torch.ones(())))
            rows.append(int((sums == 0).sum()))
        assert rows == counts
    # the closed form the layers decide their path by (no device sync), on other shapes too
    for h, w in ((4, 4), (8, 8), (3, 5), (5, 3), (7, 10), (1, 1), (2, 6)):
        for s in range(1, 7):
            assert has_keyless_queries(h, w, s) == (dead(h, w, s) > 0), (h, w, s)


def test_attention_distance_matches_a_double_loop():
    from sagan_models import attention_distance
    g = torch.Generator().manual_seed(0)
    h, w = 3, 5
    weights = torch.rand(2, h * w, h * w, generator=g)
    weights /= weights.sum(-1, keepdim=True)
    weights[1] *= torch.rand(h * w, 1, generator=g)  # rows keeping part of their weight, as in post mode
    weights[1, 4] = 0  # a query with no weight at all
    expected = []
    for b in range(2):
        per_query = []
        for q in range(h * w):
            qi, qj = divmod(q, w)
            mass = weights[b, q].sum().item()
            if mass == 0:
                continue
            total = 0.0
            for k in range(h * w):
                ki, kj = divmod(k, w)
                total += weights[b, q, k].item() * math.hypot(qi - ki, qj - kj)
            per_query.append(total / mass)
        expected.append(sum(per_query) / len(per_query))
    torch.testing.assert_close(attention_distance(weights, h, w), torch.tensor(expected), rtol=1e-5, atol=1e-6)
    # closed forms: attending to itself is distance 0; to the right-hand neighbour, 1
    assert attention_distance(torch.eye(h * w)[None], h, w).item() == 0
    right = torch.zeros(1, 2, 2)
    right[0, 0, 1] = right[0, 1, 0] = 1
    assert attention_distance(right, 1, 2).item() == 1
    assert attention_distance(0.3 * right, 1, 2).item() == pytest.approx(1)  # half-kept weight, same place
    assert math.isnan(attention_distance(torch.zeros(1, 4, 4), 2, 2).item())  # no query attends


def keys_left(h, w, span):
    """{query: [keys]} by the definition: keys outside the (2·span+1)² square (span 0: all)."""
    return {(i, j): [(r, c) for r in range(h) for c in range(w) if span == 0 or max(abs(r - i), abs(c - j)) > span]
            for i in range(h) for j in range(w)}


ATTENTION_MODES = [("pre", "mean"), ("pre", "skip"), ("post", "mean")]


@pytest.mark.parametrize("mode,fully_masked", ATTENTION_MODES)
def test_layer_distances_share_and_uniform_reference_against_brute_force(mode, fully_masked):
    from collections import OrderedDict

    from sagan_models import layer_distances
    for (h, w), span in itertools.product([(4, 4), (5, 3)], range(4)):
        layer = random_layer(16, span, mode, seed=span, fully_masked=fully_masked)
        x = torch.randn(2, 16, h, w, generator=torch.Generator().manual_seed(span))
        (row,) = layer_distances(nn.Sequential(OrderedDict(attn=layer)), {"attn": x})
        out, weights = brute_force_attention(layer, x, span, mode, fully_masked)
        keys, xd = keys_left(h, w, span), x.double().numpy()
        dist = lambda q, k: math.hypot(q[0] - k[0], q[1] - k[1])
        distance, share = [], []
        for b in range(2):
            per_query = []
            for qi, q in enumerate(keys):
                row_w = weights[b, qi]
                if row_w.sum() > 0:
                    per_query.append(sum(row_w[r * w + c] * dist(q, (r, c)) for r in range(h) for c in range(w))
                                     / row_w.sum())
            distance.append(np.mean(per_query) if per_query else math.nan)
            attended = np.linalg.norm(out[b] - xd[b])
            share.append(attended / (attended + np.linalg.norm(xd[b])))
        # the reference: equal weights on the keys each query keeps (post mode too: the
        # distance renormalises every row), the layer's own answer where none are left
        uniform = []
        for q, ks in keys.items():
            if ks:
                uniform.append(np.mean([dist(q, k) for k in ks]))
            elif mode == "pre" and fully_masked == "mean":
                uniform.append(np.mean([dist(q, k) for k in itertools.product(range(h), range(w))]))
        uniform = np.mean(uniform) if uniform else math.nan
        case = (h, w, span)
        assert row.name == "attn" and row.map == f"{h}x{w}", case
        np.testing.assert_allclose(row.distance, np.mean(distance), rtol=1e-5, err_msg=str(case))
        np.testing.assert_allclose(row.uniform, uniform, rtol=1e-6, err_msg=str(case))
        np.testing.assert_allclose(row.share, np.mean(share), rtol=1e-5, err_msg=str(case))
        assert (0 < row.share < 1) == (not math.isnan(row.distance)), case  # "skip" 4x4 at span 3: no attention
    # γ = 0: the layer passes x through, however far its weights look
    with torch.no_grad():
        layer.gamma.zero_()
    assert layer_distances(nn.Sequential(OrderedDict(attn=layer)), {"attn": x})[0].share == 0
    # no attention layers: no rows
    assert layer_distances(nn.Sequential(nn.Conv2d(3, 3, 1)), {}) == []


@pytest.mark.parametrize("mode,fully_masked", ATTENTION_MODES)
def test_fixed_rows_are_those_whose_weights_no_energy_moves(mode, fully_masked):
    # by the definition (key counts) and by experiment (two very different energies give
    # the same weights exactly on those rows and on no other)
    g = torch.Generator().manual_seed(0)
    whole = {}
    for (h, w), span in itertools.product([(4, 4), (8, 8), (1, 4)], range(5)):
        layer = Self_Attn(16, span, mode, fully_masked=fully_masked)
        fixed = layer.fixed_rows(h, w)
        counts = [len(ks) for ks in keys_left(h, w, span).values()]
        if mode == "pre" or span == 0:
            expected = [c == 1 or (c == 0 and fully_masked in ("mean", "skip")) for c in counts]
        else:
            expected = [c == 0 for c in counts]
        assert fixed.tolist() == expected, (h, w, span)
        e1, e2 = (5 * torch.randn(1, h * w, h * w, generator=g) for _ in range(2))  # no weight underflows to 0
        same = (layer.attention_weights(e1, h, w) == layer.attention_weights(e2, h, w)).all(-1)[0]
        assert same.tolist() == fixed.tolist(), (h, w, span)
        whole[(h, w, span)] = fixed.float().mean().item()
    # D's 4x4 map at span >= 3 is uniform by construction (no query keeps a key), at span 2
    # its 4 centre queries; the 8x8 map at span 4 has its 4 centre queries fixed; a 1x4 map
    # at span 2 leaves its two middle queries no key and each end query one key (fixed in
    # pre mode only: in post mode its weight is a share of a softmax over all four)
    assert [whole[(4, 4, s)] for s in range(5)] == [0, 0, 0.25, 1, 1]
    assert [whole[(8, 8, s)] for s in range(5)] == [0, 0, 0, 0, 4 / 64]
    assert whole[(1, 4, 2)] == (1 if mode == "pre" else 0.5)


@pytest.mark.parametrize("mode", ["pre", "post"])
def test_fused_attention_matches_dense_in_values_and_gradients(mode):
    for span in range(5):
        for hw in [(4, 4), (8, 8), (6, 10)]:
            torch.manual_seed(span)
            layer = Self_Attn(32, span=span, mask_mode=mode)
            torch.nn.init.constant_(layer.gamma, 0.8)
            x = torch.randn(3, 32, *hw)
            upstream = torch.randn(3, 32, *hw)
            results = []
            for fused in (False, True):
                layer.fused = fused
                layer.zero_grad()
                xi = x.clone().requires_grad_(True)
                out = layer(xi)
                (out * upstream).sum().backward()
                results.append((out.detach(), xi.grad, [p.grad.clone() for p in layer.parameters()]))
            (o0, gx0, gp0), (o1, gx1, gp1) = results
            torch.testing.assert_close(o1, o0, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(gx1, gx0, atol=1e-5, rtol=1e-5)
            for a, b in zip(gp1, gp0):
                torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------- the original code's arithmetic
class SeedLayer(nn.Module):
    """The original repository's attention layer, written here from its arithmetic and nothing
    of sagan_models: 1×1 convs q, k, v; energy = qᵀk; energy + mask (float32, −1e9 on every
    masked key); softmax; out = γ·(v·attnᵀ) + x. A key is masked when it lies in the
    (2·span+1)² square around the query; at span 0 only with self_masked (the original code
    masks the query's own pixel there), else span 0 masks nothing."""

    def __init__(self, C, H, W, span, self_masked=False):
        super().__init__()
        self.query_conv = nn.Conv2d(C, C // 8, 1)
        self.key_conv = nn.Conv2d(C, C // 8, 1)
        self.value_conv = nn.Conv2d(C, C, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        mask = torch.zeros(H * W, H * W)
        for i, j, r, c in itertools.product(range(H), range(W), range(H), range(W)):
            if max(abs(r - i), abs(c - j)) <= span and (span > 0 or self_masked):
                mask[i * W + j, r * W + c] = -1e9
        self.register_buffer("mask", mask)
        self.softmax = nn.Softmax(dim=-1)

    def forward(self, x):
        B, C, H, W = x.size()
        proj_query = self.query_conv(x).view(B, -1, H * W).permute(0, 2, 1)
        proj_key = self.key_conv(x).view(B, -1, H * W)
        self.energy = torch.bmm(proj_query, proj_key)
        self.attention = self.softmax(self.energy + self.mask)
        proj_value = self.value_conv(x).view(B, -1, H * W)
        out = torch.bmm(proj_value, self.attention.permute(0, 2, 1)).view(B, C, H, W)
        return self.gamma * out + x


def seed_pair(C, H, W, span, scale, original=False, seed=0, B=2):
    """(ours, the original code's layer, x) with the same weights. q/k weights are small integers ×
    scale (a power of two) and x multiples of 1/4, so every q, k and energy is exact in
    float32 whatever the order of summation: both layers then round −1e9 + e alike, also
    where |e| > 32 (there a last-bit difference could move a rounding by 64)."""
    g = torch.Generator().manual_seed(seed)
    ours = Self_Attn(C, span, fully_masked="seed", original=original)
    ref = SeedLayer(C, H, W, span, self_masked=original)
    with torch.no_grad():
        for name in ("query_conv", "key_conv"):
            getattr(ref, name).weight.copy_(torch.randint(-3, 4, (C // 8, C, 1, 1), generator=g) * scale)
            getattr(ref, name).bias.copy_(torch.randint(-3, 4, (C // 8,), generator=g) * scale / 4)
        ref.value_conv.weight.copy_(torch.randn(C, C, 1, 1, generator=g) * 0.3)
        ref.value_conv.bias.copy_(torch.randn(C, generator=g) * 0.3)
        ref.gamma.fill_(0.75)  # non-zero: q and k get gradients
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randint(-4, 5, (B, C, H, W), generator=g) / 4
    return ours, ref, x


def values_and_grads(layer, x, upstream):
    layer.zero_grad()
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    return out.detach(), x.grad, {n: p.grad.clone() for n, p in layer.named_parameters()}


def assert_same_layer(ours, ref, x):
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out, gx, grads = values_and_grads(ours, x, upstream)
    ref_out, ref_gx, ref_grads = values_and_grads(ref, x, upstream)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-4, atol=1e-5)
    assert sorted(grads) == sorted(ref_grads)
    # absolute tolerance against the layer's largest gradient: the key bias's is 0 up to
    # rounding (a constant added to a row's energies leaves its softmax as it was)
    largest = max(g.abs().max().item() for g in ref_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-6 * largest, msg=name)
    _, weights = ours(x, return_attention=True)
    torch.testing.assert_close(weights, ref.attention, rtol=1e-5, atol=1e-6)
    return weights


ENERGIES = {"below 32": (1 / 8, 0, 32), "beyond 32": (1 / 2, 32, 512), "beyond 512": (2, 512, float("inf"))}


@pytest.mark.parametrize("energies", ENERGIES)
@pytest.mark.parametrize("hw, span", [(4, 2), (4, 3), (4, 4), (8, 2), (8, 3), (8, 4)])
def test_seed_mode_computes_the_seeds_layer_in_values_and_gradients(hw, span, energies):
    # D's 4x4 and 8x8 maps; fully masked rows on the 4x4 map at span >= 2, on the 8x8 at span 4
    scale, low, high = ENERGIES[energies]
    ours, ref, x = seed_pair(32, hw, hw, span, scale, seed=hw * 10 + span)
    weights = assert_same_layer(ours, ref, x)
    keyless = ~span_mask(hw, hw, span).any(dim=1)
    if keyless.any():
        e = ref.energy.detach()[:, keyless]
        assert low < e.abs().max() < high  # the regime this case is about
        uniform = (weights[:, keyless] == 1 / hw ** 2).all()
        # while |e| < 32 float32 rounds −1e9 + e to one number: uniform rows, as --fully_masked mean;
        # beyond, not (the weights follow energies quantised to multiples of 64)
        assert bool(uniform) == (energies == "below 32")


def test_seed_mode_gives_rows_with_keys_what_the_other_modes_give():
    # A layer with fully masked rows takes the original code's dense path for all its rows; the rows
    # that keep keys must equal today's (exp(−1e9 + e − max) is exactly 0 in float32).
    for hw, span in ((4, 2), (8, 4), (5, 2)):
        for scale, _, _ in ENERGIES.values():
            ours, _, x = seed_pair(32, hw, hw, span, scale)
            live = span_mask(hw, hw, span).any(dim=1)
            assert live.any() and not live.all()
            _, seed_w = ours(x, return_attention=True)
            for mode in ("mean", "skip"):
                other = Self_Attn(32, span, fully_masked=mode)
                other.load_state_dict(ours.state_dict())
                _, w = other(x, return_attention=True)
                assert torch.equal(seed_w[:, live], w[:, live]), (hw, span, scale, mode)
                with torch.no_grad():
                    ys, yo = ours(x).flatten(2)[..., live], other(x).flatten(2)[..., live]
                torch.testing.assert_close(ys, yo, rtol=1e-6, atol=1e-6)


def test_mean_mode_freezes_q_and_k_of_fully_masked_rows_and_seed_mode_does_not():
    # D's 4x4 map at span 3: every row fully masked. Even with |e| < 32, where both give the
    # uniform row, the original code's q and k get gradients through its softmax; mean's get exactly 0.
    for scale in (1 / 8, 2):
        ours, ref, x = seed_pair(32, 4, 4, 3, scale)
        mean = Self_Attn(32, 3, fully_masked="mean")
        mean.load_state_dict(ours.state_dict())
        upstream = torch.randn(x.shape)
        _, _, g_mean = values_and_grads(mean, x, upstream)
        _, _, g_seed = values_and_grads(ours, x, upstream)
        _, _, g_ref = values_and_grads(ref, x, upstream)
        for name in ("query_conv.weight", "key_conv.weight"):
            assert (g_mean[name] == 0).all()
            assert g_seed[name].abs().max() > 1e-3 and g_ref[name].abs().max() > 1e-3
            torch.testing.assert_close(g_seed[name], g_ref[name], rtol=1e-4, atol=1e-5 * g_ref[name].abs().max().item())


def test_seed_mode_fixes_no_row_without_keys():
    # fully masked rows of seed mode are uniform while |e| < 32 but follow larger energies:
    # not fixed (Self_Attn.fixed_rows), unlike mean's and skip's
    g = torch.Generator().manual_seed(0)
    layer = Self_Attn(16, 3, fully_masked="seed")
    assert not layer.fixed_rows(4, 4).any() and Self_Attn(16, 3, fully_masked="mean").fixed_rows(4, 4).all()
    e1, e2 = (200 * torch.randn(1, 16, 16, generator=g) for _ in range(2))
    assert not (layer.attention_weights(e1, 4, 4) == layer.attention_weights(e2, 4, 4)).all(-1).any()


def test_seed_mode_keeps_float32_under_autocast():
    # q, k exact in bfloat16 (multiples of 4 up to 64), energies exact in float32 only: the
    # layer must add −1e9 and take the softmax in float32 to give the original code's weights (in
    # bfloat16, −1e9 + e is one number for every |e| < 2^21: uniform rows).
    C, g = 16, torch.Generator().manual_seed(0)
    ours, ref, _ = seed_pair(C, 4, 4, 3, 1)
    with torch.no_grad():
        for name in ("query_conv", "key_conv"):
            getattr(ref, name).weight.copy_(torch.randint(-1, 2, (C // 8, C, 1, 1), generator=g) * 4.0)
            getattr(ref, name).bias.zero_()
    ours.load_state_dict(ref.state_dict(), strict=False)
    x = torch.randint(-1, 2, (2, C, 4, 4), generator=g).float()
    ref(x)
    assert ref.energy.abs().max() > 64
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", dtype=dtype):
            y, w = ours(x, return_attention=True)
        assert w.dtype == torch.float32 and torch.isfinite(y).all()
        torch.testing.assert_close(w, ref.attention, rtol=1e-5, atol=1e-6)
        assert not (w == 1 / 16).all()


@pytest.mark.parametrize("hw", [8, 16])
def test_original_attention_is_the_seeds_layer_at_every_span(hw):
    # --original_attention: the original code for the whole layer, the query's own pixel
    # masked at span 0 (plain attention would give it weight)
    for span in range(5):
        ours, ref, x = seed_pair(32, hw, hw, span, 1 / 2, original=True, seed=span)
        weights = assert_same_layer(ours, ref, x)
        assert ref.energy.abs().max() > 32
        with_keys = span_mask(hw, hw, span).any(dim=1)  # at span 0 every row: all but the query itself
        assert (weights.diagonal(dim1=1, dim2=2)[:, with_keys] == 0).all() and with_keys.any()


def test_a_tiny_discriminator_trains_as_the_seeds_over_adam_steps():
    # D at 32² and span 4: its 8x8 map has 4 fully masked rows, its 4x4 map only such rows.
    # Dead-row energies stay below 32 here: beyond it, −1e9 + e rounds to multiples of 64,
    # and a last-bit difference between our q/k (one matrix product) and the original code's (1x1
    # convs) could move a rounding; the layer tests above cover |e| > 32 with exact energies.
    torch.manual_seed(0)
    ours = Discriminator(32, 16, span=4)
    for _, m in attention_layers(ours):
        nn.init.constant_(m.gamma, 0.5)
    ref = copy.deepcopy(ours)
    for name, m in attention_layers(ours):
        res = int(name[len("attn"):])
        seed_layer = SeedLayer(m.value_conv.in_channels, res, res, 4)
        seed_layer.load_state_dict(m.state_dict(), strict=False)
        setattr(ref.net, name, seed_layer)
    mean = copy.deepcopy(ours)
    for _, m in attention_layers(mean):
        m.fully_masked = "mean"
    nets = (ours, ref, mean)
    opts = [torch.optim.Adam(n.parameters(), lr=4e-4, betas=(0.0, 0.9)) for n in nets]
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        real, fake = torch.randn(8, 3, 32, 32, generator=g), torch.randn(8, 3, 32, 32, generator=g)
        for net, opt in zip(nets, opts):
            opt.zero_grad()
            (torch.relu(1 - net(real)).mean() + torch.relu(1 + net(fake)).mean()).backward()
            opt.step()
        assert ref.net.attn4.energy.abs().max() < 32
    # The two compute q, k, v and attn·v by other kernels in other orders: equal up to float32
    # rounding (~1e-7 relative), which Adam's normalised steps carry on; after 5 steps of
    # 4e-4 the parameters agree to 1e-5, while the mean-mode D's q and k have not moved
    # where the original code's moved ~5·4e-4. Not compared: the key biases, whose gradient is 0 but
    # for rounding (a constant added to a row's energies leaves its softmax as it was), so
    # Adam's normalised step turns each implementation's own rounding noise into steps of
    # up to ~lr, in the original code as much as here.
    ref_params = dict(ref.named_parameters())
    compared = [(n, p) for n, p in ours.named_parameters() if not n.endswith("key_conv.bias")]
    assert len(compared) == len(ref_params) - 2
    for name, p in compared:
        torch.testing.assert_close(p, ref_params[name], rtol=0, atol=1e-5, msg=name)
    moved = max((p - ref_params[n]).abs().max().item() for n, p in mean.named_parameters() if "attn4.query" in n)
    assert moved > 1e-3


def test_the_networks_take_the_attention_settings_of_the_config():
    from run import configure
    from sagan_models import build_discriminator, build_generator
    for flags, want in ((["--original_attention"], (True, "seed")), (["--fully_masked", "mean"], (False, "mean")),
                        ([], (False, "seed"))):
        cfg = configure(["--device", "cpu", "--imsize", "32", "--span", "2", *flags])
        layers = attention_layers(build_generator(cfg)) + attention_layers(build_discriminator(cfg))
        assert len(layers) == 4 and {(m.original, m.fully_masked, m.span) for _, m in layers} == {(*want, 2)}
