"""Multiple-choice and classification tasks declared in YAML, without Python (like lm-eval task files).

Keys (``task``, ``prompt``, ``choices``, ``label`` and one of ``dataset`` / ``data_files`` are required)::

    task: sarcasm                      # registered name
    dataset: sarcasm                   # asset-cache dataset, or a hub id with requires_network: true
    data_files: {train: train.jsonl, validation: val.csv, test: test.parquet}
                                       # or local files (JSONL/JSON/CSV/Parquet, paths relative to this file)
    dataset_name: null                 # hub configuration
    requires_network: false
    source: "..."                      # provenance shown by `list tasks`
    split_map: {train: train, validation: validation, test: test}
    validation_from_train: 0           # hold out N (>= 1) or a fraction (< 1) of train as validation
    prompt: "Headline: {text}\\nSarcastic:"   # str.format over the example: {field}, {field[key]}
    choices: [no, yes]                 # fixed labels | a list field name | {fields: [sol1, sol2]}
    label: label                       # int field | {field: answerKey, lookup: choices.text} | {field: label, offset: -1}
    target_delimiter: " "
    answer_format: labels              # choices | labels
    metrics: [acc, acc_norm]
    selection_metric: acc
    report_metric: acc
    max_length: 512
    num_choices: 2                     # optional: fixed count for chance(); else read from the test split
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from tasks.llm.lm import ChoiceTask

_REQUIRED = ("task", "prompt", "choices", "label")
_OPTIONAL = {
    "dataset", "data_files", "family", "dataset_name", "requires_network", "source", "split_map", "validation_from_train",
    "target_delimiter", "answer_format", "metrics", "selection_metric", "report_metric", "max_length",
    "num_choices", "default_model", "description",
}
_KNOWN_METRICS = {"acc", "acc_norm"}


def _get(example: dict, path: str) -> Any:
    """``example["a"]["b"]`` for ``"a.b"``."""
    value: Any = example
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(f"field {path!r} not in example (fields: {sorted(example)})")
        value = value[part]
    return value


class YamlChoiceTask(ChoiceTask):
    """A ``ChoiceTask`` driven by a YAML spec (``spec`` is set on the generated subclass)."""

    spec: dict[str, Any] = {}

    def doc_to_text(self, example: dict) -> str:
        try:
            return self.spec["prompt"].format_map(example)
        except KeyError as err:
            raise KeyError(f"task {self.name!r}: prompt field {err} not in example (fields: {sorted(example)})") from None

    def doc_to_choices(self, example: dict) -> list[str]:
        spec = self.spec["choices"]
        if isinstance(spec, list):
            return [str(c) for c in spec]
        if isinstance(spec, str):
            return [str(c) for c in _get(example, spec)]
        return [str(_get(example, f)) for f in spec["fields"]]

    def doc_to_label(self, example: dict) -> int:
        spec = self.spec["label"]
        if isinstance(spec, str):
            spec = {"field": spec}
        value = _get(example, spec["field"])
        if "lookup" in spec:
            keys = [str(k).strip() for k in _get(example, spec["lookup"])]
            if str(value).strip() not in keys:
                raise ValueError(f"task {self.name!r}: label {value!r} not among {keys}")
            return keys.index(str(value).strip())
        offset = int(spec.get("offset", 0))
        index = int(value) + offset
        n = len(self.doc_to_choices(example))
        if not 0 <= index < n:
            shift = f" + offset {offset}" if offset else ""
            raise ValueError(
                f"task {self.name!r}: label field {spec['field']!r} = {value!r}{shift} gives choice {index}, "
                f"outside the {n} choices (0..{n - 1})"
            )
        return index

    def load_splits(self):  # noqa: ANN201 - datasets.DatasetDict
        """The splits, every label checked once: a bad label is a one-line error before any training."""
        first = self._splits is None
        splits = super().load_splits()
        if first:
            for split in splits.values():
                for example in split:
                    self.doc_to_label(example)
        return splits


def _fail(path: Path, msg: str) -> None:
    raise ValueError(f"{path}: {msg}")


def _data_files(path: Path, value: Any) -> dict[str, str] | None:
    """``data_files`` as ``{split: absolute path}``: a mapping of splits, paths relative to the YAML file."""
    if value is None:
        return None
    if not isinstance(value, dict) or not value or not all(isinstance(v, str) for v in value.values()):
        _fail(path, "data_files must map split names to files, e.g. {train: train.jsonl, test: test.jsonl}")
    out = {}
    for split, file in value.items():
        f = (path.parent / file).expanduser() if not Path(file).expanduser().is_absolute() else Path(file).expanduser()
        if Path(file).suffix not in (".jsonl", ".json", ".csv", ".parquet"):
            _fail(path, f"data_files.{split}: {file!r} is not a .jsonl, .json, .csv or .parquet file")
        if not f.is_file():
            _fail(path, f"data_files.{split}: {f} does not exist")
        out[str(split)] = str(f.resolve())
    return out


def task_class_from_yaml(path: str | Path) -> type[YamlChoiceTask]:
    """Validate the YAML task file at ``path`` and build its task class (not yet registered)."""
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        _fail(path, f"invalid YAML ({str(err).splitlines()[0]})")
    if not isinstance(spec, dict):
        _fail(path, "a task file must be a mapping of keys")
    # Unknown keys first: a typo ('promt') is the cause of the "missing 'prompt'" that would follow.
    known = sorted(set(_REQUIRED) | _OPTIONAL)
    unknown = sorted(set(map(str, spec)) - set(known))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        _fail(path, f"unknown key(s) {', '.join(hints)}; allowed: {known}")
    missing = [k for k in _REQUIRED if k not in spec]
    if "dataset" not in spec and "data_files" not in spec:
        missing.append("dataset (or data_files)")
    if missing:
        _fail(path, f"missing required key(s) {missing}")
    data_files = _data_files(path, spec.get("data_files"))
    if spec.get("family", "llm") != "llm":
        _fail(path, f"YAML tasks are language tasks (family: llm), got {spec['family']!r}")
    name = spec["task"]
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        _fail(path, f"task name {name!r} must be letters, digits, '_', '-' or '.'")
    if not isinstance(spec["prompt"], str):
        _fail(path, "prompt must be a string")
    choices = spec["choices"]
    ok_choices = (
        (isinstance(choices, list) and len(choices) >= 2)
        or isinstance(choices, str)
        or (isinstance(choices, dict) and set(choices) == {"fields"} and isinstance(choices["fields"], list))
    )
    if not ok_choices:
        _fail(path, "choices must be a list of >= 2 labels, a field name, or {fields: [...]}")
    label = spec["label"]
    if not (isinstance(label, str) or (isinstance(label, dict) and "field" in label
                                         and set(label) <= {"field", "lookup", "offset"})):
        _fail(path, "label must be a field name or {field: ..., lookup: ... | offset: ...}")
    if isinstance(label, dict) and not isinstance(label.get("offset", 0), int):
        _fail(path, f"label.offset must be an integer, got {label['offset']!r}")
    metrics = spec.get("metrics", ["acc", "acc_norm"])
    if not isinstance(metrics, list) or not metrics or set(metrics) - _KNOWN_METRICS:
        _fail(path, f"metrics must be a non-empty subset of {sorted(_KNOWN_METRICS)}, got {metrics!r}")
    for key in ("selection_metric", "report_metric"):
        if spec.get(key, "acc") not in metrics:
            _fail(path, f"{key} {spec.get(key, 'acc')!r} is not one of the task's metrics {metrics}")
    if spec.get("answer_format", "choices") not in ("choices", "labels"):
        _fail(path, "answer_format must be 'choices' or 'labels'")
    split_map = spec.get("split_map", ChoiceTask.split_map)
    if not isinstance(split_map, dict) or set(split_map) - {"train", "validation", "test"}:
        _fail(path, "split_map maps train/validation/test to the source's split names")

    attrs: dict[str, Any] = {
        "spec": spec,
        "_task_file": str(path.resolve()),
        "name": name,
        "dataset": str(spec.get("dataset", "local files")),
        "data_files": data_files,
        "dataset_name": spec.get("dataset_name"),
        "requires_network": bool(spec.get("requires_network", False)),
        "source": spec.get("source", f"YAML {path.name}"),
        "split_map": dict(split_map),
        "validation_from_train": float(spec.get("validation_from_train", 0)),
        "target_delimiter": spec.get("target_delimiter", " "),
        "answer_format": spec.get("answer_format", "choices"),
        "metrics": {m: True for m in metrics},
        "selection_metric": spec.get("selection_metric", "acc"),
        "report_metric": spec.get("report_metric", "acc"),
        "max_length": int(spec.get("max_length", ChoiceTask.max_length)),
        "num_choices": spec.get("num_choices", len(choices) if isinstance(choices, list) else None),
        "default_model": spec.get("default_model", ChoiceTask.default_model),
        "__doc__": spec.get("description", f"YAML task from {path}"),
        "__module__": __name__,
    }
    cls_name = "Yaml_" + re.sub(r"\W", "_", name)
    return type(cls_name, (YamlChoiceTask,), attrs)
