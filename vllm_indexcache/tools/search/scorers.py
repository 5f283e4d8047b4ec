"""Scorers for the greedy search: pattern → loss on the fixed calibration set (lower is better).

Objectives (:mod:`.objectives`):

* ``lm-loss``, ``long-lm``, ``retrieval`` — weighted next-token NLL over targets built once at construction from the
  calibration windows (the paper's mean NLL; + key tokens that depend on distant context; + answer tokens of
  synthetic needle documents). Each engine only has to return token log-probs (:meth:`logprobs`).
* ``kl`` — mean over calibration positions of ``KL(p_allF ‖ p_pattern)`` between the all-F model's next-token
  distribution and the pattern's. Needs no labels (the tokens only condition the model), so a user's own prompts
  will do. The all-F log-probabilities are computed once, at construction.

Both scorers also answer the search's retrieval gate (:meth:`probe`).

Engines:

* :class:`HFScorer` (``--engine hf``) — the transformers reference (:mod:`vllm_indexcache.tools.reference`) with
  ``ties="lower"`` (deterministic top-k; DeepSeek-V4: transformers' own, the only rule its reference has), patterns
  switched in place with ``set_pattern``; the search's calibration passes reuse the current pattern's layer outputs
  (:mod:`.layer_cache`), so a flip at layer j runs layers ≥ j. By default on the reference's fast path
  (``reference.set_fast``: top-k attention through SDPA, causal row-chunked top-k; equal to the eager reference up to
  float rounding), with the LM head only at the weighted positions of a needle document.
* :class:`VLLMScorer` (``--engine vllm``) — vLLM with the INDEXCACHE plugin, prompt log-probabilities. The engine is
  built once with every layer F; a pattern is applied with the plugin's own run-time switch, which its model
  classes install on every stage (:mod:`vllm_indexcache.vllm_glue.switch`: an S layer's indexer returns at once and
  the layer attends over the top-k buffer as the preceding F layer left it), through ``LLM.apply_model`` — no
  weight reload, and it reaches every tensor/pipeline-parallel worker. Each evaluation checks, on every worker, the
  pattern the layers read back after the switch and the one they ran in the evaluation (:func:`check_switched`).
  The worker-side functions are :mod:`vllm_indexcache.vllm_glue.hooks`. ``apply_model`` ships a function to the
  workers, which vLLM allows only with ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``; the scorer sets it for the engine
  it builds. For ``kl``, vLLM hands back log-probs of given tokens only, so the full prompt logits are captured
  inside the worker (forward hook on the model's ``logits_processor``) and the KL is computed there against the
  all-F reference kept on the worker (``vocab × tokens`` floats per calibration sequence).
"""
from __future__ import annotations

import functools
import os

import numpy as np

from vllm_indexcache.tools.search import objectives as obj
from vllm_indexcache.tools.search.objectives import OBJECTIVES, ObjectiveOptions
from vllm_indexcache.vllm_glue import hooks

ENGINES = ("hf", "vllm")


def topk_tokens(config) -> int:
    """Tokens one query's top-k covers: ``index_topk``, times the CSA compress ratio (4) for DeepSeek-V4, whose
    indexer picks compressed entries of 4 tokens (a sequence up to this long is attended densely by every pattern).
    ``config``: a ``PretrainedConfig`` or a ``config.json`` dict."""
    from vllm_indexcache.families import family_for
    from vllm_indexcache.families.base import config_value
    from vllm_indexcache.families.deepseek_v4 import CSA_RATIO, FAMILY

    k = int(config_value(config, "index_topk"))
    return k * CSA_RATIO if family_for(config) is FAMILY else k


class PatternSwitchError(RuntimeError):
    """A pattern the vLLM workers did not apply (one line, naming the layers): every candidate would score alike."""


def check_switched(pattern: str, applied: list, pipeline_parallel_size: int = 1, observed: bool = False) -> None:
    """Check the local patterns :func:`vllm_indexcache.vllm_glue.hooks.apply_pattern` returned (one per worker,
    ``"."`` for layers not on that worker) — or, with ``observed``, what the layers did in the evaluation that
    followed (:func:`~vllm_indexcache.vllm_glue.hooks.observed_pattern`) — against ``pattern``: every layer must
    read back its F/S on each of the ``len(applied) / pipeline_parallel_size`` workers that hold it (its
    tensor-parallel ranks).

    Raises:
        PatternSwitchError: a layer not switched on every worker that holds it (a model without the plugin's switch,
            a worker that kept the old value, a layer no worker holds, an indexer that ran in an S layer or was
            skipped in an F layer).
    """
    want = max(1, len(applied) // max(1, pipeline_parallel_size))
    bad = []
    for i, c in enumerate(pattern):
        got = [(a[i] if isinstance(a, str) and len(a) == len(pattern) else ".") for a in applied]
        if sum(g == c for g in got) != want or any(g not in (".", c) for g in got):
            bad.append(i)
    if bad:
        what = "did not run as switched" if observed else "were not switched"
        raise PatternSwitchError(
            f"pattern {pattern}: layers {bad} {what} on every vLLM worker ({'observed' if observed else 'applied'}: "
            f"{', '.join(repr(a) for a in applied)}); every candidate would score the same, so the search stops")


class _WeightedScorer:
    """What both engines share: the weighted-NLL objectives and the probe, over the engine's :meth:`logprobs`."""

    model_dir = None
    targets = None

    def _build_targets(self, seqs, options: ObjectiveOptions | None) -> None:
        options = options or ObjectiveOptions()
        options.check(self.objective)
        self.options = options
        if self.objective in obj.WEIGHTED:
            self.targets = obj.build_targets(
                self.objective, seqs, options,
                lambda ss: [lp for lp, _ in self.logprobs("F" * self.num_layers, ss)],
                lambda: obj.model_encoder(self.model_dir), index_topk=self.index_topk)

    @property
    def tokens_per_evaluation(self) -> int:
        """Tokens one call runs through the model."""
        return self.targets.tokens if self.targets is not None else int(sum(len(s) for s in self.seqs))

    def _weighted(self, pattern: str) -> float:
        return obj.weighted_nll(self.targets, [lp for lp, _ in self.logprobs(pattern, self.targets.seqs)])

    def probe(self, pattern: str, docs) -> float:
        """Retrieval-probe accuracy of ``pattern`` (:func:`.objectives.probe_accuracy`)."""
        return obj.probe_accuracy(docs, lambda ss: [t for _, t in self.logprobs(pattern, ss)])


class HFScorer(_WeightedScorer):
    """Transformers scorer (see module docstring).

    Args:
        model_dir: DeepSeek-V3.2 / GLM-5 style checkpoint directory.
        seqs: calibration token-id lists (each ≥ 2 tokens).
        objective: one of :data:`OBJECTIVES`.
        device: torch device ("cpu", "cuda", ...).
        dtype: parameter dtype name ("float32", "bfloat16").
        model: an already loaded reference model (switched in place) instead of loading ``model_dir``.
        options: :class:`.objectives.ObjectiveOptions` of the objective.
        layer_cache: keep the layer outputs of the search's current pattern (:mod:`.layer_cache`; exact, costs
            memory: two copies of every layer's output over the scored sequences).
        fast: the reference's fast path (:func:`vllm_indexcache.tools.reference.set_fast`: top-k attention through
            SDPA, causal row-chunked top-k; losses equal to the eager reference's up to float rounding) on
            DeepSeek-V3.2 and GLM-5 models; DeepSeek-V4 always runs the eager reference.

    Raises:
        ObjectiveError: bad objective or options, or targets the calibration data cannot provide.
    """

    engine = "hf"

    def __init__(self, model_dir, seqs, objective: str = "lm-loss", device: str = "cpu", dtype: str = "float32",
                 model=None, options: ObjectiveOptions | None = None, layer_cache: bool = True, fast: bool = True):
        import torch

        from vllm_indexcache.tools.reference import load_reference

        if objective not in OBJECTIVES:
            raise ValueError(f"--objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
        self.torch = torch
        self.model_dir = model_dir
        self.objective = objective
        if model is None:
            from vllm_indexcache.tools.reference import model_class

            # DeepSeek-V4's reference keeps transformers' own top-k (no "lower" tie rule for its compressed entries)
            ties = "transformers" if model_class(model_dir).__name__ == "DeepseekV4ForCausalLM" else "lower"
            model = load_reference(str(model_dir), dtype=getattr(torch, dtype), ties=ties).to(device)
        self.model = model
        self.fast = fast and type(model).__name__ != "DeepseekV4ForCausalLM"
        self.device = next(self.model.parameters()).device
        from vllm_indexcache.families import family_for

        self.num_layers = family_for(type(self.model).__name__).num_indexer_layers(self.model.config)
        self.index_topk = topk_tokens(self.model.config)
        self.seqs = [torch.tensor([s], dtype=torch.long, device=self.device) for s in seqs]
        self.cache = None
        self.reference = None
        self._keep = None                           # logits_to_keep of the next forward (:meth:`_weighted`)
        if objective == "kl":
            self.reference = [self._logp("F" * self.num_layers, x) for x in self.seqs]
        self._build_targets(seqs, options)
        if layer_cache:
            from vllm_indexcache.tools.search.layer_cache import LayerInputCache

            self.cache = LayerInputCache(self.model, self._logits)

    def _logits(self, pattern: str, x):
        from vllm_indexcache.tools.reference import get_fast, set_fast, set_pattern

        if get_fast(self.model) != self.fast:       # a model shared between scorers
            set_fast(self.model, self.fast)
        set_pattern(self.model, pattern)
        keep = {} if self._keep is None else {"logits_to_keep": self._keep}
        with self.torch.no_grad():
            return self.model(input_ids=x, use_cache=False, **keep).logits[0]

    def _logp(self, pattern: str, x, key=None, shift: bool = True):
        """``[S − 1, vocab]`` float32 log-probs (``shift=False``: of every row the model returned); ``key`` (index in
        the scored set) routes through the layer cache."""
        if self.cache is None or key is None:
            logits = self._logits(pattern, x)
        else:
            with self.torch.no_grad():
                logits = self.cache.logits(pattern, key, x)
        return self.torch.log_softmax((logits[:-1] if shift else logits).float(), dim=-1)

    def _weighted(self, pattern: str) -> float:
        """The weighted NLL; with ``fast``, a sequence weighted at few positions (a needle document: its answer
        tokens) gets the LM head and log-softmax at those positions only (transformers' ``logits_to_keep``), the
        others entering as 0 · 0."""
        if not self.fast:
            return super()._weighted(pattern)
        torch = self.torch
        lps = []
        for i, (s, w) in enumerate(zip(self.targets.seqs, self.targets.weights)):
            rows = np.flatnonzero(w)
            if 2 * len(rows) > len(w):
                lps.append(self.logprobs(pattern, self.targets.seqs[i:i + 1], key=i)[0][0])
                continue
            x = torch.tensor([list(s)], dtype=torch.long, device=self.device)
            self._keep = torch.as_tensor(rows, device=self.device)
            try:
                logp = self._logp(pattern, x, i, shift=False)                  # [len(rows), vocab]
            finally:
                self._keep = None
            lp = np.zeros(len(w), dtype=np.float64)
            lp[rows] = logp.gather(1, x[0, rows + 1, None])[:, 0].double().cpu().numpy()
            lps.append(lp)
        return obj.weighted_nll(self.targets, lps)

    def set_base(self, pattern: str) -> None:
        """The search's current pattern (its one-flip neighbours are scored next; :mod:`.layer_cache`)."""
        if self.cache is not None:
            self.cache.set_base(pattern)

    def logprobs(self, pattern: str, seqs, key: int | None = None) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: float64 ``[len − 1]`` token log-probs and bool ``[len − 1]`` is-argmax, under ``pattern``.
        ``key``: ``seqs`` is the one sequence of the scored set at that index (layer-cached)."""
        scored = self.targets is not None and seqs is self.targets.seqs   # the search's set: layer-cached
        out = []
        for i, s in enumerate(seqs):
            x = self.torch.tensor([list(s)], dtype=self.torch.long, device=self.device)
            logp = self._logp(pattern, x, i if scored else key)
            tgt = x[0, 1:, None]
            out.append((logp.gather(1, tgt)[:, 0].double().cpu().numpy(),
                        (logp.argmax(-1) == tgt[:, 0]).cpu().numpy()))
        return out

    def __call__(self, pattern: str) -> float:
        if self.objective != "kl":
            loss = self._weighted(pattern)
        else:
            torch = self.torch
            total, count = 0.0, 0
            for i, x in enumerate(self.seqs):
                logp = self._logp(pattern, x, i)
                ref = self.reference[i]
                total += float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))
                count += x.shape[1] - 1
            loss = total / count
        if self.cache is not None:
            self.cache.finish(pattern, loss)
        return loss

    def close(self) -> None:
        pass


class VLLMScorer(_WeightedScorer):
    """vLLM scorer (see module docstring).

    Args:
        model_dir: checkpoint directory.
        seqs: calibration token-id lists.
        objective: one of :data:`OBJECTIVES` (KL: prompt logits captured by a forward hook on the model's
            ``logits_processor`` inside the worker that computes them, compared there with the all-F reference;
            one request per ``generate`` call so captured rows map to one sequence; needs the whole prompt in one
            prefill chunk, which the scorer's ``max_num_batched_tokens`` ensures).
        dtype: model dtype for vLLM.
        tensor_parallel_size, pipeline_parallel_size: passed to ``vllm.LLM``.
        options: :class:`.objectives.ObjectiveOptions` of the objective.
        llm_kwargs: more ``vllm.LLM`` keyword arguments (e.g. ``kv_cache_memory_bytes`` on CPU).

    The engine is built with ``skip_tokenizer_init=True`` (calibration is token ids; no detokenization).
    """

    engine = "vllm"

    def __init__(self, model_dir, seqs, objective: str = "lm-loss", dtype: str = "float32",
                 tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                 options: ObjectiveOptions | None = None, **llm_kwargs):
        import json
        from pathlib import Path

        if objective not in OBJECTIVES:
            raise ValueError(f"--objective={objective!r}: expected one of {', '.join(OBJECTIVES)}")
        os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
        from vllm import LLM, SamplingParams

        config = json.loads((Path(model_dir) / "config.json").read_text())
        from vllm_indexcache.families import family_for

        self.num_layers = family_for(config).num_indexer_layers(config)
        self.index_topk = topk_tokens(config)
        self.model_dir = model_dir
        self.objective = objective
        self.seqs = [list(map(int, s)) for s in seqs]
        self.pipeline_parallel_size = pipeline_parallel_size
        kwargs = dict(attention_backend="indexcache", dtype=dtype, enforce_eager=True,
                      max_model_len=max(len(s) for s in self.seqs) + 8,
                      max_num_batched_tokens=max(2048, max(len(s) for s in self.seqs) + 8),
                      hf_overrides={"index_topk_pattern": "F" * self.num_layers},
                      tensor_parallel_size=tensor_parallel_size, pipeline_parallel_size=pipeline_parallel_size,
                      seed=0, skip_tokenizer_init=True)
        kwargs.update(llm_kwargs)
        self.llm = LLM(model=str(model_dir), **kwargs)
        self.params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        self.pattern = None
        if objective == "kl":
            self.set_pattern("F" * self.num_layers)
            self.llm.apply_model(hooks.kl_reset)
            for i, seq in enumerate(self.seqs):
                self._generate([{"prompt_token_ids": seq}])
                stored = self.llm.apply_model(functools.partial(hooks.kl_store, i, len(seq) - 1))
                if not any(stored):
                    raise RuntimeError("--objective kl: no worker captured prompt logits")
        self._build_targets(self.seqs, options)

    def set_pattern(self, pattern: str) -> list[str]:
        """Apply ``pattern`` on every worker (no reload); returns each worker's local pattern.

        Raises:
            PatternSwitchError: a layer not switched on every worker that holds it (:func:`check_switched`).
        """
        self.pattern = None
        out = self.llm.apply_model(functools.partial(hooks.apply_pattern, pattern))
        check_switched(pattern, out, self.pipeline_parallel_size)
        self.pattern = pattern
        return out

    def _generate(self, prompts: list[dict]):
        """``LLM.generate`` under the applied pattern, then check on every worker that each layer did what the
        pattern says (:func:`check_switched` with ``observed``).

        Raises:
            PatternSwitchError: a layer ran its indexer while S, or skipped it while F, on some worker.
        """
        outs = self.llm.generate(prompts, self.params, use_tqdm=False)
        check_switched(self.pattern, self.llm.apply_model(hooks.observed_pattern), self.pipeline_parallel_size,
                       observed=True)
        return outs

    def __call__(self, pattern: str) -> float:
        self.set_pattern(pattern)
        if self.objective == "kl":
            total, count = 0.0, 0
            for i, seq in enumerate(self.seqs):
                self._generate([{"prompt_token_ids": seq}])
                parts = [x for x in self.llm.apply_model(functools.partial(hooks.kl_score, i, len(seq) - 1))
                         if x is not None]
                total += parts[0]
                count += len(seq) - 1
            return total / count
        return self._weighted(pattern)

    def logprobs(self, pattern: str, seqs) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per sequence: float64 ``[len − 1]`` prompt-token log-probs and bool ``[len − 1]`` is-argmax (vLLM's
        rank 1), under ``pattern``."""
        if pattern != self.pattern:
            self.set_pattern(pattern)
        outs = self._generate([{"prompt_token_ids": list(s)} for s in seqs])
        res = []
        for seq, out in zip(seqs, outs):
            entries = [entry[tok] for tok, entry in zip(seq[1:], out.prompt_logprobs[1:])]
            res.append((np.asarray([e.logprob for e in entries], dtype=np.float64),
                        np.asarray([e.rank == 1 for e in entries], dtype=bool)))
        return res

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            del self.llm
            import gc

            gc.collect()
