"Properties of the metrics (lesson 04) on many random cases, and the errors on bad input."
import numpy as np
import pytest
from hypothesis import given, settings, assume, strategies as st
from sklearn.metrics import roc_auc_score, average_precision_score

from deepfake_course.core import MetricError
from deepfake_course.metrics import (frame_auc, equal_error_rate, average_precision, accuracy, video_auc,
                                     detection_metrics, video_scores)

labels_scores = st.integers(2, 60).flatmap(lambda n: st.tuples(
    st.lists(st.integers(0, 1), min_size=n, max_size=n),
    st.lists(st.floats(0, 1, allow_nan=False), min_size=n, max_size=n)))


@settings(max_examples=200, deadline=None)
@given(labels_scores)
def test_auc_and_ap_match_sklearn(case):
    y, s = map(np.asarray, case)
    assume(0 < y.sum() < len(y))
    assert frame_auc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert average_precision(y, s) == pytest.approx(average_precision_score(y, s))


@settings(max_examples=200, deadline=None)
@given(labels_scores, st.sampled_from(['logit', 'cube', 'affine', 'exp']))
def test_auc_invariant_under_monotone_transform(case, kind):
    y, s = map(np.asarray, case)
    assume(0 < y.sum() < len(y))
    s = np.clip(s, 1e-6, 1 - 1e-6)
    t = {'logit': np.log(s / (1 - s)), 'cube': s ** 3, 'affine': 3 * s - 7, 'exp': np.exp(s)}[kind]
    assume(len(np.unique(t)) == len(np.unique(s)))  # the transform must not merge distinct scores in float64
    assert frame_auc(y, t) == pytest.approx(frame_auc(y, s))
    assert equal_error_rate(y, t) == pytest.approx(equal_error_rate(y, s))


@settings(max_examples=200, deadline=None)
@given(labels_scores)
def test_eer_in_unit_interval_and_flip(case):
    y, s = map(np.asarray, case)
    assume(0 < y.sum() < len(y))
    assert 0 <= equal_error_rate(y, s) <= 1
    assert frame_auc(y, -s) == pytest.approx(1 - frame_auc(y, s))  # reversing the ranking mirrors the AUC


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 8), st.integers(1, 6), st.integers(0, 10_000))
def test_video_auc_of_constant_videos_equals_frame_auc_of_one_frame_each(n_videos_per_class, frames, seed):
    rng = np.random.default_rng(seed)
    probs = rng.random(2 * n_videos_per_class)
    y = np.repeat([0, 1], n_videos_per_class)
    vids = np.repeat(np.arange(len(probs)), frames)
    assert video_auc(np.repeat(y, frames), np.repeat(probs, frames), vids) == pytest.approx(frame_auc(y, probs))


def test_perfect_and_inverted_detectors():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    m = detection_metrics(y, p, videos=['a', 'a', 'b', 'c', 'c', 'd'])
    assert (m['auc'], m['eer'], m['ap'], m['acc'], m['video_auc']) == (1.0, 0.0, 1.0, 1.0, 1.0)
    assert m['n_videos'] == 4 and m['n_frames'] == 6 and m['n_fake'] == 3
    assert frame_auc(y, 1 - p) == 0.0
    assert equal_error_rate(y, 1 - p) == 1.0


def test_accuracy_threshold_is_strict():
    # DeepfakeBench decides fake when prob > 0.5, so exactly 0.5 counts as real
    assert accuracy([0, 1], [0.5, 0.5]) == 0.5
    assert accuracy([0, 1], [0.5, 0.51]) == 1.0


@pytest.mark.parametrize('fn', [frame_auc, equal_error_rate, average_precision])
def test_one_class_is_an_error(fn):
    with pytest.raises(MetricError, match='need both classes'):
        fn([0, 0, 0], [0.1, 0.2, 0.3])


@pytest.mark.parametrize('fn', [frame_auc, equal_error_rate, average_precision, accuracy])
def test_nan_and_length_mismatch_are_errors(fn):
    with pytest.raises(MetricError, match='NaN or infinite'):
        fn([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(MetricError, match='3 labels but 2'):
        fn([0, 1, 1], [0.1, 0.3])
    with pytest.raises(MetricError, match='1-D'):
        fn([[0, 1]], [[0.1, 0.3]])


def test_video_errors():
    with pytest.raises(MetricError, match='need a video id'):
        video_scores([0, 1], [0.1, 0.2], None)
    with pytest.raises(MetricError, match="video 'x' has frames labelled both"):
        video_auc([0, 1, 0], [0.1, 0.2, 0.3], ['x', 'x', 'y'])
    with pytest.raises(MetricError, match='all 2 videos are labelled 0'):
        video_auc([0, 0, 0], [0.1, 0.2, 0.3], ['x', 'x', 'y'])
    with pytest.raises(MetricError, match='videos of shape'):
        video_auc([0, 1], [0.1, 0.2], ['x'])
