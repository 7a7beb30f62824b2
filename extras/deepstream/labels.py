"""Write nvinfer's labels file for a retinanet ONNX export, and print its class count.

    python extras/deepstream/labels.py model.onnx extras/deepstream/labels.txt

Line i of the file names class index i, the value of the `classes` output: the category name
where the export's metadata has names (`retinanet.category_names`), else the category id
(`retinanet.category_ids`). nvinfer skips empty lines and splits a line at ';' (several labels
per line, for classifiers), either of which would shift or cut the labels: names are kept on one
line, ';' becomes ',' and a blank name becomes its id. Needs only the onnx package.
"""

from __future__ import annotations

import argparse
import json
import sys


def labels(props: dict[str, str]) -> list[str]:
    """One label per class index from an export's metadata_props; KeyError without category ids."""
    ids = json.loads(props["retinanet.category_ids"])
    try:
        names = json.loads(props.get("retinanet.category_names", "null"))
    except ValueError:
        names = None
    if not isinstance(names, list) or len(names) != len(ids):
        names = ids
    return [" ".join(str(name).replace(";", ",").split()) or str(i) for name, i in zip(names, ids)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a retinanet ONNX export (the .onnx beside an engine will do)")
    parser.add_argument("output", help="the labels file to write (labelfile-path)")
    args = parser.parse_args(argv)

    import onnx

    model = onnx.load(args.model, load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    try:
        names = labels(props)
    except (KeyError, ValueError, TypeError):
        print(
            f"labels: {args.model}: no readable retinanet.category_ids metadata (not a retinanet export?)",
            file=sys.stderr,
        )
        return 2
    with open(args.output, "w", encoding="utf-8") as f:
        f.write("".join(name + "\n" for name in names))
    print(f"wrote {len(names)} labels to {args.output}: set num-detected-classes={len(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
