"""The FID-Inception network against pytorch-fid and torch-fidelity (state dict layout,
features, TF1 resize against a brute-force reference), its weights (found, downloaded,
refused, published prefix) and its precision switch."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import device
import features
import inception
import utils

# The peers are imported in the tests that use them: each imports torchvision, a second and a
# half per test worker that never runs these tests.


@pytest.mark.slow
def test_state_dict_layout_matches_both_peers(env):
    ours = inception.FIDInception().state_dict()
    # pytorch-fid's network (its file's layout); it loads our cached file strictly via torch.hub
    from pytorch_fid.inception import fid_inception_v3
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    pf_sd = fid_inception_v3().state_dict()
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                     feature_extractor_weights_path=str(env["weights"]))
    tf_sd = tf.state_dict()
    assert len(ours) == 566 and set(pf_sd) == set(ours) == set(tf_sd)
    assert all(pf_sd[k].shape == ours[k].shape == tf_sd[k].shape for k in ours)
    # torch-fidelity's own file layout (its module's state dict) loads strictly into ours
    tf_file = env["root"] / inception.WEIGHT_FILENAMES[1]
    tf_sd = {k: v.clone() for k, v in tf_sd.items()}
    tf_sd["fc.weight"] += 1.0  # make sure the values really come from this file
    torch.save(tf_sd, tf_file)
    m = inception.load_inception(tf_file)
    assert torch.equal(m.fc.weight, tf_sd["fc.weight"])


@pytest.mark.slow
def test_features_pytorch_mode_match_pytorch_fid(env):
    from pytorch_fid.inception import InceptionV3 as PFInceptionV3
    imgs = features.load_images(env["A"])[:8]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        ref = PFInceptionV3([3], resize_input=True, normalize_input=True).eval()(x.float() / 255)[0].flatten(1)
    ours, _ = features.extract_features(inception.load_inception(env["weights"], "pytorch"), [x], progress=False)
    ref = ref.double().numpy()
    assert ref.std(0).mean() > 1e-2 * np.abs(ref).mean()  # features differ between images
    err = np.abs(ours - ref).max()
    assert err <= 1e-5 * np.abs(ref).max(), err  # observed: 0 (same float32 ops)


@pytest.mark.slow
def test_features_tf1_match_torch_fidelity(env):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    imgs = features.load_images(env["A"])[:8]
    x = torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous()
    tf = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                     feature_extractor_weights_path=str(env["weights"]))
    with torch.no_grad():
        ref_pool, ref_logits = (t.double().numpy() for t in tf(x))
    pool, logits = features.extract_features(inception.load_inception(env["weights"]), [x[:5], x[5:]], progress=False)
    assert np.abs(pool - ref_pool).max() <= 1e-5 * np.abs(ref_pool).max()  # observed: 0
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()  # observed: 0


@pytest.mark.parametrize("fn,kwargs", [
    (torch.nn.functional.max_pool2d, dict(kernel_size=3, stride=2)),
    (torch.nn.functional.max_pool2d, dict(kernel_size=3, stride=1, padding=1)),
    (torch.nn.functional.avg_pool2d, dict(kernel_size=3, stride=1, padding=1, count_include_pad=False))])
def test_pooling_on_the_cpu_gives_the_numbers_of_nchw_pooling(fn, kwargs):
    # the network's every pooling, at odd sizes and values spanning many orders of magnitude
    # (a sum in another order, or a multiply by 1/count, would round differently), with a NaN
    # and an -inf on a border (a max that skipped them, or padded with 0, would differ)
    g = torch.Generator().manual_seed(0)
    for shape in ((2, 5, 9, 7), (3, 64, 35, 35), (1, 288, 17, 15)):
        x = torch.randn(shape, generator=g) * torch.exp(4 * torch.randn(shape, generator=g))
        x[0, 0, 0, 3], x[-1, -1, 4, -1] = float("nan"), float("-inf")
        ours = inception.pool2d(fn, x, **kwargs)
        assert ours.is_contiguous(), shape
        torch.testing.assert_close(ours, fn(x, **kwargs), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("hw,out,tol", [((5, 7), (11, 13), 1e-3), ((13, 9), (4, 6), 1e-3),
                                        ((32, 32), (299, 299), 2e-2)])
def test_resize_tf1_matches_bruteforce(hw, out, tol):
    # tolerance: TF (and we) compute coordinates in float32; a 1e-7 relative coordinate error
    # at index ~300 shifts a sample by ~1e-5 px, i.e. up to ~5e-3 grey levels on a 255 edge
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(1, 3, *hw, generator=g) * 255).round()
    ours = inception.resize_tf1(x, out)
    ref = tf1_resize_reference(x[0, 1].double().numpy(), *out)
    assert np.abs(ours[0, 1].double().numpy() - ref).max() < tol
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x
    peer = interpolate_bilinear_2d_like_tensorflow1x(x, size=out, align_corners=False)
    assert torch.equal(ours, peer)  # the same float32 operations in the same order


def test_resolve_weights_explicit_missing(tmp_path):
    with pytest.raises(utils.UserError, match="does not exist"):
        inception.resolve_weights(tmp_path / "nope.pth")


@pytest.mark.parametrize("name", inception.WEIGHT_FILENAMES)
def test_resolve_weights_from_hub_cache(tmp_path, monkeypatch, name):
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / name).write_bytes(b"x")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda *a, **k: pytest.fail("must not download"))
    assert inception.resolve_weights() == ckpt / name


def test_resolve_weights_offline_warns_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    calls = []

    def offline(url, dst, *a, **k):
        calls.append(url)
        Path(dst).write_bytes(b"partial")  # a half-done download must not be left behind
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    assert inception.resolve_weights() is None
    assert inception.resolve_weights() is None
    assert calls == [inception.FID_WEIGHTS_URL]  # tried once per process (and cache folder)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1  # one warning, one line
    msg = err[0]
    assert inception.FID_WEIGHTS_URL in msg and str(tmp_path / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]) in msg
    assert not list((tmp_path / "hub" / "checkpoints").iterdir())


def test_resolve_weights_download_success(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", lambda url, dst, *a, **k: Path(dst).write_bytes(b"w"))
    assert inception.resolve_weights() == tmp_path / "hub" / "checkpoints" / inception.WEIGHT_FILENAMES[0]


@pytest.mark.slow
def test_load_inception_rejects_other_weights(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"fc.weight": torch.zeros(3)}, bad)
    with pytest.raises(utils.UserError, match="not an FID Inception"):
        inception.load_inception(bad)
    with pytest.raises(utils.UserError, match="download"):
        inception.load_inception(None)
    (tmp_path / "garbage.pth").write_bytes(b"half a download")  # not even a pickle
    with pytest.raises(utils.UserError, match="not an FID Inception"):
        inception.load_inception(tmp_path / "garbage.pth")


def test_fid_precision_context_sets_and_restores_flags():
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    before = (m.fp32_precision, c.fp32_precision)
    try:
        m.fp32_precision, c.fp32_precision = "tf32", "tf32"
        with device.matmul_precision("cuda", "fp32"):
            assert (m.fp32_precision, c.fp32_precision) == ("ieee", "ieee")
        assert (m.fp32_precision, c.fp32_precision) == ("tf32", "tf32")
        m.fp32_precision, c.fp32_precision = "ieee", "ieee"
        with device.matmul_precision("cuda", "tf32"):
            assert (m.fp32_precision, c.fp32_precision) == ("tf32", "tf32")
        assert (m.fp32_precision, c.fp32_precision) == ("ieee", "ieee")
    finally:
        m.fp32_precision, c.fp32_precision = before


def test_published_prefix_follows_the_hub_file_name():
    import torch.hub
    assert inception.PUBLISHED_SHA256_PREFIX == torch.hub.HASH_REGEX.search(inception.WEIGHT_FILENAMES[0]).group(1) == "6726825d"


def tf1_resize_reference(img, oh, ow):
    # TF1 resize_bilinear(align_corners=False) by definition: src = dst * in/out, no
    # half-pixel offset, edge-clamped neighbour, bilinear weights; float64 per pixel
    h, w = img.shape
    out = np.empty((oh, ow))
    for i in range(oh):
        sy = i * h / oh
        y0 = math.floor(sy)
        y1, dy = min(y0 + 1, h - 1), sy - y0
        for j in range(ow):
            sx = j * w / ow
            x0 = math.floor(sx)
            x1, dx = min(x0 + 1, w - 1), sx - x0
            top = (1 - dx) * img[y0, x0] + dx * img[y0, x1]
            bot = (1 - dx) * img[y1, x0] + dx * img[y1, x1]
            out[i, j] = (1 - dy) * top + dy * bot
    return out
