"""The package's boundary to vLLM: only ``vllm_glue/`` imports vLLM internals; everything else uses vLLM's public API
(``from vllm import LLM, SamplingParams``, ``vllm.__version__``, ``vllm.inputs``, ``vllm.sampling_params``)."""
import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "vllm_indexcache"
#: vLLM modules a module outside vllm_glue/ may import, and the names it may take from ``vllm`` itself.
PUBLIC_MODULES = {"vllm", "vllm.inputs", "vllm.sampling_params", "vllm.outputs"}
PUBLIC_NAMES = {"LLM", "SamplingParams", "RequestOutput", "TokensPrompt", "__version__"}


def vllm_imports(path: Path):
    """``(line, module, names)`` of every import of a ``vllm`` module in ``path`` (any nesting)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "vllm" or alias.name.startswith("vllm."):
                    yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "vllm" or node.module.startswith("vllm."):
                yield node.lineno, node.module, [a.name for a in node.names]


def test_only_vllm_glue_imports_vllm_internals():
    offenders = []
    for path in sorted(PKG.rglob("*.py")):
        if "vllm_glue" in path.relative_to(PKG).parts:
            continue
        for line, module, names in vllm_imports(path):
            if module not in PUBLIC_MODULES or (module == "vllm" and not set(names) <= PUBLIC_NAMES):
                offenders.append(f"{path.relative_to(PKG.parent)}:{line}: {module} {names}")
    assert not offenders, "vLLM internals imported outside vllm_glue/:\n" + "\n".join(offenders)


def test_the_check_sees_an_internal_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from vllm.forward_context import get_forward_context\n    from vllm import LLM\n")
    assert [(m, n) for _, m, n in vllm_imports(bad)] == [("vllm.forward_context", ["get_forward_context"]),
                                                         ("vllm", ["LLM"])]


def test_every_patch_is_listed_once_with_its_versions():
    from vllm_indexcache.vllm_glue import PATCHES, TESTED

    targets = [p[0] for p in PATCHES]
    assert len(targets) == len(set(targets)) and all(len(p) == 6 and all(p) for p in PATCHES)
    assert TESTED == {"cpu": ("0.32.0",), "cuda": ("0.26.0",)}
    modules = {p[1].split(" ")[0] for p in PATCHES}
    for name in modules:                         # every module the table names exists in vllm_glue/
        assert (PKG / "vllm_glue" / (name.replace(".", "/") + ".py")).exists(), name


def test_version_check_names_the_tested_versions(caplog):
    import logging

    from vllm_indexcache.vllm_glue import check_version

    with caplog.at_level(logging.WARNING, logger="vllm.indexcache"):
        assert check_version("0.32.0+cpu", "cpu") and check_version("0.26.0", "cuda")
        assert not caplog.records
        assert not check_version("0.33.0", "cuda")
    assert len(caplog.records) == 1 and "0.33.0" in caplog.text and "(0.26.0)" in caplog.text


#: third-party packages only the toolkit needs (setup.py's ``tools`` extra); the serving path imports none of them
TOOLS_ONLY = {"matplotlib", "openai", "tqdm", "tokenizers", "safetensors", "transformers"}


def package_imports(path: Path, top: Path):
    """``(line, absolute module)`` of every import in ``path`` (relative imports resolved against its package, whose
    top-level folder is ``top``)."""
    pkg = list(path.relative_to(top.parent).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = pkg[: len(pkg) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module
            if not node.module:  # ``from . import x``: x may be a module
                for alias in node.names:
                    yield node.lineno, f"{module}.{alias.name}"


def serving_offenders(root: Path) -> list[str]:
    """Imports of the toolkit or of a tools-only package from any module of ``root`` outside ``tools/``."""
    offenders = []
    for path in sorted(root.rglob("*.py")):
        if "tools" in path.relative_to(root).parts:
            continue
        for line, module in package_imports(path, root):
            if module.startswith("vllm_indexcache.tools") or module.split(".")[0] in TOOLS_ONLY:
                offenders.append(f"{path.relative_to(root.parent)}:{line}: {module}")
    return offenders


def test_serving_path_imports_nothing_from_the_toolkit():
    """The plugin (everything outside ``vllm_indexcache/tools``) installs without the ``tools`` extra."""
    assert (PKG / "tools" / "search").is_dir() and (PKG / "vllm_glue").is_dir()
    offenders = serving_offenders(PKG)
    assert not offenders, "the serving path imports the toolkit or its dependencies:\n" + "\n".join(offenders)


def test_the_toolkit_check_sees_an_import(tmp_path):
    root = tmp_path / "vllm_indexcache"
    (root / "tools").mkdir(parents=True)
    (root / "tools" / "ok.py").write_text("import matplotlib\n")
    (root / "glue.py").write_text("def f():\n    from .tools import search\n    import tqdm.auto\n"
                                  "    from . import config, tools\n")
    assert serving_offenders(root) == ["vllm_indexcache/glue.py:2: vllm_indexcache.tools",
                                       "vllm_indexcache/glue.py:3: tqdm.auto",
                                       "vllm_indexcache/glue.py:4: vllm_indexcache.tools"]


def test_setup_keeps_tool_dependencies_in_the_extra():
    """``pip install vllm-indexcache`` pulls only what serving needs; the toolkit's packages come with ``[tools]``."""
    tree = ast.parse((PKG.parent / "setup.py").read_text())
    kwargs = {k.arg: k.value for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup"
              for k in n.keywords}
    requires = {ast.literal_eval(e).split(">")[0].split("=")[0] for e in kwargs["install_requires"].elts}
    extras = ast.literal_eval(kwargs["extras_require"])
    assert not requires & TOOLS_ONLY and TOOLS_ONLY <= {r.split(">")[0] for r in extras["tools"]}
