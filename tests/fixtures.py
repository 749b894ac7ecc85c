"""Tiny fixtures the tests build themselves: random models of each family, a tokenizer,
and SAE files written the way each ecosystem writes them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

FAMILIES = ("gemma2", "gemma3", "llama", "qwen2", "qwen3", "gpt2")
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Sparse autoencoders split activations into features.",
    "def add(a, b):\n    return a + b\n",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "A wedding is a ceremony where two people are united in marriage.",
] * 4


def make_tokenizer(add_bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TEXTS, trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def make_config(family: str, vocab: int = 320):
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gemma2":
        return tf.Gemma2Config(**common, head_dim=8, sliding_window=16, query_pre_attn_scalar=8)
    if family == "gemma3":
        # head_dim 16: attn_z (64 wide) differs from d_model (32), as in real Gemma 3.
        return tf.Gemma3TextConfig(**common, head_dim=16, sliding_window=16,
                                   query_pre_attn_scalar=16)
    if family == "llama":
        return tf.LlamaConfig(**common)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=8)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                             bos_token_id=2, eos_token_id=1)
    raise ValueError(family)


def make_model_dir(family: str, path: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(family))
    with torch.no_grad():  # norms start at identity; perturb them so gains matter in tests
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(path)
    make_tokenizer(add_bos=family != "gpt2").save_pretrained(path)
    return path


# --- reference SAE math, written independently of saeflow.saes.sae --------------------------------
def ref_encode(x, W_enc, b_enc, b_dec, arch, threshold=None, k=None, apply_b_dec=False):
    x = x.double()
    if apply_b_dec:
        x = x - b_dec.double()
    pre = x @ W_enc.double() + b_enc.double()
    if arch == "relu":
        return pre.clamp(min=0)
    if arch == "jumprelu":
        return torch.where(pre > threshold.double(), pre, torch.zeros_like(pre)).clamp(min=0)
    if arch == "topk":
        out = torch.zeros_like(pre)
        for i in range(pre.shape[0]):
            idx = np.argsort(-pre[i].numpy(), kind="stable")[:k]
            out[i, idx] = pre[i, idx].clamp(min=0)
        return out
    raise ValueError(arch)


def ref_decode(z, W_dec, b_dec):
    return z.double() @ W_dec.double() + b_dec.double()


def random_weights(d_in=16, d_sae=48, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = {"W_enc": torch.randn(d_in, d_sae, generator=g) / d_in ** 0.5,
         "W_dec": torch.randn(d_sae, d_in, generator=g) / d_in ** 0.5,
         "b_enc": 0.1 * torch.randn(d_sae, generator=g),
         "b_dec": 0.1 * torch.randn(d_in, generator=g),
         "threshold": 0.1 + 0.2 * torch.rand(d_sae, generator=g)}
    return {k: v.to(dtype) for k, v in w.items()}


# --- writers in each ecosystem's format (as those tools lay files out) -----------------------
def write_saelens(folder: Path, w, arch="jumprelu", hook="blocks.1.hook_resid_post", k=None,
                  flat=False, apply_b_dec=None, model_name="tiny", drop_key=None):
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {n: w[n].contiguous() for n in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if arch == "jumprelu":
        tensors["threshold"] = w["threshold"].contiguous()
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    d_in, d_sae = w["W_enc"].shape
    dtype = str(w["W_enc"].dtype).removeprefix("torch.")
    if flat:  # SAELens < 6: flat keys, activation_fn_str
        cfg = {"d_in": d_in, "d_sae": d_sae, "hook_name": hook, "hook_layer": 1,
               "model_name": model_name, "dtype": dtype,
               "activation_fn_str": "topk" if arch == "topk" else "relu",
               "activation_fn_kwargs": {"k": k} if k else {},
               "apply_b_dec_to_input": True if apply_b_dec is None else apply_b_dec,
               "normalize_activations": "none"}
        if arch == "jumprelu":
            cfg["architecture"] = "jumprelu"
    else:
        cfg = {"architecture": {"relu": "standard"}.get(arch, arch), "d_in": d_in, "d_sae": d_sae,
               "dtype": dtype, "device": "cpu",
               "apply_b_dec_to_input": (arch != "jumprelu") if apply_b_dec is None else apply_b_dec,
               "normalize_activations": "none", "reshape_activations": "none",
               "metadata": {"model_name": model_name, "hook_name": hook, "prepend_bos": True}}
        if k:
            cfg["k"] = k
    if drop_key:
        cfg.pop(drop_key)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def write_gemmascope(root: Path, layer: int, w, width="16k", l0=82) -> Path:
    folder = root / f"layer_{layer}" / f"width_{width}" / f"average_l0_{l0}"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **{k: v.numpy() for k, v in w.items()})
    return folder


def write_gemmascope2(root: Path, position_folder: str, layer: int, w, hook_in: str,
                      width="16k", l0="medium") -> Path:
    from safetensors.torch import save_file

    folder = root / position_folder / f"layer_{layer}_width_{width}_l0_{l0}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"w_enc": w["W_enc"].contiguous(), "w_dec": w["W_dec"].contiguous(),
               "b_enc": w["b_enc"], "b_dec": w["b_dec"], "threshold": w["threshold"]},
              str(folder / "params.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "hf_hook_point_in": hook_in, "hf_hook_point_out": hook_in, "width": width,
        "model_name": "google/gemma-3-270m", "architecture": "jump_relu", "l0": l0,
        "affine_connection": False, "type": "sae"}))
    return folder


def write_sparsify(run: Path, hookpoint: str, w, k: int) -> Path:
    from safetensors.torch import save_file

    folder = run / hookpoint
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"encoder.weight": w["W_enc"].T.contiguous(), "encoder.bias": w["b_enc"],
               "W_dec": w["W_dec"].contiguous(), "b_dec": w["b_dec"]},
              str(folder / "sae.safetensors"))
    d_in, d_sae = w["W_enc"].shape
    (folder / "cfg.json").write_text(json.dumps({
        "expansion_factor": d_sae // d_in, "normalize_decoder": True, "num_latents": d_sae,
        "k": k, "multi_topk": False, "skip_connection": False, "d_in": d_in}))
    return folder


def make_tiny_run(model, root: Path, tokens: int = 1500) -> tuple[Path, "object"]:
    """A small real RUN on a tiny model: a random pack at every layer (residual, MLP,
    attention), its flow, feature index and statistics. Returns (run dir, pack)."""
    from saeflow.evolution.analyses import write_evolution_outputs
    from saeflow.evolution.stats import StatsConfig, run_stats
    from saeflow.features.index import IndexConfig, build_index
    from saeflow.flow.compute import run_flow
    from saeflow.saes.packs import save_pack
    from saeflow.saes.sae import random_sae

    d = model.d_model
    saes = [(p, L, random_sae(d, 32, "relu", seed=100 + 3 * L + i))
            for L in range(model.n_layers)
            for i, p in enumerate(("resid_post", "mlp_out", "attn_out"))]
    pack = save_pack(saes, root / "pack", model_name="tiny", d_model=d, n_layers=model.n_layers)
    run = root / "run"
    run_flow(pack, run, progress=False)
    build_index(pack, model, run, IndexConfig(tokens=tokens, batch_size=4, ctx_len=48, n_top=5,
                                              n_samples=4, encoder_dtype="float32"),
                progress=False)
    st = run_stats(pack, model, run, StatsConfig(tokens=tokens, batch_size=4, ctx_len=48,
                                                 pairs="adjacent", encoder_dtype="float32",
                                                 floor=0.05),
                   progress=False)
    write_evolution_outputs(run, st, pack, community_floor=0.05, gate_threshold=0.9,
                            gate_min_count=2, gate_min_up_count=2)
    return run, pack


def reference_splice_logprobs(model, batch, point, sae):
    """A hand-written ΔCE reference: (clean log-probs [T, V] float64, spliced log-probs, targets
    [T]) over the batch's scored tokens (content tokens after the first), with `sae`'s
    reconstruction replacing the activation at `point` on content tokens."""
    import torch

    from saeflow import Hooks

    dev = model.device
    ids, am, mask = (t.to(dev) for t in (batch.input_ids, batch.attention_mask,
                                          batch.content_mask()))
    tm = mask[:, 1:]

    def logprobs():
        return torch.log_softmax(model.hf(input_ids=ids, attention_mask=am)
                                 .logits[:, :-1][tm].double(), -1)

    def splice(a):
        out = a.clone()
        out[mask] = sae(a[mask])
        return out
    with torch.no_grad():
        lc = logprobs()
        with Hooks(model, edits={point: splice}):
            ls = logprobs()
    return lc, ls, ids[:, 1:][tm]


# --- host syncs, counted the same way on a CPU and on a GPU ---------------------------------------
SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "unique",
            "_unique2", "item", "bincount"}


class SyncCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the ops that make the host wait for a GPU: scalar reads, and ops whose output size
    depends on the data (nonzero, boolean-mask indexing, bincount's length)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        idx = args[1] if name in ("index", "index_put", "index_put_") and len(args) > 1 else []
        self.n += name in SYNC_OPS or any(i is not None and i.dtype == torch.bool for i in idx)
        return func(*args, **(kwargs or {}))


def count_syncs(device, fn) -> int:
    """Host syncs in fn(): on CUDA those torch's sync debug mode reports, on the CPU the ops
    that would sync on a GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        with SyncCounter() as c:
            fn()
        return c.n
    import warnings

    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(x.message) for x in w)
