"""The pydantic schema: the single source of truth for every catalog file."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pydantic import BaseModel

    from pefref.language.schema.composition import (
        AverageBlock,
        Block,
        Composition,
        FusionBlock,
        InteractionRules,
        ParallelBlock,
        StackBlock,
        TechniqueUse,
    )
    from pefref.language.schema.experiment import Experiment
    from pefref.language.schema.interop import ExpertFolders, InteropTable, PeftMethod, PeftModuleMap

from pefref.language.schema.family import (
    ArchitectureMap,
    ForwardSpec,
    ModelClass,
    ModelShape,
    ModelShapes,
    SiteBinding,
    SliceSpec,
    Stack,
    VersionedOutput,
    VersionedPath,
    VersionRange,
    installed_transformers,
    version_tuple,
)
from pefref.language.schema.reference import ReferenceArchitecture, Site, SiteKind, SiteSelector, SizeSpec
from pefref.language.schema.technique import (
    FORMS,
    TYPOLOGY_PROPERTIES,
    BoolParam,
    ChoiceParam,
    Connection,
    FloatParam,
    IntParam,
    IntsParam,
    LayerRange,
    Module,
    ModuleUse,
    Paper,
    ParallelModule,
    ParamSpec,
    PrependModule,
    ReparameteriseModule,
    RescaleModule,
    SelectModule,
    SequentialModule,
    Technique,
)

__all__ = [
    "Experiment",
    "ArchitectureMap", "ForwardSpec", "ModelClass", "ModelShape", "ModelShapes", "SiteBinding", "SliceSpec", "Stack", "VersionRange", "VersionedOutput", "VersionedPath", "version_tuple", "installed_transformers",
    "ReferenceArchitecture", "Site", "SiteKind", "SiteSelector", "SizeSpec", "FORMS", "TYPOLOGY_PROPERTIES",
    "BoolParam", "ChoiceParam", "FloatParam", "IntParam", "IntsParam", "LayerRange", "Module", "ModuleUse", "Paper",
    "Connection", "ParallelModule", "ParamSpec", "PrependModule", "ReparameteriseModule", "RescaleModule",
    "SelectModule", "SequentialModule", "Technique", "SCHEMAS", "InteropTable", "PeftMethod", "PeftModuleMap", "ExpertFolders",
    "AverageBlock", "Block", "Composition", "FusionBlock", "InteractionRules", "ParallelBlock", "StackBlock", "TechniqueUse",
]

_LAZY = {
    **dict.fromkeys(("AverageBlock", "Block", "Composition", "FusionBlock", "InteractionRules", "ParallelBlock", "StackBlock", "TechniqueUse"), "composition"),
    "Experiment": "experiment",
    **dict.fromkeys(("InteropTable", "PeftMethod", "PeftModuleMap", "ExpertFolders"), "interop"),
}
"""Models imported on first use: applying a technique builds no composition, experiment or interop model."""


def _schemas() -> dict[str, type[BaseModel]]:
    """Each generated JSON Schema file (schemas/<key>.schema.json) and its model."""
    return {
        "technique": Technique,
        "reference": ReferenceArchitecture,
        "family": ArchitectureMap,
        "models": ModelShapes,
        "composition": __getattr__("Composition"),
        "interactions": __getattr__("InteractionRules"),
        "interop": __getattr__("InteropTable"),
        "experiment": __getattr__("Experiment"),
    }


def __getattr__(name: str) -> Any:
    if name == "SCHEMAS":
        value: Any = _schemas()
    elif name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value
