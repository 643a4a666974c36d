"""The byte-level tokenizer built locally, and how a stage finds its tokenizer."""

import json

import pytest

from topology.errors import ConfigError
from trainer.config import ModelConfig
from trainer.tokenizer import EOT, byte_tokenizer, load_tokenizer

TINY = ModelConfig(tiny={"hidden_size": 32, "num_attention_heads": 4})


def test_bytes_round_trip_and_ids_are_byte_values():
    tok = byte_tokenizer()
    text = "Zigzag ring: 8K → 4194K tokens, naïve vs. aware 🚀\n\tend"
    ids = tok.encode(text, add_special_tokens=False)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert len(tok) == 262 and max(ids) < 256


def test_special_tokens_are_single_ids_above_the_bytes():
    tok = byte_tokenizer()
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.convert_tokens_to_ids(EOT)]
    assert len(set(specials)) == 4 and all(256 <= i < 262 for i in specials)
    assert tok.encode(f"a{EOT}b", add_special_tokens=False) == [97, specials[3], 98]


def test_chat_template_renders_llama3_turns():
    tok = byte_tokenizer()
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\nhello<|eot_id|>")
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("assistant<|end_header_id|>\n\n")


def test_saved_tokenizer_is_what_the_next_stage_loads(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    again = load_tokenizer(TINY, init_from=str(tmp_path))
    text = "stage two reads the same ids"
    assert again.encode(text, add_special_tokens=False) == tok.encode(text, add_special_tokens=False)
    assert (again.bos_token, again.eos_token, again.pad_token) == (tok.bos_token, tok.eos_token, tok.pad_token)
    assert again.chat_template == tok.chat_template


def test_tiny_model_without_tokenizer_gets_the_byte_tokenizer(tmp_path):
    # An init_from directory without tokenizer files falls back to the model config.
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert len(load_tokenizer(TINY, init_from=str(tmp_path))) == 262


def test_missing_tokenizer_path_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer path '/no/such/tokenizer' does not exist"):
        load_tokenizer(ModelConfig(tiny={}, tokenizer="/no/such/tokenizer"))
