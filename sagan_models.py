"""SAGAN generator and discriminator with Non-local (span-masked) self-attention.

The Non-local idea: a query pixel may not attend to keys inside the (2·span+1)² square
around itself, because the convolutions already see that neighbourhood; attention is
left for far pixels. span 0 is plain SAGAN (no mask at all); span NO_ATTENTION builds the
networks without attention layers.
"""
import functools
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from choices import FULLY_MASKED, IMAGE_SIZES, MASK_MODES, NO_ATTENTION
from spectral import SpectralNorm, sn_conv, sn_deconv


def span_mask(h: int, w: int, span: int, device=None) -> torch.Tensor:
    """(N, N) bool, N = h·w row-major: True where key (r, c) is *far enough* from
    query (i, j) to be attended, i.e. max(|r−i|, |c−j|) > span. Borders clip (no wrap)."""
    dr, dc = _pixel_offsets(h, w, device)
    return torch.maximum(dr.abs(), dc.abs()) > span


def _pixel_offsets(h: int, w: int, device=None):
    """(N, N) row and column offsets between the pixels of an h×w map, N = h·w row-major:
    [q, k] = (row(q) − row(k), col(q) − col(k))."""
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    return r[:, None] - r[None, :], c[:, None] - c[None, :]


def has_keyless_queries(h: int, w: int, span: int) -> bool:
    """Whether some query of an h×w map has no key left at this span: a query's square
    covers the map when span reaches every border from it, and the centre pixel is nearest
    to all of them (span >= h//2 and >= w//2). Plain Python: decided without a device sync."""
    return span >= h // 2 and span >= w // 2


class Self_Attn(nn.Module):
    """SAGAN self-attention (seed layout: C/8 query/key, C value, no score scaling,
    out = γ·attended + x with γ initialised to 0), with the span mask.

    mask_mode "pre" (the original code): masked keys are excluded before the softmax, the
    remaining weights renormalise to 1. "post" (the original README): softmax over all keys,
    then masked weights are zeroed and the rest are not renormalised.

    A query whose square covers the whole map (the discriminator's 4×4 map at span ≥ 2, its
    8×8 map at span ≥ 4) has no key left. fully_masked (pre mode) says what it attends to:
    "seed" (default): the original code's float32 arithmetic, energy + (−1e9 on every masked key),
    softmax, with autograd through it as in the original code. While |energy| < 32 float32 rounds
    −1e9 + e to one number, so the row is uniform (the mean of v) yet q and k get gradients;
    beyond that the row is a softmax over energies quantised to multiples of 64. A layer
    whose map has such a query computes all its rows this way (dense, fp32 even under
    autocast: only D's small maps have them); its rows that keep keys equal the other modes'
    (exp(−1e9 + e − max) is exactly 0). "mean": every key with equal weight, i.e. the mean
    of v: the original code's forward pass only while |e| < 32, and q, k get no gradient from such
    rows. "skip": nothing (attended value 0, x passes through). Post mode zeroes every
    weight of such a row. No NaN either way: such rows are opened for the softmax and their
    result replaced after.

    original=True: the whole layer as the original code computes it (--original_attention):
    the additive −1e9 mask, dense, fp32 softmax, and at span 0 the query's own pixel masked
    (its (2·0+1)² square is the pixel itself); pre mode only.
    """

    def __init__(self, in_dim: int, span: int = 0, mask_mode: str = "pre", fused: bool = True,
                 fully_masked: str = FULLY_MASKED[0], original: bool = False):
        super().__init__()
        if span < 0:
            raise ValueError(f"span must be >= 0, got {span}")
        if mask_mode not in MASK_MODES:
            raise ValueError(f"mask_mode must be one of {MASK_MODES}, got {mask_mode!r}")
        if fully_masked not in FULLY_MASKED:
            raise ValueError(f"fully_masked must be one of {FULLY_MASKED}, got {fully_masked!r}")
        if original and mask_mode != "pre":
            raise ValueError("original=True computes the original code's masking, mask_mode 'pre'")
        self.query_conv = nn.Conv2d(in_dim, in_dim // 8, 1)
        self.key_conv = nn.Conv2d(in_dim, in_dim // 8, 1)
        self.value_conv = nn.Conv2d(in_dim, in_dim, 1)
        self.gamma = nn.Parameter(torch.zeros(1))
        self.span, self.mask_mode, self.fully_masked, self.original = span, mask_mode, fully_masked, original
        self.masked = span > 0 or original  # the original code masks the query's own pixel at span 0
        # fused: pre-mode attention through scaled_dot_product_attention (no N×N weights
        # kept for backward when a fused kernel applies). False: the dense reference path.
        self.fused = fused

    def extra_repr(self):
        return (f"span={self.span}, mask_mode={self.mask_mode!r}, fully_masked={self.fully_masked!r}, "
                f"original={self.original}, fused={self.fused}")

    def seed_arithmetic(self, h: int, w: int) -> bool:
        """Whether this layer computes an h×w map with the original code's additive mask (class doc)."""
        return self.original or (self.mask_mode == "pre" and self.fully_masked == "seed" and self.span > 0
                                 and has_keyless_queries(h, w, self.span))

    def masks(self, h: int, w: int, device=None):
        """(allowed, softmax_allowed, live) for an h×w map, built once and kept as
        non-persistent buffers so they follow .to() and are never copied per forward.
        allowed (N,N): the span mask; softmax_allowed: allowed with fully masked rows
        opened (see class doc); live (N,1): rows that keep at least one key. A map with the
        original code's arithmetic also keeps its additive mask (float32: 0, or −1e9 where masked)."""
        name = f"mask_{h}x{w}"
        if not hasattr(self, name):
            allowed = span_mask(h, w, self.span, device)
            live = allowed.any(dim=1, keepdim=True)
            self.register_buffer(name, allowed, persistent=False)
            self.register_buffer(name + "_softmax", allowed | ~live, persistent=False)
            self.register_buffer(name + "_live", live, persistent=False)
        if self.seed_arithmetic(h, w) and not hasattr(self, name + "_add"):
            allowed = getattr(self, name)
            self.register_buffer(name + "_add", torch.zeros(allowed.shape, device=allowed.device)
                                 .masked_fill(~allowed, -1e9), persistent=False)
        return getattr(self, name), getattr(self, name + "_softmax"), getattr(self, name + "_live")

    def attention_weights(self, energy, h: int, w: int):
        """(B, N, N) energies of an h×w map → the attention weights (dense path): softmax
        with the span mask as mask_mode says, fully masked rows as fully_masked says."""
        if self.seed_arithmetic(h, w):
            self.masks(h, w, energy.device)
            # .float(): a no-op on the float32 buffer (cast only if the module itself was)
            return (energy.float() + getattr(self, f"mask_{h}x{w}_add").float()).softmax(dim=-1)
        if self.span == 0:
            return energy.softmax(dim=-1)
        allowed, softmax_allowed, live = self.masks(h, w, energy.device)
        if self.mask_mode == "post":
            return energy.softmax(dim=-1) * allowed
        attn = energy.masked_fill(~softmax_allowed, float("-inf")).softmax(dim=-1)  # no NaN: no row all -inf
        if self.fully_masked == "mean":  # rows with no key left: equal weight on every key (class doc)
            return torch.where(live, attn, torch.full_like(attn, 1.0 / attn.shape[-1]))
        return attn * live

    def fixed_rows(self, h: int, w: int, device=None) -> torch.Tensor:
        """(N,) bool for an h×w map: the queries whose weights cannot depend on the energies,
        whatever they are. Pre mode: a query left with one key (weight 1), or with none when
        fully_masked answers such rows with constants ("mean": 1/N on every key; "skip": 0;
        not "seed", whose rows follow the energies once |e| > 32).
        Post mode: a query left with no key (all weights 0); one key left still gets a
        softmax share that moves with every energy of the row. A layer whose queries are all
        fixed (D's 4×4 map at span ≥ 3) cannot learn where to look: its attention is uniform
        by construction, whatever its distance says."""
        n = h * w
        keys = self.masks(h, w, device)[0].sum(dim=1) if self.masked else torch.full((n,), n, device=device)
        if self.span > 0 and self.mask_mode == "post":
            return keys == 0
        return (keys == 1) | ((keys == 0) & (self.fully_masked in ("mean", "skip")))

    def forward(self, x, return_attention: bool = False):
        B, C, H, W = x.shape
        # The three 1×1 convs are one linear map of each pixel: a single matrix product over
        # (B, N, C) gives q, k and v in the layout attention wants, and no 1×1
        # convolution_backward is left whose memory format torch.compile mispredicts under
        # channels_last (pytorch/pytorch#171622, which crashed --compile on CUDA).
        convs = (self.query_conv, self.key_conv, self.value_conv)
        weight = torch.cat([c.weight for c in convs]).flatten(1)
        bias = torch.cat([c.bias for c in convs])
        qkv = F.linear(x.flatten(2).transpose(1, 2), weight, bias)  # B, N, C/8 + C/8 + C
        q, k, v = qkv.split([C // 8, C // 8, C], dim=-1)

        if self.seed_arithmetic(H, W):
            # The original code ran in float32: under autocast −1e9 + e would round away every energy.
            with torch.autocast(x.device.type, enabled=False):
                attn = self.attention_weights(q.float() @ k.float().transpose(1, 2), H, W)
                out = attn @ v.float()
        elif self.fused and self.mask_mode == "pre" and not return_attention:
            softmax_allowed = self.masks(H, W, x.device)[1] if self.span > 0 else None
            out = F.scaled_dot_product_attention(
                q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), attn_mask=softmax_allowed, scale=1.0).squeeze(1)
            attn = None
            if self.span > 0 and has_keyless_queries(H, W, self.span):  # rows with no key left (class doc)
                live = self.masks(H, W, x.device)[2]
                out = torch.where(live, out, v.mean(dim=1, keepdim=True)) if self.fully_masked == "mean" else out * live
        else:
            attn = self.attention_weights(q @ k.transpose(1, 2), H, W)  # B, N(query), N(key)
            out = attn @ v  # B, N, C

        # (B, N, C) -> (B, C, H, W) is a view: channels_last strides, no copy
        out = self.gamma * out.transpose(1, 2).reshape(B, C, H, W) + x
        return (out, attn) if return_attention else out


class LatentToMap(nn.ConvTranspose2d):
    """G's first layer, a 4×4 transposed conv of the 1×1 z: a linear map z → (C, 4, 4),
    computed as that one matrix product (same weights and state-dict keys as the conv).
    Its output takes the memory format of the weight, as cuDNN convs do, so the network
    stays in one format (a 1×1 input has no format of its own)."""

    def forward(self, z):
        w = self.weight  # (z_dim, C, 4, 4); read once: spectral norm computes it per access
        out = (z.flatten(1) @ w.flatten(1)).view(z.shape[0], *w.shape[1:]) + self.bias.view(1, -1, 1, 1)
        fmt = torch.channels_last if w.dim() == 4 and not w.is_contiguous() and \
            w.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        return out.contiguous(memory_format=fmt)


class MapToLogit(nn.Conv2d):
    """D's last layer, a conv whose kernel covers the whole 4×4 map: one dot product per
    image, computed as that (same weights and keys as the conv; no convolution_backward
    with a 1-channel, 1×1 output, whose memory format torch.compile mispredicts)."""

    def forward(self, x):
        return (x * self.weight).sum(dim=(1, 2, 3)) + self.bias


def _check_size(image_size):
    if image_size not in IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {IMAGE_SIZES}, got {image_size}")


def _forward_collecting_attention(net: nn.Sequential, x):
    """Run a Sequential, returning the output and {name: (B, N, N) weights} of its
    attention layers (used for the attention pictures, not for training)."""
    maps = {}
    for name, layer in net.named_children():
        if isinstance(layer, Self_Attn):
            x, maps[name] = layer(x, return_attention=True)
        else:
            x = layer(x)
    return x, maps


def _add_attention(layers, res, ch, span, *options):
    """layers["attn<res>"]: an attention layer of a res×res map, its masks built here (never
    in forward); none at span NO_ATTENTION, which leaves the plain SN-DCGAN of the blocks."""
    if span == NO_ATTENTION:
        return
    layers[f"attn{res}"] = layer = Self_Attn(ch, span, *options)
    if layer.masked:
        layer.masks(res, res)


class Generator(nn.Module):
    """z → 4×4 → … → image. Channels start at conv_dim·image_size/8 and halve at each
    doubling; attention after the image_size/4 and image_size/2 maps (none at span
    NO_ATTENTION). At 64: 512@4 → 256@8 → 128@16 → attn → 64@32 → attn → 3@64 (the original code's
    network)."""

    def __init__(self, image_size=64, z_dim=128, conv_dim=64, span=0, mask_mode="pre", fused=True,
                 fully_masked=FULLY_MASKED[0], original=False):
        super().__init__()
        _check_size(image_size)
        self.image_size, self.z_dim = image_size, z_dim
        ch = conv_dim * image_size // 8
        layers = OrderedDict(block4=nn.Sequential(SpectralNorm(LatentToMap(z_dim, ch, 4)), nn.BatchNorm2d(ch), nn.ReLU()))
        res = 4
        while res < image_size // 2:
            res *= 2
            layers[f"block{res}"] = nn.Sequential(
                sn_deconv(ch, ch // 2, 4, 2, 1), nn.BatchNorm2d(ch // 2), nn.ReLU())
            ch //= 2
            if res in (image_size // 4, image_size // 2):
                _add_attention(layers, res, ch, span, mask_mode, fused, fully_masked, original)
        layers["to_rgb"] = nn.Sequential(nn.ConvTranspose2d(ch, 3, 4, 2, 1), nn.Tanh())
        self.net = nn.Sequential(layers)

    def forward(self, z, return_attention=False):
        return _forward_collecting_attention(self.net, z) if return_attention else self.net(z)


class Discriminator(nn.Module):
    """image → one logit per image. Stride-2 convs 3 → conv_dim, doubling at each halving
    down to 4×4; attention after the 8×8 and 4×4 stages (none at span NO_ATTENTION). At 64:
    64@32 → 128@16 → 256@8 → attn → 512@4 → attn → logit (the original code's network)."""

    def __init__(self, image_size=64, conv_dim=64, span=0, mask_mode="pre", fused=True, fully_masked=FULLY_MASKED[0],
                 original=False):
        super().__init__()
        _check_size(image_size)
        layers = OrderedDict()
        res, in_ch, ch = image_size, 3, conv_dim
        while res > 4:
            res //= 2
            layers[f"block{res}"] = nn.Sequential(sn_conv(in_ch, ch, 4, 2, 1), nn.LeakyReLU(0.1))
            if res in (8, 4):
                _add_attention(layers, res, ch, span, mask_mode, fused, fully_masked, original)
            in_ch, ch = ch, ch * 2
        layers["to_logit"] = MapToLogit(in_ch, 1, 4)
        self.net = nn.Sequential(layers)

    def forward(self, x, return_attention=False):
        if return_attention:
            out, maps = _forward_collecting_attention(self.net, x)
            return out, maps
        return self.net(x)


def build_generator(cfg) -> Generator:
    """G as the config describes it (also a checkpoint's saved config)."""
    return Generator(cfg.imsize, cfg.z_dim, cfg.g_conv_dim, cfg.g_span, cfg.mask_mode,
                     fused=cfg.attn_impl == "fused", fully_masked=cfg.fully_masked, original=cfg.original_attention)


def build_discriminator(cfg) -> Discriminator:
    # WGAN-GP differentiates D's gradient once more; the fused attention kernels have no
    # double backward on CUDA, so D keeps the dense path there.
    fused = cfg.attn_impl == "fused" and cfg.adv_loss != "wgan-gp"
    return Discriminator(cfg.imsize, cfg.d_conv_dim, cfg.d_span, cfg.mask_mode, fused=fused,
                         fully_masked=cfg.fully_masked, original=cfg.original_attention)


def attention_layers(model: nn.Module):
    """(name, Self_Attn) pairs in forward order, e.g. [('attn16', …), ('attn32', …)]."""
    return [(n.split(".")[-1], m) for n, m in model.named_modules() if isinstance(m, Self_Attn)]


def attention_distance(weights: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """How far attention looks. weights: (B, N, N) attention weights of an h×w map (N = h·w,
    row-major); returns (B,): per image, the mean over the queries q that attend at all of
    Σ_k w[q, k]·‖pos(q) − pos(k)‖₂ / Σ_k w[q, k], in pixels of the map.

    Why the division by the row's weight: in post mode a query keeps only the part of its
    softmax that falls on far keys, so the plain sum would mix how far it looks with how much
    it keeps (in pre mode every row sums to 1 and nothing changes). A query with no weight at
    all (no key left, in post mode or under fully_masked "skip") looks nowhere and is left
    out; NaN when no query attends."""
    weights = weights.float()
    mass = weights.sum(dim=-1)
    attends = mass > 0
    per_query = (weights * _pixel_distances(h, w, weights.device)).sum(dim=-1) / torch.where(attends, mass, 1)
    return (per_query * attends).sum(dim=-1) / attends.sum(dim=-1)


@functools.lru_cache(maxsize=8)
def _pixel_distances(h, w, device):
    """(N, N) Euclidean distances between the pixels of an h×w map, row-major."""
    dr, dc = _pixel_offsets(h, w, device)
    return torch.hypot(dr.float(), dc.float())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_capturing_attention_inputs(model, x):
    """model(x), and {layer name: the input of that attention layer}."""
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, key=n: inputs.update({key: inp[0]}))
             for n, m in attention_layers(model)]
    try:
        return model(x), inputs
    finally:
        for h in hooks:
            h.remove()


class LayerAttention(NamedTuple):
    """One attention layer's row of attention.csv (see layer_distances)."""
    name: str
    map: str  # "HxW"
    distance: float  # mean attention distance over the batch (attention_distance)
    uniform: float  # the same for equal weights on the keys each query keeps
    share: float  # the attention's part of the layer's output, γ included (see layer_distances)
    fixed: float  # the fraction of queries whose weights the mask fixes (Self_Attn.fixed_rows)


@torch.no_grad()
def layer_distances(model, inputs: dict) -> list:
    """A LayerAttention per attention layer of `model` (none for a network without), given
    the layers' inputs ({name: x}, see forward_capturing_attention_inputs).

    uniform: the distance of the layer's own weights at zero energies, i.e. equal weights on
    the keys each query keeps (in post mode renormalised, as attention_distance renormalises
    every row) and the layer's answer for queries with no key left.

    share: per image ‖γ·o‖ / (‖γ·o‖ + ‖x‖), with o the attended values and x the layer's
    input (out = γ·o + x), averaged over the batch. Why this and not |γ|·distance: γ
    multiplies o, whose scale relative to x is learnt too, so |γ| alone does not say how much
    the layer changes its input; the share does, without units: 0 while γ = 0 (however far
    the weights look, the layer passes x through), towards 1 where attention dominates."""
    rows = []
    for name, m in attention_layers(model):
        x = inputs[name]
        H, W = x.shape[2:]
        # in chunks: the (B, N, N) weights of a 64×64 map are 64 MB per image
        chunk = max(1, 2 ** 24 // (H * W) ** 2)
        distance, share = [], []
        for i in range(0, len(x), chunk):
            xi = x[i:i + chunk]
            out, weights = m(xi, return_attention=True)
            distance.append(attention_distance(weights, H, W))
            attended = (out - xi).flatten(1).float().norm(dim=1)
            share.append(attended / (attended + xi.flatten(1).float().norm(dim=1)).clamp(min=1e-30))
        uniform = attention_distance(m.attention_weights(x.new_zeros(1, H * W, H * W), H, W), H, W)
        fixed = m.fixed_rows(H, W, x.device).float().mean()
        rows.append(LayerAttention(name, f"{H}x{W}", torch.cat(distance).mean().item(), uniform.item(),
                                   torch.cat(share).mean().item(), fixed.item()))
    return rows
