"""Training-aware IndexCache: multi-layer indexer distillation (paper arXiv 2603.12201, Eq. 1).

See :mod:`vllm_indexcache.tools.distill.loss` (the loss and the hook-based distiller) and
:mod:`vllm_indexcache.tools.distill.cli` (``vllm-indexcache distill``).
"""
from .loss import (
                   DistillLoss,
                   MultiLayerIndexerDistiller,
                   attention_target,
                   indexer_log_probs,
                   indexer_scores,
                   kl_rows,
                   multi_layer_indexer_loss,
                   served_layers,
                   support_from_topk,
                   visible_from_mask,
)

__all__ = ["DistillLoss", "MultiLayerIndexerDistiller", "attention_target", "indexer_log_probs", "indexer_scores",
           "kl_rows", "multi_layer_indexer_loss", "served_layers", "support_from_topk", "visible_from_mask"]
