"""The core's shape, measured rather than felt: radon's cyclomatic complexity and
maintainability index, and the size of the Scheduler class (a driver, not the rules)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from radon.metrics import mi_rank, mi_visit  # type: ignore[import-untyped]
from radon.visitors import ComplexityVisitor  # type: ignore[import-untyped]

import token_refresh

PACKAGE = Path(token_refresh.__file__).parent
#: The scheduler and what it stands on (not the integrations, the stores or the CLI).
CORE = [
    "_context.py",
    "_expiry.py",
    "_format.py",
    "_jwt.py",
    "_machine.py",
    "_report.py",
    "_retry.py",
    "_runtime.py",
    "_scheduler.py",
    "_validate.py",
    "_workers.py",
    "events.py",
    "testing.py",
]


@pytest.mark.parametrize("name", CORE)
def test_no_function_of_the_core_is_above_complexity_10(name: str) -> None:
    visitor = ComplexityVisitor.from_code((PACKAGE / name).read_text())
    over = [
        f"{block.fullname} ({block.complexity})"
        for block in visitor.blocks
        if block.complexity > 10
    ]
    assert not over, f"{name}: cyclomatic complexity above 10: {over}"


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda path: path.name)
def test_no_module_is_graded_c_for_maintainability(path: Path) -> None:
    index = mi_visit(path.read_text(), multi=True)
    assert mi_rank(index) in ("A", "B"), f"{path.name}: maintainability index {index:.1f}"


def test_the_scheduler_class_is_at_most_450_lines() -> None:
    tree = ast.parse((PACKAGE / "_scheduler.py").read_text())
    (scheduler,) = [
        node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "Scheduler"
    ]
    assert scheduler.end_lineno is not None
    assert scheduler.end_lineno - scheduler.lineno + 1 <= 450


def test_the_runtime_seam_is_narrow_and_every_runtime_implements_it_all() -> None:
    """About eight methods (two clocks, alarms, work, a watch on hung calls, close,
    fork), the same in the thread and heap backends and on a ManualClock."""
    from token_refresh._runtime import Runtime, ThreadRuntime
    from token_refresh.testing import ManualRuntime

    def public(cls: type) -> set[str]:
        return {name for name in vars(cls) if not name.startswith("_")}

    seam = public(Runtime)
    assert len(seam) <= 9, sorted(seam)
    for runtime in (ThreadRuntime, ManualRuntime):
        assert public(runtime) == seam, runtime.__name__
