"SIGN-lite (lesson 12): student wiring, DMD gradient, loss routing, ramp, sampler NFE, bad inputs, artefacts."
import copy
import pytest
import torch

from deepfake_course.core import ImageFormatError, ConfigError, TrainingError, ChecksumError, DataError, torch_generator
from deepfake_course.diffusion import TeacherConfig, train_teacher, q_sample
from deepfake_course.generative.ign import frozen_copy, refresh_frozen
from deepfake_course.generative.sign import (Student, student_from_teacher, denoise, dmd_loss, ddim_step, teacher_pairs, SIGNConfig,
                                             idem_weight, sign_losses, train_sign, save_sign, load_sign, build_sign, sign_sample,
                                             renoise_times)


@pytest.fixture(scope='module')
def teacher():
    torch.manual_seed(0)
    return train_teacher(TeacherConfig(image_size=8, block_out_channels=(8, 8), batch_size=4, steps=2), torch.rand(8, 1, 8, 8) * 2 - 1)


@pytest.fixture(scope='module')
def pairs(teacher):
    return teacher_pairs(teacher, 4, num_steps=5, batch_size=2)


TINY = SIGNConfig(steps=2, batch_size=2, n_pairs=4, pair_steps=5)


def test_student_starts_as_teacher_denoiser_at_t_star(teacher):
    f = student_from_teacher(teacher, t_star=900)
    u = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(f(u), denoise(teacher.ema, u, torch.full((2,), 900), teacher.scheduler().alphas_cumprod, 'v_prediction'))
    assert f.unet is not teacher.ema and all(p.requires_grad for p in f.parameters())
    with pytest.raises(ImageFormatError, match=r'got shape \(2, 3, 8, 8\)'): f(torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match='t_star'): student_from_teacher(teacher, t_star=-1)


def test_dmd_surrogate_gradient(teacher):
    fake = copy.deepcopy(teacher.ema).requires_grad_(True)
    x = (torch.rand(3, 1, 8, 8) * 2 - 1).requires_grad_(True)
    loss, g = dmd_loss(x, teacher.ema, fake, teacher.scheduler().alphas_cumprod, 'v_prediction', torch.tensor([50, 500, 950]), torch.randn(3, 1, 8, 8))
    loss.backward()
    torch.testing.assert_close(x.grad, g / g.numel())
    assert all(p.grad is None for p in fake.parameters())


def test_ddim_step_with_oracle_stays_on_trajectory(teacher):
    ac = teacher.scheduler().alphas_cumprod
    x0, eps, t = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8), torch.tensor([400, 800])
    class Oracle(torch.nn.Module):
        def forward(self, xt, tt):
            from types import SimpleNamespace; return SimpleNamespace(sample=x0)
    torch.testing.assert_close(ddim_step(Oracle(), q_sample(x0, eps, t, ac), t, t - 100, ac, 'sample'), q_sample(x0, eps, t - 100, ac), rtol=1e-4, atol=1e-5)


def test_sign_loss_routing(teacher, pairs):
    zp, xp, _ = pairs
    f = student_from_teacher(teacher); f_copy = refresh_frozen(frozen_copy(f), f)
    fake = copy.deepcopy(teacher.ema).requires_grad_(True)
    x, z = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    cfg = SIGNConfig(steps=10, n_pairs=4, batch_size=2)
    out = sign_losses(f, f_copy, teacher.ema, fake, x, z, zp[:2], xp[:2], cfg, step=10, generator=torch_generator(0))
    theta = [p for p in f.parameters()]
    g = torch.autograd.grad(out['idem'], theta, retain_graph=True, allow_unused=True)
    d_fz = torch.autograd.grad(out['idem'], out['fz'], retain_graph=True)[0]
    g_inner = torch.autograd.grad(out['fz'], theta, grad_outputs=d_fz, retain_graph=True, allow_unused=True)
    for a, b in zip(g, g_inner):
        assert (a is None) == (b is None)
        if a is not None: torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    out['loss'].backward()
    for net in (f_copy, teacher.ema, fake): assert all(p.grad is None for p in net.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in f.parameters())
    with pytest.raises(ConfigError, match='trainable parameters'):
        sign_losses(f, f, teacher.ema, fake, x, z, zp[:2], xp[:2], cfg, 0, torch_generator(0))


def test_idem_ramp():
    cfg = SIGNConfig(steps=200, idem_ramp=0.5, lambda_idem=2.0)
    assert [idem_weight(cfg, k) for k in (0, 50, 100, 150)] == [0.0, 1.0, 2.0, 2.0]


@pytest.mark.parametrize('steps', [1, 2, 4])
def test_sampler_nfe(teacher, steps):
    f = student_from_teacher(teacher).eval()
    s, info = sign_sample(f, 5, steps=steps, batch_size=2, device='cpu')
    assert s.shape == (5, 1, 8, 8) and info['nfe'] == 3 * steps and info['nfe_per_sample'] == steps
    assert info['renoise_times'] == renoise_times(steps, 300) and len(info['renoise_times']) == steps - 1


def test_teacher_pairs_nfe(pairs):
    z, x, info = pairs
    assert z.shape == x.shape == (4, 1, 8, 8)
    assert info['nfe'] == 10 and info['nfe_per_sample'] == 5


def test_bad_inputs_and_nan(teacher, pairs):
    imgs = torch.rand(8, 1, 8, 8) * 2 - 1
    with pytest.raises(ImageFormatError, match='got shape'): train_sign(TINY, teacher, torch.rand(8, 3, 8, 8), progress=False)
    with pytest.raises(DataError, match='finite'): train_sign(TINY, teacher, imgs.clone().fill_(float('nan')), progress=False)
    with pytest.raises(ConfigError, match='n_pairs'): SIGNConfig(n_pairs=2, batch_size=8)
    with pytest.raises(TrainingError, match=r'at step \d+'):
        train_sign(SIGNConfig(steps=20, batch_size=2, n_pairs=4, pair_steps=5, lr=1e30), teacher, imgs, progress=False, pairs=pairs[:2])


def test_artefact_round_trip_and_cache(teacher, dfc_home):
    imgs = torch.rand(8, 1, 8, 8) * 2 - 1
    s = build_sign('t', TINY, teacher, imgs, 'rand8', progress=False)
    folder = dfc_home / 'models' / 'sign-t'
    again = build_sign('t', TINY, teacher, imgs, 'rand8', progress=False)
    assert again.info['seconds'] == s.info['seconds']   # reused, not retrained
    u = torch.randn(2, 1, 8, 8)
    with torch.no_grad(): torch.testing.assert_close(again.student(u), s.student(u))
    (folder / 'student.safetensors').write_bytes(b'x')
    with pytest.raises(ChecksumError, match='sha256'): load_sign(folder, teacher)
