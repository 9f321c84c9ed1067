"Diffusion foundations (lesson 09): NFE counts, forward-process maths, the cached teacher, local FID/KID, the SD loader."
import json
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from deepfake_course.core import ConfigError, DataError, ChecksumError, TrainingError, MetricError, torch_generator
from deepfake_course.diffusion import (TeacherConfig, make_unet, make_scheduler, sample, NFECounter, q_sample, v_target,
                                       x0_from_eps, x0_from_v, predicted_x0, diffusion_loss, EMA, train_teacher,
                                       save_teacher, load_teacher, build_teacher, digits_tensor, FeatureNet,
                                       train_feature_net, local_fid_kid, class_histogram, make_tiny_sd, TinySDConfig,
                                       save_sd_components, load_sd_components, sd_scheduler, PROMPT_FILE, per_1000_samples,
                                       digits_teacher, DIGITS_TEACHER, build_tiny_sd, verify_tiny_sd, sdedit,
                                       build_diffusion_families, embedded_real_images)

TINY = dict(image_size=8, block_out_channels=(8, 8), norm_num_groups=8)


@pytest.fixture(scope='module')
def tiny_unet():
    torch.manual_seed(0)
    return make_unet(TeacherConfig(**TINY))


class _StubDenoiser(torch.nn.Module):
    "Predicts zero: the sampler's NFE bookkeeping without the cost of a UNet."
    def forward(self, x, t):
        from types import SimpleNamespace
        return SimpleNamespace(sample=torch.zeros_like(x))


@pytest.mark.parametrize('kind,steps,n,batch,expected', [('ddpm', None, 1, 1, 1000), ('ddpm', None, 3, 2, 2000),
                                                         ('ddim', 50, 5, 2, 150), ('ddim', 7, 3, 3, 7)])
def test_sampler_nfe_counts(kind, steps, n, batch, expected):
    x, info = sample(_StubDenoiser(), make_scheduler(TeacherConfig(**TINY), kind), n=n, num_steps=steps, batch_size=batch,
                     shape=(1, 8, 8))
    assert info['nfe'] == expected
    assert info['nfe_per_sample'] == (steps or 1000)
    assert x.shape == (n, 1, 8, 8) and x.abs().max() <= 1


def test_real_unet_ddim50_nfe(tiny_unet):
    _, info = sample(tiny_unet, make_scheduler(TeacherConfig(**TINY), 'ddim'), n=2, num_steps=50, batch_size=2)
    assert (info['nfe'], info['images_through_network']) == (50, 100)


def test_sampler_is_seeded(tiny_unet):
    sch = make_scheduler(TeacherConfig(**TINY), 'ddpm')
    a, _ = sample(tiny_unet, sch, n=2, num_steps=20, seed=3)
    b, _ = sample(tiny_unet, sch, n=2, num_steps=20, seed=3)
    c, _ = sample(tiny_unet, sch, n=2, num_steps=20, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_nfe_counter_removes_its_hook(tiny_unet):
    with NFECounter(tiny_unet) as c:
        tiny_unet(torch.zeros(3, 1, 8, 8), torch.tensor([1, 2, 3]))
    tiny_unet(torch.zeros(1, 1, 8, 8), torch.tensor([1]))
    assert (c.nfe, c.images) == (1, 3)
    assert not tiny_unet._forward_hooks


def test_bad_num_steps(tiny_unet):
    with pytest.raises(ConfigError, match='num_steps must be in 1..1000'):
        sample(tiny_unet, make_scheduler(TeacherConfig(**TINY), 'ddim'), n=1, num_steps=1001)


@settings(max_examples=25, deadline=None)
@given(t=st.integers(0, 999), seed=st.integers(0, 10_000), schedule=st.sampled_from(['linear', 'scaled_linear', 'squaredcos_cap_v2']))
def test_v_and_eps_recover_x0(t, seed, schedule):
    sch = make_scheduler(TeacherConfig(beta_schedule=schedule, beta_start=1e-4 if schedule == 'linear' else 0.00085,
                                       beta_end=0.02 if schedule == 'linear' else 0.012))
    ac = sch.alphas_cumprod.double()
    g = torch_generator(seed)
    x0 = (torch.rand(2, 1, 4, 4, generator=g) * 2 - 1).double(); eps = torch.randn(2, 1, 4, 4, generator=g).double()
    tt = torch.full((2,), t)
    xt = q_sample(x0, eps, tt, ac)
    torch.testing.assert_close(x0_from_v(xt, v_target(x0, eps, tt, ac), tt, ac), x0)
    torch.testing.assert_close(x0_from_eps(xt, eps, tt, ac), x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(predicted_x0(v_target(x0, eps, tt, ac), xt, tt, ac, 'v_prediction'), x0)
    # and the targets agree with diffusers
    torch.testing.assert_close(xt.float(), sch.add_noise(x0.float(), eps.float(), tt), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(v_target(x0, eps, tt, ac).float(), sch.get_velocity(x0.float(), eps.float(), tt), atol=1e-5, rtol=1e-5)


def test_v_prediction_is_stable_at_t_max():
    "An error of 0.1 in the prediction moves x0 by ~0.1 with v, by ~16 with epsilon (linear schedule, t = 999)."
    ac = make_scheduler(TeacherConfig()).alphas_cumprod
    xt, err, t = torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.1), torch.tensor([999])
    assert x0_from_v(xt, err, t, ac).abs().max() < 0.11
    assert x0_from_eps(xt, err, t, ac).abs().max() > 10


@pytest.mark.parametrize('pt', ['epsilon', 'v_prediction', 'sample'])
def test_diffusion_loss_runs_and_backprops(tiny_unet, pt):
    loss = diffusion_loss(tiny_unet, torch.rand(4, 1, 8, 8) * 2 - 1, make_scheduler(TeacherConfig(**TINY)).alphas_cumprod, pt,
                          generator=torch_generator(0))
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None for p in tiny_unet.parameters())
    tiny_unet.zero_grad()


def test_ema_decay_warmup_and_bounds():
    lin = torch.nn.Linear(1, 1)
    ema = EMA(lin, 0.999)
    assert [round(ema.current_decay(), 4)] == [0.1]
    ema.updates = 10_000
    assert ema.current_decay() == 0.999
    with pytest.raises(ConfigError, match='decay'): EMA(lin, 1.0)


def test_teacher_config_errors():
    with pytest.raises(ConfigError, match='not divisible by 2\\^2'): TeacherConfig(image_size=30)
    with pytest.raises(ConfigError, match="unknown fields \\['widths'\\]"): TeacherConfig.from_dict(dict(widths=(8,)))
    assert TeacherConfig.from_dict(TeacherConfig(**TINY).to_dict()) == TeacherConfig(**TINY)


def test_train_teacher_rejects_bad_images():
    cfg = TeacherConfig(**TINY, steps=1, batch_size=2)
    with pytest.raises(DataError, match='config expects N x 1 x 8 x 8'): train_teacher(cfg, torch.zeros(4, 3, 8, 8))
    with pytest.raises(DataError, match='must lie in \\[-1, 1\\]'): train_teacher(cfg, torch.full((4, 1, 8, 8), 255.0))


def test_train_teacher_nan_raises():
    cfg = TeacherConfig(**TINY, steps=2, batch_size=2)
    imgs = torch.full((4, 1, 8, 8), float('nan'))
    with pytest.raises(TrainingError, match='loss is nan at step 0'): train_teacher(cfg, imgs)


def test_train_teacher_continues():
    imgs = torch.rand(8, 1, 8, 8) * 2 - 1
    cfg = TeacherConfig(**TINY, steps=2, batch_size=2)
    t = train_teacher(cfg, imgs)
    before = [p.clone() for p in t.ema.parameters()]
    t = train_teacher(cfg, imgs, steps=3, teacher=t)
    assert t.info['steps'] == 5 and t.history[-1]['step'] == 5
    assert any(not torch.equal(a, b) for a, b in zip(before, t.ema.parameters()))


def test_train_teacher_is_deterministic_and_learns():
    "Deterministic, and the loss falls on a learnable distribution (two flat images; uniform noise is nearly unlearnable in 40 steps)."
    imgs = torch.cat([torch.full((8, 1, 8, 8), -0.8), torch.full((8, 1, 8, 8), 0.6)])
    cfg = TeacherConfig(**TINY, steps=40, batch_size=8, lr=3e-3)
    a, b = train_teacher(cfg, imgs, log_every=10), train_teacher(cfg, imgs, log_every=10)
    for (k, va), vb in zip(a.ema.state_dict().items(), b.ema.state_dict().values()):
        assert torch.equal(va, vb), k
    assert a.info['steps'] == 40 and a.history[-1]['loss'] < a.history[0]['loss']


def test_save_load_round_trip_and_checksums(tmp_path):
    t = train_teacher(TeacherConfig(**TINY, steps=2, batch_size=2), torch.rand(4, 1, 8, 8) * 2 - 1)
    p = save_teacher(t, tmp_path / 't')
    rec = json.loads((p / 'teacher.json').read_text())
    assert set(rec['sha256']) == {'unet.safetensors', 'ema.safetensors'}
    back = load_teacher(p)
    for net_a, net_b in ((t.unet, back.unet), (t.ema, back.ema)):
        for (k, va), vb in zip(net_a.state_dict().items(), net_b.state_dict().values()):
            assert torch.equal(va, vb), k
    (p / 'unet.safetensors').unlink()
    with pytest.raises(DataError, match='missing unet.safetensors'): load_teacher(p)


def test_build_teacher_caches_and_retrains(dfc_home, monkeypatch):
    import deepfake_course.diffusion as D
    monkeypatch.setattr(D, 'teacher_data', lambda data, n, size: torch.rand(8, 1, size, size) * 2 - 1)
    cfg = TeacherConfig(**TINY, steps=2, batch_size=2)
    a = build_teacher('t', cfg, data='digits', n=8)
    folder = dfc_home / 'models' / 'teacher-t'
    stamp = (folder / 'ema.safetensors').stat().st_mtime_ns
    b = build_teacher('t', cfg, data='digits', n=8)            # reused, not retrained
    assert (folder / 'ema.safetensors').stat().st_mtime_ns == stamp and b.info == a.info
    c = build_teacher('t', TeacherConfig(**TINY, steps=3, batch_size=2), data='digits', n=8)   # config changed: retrained
    assert c.info['steps'] == 3
    (folder / 'ema.safetensors').write_bytes(b'x')
    with pytest.raises(ChecksumError, match='ema.safetensors'): build_teacher('t', cfg, data='digits', n=8)


def test_digits_tensor_is_shuffled_and_padded():
    x, y = digits_tensor(200, seed=1)
    assert x.shape == (200, 1, 32, 32) and len(y.unique()) == 10
    assert torch.equal(digits_tensor(5, seed=1)[1], y[:5])
    with pytest.raises(ConfigError, match='n must be in 1..5000'): digits_tensor(6000)


def test_local_fid_kid_orders_distributions():
    torch.manual_seed(0)
    net = FeatureNet(1, 10, width=8, num_features=8)
    real = torch.rand(30, 1, 16, 16) * 2 - 1
    near = (real + 0.05 * torch.randn_like(real)).clamp(-1, 1)
    far = torch.full_like(real, 0.8)
    s_near, s_far = local_fid_kid(real, near, net, subsets=5), local_fid_kid(real, far, net, subsets=5)
    assert s_near['fid_local'] < s_far['fid_local'] and s_near['kid_local'] < s_far['kid_local']
    assert s_near['subset_size'] == 30
    with pytest.raises(MetricError, match='differ in shape'): local_fid_kid(real, real[:, :, :8], net)


def test_feature_net_learns_separable_classes():
    x = torch.cat([torch.full((40, 1, 16, 16), -0.8), torch.full((40, 1, 16, 16), 0.8)]) + 0.1 * torch.randn(80, 1, 16, 16)
    y = torch.cat([torch.zeros(40), torch.ones(40)]).long()
    net, info = train_feature_net(x, y, steps=30, width=8, num_features=8)
    assert info['val_accuracy'] == 1.0
    h = class_histogram(x, net)
    assert h['counts'] == [40, 40] and h['classes_covered'] == 2
    with pytest.raises(DataError, match='80 images but 3 labels'): train_feature_net(x, y[:3])


def test_tiny_sd_round_trip(tmp_path):
    sd = make_tiny_sd(TinySDConfig(image_size=16, vae_channels=(16, 16), unet_channels=(16, 32), cross_attention_dim=16))
    p = save_sd_components(sd, tmp_path / 'sd')
    assert {'unet', 'vae', 'scheduler', 'model_index.json', PROMPT_FILE} <= {q.name for q in p.iterdir()}
    back = load_sd_components(p)
    assert back.scheduler.config.beta_schedule == 'scaled_linear' and back.scaling_factor == pytest.approx(0.18215)
    torch.testing.assert_close(back.prompt_embeds, sd.prompt_embeds)
    z = torch.randn(2, 4, 8, 8); t = torch.tensor([3, 900])
    with torch.no_grad():
        torch.testing.assert_close(back.unet(z, t, encoder_hidden_states=back.cond(2)).sample,
                                   sd.unet(z, t, encoder_hidden_states=sd.cond(2)).sample)
        torch.testing.assert_close(back.decode(z), sd.decode(z))


def test_sd_loader_without_prompt_needs_transformers(tmp_path):
    sd = make_tiny_sd(TinySDConfig(image_size=16, vae_channels=(16, 16), unet_channels=(16, 32), cross_attention_dim=16))
    p = save_sd_components(sd, tmp_path / 'sd')
    (p / PROMPT_FILE).unlink()
    (p / 'text_encoder').mkdir(); (p / 'tokenizer').mkdir()
    try:
        import transformers  # noqa: F401
        pytest.skip('transformers is installed: the missing-package message cannot be checked here')
    except ImportError:
        with pytest.raises(ConfigError, match='pip install transformers'): load_sd_components(p)


def test_sd_schedule_matches_ldm_linear():
    "ldm's 'linear' schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000) ** 2."
    ref = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(sd_scheduler().betas.double(), ref, atol=1e-8, rtol=0)


def test_per_1000_samples():
    r = per_1000_samples(dict(sampler='DDPMScheduler', nfe_per_sample=1000, seconds_per_nfe=0.4, batch_size=64))
    assert r['seconds_per_1000'] == pytest.approx(0.4 * 1000 * 16)


def test_warmup_lr_and_on_log():
    imgs = torch.rand(8, 1, 8, 8) * 2 - 1
    seen = []
    t = train_teacher(TeacherConfig(**TINY, steps=4, batch_size=2, warmup_steps=10), imgs, log_every=2,
                      on_log=lambda teacher, rec: seen.append(rec['step']))
    assert seen == [2, 4] and t.info['steps'] == 4


def test_digits_teacher_recipe_is_the_documented_one():
    assert DIGITS_TEACHER.prediction_type == 'v_prediction' and DIGITS_TEACHER.block_out_channels == (16, 32, 32)
    assert not DIGITS_TEACHER.attention and DIGITS_TEACHER.steps == 2000 and DIGITS_TEACHER.batch_size == 64  # lesson 09's recipe


@pytest.fixture(scope='module')
def tiny_build():
    from deepfake_course.data.build import build_embedded
    return build_embedded('tiny', verbose=False)


@pytest.fixture(scope='module')
def tiny_sd_folder(tiny_build, tmp_path_factory):
    return build_tiny_sd(tiny_build, vae_steps=2, unet_steps=2, root=tmp_path_factory.mktemp('sd') / 'tiny-sd')


def test_tiny_sd_artefact_loads_and_checks(tiny_sd_folder, tiny_build):
    rec = verify_tiny_sd(tiny_sd_folder)
    sd = load_sd_components(tiny_sd_folder)
    assert sd.scaling_factor == pytest.approx(rec['info']['scaling_factor'])
    assert build_tiny_sd(tiny_build, vae_steps=2, unet_steps=2, root=tiny_sd_folder) == tiny_sd_folder  # reused
    x = embedded_real_images(tiny_build, 'test')[:2]
    y, info = sdedit(sd, x, strength=0.5, num_steps=4, seeds=[1, 2])
    assert y.shape == x.shape and info['nfe'] == 2
    torch.testing.assert_close(sdedit(sd, x, strength=0.5, num_steps=4, seeds=[1, 2])[0], y)
    with pytest.raises(ConfigError, match='strength must be in'): sdedit(sd, x, strength=1.5)


def test_tiny_sd_checksum_error(tiny_sd_folder, tmp_path):
    import shutil
    copy_ = shutil.copytree(tiny_sd_folder, tmp_path / 'sd')
    next((copy_ / 'vae').glob('*.safetensors')).write_bytes(b'x')
    with pytest.raises(ChecksumError, match='sha256 does not match'): verify_tiny_sd(copy_)


def test_diffusion_families_add_on(tiny_build, tiny_sd_folder, tmp_path):
    from deepfake_course.data.build import verify_build
    from deepfake_course.data.datasets import DeepfakeDataset
    base_files = json.loads((tiny_build / 'manifest.json').read_text())['files']
    a = build_diffusion_families(tiny_build, tiny_sd_folder, num_steps=4, root=tmp_path / 'a', verbose=False)
    b = build_diffusion_families(tiny_build, tiny_sd_folder, num_steps=4, root=tmp_path / 'b', verbose=False)
    ma, mb = (json.loads((p / 'manifest.json').read_text()) for p in (a, b))
    assert ma['files'] == mb['files']                      # deterministic bytes
    assert verify_build(a)['ok'] and verify_build(tiny_build)['ok']
    assert json.loads((tiny_build / 'manifest.json').read_text())['files'] == base_files   # base build untouched
    ds = DeepfakeDataset(a / 'faces_diffusion.json', split=None)
    assert {s['family'] for s in ds.samples} == {'vae', 'diffusion'} and all(s['label'] == 1 for s in ds.samples)
    item = ds[0]
    assert item['image'].shape == item['target'].shape == (3, 32, 32)
    # same identity splits as the base build
    base = {e: s for e, s in ((v, sp) for sp in ('train', 'val', 'test')
                              for v in json.loads((tiny_build / 'faces.json').read_text())['DFC_faces']['DFC-real'][sp])}
    fam = json.loads((a / 'faces_diffusion.json').read_text())['DFC_faces_diffusion']['DFC-vae']
    assert all(base['real_' + v[len('vae_'):]] == sp for sp in fam for v in fam[sp])


def test_inception_fid_loads_local_weights_and_never_downloads(tmp_path, monkeypatch):
    "The published-metric path reads a local weights file (here a randomly initialised one the test saves) and scores."
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from deepfake_course.diffusion import inception_fid_kid, InceptionFeature
    with monkeypatch.context() as m:   # build the architecture without its weights, to save a random weights file
        m.setattr(fe, 'load_state_dict_from_url', lambda *a, **k: None)
        m.setattr(fe.FeatureExtractorInceptionV3, 'load_state_dict', lambda self, sd, strict=True: None)
        net = fe.FeatureExtractorInceptionV3('inception-v3-compat', ['2048'])
    torch.manual_seed(0)
    weights = net.state_dict()   # PyTorch's default initialisation, BN statistics 0 / 1
    torch.save(weights, tmp_path / 'inception.pth')
    monkeypatch.setattr(fe, 'load_state_dict_from_url', lambda *a, **k: pytest.fail('tried to download Inception weights'))
    feat = InceptionFeature(tmp_path / 'inception.pth')
    for a, b in zip(feat.net.state_dict().values(), weights.values()): assert torch.equal(a, b)
    real, fake = torch.rand(4, 1, 32, 32) * 2 - 1, torch.rand(4, 1, 32, 32) * 2 - 1
    r = inception_fid_kid(real, (fake * 0.2 + 0.6).clamp(-1, 1), tmp_path / 'inception.pth', subset_size=3, subsets=2)
    assert r['fid'] > 0 and np.isfinite(r['fid']) and np.isfinite(r['kid']) and (r['n_real'], r['n_fake']) == (4, 4)
    with pytest.raises(Exception, match='1- or 3-channel'):
        inception_fid_kid(torch.zeros(2, 2, 8, 8), torch.zeros(2, 2, 8, 8), tmp_path / 'inception.pth')
