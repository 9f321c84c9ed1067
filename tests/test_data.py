"Data pipeline: determinism, leakage, bad inputs, CLI (tiny preset builds in a temporary DFC_HOME)."
import json, subprocess, sys, warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from deepfake_course.core import DataError, ChecksumError, ConfigError, load_json
from deepfake_course.data.build import build_embedded, verify_build, PRESETS
from deepfake_course.data.datasets import DeepfakeDataset, write_png, write_deepfakebench_json, read_deepfakebench_json
from deepfake_course.data.manipulations import Blend, UpConv, Swap, perturb, FAMILIES
from deepfake_course.data.sources import lfw_faces, photos, photo_crops


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    return build_embedded('tiny', root=tmp_path_factory.mktemp('b1')/'tiny', verbose=False)


def test_build_is_deterministic(tiny, tmp_path):
    again = build_embedded('tiny', root=tmp_path/'tiny', verbose=False)
    assert load_json(tiny/'manifest.json')['files'] == load_json(again/'manifest.json')['files']


def test_reuse_and_verify(tiny, tmp_path):
    assert verify_build(tiny)['ok']
    assert build_embedded('tiny', root=tiny, verbose=False) == tiny   # verified, reused


def test_verify_detects_corruption(tiny, tmp_path):
    import shutil
    copy = tmp_path/'copy'; shutil.copytree(tiny, copy)
    frame = next((copy/'faces'/'frames').rglob('*.png'))
    frame.write_bytes(frame.read_bytes()[:-10])
    with pytest.raises(ChecksumError, match=frame.name): verify_build(copy)
    frame.unlink()
    with pytest.raises(DataError, match='missing'): verify_build(copy)


@pytest.mark.parametrize('domain', ['faces', 'photos'])
def test_no_leakage_across_splits(tiny, domain):
    man = load_json(tiny/'manifest.json')
    entries = read_deepfakebench_json(tiny/f'{domain}.json')
    group_of = {p['id']: p['group'] for p in man['provenance'][domain]}
    split_of_group = {}
    for e in entries:
        for rid in (e['source_id'], e['target_id']):        # every image a video is made from
            assert split_of_group.setdefault(group_of[rid], e['split']) == e['split'], (domain, e['video'])
        for k in ('sources', 'targets'):                     # and the frames it points to
            for f in e.get(k, []): assert f.split('/')[2].endswith(e[k and 'target_id' if k == 'targets' else 'source_id'])
    assert set(split_of_group.values()) == {'train', 'val', 'test'}
    if domain == 'photos':  # crops of one photo never cross splits
        crops = {}
        for p in man['provenance'][domain]: crops.setdefault(p['source_image'], set()).add(split_of_group[p['group']])
        assert all(len(s) == 1 for s in crops.values())


def test_dataset_on_build(tiny):
    ds = DeepfakeDataset(tiny/'faces.json', split='train')
    b = torch.utils.data.default_collate([ds[i] for i in range(0, len(ds), max(1, len(ds) // 16))])
    assert b['image'].shape[1:] == (3, 32, 32) and b['mask'].shape[1] == 1
    assert b['image'].min() >= -1 and b['image'].max() <= 1
    fams = {s['family'] for s in ds.samples}; assert fams == {'real', 'blend', 'upconv', 'swap'}
    ph = DeepfakeDataset(tiny/'photos.json', split='test', labels=['DFC-real', 'DFC-blend'], image_size=16)
    assert ph[0]['image'].shape == (3, 16, 16) and {s['family'] for s in ph.samples} == {'real', 'blend'}


def test_manipulations_same_seed_same_bytes():
    from PIL import Image
    faces = [np.asarray(Image.fromarray(f.image).resize((32, 32))) for f in lfw_faces(6)]
    for a, b in [(Blend(seed=3), Blend(seed=3))]:
        assert a(faces[0], faces[1], key='k').image.tobytes() == b(faces[0], faces[1], key='k').image.tobytes()
    u1, u2 = UpConv(seed=1, steps=20, width=4).fit(faces[:4]), UpConv(seed=1, steps=20, width=4).fit(faces[:4])
    assert u1(faces[0], key=0).image.tobytes() == u2(faces[0], key=0).image.tobytes()
    assert Swap(u1, seed=2)(faces[0], faces[1], key=1).image.tobytes() == Swap(u2, seed=2)(faces[0], faces[1], key=1).image.tobytes()
    assert perturb('noise', std=4)(faces[0], key='x').tobytes() == perturb('noise', std=4)(faces[0], key='x').tobytes()
    assert {'blend', 'upconv', 'swap'} <= set(FAMILIES.names())
    with pytest.raises(Exception, match='not divisible'): UpConv(steps=1).fit([f.image for f in lfw_faces(2)])


def test_bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    write_png(tmp_path/'f/a.png', rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    write_png(tmp_path/'f/b.png', rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    write_png(tmp_path/'f/gray.png', np.zeros((8, 8), np.uint8))
    write_png(tmp_path/'m/small.png', np.zeros((4, 4), np.uint8))
    (tmp_path/'f/trunc.png').write_bytes((tmp_path/'f/a.png').read_bytes()[:50])
    (tmp_path/'f/junk.png').write_bytes(b'not a png at all')
    def ds_for(frames, masks=None, **kw):
        e = dict(video='v', label_name='DFC-blend', split='train', comp=None, frames=frames)
        if masks: e['masks'] = masks
        return DeepfakeDataset(write_deepfakebench_json(tmp_path/'x.json', 'x', [e]), **kw)
    for bad in ('trunc.png', 'junk.png', 'gray.png'):
        ds = ds_for(['f/a.png', f'f/{bad}'])
        with pytest.raises(DataError, match=bad): ds[1]
        with warnings.catch_warnings(record=True):
            sk = ds_for(['f/a.png', f'f/{bad}'], on_error='skip')
            assert sk[1]['path'].endswith('a.png') and len(sk.skipped) == 1
    with pytest.raises(DataError, match='small.png'): ds_for(['f/a.png'], masks=['m/small.png'])[0]
    with pytest.raises(DataError, match='nowhere.png'): ds_for(['f/a.png', 'f/nowhere.png'])
    with warnings.catch_warnings(record=True):
        assert len(ds_for(['f/a.png', 'f/nowhere.png'], on_error='skip')) == 1
    with pytest.raises(ConfigError): ds_for(['f/a.png'], on_error='ignore')
    with pytest.raises(DataError, match='unknown label'):
        write_deepfakebench_json(tmp_path/'y.json', 'y', [dict(video='v', label_name='FF-fake', split='train', frames=['f/a.png'])])
    (tmp_path/'broken.json').write_text('{"x": ')
    with pytest.raises(DataError, match='broken.json'): DeepfakeDataset(tmp_path/'broken.json')


def test_cli_verify(tiny):
    exe = Path(sys.executable).parent/'dfc-build'      # the console script declared in settings.ini
    r = subprocess.run([str(exe), '--preset', 'tiny', '--root', str(tiny), '--verify'], capture_output=True, text=True)
    assert r.returncode == 0 and "'ok': True" in r.stdout, r.stderr


def test_parallel_builders_take_turns(tmp_path):
    "Two builders of the same preset (as parallel notebooks under nbdev_test) both get a verified build."
    from concurrent.futures import ThreadPoolExecutor
    from deepfake_course.data.build import build_embedded, verify_build
    root = tmp_path / 'shared'
    with ThreadPoolExecutor(2) as ex:
        folders = list(ex.map(lambda _: build_embedded('tiny', root=root, verbose=False), range(2)))
    assert folders == [root, root]
    assert verify_build(root)['ok']
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith('.')) == ['shared']
