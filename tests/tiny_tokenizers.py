"""Tiny tokenizers of two styles, built offline, and tiny random Llamas that use them.

- `byte_level`: GPT-2 style byte-level BPE (spaces become "Ġ"). With `regex=False`
  nothing splits " (" from "A", so a merge "Ġ(" + "A" -> "Ġ(A" can cross the
  judge's answer prefix, as it does in tokenizers without GPT-2's split rule.
- `sentencepiece_like`: Metaspace ("▁") BPE with an unknown token and no byte
  fallback, like Llama/Mistral SentencePiece models; "▁(" + "A" -> "▁(A".
"""

from __future__ import annotations

import string

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral style: the assistant's reply follows "[/INST]" after a space, and the
# generation prompt adds nothing, so "[/INST]" + prefix and a continued assistant
# message render differently.
MISTRAL = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>", "[INST]", "[/INST]"]


def _wrap(tok, template: str, name: str):
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        name_or_path=name,
    )
    hf.chat_template = template
    return hf


def _vocab(symbols: list[str], merges: list[tuple[str, str]]) -> dict[str, int]:
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for piece in [*symbols, *(a + b for a, b in merges)]:
        vocab.setdefault(piece, len(vocab))
    return vocab


def byte_level(template: str = CHATML, regex: bool = True, merge_paren_a: bool = False):
    """Byte-level BPE; `merge_paren_a` adds the merges "Ġ" + "(" and "Ġ(" + "A" (not "Ġ(" + "B")."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    merges = [("Ġ", "("), ("Ġ(", "A")] if merge_paren_a else []
    vocab = _vocab(pre_tokenizers.ByteLevel.alphabet(), merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=regex)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return _wrap(tok, template, "tiny-byte-level" + ("-merged" if merge_paren_a else ""))


def sentencepiece_like(template: str = MISTRAL, drop: str = ""):
    """Metaspace BPE over printable ASCII minus `drop`, with "▁(" + "A" / "B" merged."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    chars = sorted(set(string.ascii_letters + string.digits + string.punctuation) - set(drop))
    merges = [("▁", "("), ("▁(", "A"), ("▁(", "B")]
    merges = [m for m in merges if not set(m[1]) & set(drop)]
    vocab = _vocab(["▁", *chars], merges)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    return _wrap(tok, template, "tiny-sentencepiece" + (f"-without-{drop}" if drop else ""))


def tiny_llama(folder, tokenizer, hidden: int = 64, heads: int = 4, seed: int = 0):
    """Save `tokenizer` and a random 2-layer Llama for it in `folder`; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
