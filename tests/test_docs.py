"""The user documentation agrees with the code.

The flag tables of TRAINING.md (train) and INFERENCE.md (infer, export,
convert) list exactly the flags of `retinanet train/infer/export/convert --help`,
and every default they show is the one the code uses: the ModelConfig,
TrainConfig, InferOptions or ExportOptions field behind the flag, the demo
presets, or the argparse default where no dataclass holds one. No tracked file points outside the repository for its
design or at numbered tickets.

Table conventions (the docs say them in words too): the Default (and Demo)
cell's first `code span` is the value, e.g. `0.01`, `640 1024`, `on`;
without a code span the cell starts with `off`, `none` or `(required)`; any
other cell is a described default, listed in DESCRIBED below. A Demo cell that
is empty or `—` means the demo uses the normal default.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import subprocess

import pytest

from retinanet import config as config_module
from retinanet import distributed
from retinanet.cli import build_parser
from retinanet.config import ModelConfig, TrainConfig
from retinanet.export import ExportOptions

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (document, heading) of each command's flag table.
TABLES = {
    "train": ("TRAINING.md", "Flags"),
    "infer": ("INFERENCE.md", "Inference flags"),
    "export": ("INFERENCE.md", "Export flags"),
    "convert": ("INFERENCE.md", "Convert flags"),
}
# Defaults that are a rule rather than a value, and why.
DESCRIBED = {
    ("train", "--classes"): "the category count of --annotations",
    ("train", "--amp-dtype"): "bf16 where the GPU supports it (TrainConfig.amp_dtype 'auto')",
    ("convert", "--format"): "detected from the source's keys",
    ("convert", "--categories"): "the 80 COCO ids for an 80-class ODTK model; torchvision's labels are ids",
}


# --- reading the documents ----------------------------------------------------


def read(name: str) -> str:
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def split_row(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def tables_under(text: str, heading: str) -> list[list[dict[str, str]]]:
    """The tables between `heading` (any level) and the next heading, as lists of {column: cell}."""
    tables, current, inside, header = [], None, False, None
    for line in text.splitlines():
        m = re.match(r"#+\s+(.*)", line)
        if m:
            inside = m.group(1).strip() == heading
            current = header = None
            continue
        if not inside or not line.startswith("|"):
            current = header = None
            continue
        cells = split_row(line)
        if header is None:
            header, current = cells, []
            tables.append(current)
        elif not all(re.fullmatch(r":?-+:?", c) for c in cells):
            assert len(cells) == len(header), f"{heading}: row has {len(cells)} cells, header {len(header)}: {line}"
            current.append(dict(zip(header, cells)))
    return tables


def flag_table(command: str) -> list[dict[str, str]]:
    doc, heading = TABLES[command]
    tables = [t for t in tables_under(read(doc), heading) if t and "Flag" in t[0] and "Default" in t[0]]
    assert len(tables) == 1, f"{doc}: expected one flag table under the heading '{heading}', found {len(tables)}"
    return tables[0]


def code_spans(cell: str) -> list[str]:
    return re.findall(r"`([^`]*)`", cell)


def cell_value(cell: str):
    """The value a Default/Demo cell shows: its first code span, a leading off/on/none/(required),
    or None for a described default."""
    spans = code_spans(cell)
    if spans:
        return spans[0]
    word = cell.split(" ", 1)[0].rstrip(",;:").lower() if cell else ""
    return word if word in ("off", "on", "none", "(required)") else None


def number(token: str) -> float:
    """`0.01`, `1e-4`, or a power written as in the docs: `4·2^(1/3)`."""
    m = re.fullmatch(r"([0-9.e+-]+)·([0-9.]+)\^\((-?[0-9]+)/([0-9]+)\)", token)
    if m:
        a, b, p, q = m.groups()
        return float(a) * float(b) ** (int(p) / int(q))
    return float(token)


def same(shown: str, value) -> bool:
    """Does the documented text equal the code's value?"""
    if value is None:
        return shown in ("none", "off")
    if isinstance(value, bool):
        return shown == ("on" if value else "off")
    if isinstance(value, str):
        return shown == value
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    try:
        numbers = [number(t) for t in shown.split()]
    except ValueError:
        return False
    return len(numbers) == len(values) and all(math.isclose(a, float(b), rel_tol=1e-9) for a, b in zip(numbers, values))


# --- reading the code ---------------------------------------------------------


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def top_level_flags() -> dict[str, argparse.Action]:
    """Flags of `retinanet` itself (--debug): they go before the command, and every table lists them."""
    return {s: a for a in documented_actions(build_parser()) for s in a.option_strings}


def documented_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    skip = (argparse._HelpAction, argparse._SubParsersAction, argparse._VersionAction)
    return [a for a in parser._actions if not isinstance(a, skip)]


def names_of(action: argparse.Action) -> set[str]:
    return set(action.option_strings) or {(action.metavar or action.dest).upper()}


def field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def demo_presets() -> dict:
    """DEMO_MODEL and DEMO_TRAIN as {field: value}, whether dicts or dataclass instances."""
    out = {}
    for name, cls in (("DEMO_MODEL", ModelConfig), ("DEMO_TRAIN", TrainConfig)):
        preset = getattr(config_module, name)
        if dataclasses.is_dataclass(preset):
            base = field_defaults(cls)
            preset = {k: v for k, v in dataclasses.asdict(preset).items() if base.get(k) != v}
        out.update(preset)
    return out


def settings_classes(command: str) -> list[type]:
    """The dataclasses whose fields are the command's settings and hold their defaults."""
    if command == "train":
        from retinanet import train

        return [ModelConfig, TrainConfig] + ([train.DataPaths] if hasattr(train, "DataPaths") else [])
    if command == "export":
        return [ExportOptions]
    if command == "convert":  # no settings dataclass: the source decides the model's config
        return []
    from retinanet import infer

    return [infer.InferOptions] if hasattr(infer, "InferOptions") else []


# Flags whose dataclass field has another name.
FIELD_OF = {("export", "dynamic_batch_opts"): "batch_opts", ("export", "workspace"): "workspace_mib"}
# What an export flag that is off leaves ExportOptions.precision at.
PRECISION_FLAGS = {"full_precision": "fp32", "int8": "int8"}


def default_batch_per_gpu(monkeypatch) -> int:
    """The default --batch on a machine with one GPU: the per-GPU figure the docs show."""
    import torch

    from retinanet import distributed as where

    if not hasattr(where, "default_batch"):
        from retinanet.runtime import pytorch as where
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return where.default_batch()


def code_defaults(command: str, action: argparse.Action, monkeypatch) -> list[tuple[str, object]]:
    """Every place the code sets this flag's default: [(where, value)]. Empty: none does.

    A dataclass field left at None is "decided elsewhere": the model's resize for
    `infer --resize`, the GPU count for `--batch`, or nothing (the doc says none)."""
    found = []
    dest = action.dest
    field = FIELD_OF.get((command, dest), dest)
    for cls in settings_classes(command):
        value = field_defaults(cls).get(field)
        if value is not None:
            if command == "export" and field == "size" and len(value) == 2 and value[0] == value[1]:
                value = value[:1]  # --size N means N x N
            found.append((f"{cls.__name__}.{field}", value))
    if command == "infer" and dest in ("resize", "max_size"):  # the model's, which training takes from here
        found.append((f"ModelConfig.{dest}", field_defaults(ModelConfig)[dest]))
    if dest == "batch":
        found.append(("default_batch() with one GPU", default_batch_per_gpu(monkeypatch)))
    if dest == "dist_timeout":
        found.append(("distributed.DEFAULT_TIMEOUT_S", distributed.DEFAULT_TIMEOUT_S))
    if command == "export" and dest in PRECISION_FLAGS:
        precision = field_defaults(ExportOptions).get("precision")
        found.append(("ExportOptions.precision", precision == PRECISION_FLAGS[dest]))
    if action.default is not None and action.default is not argparse.SUPPRESS:
        found.append((f"argparse default of {(action.option_strings or [dest])[0]}", action.default))
    elif not found and action.const is True and action.nargs == 0:  # store_true, default None: off
        found.append(("store_true flag", False))
    return found


# --- the tests ----------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(TABLES))
def test_flag_table_lists_exactly_the_commands_flags(command):
    parser = subcommands()[command]
    actions = documented_actions(parser)
    expected = set().union(*(names_of(a) for a in actions)) | set(top_level_flags())
    shown = set()
    for row in flag_table(command):
        names = set(re.findall(r"--[a-z0-9][a-z0-9-]*", row["Flag"]))
        if not names:
            names = {s.split()[0] for s in code_spans(row["Flag"])}
        assert names, f"{command}: no flag named in row {row['Flag']!r}"
        assert not names & shown, f"{command}: {sorted(names & shown)} listed twice"
        shown |= names
    assert shown == expected, (
        f"{TABLES[command][0]} ({command}): missing from the table {sorted(expected - shown)}, "
        f"not flags of `retinanet {command}` {sorted(shown - expected)}"
    )


def rows_with_actions(command):
    parser = subcommands()[command]
    by_name = {n: a for a in documented_actions(parser) for n in names_of(a)}
    by_name.update(top_level_flags())
    for row in flag_table(command):
        names = re.findall(r"--[a-z0-9][a-z0-9-]*", row["Flag"]) or [s.split()[0] for s in code_spans(row["Flag"])]
        yield row, names[0], by_name.get(names[0])


@pytest.mark.parametrize("command", sorted(TABLES))
def test_flag_table_defaults_equal_the_code(command, monkeypatch):
    wrong, described = [], set()
    for row, name, action in rows_with_actions(command):
        if action is None:
            continue  # reported by the test above
        shown = cell_value(row["Default"])
        if shown is None:
            described.add((command, name))
            continue
        if shown == "(required)":
            if action.option_strings or not action.required:
                wrong.append(f"{name}: shown as required, but it is optional")
            continue
        sources = code_defaults(command, action, monkeypatch)
        if not sources:
            if shown not in ("none", "off"):
                wrong.append(f"{name}: shows {shown!r}, but no dataclass or argparse default sets one")
            continue
        for where, value in sources:
            if not same(shown, value):
                wrong.append(f"{name}: shows {shown!r}, {where} is {value!r}")
    assert not wrong, f"{TABLES[command][0]} ({command}) defaults:\n" + "\n".join(wrong)
    expected = {k for k in DESCRIBED if k[0] == command}
    assert described == expected, (
        f"{command}: defaults in words, not values: {sorted(described)}; DESCRIBED lists {sorted(expected)}"
    )


def test_train_table_demo_column_equals_the_demo_presets():
    presets, wrong = demo_presets(), []
    for row, name, action in rows_with_actions("train"):
        if action is None:
            continue
        cell = row["Demo"]
        if cell in ("", "—"):
            if action.dest in presets:
                wrong.append(f"{name}: the demo preset {presets[action.dest]!r} is not shown")
        elif action.dest not in presets:
            wrong.append(f"{name}: shows demo {cell!r}, but the demo has no preset for {action.dest}")
        elif not same(cell_value(cell) or "", presets[action.dest]):
            wrong.append(f"{name}: shows demo {cell!r}, the preset is {presets[action.dest]!r}")
    assert not wrong, "TRAINING.md flag table, Demo column:\n" + "\n".join(wrong)


def test_demo_presets_table_lists_every_preset():
    """The Quick start table: one row per preset, named by its flag or config field in the Setting cell."""
    presets = demo_presets()
    train = subcommands()["train"]
    dests = {s: a.dest for a in documented_actions(train) for s in a.option_strings}
    normal = {**field_defaults(ModelConfig), **field_defaults(TrainConfig)}
    tables = [t for t in tables_under(read("TRAINING.md"), "Quick start: the demo data") if t and "Demo" in t[0]]
    assert len(tables) == 1, "TRAINING.md: expected one demo presets table under 'Quick start: the demo data'"
    shown, wrong = set(), []
    for row in tables[0]:
        spans = code_spans(row["Setting"])
        if not spans:
            continue  # a setting without a flag or field of its own (say, the backbone's weights)
        key = dests.get(spans[0].split()[0], spans[0])
        shown.add(key)
        if key not in presets:
            wrong.append(f"{spans[0]}: not a demo preset")
            continue
        if not same(cell_value(row["Demo"]) or "", presets[key]):
            wrong.append(f"{spans[0]}: demo shows {row['Demo']!r}, the preset is {presets[key]!r}")
        if not same(cell_value(row["Normal default"]) or "", normal[key]):
            wrong.append(f"{spans[0]}: default shows {row['Normal default']!r}, the code's is {normal[key]!r}")
    missing = sorted(set(presets) - shown)
    assert not wrong and not missing, f"TRAINING.md demo presets table: {wrong}; presets not listed: {missing}"


# Pointers that only make sense outside the repository: the design brief, its
# section numbers, numbered tickets, or the folder beside the checkout. The
# brief's name is split so that a plain grep for it does not find this line.
OUTSIDE_POINTERS = re.compile(r"\bS" r"PEC\b|[Ii]ssues? [0-9#]|[Aa]cceptance [0-9]|\.\./shared")


def test_no_file_points_outside_the_repository():
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = []
    for path in filter(None, listed.decode().split("\0")):
        try:
            with open(os.path.join(ROOT, path), encoding="utf-8") as f:
                text = f.read()
        except (UnicodeDecodeError, FileNotFoundError, IsADirectoryError):
            continue  # binary, or deleted in the working tree
        for n, line in enumerate(text.splitlines(), 1):
            if OUTSIDE_POINTERS.search(line):
                hits.append(f"{path}:{n}: {line.strip()[:100]}")
    assert not hits, "say it here, or point at docs/design.md:\n" + "\n".join(hits)
