"""Differentiable augmentation (DiffAugment, Zhao et al., NeurIPS 2020), written from the
paper's definitions.

With little data D memorises the training images. DiffAugment shows D only augmented
images, real and generated alike, in D's step and in G's step; because every transform is
differentiable, G's gradient flows back through it. Sampling and FID never augment.

Three transforms, each with its own random draw per image, batched (no loop over images):
- color: brightness + U[-0.5, 0.5), saturation × U[0, 2), contrast × U[0.5, 1.5)
  (on images in [-1, 1]);
- translation: shift by up to 1/8 of the image side along each axis (whole pixels), the
  uncovered border filled with zeros;
- cutout: zero a square of half the image side at a uniformly random centre (clipped at
  the borders).

Random numbers come from `rand(n, k)`, uniform [0, 1) of shape (n, k), so the trainer
decides where they are drawn (the device generator, this rank's slice of a global draw).
"""
import torch


def _torch_rand(n, k, device):
    return torch.rand(n, k, device=device)


def augment(x, policy: str, rand=None):
    """x: (B, C, H, W) images in [-1, 1]; the same shape back, each image transformed by
    its own draw. policy: a parse_policy string ('' returns x itself)."""
    if not policy:
        return x
    rand = rand or (lambda n, k: _torch_rand(n, k, x.device))
    for name in policy.split(","):
        x = _APPLY[name](x, rand)
    return x


def color(x, rand):
    u = rand(x.shape[0], 3).to(x.dtype).view(-1, 3, 1, 1, 1)
    x = x + (u[:, 0] - 0.5)  # brightness
    mean = x.mean(dim=1, keepdim=True)  # per pixel, over channels
    x = (x - mean) * (u[:, 1] * 2) + mean  # saturation
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # per image
    return (x - mean) * (u[:, 2] + 0.5) + mean  # contrast


def _offsets(u, radius):
    """Uniform integers in [-radius, radius] from uniform [0, 1) floats."""
    return (u * (2 * radius + 1)).floor().long().clamp_(max=2 * radius) - radius


def translation(x, rand, ratio=0.125):
    B, C, H, W = x.shape
    u = rand(B, 2)
    dy, dx = _offsets(u[:, 0], int(H * ratio + 0.5)), _offsets(u[:, 1], int(W * ratio + 0.5))
    # output pixel (i, j) reads source (i - dy, j - dx); sources outside the image are zeros
    rows = torch.arange(H, device=x.device)[None] - dy[:, None]  # (B, H)
    cols = torch.arange(W, device=x.device)[None] - dx[:, None]  # (B, W)
    x = x.gather(2, rows.clamp(0, H - 1)[:, None, :, None].expand(B, C, H, W))
    x = x.gather(3, cols.clamp(0, W - 1)[:, None, None, :].expand(B, C, H, W))
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]  # (B, H, W)
    return x * inside[:, None].to(x.dtype)


def cutout(x, rand, ratio=0.5):
    B, C, H, W = x.shape
    u = rand(B, 2)
    sh, sw = int(H * ratio + 0.5), int(W * ratio + 0.5)
    top = (u[:, 0] * H).floor().long().clamp_(max=H - 1) - sh // 2  # centre uniform over the rows
    left = (u[:, 1] * W).floor().long().clamp_(max=W - 1) - sw // 2
    r = torch.arange(H, device=x.device)[None] - top[:, None]  # (B, H): row index inside the square
    c = torch.arange(W, device=x.device)[None] - left[:, None]
    hole = ((r >= 0) & (r < sh))[:, :, None] & ((c >= 0) & (c < sw))[:, None, :]
    return x * (~hole)[:, None].to(x.dtype)


_APPLY = {"color": color, "translation": translation, "cutout": cutout}
