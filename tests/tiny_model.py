"""The tiny model's folder, built in about a second without the demo model.

A tiny random ``Qwen2ForCausalLM`` (hidden 64, 2 layers) is good for the mechanics of loading,
streaming, caching and cancelling: its words are noise, so tests assert on mechanics. Its
tokenizer is a real byte-level BPE in Qwen2's shape (Qwen2's pre-tokenizer regex and byte-level
decoder, its special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and its chat
template, ``data/qwen2_chat_template.jinja``, copied from Qwen2.5-Coder-0.5B-Instruct, Apache-2.0),
with a vocabulary of a few thousand merges trained on this repository's own text. Saved as a
normal Hugging Face folder, it loads through ``AutoTokenizer.from_pretrained`` as users' models do,
but needs neither the 491 MB GGUF nor its 47-second conversion, and its small vocabulary makes the
model 0.5 MB instead of 49 MB.
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent
REPOSITORY = HERE.parent
CHAT_TEMPLATE = HERE / "data" / "qwen2_chat_template.jinja"

#: Qwen2's special tokens (ids follow the trained vocabulary); ``<|im_end|>`` ends a turn.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
#: Qwen2's split before byte-level BPE: contractions, letters, single digits, punctuation, spaces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
VOCAB_SIZE = 4096

TINY_CONFIG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}


def training_text() -> list[str]:
    """English prose and Python: the README, the design notes and the package's sources."""
    files = [REPOSITORY / "README.md", REPOSITORY / "RELIABILITY.md"]
    files += sorted((REPOSITORY / "qwen_magic").glob("*.py"))
    return [path.read_text(encoding="utf-8") for path in files if path.is_file()]


def save_tiny_tokenizer(folder: Path) -> None:
    """Train the byte-level BPE and save it, with Qwen2's chat template, into ``folder``."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_text(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE.read_text(encoding="utf-8")
    tokenizer.save_pretrained(folder)


def save_tiny_model(folder: Path, tokenizer_from: Path | None = None) -> Path:
    """Write the tiny random Qwen2 (seed 0, float32) and its tokenizer into ``folder``: the
    small trained one, or the tokenizer of the model folder ``tokenizer_from`` (e.g. Qwen's own,
    from the demo model, for a test that depends on how many characters a real token holds)."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_from is None:
        save_tiny_tokenizer(folder)
    else:
        AutoTokenizer.from_pretrained(tokenizer_from).save_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        **TINY_CONFIG,
    )
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).to(torch.float32).save_pretrained(folder)
    return folder
