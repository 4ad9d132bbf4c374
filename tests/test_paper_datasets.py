"""Tests of the MultiMNIST / expanded-MNIST / affNIST-style generators and the affNIST .mat loader."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from capsnet_hf.data.paper_datasets import (
    AffNISTStyle,
    ExpandedMNIST,
    MultiMNIST,
    load_affnist_mat,
    place_digits,
)


def random_digits(count: int = 60, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Blob "digits": random uint8 strokes inside the central 20x20 box, with balanced labels 0..9."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    images[:, 4:24, 4:24] = torch.randint(0, 256, (count, 20, 20), generator=generator, dtype=torch.uint8)
    images[:, 4:24, 4:24] *= torch.rand(count, 20, 20, generator=generator) < 0.3
    return images, torch.arange(count) % 10


def square_digits(count: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Solid 20x20 squares centred in 28x28 (the paper's "a digit is bounded in a 20x20 box")."""
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    images[:, 4:24, 4:24] = 200
    return images, torch.arange(count) % 10


def box(mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(top, bottom, left, right) (exclusive ends) of the True pixels of masks [B, H, W]."""
    rows, cols = mask.any(2), mask.any(1)
    rows_index = torch.arange(mask.shape[1])
    cols_index = torch.arange(mask.shape[2])
    return (
        torch.where(rows, rows_index, 10**6).amin(1),
        torch.where(rows, rows_index, -1).amax(1) + 1,
        torch.where(cols, cols_index, 10**6).amin(1),
        torch.where(cols, cols_index, -1).amax(1) + 1,
    )


class TestMultiMNIST:
    def test_shapes_ranges_and_two_hot_labels(self):
        images, labels = random_digits()
        data = MultiMNIST(images, labels, pairs_per_digit=7, seed=3)
        assert len(data) == 60 * 7
        batch = data.batch(range(len(data)))
        assert batch["pixel_values"].shape == (420, 1, 36, 36)
        assert batch["pixel_values"].dtype == torch.float32
        assert batch["labels"].shape == (420, 10)
        assert batch["reconstruction_targets"].shape == (420, 2, 1, 36, 36)
        assert 0.0 <= batch["pixel_values"].min() and batch["pixel_values"].max() <= 1.0
        assert torch.equal(batch["labels"].sum(1), torch.full((420,), 2.0))
        digit_labels = batch["digit_labels"]
        assert (digit_labels[:, 0] < digit_labels[:, 1]).all(), "the two classes must differ and be increasing"
        assert torch.equal(batch["labels"].nonzero()[:, 1].reshape(-1, 2), digit_labels)

    def test_single_item_matches_batch(self):
        data = MultiMNIST(*random_digits(), pairs_per_digit=3, seed=1)
        batch = data.batch([5, 17, 5])
        item = data[17]
        assert set(item) == set(batch)
        for key in batch:
            assert torch.equal(item[key], batch[key][1])
            assert torch.equal(batch[key][0], batch[key][2])
        assert torch.equal(data[-1]["pixel_values"], data[len(data) - 1]["pixel_values"])
        with pytest.raises(IndexError):
            data.batch([len(data)])

    def test_deterministic_per_seed_and_index(self):
        images, labels = random_digits()
        first = MultiMNIST(images, labels, pairs_per_digit=5, seed=11).batch(torch.arange(300))
        again = MultiMNIST(images, labels, pairs_per_digit=5, seed=11)
        # Same examples whatever the batch composition and order.
        reversed_batch = again.batch(torch.arange(299, -1, -1))
        for key in first:
            assert torch.equal(first[key], reversed_batch[key].flip(0))
        other = MultiMNIST(images, labels, pairs_per_digit=5, seed=12).batch(torch.arange(300))
        assert not torch.equal(first["pixel_values"], other["pixel_values"])

    def test_partner_is_other_class_from_the_split_and_base_is_index_div_pairs(self):
        images, labels = random_digits(count=50)
        data = MultiMNIST(images, labels, pairs_per_digit=400, seed=0)
        base, partner = data.pair_indices(torch.arange(len(data)))
        assert torch.equal(base, torch.arange(len(data)) // 400)
        assert (labels[base] != labels[partner]).all()
        # Partners are spread uniformly over the 45 digits of other classes: each drawn about 400 * 50 / 45 times.
        counts = torch.bincount(partner[labels[base] == 0], minlength=50)
        assert (counts[labels == 0] == 0).all()
        assert counts[labels != 0].min() > 0

    def test_targets_are_the_shifted_sources_and_input_is_their_clipped_sum(self):
        images, labels = random_digits()
        data = MultiMNIST(images, labels, pairs_per_digit=4, seed=5, overlay="sum")
        indices = torch.arange(len(data))
        batch = data.batch(indices)
        base, partner = data.pair_indices(indices)
        targets = batch["reconstruction_targets"][:, :, 0]
        low_first = labels[base] < labels[partner]
        low_source = torch.where(low_first[:, None, None], images[base], images[partner]).float() / 255
        # A shift of at most 4 on a 36x36 canvas never cuts a 28x28 digit: the ink is all there.
        assert torch.allclose(targets[:, 0].sum((1, 2)), low_source.sum((1, 2)), atol=1e-3)
        expected = (targets[:, 0] + targets[:, 1]).clamp(max=1.0)
        assert torch.allclose(batch["pixel_values"][:, 0], expected)
        maximum = MultiMNIST(images, labels, pairs_per_digit=4, seed=5).batch(indices)
        assert torch.allclose(maximum["pixel_values"][:, 0], torch.maximum(targets[:, 0], targets[:, 1]))

    def test_shift_range_and_overlap_statistics(self):
        """Solid 20x20 squares: every shift lies in [-4, 4], all 9 values occur, and the mean area overlap of the
        two boxes matches its exact value for independent uniform shifts: (1 - E|d|/20)^2 with
        E|d| = 240/81 for d the difference of two uniform integers in [-4, 4], i.e. 0.7257 (the paper rounds the
        overlap of the two digits' 20x20 boxes to "80%")."""
        images, labels = square_digits(count=400)
        data = MultiMNIST(images, labels, pairs_per_digit=25, seed=2)
        targets = data.batch(torch.arange(len(data)))["reconstruction_targets"][:, :, 0] > 0
        first, second = box(targets[:, 0]), box(targets[:, 1])
        for top, bottom, left, right in (first, second):
            assert torch.equal(bottom - top, torch.full_like(top, 20))
            assert torch.equal(right - left, torch.full_like(left, 20))
            assert set((top - 4).tolist()) == set(range(9)) and set((left - 4).tolist()) == set(range(9))
        height = (torch.minimum(first[1], second[1]) - torch.maximum(first[0], second[0])).clamp(min=0)
        width = (torch.minimum(first[3], second[3]) - torch.maximum(first[2], second[2])).clamp(min=0)
        overlap = (height * width).float() / 400
        assert overlap.mean().item() == pytest.approx((1 - 240 / 81 / 20) ** 2, abs=0.01)

    def test_bad_input(self):
        images, labels = random_digits()
        with pytest.raises(ValueError, match="uint8"):
            MultiMNIST(images.float(), labels)
        with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
            MultiMNIST(images[:, :20], labels)
        with pytest.raises(ValueError, match="labels"):
            MultiMNIST(images, labels[:-1])
        with pytest.raises(ValueError, match="two classes"):
            MultiMNIST(images, torch.zeros(60, dtype=torch.int64))
        with pytest.raises(ValueError, match="overlay"):
            MultiMNIST(images, labels, overlay="mean")


class TestExpandedMNIST:
    def test_placement_within_six_pixels(self):
        images, labels = square_digits(count=30)
        data = ExpandedMNIST(images, labels, variants_per_digit=20, seed=4)
        batch = data.batch(range(len(data)))
        assert batch["pixel_values"].shape == (600, 1, 40, 40)
        assert torch.equal(batch["labels"], labels.repeat(20))
        top, bottom, left, right = box(batch["pixel_values"][:, 0] > 0)
        assert torch.equal(bottom - top, torch.full_like(top, 20)) and torch.equal(
            right - left, torch.full_like(top, 20)
        )
        # Square at rows 4..24 of the digit; the digit's top-left corner lies in [0, 12].
        assert set((top - 4).tolist()) == set(range(13)) and set((left - 4).tolist()) == set(range(13))

    def test_deterministic_and_seed_dependent(self):
        images, labels = random_digits()
        a = ExpandedMNIST(images, labels, seed=1).batch(range(60))["pixel_values"]
        b = ExpandedMNIST(images, labels, seed=1).batch(range(60))["pixel_values"]
        c = ExpandedMNIST(images, labels, seed=2).batch(range(60))["pixel_values"]
        assert torch.equal(a, b) and not torch.equal(a, c)
        # Shifting keeps every pixel: the canvas holds the digit's whole ink.
        assert torch.allclose(a.sum((1, 2, 3)), images.float().sum((1, 2)) / 255, atol=1e-3)


class TestAffNISTStyle:
    def test_labels_ranges_and_ink_kept(self):
        images, labels = random_digits(count=40)
        data = AffNISTStyle(images, labels, variants_per_digit=10, seed=0)
        batch = data.batch(range(len(data)))
        pixels = batch["pixel_values"]
        assert pixels.shape == (400, 1, 40, 40)
        assert 0.0 <= pixels.min() and pixels.max() <= 1.0
        assert torch.equal(batch["labels"], labels.repeat(10))
        rotation, shear, scale_x, scale_y = batch["transforms"].unbind(1)
        assert rotation.abs().max() <= 20 and rotation.abs().max() > 18
        assert shear.abs().max() <= 0.2 and shear.abs().max() > 0.18
        for scale in (scale_x, scale_y):
            assert 0.8 <= scale.min() < 0.82 and 1.18 < scale.max() <= 1.2
        # The digit stays on the canvas: its ink scales with the area factor det = scale_x * scale_y.
        ratio = pixels.sum((1, 2, 3)) / (images.float().sum((1, 2)) / 255).repeat(10) / (scale_x * scale_y)
        assert ratio.min() > 0.9 and ratio.max() < 1.1
        # Translations are large (affNIST's "significant translations"): they spread over several pixels.
        assert batch["translations"].std(0).min() > 2.0

    def test_pure_translation_keeps_the_digit_inside_the_canvas(self):
        """Without rotation, shear or scaling a 20x20 square may move by at most 10 pixels each way (its box must
        stay inside 40x40) and keeps all its ink."""
        images, labels = square_digits(count=200)
        data = AffNISTStyle(images, labels, rotation_degrees=0, shear=0, scale=(1, 1), seed=0)
        batch = data.batch(range(200))
        translations = batch["translations"]
        assert translations.abs().max() <= 10.0 and translations.abs().max() > 9.5
        ink = batch["pixel_values"].sum((1, 2, 3))
        assert torch.allclose(ink, torch.full_like(ink, 400 * 200 / 255), rtol=1e-4)

    def test_deterministic(self):
        images, labels = random_digits()
        first = AffNISTStyle(images, labels, seed=9).batch([3, 1, 4])
        second = AffNISTStyle(images, labels, seed=9).batch([4, 3, 1])
        assert torch.equal(first["pixel_values"][0], second["pixel_values"][1])
        assert torch.equal(first["transforms"][2], second["transforms"][0])


def test_place_digits_cuts_outside_the_canvas():
    digit = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    canvas = place_digits(digit, torch.tensor([-10]), torch.tensor([20]), 30)
    assert canvas.shape == (1, 30, 30)
    assert canvas.sum().item() == pytest.approx(18 * 10)


def write_affnist_like_mat(path, images: np.ndarray, labels: np.ndarray) -> None:
    """A .mat file with the real affNIST files' layout: struct `affNISTdata`, one column per image, with `image`,
    `label_one_of_n` and `label_int` at the field positions (2, 4, 5) where public loaders find them."""
    from scipy.io import loadmat, savemat

    count = images.shape[0]
    one_of_n = np.zeros((10, count), dtype=np.uint8)
    one_of_n[labels, np.arange(count)] = 1
    fields = {
        "affine_transform": np.zeros((6, count)),
        "human_readable_transform": np.zeros((7, count)),
        "image": images.reshape(count, 1600).T.astype(np.uint8),
        "inverse_affine_transform": np.zeros((6, count)),
        "label_one_of_n": one_of_n,
        "label_int": labels.reshape(1, count).astype(np.uint8),
    }
    savemat(path, {"affNISTdata": fields})
    record = loadmat(path)["affNISTdata"][0, 0]
    assert np.array_equal(record[2], fields["image"]) and np.array_equal(record[5], fields["label_int"])


def test_load_affnist_mat_on_a_tiny_file(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 40, 40), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5])
    path = tmp_path / "1.mat"
    write_affnist_like_mat(path, images, labels)
    loaded = load_affnist_mat(path)
    assert loaded["images"].dtype == np.uint8 and loaded["images"].shape == (5, 40, 40)
    assert np.array_equal(loaded["images"], images)
    assert np.array_equal(loaded["labels"], labels) and loaded["labels"].dtype == np.int64
    assert loaded["label_one_of_n"].shape == (5, 10)
    assert np.array_equal(loaded["label_one_of_n"].argmax(1), labels)
    assert loaded["human_readable_transform"].shape == (5, 7)


def test_load_affnist_mat_errors(tmp_path):
    from scipy.io import savemat

    with pytest.raises(FileNotFoundError):
        load_affnist_mat(tmp_path / "missing.mat")
    savemat(tmp_path / "other.mat", {"x": np.zeros(3)})
    with pytest.raises(ValueError, match="affNISTdata"):
        load_affnist_mat(tmp_path / "other.mat")
    savemat(tmp_path / "nolabel.mat", {"affNISTdata": {"image": np.zeros((1600, 2), dtype=np.uint8)}})
    with pytest.raises(ValueError, match="label_int"):
        load_affnist_mat(tmp_path / "nolabel.mat")
    (tmp_path / "text.mat").write_text("not a mat file")
    with pytest.raises(ValueError):
        load_affnist_mat(tmp_path / "text.mat")
