"Real-data preprocessing (lesson 14): videos -> face crops -> DeepfakeBench JSON -> DeepfakeDataset, the CLI scripts, bad inputs."
import hashlib, json, subprocess, sys
from pathlib import Path

import av
import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from deepfake_course.core import DataError, ConfigError, load_json
from deepfake_course.data.datasets import DeepfakeDataset
from deepfake_course.data import preprocess as pp

REPO = Path(__file__).resolve().parents[1]
N_VIDEO = 40      # frames in the test videos
SIZE = 192        # their side in pixels


def _moving_photo_frames(photo, n=N_VIDEO, size=SIZE, center=(0.44, 0.25)):
    "A camera translating and zooming over `photo`, written independently of the library's helper."
    H, W = photo.shape[:2]
    out = []
    for t in range(n):
        zoom = 1 + 0.3 * t / (n - 1)
        side = 0.75 * min(H, W) / zoom
        cx, cy = center[0] * W + 0.05 * W * np.sin(t / 6), center[1] * H + 0.02 * H * np.cos(t / 6)
        k = size / side
        M = np.float32([[k, 0, size / 2 - k * cx], [0, k, size / 2 - k * cy]])
        out.append(cv2.warpAffine(photo, M, (size, size), borderMode=cv2.BORDER_REFLECT))
    return out


def _write_mp4(path, frames, fps=25):
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), 'w') as c:
        s = c.add_stream('libx264', rate=fps)
        s.width, s.height, s.pix_fmt = frames[0].shape[1], frames[0].shape[0], 'yuv420p'
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(f, format='rgb24')): c.mux(p)
        for p in s.encode(): c.mux(p)
    return path


@pytest.fixture(scope='module')
def astronaut_video(tmp_path_factory):
    return _write_mp4(tmp_path_factory.mktemp('video')/'astronaut.mp4', _moving_photo_frames(skdata.astronaut()))


@pytest.fixture(scope='module')
def ffpp_root(tmp_path_factory):
    return pp.toy_ffpp_tree(tmp_path_factory.mktemp('ffpp')/'FaceForensics++', num_frames=16, size=160)


def _sha(p): return hashlib.sha256(Path(p).read_bytes()).hexdigest()


def _run_script(script, *args):
    "Run a data script in a fresh interpreter, as a user would."
    r = subprocess.run([sys.executable, str(REPO/'data_scripts'/script), *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _run_script_here(script, *args, monkeypatch, capsys):
    "Run a data script as __main__ in this process (same argument parsing, no second torch import)."
    import runpy
    monkeypatch.setattr(sys, 'argv', [script, *map(str, args)])
    runpy.run_path(str(REPO/'data_scripts'/script), run_name='__main__')
    return capsys.readouterr().out


def test_haar_finds_the_offline_portraits():
    from PIL import Image
    import matplotlib.cbook as cbook
    hopper = np.asarray(Image.open(cbook.get_sample_data('grace_hopper.jpg')).convert('RGB'))
    det = pp.get_face_detector('haar')
    for img in (skdata.astronaut(), hopper):
        faces = det(img)
        assert len(faces) >= 1 and faces.landmarks is None
        x1, y1, x2, y2 = faces.boxes[faces.largest()]
        assert x2 - x1 > 50 and y2 - y1 > 50


def test_video_reading(astronaut_video):
    assert pp.video_frame_count(astronaut_video) == N_VIDEO == pp.video_frame_count(astronaut_video, exact=True)
    frames = pp.read_video_frames(astronaut_video, [0, 39])
    assert frames[0].shape == (SIZE, SIZE, 3) and frames[0].dtype == np.uint8


def test_video_errors_name_the_file(tmp_path, astronaut_video):
    with pytest.raises(DataError, match='video not found: .*missing.mp4'): pp.video_frame_count(tmp_path/'missing.mp4')
    bad = tmp_path/'garbage.mp4'; bad.write_bytes(b'\x00not a video' * 100)
    with pytest.raises(DataError, match='garbage.mp4'): pp.preprocess_video(bad, tmp_path/'out_bad', num_frames=4)
    with pytest.raises(DataError, match=r'astronaut.mp4: the video has 40 frames, fewer than the 64 asked'):
        pp.preprocess_video(astronaut_video, tmp_path/'out_short', num_frames=64)
    assert not (tmp_path/'out_bad').exists() and not (tmp_path/'out_short').exists()
    meta = pp.preprocess_video(astronaut_video, tmp_path/'out_all', num_frames=64, size=64, allow_fewer=True)
    assert meta['indices'] == list(range(N_VIDEO))


def test_sample_frame_indices_properties():
    for total in (1, 2, 31, 32, 33, 300, 1001):
        for n in (1, 2, 8, 32):
            if n > total: continue
            idx = pp.sample_frame_indices(total, n)
            assert len(idx) == n and idx[0] == 0 and idx == sorted(idx) and idx[-1] == (total - 1 if n > 1 else 0)
            assert len(set(idx)) == n


def test_preprocess_video_is_deterministic_atomic_and_resumable(tmp_path, astronaut_video, monkeypatch):
    a = pp.preprocess_video(astronaut_video, tmp_path/'a', num_frames=6, size=96)
    b = pp.preprocess_video(astronaut_video, tmp_path/'b', num_frames=6, size=96)
    assert a['no_face'] == [] and len(a['indices']) == 6
    names = sorted(p.name for p in (tmp_path/'a').glob('*.png'))
    assert names == [f'{i:03d}.png' for i in pp.sample_frame_indices(N_VIDEO, 6)]
    assert [_sha(tmp_path/'a'/n) for n in names] == [_sha(tmp_path/'b'/n) for n in names]
    crop = cv2.imread(str(tmp_path/'a'/names[0]))
    assert crop.shape == (96, 96, 3)
    # interrupted while writing: nothing is left, not even the temporary folder
    real_imwrite, calls = cv2.imwrite, []
    def flaky(path, img):
        calls.append(path)
        if len(calls) == 3: raise KeyboardInterrupt('simulated crash')
        return real_imwrite(path, img)
    monkeypatch.setattr(pp.cv2, 'imwrite', flaky)
    with pytest.raises(KeyboardInterrupt): pp.preprocess_video(astronaut_video, tmp_path/'c', num_frames=6, size=96)
    monkeypatch.setattr(pp.cv2, 'imwrite', real_imwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a', 'b']
    # resuming reuses a finished folder; other settings are refused
    assert pp.preprocess_video(astronaut_video, tmp_path/'a', num_frames=6, size=96)['reused'] is True
    with pytest.raises(ConfigError, match='overwrite=True'): pp.preprocess_video(astronaut_video, tmp_path/'a', num_frames=6, size=64)


def test_no_face_frames_are_counted_never_dropped_silently(tmp_path):
    frames = _moving_photo_frames(skdata.astronaut(), n=20)
    sampled = pp.sample_frame_indices(20, 5)
    blank = sampled[2]
    frames[blank] = np.full_like(frames[blank], 128)
    video = _write_mp4(tmp_path/'blank.mp4', frames)
    prev = pp.preprocess_video(video, tmp_path/'prev', num_frames=5, size=64)
    assert prev['no_face'] == [blank] and prev['indices'] == sampled
    assert prev['squares'][str(blank)] == prev['squares'][str(sampled[1])]        # the previous frame's box
    skip = pp.preprocess_video(video, tmp_path/'skip', num_frames=5, size=64, no_face='skip')
    assert skip['no_face'] == [blank] and blank not in skip['indices'] and len(skip['indices']) == 4
    with pytest.raises(DataError, match=rf'blank.mp4: no face found in frames \[{blank}\]'):
        pp.preprocess_video(video, tmp_path/'err', num_frames=5, size=64, no_face='error')
    gray = _write_mp4(tmp_path/'noface.mp4', [np.full((64, 64, 3), 90, np.uint8)] * 8)
    with pytest.raises(DataError, match='noface.mp4: no face found in any'):
        pp.preprocess_video(gray, tmp_path/'none', num_frames=4, size=64)


def test_celebdf_script_on_the_astronaut_video(tmp_path, astronaut_video):
    "The whole script: a Celeb-DF-layout tree with the test video, the CLI, the JSON, DeepfakeDataset."
    root = tmp_path/'Celeb-DF-v2'
    (root/'Celeb-real').mkdir(parents=True)
    (root/'Celeb-real'/'id0_0000.mp4').write_bytes(astronaut_video.read_bytes())
    fake = [np.ascontiguousarray(f[:, ::-1]) for f in _moving_photo_frames(skdata.astronaut())]   # a stand-in "fake"
    _write_mp4(root/'Celeb-synthesis'/'id0_id1_0000.mp4', fake)
    _write_mp4(root/'YouTube-real'/'00000.mp4', _moving_photo_frames(skdata.astronaut())[::-1])
    (root/'List_of_testing_videos.txt').write_text('1 YouTube-real/00000.mp4\n0 Celeb-synthesis/id0_id1_0000.mp4\n')
    out = tmp_path/'prepared'
    stdout = _run_script('prepare_celebdf.py', root, out, '--num_frames', 4, '--size', 64)
    summary = json.loads(stdout[stdout.index('{'):])
    assert summary['videos'] == 3 and summary['skipped'] == 0 and summary['frames_written'] == 12
    js = load_json(out/'Celeb-DF-v2.json')['Celeb-DF-v2']
    assert set(js) == {'CelebDFv2_real', 'CelebDFv2_fake'}
    assert set(js['CelebDFv2_real']['train']) == {'id0_0000'} and set(js['CelebDFv2_real']['test']) == {'00000'}
    assert set(js['CelebDFv2_fake']['test']) == {'id0_id1_0000'}
    test = DeepfakeDataset(out/'Celeb-DF-v2.json', split='test')
    batch = torch.utils.data.default_collate([test[i] for i in range(len(test))])
    assert batch['image'].shape == (8, 3, 64, 64) and sorted(batch['label'].tolist()) == [0] * 4 + [1] * 4
    assert batch['image'].min() >= -1 and batch['image'].max() <= 1
    report = load_json(out/'Celeb-DF-v2.report.json')
    assert report['frames_per_second'] > 0


def test_celebdf_bad_videos_raise_or_are_counted(tmp_path, astronaut_video):
    root = tmp_path/'cd'
    (root/'Celeb-real').mkdir(parents=True)
    (root/'Celeb-real'/'id0_0000.mp4').write_bytes(astronaut_video.read_bytes())
    (root/'Celeb-synthesis').mkdir()
    (root/'Celeb-synthesis'/'id0_id1_0000.mp4').write_bytes(b'corrupt' * 50)
    _write_mp4(root/'Celeb-synthesis'/'id0_id2_0000.mp4', _moving_photo_frames(skdata.astronaut(), n=3))
    (root/'List_of_testing_videos.txt').write_text('0 Celeb-synthesis/id0_id1_0000.mp4\n1 YouTube-real/00009.mp4\n')
    with pytest.raises(DataError, match='id0_id1_0000.mp4'):
        pp.prepare_celebdf(root, tmp_path/'o1', num_frames=4, size=64, progress=False)
    r = pp.prepare_celebdf(root, tmp_path/'o2', num_frames=4, size=64, on_error='skip', progress=False)
    errors = {Path(s['video']).name: s['error'] for s in r['skipped']}
    assert set(errors) == {'id0_id1_0000.mp4', 'id0_id2_0000.mp4', '00009.mp4'}
    assert 'fewer than the 4 asked' in errors['id0_id2_0000.mp4'] and 'video not found' in errors['00009.mp4']
    assert r['videos'] == 1
    with pytest.raises(DataError, match='expected'):
        (root/'List_of_testing_videos.txt').write_text('real Celeb-real/id0_0000.mp4\n')
        pp.read_celebdf_test_list(root/'List_of_testing_videos.txt')


def test_ffpp_script_pairs_sources_and_targets(tmp_path, ffpp_root, monkeypatch, capsys):
    out = tmp_path/'ffpp'
    stdout = _run_script_here('prepare_ffpp.py', ffpp_root, out, '--methods', 'Deepfakes', '--num_frames', 5, '--size', 64,
                              monkeypatch=monkeypatch, capsys=capsys)
    assert json.loads(stdout[stdout.index('{'):])['videos'] == 3
    js = load_json(out/'FaceForensics++.json')['FaceForensics++']
    assert set(js) == {'FF-real', 'FF-DF'} and set(js['FF-real']['train']['c23']) == {'000', '001'}
    fake = js['FF-DF']['train']['c23']['000_001']
    sampled = pp.sample_frame_indices(16, 5)
    assert [Path(f).name for f in fake['frames']] == [f'{i:03d}.png' for i in sampled]
    # default convention target_source: 000 is the target, 001 the source; matched by frame index
    assert (fake['target_video'], fake['source_video']) == ('000', '001')
    assert fake['targets'] == [f'original_sequences/youtube/c23/frames/000/{i:03d}.png' for i in sampled]
    assert fake['sources'] == [f'original_sequences/youtube/c23/frames/001/{i:03d}.png' for i in sampled]
    assert len(fake['masks']) == 5 and all((out/m).is_file() for m in fake['masks'])
    assert len(js['FF-real']['train']['c23']['000']['frames']) == 5
    ds = DeepfakeDataset(out/'FaceForensics++.json', split='train')
    labels = ds.labels()
    s = ds[int(np.flatnonzero(labels == 1)[0])]
    assert s['source'].shape == s['target'].shape == s['image'].shape == (3, 64, 64) and s['mask'].shape == (1, 64, 64)
    assert 0 < s['mask'].mean() < 1                                    # the pasted ellipse, cropped like the frame
    real = ds[int(np.flatnonzero(labels == 0)[0])]
    assert torch.equal(real['source'], real['image'])                  # reals are their own source and target
    # DiffusionFake's convention swaps the roles; the prepared frames are reused
    r = pp.prepare_ffpp(ffpp_root, out, methods=['Deepfakes'], num_frames=5, size=64, pair_convention='source_target', progress=False)
    assert r['reused'] == 3 and r['frames_written'] == 0 and r['pair_frames_not_exact'] == 0
    fake2 = load_json(out/'FaceForensics++.json')['FaceForensics++']['FF-DF']['train']['c23']['000_001']
    assert (fake2['source_video'], fake2['target_video']) == ('000', '001') and fake2['sources'] == fake['targets']


def test_ffpp_missing_original_and_splits(tmp_path, ffpp_root):
    root = tmp_path/'ff'
    import shutil
    shutil.copytree(ffpp_root, root)
    (root/'original_sequences'/'youtube'/'c23'/'videos'/'001.mp4').unlink()
    with pytest.raises(DataError, match=r"000_001.mp4: its original\(s\) .*001.mp4.* are missing"):
        pp.prepare_ffpp(root, tmp_path/'o1', methods=['Deepfakes'], num_frames=4, size=64, progress=False)
    r = pp.prepare_ffpp(root, tmp_path/'o2', methods=['Deepfakes'], num_frames=4, size=64, on_error='skip', progress=False)
    assert r['videos'] == 1 and len(r['skipped']) == 1 and '000_001.mp4' in r['skipped'][0]['video']
    (root/'splits'/'val.json').write_text('[["000"]]')
    with pytest.raises(DataError, match='val.json'): pp.read_ffpp_splits(root/'splits')
    with pytest.raises(ConfigError, match='unknown FF\\+\\+ methods'): pp.prepare_ffpp(root, tmp_path/'o3', methods=['DeepFaceLab'])
    with pytest.raises(ConfigError, match='pair_convention'): pp.prepare_ffpp(ffpp_root, tmp_path/'o4', pair_convention='ab')


def test_optional_detectors_fail_clearly():
    for name, pkg in (('mtcnn', 'facenet_pytorch'), ('dlib', 'dlib')):
        try: __import__(pkg)
        except ImportError:
            with pytest.raises(ConfigError, match='pip install'): pp.get_face_detector(name)
    with pytest.raises(ConfigError, match="unknown face detector 'yolo'"): pp.get_face_detector('yolo')
