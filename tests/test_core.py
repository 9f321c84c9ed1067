"Core helpers: image conversion properties and errors, atomic writes, presets, the registry."
import os
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from deepfake_course.core import (image_to_tensor, tensor_to_image, gray_to_rgb, ImageFormatError, ConfigError,
                                  DataError, get_scale, dfc_home, atomic_dir, save_json, load_json, sha256_file,
                                  seed_everything, Registry, get_device, progress_bar)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_uint8_round_trip_is_exact(img):
    x = image_to_tensor(img)
    assert x.shape == (3, img.shape[0], img.shape[1])
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    np.testing.assert_array_equal(tensor_to_image(x), img)


@pytest.mark.parametrize('bad, match', [
    (np.zeros((4, 4), np.uint8), 'grayscale image of shape \\(4, 4\\)'),
    (np.zeros((4, 4, 1), np.uint8), 'grayscale: convert with gray_to_rgb'),
    (np.zeros((4, 4, 4), np.uint8), 'RGBA'),
    (np.zeros((4, 4, 3), np.float32), 'dtype uint8'),
    (np.zeros((2, 4, 4, 3), np.uint8), 'expected H x W x C'),
])
def test_image_to_tensor_errors(bad, match):
    with pytest.raises(ImageFormatError, match=match):
        image_to_tensor(bad)


def test_tensor_to_image_clamps_and_rejects():
    img = tensor_to_image(torch.tensor([[[2.0]], [[-3.0]], [[0.0]]]))
    assert img.tolist() == [[[255, 0, 128]]]
    with pytest.raises(ImageFormatError, match='float tensor'):
        tensor_to_image(torch.zeros(3, 2, 2, dtype=torch.uint8))
    with pytest.raises(ImageFormatError, match='expected a torch tensor'):
        tensor_to_image(np.zeros((3, 2, 2)))
    assert gray_to_rgb(np.zeros((2, 3, 1), np.uint8)).shape == (2, 3, 3)
    with pytest.raises(ImageFormatError):
        gray_to_rgb(np.zeros((2, 3, 3), np.uint8))


def test_scale_from_environment(monkeypatch):
    monkeypatch.setenv('DFC_SCALE', 'paper')
    assert get_scale().name == 'paper'
    assert get_scale('embedded').name == 'embedded'   # an argument wins over the environment
    monkeypatch.setenv('DFC_SCALE', 'galactic')
    with pytest.raises(ConfigError, match="unknown scale 'galactic'"):
        get_scale()


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv('DFC_HOME', raising=False)
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert dfc_home() == tmp_path / 'deepfake_course'
    monkeypatch.setenv('DFC_HOME', str(tmp_path / 'elsewhere'))
    assert dfc_home() == tmp_path / 'elsewhere' and (tmp_path / 'elsewhere').is_dir()


def test_atomic_dir_replaces_only_on_success(tmp_path):
    dest = tmp_path / 'out'
    with atomic_dir(dest) as d:
        (d / 'v1').write_text('1')
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(dest, overwrite=True) as d:
            (d / 'v2').write_text('2')
            raise KeyboardInterrupt
    assert [p.name for p in dest.iterdir()] == ['v1']              # the old build survives a failed rebuild
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']   # and no temporary folder is left
    with atomic_dir(dest, overwrite=True) as d:
        (d / 'v2').write_text('2')
    assert [p.name for p in dest.iterdir()] == ['v2']


def test_json_helpers(tmp_path):
    save_json({'x': [1, 2]}, tmp_path / 'a' / 'b.json')
    assert load_json(tmp_path / 'a' / 'b.json') == {'x': [1, 2]}
    with pytest.raises(DataError, match='not found: .*missing.json'):
        load_json(tmp_path / 'missing.json')
    (tmp_path / 'f').write_bytes(b'')
    assert sha256_file(tmp_path / 'f') == 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'


def test_seed_everything_makes_torch_numpy_python_repeat():
    import random
    seed_everything(11); a = (random.random(), np.random.rand(), torch.randn(3))
    seed_everything(11); b = (random.random(), np.random.rand(), torch.randn(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_registry_rejects_duplicates():
    r = Registry('thing')
    @r.register('a')
    class A: pass
    with pytest.raises(ConfigError, match="thing 'a' is already registered"):
        @r.register('a')
        class B: pass
    assert r.names() == ['a'] and len(r) == 1


def test_device_env(monkeypatch):
    monkeypatch.setenv('DFC_DEVICE', 'cpu')
    assert get_device() == torch.device('cpu')


def test_registry_accepts_the_same_definition_again():
    "A notebook re-running the cell of a class its exported module already registered replaces the entry."
    r = Registry('thing')
    @r.register('a')
    class A: pass
    first = A
    @r.register('a')
    class A: pass   # noqa: F811 -- the same definition, run again
    assert r.get('a') is A and r.get('a') is not first and len(r) == 1


def test_progress_bar_counts_and_closes():
    assert [i * 2 for i in progress_bar(range(4), desc='t')] == [0, 2, 4, 6]
    bar = progress_bar(range(3), notebook=True, desc='nb')   # the Jupyter flavour, outside a kernel
    assert list(bar) == [0, 1, 2] and '3/3' in str(bar) and bar._handle is None
    assert list(progress_bar(range(2), disable=True)) == [0, 1]
