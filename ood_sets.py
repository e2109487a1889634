"""The out-of-distribution points a model is judged on, made here with no download.

Two kinds, as the papers on overconfidence far from the data use them (Hein et al. CVPR 2019,
"ACET"; Bitterwolf et al. NeurIPS 2020, "GOOD"):

- Noise families (NOISE_FAMILIES, through noise_images): uniform, dim, low-frequency and
  Gaussian noise, and test images with their pixels permuted. Attacks start from several of
  them, so that a model flat around one family (the undefended model is flat near uniform
  noise, which stops gradient attacks) hides nothing.
- Letters (letters): glyphs rendered from the fonts matplotlib ships, placed as MNIST places
  its digits, a natural non-class set for a model of digits. EVALUATION_FONTS and
  TRAINING_FONTS share no font file, so a defence trained on letters (outlier exposure) is
  never judged on a font it saw.

Every function here is deterministic: the same arguments give the same arrays.
"""
import functools
import zlib

import numpy as np

import common

# --------------------------------------------------------------------------- noise


def uniform_noise(count, shape, rng):
    """Every pixel uniform in [0, 1]: the start backwork and the original study use."""
    return rng.uniform(0.0, 1.0, (count, *shape)).astype(np.float32)


def dim_noise(count, shape, rng):
    """Every pixel uniform in [0, 0.2]: near the black background of a digit, where an attack
    may find a way up that the flat region around uniform noise hides (issue 23)."""
    return rng.uniform(0.0, 0.2, (count, *shape)).astype(np.float32)


def gaussian_noise(count, shape, rng):
    """Every pixel from N(0.5, 0.25^2), clipped to [0, 1].

    The mean and spread are those of uniform noise (0.5 and 0.29), so the two differ only in
    shape: most pixels are mid-grey here, and clipping touches only about 5% of them, so the
    family is not uniform noise with saturated corners.
    """
    return np.clip(rng.normal(0.5, 0.25, (count, *shape)), 0.0, 1.0).astype(np.float32)


def low_frequency_noise(count, shape, rng):
    """Uniform noise blurred by a Gaussian, then stretched back to the full range [0, 1].

    As Hein et al. (CVPR 2019) make it: each image gets its own blur width, uniform in
    [1, 2.5] pixels at 28x28 (scaled with the image size), so the set spans blobs of
    several sizes. Blurring alone would leave every pixel near 0.5; the stretch gives the
    images the contrast of the other families. Channels are blurred apart.
    """
    images = uniform_noise(count, shape, rng)
    widths = rng.uniform(1.0, 2.5, count) * min(shape[:2]) / 28
    return low_pass(images, widths.astype(np.float32)).numpy()


def _reflecting_blur_matrices(size, widths):
    """(N, size, size): row a of matrix n is the Gaussian of width widths[n] centred on pixel a,
    truncated at 4 widths, normalised, and folded back at the edges as scipy.ndimage's "reflect"
    mode does (d c b a | a b c d | d c b a), so one matrix product is gaussian_filter1d."""
    import tensorflow as tf

    offsets = np.arange(-(size - 1), size)  # Every offset a kernel can reach inside one reflection.
    reached = np.arange(size)[:, None] + offsets[None, :]  # (size, offsets): the unfolded pixel index
    folded = np.where(reached < 0, -reached - 1, np.where(reached >= size, 2 * size - reached - 1, reached))
    placement = tf.constant(np.eye(size, dtype=np.float32)[folded])  # (size, offsets, size), one-hot
    widths = tf.convert_to_tensor(widths, tf.float32)
    radius = tf.floor(4.0 * widths + 0.5)  # scipy's truncate = 4.0
    distance = tf.constant(offsets, tf.float32)[None, :]
    weights = tf.where(tf.abs(distance) <= radius[:, None],
                       tf.exp(-0.5 * tf.square(distance) / tf.square(widths)[:, None]), 0.0)
    weights /= tf.reduce_sum(weights, axis=1, keepdims=True)
    return tf.einsum("nk,akb->nab", weights, placement)


def low_pass(images, widths):
    """Each image (N, H, W, C) blurred by a Gaussian of its own width (N,), then stretched to fill [0, 1].

    The one blur of the project: low_frequency_noise calls it eagerly, ACET's in-graph noise
    (defences.noise_batch) inside its compiled step. The blur is separable (one matrix product
    down the columns, one along the rows) and equals scipy.ndimage.gaussian_filter with
    mode="reflect" per image and channel (tests/test_ood_sets.py checks it against scipy), for
    widths below a quarter of the image's side (a kernel folded back once; the families use at most 1/11).
    """
    import tensorflow as tf

    images = tf.convert_to_tensor(images, tf.float32)
    _, height, width, _ = images.shape
    blurred = tf.einsum("nab,nbwc->nawc", _reflecting_blur_matrices(height, widths), images)
    blurred = tf.einsum("nvw,nhwc->nhvc", _reflecting_blur_matrices(width, widths), blurred)
    low = tf.reduce_min(blurred, axis=[1, 2, 3], keepdims=True)
    high = tf.reduce_max(blurred, axis=[1, 2, 3], keepdims=True)
    return (blurred - low) / tf.maximum(high - low, 1e-6)


def permuted_images(count, shape, rng, source_images):
    """Source images (in-distribution test images) with their pixels shuffled, each its own way.

    Each image keeps its pixel values (a colour pixel moves whole), so it has a digit's
    brightness histogram and none of its shape. The sources are drawn without replacement
    while there are enough of them.
    """
    source_images = np.asarray(source_images, np.float32)
    if source_images.shape[1:] != tuple(shape):
        raise common.UserError(f"permuted noise needs source images of shape {tuple(shape)}, not "
                               f"{source_images.shape[1:]}; give test images of the model's image size")
    rows = rng.choice(len(source_images), count, replace=count > len(source_images))
    height, width, channels = shape
    flat = source_images[rows].reshape(count, height * width, channels)
    orders = np.argsort(rng.random((count, height * width)), axis=1)  # One permutation per image.
    return np.take_along_axis(flat, orders[:, :, None], axis=1).reshape(count, *shape)


NOISE_FAMILIES = {
    "uniform": uniform_noise,
    "dim": dim_noise,
    "low_frequency": low_frequency_noise,
    "gaussian": gaussian_noise,
    "permuted": permuted_images,
}
NEEDS_SOURCE_IMAGES = ("permuted",)


def noise_images(family, count, shape, seed, source_images=None):
    """count images (count, H, W, C) float32 in [0, 1] of a noise family, the same for the same seed.

    The family's name is mixed into the seed, so "dim" is not "uniform" scaled by 0.2.
    """
    if family not in NOISE_FAMILIES:
        raise common.UserError(f"noise family {family!r} is unknown; choose one of {', '.join(NOISE_FAMILIES)}")
    shape = tuple(int(size) for size in shape)
    if len(shape) != 3:
        raise ValueError(f"noise images need a shape (height, width, channels), not {shape}")
    rng = np.random.default_rng([seed, zlib.crc32(family.encode())])
    if family in NEEDS_SOURCE_IMAGES:
        if source_images is None:
            raise ValueError(f"the {family!r} family needs source_images (in-distribution test images)")
        return NOISE_FAMILIES[family](count, shape, rng, source_images)
    return NOISE_FAMILIES[family](count, shape, rng)


# ------------------------------------------------------------------------- letters

# The letters rendered, each image's label its index here. Left out:
# - those a digit model may rightly read as a digit, so high confidence on them is no fault:
#   O o Q (0), I i l (1), Z z (2), S s (5), b (6), B (8), g q (9);
# - lower-case letters that, scaled to fill the box as MNIST scales its digits, are their
#   capitals again (c k m o p s u v w x y z; EMNIST's balanced split merges the same ones,
#   and i j l with them): one class each, the capital.
LETTERS = "ACDEFGHJKLMNPRTUVWXYadefhnrt"
EXCLUDED_LETTERS = "BIOQSZbgilqosz" + "cjkmpuvwxy"

# Font files in matplotlib/mpl-data/fonts/ttf. Judged on DejaVu only; trained on STIX and
# Computer Modern only: two families apart, no file in both (checked at import below).
EVALUATION_FONTS = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif.ttf",
                    "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf", "DejaVuSansMono.ttf",
                    "DejaVuSansMono-Bold.ttf")
TRAINING_FONTS = ("STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf", "STIXGeneralBolIta.ttf",
                  "cmr10.ttf", "cmb10.ttf", "cmss10.ttf", "cmti10.ttf", "cmtt10.ttf")
if set(EVALUATION_FONTS) & set(TRAINING_FONTS):
    raise ImportError("EVALUATION_FONTS and TRAINING_FONTS share a font; a defence would be judged on what it saw")

# MNIST's layout at 28x28: a digit scaled to fit a 20x20 box, its centre of mass at the centre.
BOX_FRACTION = 20 / 28
SIZE_SCALES = (0.8, 0.9, 1.0)  # Each letter's box is one of these fractions of the full box.
SHIFT_FRACTION = 2 / 28  # Each letter moves up to 2 pixels (at 28x28) from the centre, each way.
MIN_SIDE = 8  # Below this a glyph is a blob.


def font_files(fonts=EVALUATION_FONTS):
    """The path of each font file matplotlib ships under these names (a missing one is refused)."""
    import matplotlib
    from pathlib import Path

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    paths = tuple((folder / name).resolve() for name in fonts)
    missing = [path.name for path in paths if not path.is_file()]
    if missing or not paths:
        available = sorted(path.name for path in folder.glob("*.ttf"))
        raise common.UserError(f"font {', '.join(missing) or '(none given)'} is not among matplotlib's fonts in "
                               f"{folder}; choose from {', '.join(available)}")
    return paths


@functools.lru_cache(maxsize=None)
def _font(path):
    from matplotlib.ft2font import FT2Font

    return FT2Font(str(path))


def _render(path, letter, pixels_per_em):
    """One glyph, antialiased by FreeType, cropped to its ink: float32 (h, w) in [0, 1]."""
    from matplotlib.ft2font import LoadFlags

    font = _font(path)
    font.set_size(pixels_per_em, 72)  # At 72 dpi a point is a pixel.
    # Unhinted: hinting snaps stems to whole pixels, which distorts the shape at this size.
    font.set_text(letter, 0.0, flags=LoadFlags.NO_HINTING)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = np.asarray(font.get_image(), np.float32) / 255.0
    rows, columns = np.nonzero(bitmap.any(axis=1))[0], np.nonzero(bitmap.any(axis=0))[0]
    return bitmap[rows[0]:rows[-1] + 1, columns[0]:columns[-1] + 1]


@functools.lru_cache(maxsize=None)
def glyph(path, letter, box):
    """A letter scaled so that its longer side is about box pixels, its brightest pixel 1.

    Measured at 100 pixels per em, then drawn again at the size that fits the box: drawn
    at its final size, not resized, the strokes keep FreeType's exact coverage.
    """
    reference = _render(path, letter, 100.0)
    image = _render(path, letter, 100.0 * box / max(reference.shape))
    image /= image.max()
    image.flags.writeable = False  # Cached: shared by every image that uses it.
    return image


def _place(canvas, image, top, left, margin):
    """Put image into canvas with its top-left corner at (top, left), moved to stay margin pixels
    inside the canvas's edge where it fits."""
    height, width = canvas.shape
    top = int(np.clip(top, margin, max(height - image.shape[0] - margin, margin)))
    left = int(np.clip(left, margin, max(width - image.shape[1] - margin, margin)))
    part = image[:height - top, :width - left]
    canvas[top:top + part.shape[0], left:left + part.shape[1]] = part


def _centre_of_mass(image):
    rows, columns = np.indices(image.shape)
    return (rows * image).sum() / image.sum(), (columns * image).sum() / image.sum()


def draw_letter(canvas, path, letter, box, shift=(0, 0)):
    """Draw a letter of the font file at path into canvas (H, W), its longer side about box
    pixels and its centre of mass shift (rows, columns) from the canvas's centre."""
    image = glyph(path, letter, round(float(box), 3))
    centre_row, centre_column = _centre_of_mass(image)
    top = round((canvas.shape[0] - 1) / 2 - centre_row + shift[0])
    left = round((canvas.shape[1] - 1) / 2 - centre_column + shift[1])
    # A letter whose mass lies to one side ('L', 'T') would otherwise touch the edge, which no
    # MNIST digit does.
    _place(canvas, image, top, left, margin=max(1, round(min(canvas.shape) / 28)))


def letters(count, shape=(28, 28), seed=0, fonts=EVALUATION_FONTS):
    """count letter images (count, H, W, C) float32 in [0, 1], white on black, and labels (count,).

    A label is the letter's index in LETTERS. Each image draws a letter, a font, a size
    (SIZE_SCALES of a box 20/28 of the image) and a shift of up to 2/28 of the image from
    the centre, and places the letter's centre of mass there, as MNIST places a digit.
    shape is (H, W) or (H, W, C); the grey image is repeated in every channel.
    """
    height, width = int(shape[0]), int(shape[1])
    channels = int(shape[2]) if len(shape) == 3 else 1
    if min(height, width) < MIN_SIDE:
        raise common.UserError(f"letters need images of at least {MIN_SIDE}x{MIN_SIDE} pixels, not {height}x{width}")
    paths = font_files(fonts)
    rng = np.random.default_rng([seed, zlib.crc32(b"letters")])
    labels = rng.integers(0, len(LETTERS), count)
    font_choices = rng.integers(0, len(paths), count)
    boxes = BOX_FRACTION * min(height, width) * np.asarray(SIZE_SCALES)[rng.integers(0, len(SIZE_SCALES), count)]
    reach = max(1, round(SHIFT_FRACTION * min(height, width)))
    shifts = rng.integers(-reach, reach + 1, (count, 2))
    images = np.zeros((count, height, width), np.float32)
    for index in range(count):
        draw_letter(images[index], paths[font_choices[index]], LETTERS[labels[index]], boxes[index], shifts[index])
    return np.repeat(images[..., None], channels, axis=-1), labels.astype(np.int64)
