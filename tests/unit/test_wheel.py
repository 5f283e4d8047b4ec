"""The package installs anywhere: a wheel built from this checkout, installed non-editable into a scratch folder,
resolves a preset from outside the repository (presets are package data, read with importlib.resources)."""
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_wheel_install_resolves_presets_outside_the_repository(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                           str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = next((tmp_path / "dist").glob("vllm_indexcache-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert sorted(n for n in names if n.startswith("vllm_indexcache/configs/")) == \
        sorted(f"vllm_indexcache/configs/{p.name}" for p in (REPO / "configs").glob("*.json"))
    assert "vllm_indexcache_vllm_alias.pth" in names
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    code = ("import vllm_indexcache, vllm_indexcache.pattern as p; "
            "print(vllm_indexcache.__file__); print(p.load_preset('glm5-searched-1of4').num_layers); "
            "print(p.presets_dir())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr[-3000:]
    where, layers, presets = out.stdout.split()
    assert where.startswith(str(target)) and layers == "78" and presets.startswith(str(target))
