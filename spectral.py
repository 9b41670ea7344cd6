"""Spectral normalisation (Miyato et al., 2018) for the SAGAN networks.

Built on torch.nn.utils.parametrizations.spectral_norm: one power iteration per
training-mode forward (the original code's setting) and none in eval mode, so sampling never
changes the u/v vectors. u and v are buffers, not parameters, so parameter counts
are the original code's.

One deliberate choice: the original code reshaped every weight as (weight.shape[0], -1), also
for transposed convolutions, whose shape[0] is the *input* channel count; torch's
default for ConvTranspose is dim=1. We keep its dim=0 everywhere, so the
normalised weights are the original code's.
"""
import torch.nn as nn
from torch.nn.utils.parametrizations import spectral_norm


def SpectralNorm(module: nn.Module) -> nn.Module:
    """Wrap a conv / transposed conv / linear layer's weight with spectral norm."""
    return spectral_norm(module, n_power_iterations=1, eps=1e-12, dim=0)


def sn_conv(in_ch, out_ch, kernel, stride=1, padding=0):
    return SpectralNorm(nn.Conv2d(in_ch, out_ch, kernel, stride, padding))


def sn_deconv(in_ch, out_ch, kernel, stride=1, padding=0):
    return SpectralNorm(nn.ConvTranspose2d(in_ch, out_ch, kernel, stride, padding))


def spectral_normed_layers(model: nn.Module):
    """(name, module) for every layer whose weight is spectrally normalised."""
    return [(n, m) for n, m in model.named_modules()
            if hasattr(m, "parametrizations") and "weight" in m.parametrizations]
