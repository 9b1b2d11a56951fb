"""The four target families' chat templates render their documented prompt formats, byte for byte; templates
that cannot render tools get them from llmserve, in the Hermes format, byte for byte too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from service.models.template import HERMES, LLAMA_JSON, TEMPLATES, ChatTemplate, ChatTemplateError

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a prime."},
    {"role": "assistant", "content": "Seven."},
    {"role": "user", "content": "Another?"},
]


@pytest.fixture(scope="module")
def llama3_tokenizer(engines_dir: Path) -> PreTrainedTokenizerFast:
    return AutoTokenizer.from_pretrained(engines_dir / "demo" / "checkpoint")


@pytest.fixture(scope="module")
def llama2_tokenizer(engines_dir: Path) -> PreTrainedTokenizerFast:
    """Llama 2 and CodeLlama write <s> and </s>; the vocabulary does not matter for rendering."""
    return PreTrainedTokenizerFast(tokenizer_file=str(engines_dir / "demo" / "checkpoint" / "tokenizer.json"),
                                   bos_token="<s>", eos_token="</s>")


def test_llama_2_chat(llama2_tokenizer: PreTrainedTokenizerFast) -> None:
    template = ChatTemplate(llama2_tokenizer, TEMPLATES / "llama-2-chat.jinja")
    assert template.render(CONVERSATION) == (
        "<s>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\nName a prime. [/INST] Seven. </s><s>[INST] Another? [/INST]")


def test_llama_2_chat_roles_must_alternate(llama2_tokenizer: PreTrainedTokenizerFast) -> None:
    template = ChatTemplate(llama2_tokenizer, TEMPLATES / "llama-2-chat.jinja")
    with pytest.raises(ChatTemplateError) as e:
        template.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    assert e.value.field == "messages" and "alternate" in str(e.value)


def test_codellama_70b_instruct(llama2_tokenizer: PreTrainedTokenizerFast) -> None:
    template = ChatTemplate(llama2_tokenizer, TEMPLATES / "codellama-70b-instruct.jinja")
    assert template.render(CONVERSATION) == (
        "<s>Source: system\n\n You are terse. <step> Source: user\n\n Name a prime. <step> "
        "Source: assistant\n\n Seven. <step> Source: user\n\n Another? <step> "
        "Source: assistant\nDestination: user\n\n ")


def test_llama_3_1_instruct(llama3_tokenizer: PreTrainedTokenizerFast) -> None:
    template = ChatTemplate(llama3_tokenizer, TEMPLATES / "llama-3.1-instruct.jinja")
    assert template.render(CONVERSATION) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSeven.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_3_1_nemotron(llama3_tokenizer: PreTrainedTokenizerFast) -> None:
    template = ChatTemplate(llama3_tokenizer, TEMPLATES / "llama-3.1-nemotron-70b-instruct.jinja")
    assert template.render(CONVERSATION) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nName a prime.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nSeven.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nAnother?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_llama_3_1_tool_round_trip(llama3_tokenizer: PreTrainedTokenizerFast) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                               "parameters": {"type": "object",
                                                              "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function",
                                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
    ]
    text = ChatTemplate(llama3_tokenizer).render(messages, tools)
    assert "Environment: ipython\n" in text
    assert json.dumps(tools[0], indent=4) in text  # the definitions, in the first user turn
    assert text.index("Given the following functions") < text.index("Weather in Oslo?")
    assert ('<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": '
            '{"city": "Oslo"}}<|eot_id|>') in text
    assert '<|start_header_id|>ipython<|end_header_id|>\n\n{"temp_c": 3}<|eot_id|>' in text  # as sent, not quoted
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_encode_has_exactly_one_bos(llama3_tokenizer: PreTrainedTokenizerFast) -> None:
    ids = ChatTemplate(llama3_tokenizer).encode(CONVERSATION)
    assert ids[0] == llama3_tokenizer.bos_token_id and ids.count(llama3_tokenizer.bos_token_id) == 1


def test_a_model_without_a_template_is_refused_at_load(llama2_tokenizer: PreTrainedTokenizerFast) -> None:
    with pytest.raises(ValueError, match="chat_template"):
        ChatTemplate(llama2_tokenizer)


# SmolLM2-135M-Instruct's own template (from its GGUF file): ChatML, with a default system turn, no tools.
CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.mark.parametrize(("template", "tool_format"), [
    ("llama-3.1-instruct.jinja", LLAMA_JSON), ("llama-3.1-nemotron-70b-instruct.jinja", LLAMA_JSON),
    ("llama-2-chat.jinja", HERMES), ("codellama-70b-instruct.jinja", HERMES), (None, HERMES)])
def test_a_template_that_ignores_tools_gets_the_hermes_format(llama2_tokenizer: PreTrainedTokenizerFast,
                                                              tmp_path: Path, template: str | None,
                                                              tool_format: str) -> None:
    if template is None:
        (tmp_path / "chatml.jinja").write_text(CHATML)
    path = TEMPLATES / template if template else tmp_path / "chatml.jinja"
    assert ChatTemplate(llama2_tokenizer, path).tool_format == tool_format


def test_hermes_tools_calls_and_results(llama2_tokenizer: PreTrainedTokenizerFast, tmp_path: Path) -> None:
    (tmp_path / "chatml.jinja").write_text(CHATML)
    template = ChatTemplate(llama2_tokenizer, tmp_path / "chatml.jinja")
    messages = [
        {"role": "user", "content": "Weather in Oslo and Bergen?"},
        {"role": "assistant", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
            {"id": "call_2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Bergen"}'}},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 3}'},
        {"role": "tool", "tool_call_id": "call_2", "content": '{"temp_c": 5}'},
    ]
    assert template.render(messages, [WEATHER]) == (
        "<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        + json.dumps(WEATHER) + "\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo and Bergen?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call><|im_end|>\n'
        '<|im_start|>user\n<tool_response>\n{"temp_c": 3}\n</tool_response>\n'
        '<tool_response>\n{"temp_c": 5}\n</tool_response><|im_end|>\n'
        "<|im_start|>assistant\n")
    # a system message of the conversation's own keeps its text, the tools after it
    system = template.render([{"role": "system", "content": "Be brief."}, messages[0]], [WEATHER])
    assert system.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n") and system.count("<|im_start|>system") == 1
    # without tools the model's template renders the conversation as it always did
    assert template.render(messages[:1]) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
                                             "trained by Hugging Face<|im_end|>\n<|im_start|>user\nWeather in Oslo "
                                             "and Bergen?<|im_end|>\n<|im_start|>assistant\n")
