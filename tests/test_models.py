import pytest

from anybit.errors import AnybitError
from anybit.models import check_supported, decoder_blocks, load_model, resolve_model


def test_hf_directory_loads(model_dir):
    model, tok = load_model(str(model_dir))
    assert len(decoder_blocks(model)) == 2 and tok("ab")["input_ids"]


def test_missing_path():
    with pytest.raises(AnybitError, match="not found"):
        resolve_model("/no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(AnybitError, match="config.json"):
        resolve_model(str(tmp_path))


def test_non_gguf_file(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(AnybitError, match="gguf"):
        resolve_model(str(f))


def test_unsupported_architecture_names_supported_ones():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(AnybitError, match="unsupported architecture 'gpt2'.*llama"):
        check_supported(model)


def test_opt_blocks_are_found():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(num_hidden_layers=2, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                     vocab_size=50, word_embed_proj_dim=32))
    check_supported(model)
    assert len(decoder_blocks(model)) == 2


def test_builtin_model_resolves_to_gguf():
    folder, gguf = resolve_model("smollm2-135m")
    assert gguf == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_gguf_conversion_bar_is_off_without_progress():
    gguf_utils = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from anybit.models import _gguf_progress

    original = gguf_utils.tqdm
    with _gguf_progress(False):
        assert gguf_utils.tqdm(range(3)).disable
    assert gguf_utils.tqdm is original
    with _gguf_progress(True):
        assert gguf_utils.tqdm is original
