"""The out-of-distribution sets: noise families and rendered letters, deterministic and as described."""
import string

import numpy as np
import pytest

import common
import ood_sets

SHAPES = [(28, 28, 1), (10, 14, 3)]  # MNIST's, and a colour one that is not square.


def neighbour_difference(images):
    """Mean absolute difference between horizontally adjacent pixels: high for noise, low for smooth images."""
    return float(np.abs(np.diff(images, axis=2)).mean())


def source_images(count=30, shape=(28, 28, 1)):
    return np.random.default_rng(5).uniform(0, 1, (count, *shape)).round(2).astype(np.float32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("family", list(ood_sets.NOISE_FAMILIES))
def test_every_noise_family_gives_float32_images_in_the_unit_range(family, shape):
    images = ood_sets.noise_images(family, 40, shape, seed=0, source_images=source_images(shape=shape))
    assert images.shape == (40, *shape) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1 and images.std() > 0.01  # Not blank.


@pytest.mark.parametrize("family", list(ood_sets.NOISE_FAMILIES))
def test_noise_is_the_same_for_the_same_seed_and_differs_for_another(family):
    def make(seed):
        return ood_sets.noise_images(family, 20, (28, 28, 1), seed, source_images=source_images())

    np.testing.assert_array_equal(make(3), make(3))
    assert not np.array_equal(make(3), make(4))


def test_families_are_not_copies_of_each_other():
    uniform = ood_sets.noise_images("uniform", 20, (28, 28, 1), 0)
    dim = ood_sets.noise_images("dim", 20, (28, 28, 1), 0)
    # The family is mixed into the seed: dim noise is not uniform noise scaled down.
    assert not np.allclose(dim, 0.2 * uniform, atol=1e-3)


def test_dim_noise_stays_at_or_below_0_2():
    images = ood_sets.noise_images("dim", 200, (28, 28, 1), 0)
    assert images.max() <= 0.2 and images.max() > 0.19 and abs(images.mean() - 0.1) < 0.005


def test_low_frequency_noise_is_smooth_and_uses_the_full_range():
    smooth = ood_sets.noise_images("low_frequency", 100, (28, 28, 1), 0)
    uniform = ood_sets.noise_images("uniform", 100, (28, 28, 1), 0)
    # Uniform noise differs by 1/3 between neighbours; the blurred noise by a small part of that.
    assert neighbour_difference(smooth) < 0.25 * neighbour_difference(uniform)
    assert np.allclose(smooth.min(axis=(1, 2, 3)), 0) and np.allclose(smooth.max(axis=(1, 2, 3)), 1)


@pytest.mark.parametrize("shape", SHAPES)
def test_low_pass_is_scipys_reflecting_gaussian_filter_then_a_stretch(shape):
    from scipy import ndimage

    images = np.random.default_rng(3).uniform(0, 1, (4, *shape)).astype(np.float32)
    widths = np.array([0.5, 1.0, 1.7, 2.5], np.float32) * min(shape[:2]) / 28  # low_frequency_noise's range
    expected = []
    for image, width in zip(images, widths):
        blurred = ndimage.gaussian_filter(image.astype(np.float64), sigma=(width, width, 0), mode="reflect")
        expected.append((blurred - blurred.min()) / (blurred.max() - blurred.min()))
    np.testing.assert_allclose(ood_sets.low_pass(images, widths).numpy(), np.array(expected), atol=2e-5)


def test_gaussian_noise_is_mid_grey_with_a_quarter_spread():
    images = ood_sets.noise_images("gaussian", 200, (28, 28, 1), 0)
    assert abs(images.mean() - 0.5) < 0.01 and 0.22 < images.std() < 0.26
    assert 0.02 < np.mean((images == 0) | (images == 1)) < 0.08  # Clipping touches a few pixels, not most.


@pytest.mark.parametrize("count", [10, 45])  # Fewer points than sources, and more (drawn again).
def test_permuted_images_keep_each_source_images_pixels(count):
    sources = source_images(30)
    images = ood_sets.noise_images("permuted", count, (28, 28, 1), 0, source_images=sources)
    sorted_sources = np.sort(sources.reshape(30, -1), axis=1)
    for image in images:
        matches = np.all(sorted_sources == np.sort(image.ravel()), axis=1)
        assert matches.any()  # The same multiset of pixels as a source image...
        assert not np.array_equal(image, sources[np.argmax(matches)])  # ...in another order.
    if count <= 30:  # Drawn without replacement while there are enough sources.
        assert len({image.tobytes() for image in np.sort(images.reshape(count, -1), axis=1)}) == count


def test_permuted_colour_images_move_whole_pixels():
    sources = source_images(5, shape=(10, 14, 3))
    images = ood_sets.noise_images("permuted", 5, (10, 14, 3), 0, source_images=sources)
    colours = {tuple(pixel) for pixel in sources.reshape(-1, 3)}
    assert all(tuple(pixel) in colours for pixel in images.reshape(-1, 3))


def test_an_unknown_family_or_wrong_source_is_refused():
    with pytest.raises(common.UserError, match="'pink' is unknown; choose one of uniform, dim, low_frequency"):
        ood_sets.noise_images("pink", 10, (28, 28, 1), 0)
    with pytest.raises(common.UserError, match="give test images of the model's image size"):
        ood_sets.noise_images("permuted", 10, (28, 28, 1), 0, source_images=source_images(shape=(10, 14, 3)))
    with pytest.raises(ValueError, match="needs source_images"):
        ood_sets.noise_images("permuted", 10, (28, 28, 1), 0)


# --------------------------------------------------------------------------- letters


@pytest.fixture(scope="module")
def many_letters():
    return ood_sets.letters(1000, seed=0)  # As many as an evaluation draws: this also shows that they render fast.


def test_letters_are_grey_images_in_the_unit_range_with_labels_into_letters(many_letters):
    images, labels = many_letters
    assert images.shape == (1000, 28, 28, 1) and images.dtype == np.float32
    assert images.min() >= 0 and images.max() <= 1
    assert labels.shape == (1000,) and np.issubdtype(labels.dtype, np.integer)
    assert set(labels.tolist()) == set(range(len(ood_sets.LETTERS)))  # Every letter, and nothing else.


@pytest.mark.parametrize("shape", [(28, 28, 3), (32, 32, 3), (20, 36)])
def test_letters_come_in_any_size_and_colour_as_grey(shape):
    images, labels = ood_sets.letters(30, shape, seed=1)
    assert images.shape == (30, shape[0], shape[1], shape[2] if len(shape) == 3 else 1)
    assert np.all(images == images[..., :1])  # Every channel the same grey.
    # The same letters as at the grey shape: colour only repeats the channel.
    grey, grey_labels = ood_sets.letters(30, shape[:2], seed=1)
    np.testing.assert_array_equal(images[..., :1], grey)
    np.testing.assert_array_equal(labels, grey_labels)


def test_letters_are_the_same_for_the_same_seed_and_differ_for_another(many_letters):
    images, labels = ood_sets.letters(1000, seed=0)
    np.testing.assert_array_equal(images, many_letters[0])
    np.testing.assert_array_equal(labels, many_letters[1])
    other_images, other_labels = ood_sets.letters(1000, seed=1)
    assert not np.array_equal(other_images, images) and not np.array_equal(other_labels, labels)


def test_every_letter_has_ink_on_a_dark_background_in_an_mnist_box(many_letters):
    images = many_letters[0][..., 0]
    assert np.all(images.max(axis=(1, 2)) > 0.99)  # Every image has a stroke at full brightness.
    ink = images > 0.1
    assert np.all(ink.mean(axis=(1, 2)) > 0.04)  # More than a dot...
    assert np.all(images.mean(axis=(1, 2)) < 0.4)  # ...and mostly background,
    assert images[:, 0, :].max() == 0 and images[:, :, 0].max() == 0  # which is black at the edge.
    for image in ink[:200]:  # The longer side fills about MNIST's 20x20 box (scaled by 0.8 to 1).
        rows, columns = np.nonzero(image.any(axis=1))[0], np.nonzero(image.any(axis=0))[0]
        assert 14 <= max(rows[-1] - rows[0], columns[-1] - columns[0]) + 1 <= 21


def test_no_letter_that_resembles_a_digit_is_drawn(many_letters):
    assert set(ood_sets.LETTERS) | set(ood_sets.EXCLUDED_LETTERS) == set(string.ascii_letters)
    assert not set(ood_sets.LETTERS) & set(ood_sets.EXCLUDED_LETTERS)
    assert len(set(ood_sets.LETTERS)) == len(ood_sets.LETTERS)
    for letter in "OoQIilZzSsbBgq":  # Read as 0, 1, 2, 5, 6, 8, 9.
        assert letter in ood_sets.EXCLUDED_LETTERS
    assert many_letters[1].max() < len(ood_sets.LETTERS)  # A label can name no excluded letter.


def centred_letter(path, letter):
    canvas = np.zeros((28, 28), np.float32)
    ood_sets.draw_letter(canvas, path, letter, 20)
    return canvas


@pytest.mark.parametrize("fonts", [ood_sets.EVALUATION_FONTS, ood_sets.TRAINING_FONTS], ids=["evaluation", "training"])
def test_every_font_draws_every_letter_and_distinct_letters_differ(fonts):
    for path in ood_sets.font_files(fonts):
        drawn = np.stack([centred_letter(path, letter) for letter in ood_sets.LETTERS])
        assert np.all(drawn.max(axis=(1, 2)) > 0.99), path.name  # No missing glyph (a blank box).
        differences = np.abs(drawn[:, None] - drawn[None]).mean(axis=(2, 3))  # (letters, letters)
        np.fill_diagonal(differences, np.inf)
        closest = np.unravel_index(np.argmin(differences), differences.shape)
        pair = ood_sets.LETTERS[closest[0]] + ood_sets.LETTERS[closest[1]]
        # The closest pairs (F and P, f and t, H and N) differ by 0.04-0.08 of full brightness per pixel; a
        # font that drew two letters with one glyph, or both as its blank missing-glyph box, would give 0.
        assert differences.min() > 0.03, f"{path.name}: {pair} look alike"


def test_evaluation_and_training_fonts_share_no_file_and_no_family():
    from matplotlib.ft2font import FT2Font

    evaluation, training = ood_sets.font_files(ood_sets.EVALUATION_FONTS), ood_sets.font_files(ood_sets.TRAINING_FONTS)
    assert all(path.is_file() for path in evaluation + training)
    assert len(set(evaluation)) == len(evaluation) and len(set(training)) == len(training)
    assert not set(evaluation) & set(training)
    # Not the same font under another file name either: the faces inside name other families.
    families = [{FT2Font(str(path)).family_name for path in paths} for paths in (evaluation, training)]
    assert families[0] == {"DejaVu Sans", "DejaVu Serif", "DejaVu Sans Mono"}
    assert not families[0] & families[1]


def test_training_fonts_draw_other_images_than_evaluation_fonts():
    evaluation, _ = ood_sets.letters(50, seed=2)
    training, _ = ood_sets.letters(50, seed=2, fonts=ood_sets.TRAINING_FONTS)
    assert not np.array_equal(evaluation, training)


def test_an_unknown_font_or_a_tiny_image_is_refused():
    with pytest.raises(common.UserError, match="font Arial.ttf is not among matplotlib's fonts .*; choose from"):
        ood_sets.letters(5, fonts=("DejaVuSans.ttf", "Arial.ttf"))
    with pytest.raises(common.UserError, match="at least 8x8 pixels, not 6x6"):
        ood_sets.letters(5, shape=(6, 6))
