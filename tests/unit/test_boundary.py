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
