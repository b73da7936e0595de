"""The shipped digits classifier: held-out accuracy, features for the Frechet distance, the trainer."""

import numpy as np
import pytest

from fraqat_jax.eval import classifier, train_classifier
from fraqat_jax.eval.fid import frechet_distance_from_features


@pytest.fixture(scope="module")
def shipped():
    return classifier.DigitsClassifier.load()


def test_shipped_classifier_reads_held_out_digits(shipped):
    _, _, xte, yte = train_classifier.split()
    acc = shipped.accuracy(xte, yte)
    assert acc >= 0.95
    assert acc == pytest.approx(shipped.test_accuracy, abs=1e-6)  # the stored figure is the real one


def test_features_separate_real_digits_from_degraded_ones(shipped):
    xtr, _, xte, _ = train_classifier.split()
    rng = np.random.default_rng(0)
    f_tr, f_te = shipped.features(xtr), shipped.features(xte)
    assert f_tr.shape == (len(xtr), classifier.FEATURE_DIM)
    fd_real = frechet_distance_from_features(f_tr, f_te)
    fds = [
        frechet_distance_from_features(f_tr, shipped.features(np.clip(xte + s * rng.normal(size=xte.shape), -1, 1)))
        for s in (0.3, 0.8)
    ]
    assert fd_real < fds[0] < fds[1]


def test_trainer_learns_quickly_and_saves(tmp_path):
    model, acc = train_classifier.train(steps=150)
    assert acc > 0.8
    model.save(tmp_path / "c.npz")
    again = classifier.DigitsClassifier.load(str(tmp_path / "c.npz"))
    _, _, xte, yte = train_classifier.split()
    assert again.accuracy(xte, yte) == pytest.approx(acc)


def test_wrong_image_shape_raises(shipped):
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        shipped.features(np.zeros((2, 3, 8, 8), np.float32))
