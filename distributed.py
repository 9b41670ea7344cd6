"""Several processes (torchrun): rank and world size, BatchNorm over the global batch, and
gathering rows whose count differs between ranks."""
import os

import numpy as np
import torch
import torch.distributed as dist


# ---------------------------------------------------------------------------- distributed
def dist_info():
    """(rank, world_size, local_rank) under torchrun, (0, 1, 0) otherwise."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
    return 0, 1, 0


class _SumAllReduce(torch.autograd.Function):
    """all_reduce(SUM) that gradients flow through (backward: all_reduce of the grads)."""

    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class SyncBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch of all ranks.
    Unlike torch.nn.SyncBatchNorm it also runs on CPU (gloo), so the multi-process test
    can check it. Two passes (mean, then squared deviations), each one all_reduce, keep
    the variance as accurate as single-process BatchNorm's."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        C = x.shape[1]
        xf = x.float()
        sums = _SumAllReduce.apply(torch.cat([xf.sum((0, 2, 3)), xf.new_full((1,), x.numel() / C)]))
        n = sums[-1]
        mean = sums[:C] / n
        centred = xf - mean.view(1, C, 1, 1)
        var = _SumAllReduce.apply((centred * centred).sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            self.running_var.lerp_((var * n / (n - 1)).detach(), self.momentum)
        scale = self.weight * torch.rsqrt(var + self.eps)
        return (centred * scale.view(1, C, 1, 1) + self.bias.view(1, C, 1, 1)).to(x.dtype)


def convert_sync_bn(model: torch.nn.Module) -> torch.nn.Module:
    for name, child in model.named_children():
        if type(child) is torch.nn.BatchNorm2d:
            new = SyncBatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.device)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new)
        else:
            convert_sync_bn(child)
    return model


def gather_rows(arr, device):
    """all_gather of a 2-D float64 array whose row count differs between ranks."""
    world = dist.get_world_size()
    local = torch.from_numpy(np.ascontiguousarray(arr)).to(device)
    count = torch.tensor([len(local)], device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = torch.zeros((max(counts), arr.shape[1]), dtype=local.dtype, device=device)
    padded[:len(local)] = local
    chunks = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return [c[:k].cpu().numpy() for c, k in zip(chunks, counts)]
