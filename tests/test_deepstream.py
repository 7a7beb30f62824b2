"""The DeepStream parser in extras/deepstream: its build and its results.

The library is built with its Makefile (-Wall -Wextra -Werror) against DeepStream's headers
(DEEPSTREAM_INCLUDE: the includes/ folder of NVIDIA/DeepStream), which include TensorRT's
(TENSORRT_INCLUDE) and CUDA's (CUDA_HOME, or the toolkit behind nvcc). tests/deepstream/harness.cpp
runs the parser on synthetic nvinfer layers; the cases are written here and the expected objects
computed here, in float32, from what the parser promises: slots with a class below the configured
count whose score reaches that class's threshold, boxes clipped to the network input, empty ones
dropped. No DeepStream runtime is involved: DeepStream is not installable on this project's machines.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "extras" / "deepstream"
HARNESS = ROOT / "tests" / "deepstream" / "harness.cpp"
LIBRARY = "libnvdsparsebbox_retinanet.so"
NO_HEADERS = "no DeepStream headers: set DEEPSTREAM_INCLUDE to the includes/ folder of NVIDIA/DeepStream"
FLOAT, HALF, INT32 = 0, 1, 3  # NvDsInferDataType


# --- finding the headers --------------------------------------------------------------------


def cuda_include() -> str | None:
    """CUDA_HOME's include folder, else the toolkit behind nvcc (a symlink, or a wrapper script
    whose exec line names the real nvcc), else /usr/local/cuda's."""
    homes = [os.environ.get("CUDA_HOME")]
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        homes.append(os.path.dirname(os.path.dirname(real)))
        try:
            text = Path(real).read_text(errors="replace")[:4096]
        except OSError:
            text = ""
        m = re.search(r"^\s*exec\s+(\S+/bin/nvcc)\b", text, re.M)
        if m:
            homes.append(os.path.dirname(os.path.dirname(m.group(1))))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h")):
            return os.path.join(home, "include")
    return None


def tensorrt_include() -> str | None:
    for folder in (os.environ.get("TENSORRT_INCLUDE"), "/usr/include/x86_64-linux-gnu", "/usr/local/tensorrt/include"):
        if folder and os.path.isfile(os.path.join(folder, "NvInfer.h")):
            return folder
    return None


@pytest.fixture(scope="module")
def headers() -> dict:
    ds = os.environ.get("DEEPSTREAM_INCLUDE")
    if not ds:
        pytest.skip(NO_HEADERS)
    impl = Path(ds) / "nvdsinfer_custom_impl.h"
    assert impl.is_file(), f"DEEPSTREAM_INCLUDE={ds} has no nvdsinfer_custom_impl.h"
    trt = tensorrt_include()
    if trt is None and "NvInfer.h" in impl.read_text(errors="replace"):
        pytest.skip("DeepStream's headers include NvInfer.h: set TENSORRT_INCLUDE to a TensorRT include folder")
    cuda = cuda_include()
    if cuda is None:
        pytest.skip("no CUDA headers (cuda_runtime_api.h): set CUDA_HOME to the CUDA toolkit")
    if shutil.which("make") is None or shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("needs make and a C++ compiler")
    return {"ds": ds, "trt": trt, "cuda": cuda}


def make(headers: dict, out_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [f"DEEPSTREAM_INCLUDE={headers['ds']}", f"CUDA_HOME={Path(headers['cuda']).parent}", f"OUT_DIR={out_dir}"]
    if headers["trt"]:
        args.append(f"TENSORRT_INCLUDE={headers['trt']}")
    proc = subprocess.run(["make", "-B", "-C", str(DS_DIR), *args, *extra], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def built(headers, tmp_path_factory) -> dict:
    """The library through its Makefile, and the harness compiled with the parser's source under
    the same warnings."""
    out = tmp_path_factory.mktemp("deepstream")
    make(headers, out)
    harness = out / "deepstream_harness"
    includes = ["-isystem", headers["ds"], "-isystem", headers["cuda"]]
    includes += ["-isystem", headers["trt"]] if headers["trt"] else []
    cmd = [os.environ.get("CXX", "g++"), "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-I", str(DS_DIR)]
    cmd += includes + [str(HARNESS), str(DS_DIR / "nvdsparsebbox_retinanet.cpp"), "-o", str(harness)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {"library": out / LIBRARY, "harness": harness}


# --- cases and the expected results -------------------------------------------------------


def f32(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float32)


def hexes(values) -> list[str]:
    return [float(v).hex() for v in np.asarray(values, dtype=np.float32).ravel()]


def layer(name, dtype, dims, values=None) -> dict:
    """An nvinfer layer: values None is a null buffer."""
    return {"name": name, "dtype": dtype, "dims": list(dims), "values": values}


def outputs(scores, boxes, classes, batch_axis=False) -> list[dict]:
    """The three outputs of one frame as nvinfer passes them ([D], [D, 4], [D]; with batch_axis a
    leading 1, which the parser must read the same way)."""
    d = len(scores)
    lead = [1] if batch_axis else []
    return [
        layer("scores", FLOAT, lead + [d], f32(scores)),
        layer("boxes", FLOAT, lead + [d, 4], f32(boxes).reshape(d, 4)),
        layer("classes", INT32, lead + [d], np.asarray(classes, dtype=np.int32)),
    ]


def parse_case(name, layers, thresholds, num_classes=None, network=(640, 384)) -> dict:
    return {
        "name": name,
        "kind": "parse",
        "network": network,
        "thresholds": f32(thresholds),
        "num_classes": len(thresholds) if num_classes is None else num_classes,
        "layers": layers,
    }


def expected_objects(case) -> list[tuple]:
    """What the parser promises, computed from the case in float32."""
    by_name = {lay["name"]: lay for lay in case["layers"]}
    scores = by_name["scores"]["values"].ravel()
    boxes = by_name["boxes"]["values"].reshape(-1, 4)
    classes = by_name["classes"]["values"].ravel()
    thresholds = case["thresholds"]
    known = min(case["num_classes"], len(thresholds))
    width, height = np.float32(case["network"][0]), np.float32(case["network"][1])

    def clip(v, limit):
        return v if 0 < v <= limit else (limit if v > limit else np.float32(0))

    out = []
    for score, box, c in zip(scores, boxes, classes):
        if c < 0 or c >= known or not score >= thresholds[c]:
            continue
        left, top = clip(box[0], width), clip(box[1], height)
        right, bottom = clip(box[2], width), clip(box[3], height)
        if right > left and bottom > top:
            out.append((int(c), left, top, np.float32(right - left), np.float32(bottom - top), score))
    return out


def write_cases(cases) -> str:
    lines = []
    for case in cases:
        lines.append(f"case {case['name']} {case['kind']}")
        lines.append("network {} {} 3".format(*case["network"]))
        if case["kind"] == "parse":
            lines.append(
                f"params {case['num_classes']} {len(case['thresholds'])} {' '.join(hexes(case['thresholds']))}"
            )
        else:
            lines.append(f"maxbatch {case['max_batch']}")
        for lay in case["layers"]:
            head = f"layer {lay['name'] or '-'} {lay['dtype']} {len(lay['dims'])} {' '.join(map(str, lay['dims']))}"
            values = lay["values"]
            if values is None:
                lines.append(head + " null")
            elif lay["dtype"] == INT32:
                lines.append(head + f" {values.size} " + " ".join(str(int(v)) for v in values.ravel()))
            else:
                lines.append(head + f" {values.size} " + " ".join(hexes(values)))
        lines.append("end")
    return "\n".join(lines) + "\n"


def run_harness(built, cases) -> tuple[dict, str]:
    proc = subprocess.run([str(built["harness"])], input=write_cases(cases), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results, current = {}, None
    for line in proc.stdout.splitlines():
        word, _, rest = line.partition(" ")
        if word == "case":
            name, ok = rest.split()
            current = results[name] = {"ok": ok == "true", "error": None, "objects": [], "buffers": {}}
        elif word == "error":
            current["error"] = rest
        elif word == "object":
            c, *values = rest.split()
            current["objects"].append((int(c), *(np.float32(float.fromhex(v)) for v in values)))
        elif word == "buffer":
            name, *values = rest.split()
            current["buffers"][name] = [int(v) for v in values]
        else:
            raise AssertionError(f"harness printed {line!r}")
    assert sorted(results) == sorted(c["name"] for c in cases)
    return results, proc.stderr


def random_slots(rng, d, classes, extent=(640, 384), spill=40):
    """d random slots: boxes around the network input, some reaching past it; classes from -1 to
    `classes` + 1 (so some lie beyond the configured count); scores in [0, 1)."""
    w, h = extent
    x1 = rng.uniform(-spill, w + spill, d)
    y1 = rng.uniform(-spill, h + spill, d)
    boxes = np.stack([x1, y1, x1 + rng.uniform(-5, 200, d), y1 + rng.uniform(-5, 200, d)], 1)
    return f32(rng.random(d)), f32(boxes), rng.integers(-1, classes + 2, d).astype(np.int32)


def accepted_cases() -> list[dict]:
    """Cases the parser takes: the objects must equal expected_objects, all of them, in order."""
    rng = np.random.default_rng(0)
    cases = []

    # Hand-made slots: kept, below its class's threshold, unused (-1), another class.
    scores = [0.9, 0.2, 0.0, 0.75, 0.31, 0.29, 0.0, 0.5]
    boxes = [
        [10, 20, 110, 220],
        [5, 5, 50, 50],
        [0, 0, 0, 0],
        [300.25, 100.5, 330.75, 140.125],
        [1, 2, 3, 4],
        [1, 2, 3, 4],
        [0, 0, 0, 0],
        [600, 350, 640, 384],
    ]
    classes = [0, 0, -1, 2, 1, 1, -1, 0]
    thresholds = [0.5, 0.3, 0.7]
    basic = outputs(scores, boxes, classes)
    cases.append(parse_case("basic", basic, thresholds))
    # The same outputs in every order, with an unrelated output and an unnamed one among them.
    extra = [layer("extra", FLOAT, [3], f32([1, 2, 3])), layer(None, INT32, [1], np.array([7], np.int32))]
    for i, order in enumerate([(2, 1, 0), (1, 2, 0), (0, 2, 1)]):
        cases.append(parse_case(f"order_{i}", [basic[j] for j in order], thresholds))
    cases.append(parse_case("order_with_extra_layers", [extra[0], basic[1], extra[1], basic[2], basic[0]], thresholds))
    cases.append(parse_case("batch_axis", outputs(scores, boxes, classes, batch_axis=True), thresholds))

    # Scores at, just below and just above each class's threshold; a threshold of 0 keeps score 0.
    thresholds = f32([0.5, 0.25, 0.0])
    s, c = [], []
    for k, t in enumerate(thresholds):
        s += [t, np.nextafter(t, np.float32(-1)), np.nextafter(t, np.float32(2))]
        c += [k, k, k]
    s += [math.nan, math.inf]
    c += [0, 1]
    edge_boxes = [[10 * i, 10, 10 * i + 5, 30] for i in range(len(s))]
    cases.append(parse_case("threshold_edges", outputs(s, edge_boxes, c), thresholds))

    # Empty outputs: every slot unused, D = 100 and 300.
    for d in (100, 300):
        cases.append(parse_case(f"empty_{d}", outputs(np.zeros(d), np.zeros((d, 4)), -np.ones(d)), [0.0, 0.1]))
    # Full outputs: every slot a detection inside the input, all kept.
    for d in (100, 300):
        x = rng.uniform(0, 500, (d, 2))
        full_boxes = np.concatenate([x, x + rng.uniform(1, 100, (d, 2))], 1) * [1, 0.6, 1, 0.6]
        full = outputs(rng.uniform(0.05, 1, d), full_boxes, rng.integers(0, 80, d))
        cases.append(parse_case(f"full_{d}", full, np.full(80, 0.05)))
    # Random slots: boxes across the edges, classes beyond the configured count, random thresholds.
    for d, k in ((100, 3), (300, 80)):
        cases.append(parse_case(f"random_{d}", outputs(*random_slots(rng, d, k)), rng.uniform(0, 0.6, k)))

    # Clipping to the network input (640 x 384): across each edge, wholly outside (dropped),
    # zero-sized and inverted (dropped), a NaN corner (clipped to 0).
    clip_boxes = [
        [-20, -10, 50, 60],
        [600, 350, 700, 400],
        [-50, 100, 700, 120],
        [650, 10, 700, 20],
        [10, 390, 20, 400],
        [-30, -30, -1, -1],
        [100, 100, 100, 150],
        [200, 200, 150, 250],
        [math.nan, 50, 60, 70],
        [639.5, 383.5, 640.5, 384.5],
    ]
    n = len(clip_boxes)
    cases.append(parse_case("clipping", outputs(np.full(n, 0.9), clip_boxes, np.zeros(n)), [0.5]))
    cases.append(
        parse_case("clipping_small_input", outputs(np.full(n, 0.9), clip_boxes, np.zeros(n)), [0.5], network=(64, 32))
    )

    # Classes beyond the configured count, or without a threshold, are skipped.
    few = outputs(np.full(4, 0.9), [[1, 1, 9, 9]] * 4, [0, 1, 2, 3])
    cases.append(parse_case("fewer_configured_classes", few, [0.5, 0.5, 0.5, 0.5], num_classes=2))
    cases.append(parse_case("fewer_thresholds", few, [0.5], num_classes=4))
    return cases


def refused_cases() -> list[tuple[dict, str]]:
    """Cases the parser refuses: (case, the layer its one-line error must name)."""
    d = 5
    scores, boxes, classes = outputs(np.full(d, 0.9), [[1, 1, 9, 9]] * d, np.zeros(d))
    cases = []
    for missing in (scores, boxes, classes):
        rest = [lay for lay in (scores, boxes, classes) if lay is not missing]
        cases.append((parse_case(f"missing_{missing['name']}", rest, [0.5]), missing["name"]))
    wrong = {
        "scores_half": (dict(scores, dtype=HALF), boxes, classes),
        "boxes_int32": (scores, dict(boxes, dtype=INT32, values=np.ones((d, 4), np.int32)), classes),
        "classes_float": (scores, boxes, dict(classes, dtype=FLOAT, values=f32(np.zeros(d)))),
        "classes_other_d": (scores, boxes, dict(classes, dims=[d - 1], values=classes["values"][:-1])),
        "boxes_5_wide": (scores, dict(boxes, dims=[d, 5], values=f32(np.ones((d, 5)))), classes),
        "boxes_other_d": (scores, dict(boxes, dims=[d + 1, 4], values=f32(np.ones((d + 1, 4)))), classes),
        "scores_no_dims": (dict(scores, dims=[], values=f32([0.9])), boxes, classes),
        "boxes_null_buffer": (scores, dict(boxes, values=None), classes),
    }
    for name, layers in wrong.items():
        cases.append((parse_case(name, list(layers), [0.5]), name.split("_")[0]))
    return cases


def inputs_case(name, layers, max_batch=4, network=(1344, 768)) -> dict:
    return {"name": name, "kind": "inputs", "network": network, "max_batch": max_batch, "layers": layers}


# --- the tests ------------------------------------------------------------------------------


def test_library_builds_and_exports_its_entry_points(built):
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(built["library"])], capture_output=True, text=True)
    assert symbols.returncode == 0, symbols.stderr
    exported = {line.split()[-1] for line in symbols.stdout.splitlines() if " T " in line}
    assert {"NvDsInferParseRetinaNet", "NvDsInferInitializeInputLayers"} <= exported


def test_plugin_library_is_linked_when_given(headers, tmp_path):
    """RETINANET_PLUGINS makes the parser depend on the plugin library, so that nvinfer's dlopen of
    the parser loads it (and its static registration runs); a stand-in library is enough here."""
    if shutil.which("readelf") is None or shutil.which("cc") is None:
        pytest.skip("needs readelf and cc")
    stand_in = tmp_path / "plugins" / "libretinanet_plugins.so"
    stand_in.parent.mkdir()
    source = tmp_path / "stand_in.c"
    source.write_text("int retinanet_stand_in(void) { return 1; }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(stand_in), str(source)], check=True)
    make(headers, tmp_path, f"RETINANET_PLUGINS={stand_in}")
    dynamic = subprocess.run(["readelf", "-d", str(tmp_path / LIBRARY)], capture_output=True, text=True).stdout
    assert re.search(r"\(NEEDED\).*\[[^\]]*libretinanet_plugins\.so\]", dynamic), dynamic
    assert re.search(r"\((RUNPATH|RPATH)\).*" + re.escape(str(stand_in.parent)), dynamic), dynamic


def test_parsed_objects_equal_the_expected_ones(built):
    cases = accepted_cases()
    results, stderr = run_harness(built, cases)
    assert stderr == ""
    for case in cases:
        got = results[case["name"]]
        assert got["ok"], f"{case['name']}: {got['error']}"
        want = expected_objects(case)
        assert len(got["objects"]) == len(want), f"{case['name']}: {len(got['objects'])} objects, expected {len(want)}"
        for i, (g, w) in enumerate(zip(got["objects"], want)):
            assert g == w, f"{case['name']} object {i}: got {g}, expected {w}"


def test_cases_cover_what_they_claim():
    """The expectations are not vacuous: the full outputs keep every slot, the empty ones none, and
    the edge cases keep exactly the slots at or above their threshold."""
    by_name = {c["name"]: c for c in accepted_cases()}
    assert len(expected_objects(by_name["full_100"])) == 100 and len(expected_objects(by_name["full_300"])) == 300
    assert expected_objects(by_name["empty_300"]) == []
    kept = [(o[0], float(o[5])) for o in expected_objects(by_name["threshold_edges"])]
    assert len(kept) == 7 and (0, 0.5) in kept and (2, 0.0) in kept and (1, math.inf) in kept
    assert [o[0] for o in expected_objects(by_name["fewer_configured_classes"])] == [0, 1]
    clipped = expected_objects(by_name["clipping"])
    assert len(clipped) == 5 and clipped[0][1:5] == (0, 0, 50, 60) and clipped[1][1:5] == (600, 350, 40, 34)
    assert all(len(expected_objects(by_name[f"random_{d}"])) > 0 for d in (100, 300))


def test_refused_outputs_return_false_with_one_line(built):
    cases = refused_cases()
    results, stderr = run_harness(built, [case for case, _ in cases])
    lines = stderr.splitlines()
    assert len(lines) == len(cases), stderr
    for (case, layer_name), line in zip(cases, lines):
        got = results[case["name"]]
        assert not got["ok"] and got["objects"] == [], case["name"]
        assert f'"{layer_name}"' in got["error"], f"{case['name']}: {got['error']}"
        assert line == f"NvDsInferParseRetinaNet: {got['error']}"


def test_image_sizes_input_holds_the_network_size(built):
    """Models with a second input get (height, width) of the network input in every batch slot;
    any other extra input, or a malformed image_sizes, is refused and left as it was."""
    cases = [
        inputs_case("image_sizes", [layer("image_sizes", INT32, [2], np.zeros(8, np.int32))]),
        inputs_case("no_extra_inputs", []),
        inputs_case("image_sizes_float", [layer("image_sizes", FLOAT, [2], f32(np.zeros(8)))]),
        inputs_case("image_sizes_3", [layer("image_sizes", INT32, [3], np.zeros(12, np.int32))]),
        inputs_case("other_input", [layer("scale", INT32, [2], np.zeros(8, np.int32))]),
    ]
    results, stderr = run_harness(built, cases)
    assert results["image_sizes"]["ok"] and results["image_sizes"]["buffers"] == {"image_sizes": [768, 1344] * 4}
    assert results["no_extra_inputs"]["ok"] and results["no_extra_inputs"]["buffers"] == {}
    assert not results["image_sizes_3"]["ok"] and results["image_sizes_3"]["buffers"] == {"image_sizes": [0] * 12}
    assert not results["other_input"]["ok"] and results["other_input"]["buffers"] == {"scale": [0] * 8}
    assert not results["image_sizes_float"]["ok"]
    lines = stderr.splitlines()
    assert len(lines) == 3 and all(line.startswith("NvDsInferInitializeInputLayers: ") for line in lines), stderr


# --- the files beside the parser ----------------------------------------------------------


def key_file(path: Path) -> dict[str, dict[str, str]]:
    """A GLib key file as {group: {key: value}}. GLib has no inline comments: a '#' after a value
    would be part of it, so none may appear there."""
    groups, current = {}, None
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = groups.setdefault(line.strip("[]"), {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None and "#" not in value, f"{path.name}:{n}: {line}"
        current[key.strip()] = value.strip()
    return groups


def test_configs_match_the_parser_and_the_export():
    infer = key_file(DS_DIR / "config_infer_primary_retinanet.txt")
    prop = infer["property"]
    source = (DS_DIR / "nvdsparsebbox_retinanet.cpp").read_text()
    assert f'extern "C" bool {prop["parse-bbox-func-name"]}(' in source
    assert prop["custom-lib-path"] == LIBRARY and LIBRARY in (DS_DIR / "Makefile").read_text()
    assert prop["output-blob-names"] == "scores;boxes;classes"
    expected = {
        "network-type": "0",
        "cluster-mode": "4",
        "net-scale-factor": "1.0",
        "model-color-format": "0",
        "maintain-aspect-ratio": "1",
        "symmetric-padding": "0",
        "crop-objects-to-roi-boundary": "1",
    }
    assert {k: prop.get(k) for k in expected} == expected
    assert "offsets" not in prop, "the model normalises itself"
    # infer-dims is the fixed size of the export the README's command writes.
    c, h, w = (int(v) for v in prop["infer-dims"].split(";"))
    assert c == 3 and h % 32 == 0 and w % 32 == 0
    readme = (DS_DIR / "README.md").read_text()
    assert f"--size {h} {w}" in readme and f"infer-dims={c};{h};{w}" in readme
    assert "pre-cluster-threshold" in infer["class-attrs-all"]

    app = key_file(DS_DIR / "deepstream_app_config.txt")
    assert (DS_DIR / app["primary-gie"]["config-file"]).is_file()
    assert app["primary-gie"]["batch-size"] == prop["batch-size"] == app["streammux"]["batch-size"]
    assert app["sink0"]["type"] == "3" and app["osd"]["enable"] == "1" and app["source0"]["uri"].startswith("file://")


def test_labels_file_from_export_metadata(tmp_path):
    """labels.py writes one non-empty line per class index, names where the metadata has them
    (';' and line breaks would split or shift nvinfer's labels), ids otherwise."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    def export(path, **props):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        )
        model = helper.make_model(graph)
        for key, value in props.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = f"retinanet.{key}", value
        onnx.save(model, str(path))
        return path

    def run(model):
        out = tmp_path / "labels.txt"
        proc = subprocess.run(
            [sys.executable, str(DS_DIR / "labels.py"), str(model), str(out)], capture_output=True, text=True
        )
        return proc, out

    named = export(
        tmp_path / "named.onnx", category_ids="[1, 3, 7, 9]", category_names='["person", "a;b", "  ", "x\\ny"]'
    )
    proc, out = run(named)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "person\na,b\n7\nx y\n" and "num-detected-classes=4" in proc.stdout

    proc, out = run(export(tmp_path / "ids.onnx", category_ids="[1, 2, 90]"))
    assert proc.returncode == 0 and out.read_text() == "1\n2\n90\n"
    proc, out = run(export(tmp_path / "bad_names.onnx", category_ids="[5, 6]", category_names='["one"]'))
    assert proc.returncode == 0 and out.read_text() == "5\n6\n"

    proc, _ = run(export(tmp_path / "other.onnx", producer="x"))
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1 and "category_ids" in proc.stderr
