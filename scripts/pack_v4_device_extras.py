#!/usr/bin/env python3
"""Pack what CUDA vLLM 0.26's DeepSeek-V4 needs beyond the device vLLM pack (``shared/tools/device-vllm/build.py``
leaves out TileLang and the CUTLASS DSL), in pieces that fit device calls.

vLLM 0.26 runs V4's mHC hyper-connections only through TileLang kernels (``vllm/model_executor/kernels/mhc/
tilelang_kernels.py`` raises ``ImportError: tilelang is required for mhc`` on CUDA) and its head-512 KV compressor
only through a CuTe DSL kernel (``vllm/models/deepseek_v4/compressor.py``: ``head_dim == 512`` on CUDA imports
``nvidia/ops/sparse_attn_compress_cutedsl``, which imports ``cutlass``). vllm==0.26.0 pins ``tilelang==0.1.9`` and
``nvidia-cutlass-dsl[cu13]==4.6.0``; this script downloads those wheels and the requirements the H200/H100 image
lacks (``z3-solver``, ``torch-c-dlpack-ext``, the CUTLASS DSL's base/core/cu13 libraries, ``nvidia-cuda-nvdisasm``;
not the cu12 libraries), unpacks them into one tree, packs it as tar.xz and cuts it into 52 MB pieces.

    python3 scripts/pack_v4_device_extras.py .device/v4extras      # OUTDIR inside the repo, ignored by git

On the device, after the vLLM pack is unpacked into /root/site (device-vllm README), carry each piece in its own
call (``mkdir -p /root/v4parts && cp .device/v4extras/partN /root/v4parts/``), then once per machine:
``cat /root/v4parts/part* | xz -d -T0 | tar -x -C /root/site``, and run with
``PYTHONPATH=/root/site:/root/site/nvidia_cutlass_dsl/dsl_packages`` (the CUTLASS DSL puts ``dsl_packages`` on the
path from a ``.pth`` file, which Python reads only in site directories, not from ``PYTHONPATH``;
``scripts/bench_v4_gpu.py`` also adds it itself).
"""
import argparse
import glob
import os
import shutil
import subprocess
import sys
import tarfile
import zipfile

WHEELS = ["tilelang==0.1.9", "z3-solver==4.15.4.0", "torch-c-dlpack-ext==0.1.5", "nvidia-cutlass-dsl==4.6.0",
          "nvidia-cutlass-dsl-libs-base==4.6.0", "nvidia-cutlass-dsl-libs-core==4.6.0",
          "nvidia-cutlass-dsl-libs-cu13==4.6.0", "nvidia-cuda-nvdisasm==13.5.37",
          # the CuTe DSL compressor imports ``quack`` (quack-kernels; 0.6.0 is the release pinned to
          # nvidia-cutlass-dsl==4.6.0), which needs einops and apache-tvm-ffi: the 0.1.11 already in the device's
          # vLLM tree is kept (0.1.15 breaks ``import tilelang``, seen on an H100)
          "quack-kernels==0.6.0", "einops==0.8.2"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "any"]
PIECE = 52_000_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("outdir", metavar="OUTDIR", help="where the pieces go (e.g. .device/v4extras, ignored by git)")
    out = os.path.abspath(parser.parse_args().outdir)
    wheels, site = os.path.join(out, "work", "wheels"), os.path.join(out, "work", "site")
    os.makedirs(wheels, exist_ok=True)
    for spec in WHEELS:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", wheels, "--only-binary=:all:",
               "--python-version", "3.12", "--implementation", "cp"]
        for p in PLATFORMS:
            cmd += ["--platform", p]
        subprocess.run(cmd + [spec], check=True)
    shutil.rmtree(site, ignore_errors=True)
    os.makedirs(site)
    for whl in sorted(glob.glob(os.path.join(wheels, "*.whl"))):
        with zipfile.ZipFile(whl) as z:
            z.extractall(site)
    archive = os.path.join(out, "work", "v4extras.tar.xz")
    with tarfile.open(archive, "w:xz", preset=6) as tar:
        for name in sorted(os.listdir(site)):
            tar.add(os.path.join(site, name), arcname=name)
    for old in glob.glob(os.path.join(out, "part*")):
        os.remove(old)
    with open(archive, "rb") as f:
        i = 0
        while chunk := f.read(PIECE):
            with open(os.path.join(out, f"part{i}"), "wb") as g:
                g.write(chunk)
            i += 1
    size = os.path.getsize(archive)
    shutil.rmtree(os.path.join(out, "work"))
    print(f"{i} pieces in {out} ({size} bytes packed)")
    for n in range(i):
        print(f"  device call {n + 1}: mkdir -p /root/v4parts && cp {os.path.relpath(out)}/part{n} /root/v4parts/")
    print("  then: cat /root/v4parts/part* | xz -d -T0 | tar -x -C /root/site")
    return 0


if __name__ == "__main__":
    sys.exit(main())
