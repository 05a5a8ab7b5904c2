"""What is left to do: the catalog minus what the store has committed for this model."""

from __future__ import annotations

from dataclasses import dataclass, replace

from embedstore.sources import ReadTask


@dataclass
class Plan:
    tasks: list[ReadTask]  # only the items still missing
    n_todo: int
    n_skipped: int


def slice_key(model_id: str, item_id: str) -> str:
    return f"{model_id}|{item_id}"


def plan_remaining(tasks: list[ReadTask], model_id: str, committed: set[str]) -> Plan:
    remaining, n_todo, n_skipped = [], 0, 0
    for task in tasks:
        missing = [item for item in task.items if slice_key(model_id, item.item_id) not in committed]
        n_skipped += len(task.items) - len(missing)
        if missing:
            remaining.append(replace(task, items=missing))
            n_todo += len(missing)
    return Plan(remaining, n_todo, n_skipped)
