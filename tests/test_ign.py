"IGN (lesson 11): gradient routing, tightness bound, idempotence metrics, sampler NFE, bad inputs, artefacts."
import math
import pytest
import torch
from hypothesis import given, settings, strategies as st

from deepfake_course.core import ImageFormatError, ConfigError, TrainingError, ChecksumError, DataError, MetricError
from deepfake_course.generative.ign import (IGNConfig, IGNNet, distance, frozen_copy, refresh_frozen, smooth_tightness, ign_losses,
                                            train_ign, save_ign, load_ign, build_ign, idempotence_metrics, check_nontrivial,
                                            idempotent_sample, corrupt, projection_metrics, CORRUPTIONS)

SMALL = IGNConfig(width=8, latent=16, batch_size=4, steps=2)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    f = IGNNet(SMALL)
    f_copy = refresh_frozen(frozen_copy(f), f)
    x, z = torch.rand(4, 1, 32, 32) * 2 - 1, torch.randn(4, 1, 32, 32)
    return f, f_copy, x, z


def test_frozen_copy_gets_no_gradient(setup):
    f, f_copy, x, z = setup
    assert not any(p.requires_grad for p in f_copy.parameters())
    ign_losses(f, f_copy, x, z, SMALL)['loss'].backward()
    assert all(p.grad is None for p in f_copy.parameters())
    assert all(p.grad is not None for p in f.parameters())


def test_idempotence_reaches_theta_only_through_inner_call(setup):
    f, f_copy, x, z = setup
    out = ign_losses(f, f_copy, x, z, SMALL)
    theta = list(f.parameters())
    g = torch.autograd.grad(out['idem'], theta, retain_graph=True)
    d_fz = torch.autograd.grad(out['idem'], out['fz'], retain_graph=True)[0]
    g_inner = torch.autograd.grad(out['fz'], theta, grad_outputs=d_fz)
    for a, b in zip(g, g_inner): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    fz = f(z)  # without the frozen copy the outer call would move too
    g_naive = torch.autograd.grad(distance(f(fz), fz).mean(), theta)
    assert max((a - b).abs().max().item() for a, b in zip(g, g_naive)) > 1e-5


def test_tightness_reaches_theta_only_through_outer_call(setup):
    f, f_copy, x, z = setup
    out = ign_losses(f, f_copy, x, z, SMALL)
    assert torch.autograd.grad(out['tight'], out['fz'], retain_graph=True, allow_unused=True)[0] is None
    assert torch.autograd.grad(out['tight'], out['fx'], retain_graph=True, allow_unused=True)[0] is None  # bound is detached
    g = torch.autograd.grad(out['tight'], list(f.parameters()))
    assert sum(t.abs().sum().item() for t in g) > 0


@settings(max_examples=50, deadline=None)
@given(st.floats(-1e4, 0.0), st.floats(1e-4, 10.0), st.floats(0.1, 5.0))
def test_smoothed_tightness_is_bounded(tight, rec, a):
    out = smooth_tightness(torch.tensor([tight]), torch.tensor([rec]), a)
    assert out.abs().item() <= a * rec * (1 + 1e-5) + 1e-7
    assert out.item() <= 0


def test_idempotence_metrics_on_known_maps():
    x, z = torch.rand(16, 1, 8, 8) * 2 - 1, torch.randn(16, 1, 8, 8)
    ident = idempotence_metrics(lambda u: u, z, x, device='cpu')
    assert ident['idem_residual'] == 0 and ident['rec_rel_heldout'] == 0 and ident['not_identity'] == 0
    assert any('identity' in m for m in check_nontrivial(ident))
    const = idempotence_metrics(lambda u: torch.full_like(u, -1.0), z, x, device='cpu')
    assert const['idem_residual'] == 0 and const['batch_std_ratio'] == 0
    assert any('constant' in m for m in check_nontrivial(const))
    half = idempotence_metrics(lambda u: 0.5 * u, z, x, k=3, device='cpu')
    assert half['idem_residuals_k'] == pytest.approx([0.5] * 3, abs=1e-5)
    assert check_nontrivial(dict(not_identity=1.0, batch_std_ratio=0.9)) == []
    with pytest.raises(MetricError, match='at least 2'): idempotence_metrics(lambda u: u, z[:1], x, device='cpu')


@pytest.mark.parametrize('steps,batch,n', [(1, 4, 8), (2, 4, 8), (4, 3, 7)])
def test_sampler_counts_nfe(steps, batch, n):
    f = IGNNet(SMALL).eval()
    s, info = idempotent_sample(f, n, (1, 32, 32), steps=steps, batch_size=batch, device='cpu')
    assert s.shape == (n, 1, 32, 32)
    assert info['nfe'] == steps * math.ceil(n / batch) and info['nfe_per_sample'] == steps
    assert info['images_through_network'] == steps * n


def test_bad_inputs_raise_clear_errors():
    f = IGNNet(SMALL)
    with pytest.raises(ImageFormatError, match=r'expected B x 1 x 32 x 32, got shape \(2, 3, 32, 32\)'): f(torch.zeros(2, 3, 32, 32))
    with pytest.raises(ImageFormatError, match='got shape'): f(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ConfigError, match='power of two'): IGNConfig(image_size=48)
    with pytest.raises(ConfigError, match="unknown distance"): IGNConfig(distance='l3')
    with pytest.raises(ImageFormatError, match='same shape'):
        ign_losses(f, frozen_copy(f), torch.zeros(2, 1, 32, 32), torch.zeros(3, 1, 32, 32), SMALL)
    with pytest.raises(DataError, match=r'\[-1, 1\]'): train_ign(SMALL, torch.full((4, 1, 32, 32), 2.0), progress=False)
    with pytest.raises(ConfigError, match="unknown corruption"): corrupt(torch.zeros(1, 1, 8, 8), 'jpeg')


def test_nan_loss_names_the_step():
    with pytest.raises(TrainingError, match=r'at step \d+'):
        train_ign(IGNConfig(width=8, latent=16, batch_size=4, lr=1e30, steps=50), torch.rand(8, 1, 32, 32) * 2 - 1, progress=False)


def test_training_is_deterministic():
    imgs = torch.rand(8, 1, 32, 32) * 2 - 1
    a, b = train_ign(SMALL, imgs, progress=False), train_ign(SMALL, imgs, progress=False)
    for p, q in zip(a.net.parameters(), b.net.parameters()): assert torch.equal(p, q)


def test_artefact_round_trip_and_cache(dfc_home):
    imgs = torch.rand(8, 1, 32, 32) * 2 - 1
    ign = build_ign('t', SMALL, imgs, 'rand8', progress=False)
    folder = dfc_home / 'models' / 'ign-t'
    assert (folder / 'model.safetensors').is_file() and (folder / 'ign.json').is_file()
    again = build_ign('t', SMALL, imgs, 'rand8', progress=False)   # reused, not retrained
    assert again.info['seconds'] == ign.info['seconds']
    (folder / 'model.safetensors').write_bytes(b'x')
    with pytest.raises(ChecksumError, match='sha256'): load_ign(folder)


def test_projection_metrics_rows():
    rows = projection_metrics(lambda u: u, torch.rand(4, 1, 16, 16) * 2 - 1, device='cpu')
    assert [r['corruption'] for r in rows] == list(CORRUPTIONS)
    for r in rows: assert r['projected_err'] == pytest.approx(r['input_err']) and r['idem_residual'] == 0
