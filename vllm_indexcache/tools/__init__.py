"""The IndexCache toolkit: what finds, checks and measures patterns, apart from the serving plugin.

Installed with the ``tools`` extra (``pip install 'vllm-indexcache[tools]'``): the transformers reference with
reuse (:mod:`.reference`), the greedy layer search (:mod:`.search`, Algorithm 1), multi-layer distillation
(:mod:`.distill`, Eq. 1), small-model training (:mod:`.training`), top-k overlap analysis (:mod:`.analyze`), the
speed benchmark (:mod:`.bench`), reliability checks (:mod:`.reliability`), calibration data (:mod:`.data`), toy
models (:mod:`.toy`) and test helpers (:mod:`.testing`). Nothing in the serving path (``vllm_indexcache`` outside
this package) imports from here.
"""
