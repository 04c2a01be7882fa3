"""Which catalog schema a YAML file follows, read from its top-level keys, and its checks.

``pefref validate FILE`` checks architecture maps, model-shape files, the
reference architecture, the interop table and experiment files with their own
schemas (and the cross-checks the catalog and ``pefref run`` make), not as
techniques.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from pefref.language.catalog import Catalog
from pefref.language.check import check_family
from pefref.language.errors import CatalogError, Problem
from pefref.language.loader import load_file, suggest
from pefref.language.schema import ArchitectureMap, ModelShapes, ReferenceArchitecture
from pefref.language.slices import slice_problems
from pefref.language.yamlsrc import Positions, parse_yaml

__all__ = ["file_kind", "kind_of_keys", "check_other_file", "KIND_KEYS", "KIND_EXCLUDES"]

KIND_KEYS: dict[str, tuple[str, ...]] = {
    "family": ("family", "sites", "layers"),
    "models": ("shapes",),
    "reference": ("site_kinds", "sites"),
    "interop": ("peft_version", "methods"),
    "experiment": ("model", "task", "data", "grid"),
    "composition": ("techniques",),
}
"""Top-level keys that together mark a file of each kind (other files are techniques)."""

KIND_EXCLUDES: dict[str, tuple[str, ...]] = {"composition": ("modules",)}
"""Top-level keys a file of the kind never has (a technique's ``modules``)."""


def file_kind(path: Path) -> str | None:
    """'family', 'models', 'reference', 'interop', 'experiment' or 'composition' by the file's top-level keys; None otherwise
    (a technique, or unreadable)."""
    try:  # the bounded reader: deep nesting and huge integers are the loader's located problems, not crashes here
        data, _pos = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, CatalogError, ValueError, RecursionError):
        return None
    if not isinstance(data, dict):
        return None
    return kind_of_keys(data)


def kind_of_keys(data: object) -> str | None:
    """The kind of a file whose top-level mapping is ``data`` (:data:`KIND_KEYS`), or None (a technique or not a catalog file)."""
    if not isinstance(data, dict):
        return None
    for kind, keys in KIND_KEYS.items():
        if all(k in data for k in keys) and not any(k in data for k in KIND_EXCLUDES.get(kind, ())):
            return kind
    return None


def check_other_file(path: Path, kind: str, base: Catalog) -> tuple[list[Problem], dict[str, Any]]:
    """Every problem of a map, model-shape, reference, interop or experiment file, and what it holds (for the report)."""
    from pefref.language.experiment_file import load_experiment  # the experiment and interop schemas: loaded when a file needs them
    from pefref.language.schema import InteropTable

    if kind == "experiment":  # the checks `pefref run` makes before training (schema, files, grid references)
        try:
            exp, _pos = load_experiment(path)
        except CatalogError as e:
            return list(e.problems), {}
        return [], {"experiments": [exp.id]}
    model: type[Any] = {"family": ArchitectureMap, "models": ModelShapes, "reference": ReferenceArchitecture, "interop": InteropTable}[kind]
    try:
        obj, pos = load_file(model, path)
    except CatalogError as e:
        return list(e.problems), {}
    if kind == "family":
        problems = check_family(obj, pos, base.reference)
        if not problems:  # its slices on the catalog's shapes of the family it names
            problems = slice_problems(obj, pos, base.reference, {s.name: s.config for s in base.shapes.values() if s.family == obj.family})
        return problems, {"families": [obj.family]}
    if kind == "models":
        problems = []
        for i, s in enumerate(obj.shapes):
            if s.family not in base.families:
                problems.append(Problem(pos.at(("shapes", i, "family")), f"shapes[{i}].family", f"unknown family {s.family!r}{suggest(s.family, base.families)}"))
            else:  # the family's slices on this shape's sizes (located in the family's map)
                fam = base.families[s.family]
                fam_pos = base.family_positions.get(s.family, Positions(f"<family {s.family}>"))
                problems += slice_problems(fam, fam_pos, base.reference, {s.name: s.config})
        return problems, {"models": [s.name for s in obj.shapes]}
    if kind == "interop":
        problems = []
        for i, m in enumerate(obj.methods):
            if m.technique not in base.techniques:
                problems.append(Problem(pos.at(("methods", i, "technique")), f"methods[{i}].technique", f"unknown technique {m.technique!r}{suggest(m.technique, base.techniques)}"))
        return problems, {"interop": [m.technique for m in obj.methods]}
    return [], {"reference": [obj.name]}
