"""Training configuration (JSON or YAML), validated with pydantic. See ``examples/models/tiny-dsa/train.yaml``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Strict):
    """Geometry of a ``DeepseekV32ForCausalLM`` with a dense MLP in every layer."""
    vocab_size: int = 8192
    hidden_size: int = 384
    num_layers: int = Field(12, ge=1)
    num_heads: int = 6
    q_lora_rank: int = 192
    kv_lora_rank: int = 128
    qk_nope_head_dim: int = 64
    qk_rope_head_dim: int = 32
    v_head_dim: int = 96
    intermediate_size: int = 576
    index_n_heads: int = Field(4, ge=1)
    index_head_dim: int = 128
    index_topk: int = Field(128, ge=1)
    max_position_embeddings: int = 8192
    rope_theta: float = 10000.0
    init_std: float = 0.02

    @field_validator("index_head_dim")
    @classmethod
    def _idx_dim(cls, v: int) -> int:
        if v != 128:
            raise ValueError("index_head_dim must be 128 (vLLM 0.32 hard-codes the indexer quant block to 128)")
        return v

    @model_validator(mode="after")
    def _rope(self):
        if self.qk_rope_head_dim > self.index_head_dim or self.qk_rope_head_dim % 2:
            raise ValueError("qk_rope_head_dim must be even and <= index_head_dim")
        return self


class DataConfig(_Strict):
    dir: str = Field(description="directory written by scripts/prepare_tiny_dsa_data.py")
    context: int = 2048
    retrieval_fraction: float = Field(0.25, ge=0, le=1)
    max_needles: int = 8
    max_questions: int = 4
    pack_lengths: list[int] | None = Field(None, description="pack retrieval rows with sub-documents of these "
                                           "lengths, every needle asked (see data.retrieval.TrainBatches)")


class StageConfig(_Strict):
    name: str
    kind: Literal["dense", "warmup", "sparse"]
    steps: int = Field(ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = 1e-3
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    kl_weight: float = 1.0
    log_every: int = 10
    ckpt_every: int = 500


class TrainConfig(_Strict):
    run_dir: str
    seed: int = 0
    device: str = "auto"
    autocast_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    export_dtype: Literal["bfloat16", "float32"] = "bfloat16"
    export_max_shard: str = "15MB"
    compile: bool = False
    model: ModelConfig = ModelConfig()
    data: DataConfig
    stages: list[StageConfig]

    @model_validator(mode="after")
    def _stages(self):
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique: {names}")
        if self.model.index_topk * 16 > self.data.context:
            pass  # allowed (tests use tiny contexts); the shipped model keeps topk <= context/16
        return self


def load_config(path: str | Path, **overrides) -> TrainConfig:
    """Read a JSON or YAML training config; ``overrides`` replace top-level keys (e.g. ``run_dir``)."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        data = yaml.safe_load(text)
    else:
        data = json.loads(text)
    data.update({k: v for k, v in overrides.items() if v is not None})
    return TrainConfig.model_validate(data)
