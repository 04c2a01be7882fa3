"""Loading and checking compositions: techniques resolved, blocks checked against the interaction rules.

A composition file names techniques (catalog ids or technique YAML files next
to it) and blocks; :func:`load_composition` validates its structure, resolves
every technique (applying hyperparameter, site and layer overrides), and checks
each block and each pair of adapters that share a site against
:class:`~pefref.language.schema.InteractionRules` (data in
``catalog/reference/interactions.yaml``). Every problem is located at the
composition's line and field.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pefref.language.catalog import Catalog, catalog_root, load_techniques
from pefref.language.check import expand_modules
from pefref.language.errors import CatalogError, PefrefError, Problem
from pefref.language.forms import Combine, block_of
from pefref.language.hparams import resolve_hyperparameters
from pefref.language.loader import load_file, suggest
from pefref.language.schema import Technique
from pefref.language.yamlsrc import Positions, read_yaml

if TYPE_CHECKING:  # the composition models are built on first use: applying a technique needs none
    from pefref.language.schema import Composition, InteractionRules

__all__ = ["ResolvedComposition", "rules_markdown", "load_rules", "load_composition", "check_composition", "is_composition_file", "block_sites", "module_stage"]


@dataclass
class ResolvedComposition:
    """A checked composition: its techniques resolved (overrides applied), by adapter name."""

    composition: Composition
    techniques: dict[str, Technique]
    hyperparameters: dict[str, dict[str, Any]]
    sites: dict[str, list[str] | None]
    source: Path | None = None
    positions: Positions | None = field(default=None, repr=False)

    def drawable(self) -> list[Technique]:
        """One technique per adapter, as :func:`pefref.render.diagram.technique_graph` takes them.

        Each is the adapter's resolved technique under the adapter's name (so two uses
        of one technique stay apart), with its modules narrowed to the adapter's sites
        and the composition's hyperparameter values as defaults (so counts agree).
        """
        out = []
        for name, t in self.techniques.items():
            keep = self.sites[name]
            modules = [m if keep is None else m.model_copy(update={"sites": [s for s in m.sites if s in keep]}) for m in t.modules]  # type: ignore[union-attr]
            modules = [m for m in modules if m.sites]
            hps = {k: hp.model_copy(update={"default": self.hyperparameters[name].get(k, hp.default)}) for k, hp in t.hyperparameters.items()}
            out.append(t.model_copy(update={"id": self.drawn_id(name), "name": f"{name}: {t.name}", "modules": modules, "hyperparameters": hps}))
        return out

    @staticmethod
    def drawn_id(name: str) -> str:
        """The id under which :meth:`drawable` gives adapter ``name``'s technique."""
        return name.lower() if name[:1].isalpha() else f"a_{name.lower()}"

    def modules_at(self, name: str, site: str) -> list[Any]:
        """The concrete modules adapter ``name`` places at ``site``."""
        if self.sites[name] is not None and site not in self.sites[name]:  # type: ignore[operator]
            return []
        return [m for m in self.techniques[name].modules if site in m.sites]  # type: ignore[operator]


def _rules_path(root: Path | None) -> Path:
    p = (root or catalog_root()) / "reference" / "interactions.yaml"
    return p if p.is_file() else catalog_root() / "reference" / "interactions.yaml"


@lru_cache(maxsize=4)
def _rules(path: str) -> InteractionRules:
    from pefref.language.schema import InteractionRules

    return load_file(InteractionRules, path)[0]


def load_rules(root: Path | None = None) -> InteractionRules:
    """The interaction rules of the catalog at ``root`` (the bundled ones when it has none)."""
    return _rules(str(_rules_path(root)))


def is_composition_file(path: Path) -> bool:
    """Whether a YAML file holds a composition (a top-level ``techniques`` list and no ``modules``)."""
    try:
        data, _pos = read_yaml(path)
    except CatalogError:
        return False
    from pefref.language.file_kinds import kind_of_keys  # the one table of file kinds (it imports this module's catalog)

    return kind_of_keys(data) == "composition"


def module_stage(m: Any, rules: InteractionRules) -> str:
    """The stage a concrete module runs in at its host."""
    return rules.stage_of(m.form, getattr(m, "side", "output") == "input")


def _concrete(t: Technique, pool: dict[str, Technique], layers: Any) -> Technique:
    """``t`` with its ``use:`` modules expanded (and every module's layers replaced when ``layers`` is given)."""
    modules, hps = expand_modules(t, {**pool, t.id: t})
    if layers is not None:
        modules = [m.model_copy(update={"layers": layers}) for m in modules]
    return t.model_copy(update={"modules": modules, "hyperparameters": hps})


def block_sites(res: ResolvedComposition, names: list[str], sites: list[str] | None) -> list[str]:
    """The sites a block over adapters ``names`` combines them at (its own list, or every site they all use)."""
    if sites is not None:
        return list(sites)
    used = [{s for m in res.techniques[n].modules for s in m.sites if res.sites[n] is None or s in res.sites[n]} for n in names]  # type: ignore[operator, union-attr]
    common = set.intersection(*used) if used else set()
    order = [s for m in res.techniques[names[0]].modules for s in m.sites]  # type: ignore[union-attr]
    return [s for s in dict.fromkeys(order) if s in common]


def check_composition(comp: Composition, pos: Positions, catalog: Catalog, rules: InteractionRules, base: Path | None = None) -> tuple[ResolvedComposition | None, list[Problem]]:
    """Resolve and check a composition; returns it (None when a technique could not be resolved) and every problem."""
    out: list[Problem] = []
    techs: dict[str, Technique] = {}
    hps: dict[str, dict[str, Any]] = {}
    sites: dict[str, list[str] | None] = {}
    for i, use in enumerate(comp.techniques):
        p = ("techniques", i)
        ref = use.technique
        if ref.endswith((".yaml", ".yml")):
            path = Path(ref) if Path(ref).is_absolute() or base is None else base / ref
            if not path.is_file():
                out.append(Problem(pos.at(p + ("technique",)), f"techniques[{i}].technique", f"no technique file {ref!r} (looked for {path})"))
                continue
            loaded, _s, _p, tprob = load_techniques([path.resolve()], catalog.reference, catalog.techniques)
            if tprob:
                out += tprob
                continue
            tech = next(iter(loaded.values()))
        elif ref in catalog.techniques:
            tech = catalog.techniques[ref]
        else:
            out.append(Problem(pos.at(p + ("technique",)), f"techniques[{i}].technique",
                               f"unknown technique {ref!r}{suggest(ref, catalog.techniques)} (a catalog id, or a .yaml file)"))
            continue
        concrete = _concrete(tech, catalog.techniques, use.layers)
        try:
            hps[use.name] = resolve_hyperparameters(concrete.hyperparameters, use.hyperparameters)
        except PefrefError as e:
            key = next((k for k in use.hyperparameters if k not in concrete.hyperparameters), None)
            out.append(Problem(pos.key_at(p + ("hyperparameters", key)) if key else pos.at(p + ("hyperparameters",)), f"techniques[{i}].hyperparameters", str(e)))
        own = [s for m in concrete.modules for s in m.sites]  # type: ignore[union-attr]
        for j, s in enumerate(use.sites or []):
            if s not in own:
                out.append(Problem(pos.at(p + ("sites", j)), f"techniques[{i}].sites[{j}]", f"technique {tech.id!r} does not use site {s!r}{suggest(s, own)} (its sites: {', '.join(dict.fromkeys(own))})"))
        techs[use.name] = concrete
        sites[use.name] = list(use.sites) if use.sites is not None else None
    res = ResolvedComposition(comp, techs, hps, sites, base, pos)
    if len(techs) < len(comp.techniques):
        out += _check_block_names(comp, pos, set(techs) | {u.name for u in comp.techniques})
        return None, out
    out += _check_block_names(comp, pos, set(techs))
    if out:
        return res, out
    out += _check_blocks(res, pos, rules)
    out += _check_pairs(res, pos, rules)
    return res, out


def _check_block_names(comp: Composition, pos: Positions, names: set[str]) -> list[Problem]:
    out = []
    for b, blk in enumerate(comp.blocks):
        for j, a in enumerate(blk.adapters):
            if a not in names:
                out.append(Problem(pos.at(("blocks", b, "adapters", j)), f"blocks[{b}].adapters[{j}]",
                                   f"no adapter named {a!r}{suggest(a, names)} (adapters: {', '.join(sorted(names))})"))
    return out


def _check_blocks(res: ResolvedComposition, pos: Positions, rules: InteractionRules) -> list[Problem]:
    out: list[Problem] = []
    order = {s: k for k, s in enumerate(rules.stage_order)}
    claimed: dict[tuple[str, str], int] = {}  # (adapter, site) -> block index
    for b, blk in enumerate(res.composition.blocks):
        bp = ("blocks", b)
        rule = rules.blocks[blk.kind]
        where = block_sites(res, blk.adapters, blk.sites)
        if not where:
            out.append(Problem(pos.at(bp + ("adapters",)), f"blocks[{b}].adapters", f"adapters {', '.join(blk.adapters)} share no site: the {blk.kind} block has nothing to combine"))
            continue
        for s in where:
            sp = bp + ("sites", blk.sites.index(s)) if blk.sites else bp + ("kind",)
            fld = f"blocks[{b}]" + (f".sites[{blk.sites.index(s)}]" if blk.sites else ".kind")
            stages: dict[str, set[str]] = {}
            for a in blk.adapters:
                ms = res.modules_at(a, s)
                if not ms:
                    out.append(Problem(pos.at(sp), fld, f"adapter {a!r} has no module at site {s!r}"))
                    continue
                prev = claimed.get((a, s))
                if prev is not None and prev != b:
                    out.append(Problem(pos.at(sp), fld, f"adapter {a!r} at site {s!r} is already combined by blocks[{prev}]"))
                claimed[(a, s)] = b
                stages[a] = {module_stage(m, rules) for m in ms}
                for m in ms:
                    st = module_stage(m, rules)
                    if st not in rule.stages or (rule.forms is not None and m.form not in rule.forms):
                        allowed = ", ".join(rule.forms) if rule.forms else "modules of stages " + ", ".join(rule.stages)
                        out.append(Problem(pos.at(sp), fld, f"a {blk.kind} block cannot combine the {m.form} module {m.name!r} of adapter {a!r} at {s!r} ({st} stage); it combines {allowed}"))
            if rule.same_stage and len({st for v in stages.values() for st in v}) > 1:
                desc = "; ".join(f"{a}: {', '.join(sorted(v))}" for a, v in stages.items())
                out.append(Problem(pos.at(sp), fld, f"a {blk.kind} block combines modules of one stage, but at {s!r} they run in different stages ({desc})"))
            if block_of(blk).combine is Combine.ORDER:
                seq = [a for a in blk.adapters if a in stages]
                for a1, a2 in itertools.pairwise(seq):
                    if max(order[x] for x in stages[a1]) > min(order[x] for x in stages[a2]):
                        out.append(Problem(pos.at(bp + ("adapters",)), f"blocks[{b}].adapters",
                                           f"the stack puts {a1!r} ({'/'.join(sorted(stages[a1]))} stage) before {a2!r} ({'/'.join(sorted(stages[a2]))} stage) at {s!r}, "
                                           f"but stages run in the order {' -> '.join(rules.stage_order)}"))
    return out


def _check_pairs(res: ResolvedComposition, pos: Positions, rules: InteractionRules) -> list[Problem]:
    out: list[Problem] = []
    names = list(res.techniques)
    for j, b in enumerate(names):
        for a in names[:j]:
            shared = {s for m in res.techniques[a].modules for s in m.sites} & {s for m in res.techniques[b].modules for s in m.sites}  # type: ignore[union-attr]
            clashes: dict[tuple[str, str, str], list[str]] = {}
            for s in sorted(shared):
                for ma in res.modules_at(a, s):
                    for mb in res.modules_at(b, s):
                        rule = rules.pair(ma.form, mb.form)
                        if rule is not None and not rule.allowed:
                            clashes.setdefault((ma.form, mb.form, rule.combine), []).append(s)
            for (fa, fb, why), where in clashes.items():
                out.append(Problem(pos.at(("techniques", j, "technique")), f"techniques[{j}].technique",
                                   f"adapter {b!r} ({fb}) cannot share {'site' if len(where) == 1 else 'sites'} {', '.join(where)} with adapter {a!r} ({fa}): {why}"))
    return out


def load_composition(path: str | Path, catalog: Catalog, rules: InteractionRules | None = None) -> ResolvedComposition:
    """Load, resolve and check a composition file; raise :class:`CatalogError` with every located problem."""
    path = Path(path)
    from pefref.language.schema import Composition

    comp, pos = load_file(Composition, path)
    problems: list[Problem] = []
    if path.suffix in (".yaml", ".yml") and path.stem != comp.id:
        problems.append(Problem(pos.at(("id",)), "id", f"file name {path.name!r} does not match id {comp.id!r}; expected {comp.id}.yaml"))
    res, more = check_composition(comp, pos, catalog, rules or load_rules(), path.resolve().parent)
    problems += more
    if problems or res is None:
        raise CatalogError(problems)
    res.source = path
    return res


def rules_markdown(rules: InteractionRules) -> str:
    """The interaction rules as Markdown tables (the README shows this text; a test keeps it in sync)."""
    lines = [f"Stages at one host, in order: {' → '.join(rules.stage_order)}.", "",
             "| form | stage | on the host's input side |", "|---|---|---|"]
    for form, r in rules.forms.items():
        lines.append(f"| {form} | {r.stage} | {r.input_side or r.stage} |")
    lines += ["", "| block | combines | one stage only |", "|---|---|---|"]
    for kind, b in rules.blocks.items():
        what = ", ".join(b.forms) if b.forms else "modules of stages " + ", ".join(b.stages)
        lines.append(f"| {kind} | {what} | {'yes' if b.same_stage else 'no'} |")
    lines += ["", "| forms sharing a host | allowed | how |", "|---|---|---|"]
    for p in rules.pairs:
        lines.append(f"| {' + '.join(p.forms)} | {'yes' if p.allowed else 'no'} | {p.combine} |")
    return "\n".join(lines) + "\n"
