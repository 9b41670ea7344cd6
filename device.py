"""Which device a run uses and with which arithmetic (TF32 switches, cuDNN autotuning)."""
import contextlib

import torch

from utils import UserError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):  # the API takes any name; the flags are checked
        raise UserError(f"device {name!r}: choose auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible; use --device cpu or auto")
    return device


def tf32_flags():
    """(matmul, conv): whether CUDA float32 matmuls / convolutions may use TF32."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "conv"):
        return m.fp32_precision == "tf32", c.conv.fp32_precision == "tf32"
    return m.allow_tf32, c.allow_tf32


def set_tf32(matmul: bool, conv: bool) -> None:
    """Set both TF32 switches. torch >= 2.9 raises when its legacy allow_tf32 flags and
    the newer fp32_precision API are mixed, so the newer one is used where it exists,
    everywhere in this package."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision") and hasattr(c, "conv"):
        m.fp32_precision = "tf32" if matmul else "ieee"
        c.conv.fp32_precision = "tf32" if conv else "ieee"
    else:
        m.allow_tf32, c.allow_tf32 = matmul, conv


def configure_backends(cfg) -> None:
    """Process-wide CUDA settings for training, set once by the entry point: TF32 matmuls
    and convolutions (float32 speed; the FID network turns TF32 off for itself) and cuDNN
    autotuning (a training run's shapes never change)."""
    if cfg.device == "cuda":
        set_tf32(True, True)
        torch.backends.cudnn.benchmark = True


@contextlib.contextmanager
def matmul_precision(device, precision):
    """fp32: IEEE float32 convs and matmuls (TF32, the cuDNN default on Ampere+, costs ~3
    decimal digits of the features); tf32: TensorFloat-32. Restores the caller's setting."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = tf32_flags()
    set_tf32(precision == "tf32", precision == "tf32")
    try:
        yield
    finally:
        set_tf32(*saved)
