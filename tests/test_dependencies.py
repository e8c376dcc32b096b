"""The apps depend one way (docs/concurrency.md, "Who calls whom"): only the orchestration layer
(marketplace.flows) calls more than one app's services; fleet and billing never import another app's
services; services never import the API layer; no module imports another app inside a function to dodge an
import cycle, and there is no import cycle among the apps' modules at all. Read from the source with ``ast``, so nothing has to be imported.

``python -m tests.test_dependencies [ROOT]`` prints the import sites between the apps (for an issue note)."""

import ast
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parent.parent
APPS = ("marketplace", "fleet", "billing")
FLOWS = "marketplace.flows"
NEUTRAL = "marketplace.core"  # imports no app; every app may import it
# The modules that write an app's rows: its services.
SERVICES = {
    "marketplace": {"marketplace.services", "marketplace.buyer_webhooks"},
    "fleet": {"fleet.services"},
    "billing": {"billing.services", "billing.payments", "billing.payouts", "billing.stripe_webhooks"},
}
API_LAYER = ("api", "views", "serializers", "forms", "admin")


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported (for ``from package import name``: package.name when that is a module)
    line: int
    in_function: bool


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str, root: Path) -> bool:
    base = root.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imports_of(path: Path, root: Path) -> list[Import]:
    module = module_name(path, root)
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[Import] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, in_function) for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                for alias in child.names:
                    candidate = f"{child.module}.{alias.name}"
                    target = candidate if _is_module(candidate, root) else child.module
                    found.append(Import(module, target, child.lineno, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def app_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in APPS else None


def services_app(module: str) -> str | None:
    return next((app for app, modules in SERVICES.items() if module in modules), None)


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def all_imports(root: Path = ROOT) -> list[Import]:
    result = []
    for app in APPS:
        for path in sorted((root / app).rglob("*.py")):
            if "migrations" not in path.parts:
                result += imports_of(path, root)
    return result


def violations(imports: list[Import]) -> list[str]:
    problems = []
    touched: dict[str, set[str]] = {}
    for imp in imports:
        source_app, target_app = app_of(imp.module), app_of(imp.target)
        where = f"{imp.module}:{imp.line} imports {imp.target}"
        if is_within(imp.module, FLOWS):
            continue
        if is_within(imp.module, NEUTRAL) and target_app:
            problems.append(f"{where}: marketplace.core imports no app")
        if target_app and target_app != source_app and not is_within(imp.target, NEUTRAL):
            if source_app in ("fleet", "billing") and services_app(imp.target):
                problems.append(f"{where}: {source_app} never calls another app's services (use marketplace.flows)")
            if imp.in_function:
                problems.append(f"{where}: inside a function (an import cycle dodged?); import at the top")
        if services_app(imp.module) and target_app and (imp.target.split(".")[-1] in API_LAYER
                                                        or is_within(imp.target, FLOWS)):
            problems.append(f"{where}: services do not import the API layer or the flows")
        if (app := services_app(imp.target)) is not None:
            touched.setdefault(imp.module, set()).add(app)
    for module, apps in sorted(touched.items()):
        own = services_app(module)
        apps = apps | ({own} if own else set())
        if len(apps) > 1:
            problems.append(f"{module} uses the services of {', '.join(sorted(apps))}: only marketplace.flows may")
    return problems


def import_cycles(imports: list[Import]) -> list[list[str]]:
    """The groups of the apps' modules that import each other at module level, directly or not (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.in_function and app_of(imp.target):
            graph.setdefault(imp.module, set()).add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while (member := stack.pop()) != node:
                group.append(member)
            if group:
                cycles.append(sorted([node, *group]))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_only_the_flows_call_more_than_one_apps_services_and_dependencies_run_one_way():
    assert violations(all_imports()) == []


def test_no_module_imports_itself_back_through_other_modules():
    assert import_cycles(all_imports()) == []


def test_the_checker_catches_what_it_is_meant_to(tmp_path):
    """Given a tree that breaks each rule once, when it is checked, then each break is reported."""
    files = {
        "marketplace/__init__.py": "",
        "marketplace/services.py": "from billing import services as billing\n",
        "marketplace/flows/__init__.py": "from billing import services\nfrom fleet import services\n",
        "marketplace/core/__init__.py": "",
        "marketplace/core/errors.py": "from fleet.models import Vehicle\n",
        "marketplace/api.py": "",
        "fleet/__init__.py": "",
        "fleet/services.py": "from marketplace import api\n",
        "fleet/models.py": "",
        "fleet/views.py": "from billing.services import usage_record\nfrom fleet import services\n",
        "billing/__init__.py": "",
        "billing/services.py": "def f():\n    from marketplace.models import Job\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = "\n".join(violations(all_imports(tmp_path)))
    assert "marketplace.services uses the services of billing, marketplace" in found
    assert "marketplace.core.errors:1 imports fleet.models: marketplace.core imports no app" in found
    assert "fleet.services:1 imports marketplace.api: services do not import the API layer" in found
    assert "fleet.views:1 imports billing.services: fleet never calls another app's services" in found
    assert "fleet.views uses the services of billing, fleet" in found
    assert "billing.services:2 imports marketplace.models: inside a function" in found
    assert import_cycles(all_imports(tmp_path)) == []
    (tmp_path / "billing/models.py").write_text("from fleet import views\n")
    (tmp_path / "fleet/services.py").write_text("from billing import models\n")
    assert import_cycles(all_imports(tmp_path)) == [["billing.models", "fleet.services", "fleet.views"]]
    assert "marketplace.flows.__init__" not in found and "marketplace.flows uses" not in found  # it may call them all


def main(root: Path, also_services: list[str]) -> None:
    """Print the import sites from one app to another (and how many reach another app's services). An older
    tree's service modules of other names can be added (``--also marketplace.webhooks,billing.webhooks``)."""
    for name in also_services:
        SERVICES[app_of(name)].add(name)
    imports = [imp for imp in all_imports(root) if app_of(imp.target) and app_of(imp.target) != app_of(imp.module)
               and not is_within(imp.target, NEUTRAL)]
    sites = Counter(f"{app_of(imp.module)}->{app_of(imp.target)}" for imp in imports)
    services = Counter(f"{app_of(imp.module)}->{app_of(imp.target)}" for imp in imports if services_app(imp.target))
    local = sum(imp.in_function for imp in imports)
    for pair in sorted(sites):
        print(f"{pair}: {sites[pair]} import sites, {services[pair]} of them of services")
    print(f"total: {sum(sites.values())} import sites, {sum(services.values())} of services, {local} inside functions")
    outside = [imp for imp in imports if services_app(imp.target) and not is_within(imp.module, FLOWS)]
    print(f"services imported across apps outside marketplace.flows: {len(outside)}")


if __name__ == "__main__":
    args = sys.argv[1:]
    also = args[args.index("--also") + 1].split(",") if "--also" in args else []
    paths = [a for a in args if a != "--also" and a not in ",".join(also).split(",")]
    main(Path(paths[0]).resolve() if paths else ROOT, also)
