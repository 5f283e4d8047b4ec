"""Run-time hooks the tools use inside vLLM's workers (shipped there with ``LLM.apply_model``) or process: the
search's pattern switch and logits capture, the benchmark's indexer timing, and the tests' top-k capture.

* :func:`apply_pattern` / :func:`observed_pattern` — the plugin's own run-time F/S switch
  (:mod:`vllm_indexcache.vllm_glue.switch`: an S layer's indexer returns at once and its sparse MLA attends over the
  top-k buffer as the preceding F layer left it), and what each layer did since: patterns change without reloading
  weights, on every TP/PP worker, on any vLLM the plugin's model classes run on.
* :func:`kl_reset` / :func:`kl_store` / :func:`kl_score` — a forward hook on the model's ``logits_processor`` keeps
  the prompt logits of one request, so the KL objective is computed where the full distribution lives.
* :func:`time_lightning_indexer` — an observer of the CPU backend's indexer
  (:func:`vllm_indexcache.vllm_glue.cpu.indexer.add_observer`) that times the F layers' indexer per step kind
  (prefill / decode).
* :func:`capture_topk` / :func:`captured_topk` — an observer that keeps every F layer's top-k rows per step on each
  worker (TP ranks compared in ``tests/engine/test_tp_topk.py``).
"""
from __future__ import annotations


def apply_pattern(pattern: str, model) -> str:
    """Worker side of the search's vLLM scorer (``LLM.apply_model``): switch this worker's indexer layers to
    ``pattern`` (one F/S per indexer layer of the family) with the plugin's run-time switch
    (:class:`vllm_indexcache.vllm_glue.switch.PatternSwitch`, installed by the plugin's model classes on every
    stage; no vLLM attribute involved).

    Returns the applied local pattern, read back from the layers' gates (``"."`` for layers not on this worker; the
    search checks it on every worker, :func:`vllm_indexcache.tools.search.scorers.check_switched`); ``""`` for a
    model that is not one of the plugin's classes (no switch: the check then fails on every layer).

    DeepSeek-V4: ``pattern`` has one F/S per CSA layer, switched by detaching the S layers' indexers, which is how
    vLLM's V4 attention builds an S layer (:func:`vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe.
    apply_csa_pattern`; the V4 attention calls its indexer's parts from several places, so a gate on the indexer's
    ``forward`` alone would not stop it).

    Raises:
        SwitchError: a layer built without an indexer asked to be F (engine not built all-F), or a stage whose
            first indexer layer would be S without a top-k handoff.
    """
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import observe

    if observe.is_deepseek_v4(model):
        return observe.apply_csa_pattern(pattern, model)
    sw = _switch(model)
    return "" if sw is None else sw.apply(pattern)


def observed_pattern(model) -> str:
    """Worker side: what this worker's indexer layers did since :func:`apply_pattern` (``F`` ran its indexer, ``S``
    skipped it, ``?`` both, ``-`` never called, ``.`` not on this worker;
    :meth:`vllm_indexcache.vllm_glue.switch.PatternSwitch.observed`, for DeepSeek-V4
    :func:`~vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe.observed_csa_pattern`); ``""`` without the plugin's
    switch."""
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4 import observe

    if observe.is_deepseek_v4(model):
        return observe.observed_csa_pattern(model)
    sw = _switch(model)
    return "" if sw is None else sw.observed()


def _switch(model):
    """The model's installed switch, else the one its class installs on first use (``indexcache_switch``)."""
    sw = getattr(model, "_indexcache_switch", None)
    make = getattr(model, "indexcache_switch", None)
    return sw if sw is not None or make is None else make()


_KL = "_indexcache_kl"


def _kl_state(model) -> dict:
    """Worker side: the KL capture state kept on the model (hook on the logits processor, captured rows,
    reference log-probs per calibration sequence)."""
    st = model.__dict__.get(_KL)
    if st is None:
        st = {"captured": [], "reference": {}, "handle": None}
        proc = getattr(model, "logits_processor", None)
        if proc is not None:   # only the last pipeline stage computes logits
            def hook(module, args, out):
                if out is not None and out.dim() == 2:
                    st["captured"].append(out.detach().float())
            st["handle"] = proc.register_forward_hook(hook)
        object.__setattr__(model, _KL, st)
    return st


def kl_reset(model) -> None:
    _kl_state(model)["captured"].clear()


def _kl_prompt_logp(st: dict, num_rows: int):
    """The log-probs of the one request's prompt rows among the captured logits (the sampling call has 1 row)."""
    import torch

    rows = [t for t in st["captured"] if t.shape[0] > 1]
    st["captured"].clear()
    if not rows:
        return None
    logits = torch.cat(rows)
    if logits.shape[0] != num_rows:
        raise RuntimeError(f"captured {logits.shape[0]} prompt-logit rows, expected {num_rows} (chunked prefill?)")
    return torch.log_softmax(logits, dim=-1)


def kl_store(index: int, num_rows: int, model) -> bool:
    """Worker side: keep the captured prompt log-probs as the all-F reference of calibration sequence ``index``."""
    st = _kl_state(model)
    logp = _kl_prompt_logp(st, num_rows)
    if logp is None:
        return False
    st["reference"][index] = logp
    return True


def kl_score(index: int, num_rows: int, model):
    """Worker side: ``Σ_t KL(p_ref,t ‖ p_t)`` of the captured prompt log-probs against the stored reference."""
    import torch

    st = _kl_state(model)
    logp = _kl_prompt_logp(st, num_rows)
    if logp is None:
        return None
    ref = st["reference"][index]
    return float((ref.exp() * (ref - logp)).sum(dtype=torch.float64))


def time_lightning_indexer(seconds: dict, calls: dict):
    """Observe the CPU INDEXCACHE backend's indexer (:func:`vllm_indexcache.vllm_glue.cpu.indexer.add_observer`) so
    that each call of a real step adds its wall time (s) to ``seconds["prefill" | "decode"]`` and counts it in
    ``calls`` (a step whose query tokens equal its requests is decode). Returns the function that removes the
    observer."""
    from vllm_indexcache.vllm_glue.cpu.indexer import add_observer

    def timed(call) -> None:
        kind = "decode" if call.decode else "prefill"
        seconds[kind] += call.seconds
        calls[kind] += 1

    return add_observer(timed)


def time_v4_indexer(seconds: dict, calls: dict, model) -> int:
    """Worker side: time a DeepSeek-V4 engine's CSA indexers per step kind into ``seconds`` / ``calls``
    (:func:`vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe.time_indexer`); returns the indexers wrapped."""
    from vllm_indexcache.vllm_glue.cpu.deepseek_v4.observe import time_indexer

    return time_indexer(seconds, calls, model)


#: This process's top-k capture (:func:`capture_topk`): its records and whether inputs are kept; None until used.
_CAPTURE: dict | None = None


def capture_topk(model, inputs: bool = False) -> int:
    """Worker side (``LLM.apply_model``): from now on record, for every indexer call of the CPU INDEXCACHE backend
    (one per F layer per forward step, MTP layers included), the top-k rows it wrote.

    Each record is a dict: ``layer`` (int, global layer index from the indexer K-cache prefix), ``topk``
    (``[T, index_topk]`` int32, a copy of ``topk_indices_buffer[:T]`` right after the indexer wrote it: request-local
    key positions, -1 padding), ``positions`` (``[T]`` int64), ``query_start_loc`` (list of ``num_reqs + 1`` ints);
    with ``inputs``, also this step's ``q [T,H,D]``, ``k [T,D]`` (model dtype, RoPE applied) and ``weights [T,H]``
    float32, so that a single-request prefill's selection can be recomputed from its own scores. Profile/dummy runs
    are not recorded. Calling it again clears the records (the observer is added once per process).

    Returns the worker's tensor-parallel rank. Source of the records: the observers of
    :mod:`vllm_indexcache.vllm_glue.cpu.indexer` (CPU only; CUDA engines do not call them).
    """
    from vllm.distributed import get_tensor_model_parallel_rank

    from vllm_indexcache.vllm_glue.cpu.indexer import add_observer

    global _CAPTURE
    if _CAPTURE is None:
        st = _CAPTURE = {"records": [], "inputs": False}

        def recording(call) -> None:
            T = call.topk.shape[0]
            rec = {"layer": call.layer, "topk": call.topk.clone(), "positions": call.positions.clone(),
                   "query_start_loc": [int(x) for x in call.query_start_loc]}
            if st["inputs"]:
                rec.update(q=call.q[:T].detach().clone(), k=call.k[:T].detach().clone(),
                           weights=call.weights[:T].detach().clone())
            st["records"].append(rec)

        add_observer(recording)
    _CAPTURE["records"].clear()
    _CAPTURE["inputs"] = inputs
    return get_tensor_model_parallel_rank()


def captured_topk(model) -> tuple[int, list[dict]]:
    """Worker side: ``(tensor-parallel rank, records since capture_topk)``, see :func:`capture_topk`; the records
    are handed over and cleared. Tensors are returned as nested lists (``Tensor.tolist()``: exact for int32 and
    float32), since ``collective_rpc`` results do not keep tensors as tensors across processes."""
    from vllm.distributed import get_tensor_model_parallel_rank

    st = _CAPTURE
    records = [] if st is None else [{k: v.tolist() if hasattr(v, "tolist") else v for k, v in rec.items()}
                                     for rec in st["records"]]
    if st is not None:
        st["records"].clear()
    return get_tensor_model_parallel_rank(), records
