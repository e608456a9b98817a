"""The relation catalog (datasets/relations.yaml): names, prompts and evaluation prompts of each relation."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

DEFAULT_CATALOG = Path(__file__).resolve().parent.parent / "datasets" / "relations.yaml"
SYNTH_CATALOG = DEFAULT_CATALOG.parent / "synth_relations.yaml"      # written by dr_train.data.world
_NAME = re.compile(r"[a-z0-9_]+")


@dataclass(frozen=True)
class Relation:
    name: str
    prompt: str
    verb: str = ""
    ntu_action: str = ""
    eval_prompts: tuple = field(default_factory=tuple)
    videos: str = ""


def load_catalog(path: str | Path | None = None) -> dict[str, Relation]:
    path = Path(path) if path else DEFAULT_CATALOG
    if not path.is_file():
        raise ValueError(f"relation catalog {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ValueError(f"relation catalog {path} is not valid YAML: {e}") from None
    entries = data.get("relations") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"relation catalog {path} must hold a non-empty 'relations' list")
    catalog: dict[str, Relation] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or "name" not in entry or "prompt" not in entry:
            raise ValueError(f"relation catalog {path}: entry {i} needs at least 'name' and 'prompt'")
        name = str(entry["name"])
        if not _NAME.fullmatch(name):
            raise ValueError(f"relation catalog {path}: name {name!r} must match [a-z0-9_]+")
        if name in catalog:
            raise ValueError(f"relation catalog {path}: name {name!r} appears twice")
        catalog[name] = Relation(name=name, prompt=str(entry["prompt"]), verb=str(entry.get("verb", "")),
                                 ntu_action=str(entry.get("ntu_action", "")),
                                 eval_prompts=tuple(entry.get("eval_prompts", ())),
                                 videos=str(entry.get("videos", "")))
    return catalog


def catalog_for(cfg) -> dict[str, Relation]:
    """The catalog a training Config uses: `data.catalog`, else the synth world's for `model.preset: synth` (its
    evaluation prompts name the world's kinds), else the repository's NTU catalog."""
    if cfg.data.catalog:
        return load_catalog(cfg.data.catalog)
    return load_catalog(SYNTH_CATALOG if cfg.model.preset == "synth" else DEFAULT_CATALOG)


def select_relations(spec: str | list[str], catalog: dict[str, Relation]) -> list[Relation]:
    """`all`, a comma list, or a list of names -> catalog entries, in the order given; unknown names are errors."""
    names = spec if isinstance(spec, list) else [s.strip() for s in str(spec).split(",")]
    names = [n for n in names if n]
    if names == ["all"]:
        return list(catalog.values())
    unknown = [n for n in names if n not in catalog]
    if unknown:
        raise ValueError(f"unknown relation(s) {', '.join(unknown)}; the catalog has: {', '.join(catalog)}")
    if not names:
        raise ValueError("no relations selected")
    return [catalog[n] for n in dict.fromkeys(names)]
