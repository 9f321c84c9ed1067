"Properties, references and bad inputs of deepfake_course.spectral, and the dfc-fft-bench CLI."
import math, os, subprocess, sys

import numpy as np
import pytest
import scipy.fft, scipy.ndimage
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from deepfake_course.core import ImageFormatError, ConfigError
from deepfake_course.metrics import frame_auc
from deepfake_course.spectral import (to_gray, log_spectrum, power_spectrum, azimuthal_average, angular_spectrum,
    dct2, idct2, log_dct, median3x3, noise_residual, autocorrelation, residual_fingerprint, band_pass,
    spectral_features, SpectralDetector, benchmark_features, FEATURE_KINDS)

torch.set_num_threads(1)
sizes = st.integers(min_value=2, max_value=17)


def _rand(*shape, seed=0):
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@settings(max_examples=25, deadline=None)
@given(h=sizes, w=sizes, seed=st.integers(0, 10_000))
def test_dct_matches_scipy_and_inverts(h, w, seed):
    x = _rand(2, 1, h, w, seed=seed)
    ref = scipy.fft.dctn(x.double().numpy(), type=2, norm='ortho', axes=(-2, -1))
    np.testing.assert_allclose(dct2(x).numpy(), ref, atol=1e-4)
    np.testing.assert_allclose(idct2(dct2(x)).numpy(), x.numpy(), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(h=sizes, w=sizes, seed=st.integers(0, 10_000), window=st.booleans())
def test_parseval_and_numpy_reference(h, w, seed, window):
    x = _rand(1, 2, h, w, seed=seed).double()
    P = power_spectrum(x, window=window).double()
    y = x - x.mean(dim=(-2, -1), keepdim=True)
    if window:
        y = y * torch.outer(torch.hann_window(h, periodic=True, dtype=torch.float64), torch.hann_window(w, periodic=True, dtype=torch.float64))
    np.testing.assert_allclose(P.sum(dim=(-2, -1)).numpy(), y.square().sum(dim=(-2, -1)).numpy(), rtol=1e-4, atol=1e-5)
    ref = np.abs(np.fft.fftshift(np.fft.fft2(y.numpy(), norm='ortho'), axes=(-2, -1)))**2
    np.testing.assert_allclose(P.numpy(), ref, atol=1e-4)


def _azimuthal_np(img):
    h, w = img.shape
    y, x = np.indices((h, w))
    r = np.floor(np.hypot(y - h // 2, x - w // 2)).astype(int)
    return np.array([img[r == i].mean() for i in range(r.max() + 1)])


@settings(max_examples=25, deadline=None)
@given(h=sizes, w=sizes, seed=st.integers(0, 10_000))
def test_azimuthal_matches_numpy(h, w, seed):
    spec = log_spectrum(_rand(3, 2, h, w, seed=seed))
    prof = azimuthal_average(spec)
    for b in range(3):
        for c in range(2):
            np.testing.assert_allclose(prof[b, c].numpy(), _azimuthal_np(spec[b, c].numpy()), atol=1e-4)


@pytest.mark.parametrize('k0,l0,size', [(0, 5, 32), (3, 4, 40), (7, 0, 31), (6, 8, 64)])
def test_sinusoid_energy_at_its_frequency(k0, l0, size):
    m, n = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    wave = torch.cos(2 * math.pi * (k0 * m + l0 * n) / size).double()[None, None]
    P = power_spectrum(wave)[0, 0]
    peak = np.unravel_index(int(P.argmax()), P.shape)
    assert {tuple(map(int, peak))} <= {(size // 2 + k0, size // 2 + l0), (size // 2 - k0, size // 2 - l0)}
    assert abs(float(P[size // 2 + k0, size // 2 + l0]) - size * size / 4) < 1e-2 * size * size
    assert int(azimuthal_average(P[None, None])[0, 0].argmax()) == int(math.floor(math.hypot(k0, l0)))


def test_angular_spectrum_direction():
    size = 64
    m, n = torch.meshgrid(torch.arange(size), torch.arange(size), indexing='ij')
    vertical_stripes = torch.cos(2 * math.pi * 16 * n / size).float()[None, None]   # varies along x: angle 0
    horizontal_stripes = torch.cos(2 * math.pi * 16 * m / size).float()[None, None]  # varies along y: angle pi/2
    assert int(angular_spectrum(power_spectrum(vertical_stripes), 16)[0, 0].argmax()) == 0
    assert int(angular_spectrum(power_spectrum(horizontal_stripes), 16)[0, 0].argmax()) == 8
    with pytest.raises(ConfigError, match='r_min=0.9'):
        angular_spectrum(power_spectrum(vertical_stripes), r_min=0.9)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(2, 12), w=st.integers(2, 12), seed=st.integers(0, 10_000), levels=st.sampled_from([2, 3, 256]))
def test_median_network_matches_scipy_with_ties(h, w, seed, levels):
    x = torch.randint(0, levels, (1, 2, h, w), generator=torch.Generator().manual_seed(seed)).float()
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode='mirror')
    np.testing.assert_array_equal(median3x3(x).numpy(), ref)


def test_median_matches_scipy_and_residual_properties():
    x = _rand(2, 3, 13, 10, seed=3)
    ref = scipy.ndimage.median_filter(x.numpy(), size=(1, 1, 3, 3), mode='mirror')
    np.testing.assert_allclose(median3x3(x).numpy(), ref, atol=1e-6)
    # a linear ramp is preserved by the median in the interior, so the residual vanishes there
    ramp = torch.arange(12.).repeat(12, 1)[None, None] / 12
    assert noise_residual(ramp)[..., 1:-1, 1:-1].abs().max() < 1e-6


def test_autocorrelation_wiener_khinchin_and_periodic_peak():
    r = _rand(1, 1, 11, 14, seed=5).double()
    R = autocorrelation(power_spectrum(r, remove_mean=False))[0, 0].numpy()
    a = r[0, 0].numpy()
    direct = np.array([[np.sum(a * np.roll(a, (-i, -j), axis=(0, 1))) for j in range(14)] for i in range(11)])
    np.testing.assert_allclose(R, np.fft.fftshift(direct / direct[0, 0]), atol=1e-6)
    # a tile repeated with period 8 gives autocorrelation close to 1 at lag (0, 8) (not exactly: the median's
    # reflected borders break the periodicity of the residual in the outer rows and columns), and small elsewhere
    tile = _rand(1, 1, 8, 8, seed=6)
    x = tile.repeat(1, 1, 4, 4)
    fp = residual_fingerprint(x)
    R = fp['autocorr'][0]
    assert float(R[16, 16 + 8]) > 0.98 and float(R[16 + 8, 16]) > 0.98
    assert float(R[16, 16 + 3]) < 0.5 and float(R[16 + 4, 16 + 4]) < 0.5
    assert fp['power'].shape == (1, 32, 32)


def test_band_pass_partition_and_errors():
    x = _rand(2, 3, 16, 20, seed=7)
    edges = [0, 0.05, 0.2, 0.4, math.inf]
    total = sum(band_pass(x, a, b) for a, b in zip(edges[:-1], edges[1:]))
    np.testing.assert_allclose(total.numpy(), x.numpy(), atol=1e-5)
    with pytest.raises(ConfigError, match='low=-0.1'):
        band_pass(x, -0.1, 0.2)


@pytest.mark.parametrize('bad,msg', [
    (torch.rand(3, 8, 8), 'add a batch dim'),
    (torch.zeros(1, 3, 8, 8, dtype=torch.int64), 'expected a float tensor'),
    (torch.full((1, 1, 8, 8), float('nan')), 'NaN or infinite'),
    (np.zeros((1, 1, 8, 8), np.float32), 'expected a torch tensor, got ndarray'),
    (torch.rand(1, 1, 1, 8), 'too small'),
])
def test_bad_inputs_named(bad, msg):
    for fn in (log_spectrum, dct2, noise_residual, lambda x: band_pass(x, 0.1)):
        with pytest.raises(ImageFormatError, match=msg):
            fn(bad)


def test_gray_is_explicit():
    with pytest.raises(ImageFormatError, match='expected 1 or 3 channels'):
        to_gray(torch.rand(1, 4, 8, 8))
    rgb = torch.rand(2, 3, 8, 8)
    expected = 0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2]
    np.testing.assert_allclose(to_gray(rgb)[:, 0].numpy(), expected.numpy(), atol=1e-6)
    with pytest.raises(ImageFormatError, match='complex'):
        azimuthal_average(torch.fft.fft2(rgb))


def test_features_deterministic_and_batch_independent():
    x = _rand(7, 3, 24, 24, seed=8)
    for kind in FEATURE_KINDS:
        a = spectral_features(x, kind, batch_size=7)
        b = spectral_features(x, kind, batch_size=3)
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        assert a.dtype == np.float32 and np.isfinite(a).all()


def test_detector_learns_upsampling_and_rejects_misuse():
    g = torch.Generator().manual_seed(0)
    def toy(n):
        real = F.avg_pool2d(torch.randn(n, 1, 34, 34, generator=g), 3, 1)
        fake = F.interpolate(torch.randn(n, 1, 16, 16, generator=g), scale_factor=2, mode='bilinear')
        return torch.cat([real, fake]), np.r_[np.zeros(n), np.ones(n)]
    (xtr, ytr), (xte, yte) = toy(30), toy(30)
    for kind, clf in [('azimuthal', 'logistic'), ('dct', 'ridge'), ('residual_azimuthal', 'logistic')]:
        p = SpectralDetector(kind, clf).fit(xtr, ytr).predict_proba(xte)
        assert ((p >= 0) & (p <= 1)).all()
        assert frame_auc(yte.astype(int), p) > 0.9, kind
    with pytest.raises(ConfigError, match='call fit'):
        SpectralDetector().predict_proba(xte)
    with pytest.raises(ConfigError, match='both classes'):
        SpectralDetector().fit(xtr[:5], np.zeros(5))
    with pytest.raises(ConfigError, match="unknown classifier 'svm'"):
        SpectralDetector(classifier='svm')


def test_benchmark_cli_runs():
    env = dict(os.environ, OMP_NUM_THREADS='1')
    exe = os.path.join(os.path.dirname(sys.executable), 'dfc-fft-bench')
    cmd = [exe] if os.path.exists(exe) else [sys.executable, '-c', 'from deepfake_course.spectral import fft_benchmark; fft_benchmark()']
    out = subprocess.run(cmd + ['--sizes', '16,32', '--seconds', '0.3', '--batch_size', '4', '--threads', '1', '--device', 'cpu'],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert 'torch threads=1' in out.stdout
    for name in ('log_spectrum', 'azimuthal', 'log_dct', 'residual', 'fingerprint', 'band_pass'):
        line = next(l for l in out.stdout.splitlines() if l.startswith(name))
        assert len(line.split()) == 3 and all(float(v) > 0 for v in line.split()[1:])
