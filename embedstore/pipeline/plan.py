"""What is left to do: the catalog minus what the store has committed, planned per model."""

from __future__ import annotations

from dataclasses import dataclass, replace

from embedstore.sources.records import ReadTask


@dataclass
class Plan:
    tasks: list[ReadTask]  # only the items some model still lacks
    missing: list[set[str]]  # per model, the item ids it lacks
    n_todo: int  # slices to decode
    n_skipped: int  # slices every model already has


def plan_remaining(tasks: list[ReadTask], committed: list[set[str]]) -> Plan:
    remaining, missing, n_todo, n_skipped = [], [set() for _ in committed], 0, 0
    for task in tasks:
        todo = []
        for item in task.items:
            lacking = [model for model, keys in enumerate(committed) if item.item_id not in keys]
            for model in lacking:
                missing[model].add(item.item_id)
            if lacking:
                todo.append(item)
        n_skipped += len(task.items) - len(todo)
        if todo:
            remaining.append(replace(task, items=todo))
            n_todo += len(todo)
    return Plan(remaining, missing, n_todo, n_skipped)
