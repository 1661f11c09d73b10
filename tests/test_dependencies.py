"""Dependencies point one way: `uvd/` (the core) never imports the plug-ins (`uvd.pipelines`,
`uvd.tokenizer`, `uvd.model`, `uvd.demo`, kept in the repo's top-level folders `pipelines/`, `tokenizer/`,
`model/`, `demo/`), which the registry finds lazily; no import cycles among the project's modules; the
commands that need no model never import torch; the plug-in table and the package list match pyproject."""
import ast
import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("uvd", "pipelines", "tokenizer", "model", "demo")  # folders in the repo
PLUGIN_PACKAGES = ("uvd.pipelines", "uvd.tokenizer", "uvd.model", "uvd.demo")  # their packages (pyproject package-dir)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    parts = parts[:-1] if parts[-1] == "__init__" else parts
    return ".".join(parts if parts[0] == "uvd" else ("uvd", *parts))


def _plugin(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in PLUGIN_PACKAGES)


def project_modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules `name` imports anywhere in its file (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # `from pkg import mod` imports the submodule pkg.mod when there is one.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a module -> the deepest project module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_the_core_never_imports_the_plugins():
    graph = import_graph()
    offenders = {name: sorted(t for t in targets if _plugin(t)) for name, targets in graph.items() if not _plugin(name)}
    assert len(offenders) > 15 and "uvd.runner" in offenders
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_graph_sees_imports_inside_functions():
    """The checker itself: a lazy import inside a function counts, and `from pkg import mod` resolves to the module."""
    graph = import_graph()
    assert "uvd.tokenizer.encode" in graph["uvd.tokenizer.view"]  # imported inside _stage()
    assert "uvd.pipelines.pairing" in graph["uvd.pipelines.coco"]  # from uvd.pipelines import pairing as P
    assert "uvd.records" in graph["uvd.demo.world"]  # from uvd import records as R


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _modules_after(code: str) -> set[str]:
    """The modules loaded after running `code` in a fresh interpreter in the repo root: top-level names, and
    the plug-in packages by their `uvd.X` names."""
    script = (f"import sys, json\n{code}\n"
              "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | {'.'.join(m.split('.')[:2]) for m in sys.modules if m.startswith('uvd.')})))")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


def test_core_imports_no_plugin():
    loaded = _modules_after("import uvd.recipe, uvd.runner, uvd.config, uvd.registry")
    assert not loaded & {*PLUGIN_PACKAGES, "torch"}
    assert "uvd" in loaded


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """A run folder as the runner leaves it (one shard, rejects, a manifest), written without torch."""
    import numpy as np
    import pyarrow.parquet as pq

    from uvd import manifest as M
    from uvd.records import Reject
    from uvd.shards import rejects_table, write_shard

    run = tmp_path_factory.mktemp("deps") / "laion"
    (run / "data").mkdir(parents=True)
    (run / "rejects").mkdir()
    rng = np.random.default_rng(0)
    rows = [{"id": f"s{i}", "source": "laion", "task": "single", "num_images": 1,
             "tokens": rng.integers(0, 8192, 256).astype(np.uint16), "images": [f"00000.tar/{i}"], "meta": "{}"}
            for i in range(3)]
    write_shard(rows, run / "data/laion-000000-000.parquet", 16, "zstd", 3)
    pq.write_table(rejects_table([Reject("00000.tar/9", "corrupt_image", "bad bytes", "00000.tar")]),
                   run / "rejects/laion-000000.parquet")
    M.write_manifest(run, {"schema_version": 2, "source": "laion", "status": "complete", "recipe_hash": "x",
                           "tokenizer": {"id": "test", "trained": False, "config": "test"},
                           "rejects": {"files": ["rejects/laion-000000.parquet"], "count": 1,
                                       "by_reason": {"corrupt_image": 1}},
                           "shards": {"data/laion-000000-000.parquet": {
                               "sentences": 3, "images": 3, "tokens": 768,
                               "by_task": {"single": {"sentences": 3, "images": 3, "tokens": 768}}}}})
    return run


@pytest.mark.parametrize("argv", [
    ["--help"],
    ["stats", "{run}", "--json"],
    ["audit", "{run}", "--json"],
    ["validate", "recipes/laion.yaml", "recipes/video.yaml", "recipes/mixes/uvdv1.yaml", "recipes/tokenizer/demo_small.yaml"],
], ids=["help", "stats", "audit-json", "validate"])
def test_commands_that_need_no_model_import_no_torch(argv, small_run):
    argv = [a.replace("{run}", str(small_run)) for a in argv]
    code = (f"from uvd.cli import main\ntry:\n    code = main({argv!r})\nexcept SystemExit as e:\n    code = e.code\n"
            "assert code == 0, code")
    loaded = _modules_after(code)
    assert "torch" not in loaded
    assert not loaded & {"uvd.model", "uvd.demo"}
    if argv[0] != "validate":  # validating a tokenizer recipe reads tokenizer/config.py (presets), torch-free
        assert "uvd.tokenizer" not in loaded


def test_plugin_table_matches_pyproject_and_imports():
    from uvd.registry import PLUGIN_GROUP, PLUGINS, _load

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"][PLUGIN_GROUP] == PLUGINS
    for name, target in PLUGINS.items():
        assert _load(target) is not None, name


def test_plugins_are_found_lazily():
    """In a fresh interpreter nothing is registered until asked for; then the plug-in table fills it."""
    code = ("from uvd import registry\nassert not registry.SOURCES and not registry.TOKENIZER_STAGE\n"
            "assert registry.get_source('laion').__module__ == 'uvd.pipelines.laion'\n"
            "assert len(registry.SOURCES) >= 9\n"
            "assert registry.get_tokenizer_stage().__module__ == 'uvd.tokenizer.encode'\n"
            "try:\n    registry.get_source('nope')\nexcept ValueError as err:\n"
            "    assert 'known sources: ' in str(err) and 'laion' in str(err), err\nelse:\n    raise AssertionError")
    loaded = _modules_after(code)
    assert {"uvd.pipelines", "uvd.tokenizer", "torch"} <= loaded and "uvd.model" not in loaded
    with pytest.raises(KeyError, match="unknown plug-in"):
        __import__("uvd.registry").registry.plugin("no_such_plugin")


def test_pyproject_packages_cover_every_package_folder():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    on_disk = {_module_name(p.parent / "__init__.py") for package in PACKAGES for p in (ROOT / package).rglob("__init__.py")}
    assert on_disk <= listed
    assert tool["package-dir"]["uvd.recipes"] == "recipes"
    # The design's folders stay top-level in the repo; the wheel installs them under uvd/ and claims no
    # generic top-level names (`model`, `tokenizer`, ...).
    assert {k: v for k, v in tool["package-dir"].items() if k != "uvd.recipes"} == {f"uvd.{p}": p for p in PACKAGES[1:]}
    assert all(name == "uvd" or name.startswith("uvd.") for name in listed)
    config_folders = {f"uvd.recipes.{p.name}" for p in (ROOT / "recipes").iterdir() if p.is_dir()}
    assert config_folders | {"uvd.recipes"} <= listed


def test_another_package_adds_a_source_through_an_entry_point(tmp_path):
    """A package installed beside UVD declares `sources = "toy_sources"` in the group uvd.plugins;
    its source is found by name, beside UVD's own, without anyone importing it."""
    site = tmp_path / "site"
    (site / "toy_uvd-0.1.dist-info").mkdir(parents=True)
    (site / "toy_uvd-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-uvd\nVersion: 0.1\n")
    (site / "toy_uvd-0.1.dist-info" / "entry_points.txt").write_text("[uvd.plugins]\nsources = toy_sources\n")
    (site / "toy_sources.py").write_text(
        "from uvd.registry import register_source\n\n@register_source\nclass ToySource:\n    name = 'toy'\n")
    code = ("from uvd import registry\nassert 'toy_sources' in registry.plugin_targets('sources')\n"
            "assert registry.get_source('toy').__module__ == 'toy_sources'\n"
            "assert registry.get_source('laion').__module__ == 'uvd.pipelines.laion'\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_module_is_imported_under_a_top_level_folder_name():
    """From the repo root the folders `tokenizer/`, `pipelines/`, ... are importable as top-level
    packages too; the code must only ever use their `uvd.` names (a second copy of a module breaks
    registries, and Ray workers, which lack the repo root, could not unpickle its classes)."""
    names = sorted(n for n in project_modules() if not n.startswith("uvd.demo"))
    code = "import importlib\n" + "".join(f"importlib.import_module({n!r})\n" for n in names) + (
        "import uvd.tokenizer as T\nfor name in T.__all__: getattr(T, name)\n"
        "from uvd import registry\nfor name in registry.PLUGINS: registry.plugin(name)\n")
    loaded = _modules_after(code)
    assert "uvd.pipelines" in loaded and "uvd.model" in loaded
    assert not loaded & {"pipelines", "tokenizer", "model", "demo"}
