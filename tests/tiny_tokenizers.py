"""Tiny tokenizers built offline, and tiny random Llamas that use them.

- `byte_level`: GPT-2 style byte-level BPE (spaces become "Ġ"). With `regex=False`
  nothing splits " (" from "A", so a merge "Ġ(" + "A" -> "Ġ(A" can cross the
  judge's answer prefix, as it does in tokenizers without GPT-2's split rule.
- `sentencepiece_like`: Metaspace ("▁") BPE with an unknown token and no byte
  fallback, like Llama/Mistral SentencePiece models; "▁(" + "A" -> "▁(A".
- `word_level`: whitespace-split words over a small chat vocabulary (the trainers' tests).
- `trained_bpe`: byte-level BPE trained on a few sentences, adding a BOS (the engine's tests).
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
# word_level's ChatML, with no BOS; the end of turn is the EOS.
WORD_CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORD_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
WORDS = (
    "user assistant system hello hi how are you fine thanks yes no please help me with a the cat dog is "
    "good bad do not can i will tell write poem story about why what ok sure sorry"
).split()
# trained_bpe's ChatML starts with the BOS its tokenizer also adds: a prompt must still hold one.
BOS_CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a constitution lists principles for critique and revision",
    "please answer helpfully and harmlessly, without refusing everything",
    "which response is better? (A) or (B). The answer is",
    "numbers 0 1 2 3 4 5 6 7 8 9 and punctuation . , ; : ! ? ( ) [ ]",
]


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


def word_level():
    """Word-level tokenizer over WORDS; BOS <|im_start|>, EOS and padding <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(WORD_SPECIALS + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
        unk_token="[UNK]", additional_special_tokens=WORD_SPECIALS[:3],
    )
    tok.chat_template = WORD_CHATML
    return tok


def trained_bpe():
    """Byte-level BPE (400 pieces) trained on CORPUS; adds a BOS; EOS <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "<|im_end|>", "<|im_start|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>",
        add_bos_token=True,
    )
    hf_tok.chat_template = BOS_CHATML
    return hf_tok


def tiny_llama(folder, tokenizer, hidden: int = 64, heads: int = 4, seed: int = 0,
               max_positions: int = 2048, tie_embeddings: bool = False):
    """Save `tokenizer` and a random 2-layer Llama for it in `folder`; returns the folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=heads // 2,
        max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_embeddings,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder
