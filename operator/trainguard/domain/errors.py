"""The one error a run's spec can raise (its own module: spec.py and template.py both raise it)."""

from __future__ import annotations


class SpecError(ValueError):
    """A spec value the operator cannot run; ``field`` is its path, e.g. spec.hyperparameters.cropSize."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f'{field}: {problem}')
        self.field = field
        self.problem = problem
