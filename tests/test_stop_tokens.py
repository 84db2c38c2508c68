"""A response ends at the chat template's end-of-turn token, not only at EOS, in whatever folder is given.

The model folder here is Qwen2-style: its tokenizer's EOS is ``<|endoftext|>`` and its ChatML template
closes every turn with ``<|im_end|>``, a distinct added special token; nothing but the tokenizer says so
(the saved generation_config names only EOS, as a run's model/ folder does). Its weights are rigged so
that greedy decoding writes " twice", then ``<|im_end|>``, then " dog" for ever: a server, predict, eval or
collect that stops at EOS alone runs on to the token limit with text after the end of the turn."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import openai
import pytest
import torch
from tokenizers import AddedToken
from transformers import AutoModelForCausalLM, GenerationConfig, Qwen2Config

from alignloop.config import DPOConfig, EvalConfig, ModelConfig, SamplingConfig, build_config
from alignloop.data.io import Record
from alignloop.data.tokenize import DEFAULT_CHAT_TEMPLATE, end_of_turn_id, stop_token_ids
from alignloop.evaluate.eval import Prompt, load_model, sample
from alignloop.feedback.collect import generate_candidates
from alignloop.generation.calls import call_ranges
from alignloop.generation.rollout import mask_after_eos
from alignloop.models.export import complete_generation_config
from alignloop.models.load import load_pretrained
from alignloop.models.tiny import train_tokenizer
from alignloop.predict import predict
from alignloop.serve.app import create_app
from alignloop.serve.backends import build_server
from alignloop.serve.server import Limits, serve_in_thread
from alignloop.train.dpo import criteria_settings, encode_units, pair_units, parse_record
from conftest import repeat_task, write_jsonl

KEY = "test-secret"
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
          "{{ message['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = ("{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
          "{{ message['content'] }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("{% for message in messages %}<start_of_turn>{{ message['role'] }}\n"
         "{{ message['content'] }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHATS = [[{"role": "user", "content": "Repeat twice: red cat dog"}], [{"role": "user", "content": "blue"}]]
ANSWER = " twice"


def chat_tokenizer(template: str | None, turn_tokens: list[str]):
    """The tests' byte-level BPE with ``<|endoftext|>`` as EOS and ``turn_tokens`` added as special tokens."""
    tok = train_tokenizer([r["prompt"] + r["completion"] for r in repeat_task(200, seed=5)], vocab_size=300)
    tok.add_special_tokens({"eos_token": "<|endoftext|>"})
    tok.add_tokens([AddedToken(t, special=True) for t in turn_tokens])
    tok.chat_template = template
    return tok


def single_id(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def chatml_folder(tmp_path_factory) -> Path:
    """A one-layer Qwen2 whose next token depends only on the current one: the attention and MLP outputs
    are zero, so the LM head sees the (normalised) embedding. "\\n" (the end of every prompt here) ->
    " twice" -> <|im_end|> -> " dog" -> " dog" ..."""
    tok = chat_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    newline, answer, turn_end, more = (single_id(tok, "\n"), single_id(tok, ANSWER),
                                       tok.convert_tokens_to_ids("<|im_end|>"), single_id(tok, " dog"))
    config = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        emb, head = model.model.embed_tokens.weight, model.lm_head.weight
        emb.zero_()
        emb[:, 3] = 1.0  # every other token
        for direction, token in enumerate((newline, answer, turn_end)):
            emb[token] = 0.0
            emb[token, direction] = 1.0
        head.zero_()
        head[answer, 0] = head[turn_end, 1] = head[more, 2] = head[more, 3] = 10.0
    out = tmp_path_factory.mktemp("chatml") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    # The saved generation_config names EOS only, as a run's model/ folder does.
    assert GenerationConfig.from_pretrained(out).eos_token_id == tok.eos_token_id
    return out


# ---------------------------------------------------------------- the stop ids themselves


def test_stop_ids_are_eos_and_the_templates_end_of_turn_token():
    chatml = chat_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    assert (chatml.eos_token_id, chatml.convert_tokens_to_ids("<|im_end|>")) == (300, 302)
    assert end_of_turn_id(chatml) == 302
    assert stop_token_ids(chatml) == [300, 302]
    # Llama 3: <|end_header_id|> is special and in the template too, but it does not end a turn.
    llama3 = chat_tokenizer(LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    assert stop_token_ids(llama3) == [300, llama3.convert_tokens_to_ids("<|eot_id|>")] == [300, 303]
    gemma = chat_tokenizer(GEMMA, ["<start_of_turn>", "<end_of_turn>"])
    assert stop_token_ids(gemma) == [300, 302]


def test_a_template_that_ends_turns_with_eos_or_text_adds_nothing():
    # The demo's tokenizer: its default template ends a turn with EOS, the one stop id.
    assert stop_token_ids(chat_tokenizer(DEFAULT_CHAT_TEMPLATE, [])) == [300]
    plain = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n\n{% endfor %}"
    assert end_of_turn_id(chat_tokenizer(plain, [])) is None
    assert stop_token_ids(chat_tokenizer(None, ["<|im_end|>"])) == [300]
    refusing = "{{ raise_exception('a system turn first') }}"
    assert stop_token_ids(chat_tokenizer(refusing, [])) == [300]


def test_stop_ids_take_every_eos_the_configs_name():
    tok = chat_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    configs = (SimpleNamespace(eos_token_id=5), SimpleNamespace(eos_token_id=[302, 7]), SimpleNamespace(),
               SimpleNamespace(eos_token_id=None), None)
    assert stop_token_ids(tok, *configs) == [5, 7, 300, 302]


def test_the_mask_ends_at_the_first_of_any_stop_id():
    tokens = torch.tensor([[5, 7, 9, 7], [9, 9, 9, 9], [1, 7, 5, 2]])
    mask, ended = mask_after_eos(tokens, [7, 5])
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert ended.tolist() == [True, False, True]
    mask, ended = mask_after_eos(tokens, [])
    assert mask.tolist() == [[1] * 4] * 3 and ended.tolist() == [False] * 3


def test_export_writes_the_same_stop_ids(chatml_folder):
    model, tok = load_pretrained(ModelConfig(name_or_path=str(chatml_folder)), for_training=False)
    complete_generation_config(model, tok)
    assert model.generation_config.eos_token_id == [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")]


def test_dpo_ends_an_answer_to_a_chat_prompt_with_the_end_of_turn_token():
    tok = chat_tokenizer(CHATML, ["<|im_start|>", "<|im_end|>"])
    cfg = build_config(DPOConfig, None, {"model.name_or_path": "m", "data.train": "fb.jsonl"})
    rows = [{"prompt": prompt, "chosen": "red", "rejected": "dog"} for prompt in (CHATS[0], "blue")]
    units = pair_units([parse_record(Record(r, f"fb.jsonl:{i + 1}"), criteria_settings(cfg))
                        for i, r in enumerate(rows)], cfg)
    chat, text = encode_units(units, tok, cfg, Counter(), kto=False)
    red, dog = single_id(tok, "red"), single_id(tok, "dog")
    assert chat.response_ids == [[red, 302], [dog, 302]]  # <|im_end|>, as the template closes the turn
    assert text.response_ids == [[red, 300], [dog, 300]]  # <|endoftext|>, as SFT ends a completion


# ---------------------------------------------------------------- every stage that generates


def test_serving_the_folder_stops_at_the_end_of_turn(chatml_folder):
    limits = Limits(max_prompt_tokens=64, max_tokens=64, default_max_tokens=16, max_body_bytes=20_000)
    srv = build_server(str(chatml_folder), api_key=KEY, limits=limits, served_model_name="chatml",
                       device="cpu")
    with serve_in_thread(create_app(srv)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        chat = client.chat.completions.create(model="chatml", messages=CHATS[0], max_tokens=12, temperature=0)
        assert chat.choices[0].message.content == ANSWER and chat.choices[0].finish_reason == "stop"
        streamed = list(client.chat.completions.create(model="chatml", messages=CHATS[0], max_tokens=12,
                                                       temperature=0, stream=True))
        assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == ANSWER
        assert [c.choices[0].finish_reason for c in streamed if c.choices][-1] == "stop"
        text = client.completions.create(model="chatml", prompt="Repeat twice: red cat dog\n", max_tokens=12,
                                         temperature=0)
        assert text.choices[0].text == ANSWER and text.choices[0].finish_reason == "stop"
        # ignore_eos still writes on to the limit.
        on = client.completions.create(model="chatml", prompt="Repeat twice: red cat dog\n", max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
        assert on.choices[0].text == ANSWER + " dog" * 3 and on.choices[0].finish_reason == "length"


def test_predict_eval_and_collect_stop_at_the_end_of_turn(chatml_folder, tmp_path):
    sampling = SamplingConfig(max_new_tokens=10, temperature=0)
    data = write_jsonl(tmp_path / "predict.jsonl", [{"messages": m} for m in CHATS])
    out = predict(chatml_folder, str(data), tmp_path / "predictions.jsonl", sampling=sampling)
    assert [json.loads(line)["generation"] for line in out.read_text().splitlines()] == [ANSWER, ANSWER]

    # eval and collect sample at temperature 1: the rigged logits leave other tokens about e^-40 of the mass.
    sampled = SamplingConfig(max_new_tokens=10, temperature=1.0)
    model, tok = load_model(str(chatml_folder), torch.device("cpu"), None)
    cfg = EvalConfig(policy=str(chatml_folder), prompts="unused.jsonl", generation=sampled)
    calls = call_ranges(len(CHATS), sampled.batch_size)
    gen = sample(model, tok, [Prompt(p, "") for p in CHATS], calls, cfg, "policy", str(chatml_folder))
    assert gen.texts == [ANSWER, ANSWER]
    assert gen.ended == [True, True] and gen.tokens == [2, 2]  # " twice" and <|im_end|>

    candidates = generate_candidates(model, tok, CHATS, 3, sampled)
    assert candidates == [[ANSWER.strip()] * 3] * 2
