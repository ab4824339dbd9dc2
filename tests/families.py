"""Tiny random-init checkpoints of every decoder family orstack should support (issue 13).

    from families import build_family, FAMILIES
    path = build_family("gemma2", tmp_path / "gemma2")

Tests get them through the `family_checkpoint` fixture (tests/conftest.py), built once per session.

Each checkpoint is built with transformers' own config class
(`AutoConfig.for_model(model_type, ...)` then `AutoModelForCausalLM.from_config`) and saved
with a small byte-level BPE tokenizer trained on the spot (the approach of
tests/conftest.py::build_random_llama), so nothing is downloaded.

Choices that make the tiny models *discriminate* (a stage that ignores a family feature
should fail its own correctness check on them, not pass by accident):

- init_std 0.1 (not transformers' 0.02): attention logits have std ~2, so a wrong rotary
  layout or a missing softcap changes outputs visibly; at 0.02 attention is ~uniform and
  almost any rotary bug goes unseen.
- every 1-D norm weight gets N(0, norm_noise) added (Gemma norms are stored as w with the
  (1 + w) scale, initialised to 0; Llama-style norms are initialised to 1): a dropped "+1",
  a swapped q_norm/k_norm or a norm folded into the wrong place shows.
- Gemma and Qwen3 use head_dim 128 with 4 heads (q_proj out 512 != hidden 256), as the
  real models do (Gemma-2-2b: 8 x 256 vs 2304; Gemma-3-1b 4 x 256 vs 1152; Qwen3-0.6B
  16 x 128 vs 1024); code that assumes hidden // heads breaks here.
- gemma2 / gemma3_text: sliding_window 8 (< the test sequence lengths), so the window
  matters. The layer pattern is transformers' default, which is also what llama.cpp
  falls back to (gemma2: every 2nd layer full, `set_swa_pattern(2)`; gemma3: every 6th
  layer full, `set_swa_pattern(6)`) when the GGUF has no `{arch}.attention.sliding_window_pattern`
  -- and llama.cpp's own converter never writes that key for them (the bundled runtime does
  honour it: gguf.md section 3). So gemma3_text gets 6 layers by default (5 sliding + 1 full, exercising both rope bases
  10k / 1M); with 2 layers both would be sliding. gemma2's softcaps are lowered to
  attn 10 / final 5 (defaults 50 / 30 are nearly the identity on random logits; set
  `faithful=True` to keep the defaults).
- granite: multipliers away from 1 (embedding 12, residual 0.22, attention 0.02,
  logits_scaling 8; Granite-3 uses 12 / 0.22 / 0.015625 / 8).
- smollm3: 4 layers by default with transformers' default no_rope_layer_interval 4, so
  layer 3 has no rotary (no_rope_layers [1, 1, 1, 0]); llama.cpp hard-codes the same step
  (`n_no_rope_layer_step = 4`, nothing is read from the GGUF), so a different interval
  cannot be exported faithfully.
- phi3 / smollm3: pad_token_id must lie inside the vocabulary (their configs default to
  32000 / 128004): it is set to the tokenizer's <|pad|> for every family.

Sizes (fp32 safetensors): 5.0-6.9 MB for the 2-layer builds, 9.8 MB smollm3 (4 layers),
19 MB gemma3_text (6 layers); pass dtype="bfloat16" to halve them (F32 GGUF of bf16 weights is
still exact).

`vocab_size` larger than the tokenizer gives padded embedding rows that no token uses (as
Qwen2.5's 151936 rows for 151665 tokens, Phi-3's 32064 for 32011) -- useful for vocab-trim.
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. 12+345=357\n"
    "rev abc=cba\nsort dcba=abcd\n3*4=12\ncmp 17 9=>\n"
    "Pack my box with five dozen liquor jugs. 0123456789\n"
) * 20

# The families of issue 13, then the ones that "fall out" (or do not) for the report.
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "smollm3")
# layers when the caller gives none: enough for the family's layer pattern to show
FAMILY_LAYERS = {"gemma3_text": 6, "smollm3": 4}
EXTRA_FAMILIES = ("gemma", "olmo3", "phi", "olmo", "gpt2", "qwen2_moe", "qwen3_moe", "starcoder2", "cohere",
                  "stablelm")

# Chat templates, in the style of each family's instruct model (simplified: no tools).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
GEMMA = (  # Gemma has no system role: a system turn is prepended to the first user turn (as Gemma-3-it does)
    "{{ bos_token }}{% set sys = '' %}{% if messages[0]['role'] == 'system' %}"
    "{% set sys = messages[0]['content'] + '\n\n' %}{% set messages = messages[1:] %}{% endif %}"
    "{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (sys if loop.first else '') + m['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
PHI3 = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# template, its end-of-turn token, extra special tokens it needs
CHAT_STYLES = {
    "chatml": (CHATML, "<|im_end|>", ["<|im_start|>", "<|im_end|>"]),
    "gemma": (GEMMA, "<end_of_turn>", ["<start_of_turn>", "<end_of_turn>"]),
    "phi3": (PHI3, "<|end|>", ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]),
    "llama3": (LLAMA3, "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]),
}
FAMILY_CHAT = {"llama": "llama3", "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma", "phi3": "phi3"}


# Qwen2Tokenizer's pre-tokenizer (transformers/models/qwen2/tokenization_qwen2.py).
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
               r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# model types whose AutoTokenizer is a class that rebuilds the pre-tokenizer from its own code
# (MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS in transformers/models/auto/tokenization_auto.py):
# their tiny tokenizer must already be what that class builds, or ids change on reload.
QWEN_STYLE = ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe")


def build_tokenizer(vocab_size: int = 300, chat: str | None = "chatml", pre: str = "bytelevel"):
    """A byte-level BPE (every byte is a token, so any text encodes) with <|bos|> <|eos|> <|pad|>
    and, if `chat`, the chat style's turn tokens and template.

    pre: "bytelevel" (GPT-2's split regex inside ByteLevel: llama.cpp pre-tokenizer "gpt-2") or
    "qwen" (Qwen2Tokenizer's NFC + split regex + ByteLevel without regex, plus <|endoftext|>:
    llama.cpp pre-tokenizer "qwen2")."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|bos|>", "<|eos|>", "<|pad|>"] + (["<|endoftext|>"] if pre == "qwen" else [])
    template = eot = None
    if chat:
        template, eot, extra = CHAT_STYLES[chat]
        specials += extra
    tok = Tokenizer(models.BPE())
    if pre == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(SAMPLE_TEXT.splitlines(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>")
    if template:
        fast.chat_template = template
    return fast, eot


def _family_kwargs(model_type: str, hidden: int, layers: int, faithful: bool) -> dict:
    """Config fields beyond the common ones, per family (see the module docstring)."""
    kw: dict = {}
    if model_type in ("gemma", "gemma2", "gemma3_text", "qwen3", "qwen3_moe"):
        kw["head_dim"] = 128
    if model_type in ("gemma2", "gemma3_text"):
        kw["query_pre_attn_scalar"] = 128  # = head_dim (Gemma-2-2b/9b, Gemma-3); 27b uses hidden/heads
        kw["sliding_window"] = 8  # layer_types: the config's default (see module docstring)
    if model_type == "gemma2" and not faithful:
        kw["attn_logit_softcapping"] = 10.0
        kw["final_logit_softcapping"] = 5.0
    if model_type == "olmo3":
        kw["sliding_window"] = 8
        kw["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if model_type == "granite" and not faithful:
        kw.update(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.02, logits_scaling=8.0)
    if model_type == "mistral":
        kw["sliding_window"] = None  # Mistral-7B-v0.3 / Ministral style; v0.1 had 4096
    if model_type == "phi3":
        kw["original_max_position_embeddings"] = 256
    if model_type in ("qwen2_moe", "qwen3_moe"):
        kw.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=hidden, decoder_sparse_step=1)
        if model_type == "qwen2_moe":
            kw["shared_expert_intermediate_size"] = hidden
    if model_type == "gpt2":
        kw = {"n_embd": hidden, "n_layer": layers, "n_head": 4, "n_positions": 256, "n_inner": 2 * hidden}
    return kw


def build_family(model_type: str, out: Path, *, hidden: int = 256, layers: int | None = None,
                 vocab_size: int | None = None, tokenizer_vocab: int = 300, heads: int = 4, kv_heads: int = 2,
                 intermediate: int | None = None,
                 tie: bool | None = None, seed: int = 0, init_std: float = 0.1, norm_noise: float = 0.1,
                 chat: str | None | bool = True, dtype: str = "float32", faithful: bool = False,
                 **overrides) -> Path:
    """Build and save a random-init `model_type` causal LM with its tokenizer under `out`.

    vocab_size: embedding rows (default: the tokenizer's length; larger pads unused rows).
    layers: default 2, except gemma3_text 6 and smollm3 4 (FAMILY_LAYERS).
    tie: tie_word_embeddings (default: the family's own default -- True for gemma*, smollm3,
         gpt2; False otherwise).
    chat: True = the family's chat style (llama3 / gemma / phi3 / chatml), a style name, or
          None / False for no template.
    overrides: any further config field (e.g. sliding_window=4096, attention_bias=True).
    Returns `out`.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    out = Path(out)
    layers = layers or FAMILY_LAYERS.get(model_type, 2)
    style = FAMILY_CHAT.get(model_type, "chatml") if chat is True else (chat or None)
    tok, eot = build_tokenizer(tokenizer_vocab, style, "qwen" if model_type in QWEN_STYLE else "bytelevel")
    n_vocab = max(vocab_size or 0, len(tok))
    common = dict(vocab_size=n_vocab, hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                  num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                  head_dim=hidden // heads, max_position_embeddings=256, initializer_range=init_std,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if model_type == "gpt2":
        common = dict(vocab_size=n_vocab, initializer_range=init_std, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if model_type in ("phi", "olmo", "starcoder2", "cohere", "stablelm", "gpt2"):
        common.pop("head_dim", None)
    common.update(_family_kwargs(model_type, hidden, layers, faithful))
    if tie is not None:
        common["tie_word_embeddings"] = tie
    common.update(overrides)
    config = AutoConfig.for_model(model_type, **common)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if norm_noise:
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1 and not name.endswith(".bias") and ("norm" in name.lower() or ".ln_" in name):
                    p.add_(torch.randn(p.shape, generator=g) * norm_noise)
    model.eval()
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        eos_token_id=[tok.eos_token_id] + ([tok.convert_tokens_to_ids(eot)] if eot else []))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def check_family(path: Path, text: str = "12+345=357 rev abc=cba") -> dict:
    """Load back with AutoModelForCausalLM; logits finite; a few facts for the report."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    ids = tok(text, return_tensors="pt").input_ids
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(Path(path) / "tokenizer.json")).encode(text).ids
    if raw != ids[0].tolist():
        raise AssertionError(f"{type(tok).__name__} re-tokenizes: {ids[0].tolist()} vs tokenizer.json {raw}")
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
        raise AssertionError(f"tokenizer has {len(tok)} tokens > {model.get_input_embeddings().weight.shape[0]} rows")
    with torch.no_grad():
        logits = model(ids).logits
    cfg = model.config
    size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))
    info = {
        "model_type": cfg.model_type,
        "class": type(model).__name__,
        "tokenizer_class": type(tok).__name__,
        "params": sum(p.numel() for p in model.parameters()),
        "safetensors_bytes": size,
        "finite": bool(torch.isfinite(logits).all()),
        "logit_std": float(logits.std()),
        "tied": bool(getattr(cfg, "tie_word_embeddings", False)),
        "seq": ids.shape[1],
        "vocab": logits.shape[-1],
    }
    if tok.chat_template:
        msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "3*4="}]
        info["chat"] = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return info


def build_all(root: Path, families=FAMILIES, **kw) -> dict[str, Path]:
    """Build every family under root/<model_type>; returns {model_type: path}."""
    return {mt: build_family(mt, Path(root) / mt, **kw) for mt in families}


if __name__ == "__main__":
    import sys

    root = Path(sys.argv[1] if len(sys.argv) > 1 else "families-out")
    which = sys.argv[2:] or list(FAMILIES)
    for mt in which:
        try:
            p = build_family(mt, root / mt)
            info = check_family(p)
            print(json.dumps(info))
        except Exception as e:  # report and go on
            print(json.dumps({"model_type": mt, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}))
