"""Sampling changes no state of G: batch statistics or running statistics, as asked."""
import pytest
import torch

from conftest import make_trainer


@pytest.mark.slow
def test_sampling_changes_no_model_state(tmp_path):
    t = make_trainer(tmp_path, "--span", "2", "--ema_decay", "0.5")
    t.G(torch.randn(8, 32))  # non-trivial running stats and u/v
    state = {k: v.clone() for k, v in t.G.state_dict().items()}
    t.write_samples()
    assert all(torch.equal(state[k], v) for k, v in t.G.state_dict().items())
    assert t.G.training
    # batch statistics: the grid equals a train-mode forward of the same z...
    t.G.eval()
    with torch.no_grad():
        eval_imgs = t.G(t.fixed_z)
    t.G.train()
    from sampling import sampling_mode
    with sampling_mode(t.G, "batch"):
        batch_imgs = t.G(t.fixed_z)
    with sampling_mode(t.G, "eval"):
        torch.testing.assert_close(t.G(t.fixed_z), eval_imgs)
    # ... and differs from running statistics
    assert not torch.allclose(batch_imgs, eval_imgs)
