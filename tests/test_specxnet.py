"SpecXNet parts: shapes, FFT maths, DFA maths, fast path == reference path, gradients, determinism, errors, CLI."
import math, shutil, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from deepfake_course.core import ConfigError, seed_everything
from deepfake_course.models.specxnet import (FourierUnit, SpectralTransform, DDFC, DDFCUnit, DualFourierAttention,
    FFCSeparableConv2d, FFCBlock, specxnet, specxnet_config, set_fast_path, add_upsampled_2x2, nearest_split,
    speed_table, summarize_runs, cpu_description, MIN_INPUT_SIZE, pointwise, conv_fast, is_channels_last, HADAMARD_2x2)

torch.set_num_threads(1)


def randomize_bn(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for t, lo, hi in ((m.running_mean, -.5, .5), (m.running_var, .5, 2), (m.weight, .5, 1.5), (m.bias, -.5, .5)):
                t.data.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)
    return model.eval()


def both_paths(model, *x):
    with torch.no_grad():
        ref = set_fast_path(model, False)(*x); fast = set_fast_path(model, True)(*x)
    return (ref, fast) if isinstance(ref, tuple) else ((ref,), (fast,))


# ---------------------------------------------------------------- FourierUnit maths
@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), c=st.integers(1, 4))
def test_fourier_unit_identity_round_trip(h, w, c):
    fu = FourierUnit(c, c)
    with torch.no_grad(): fu.conv.weight.copy_(torch.eye(2 * c).view(2 * c, 2 * c, 1, 1))
    fu.bn, fu.act = nn.Identity(), nn.Identity()
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    torch.testing.assert_close(fu.double()(x), x)


@pytest.mark.parametrize('h,w', [(4, 6), (8, 5), (2, 2)])
def test_spectrum_matches_naive_dft(h, w):
    x = torch.randn(1, 2, h, w, dtype=torch.float64)
    z = FourierUnit(2, 2).double().spectrum_to_channels(x)
    n1, n2 = torch.arange(h).double(), torch.arange(w).double()
    k1, k2 = torch.arange(h).double(), torch.arange(w // 2 + 1).double()
    ref = torch.zeros(1, 2, h, w // 2 + 1, dtype=torch.complex128)
    for a in range(h):            # the definition, term by term
        for b in range(w // 2 + 1):
            phase = torch.exp(-2j * math.pi * (k1[a] * n1[:, None] / h + k2[b] * n2[None, :] / w))
            ref[..., a, b] = (x * phase).sum((-2, -1)) / math.sqrt(h * w)
    torch.testing.assert_close(z[:, 0::2], ref.real); torch.testing.assert_close(z[:, 1::2], ref.imag)


@pytest.mark.parametrize('h,w', [(5, 7), (6, 6), (8, 4), (1, 3), (9, 2)])
@pytest.mark.parametrize('channels_last', [False, True])
def test_add_upsampled_equals_interpolate(h, w, channels_last):
    "Odd sizes (four unequal quadrants) and even ones (one broadcast add over a 6-D view), in both memory formats."
    small = torch.randn(2, 3, 2, 2)
    out = torch.randn(2, 3, h, w)
    if channels_last: out = out.contiguous(memory_format=torch.channels_last)
    expect = out + torch.nn.functional.interpolate(small, size=(h, w), mode='nearest')
    got = add_upsampled_2x2(out, small)
    assert got is out   # in place
    torch.testing.assert_close(got, expect)


# ---------------------------------------------------------------- DFA maths
@pytest.mark.parametrize('fusion', ['cross', 'softmax'])
@pytest.mark.parametrize('fast', [True, False])
def test_dfa_hand_values(fusion, fast):
    dfa = DualFourierAttention(2, 2, fusion).eval()
    with torch.no_grad():
        for bn in (dfa.norm_l, dfa.norm_g): bn.eps = 0.0
        for gate, p in ((dfa.gate_l, 0.2), (dfa.gate_g, 0.6)):
            gate[1].weight.zero_(); gate[3].weight.zero_(); gate[3].bias.fill_(math.log(p / (1 - p)))
        if fusion == 'softmax':
            dfa.fusion_weight.weight.zero_(); dfa.fusion_weight.bias.copy_(torch.tensor([math.log(4.), 0.]))
    set_fast_path(dfa, fast)
    y_l, y_g = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    out_l, out_g = dfa(y_l, y_g)
    w0, w1 = (0.8, 0.2) if fusion == 'softmax' else (1.0, 1.0)
    torch.testing.assert_close(out_l, y_l * 1.6 * w0)   # local branch gated by the *global* gate (0.6)
    torch.testing.assert_close(out_g, y_g * 1.2 * w1)   # global branch gated by the *local* gate (0.2)


def test_dfa_train_mode_normalises():
    dfa = DualFourierAttention(4, 4).train()
    out_l, _ = dfa(torch.randn(8, 4, 5, 5) * 10 + 3, torch.randn(8, 4, 5, 5))
    assert out_l.shape == (8, 4, 5, 5) and torch.isfinite(out_l).all()


# ---------------------------------------------------------------- fast path == reference path
def pair(c, h, w=None, relu=False):
    t = (torch.randn(2, c, h, w or h), torch.randn(2, c, h, w or h))
    return tuple(x.relu() for x in t) if relu else t

@pytest.mark.parametrize('make,x', [
    (lambda: FourierUnit(3, 5), lambda: torch.randn(2, 3, 7, 6)),
    (lambda: SpectralTransform(6, 8, 1), lambda: torch.randn(2, 6, 9, 9)),
    (lambda: SpectralTransform(6, 8, 2), lambda: torch.randn(2, 6, 9, 8)),
    (lambda: DDFCUnit(8, 12, 3, padding=1), lambda: pair(4, 9)),
    (lambda: DDFCUnit(8, 12, 1, stride=2), lambda: pair(4, 7)),
    (lambda: DDFCUnit(8, 8, 3, padding=1, groups=4), lambda: (torch.randn(2, 4, 6, 6), None)),
    (lambda: FFCSeparableConv2d(8, 12), lambda: pair(4, 8)),
    (lambda: FFCBlock(8, 12, 2, 2), lambda: pair(4, 9)),
    (lambda: FFCBlock(12, 12, 3, 1, input_nonneg=True), lambda: pair(6, 6, relu=True)),
])
def test_fast_equals_reference(make, x):
    torch.manual_seed(0)
    m = randomize_bn(make()); inp = x()
    ref, fast = both_paths(m, inp)   # tuple-input modules take the (local, global) pair as one argument
    for a, b in zip(ref, fast): torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(2, 6, 5, 3), (1, 4, 2, 2), (3, 5, 1, 1)])
def test_pointwise_matmul_equals_conv_float64(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    w, b = torch.randn(7, shape[1], 1, 1, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    torch.testing.assert_close(pointwise(x, w, b), torch.nn.functional.conv2d(x, w, b), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pointwise(x, w), torch.nn.functional.conv2d(x, w), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('shape', [(2, 6, 5, 3), (1, 4, 7, 7), (3, 5, 2, 2)])
def test_pointwise_channels_last_is_addmm_and_keeps_layout(shape):
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(7, shape[1], 1, 1, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    assert is_channels_last(x)
    y = pointwise(x, w, b)
    assert is_channels_last(y)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, b), rtol=1e-12, atol=1e-12)
    # anything but a dense stride-1 1 x 1 falls back to F.conv2d
    torch.testing.assert_close(conv_fast(x, w, b, stride=2), torch.nn.functional.conv2d(x, w, b, stride=2))


def test_hadamard_is_rfft2_of_2x2():
    x = torch.randn(3, 5, 2, 2, dtype=torch.float64)
    spec = torch.fft.rfft2(x, norm='ortho').flatten(-2)                  # frequencies (k1, k2) row-major
    torch.testing.assert_close(spec.real, x.flatten(-2) @ HADAMARD_2x2.double().T, rtol=1e-12, atol=1e-12)
    assert spec.imag.abs().max() < 1e-12
    torch.testing.assert_close(HADAMARD_2x2 @ HADAMARD_2x2, torch.eye(4))
    # irfft2 of a 2 x 2 spectrum ignores the imaginary parts: the LFU's Im outputs never matter
    z = torch.complex(torch.randn(3, 5, 2, 2, dtype=torch.float64), torch.randn(3, 5, 2, 2, dtype=torch.float64))
    torch.testing.assert_close(torch.fft.irfft2(z, s=(2, 2), norm='ortho'), torch.fft.irfft2(z.real.to(z.dtype), s=(2, 2), norm='ortho'))


@pytest.mark.parametrize('h,w', [(9, 9), (8, 6), (3, 5)])
def test_lfu_2x2_equals_reference_float64(h, w):
    torch.manual_seed(0)
    st = randomize_bn(SpectralTransform(6, 8)).double()
    z = torch.randn(2, 4, h, w, dtype=torch.float64)
    with torch.no_grad():
        ref = torch.nn.functional.interpolate(st.local_fourier(z), size=(h, w), mode='nearest')
        fast = torch.nn.functional.interpolate(st.local_fourier_2x2(z), size=(h, w), mode='nearest')
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_bf16_autocast_runs_fourier_units_in_float32():
    "Under bf16 autocast (what the course uses on CUDA) the FFTs run in float32 instead of failing."
    m = specxnet('embedded', width=0.125)
    fu = FourierUnit(3, 3)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert fu(torch.randn(2, 3, 6, 6, dtype=torch.bfloat16)).dtype == torch.float32
        for mode in ('train', 'eval'):
            getattr(m, mode)()
            out = m(torch.randn(2, 3, 48, 48))
            assert out.shape == (2, 2) and torch.isfinite(out.float()).all()


@pytest.mark.parametrize('kernel,stride,groups,size,zeros', [
    (1, 1, 1, 9, False), (1, 1, 1, 8, False), (3, 1, 1, 7, False), (1, 2, 1, 9, False), (3, 1, 4, 6, False),
    (1, 1, 1, 5, True), (3, 1, 4, 7, True)])
def test_fused_convolutions_equal_reference_float64(kernel, stride, groups, size, zeros):
    "The stacked l2l+l2g and g2l+ST-conv1 convolutions, matmul 1 x 1s and linear SE gates keep the maths (float64)."
    torch.manual_seed(0)
    unit = randomize_bn(DDFCUnit(8, 8, kernel, stride=stride, padding=kernel // 2, groups=groups)).double()
    assert unit.ddfc._g2l_fuses_with_spectral() == (kernel == 1 and stride == 1 and groups == 1)
    x_l, x_g = (t.double() for t in pair(4, size))
    ref, fast = both_paths(unit, (x_l, None if zeros else x_g))
    for a, b in zip(ref, fast): torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_whole_model_fast_equals_reference_float64():
    torch.manual_seed(0)
    m = randomize_bn(specxnet('embedded', width=0.125)).double()
    for size in (47, 64):
        x = torch.randn(2, 3, size, size, dtype=torch.float64)
        (ref,), (fast,) = both_paths(m, x)
        torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10 * ref.abs().max().item())


def test_folded_weights_follow_parameter_updates():
    "The eval-mode cache of BN-folded weights must notice in-place parameter changes."
    m = randomize_bn(DDFCUnit(8, 8, 3, padding=1))
    x = pair(4, 6)
    with torch.no_grad():
        before = m(x)[0].clone()
        m.ddfc.conv_l2l.weight.mul_(2); m.bn_l.running_var.mul_(3)
        after = m(x)[0]
        set_fast_path(m, False); ref = m(x)[0]
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-5, atol=1e-5)


def test_cached_weights_follow_dtype_conversion():
    "After an eval forward in float32, `model.double()` must not leave float32 folded weights (or ST(0) maps) behind."
    torch.manual_seed(0)
    m = randomize_bn(specxnet('embedded', width=0.125))
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        m(x)
        m.double()
        fast = m(x.double())
        ref = set_fast_path(m, False)(x.double())
    assert fast.dtype == torch.float64
    torch.testing.assert_close(fast, ref, rtol=1e-9, atol=1e-9 * ref.abs().max().item())


# ---------------------------------------------------------------- model shapes, gradients, determinism
@pytest.mark.parametrize('size', [MIN_INPUT_SIZE, 48, 63, 64])
def test_model_shapes_odd_and_even(size):
    m = specxnet('embedded', width=0.125, num_classes=3).train()
    assert m(torch.randn(2, 3, size, size)).shape == (2, 3)
    assert m(torch.randn(2, 3, size, size + 5)).shape == (2, 3)


def test_gradients_reach_spectral_branch():
    m = specxnet('embedded', width=0.125).train()
    m(torch.randn(2, 3, 64, 64)).sum().backward()
    fus = [fu for fu in m.blocks.modules() if isinstance(fu, FourierUnit)]
    assert len(fus) > 0
    for fu in fus: assert fu.conv.weight.grad is not None and fu.conv.weight.grad.abs().sum() > 0


def test_deterministic_under_seed():
    outs = []
    for _ in range(2):
        seed_everything(123)
        m = specxnet('embedded', width=0.125).train()
        x = torch.randn(2, 3, 48, 48)
        outs.append((m(x).detach(), [p.detach().clone() for p in m.parameters()][:5]))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=0, atol=0)
    for a, b in zip(outs[0][1], outs[1][1]): torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_paper_parameter_count():
    n = sum(p.numel() for p in specxnet('paper', num_classes=2).parameters()) / 1e6
    assert abs(n - 67.86) / 67.86 < 0.01, n


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize('call,msg', [
    (lambda: specxnet('embedded', ratio=0.25), "needs equal widths"),
    (lambda: specxnet('embedded', ratio=0.75), "needs equal widths"),
    (lambda: specxnet('embedded', ratio=1.0), "ratio must be in (0, 1)"),
    (lambda: specxnet('embedded', width=0), "width must be > 0"),
    (lambda: specxnet('nope'), "unknown SpecXNet preset"),
    (lambda: specxnet_config('paper', widht=1.0), "unknown SpecXNet config fields ['widht']"),
    (lambda: DualFourierAttention(6, 2), "equal branch widths"),
    (lambda: DualFourierAttention(4, 4, fusion='figure'), "fusion must be one of"),
    (lambda: SpectralTransform(4, 4, stride=3), "stride must be 1 or 2"),
    (lambda: DDFC(8, 8, 3, groups=3), "not divisible by groups=3"),
])
def test_invalid_configs_raise_config_error(call, msg):
    with pytest.raises(ConfigError, match=None) as e: call()
    assert msg in str(e.value)


def test_bad_inputs():
    m = specxnet('embedded', width=0.125)
    with pytest.raises(ValueError, match='at least 37'): m(torch.randn(1, 3, 36, 64))
    with pytest.raises(ValueError, match='B x 3 x H x W'): m(torch.randn(3, 64, 64))


# ---------------------------------------------------------------- speed table and CLI (tiny shapes: a smoke test, not a timing)
def test_cli_runs(tmp_path):
    out = tmp_path / 'speed.csv'
    script = shutil.which('dfc-speed-bench') or str(Path(sys.executable).parent / 'dfc-speed-bench')
    # --runs 2: the benchmark twice, each in a fresh process (each prints the single-run table), then a summary;
    # --streams 2: also two forwards side by side per model, and the split bound
    r = subprocess.run([script, '--shapes', '40x1', '--threads', '1', '--repeats', '1', '--runs', '2', '--streams', '2', '--out', str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'latency_ratio' in r.stdout and 'latency_ratio_best' in r.stdout and 'mac_ratio' in r.stdout and out.exists()
    assert 'load average' in r.stdout and 'legacy_xception_cl_ms' in r.stdout
    assert 'specxnet_faults' in r.stdout and 'malloc: default' in r.stdout
    assert f"({torch.backends.cpu.get_cpu_capability()}), 1 threads" in r.stdout   # the CPU and its instruction set
    assert '-- run 1 of 2, fresh process' in r.stdout and '-- run 2 of 2, fresh process' in r.stdout
    assert r.stdout.count('parameters: legacy_xception') == 2 and 'latency_ratio_median' in r.stdout
    runs = pd.read_csv(out)
    assert list(runs['run']) == [1, 2] and (runs['size'] == 40).all()
    assert (runs['processor'] == cpu_description()).all() and set(runs['kernels']) <= {'blas', 'onednn'}
    assert f"fast ({runs['kernels'][0]} kernels)" in r.stdout
    summary = summarize_runs(runs)
    assert summary['latency_ratio_each'][0] == ' '.join(f'{v:.2f}' for v in runs['latency_ratio'])
    assert summary['latency_ratio_median'][0] == pytest.approx(runs['latency_ratio'].median())
    assert f"{summary['latency_ratio_each'][0]}" in r.stdout and summary['kernels_each'][0] in r.stdout
    assert list(runs['split_bound']) == pytest.approx(list(runs['specxnet_streams_ms'] / runs['legacy_xception_ms']))
    assert list(runs['streams_ratio']) == pytest.approx(list(runs['specxnet_streams_ms'] / runs['legacy_xception_streams_ms']))
    assert summary['split_bound_each'][0] == ' '.join(f'{v:.2f}' for v in runs['split_bound'])
    assert 'split_bound_median' in r.stdout and r.stdout.count('split_bound = specxnet_streams_ms') == 2
    r = subprocess.run([script, '--runs', '0'], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "runs must be >= 1" in r.stderr
    r = subprocess.run([script, '--out', str(tmp_path / 'no_such_folder' / 'speed.csv')], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "no_such_folder does not exist" in r.stderr
    r = subprocess.run([script, '--shapes', '40by1'], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "size x batch" in r.stderr
    r = subprocess.run([script, '--streams', '-1'], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "--streams must be >= 0" in r.stderr


KEEP_MEMORY_PROBE = '''
import platform, torch
from deepfake_course.models.specxnet import keep_freed_memory, minor_faults
def churn():   # grow the heap by 40 MB and free it, five times
    f0 = minor_faults()
    for _ in range(5):
        ts = [torch.ones(2**19) for _ in range(20)]; del ts
    return minor_faults() - f0
churn(); before = churn()
applied = keep_freed_memory(); churn()
print(platform.libc_ver()[0] or 'none', applied, before, churn())
'''

def test_keep_freed_memory_stops_page_faults():
    """In a fresh process (the setting is process-wide). Kept, 200 MB of churn maps no fresh pages (51,200 pages if
    every one faulted). By default glibc usually trims the freed heap and faults it in again, but whether it does
    depends on where small allocations land, so the default count is only compared when it is not zero."""
    r = subprocess.run([sys.executable, '-c', KEEP_MEMORY_PROBE], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    libc, applied, before, after = r.stdout.split()[-4:]
    if libc != 'glibc' or sys.platform != 'linux': assert applied == 'False'; return
    assert applied == 'True' and int(after) < 200, r.stdout
    if int(before): assert int(after) < int(before) // 100, r.stdout


# ---------------------------------------------------------------- DFT as matrix products, sums inside addmm_
ROUTES = {'pocketfft': (0, 0), 'matmul': (1000, 0), 'radix2': (0, 1000)}   # (DFT_MATMUL_MAX_SIZE, DFT_RADIX2_MAX_SIZE)

def use_route(monkeypatch, route):
    "Force every FourierUnit onto one eval fast route by setting the two size limits."
    import deepfake_course.models.specxnet as sx
    for name, limit in zip(('DFT_MATMUL_MAX_SIZE', 'DFT_RADIX2_MAX_SIZE'), ROUTES[route]): monkeypatch.setattr(sx, name, limit)

@pytest.mark.parametrize('size', [(10, 10), (18, 18), (6, 8), (1, 6), (30, 30), (26, 28), (25, 27), (74, 74), (146, 146)])
@pytest.mark.parametrize('route', ROUTES)
def test_fourier_unit_fast_paths_equal_reference(monkeypatch, size, route):
    """Every eval fast path of the FourierUnit (pocketfft + one copy, DFT as matrix products, W first + radix-2 along H)
    keeps the maths (float64); odd sizes are padded to even first, and a height of 1 falls back to pocketfft."""
    use_route(monkeypatch, route)
    torch.manual_seed(0)
    fu = randomize_bn(FourierUnit(3, 5)).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    (ref,), (fast,) = both_paths(fu, x)
    torch.testing.assert_close(fast, ref, rtol=1e-10, atol=1e-10)


def test_fourier_unit_routes_by_size(monkeypatch, backend):
    """At 299 x 299 the DFTs are matrix products: plain up to 24 px, radix-2 on the 146, 74 and 36 px maps, no FFT call.
    On BLAS the radix-2 maps take `fourier_unit_radix2`; on oneDNN, `fourier_unit_radix2_outer`."""
    import deepfake_course.models.specxnet as sx
    calls = []
    for name in ('fourier_unit_matmul', 'fourier_unit_radix2', 'fourier_unit_radix2_outer'):
        monkeypatch.setattr(sx, name, (lambda f, n: lambda x, *a, **k: calls.append((n, x.shape[-1])) or f(x, *a, **k))(getattr(sx, name), name))
    fu = randomize_bn(FourierUnit(2, 2)).eval()
    for name in ('blas', 'onednn') if sx.onednn_available() else ('blas',):
        backend(name); calls.clear()
        with torch.inference_mode():
            for n in (18, 24, 36, 74, 146, 162): fu(torch.randn(1, 2, n, n).contiguous(memory_format=torch.channels_last))
        radix2 = 'fourier_unit_radix2_outer' if name == 'onednn' else 'fourier_unit_radix2'
        assert calls == [('fourier_unit_matmul', 18), ('fourier_unit_matmul', 24), (radix2, 36),
                         (radix2, 74), (radix2, 146)], name   # 162 > DFT_RADIX2_MAX_SIZE: pocketfft


@pytest.mark.parametrize('route', ROUTES)
def test_fourier_unit_fast_paths_input_gradients(monkeypatch, route):
    "In eval mode with autograd on (saliency, attacks), every fast route gives the reference path's input gradient."
    use_route(monkeypatch, route)
    torch.manual_seed(0)
    fu = randomize_bn(FourierUnit(3, 4)).double().eval()
    x = torch.randn(2, 3, 30, 26, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    grads = []
    for fast in (False, True):
        fu.fast = fast
        xg = x.clone().requires_grad_()
        fu(xg).square().sum().backward()
        grads.append(xg.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-9, atol=1e-9)


def test_radix2_matrices_need_even_height():
    from deepfake_course.models.specxnet import radix2_matrices
    with pytest.raises(ValueError, match='even height'): radix2_matrices(7, 8)


def test_rfft2_matrices_match_torch_fft():
    from deepfake_course.models.specxnet import rfft2_matrices
    for H, W in [(4, 6), (5, 7), (18, 18)]:
        fh, fw, iw, ih = rfft2_matrices(H, W, torch.float64)
        x = torch.randn(H, W, dtype=torch.float64)
        v = (fh @ x).view(H, 2, W)
        X = torch.stack([fw @ v[k].reshape(-1) for k in range(H)]).view(H, W // 2 + 1, 2)
        torch.testing.assert_close(torch.view_as_complex(X.contiguous()), torch.fft.rfft2(x, norm='ortho'))
        S = torch.randn(H, W // 2 + 1, 2, dtype=torch.float64)   # not Hermitian: irfft2's convention must match too
        u = torch.stack([iw @ S[k].reshape(-1) for k in range(H)]).view(H, 2, W)
        torch.testing.assert_close(ih @ u.reshape(2 * H, W), torch.fft.irfft2(torch.view_as_complex(S), s=(H, W), norm='ortho'))


def test_accumulate_pointwise_into_channel_slices():
    from deepfake_course.models.specxnet import accumulate_pointwise, pixel_matrix
    out = torch.randn(2, 10, 5, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 12, 5, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)[:, 6:]
    w = torch.randn(4, 6, 1, 1, dtype=torch.float64)
    want = out[:, 3:7] + torch.nn.functional.conv2d(x, w)
    before = out.clone()
    accumulate_pointwise(out[:, 3:7], x, w)
    torch.testing.assert_close(out[:, 3:7], want)
    torch.testing.assert_close(out[:, :3], before[:, :3]); torch.testing.assert_close(out[:, 7:], before[:, 7:])   # only the slice moved
    assert pixel_matrix(torch.randn(2, 3, 4, 4)) is None   # NCHW has no pixel-matrix view
    nchw_out = torch.randn(2, 4, 5, 3, dtype=torch.float64)   # falls back to a plain add, same result
    torch.testing.assert_close(accumulate_pointwise(nchw_out.clone(), x, w), nchw_out + torch.nn.functional.conv2d(x, w))


def test_dense_unit_takes_the_accumulating_path_and_keeps_the_maths(monkeypatch):
    import deepfake_course.models.specxnet as sx
    calls = []
    orig = sx.accumulate_pointwise
    monkeypatch.setattr(sx, 'accumulate_pointwise', lambda *a, **k: calls.append(1) or orig(*a, **k))
    torch.manual_seed(0)
    unit = randomize_bn(DDFCUnit(8, 8, 1)).double()
    x_l, x_g = (t.double().contiguous(memory_format=torch.channels_last) for t in pair(4, 30))
    ref, fast = both_paths(unit, (x_l, x_g))
    assert len(calls) == 2   # g2l into Y_l, conv2 into Y_g
    for a, b in zip(ref, fast): torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------- kernel backends (BLAS or oneDNN)
import deepfake_course.models.specxnet as sx

needs_onednn = pytest.mark.skipif(not sx.onednn_available(), reason='this PyTorch build has no oneDNN inference kernels')


@pytest.fixture
def backend():
    "Set the kernel backend for one test, restoring 'auto' afterwards."
    yield sx.set_kernel_backend
    sx.set_kernel_backend('auto')


@needs_onednn
@pytest.mark.parametrize('size', [47, 64, 65])
@pytest.mark.parametrize('batch', [1, 3])
def test_kernel_backends_equal_reference_float32(backend, size, batch):
    "The whole embedded model on BLAS and on oneDNN (packed weights, fused ReLUs and sums) matches the reference path."
    torch.manual_seed(0)
    m = randomize_bn(specxnet('embedded', width=0.125))
    x = torch.randn(batch, 3, size, size)
    with torch.inference_mode():
        ref = set_fast_path(m, False)(x); set_fast_path(m, True)
        outs = {}
        for name in ('blas', 'onednn'):
            backend(name); outs[name] = m(x)
    scale = ref.abs().max()
    for name, out in outs.items(): assert (out - ref).abs().max() <= 1e-4 * scale, name


@needs_onednn
def test_onednn_takes_the_in_place_sums_in_depthwise_and_pointwise_units(backend, monkeypatch):
    "On oneDNN, g2l (depthwise too) and the ST's conv2 add into Y_l and Y_g as fused sums, and the maths hold."
    calls = []
    orig = sx.onednn_conv
    monkeypatch.setattr(sx, 'onednn_conv', lambda *a, **k: calls.append(k.get('out') is not None) or orig(*a, **k))
    backend('onednn')
    torch.manual_seed(0)
    for unit in (DDFCUnit(8, 8, 3, padding=1, groups=4), DDFCUnit(8, 8, 1)):
        unit = randomize_bn(unit)
        x = tuple(t.contiguous(memory_format=torch.channels_last) for t in pair(4, 12))
        calls.clear()
        with torch.inference_mode(): ref, fast = both_paths(unit, x)
        assert sum(calls) == 2, calls   # g2l into Y_l, conv2 into Y_g
        for a, b in zip(ref, fast): torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)


@pytest.mark.filterwarnings('error::UserWarning')   # an op without autograd support in the graph warns
@needs_onednn
def test_onednn_is_not_used_when_autograd_needs_a_graph(backend):
    "Input gradients in eval mode (saliency, attacks) take the BLAS/aten path even with oneDNN chosen, and agree."
    backend('onednn')
    torch.manual_seed(0)
    m = randomize_bn(specxnet('embedded', width=0.125))
    x = torch.randn(2, 3, 48, 48, requires_grad=True)
    m(x).sum().backward()
    g_fast = x.grad.clone(); x.grad = None
    set_fast_path(m, False)(x).sum().backward()
    torch.testing.assert_close(g_fast, x.grad, rtol=1e-4, atol=1e-4 * x.grad.abs().max().item())


@needs_onednn
@pytest.mark.parametrize('size', [(6, 8), (26, 27), (74, 74), (146, 146)])
@pytest.mark.parametrize('residual', [False, True])
def test_radix2_outer_on_onednn_equals_reference(monkeypatch, backend, size, residual):
    """float32 on oneDNN: the radix-2 maps take `fourier_unit_radix2_outer`, with a batch, odd widths and z + FU(z)
    (the SpectralTransform's sum inside the last product), and keep the reference path's maths."""
    calls = []
    orig = sx.fourier_unit_radix2_outer
    monkeypatch.setattr(sx, 'fourier_unit_radix2_outer', lambda *a, **k: calls.append(1) or orig(*a, **k))
    use_route(monkeypatch, 'radix2')
    torch.manual_seed(0)
    fu = randomize_bn(FourierUnit(3, 3))
    x = torch.randn(2, 3, *size).contiguous(memory_format=torch.channels_last)
    backend('onednn')
    with torch.inference_mode():
        ref = set_fast_path(fu, False)(x); set_fast_path(fu, True)
        if residual: ref, fast = ref + x, fu.plus_input(x)
        else: fast = fu(x)
    assert calls and (is_channels_last(fast) or size[1] % 2)   # odd sizes: a cropped view of the padded map
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@needs_onednn
def test_packed_weights_follow_in_place_changes_and_are_freed():
    x = torch.randn(1, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(3, 4, 1, 1)
    with torch.inference_mode(): y1 = sx.onednn_conv(x, w)
    with torch.no_grad(): w.mul_(2)
    with torch.inference_mode(): y2 = sx.onednn_conv(x, w)
    torch.testing.assert_close(y2, 2 * y1)
    keys = [k for k in sx._PACKED if k[0] == id(w)]
    assert keys
    del w
    assert not [k for k in keys if k in sx._PACKED]


def test_kernel_backend_setting_and_calibration(backend):
    times = sx.kernel_calibration(rounds=1)
    assert 'blas' in times and all(t > 0 for t in times.values())
    assert sx.kernel_backend() in times
    backend('blas'); assert sx.kernel_backend() == 'blas'
    with pytest.raises(ConfigError, match='kernel backend must be one of'): sx.set_kernel_backend('mkl')


def test_auto_backend_times_the_calibration_shapes_and_keeps_the_faster(monkeypatch):
    """'auto' times `CALIBRATION_SHAPES` (batch-1 products and one as large as a batch of eight) and keeps the
    library with the smaller total; the choice is cached per thread count."""
    seen = []
    def fake(rounds=5, shapes=None):
        seen.append(shapes); return {'blas': 1.0, 'onednn': 2.0} if len(seen) == 1 else {'blas': 2.0, 'onednn': 1.0}
    monkeypatch.setattr(sx, 'kernel_calibration', fake)
    monkeypatch.setattr(sx, 'onednn_available', lambda: True)
    sx._calibrated_backend.cache_clear()
    try:
        assert sx.kernel_backend() == 'blas' and sx.kernel_backend() == 'blas'   # cached: timed once
        assert seen == [sx.CALIBRATION_SHAPES] and max(s for _, _, s in sx.CALIBRATION_SHAPES) ** 2 >= 8 * 18 ** 2
        sx._calibrated_backend.cache_clear()
        assert sx.kernel_backend() == 'onednn' and len(seen) == 2
    finally: sx._calibrated_backend.cache_clear()


# ---------------------------------------------------------------- ReLUs fused into the last sum, LFU as products, z + FU(z)
@pytest.mark.parametrize('h,w', [(18, 18), (19, 19), (7, 10), (2, 2), (1, 5)])
def test_lfu_matrices_are_pool_hadamard_and_upsample(h, w):
    from deepfake_course.models.specxnet import lfu_matrices
    analysis, synthesis = lfu_matrices(h, w, torch.float64)
    x = torch.randn(3, 4, h, w, dtype=torch.float64)
    pooled = torch.nn.functional.adaptive_avg_pool2d(x, (2, 2)).flatten(-2)              # pixels (0,0),(0,1),(1,0),(1,1)
    torch.testing.assert_close(x.flatten(-2) @ analysis.T, pooled @ HADAMARD_2x2.double().T)
    s = torch.randn(3, 4, 4, dtype=torch.float64)                                           # a 2 x 2 spectrum per channel
    up = torch.nn.functional.interpolate((s @ HADAMARD_2x2.double().T).view(3, 4, 2, 2), size=(h, w), mode='nearest')
    torch.testing.assert_close((s @ synthesis.T).view(3, 4, h, w), up)


@pytest.mark.parametrize('h,w', [(18, 18), (9, 9), (8, 6), (3, 5)])
@pytest.mark.parametrize('channels_last', [True, False])
def test_add_local_fourier_equals_reference_float64(h, w, channels_last):
    "In place `hidden += upsample(LFU(z))`: three products on channels-last maps, the broadcast add otherwise."
    torch.manual_seed(0)
    st = randomize_bn(SpectralTransform(6, 8)).double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    z = torch.randn(2, 4, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
    hidden = torch.randn(2, 4, h, w, dtype=torch.float64).contiguous(memory_format=fmt)
    with torch.no_grad():
        want = hidden + torch.nn.functional.interpolate(set_fast_path(st, False).local_fourier(z), size=(h, w), mode='nearest')
        got = set_fast_path(st, True).add_local_fourier(hidden.clone(), z)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('size', [(18, 18), (36, 38), (9, 8), (19, 19), (162, 162)])
def test_fourier_unit_plus_input(size):
    "`z + FU(z)`: inside the last DFT product on the matrix routes (even sizes), one more add otherwise; same maths."
    torch.manual_seed(0)
    fu = randomize_bn(FourierUnit(3, 3)).double()
    x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = x + set_fast_path(fu, False)(x)
        got = set_fast_path(fu, True).plus_input(x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    xg = x.clone().requires_grad_()   # autograd through the fused sum
    fu.plus_input(xg).square().sum().backward()
    xr = x.clone().requires_grad_()
    (xr + set_fast_path(fu, False)(xr)).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize('name', ['blas', 'onednn'])
def test_accumulate_pointwise_fuses_the_relu(backend, name):
    from deepfake_course.models.specxnet import accumulate_pointwise
    if name == 'onednn' and not sx.onednn_available(): pytest.skip('no oneDNN')
    backend(name)
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=torch.channels_last)
    w = torch.randn(7, 6, 1, 1)
    for fmt in (torch.channels_last, torch.contiguous_format):
        out = torch.randn(2, 7, 5, 4).contiguous(memory_format=fmt)
        want = torch.relu(out + torch.nn.functional.conv2d(x, w))
        with torch.inference_mode(): got = accumulate_pointwise(out.clone(), x, w, True)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@needs_onednn
@pytest.mark.parametrize('groups,kernel', [(1, 1), (4, 3)])
def test_onednn_fused_sum_then_relu(groups, kernel):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    w = torch.randn(8, 8 // groups, kernel, kernel)
    out = torch.randn(1, 8, 9, 9).contiguous(memory_format=torch.channels_last)
    want = torch.relu(out + torch.nn.functional.conv2d(x, w, padding=kernel // 2, groups=groups))
    with torch.inference_mode(): got = sx.onednn_conv(x, w, padding=kernel // 2, groups=groups, relu=True, out=out.clone())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings('error::UserWarning')   # an op without autograd support in the graph warns
@pytest.mark.parametrize('make,x', [
    (lambda: DDFC(8, 8, 1), lambda: pair(4, 9)),
    (lambda: DDFC(8, 8, 3, padding=1, groups=4), lambda: pair(4, 8)),
    (lambda: DDFC(8, 12, 1, stride=2), lambda: pair(4, 7)),
    (lambda: DDFC(8, 8, 3, padding=1, groups=4), lambda: (torch.randn(2, 4, 6, 6), None)),
])
def test_ddfc_relu_equals_reference(backend, make, x):
    "DDFC(..., relu=True) on both kernel libraries equals ReLU after the reference path; under autograd too."
    torch.manual_seed(0)
    m = randomize_bn(make()); bns = tuple(randomize_bn(nn.BatchNorm2d(c), seed=1) for c in m.out_split)
    inp = tuple(None if t is None else t.contiguous(memory_format=torch.channels_last) for t in x())
    with torch.no_grad(): want = [torch.relu(bn(y)) for bn, y in zip(bns, set_fast_path(m, False)(inp))]
    set_fast_path(m, True)
    for name in ('blas', 'onednn') if sx.onednn_available() else ('blas',):
        backend(name)
        with torch.inference_mode(): got = m(inp, bns=bns, relu=True)
        for a, b in zip(got, want): torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    x_l = inp[0].clone().requires_grad_()   # autograd: out-of-place ReLUs, gradients reach the input
    m((x_l, inp[1]), bns=bns, relu=True)[0].sum().backward()
    assert x_l.grad is not None and torch.isfinite(x_l.grad).all()


@pytest.mark.parametrize('shape', [(2, 6, 5, 5), (1, 6, 4, 4)])
def test_dfa_fast_equals_reference_with_unequal_sizes(shape):
    "The fast DFA folds the mean's division into BN's scale when both maps have one size, and takes means otherwise."
    torch.manual_seed(0)
    dfa = randomize_bn(DualFourierAttention(6, 6))
    y_l, y_g = torch.randn(*shape), torch.randn(*shape[:2], shape[2] - 1, shape[3] + 1)
    for a, b in zip(*both_paths(dfa, y_l, y_g)): torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(*both_paths(dfa, y_l, y_l.flip(-1))): torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packed_weights_are_per_thread_count():
    "oneDNN packs a weight differently for 1 and 2 threads: each thread count gets its own packed copy, same result."
    x = torch.randn(1, 16, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(24, 16, 1, 1)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            with torch.inference_mode(): outs.append(sx.onednn_conv(x, w))
        assert len({k[1][-1] for k in sx._PACKED if k[0] == id(w)}) == 2
        for o in outs[1:]: torch.testing.assert_close(o, outs[0], rtol=1e-5, atol=1e-5)
    finally: torch.set_num_threads(before)


@pytest.mark.filterwarnings('error::UserWarning')   # an op without autograd support in the graph warns
@pytest.mark.parametrize('name', ['blas', 'onednn'])
def test_input_gradients_after_an_inference_mode_forward(backend, name):
    "Saliency after evaluation: folded weights and DFT matrices first built in inference mode still serve autograd."
    if name == 'onednn' and not sx.onednn_available(): pytest.skip('no oneDNN')
    backend(name)
    torch.manual_seed(0)
    m = randomize_bn(specxnet('embedded', width=0.125))
    x = torch.randn(1, 3, 48, 48)
    with torch.inference_mode(): m(x)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    g = xg.grad.clone(); xg.grad = None
    set_fast_path(m, False)(xg).sum().backward()
    torch.testing.assert_close(g, xg.grad, rtol=1e-4, atol=1e-4 * xg.grad.abs().max().item())
