"""extras/cppapi: what `infer --draw` draws, checked pixel by pixel, and infer's options; no GPU.

tests/cppapi/draw_driver.cpp is built with g++ -Werror and draws detections from a text file onto a
PPM with draw.h, as infer does after a run. The rules (draw.h's top comment) are written again here
in numpy, so that every output image is compared whole with what they give; the glyphs and the
palette come from the driver (they are a choice, not a rule), the geometry is this file's own.

With TensorRT headers (TENSORRT_INCLUDE) and CUDA's, infer.cpp itself is built with -Werror and
linked with tests/cppapi/trt_stub.cpp (a runtime factory that returns null) to check its options and
image reading. tests/test_build.py compiles it with scripts/check_plugins.sh's flags as well.
"""

import math
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DRIVER_SOURCE = ROOT / "tests" / "cppapi" / "draw_driver.cpp"
CPPAPI = ROOT / "extras" / "cppapi"

OUTLINE, SCALE, PAD, GLYPH_W, GLYPH_H = 2, 2, 2, 5, 7  # the rules' numbers (draw.h)
LABEL_H = 2 * PAD + GLYPH_H * SCALE
DEFAULT_THRESHOLD = 0.3  # infer's --draw-threshold default
W, H = 160, 120  # the test image


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler: g++ (or $CXX) is not on PATH")
    exe = tmp_path_factory.mktemp("cppapi") / "draw_driver"
    # _GLIBCXX_ASSERTIONS: a write outside the image (a clipping bug) aborts instead of passing unseen.
    flags = ["-std=c++17", "-O1", "-D_GLIBCXX_ASSERTIONS", "-Wall", "-Wextra", "-Werror", f"-I{CPPAPI}"]
    proc = subprocess.run([cxx, *flags, str(DRIVER_SOURCE), "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


def cuda_include():
    """CUDA's include folder: $CUDA_HOME, else beside the real nvcc (a wrapper script's exec line
    names it), else /usr/local/cuda; None if none has cuda_runtime_api.h."""
    homes = [os.environ.get("CUDA_HOME")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        head = real.read_bytes()[:4096]
        if head.startswith(b"#!"):  # a script: the first absolute path ending in bin/nvcc it runs
            found = re.search(rb"(/\S+)/bin/nvcc\b", head)
            homes.append(found and found.group(1).decode())
        homes.append(str(real.parent.parent))
    homes.append("/usr/local/cuda")
    return next((f"{h}/include" for h in homes if h and os.path.isfile(f"{h}/include/cuda_runtime_api.h")), None)


@pytest.fixture(scope="module")
def infer(tmp_path_factory):
    """infer.cpp linked with the stand-in TensorRT and CUDA entry points."""
    trt, cuda = os.environ.get("TENSORRT_INCLUDE"), cuda_include()
    if not trt or not os.path.isfile(os.path.join(trt, "NvInferRuntime.h")):
        pytest.skip(f"no TensorRT headers: set TENSORRT_INCLUDE to a folder with NvInferRuntime.h (is {trt!r})")
    if cuda is None:
        pytest.skip("no CUDA headers: set CUDA_HOME to a toolkit with include/cuda_runtime_api.h")
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler: g++ (or $CXX) is not on PATH")
    exe = tmp_path_factory.mktemp("cppapi") / "infer"
    flags = ["-std=c++17", "-Wall", "-Wextra", "-Werror", "-isystem", trt, "-isystem", cuda]
    sources = [str(CPPAPI / "infer.cpp"), str(DRIVER_SOURCE.parent / "trt_stub.cpp")]
    proc = subprocess.run([cxx, *flags, *sources, "-o", str(exe)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return exe


@pytest.fixture(scope="module")
def palette(driver):
    out = subprocess.run([str(driver), "--palette", "256"], capture_output=True, text=True, check=True).stdout
    return np.array([line.split() for line in out.splitlines()], dtype=np.uint8)


@pytest.fixture(scope="module")
def font(driver):
    chars = "0123456789.- afin"
    out = subprocess.run([str(driver), "--font", chars], capture_output=True, text=True, check=True).stdout
    rows = out.splitlines()
    assert len(rows) == GLYPH_H * len(chars)
    return {
        c: np.array([[p == "#" for p in rows[i * GLYPH_H + y]] for y in range(GLYPH_H)]) for i, c in enumerate(chars)
    }


@pytest.fixture
def image():
    return np.random.default_rng(0).integers(0, 256, size=(H, W, 3), dtype=np.uint8)


def write_ppm(path, img):
    path.write_bytes(f"P6\n{img.shape[1]} {img.shape[0]}\n255\n".encode() + img.tobytes())


def read_ppm(path):
    data = path.read_bytes()
    # The header ends at one whitespace byte: the pixels after it may start with bytes that look like more.
    header = re.match(rb"P6\s+(\d+)\s+(\d+)\s+255\s", data)
    assert header, data[:20]
    w, h = int(header.group(1)), int(header.group(2))
    return np.frombuffer(data[header.end() :], dtype=np.uint8).reshape(h, w, 3)


def draw(driver, tmp_path, img, dets, threshold=DEFAULT_THRESHOLD):
    """Run the driver on img with dets [(x1, y1, x2, y2, class, score)]; the drawn image."""
    write_ppm(tmp_path / "in.ppm", img)
    (tmp_path / "dets.txt").write_text("".join(" ".join(map(str, d)) + "\n" for d in dets))
    args = [tmp_path / "in.ppm", tmp_path / "dets.txt", threshold, tmp_path / "out.ppm"]
    proc = subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return read_ppm(tmp_path / "out.ppm")


# The rules, in numpy. Rectangles are (x0, y0, x1, y1), half-open; coordinates go through float32
# as in the driver.


def box_pixels(det, width=W, height=H):
    x1, y1, x2, y2 = (float(np.float32(v)) for v in det[:4])
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    rect = (min(max(math.floor(x1), 0), width), min(max(math.floor(y1), 0), height))
    rect += (min(max(math.ceil(x2), 0), width), min(max(math.ceil(y2), 0), height))
    return rect if rect[2] > rect[0] and rect[3] > rect[1] else None


def label_text(det):
    return f"{det[4]} {float(np.float32(det[5])):.2f}"


def label_rect(box, det, width=W):
    n = len(label_text(det))
    w = 2 * PAD + n * GLYPH_W * SCALE + (n - 1) * SCALE
    x0 = box[0] if box[0] + w <= width else max(width - w, 0)
    y0 = box[1] - LABEL_H if box[1] >= LABEL_H else box[1]
    return (x0, y0, x0 + w, y0 + LABEL_H)


def outline_bands(box):
    x0, y0, x1, y1 = box
    return [
        (x0, y0, x1, min(y0 + OUTLINE, y1)),
        (x0, max(y1 - OUTLINE, y0), x1, y1),
        (x0, y0, min(x0 + OUTLINE, x1), y1),
        (max(x1 - OUTLINE, x0), y0, x1, y1),
    ]


def region(img, rect):
    """The part of img inside rect, clipped to it (numpy slices would wrap negative starts)."""
    x0, y0, x1, y1 = rect
    return img[max(y0, 0) : max(y1, 0), max(x0, 0) : max(x1, 0)]


def text_colour(fill):
    return (0, 0, 0) if 299 * int(fill[0]) + 587 * int(fill[1]) + 114 * int(fill[2]) >= 128000 else (255, 255, 255)


def render(img, dets, palette, font, threshold=DEFAULT_THRESHOLD):
    """What the rules say the drawn image is."""
    out = img.copy()
    kept = [d for d in dets if np.float32(d[5]) >= np.float32(threshold)]
    kept.sort(key=lambda d: np.float32(d[5]))  # stable: ties keep their order
    boxes = [box_pixels(d, img.shape[1], img.shape[0]) for d in kept]
    for det, box in zip(kept, boxes):
        for band in outline_bands(box) if box else []:
            region(out, band)[:] = palette[det[4]]
    for det, box in zip(kept, boxes):  # labels after every outline
        if box is None:
            continue
        colour = palette[det[4]]
        label = label_rect(box, det, img.shape[1])
        region(out, label)[:] = colour
        for i, c in enumerate(label_text(det)):
            x = label[0] + PAD + i * (GLYPH_W + 1) * SCALE
            for gy, gx in zip(*np.nonzero(font[c])):
                square = (x + gx * SCALE, label[1] + PAD + gy * SCALE)
                region(out, square + (square[0] + SCALE, square[1] + SCALE))[:] = text_colour(colour)
    return out


def mask_of(rects, shape=(H, W)):
    mask = np.zeros(shape, dtype=bool)
    for rect in rects:
        region(mask, rect)[:] = True
    return mask


APART = [(10, 30, 50, 70, 0, 0.9), (70.6, 40.6, 100.2, 90.7, 3, 0.87), (112, 25, 150, 110, 13, 0.5)]


def test_empty_list_returns_the_image_unchanged(driver, tmp_path, image):
    assert np.array_equal(draw(driver, tmp_path, image, []), image)
    assert np.array_equal(draw(driver, tmp_path, image, [], threshold=0.0), image)


def test_drawn_image_equals_the_rules(driver, tmp_path, image, palette, font):
    assert np.array_equal(draw(driver, tmp_path, image, APART), render(image, APART, palette, font))


def test_pixels_outside_outlines_and_labels_are_unchanged(driver, tmp_path, image):
    out = draw(driver, tmp_path, image, APART)
    rects = []
    for det in APART:
        box = box_pixels(det)
        rects += outline_bands(box) + [label_rect(box, det)]
    untouched = ~mask_of(rects)
    assert np.array_equal(out[untouched], image[untouched])
    assert not np.array_equal(out, image)


def test_outline_pixels_have_the_class_colour(driver, tmp_path, image, palette):
    out = draw(driver, tmp_path, image, APART)
    labels = mask_of([label_rect(box_pixels(d), d) for d in APART])
    for det in APART:
        box = box_pixels(det)
        outline = mask_of(outline_bands(box)) & ~labels
        assert outline.sum() > 2 * OUTLINE * (box[2] - box[0]), det
        assert (out[outline] == palette[det[4]]).all(), det
        inside = mask_of([(box[0] + OUTLINE, box[1] + OUTLINE, box[2] - OUTLINE, box[3] - OUTLINE)]) & ~labels
        assert np.array_equal(out[inside], image[inside]), det
    assert box_pixels(APART[1]) == (70, 40, 101, 91), "the box covers every pixel its edges touch"
    assert len({tuple(palette[d[4]]) for d in APART}) == len(APART)


def test_label_sits_on_the_boxs_top_left_corner(driver, tmp_path, image, palette, font):
    det = APART[1]
    out = draw(driver, tmp_path, image, [det])
    box, colour = box_pixels(det), palette[det[4]]
    label = label_rect(box, det)
    assert (label[0], label[3]) == (box[0], box[1]), "left edges flush, label just above the box"
    inside = region(out, label).reshape(-1, 3)
    ink = np.all(inside == text_colour(colour), axis=1)
    assert np.all(inside[~ink] == colour), "the label is filled with the class colour"
    glyph_pixels = sum(int(font[c].sum()) for c in label_text(det)) * SCALE * SCALE
    assert ink.sum() == glyph_pixels > 0, 'the text of "3 0.87", every font pixel a square'
    around = mask_of([(label[0] - 1, label[1] - 1, label[2] + 1, label[3])]) & ~mask_of([label])
    assert np.array_equal(out[around], image[around]), "nothing drawn around the label above the box"


def test_detection_below_the_threshold_draws_nothing(driver, tmp_path, image, palette, font):
    below = [(10, 30, 50, 70, 2, 0.29)]
    assert np.array_equal(draw(driver, tmp_path, image, below), image)
    at = [(10, 30, 50, 70, 2, 0.3)]
    assert np.array_equal(draw(driver, tmp_path, image, at), render(image, at, palette, font))
    mixed = [APART[0][:5] + (0.49,), APART[1][:5] + (0.51,)]
    expected = render(image, [mixed[1]], palette, font)
    assert np.array_equal(draw(driver, tmp_path, image, mixed, threshold=0.5), expected)


def test_boxes_partly_outside_the_image_are_clipped(driver, tmp_path, image, palette, font):
    dets = [
        (-50, -40, 40, 30, 1, 0.9),  # off the top left: outline along the image's edges, label inside
        (130, 90, 400, 300, 4, 0.8),  # off the bottom right
        (-1e30, 50, 1e30, 60, 5, 0.7),  # beyond int's range
        (200, 10, 300, 50, 6, 0.95),  # all of it outside: nothing
        (20, -80, 60, -1, 7, 0.6),  # all of it above: nothing
        (float("nan"), 10, 50, 50, 8, 0.9),  # not a box: nothing
        (10, 10, float("inf"), 50, 9, 0.9),
        (30, 30, 30, 60, 10, 0.9),  # no width: nothing
    ]
    out = draw(driver, tmp_path, image, dets)
    assert np.array_equal(out, render(image, dets, palette, font))
    assert label_rect(box_pixels(dets[0]), dets[0])[:2] == (0, 0), "no room above: the label at the image's corner"
    assert (out[LABEL_H:30, 0:OUTLINE] == palette[1]).all() and (out[30 - OUTLINE : 30, 0:40] == palette[1]).all()
    assert (out[H - OUTLINE :, 135:] == palette[4]).all() and (out[95:, W - OUTLINE :] == palette[4]).all()
    drawn = [d for d in dets if box_pixels(d) is not None]
    assert [d[4] for d in drawn] == [1, 4, 5]
    rects = [r for d in drawn for r in outline_bands(box_pixels(d)) + [label_rect(box_pixels(d), d)]]
    assert np.array_equal(out[~mask_of(rects)], image[~mask_of(rects)])


@pytest.mark.parametrize("top", [0, 5, LABEL_H - 1, LABEL_H, 40])
def test_label_stays_inside_the_image_at_the_top_edge(driver, tmp_path, image, palette, font, top):
    det = (20, top, 90, top + 50, 2, 0.77)
    out = draw(driver, tmp_path, image, [det])
    assert np.array_equal(out, render(image, [det], palette, font))
    label = label_rect(box_pixels(det), det)
    assert label[1] >= 0 and label[3] <= H
    assert label[1] == (top - LABEL_H if top >= LABEL_H else top), "above the box, else just below its top edge"
    assert (region(out, label) != region(image, label)).any(axis=2).mean() > 0.9


def test_label_at_the_right_edge_moves_left(driver, tmp_path, image, palette, font):
    det = (W - 20, 50, W, 100, 11, 0.42)
    out = draw(driver, tmp_path, image, [det])
    assert np.array_equal(out, render(image, [det], palette, font))
    label = label_rect(box_pixels(det), det)
    assert label[2] == W and label[0] < W - 20


def test_labels_over_outlines_and_higher_scores_on_top(driver, tmp_path, image, palette, font):
    low, high = (10, 40, 80, 100, 0, 0.4), (30, 20, 120, 110, 1, 0.8)
    first = draw(driver, tmp_path, image, [low, high])
    assert np.array_equal(first, draw(driver, tmp_path, image, [high, low])), "the input order does not matter"
    assert np.array_equal(first, render(image, [low, high], palette, font))
    assert (first[60:100, 30:32] == palette[1]).all(), "the higher score's outline crosses the lower's"
    low_label = label_rect(box_pixels(low), low)
    assert low_label[1] < 40 and low_label[3] == 40 and low_label[2] > 32
    crossing = first[low_label[1] : 40, 30:32].reshape(-1, 3)
    assert not (crossing == palette[1]).all(axis=1).any(), "the lower score's label hides the higher's outline"


def test_label_wider_than_the_image_is_clipped(driver, tmp_path, palette, font):
    small = np.full((12, 30, 3), 7, dtype=np.uint8)
    det = (2, 3, 25, 11, 123, 0.99)
    assert np.array_equal(draw(driver, tmp_path, small, [det]), render(small, [det], palette, font))


def test_palette_is_well_separated_and_cycles(palette):
    n = next(i for i in range(1, len(palette)) if (palette[i] == palette[0]).all())
    assert n >= 10, "at least ten colours before they repeat"
    assert np.array_equal(palette[n : 2 * n], palette[:n])
    colours = palette[:n].astype(float)
    distances = np.linalg.norm(colours[:, None] - colours[None], axis=2) + np.eye(n) * 1000
    assert distances.min() >= 90, "every two classes' colours far apart in RGB"


def test_font_digits_are_distinct_and_inked(font):
    digits = [font[c] for c in "0123456789"]
    assert all(g.shape == (GLYPH_H, GLYPH_W) and g.any() for g in digits)
    assert len({g.tobytes() for g in digits}) == 10
    assert font["."].any() and font["-"].any() and not font[" "].any()


@pytest.mark.parametrize(
    "data",
    [
        b"P3\n2 2\n255\n" + bytes(12),
        b"P6\n2 2\n255\n" + bytes(11),
        b"P6\n2 2\n65535\n" + bytes(24),
        b"P6\n99999 99999\n255\n",
    ],
    ids=["ascii", "truncated", "16-bit", "huge-header"],
)
def test_unreadable_image_is_refused(driver, tmp_path, data):
    (tmp_path / "bad.ppm").write_bytes(data)
    (tmp_path / "dets.txt").write_text("")
    args = [tmp_path / "bad.ppm", tmp_path / "dets.txt", "0.3", tmp_path / "out.ppm"]
    proc = subprocess.run([str(driver), *map(str, args)], capture_output=True, text=True)
    assert proc.returncode == 1 and "not a binary 8-bit PPM" in proc.stderr


NO_RUNTIME = "cannot create the TensorRT runtime"  # where infer stops with the stand-ins: options and image passed


@pytest.mark.parametrize(
    "options, message",
    [
        ([], "needs ENGINE.plan and IMAGE.ppm"),
        (["e.plan", "IMAGE"], "needs --plugins LIB.so"),
        (["e.plan", "IMAGE", "--plugins", "p.so", "--runs", "3x"], "--runs wants a whole number >= 0, not 3x"),
        (["e.plan", "IMAGE", "--plugins", "p.so", "--runs", "-1"], "--runs wants a whole number >= 0, not -1"),
        (["e.plan", "IMAGE", "--plugins", "p.so", "--draw-threshold", "high"], "--draw-threshold wants a number"),
        (["e.plan", "IMAGE", "--plugins", "p.so", "--draw"], "--draw needs a value"),
        (["e.plan", "IMAGE", "--plugins", "p.so", "--size", "800"], "unknown argument --size"),
    ],
)
def test_infer_refuses_bad_options_with_the_usage(infer, tmp_path, image, options, message):
    write_ppm(tmp_path / "in.ppm", image)
    options = [str(tmp_path / "in.ppm") if o == "IMAGE" else o for o in options]
    proc = subprocess.run([str(infer), *options], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
    assert "usage: infer ENGINE.plan IMAGE.ppm --plugins LIB.so" in proc.stderr and "[--draw OUT.ppm]" in proc.stderr


@pytest.mark.parametrize(
    "options",
    [
        ["--plugins", "p.so"],
        ["--plugins", "p.so", "--runs", "5"],
        ["--draw", "OUT", "--draw-threshold", "0.5", "--runs", "0", "--plugins", "p.so"],
        ["--plugins", "p.so", "--draw", "OUT", "--draw-threshold", "-1"],
    ],
)
def test_infer_takes_its_options_in_any_order(infer, tmp_path, image, options):
    write_ppm(tmp_path / "in.ppm", image)
    options = [str(tmp_path / "out.ppm") if o == "OUT" else o for o in options]
    proc = subprocess.run([str(infer), "e.plan", str(tmp_path / "in.ppm"), *options], capture_output=True, text=True)
    assert proc.returncode == 1 and NO_RUNTIME in proc.stderr, proc.stderr
    assert not (tmp_path / "out.ppm").exists(), "nothing is drawn without a run"


def test_infer_refuses_an_image_that_is_not_a_binary_ppm(infer, tmp_path):
    (tmp_path / "in.ppm").write_bytes(b"P3\n1 1\n255\n0 0 0\n")
    proc = subprocess.run(
        [str(infer), "e.plan", str(tmp_path / "in.ppm"), "--plugins", "p.so"], capture_output=True, text=True
    )
    assert proc.returncode == 1 and "is not a binary 8-bit PPM" in proc.stderr and NO_RUNTIME not in proc.stderr
