"""The CPU-side logic of the GPU scripts (no GPU, no engine): the 61-layer config ``scripts/search_gpu.py`` hands vLLM
and the with/without-speculation comparison of ``scripts/check_mtp_gpu.py``."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import check_mtp_gpu  # noqa: E402
import search_gpu  # noqa: E402


def test_search_config_is_61_layers_of_v32_attention_with_a_dense_mlp(tmp_path):
    from vllm_indexcache.families import family_for

    geometry = dict(search_gpu.V32_GEOMETRY, intermediate_size=1024)
    path = search_gpu.write_config(tmp_path / "m", 61, geometry, max_pos=8192)
    cfg = json.loads((path / "config.json").read_text())
    assert sorted(p.name for p in path.iterdir()) == ["config.json"]          # no weights written
    assert family_for(cfg).num_indexer_layers(cfg) == 61 and cfg["first_k_dense_replace"] == 61
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["q_lora_rank"], cfg["kv_lora_rank"],
            cfg["qk_rope_head_dim"], cfg["index_n_heads"], cfg["index_head_dim"], cfg["index_topk"]) == \
        (7168, 128, 1536, 512, 64, 64, 128, 2048)
    assert cfg["intermediate_size"] == 1024 and cfg["max_position_embeddings"] == 8192
    assert cfg["architectures"] == ["DeepseekV32ForCausalLM"]
    assert all(k in cfg for k in family_for(cfg).implied)                      # vLLM-only DSA keys explicit


def test_algorithm1_count_for_61_layers_to_a_quarter():
    from fractions import Fraction

    from vllm_indexcache.tools.search import algorithm as alg

    target = alg.target_f_count(61, Fraction(1, 4))
    assert target == 16
    assert alg.total_evaluations(61, target, alg.pp_blocks(61, 1)) + 1 == 61 * 60 // 2 - 16 * 15 // 2 + 1 == 1711


def test_mtp_comparison_reports_the_gap_at_the_first_difference():
    plain = {"tokens": [[5, 6, 7], [1, 2]], "top2_gaps": [[0.5, 0.0, 0.2], [1.0, 0.3]]}
    spec = {"tokens": [[5, 9, 7], [1, 2]], "vllm:spec_decode_num_draft_tokens": 8,
            "vllm:spec_decode_num_accepted_tokens": 6}
    row = check_mtp_gpu._compare(plain, spec)
    assert row["tokens_identical"] is False
    assert row["first_difference"] == {"prompt": 0, "position": 1, "plain_top2_gap": 0.0}
    assert row["acceptance_rate"] == pytest.approx(0.75) and row["plain_min_top2_gap"] == 0.0
    same = check_mtp_gpu._compare(plain, dict(spec, tokens=plain["tokens"]))
    assert same["tokens_identical"] is True and same["first_difference"] is None


def test_mtp_patterns_are_refused_in_one_line():
    proc = subprocess.run([sys.executable, str(SCRIPTS / "check_mtp_gpu.py"), "--patterns", "FFFF,SFFF"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--patterns: ['SFFF']" in proc.stderr


def test_gpu_session_refuses_an_unknown_step(tmp_path):
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_session.sh"), "nope"], capture_output=True, text=True,
                          env={"OUT": str(tmp_path), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert proc.returncode == 2 and "unknown step 'nope'" in proc.stdout


@pytest.mark.parametrize("args, rc", [(["--help"], 0), ([], 2)])
def test_gpu_session_usage_is_the_header_and_makes_no_out_dir(tmp_path, args, rc):
    out = tmp_path / "out"
    proc = subprocess.run(["bash", str(SCRIPTS / "gpu_session.sh"), *args], capture_output=True, text=True,
                          env={"OUT": str(out), "PATH": "/usr/bin:/bin"}, timeout=60)
    lines = proc.stdout.splitlines()
    assert proc.returncode == rc and lines[0].startswith("# One device command per step"), proc.stdout
    assert all(line.startswith("#") for line in lines) and "bg-v4" in proc.stdout, proc.stdout
    assert not out.exists()


def test_pack_v4_device_extras_help_downloads_nothing(tmp_path):
    """``--help`` prints the usage; it used to be taken as OUTDIR and ~116 MB of wheels were packed into ./--help."""
    proc = subprocess.run([sys.executable, str(SCRIPTS / "pack_v4_device_extras.py"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pack_v4_device_extras.py [-h] OUTDIR"), proc
    assert list(tmp_path.iterdir()) == []
