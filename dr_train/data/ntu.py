"""NTU RGB+D (120) file names: `SsssCcccPpppRrrrAaaa_rgb.avi` -> setup, camera, performer, replication, action,
and the catalog relation of a two-person action (A050-A060, A106-A120).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dr_train.catalog import Relation

_NAME = re.compile(r"S(\d{3})C(\d{3})P(\d{3})R(\d{3})A(\d{3})(?:_rgb)?(?:\.[A-Za-z0-9]+)?", re.IGNORECASE)
# NTU RGB+D 120's documented ranges: 32 setups, 3 cameras, 106 performers, 2 replications, 120 actions.
_RANGES = {"setup": (1, 32), "camera": (1, 3), "performer": (1, 106), "replication": (1, 2), "action": (1, 120)}
_CATALOG_ACTION = re.compile(r"A?0*(\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class NTUName:
    setup: int
    camera: int
    performer: int
    replication: int
    action: int

    @property
    def video_id(self) -> str:
        """The stem without `_rgb`, e.g. "S001C002P003R002A058"."""
        return (f"S{self.setup:03d}C{self.camera:03d}P{self.performer:03d}R{self.replication:03d}"
                f"A{self.action:03d}")


def parse_ntu_name(path_or_name: str | Path) -> NTUName:
    """`.../S001C002P003R002A058_rgb.avi` (also .mp4, or without `_rgb` or extension) -> its five fields."""
    name = Path(path_or_name).name
    match = _NAME.fullmatch(name)
    if not match:
        raise ValueError(f"{str(path_or_name)!r} is not an NTU RGB+D name (expected like S001C002P003R002A058_rgb.avi)")
    fields = dict(zip(_RANGES, map(int, match.groups())))
    for field, (low, high) in _RANGES.items():
        if not low <= fields[field] <= high:
            raise ValueError(f"{str(path_or_name)!r}: NTU {field} must be in {low}..{high}, got {fields[field]}")
    return NTUName(**fields)


def is_ntu_name(path_or_name: str | Path) -> bool:
    try:
        parse_ntu_name(path_or_name)
    except ValueError:
        return False
    return True


def ntu_relation(path_or_name: str | Path, catalog: dict[str, Relation]) -> Relation | None:
    """The catalog relation whose `ntu_action` ("A58", "A106") is this video's action; None when none is (e.g. the
    single-person actions)."""
    return _relations_by_action(catalog).get(parse_ntu_name(path_or_name).action)


def _relations_by_action(catalog: dict[str, Relation]) -> dict[int, Relation]:
    by_action: dict[int, Relation] = {}
    for relation in catalog.values():
        if not relation.ntu_action:
            continue
        match = _CATALOG_ACTION.fullmatch(relation.ntu_action.strip())
        if not match:
            raise ValueError(f"relation {relation.name!r}: ntu_action {relation.ntu_action!r} is not like 'A58'")
        action = int(match.group(1))
        if action in by_action:
            raise ValueError(f"relations {by_action[action].name!r} and {relation.name!r} both claim NTU action "
                             f"A{action:03d}")
        by_action[action] = relation
    return by_action
