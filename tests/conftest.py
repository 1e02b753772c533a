"""Shared fixtures: tiny randomly initialised models built from a config, a tokenizer and text."""

from __future__ import annotations

import random

import pytest
import torch

WORDS = ("the king queen lord doth thou art love night death sword crown speak hear fair "
         "foul blood sleep dream ghost castle heaven earth").split()


def tiny_text(n_words: int = 6000, seed: int = 0) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) for _ in range(n_words))


def char_tokenizer():
    """A character-level fast tokenizer built offline (no hub)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set("".join(WORDS) + " \n.,;:!?'-ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_llama(seed: int = 0, layers: int = 2, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def model_dir(tmp_path):
    """A tiny Llama saved as a Hugging Face directory, with its tokenizer."""
    path = tmp_path / "tiny-llama"
    tiny_llama().save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(tiny_text(), encoding="utf-8")
    return path


def correlated_inputs(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated channels and a few loud ones, like real LLM inputs."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(dim, dim, generator=g) / dim**0.5 + torch.eye(dim)
    x = torch.randn(n, dim, generator=g) @ mix
    x[:, : max(1, dim // 16)] *= 8
    return x
