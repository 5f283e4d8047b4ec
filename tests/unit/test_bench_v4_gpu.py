"""scripts/bench_v4_gpu.py without a GPU: configuration names → patterns over the toy's CSA layers, the greedy-token
comparison, the KV report on real vLLM KV-cache specs (packed pool bytes per block), and the rendered table."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("bench_v4_gpu", REPO / "scripts" / "bench_v4_gpu.py")
bench = importlib.util.module_from_spec(_spec)
sys.modules["bench_v4_gpu"] = bench
_spec.loader.exec_module(bench)


def test_config_names_resolve_over_csa_layers():
    assert bench.config_spec("none", 8) == {"pattern": None, "plugin": False, "split": False}
    assert bench.config_spec("plugin-1", 8) == {"pattern": "FFFFFFFF", "plugin": True, "split": False}
    assert bench.config_spec("plugin-1+split", 8) == {"pattern": "FFFFFFFF", "plugin": True, "split": True}
    with pytest.raises(SystemExit, match="the one suffix is"):
        bench.config_spec("plugin-1+fast", 8)
    assert bench.config_spec("plugin-1/2", 8)["pattern"] == "FSFSFSFS"
    assert bench.config_spec("plugin-1/4", 8)["pattern"] == "FSSSFSSS"
    assert bench.config_spec("plugin-FFSS", 4)["pattern"] == "FFSS"
    with pytest.raises(SystemExit, match="bad entry 'native-1/2'"):
        bench.config_spec("native-1/2", 8)


def test_token_check_reports_first_mismatch():
    same = {"tokens": {"3000": [5, 6, 7], "9000": [1, 2, 3]}}
    assert bench.token_check({"none": same, "plugin-1": same}) == {"prompts": 2, "identical": True,
                                                                   "first_mismatch": None}
    other = {"tokens": {"3000": [5, 6, 7], "9000": [1, 9, 3]}}
    check = bench.token_check({"none": same, "plugin-1": other})
    assert not check["identical"]
    assert check["first_mismatch"] == {"prompt_len": 9000, "index": 1, "none": [2, 3], "plugin-1": [9, 3],
                                       "none_top2_gap": None}
    with_gaps = dict(same, top2_gaps={"9000": [0.5, 0.03125, 1.0]})
    assert bench.token_check({"none": with_gaps, "plugin-1": other})["first_mismatch"]["none_top2_gap"] == 0.03125
    assert bench.token_check({"plugin-1": same}) is None


def test_top2_gap_of_a_step():
    lp = lambda v: type("Logprob", (), {"logprob": v})()  # noqa: E731  (vLLM's Logprob: .logprob)
    assert bench._top2_gap({7: lp(-0.25), 3: lp(-1.0), 9: lp(-0.5)}) == 0.25
    assert bench._top2_gap({7: lp(-0.25)}) is None


#: vLLM 0.26's page bytes per 256-token block (``kv_cache_interface.py`` MLAAttentionSpec.real_page_size_bytes,
#: rounded up to the 576-byte alignment): CSA compressed KV 64 x 584, indexer K 64 x 132, HCA compressed KV 2 x 584
C4A, C4I, C128A = 37440, 8640, 1728


def test_kv_report_on_the_engines_groups():
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    page = lambda b: SimpleNamespace(page_size_bytes=b, block_size=256)  # noqa: E731
    specs = {"model.layers.1.attn": page(C4A), "model.layers.2.attn": page(C4A),
             "model.layers.1.attn.indexer.k_cache": page(C4I), "model.layers.3.attn": page(C128A)}
    uniform = object.__new__(UniformTypeKVCacheSpecs)   # vLLM 0.32's __post_init__ checks fields 0.26 lacks
    object.__setattr__(uniform, "kv_cache_specs", specs)
    group = SimpleNamespace(layer_names=list(specs), kv_cache_spec=uniform)
    worker = SimpleNamespace(model_runner=SimpleNamespace(kv_cache_config=SimpleNamespace(
        kv_cache_groups=[group], num_blocks=7)))
    kv = bench.kv_report(worker)
    assert kv["kinds"]["compressed_kv"] == {"layers": 3, "page_bytes": 2 * C4A + C128A, "block_size": 256}
    assert kv["kinds"]["indexer_k"] == {"layers": 1, "page_bytes": C4I, "block_size": 256}
    assert kv["pool_bytes_per_block"] == 2 * C4A + C4I + C128A and kv["num_blocks"] == 7 and kv["groups"] == 1
    assert bench._per_token(kv["kinds"], "indexer_k") == "33.75" and bench._per_token(kv["kinds"], "swa") == "0"


def test_kv_pool_counts_shared_slots_once_per_page_size():
    # two groups whose layers share slots per page size (vLLM's _bucket_layers_by_page_size): 2 + 1 slots, not 3 + 1
    a = SimpleNamespace(layer_names=["l.1.attn", "l.2.attn"], kv_cache_spec=SimpleNamespace(page_size_bytes=C4A,
                                                                                           block_size=256))
    b = SimpleNamespace(layer_names=["l.1.attn.compressor.state_cache"],
                        kv_cache_spec=SimpleNamespace(page_size_bytes=C4A, block_size=4))
    worker = SimpleNamespace(model_runner=SimpleNamespace(kv_cache_config=SimpleNamespace(
        kv_cache_groups=[a, b], num_blocks=1)))
    kv = bench.kv_report(worker)
    assert kv["pool_bytes_per_block"] == 2 * C4A
    assert kv["kinds"]["compressor_state"] == {"layers": 1, "page_bytes": C4A, "block_size": 4}


def test_render_shows_speedups_against_all_f():
    def run(pattern, ttft, layers):
        st = {"median": ttft, "min": ttft, "max": ttft, "n": 3}
        return {"pattern": pattern, "kv_capacity": {"tokens": 1000}, "skipped": [],
                "kv": {"kinds": {"indexer_k": {"layers": layers, "page_bytes": 8640 * layers, "block_size": 256}},
                       "pool_bytes_per_block": 100},
                "contexts": {"32768": {"ttft": st, "tpot": st}}, "tokens": {}}
    md = bench.render({"plugin-1": run("FFFF", 2.0, 4), "plugin-1/2": run("FSFS", 1.0, 2)}, {"device": "X"})
    rows = md.splitlines()
    assert rows[0].startswith("| config | pattern | KV tokens | indexer-K layers | indexer K B/token")
    assert "| plugin-1/2 | `FSFS` | 1,000 | 2 | 67.5 |" in rows[3] and "1.000 [1.000–1.000] n=3 (2.00×)" in rows[3]
    assert "(2.00×)" not in rows[2]


def test_profile_summary_reads_vllms_profiler_table(tmp_path):
    """The table vLLM's torch profiler writes on stop (``key_averages().table(sort_by="self_cuda_time_total")``):
    totals per profiled step in ms, the kernels' self CUDA time per step, the table copied beside the JSON."""
    sep = "  ".join(["-" * 40] + ["-" * 12] * 10)
    cols = ["Self CPU %", "Self CPU", "CPU total %", "CPU total", "CPU time avg", "Self CUDA", "Self CUDA %",
            "CUDA total", "CUDA time avg", "# of Calls"]
    row = lambda name, *v: "  ".join([f"{name:>40}"] + [f"{x:>12}" for x in v])  # noqa: E731
    table = "\n".join([sep, row("Name", *cols), sep,
                       row("execute_context_0(0)_generation_16(16)", "0.00%", "0.000us", "0.00%", "0.000us",
                           "0.000us", "120.000ms", "400.00%", "120.000ms", "700.000us", "180"),   # a range
                       row("flash_fwd_splitkv_mla_fp8_sparse", "0.00%", "0.000us", "0.00%", "0.000us", "0.000us",
                           "12.000ms", "40.00%", "12.000ms", "75.000us", "160"),
                       row("void deep_gemm::sm90_fp8_paged_mqa_logits<1u,...", "0.00%", "0.000us", "0.00%",
                           "0.000us", "0.000us", "3.000ms", "10.00%", "3.000ms", "9.000us", "48"),
                       row("cudaLaunchKernel", "12.50%", "25.000ms", "12.50%", "25.000ms", "5.000us", "0.000us",
                           "0.00%", "0.000us", "0.000us", "5000"),
                       sep, "Self CPU time total: 1.500s", "Self CUDA time total: 30.000ms", ""])
    prof = tmp_path / "prof"
    prof.mkdir()
    (prof / "profiler_out_0.txt").write_text(table)
    out = bench.profile_summary(prof, tmp_path / "plugin-1.profile.txt", steps=10)
    assert out["self_cpu_ms"] == pytest.approx(150.0) and out["self_cuda_ms"] == pytest.approx(3.0)
    assert out["top_kernels_ms_per_step"] == {"flash_fwd_splitkv_mla_fp8_sparse": pytest.approx(1.2),
                                              "void deep_gemm::sm90_fp8_paged_mqa_logits<1u,...": pytest.approx(0.3),
                                              "cudaLaunchKernel": 0.0}
    assert out["indexer_ms_per_step"] == pytest.approx(0.3) and out["indexer_share"] == pytest.approx(0.1)
    assert (tmp_path / "plugin-1.profile.txt").read_text() == table
