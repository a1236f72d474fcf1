"""The import graph: imports point one way, from the records at the bottom to the CLI and the
service at the top, and no module imports itself back through another (type-only imports and
imports inside functions included)."""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import ROOT

# Lowest first. A module may import modules of its own layer or of lower ones.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("records", ("cai", "cai.__init__", "cai.errors", "cai.files", "cai.records", "cai.interrupt", "cai.refusal")),
    ("constitution/recipe", ("cai.constitution_source", "cai.constitution", "cai.constitution_plan",
                             "cai.constitution_diff", "cai.constitution_review", "cai.recipe", "cai.sources")),
    ("prompts", ("cai.prompts",)),
    ("engine", ("cai.engine",)),
    ("stages", ("cai.critique", "cai.judge", "cai.preferences", "cai.contrastive", "cai.evaluate", "cai.policy_records",
                "cai.policy_eval", "cai.policy_report", "cai.plots", "cai.bench", "cai.bench_judge",
                "cai.human_data", "cai.human_eval", "cai.likelihood", "cai.refusal_judge")),
    ("store/export", ("cai.store", "cai.shards", "cai.formats", "cai.cards", "cai.card_judging", "cai.export", "cai.batches", "cai.executor", "cai.ray_executor", "cai.events",
                      "cai.jobdir", "cai.revision_pairs", "cai.job_usage", "cai.update_report", "cai.train")),
    ("jobs/pipeline", ("cai.pipeline", "cai.job_update", "cai.reuse", "cai.stage_calls", "cai.hub", "cai.hub_cards", "cai.hub_lineage", "cai.constitution_impact", "cai.bench_ray", "cai.bench_train", "cai.bench_train_child", "cai.judge_eval", "cai.kinds", "cai.runner", "cai.stage_jobs")),
    ("cli/serve", ("cai.cli", "cai.__main__", "serve")),
]


def layer_of(module: str) -> int:
    best, found = -1, None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, found = len(prefix), index
    assert found is not None, f"{module} has no layer: add it to LAYERS in {Path(__file__).name}"
    return found


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for top in ("cai", "serve") for p in sorted((ROOT / top).rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `name` imports anywhere in its file (functions and TYPE_CHECKING blocks too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    edges = {name: imports_of(name, path, known) for name, path in modules.items()}
    # a package's __init__ is imported whenever one of its modules is: importing the package is not an edge down
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in edges.items()}


def test_every_import_points_down_the_layers() -> None:
    wrong = [f"{importer} ({LAYERS[layer_of(importer)][0]}) imports {imported} ({LAYERS[layer_of(imported)][0]})"
             for importer, targets in sorted(graph().items()) for imported in sorted(targets)
             if layer_of(imported) > layer_of(importer)]
    assert not wrong, "imports pointing up the layers:\n" + "\n".join(wrong)


def test_no_import_cycles() -> None:
    edges = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in edges.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)
