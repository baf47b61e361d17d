"""One parameter path for notebooks run by the pipeline, by papermill by hand, or in Jupyter.

A notebook's first code cell calls `notebook_config(section, globals())`. It checks the
preset, the seed and the device at once, finds the names papermill injected (the cell that
papermill tags `injected-parameters` starts with `# Parameters`) and refuses any that the
notebook does not know, then resolves the notebook's preset section with the overrides, the
values' types and ranges checked. A
setting that is a group of values is overridden one value at a time: `-p NAME.key=VALUE` in
the pipeline, `-p NAME '{"key": VALUE}'` or `-y 'NAME: {key: VALUE}'` with papermill.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping
from typing import Any

from influence.study.presets import SECTIONS, check_preset, preset_block, resolve

STANDARD = ("preset", "device", "seed")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?|mps")
_INJECTED_HEADER = "# Parameters"


def check_device(device: Any) -> str:
    """`cpu`, `cuda`, `cuda:N` or `mps`, and available on this machine; else ValueError."""
    if not isinstance(device, str) or not _DEVICE.fullmatch(device):
        raise ValueError(f"unknown device {device!r}; valid devices: cpu, cuda, cuda:N, mps")
    import torch

    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but this machine has "
                f"{torch.cuda.device_count()} CUDA device(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise ValueError("device 'mps' asked for, but MPS is not available here")
    return device


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    return seed


def valid_names(section: str | None, preset: str) -> list[str]:
    """The parameters a notebook accepts: preset, device, seed and its preset section's."""
    names = list(STANDARD)
    if section is not None and section in SECTIONS:
        names += sorted(preset_block(section, preset))
    return names


def _assigned(source: str) -> list[str]:
    names: list[str] = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name)]
    return names


def injected_names(namespace: Mapping[str, Any]) -> tuple[list[str], list[str]]:
    """(names papermill injected into this kernel, names of the notebook's parameters cell).

    Papermill runs the parameters cell and then its injected cell, so in the kernel's input
    history the cell just before the injected one is the parameters cell. Both lists are empty
    in a notebook run by hand in Jupyter."""
    history = list(namespace.get("In", []) or [])
    injected: list[str] = []
    declared: list[str] = []
    for i, source in enumerate(history):
        if source.lstrip().startswith(_INJECTED_HEADER):
            injected += _assigned(source)
            if i > 0 and not declared:
                declared = _assigned(history[i - 1])
    return injected, declared


def split_dotted(values: Mapping[str, Any]) -> dict[str, Any]:
    """`{"a.b": 1, "a.c": 2, "d": 3}` -> `{"a": {"b": 1, "c": 2}, "d": 3}` (pipeline `-p`)."""
    out: dict[str, Any] = {}
    for name, value in values.items():
        head, *rest = name.split(".")
        if not rest:
            if isinstance(out.get(head), dict):
                raise ValueError(f"parameter {head!r} given both whole and as {head}.<key>")
            out[head] = value
            continue
        node = out.setdefault(head, {})
        if not isinstance(node, dict):
            raise ValueError(f"parameter {head!r} given both whole and as {name}")
        for key in rest[:-1]:
            node = node.setdefault(key, {})
        node[rest[-1]] = value
    return out


def notebook_config(section: str, namespace: Mapping[str, Any]) -> dict[str, Any]:
    """Check the notebook's standard parameters and injected names; return its settings.

    `namespace` is the notebook's `globals()`; `section` names its preset section (a notebook
    without one gets an empty dict and reads its parameters itself). Raises ValueError, in the
    notebook's first cell, for an unknown preset, device, seed or parameter name (listing the
    valid ones), a value of the wrong type, or a value outside its declared range
    (`presets.resolve`), naming the parameter.
    """
    preset = check_preset(namespace["preset"])
    check_device(namespace["device"])
    check_seed(namespace["seed"])
    injected, declared = injected_names(namespace)
    valid = valid_names(section, preset)
    valid += sorted(set(declared) - set(valid))
    unknown = sorted(set(injected) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for notebook {section}; valid parameters: "
            f"{', '.join(valid)}"
        )
    if section not in SECTIONS:
        return {}
    settings = preset_block(section, preset)
    return resolve(section, preset, **{k: namespace[k] for k in settings if k in namespace})
