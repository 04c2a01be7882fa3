"""Architecture maps (how reference sites resolve in a model family) and named model shapes."""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Collection
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pefref.language.schema.common import SITE_PATTERN, ExprStr, Identifier, Strict

__all__ = ["SliceSpec", "RotarySpec", "VersionRange", "VersionedOutput", "VersionedPath", "version_tuple", "installed_transformers", "SiteBinding", "ForwardSpec", "ModelClass", "Stack", "ArchitectureMap", "ModelShape", "ModelShapes", "TASKS"]

TASKS = ("causal_lm", "seq2seq_lm", "masked_lm", "sequence_classification", "token_classification", "question_answering", "base")


class SliceSpec(Strict):
    """A slice of a fused projection's output features: one block (q inside GPT-2's c_attn), or one block per
    period when the fused sites are interleaved (q inside GPT-NeoX's query_key_value, whose features are
    [h0q, h0k, h0v, h1q, ...]: start 0, size d_head, period 3 * d_head)."""

    start: ExprStr = Field(description="First output feature of the block (in each period) (expression over sizes).")
    size: ExprStr = Field(description="Number of output features of the block (in each period) (expression over sizes).")
    period: ExprStr | None = Field(
        None, description=("The block repeats every `period` features (expression over sizes): the site owns features "
                           "j * period + start + [0, size) for every j, in that order; the module's width must be a "
                           "multiple of period and start + size at most period. Absent: one block."),
    )


class RotarySpec(Strict):
    """A site that is a projection's output after the rotary position embedding (Su et al. 2021,
    https://arxiv.org/abs/2104.09864): the projection (the binding's path) gives ``h``, and the module ``of``
    receives the embedding's ``(cos, sin)`` [batch, seq, d_head] as its argument ``argument``; the site's value
    is ``h`` per head of ``d_head`` features rotated as the family does (``half``: the two halves of a head
    are the pair, ``h cos + rotate_half(h) sin``)."""

    of: str = Field(description="Path of the module called with the rotary embedding ('{i}' = layer index), e.g. the layer's attention.")
    argument: str = Field(description="Name of that module's forward argument carrying (cos, sin) (by keyword, or by position through its signature).")
    style: Literal["half"] = Field("half", description="How a head's features pair up: 'half' (the first half with the second, as Llama's rotate_half).")


VERSION_PATTERN = r"^[0-9]+(\.[0-9]+)*$"
OutputForm = Literal["tensor", "first"]


def version_tuple(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string ('4.57.6' -> (4, 57, 6); '5.0.0.dev0' -> (5, 0, 0))."""
    m = re.match(r"[0-9]+(\.[0-9]+)*", version)
    return tuple(int(p) for p in m.group(0).split(".")) if m else ()


@functools.cache
def installed_transformers() -> tuple[int, ...] | None:
    """The installed transformers version's numbers (it chooses among a map's per-version forms and paths), or None."""
    try:
        return version_tuple(importlib.metadata.version("transformers"))
    except importlib.metadata.PackageNotFoundError:
        return None


class VersionRange(Strict):
    """A range of transformers versions: ``since`` inclusive, ``until`` exclusive (absent: unbounded)."""

    since: Annotated[str, Field(pattern=VERSION_PATTERN)] | None = Field(None, description="First transformers version of the range (absent: every earlier one).")
    until: Annotated[str, Field(pattern=VERSION_PATTERN)] | None = Field(None, description="First transformers version after the range (absent: every later one).")

    def holds(self, version: tuple[int, ...]) -> bool:
        return ((self.since is None or version >= version_tuple(self.since))
                and (self.until is None or version < version_tuple(self.until)))


class VersionedOutput(VersionRange):
    """What a module returns in a range of transformers versions."""

    form: OutputForm = Field(description="'tensor' or 'first' (a tuple whose first element is the hidden states).")


class VersionedPath(VersionRange):
    """A module's path in a range of transformers versions (a module renamed between them)."""

    path: str


class _PathJsonSchema:
    """The JSON Schema of a binding's ``path``: a string, null, or one path per version range. Built when a
    JSON Schema is asked for (``pefref schema``), not at import: generating it builds VersionedPath's validator."""

    def __get_pydantic_json_schema__(self, _core: Any, _handler: Any) -> dict[str, Any]:
        return {"anyOf": [{"type": "string"}, {"type": "null"}, {"type": "array", "minItems": 1, "items": VersionedPath.model_json_schema()}]}


class SiteBinding(Strict):
    """Where a reference site lives in a real model."""

    path: Annotated[str | None, _PathJsonSchema()] = Field(
        None, description=("Module path; '{i}' stands for the layer index. A module renamed between transformers versions: one "
                           "path per version range ([{path: embed_out, until: '5.0'}, {path: lm_head, since: '5.0'}]), the "
                           "installed version chooses when the map is read."))
    input_path: str | None = Field(None, description="Module whose input is the site's input x, when it differs from path (default: path).")
    side: Literal["module", "input"] = Field("module", description="'input': the site is the tensor entering the module (e.g. the FFN activation entering the down projection).")
    output: OutputForm | list[VersionedOutput] = Field(
        "tensor", description=("'first': the module returns a tuple whose first element is the hidden states. Where that changed "
                               "between transformers versions, one form per version range ([{form: first, until: '5.0'}, "
                               "{form: tensor, since: '5.0'}]): the installed version chooses."))
    slice: SliceSpec | None = Field(None, description="The site is a slice of the module's output features.")
    cache: bool = Field(False, description="The site is reached through the model's key/value cache argument (prefix keys and values).")
    rotary: RotarySpec | None = Field(None, description="The site is the module's output after the rotary position embedding (post-RoPE queries or keys).")
    parameter: str | None = Field(
        None, description=("The site is this raw parameter of the module at path, a stack of one [out, in] map per slice (the "
                           "experts of a mixture-of-experts layer): one update per slice, as peft's target_parameters."))
    layout: Literal["out_in", "in_out"] = Field(
        "out_in", description="How the parameter stores each slice: [slices, out, in] (used as x W[e]^T) or [slices, in, out].")
    bias: bool = Field(True, description="Whether the module has a bias (for analytic counts of selected biases).")

    @model_validator(mode="before")
    @classmethod
    def _versioned_path(cls, v: Any) -> Any:
        if not (isinstance(v, dict) and isinstance(v.get("path"), list)):
            return v
        paths = [VersionedPath.model_validate(p) for p in v["path"]]
        if not paths:
            raise ValueError("path: give at least one path")
        version = installed_transformers()
        chosen = paths[-1].path if version is None else next((p.path for p in paths if p.holds(version)), None)
        if chosen is None:
            raise ValueError(f"path: no path for the installed transformers {'.'.join(map(str, version or ()))} "
                             f"(the map gives {', '.join(p.model_dump_json(exclude_none=True) for p in paths)})")
        return {**v, "path": chosen}

    @model_validator(mode="after")
    def _where(self) -> SiteBinding:
        if not self.cache and not self.path:
            raise ValueError("give a path, or cache: true")
        if isinstance(self.output, list) and not self.output:
            raise ValueError("output: give at least one form")
        return self

    def output_form(self, version: tuple[int, ...] | None) -> OutputForm | None:
        """What the module returns with transformers ``version`` installed (None: not installed, the newest range's
        form), or None where no range of the map's covers it."""
        if isinstance(self.output, str):
            return self.output
        if version is None:
            return self.output[-1].form
        return next((o.form for o in self.output if o.holds(version)), None)


class ForwardSpec(Strict):
    """Names of the model's forward arguments, for sequence-level modules (prompts, prefixes)."""

    ids: str = "input_ids"
    embeds: str = "inputs_embeds"
    mask: str = "attention_mask"
    cache: list[str] = Field(
        default_factory=lambda: ["past_key_values"],
        description=("The names the key/value cache argument has had across transformers versions (transformers 5: `cache`, "
                     "4.x: `past_key_values`); the first one the model's forward names as a parameter of its own is the one "
                     "used, so the installed version chooses; a model whose forward names none of them refuses prefix keys "
                     "and values. A single name is a list of one."),
        min_length=1,
    )
    extend: dict[str, int] = Field(default_factory=dict, description="Per-token arguments to extend when positions are prepended, with their fill value (e.g. labels: -100).")
    cache_format: Literal["hf", "tuples"] = Field("hf", description="'hf': a transformers DynamicCache; 'tuples': a list of (key, value) per layer.")

    @field_validator("cache", mode="before")
    @classmethod
    def _one_name(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    def cache_arg(self, params: Collection[str]) -> str | None:
        """The cache argument's name among a forward's own parameters ``params`` (the first of :attr:`cache` there), or None."""
        return next((n for n in self.cache if n in params), None)


class ModelClass(Strict):
    """One model class of a family (base model or task-head wrapper) and where its parts sit."""

    task: Literal[TASKS] = Field("base", description="What the class is for (its head).")  # type: ignore[valid-type]
    backbone: str | None = Field(None, description="Path of the backbone (base model) inside this class ('': the class is the backbone); default: the map's backbone.")
    head: SiteBinding | None = Field(None, description="The 'head' site in this class (its task head); null: the class has no head; absent: the map's own head binding.")
    stacks: list[Identifier] | None = Field(None, description="The layer stacks this class has (T5EncoderModel: [encoder]); default: all of the map's.")


class Stack(Strict):
    """One stack of layers of an encoder-decoder family (T5's encoder, its decoder)."""

    count: ExprStr = Field(description="Number of layers in the stack (expression over the config's keys); the size L_<stack> in expressions of the map.")
    layers: str = Field(description="Path pattern of one layer of the stack ('{i}' = index within the stack).")
    sites: dict[Annotated[str, Field(pattern=SITE_PATTERN)], SiteBinding] = Field(
        description="The per-layer sites of the stack's layers ('{i}': index within the stack); a site a stack lacks (cross-attention in an encoder) is simply absent there.")


class ArchitectureMap(Strict):
    """How the sites of the reference architecture resolve in one model family."""

    family: Identifier
    description: str
    model_type: str | None = Field(None, description="transformers model_type used to build models of this family from a shape (None: pefref's own reference Transformer).")
    transformers: VersionRange | None = Field(
        None, description=("The transformers versions the map is written for, where a model's layout changed between versions "
                           "(absent: every supported version); a model of the family is refused under another version."))
    task: Literal[TASKS] = Field("causal_lm", description="Which transformers auto class builds the model.")  # type: ignore[valid-type]
    causal: bool = Field(True, description="Whether attention is causal (decoders); exposed to expressions as the name 'causal'.")
    backbone: str = Field("", description="Path of the backbone (the base model) in the paths below ('': they are the base model's own paths).")
    classes: dict[str, ModelClass] = Field(default_factory=dict, description="Model classes this map recognises (a list of names: each with the paths as written), with where their backbone and head sit.")
    sizes: dict[Identifier, ExprStr] = Field(description="Each reference size as an expression over the config's keys.")
    layers: str = Field(description="Path pattern of one Transformer layer ('{i}' = index).")
    base_params: ExprStr = Field(description="Parameter count of the base model as an expression over the sizes and config keys.")
    forward: ForwardSpec = Field(default_factory=ForwardSpec)  # type: ignore[arg-type]
    sites: dict[Annotated[str, Field(pattern=SITE_PATTERN)], SiteBinding] = Field(
        description="Where each site lives ('{i}' = layer index). With stacks: the sites outside them (embedding, final norm, head); each stack's sites are added here as it binds them in its first stack that has them.")
    stacks: dict[Identifier, Stack] = Field(
        default_factory=dict,
        description=("Encoder-decoder families: their layer stacks, in order. The layer index runs over the first stack's layers, "
                     "then the next's (T5: the encoder's layers are 0..L_encoder-1, the decoder's follow), and the size L is "
                     "their total; a per-layer site is placed in every layer of every stack that binds it."),
    )

    @field_validator("classes", mode="before")
    @classmethod
    def _class_list(cls, v: Any) -> Any:
        return {name: {} for name in v} if isinstance(v, list) else v

    @model_validator(mode="after")
    def _stack_sites(self) -> ArchitectureMap:
        """Each stack's sites are also in ``sites`` (bound as in the first stack that has them): the map binds them."""
        if self.stacks:
            merged = dict(self.sites)
            for st in self.stacks.values():
                for name, b in st.sites.items():
                    merged.setdefault(name, b)
            object.__setattr__(self, "sites", merged)
        return self


class ModelShape(Strict):
    """A named configuration of a real model (public config values)."""

    name: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9.-]*$")]
    family: Identifier
    config: dict[str, int | float | bool | str | None] = Field(description="Config values (the family's config keys).")
    source: str = Field("", description="Where the values come from.")
    description: str = ""


class ModelShapes(Strict):
    """The file of named model shapes."""

    shapes: list[ModelShape]
