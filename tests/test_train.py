"The trainer (lesson 06): exact resume, NaN handling, checkpoints, configuration errors."
import json
import pytest
import torch

from deepfake_course.core import seed_everything, ConfigError, DataError, TrainingError
from deepfake_course.train import (create_detector, Trainer, TrainConfig, SyntheticDetectionDataset, save_detector,
                                   load_detector, evaluate, predict, TinyCNN, TinyCNNConfig, register_detector)


def _run(out, stop=None, resume=False, **cfg):
    seed_everything(5)
    det = create_detector('tiny_cnn', width=4, dropout=0.3)
    base = dict(epochs=2, batch_size=8, lr=5e-3, seed=5, grad_accum=2, scheduler='cosine', warmup_steps=1,
                progress=False)
    base.update(cfg)
    t = Trainer(det, SyntheticDetectionDataset(64, size=16, seed=1), SyntheticDetectionDataset(32, size=16, seed=2),
                TrainConfig(stop_after_steps=stop, **base), out_dir=out)
    history = t.fit(resume=resume)
    return t, history


@pytest.mark.parametrize('stop', [1, 4, 6])   # mid-epoch 1, end of epoch 1, mid-epoch 2
def test_interrupted_run_resumes_to_identical_weights(tmp_path, stop):
    a, ha = _run(tmp_path / 'a')
    b, _ = _run(tmp_path / 'b', stop=stop)
    assert b.stopped_early
    b, hb = _run(tmp_path / 'b', resume=True)
    for (k, va), vb in zip(a.detector.state_dict().items(), b.detector.state_dict().values()):
        assert torch.equal(va, vb), k
    # the validation history of the epochs completed after the interruption is identical too
    assert ha['val_auc'].tolist()[-1] == hb['val_auc'].tolist()[-1]


def test_resume_without_state_is_an_error(tmp_path):
    with pytest.raises(TrainingError, match='no saved state'):
        _run(tmp_path / 'nothing', resume=True)


def test_best_checkpoint_is_best_epoch(tmp_path):
    t, h = _run(tmp_path / 'r', epochs=3)
    meta = json.loads((t.best_dir / 'detector.json').read_text())
    assert meta['val_metrics']['auc'] == pytest.approx(h['val_auc'].max())
    assert meta['epoch'] == int(h['epoch'][h['val_auc'].idxmax()])
    det = load_detector(t.best_dir, device='cpu')
    m = evaluate(det, SyntheticDetectionDataset(32, size=16, seed=2))
    assert m['auc'] == pytest.approx(h['val_auc'].max())


@register_detector('_nan_at_step', TinyCNNConfig)
class _NaNLoss(TinyCNN):
    def loss(self, batch, out):
        l = super().loss(batch, out)
        self.n = getattr(self, 'n', 0) + 1
        if self.n == 4: l['loss'] = l['loss'] / 0 * 0
        return l


def test_nan_loss_names_the_step(tmp_path):
    t = Trainer(create_detector('_nan_at_step', width=4), SyntheticDetectionDataset(64, size=16), None,
                TrainConfig(epochs=1, batch_size=8, progress=False), out_dir=tmp_path)
    with pytest.raises(TrainingError, match=r'non-finite loss at epoch 1, batch 4 of 8 \(global step 3\)'):
        t.fit()


def test_checkpoint_errors(tmp_path):
    det = create_detector('tiny_cnn', width=4)
    save_detector(det, tmp_path / 'ok')
    (tmp_path / 'ok' / 'model.safetensors').unlink()
    with pytest.raises(DataError, match='weights file not found'):
        load_detector(tmp_path / 'ok')
    save_detector(create_detector('tiny_cnn', width=8), tmp_path / 'w8')
    meta = json.loads((tmp_path / 'w8' / 'detector.json').read_text())
    meta['config']['width'] = 4
    (tmp_path / 'w8' / 'detector.json').write_text(json.dumps(meta))
    with pytest.raises(DataError, match='does not match detector'):
        load_detector(tmp_path / 'w8')


def test_config_errors():
    with pytest.raises(ConfigError, match='unknown scheduler'):
        TrainConfig(scheduler='exponential')
    with pytest.raises(ConfigError, match='fewer than one batch'):
        Trainer(create_detector('tiny_cnn'), SyntheticDetectionDataset(8, size=16), config=TrainConfig(batch_size=16))
    with pytest.raises(ConfigError, match='needs a TinyCNNConfig'):
        TinyCNN(TrainConfig())


def test_predict_columns():
    p = predict(create_detector('tiny_cnn', width=4), SyntheticDetectionDataset(16, size=16), batch_size=5)
    assert list(p.columns) == ['prob', 'label', 'video', 'family', 'path']
    assert len(p) == 16 and p['prob'].between(0, 1).all()


def test_cli_trains_on_a_built_json(tmp_path):
    "`python -m deepfake_course.train` (what `accelerate launch -m` runs) trains and saves a loadable best detector."
    import subprocess, sys
    from deepfake_course.data.build import build_embedded
    data = build_embedded('tiny', root=tmp_path / 'data', verbose=False)
    out = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-m', 'deepfake_course.train', '--detector', 'tiny_cnn',
                        '--train_json', str(data / 'faces.json'), '--labels', 'DFC-real,DFC-upconv',
                        '--out', str(out), '--epochs', '1', '--batch_size', '8', '--config', '{"width": 4}',
                        '--no-progress'], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'test (best checkpoint)' in r.stdout
    det = load_detector(out / 'best')
    assert det.config.width == 4
    bad = subprocess.run([sys.executable, '-m', 'deepfake_course.train', '--detector', 'nope',
                          '--train_json', str(data / 'faces.json')], capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0 and "unknown detector 'nope'" in bad.stderr


def test_create_detector_imports_model_modules_in_a_fresh_process():
    "A detector defined by a later lesson is found without calling list_detectors() first."
    import subprocess, sys
    code = "from deepfake_course.train import create_detector; print(type(create_detector('xception')).__name__)"
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'Xception' in r.stdout
