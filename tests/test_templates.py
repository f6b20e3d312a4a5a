"""Named chat templates render exactly, and their trained spans cover assistant text + end-of-turn only."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from curate.templates import TEMPLATE_NAMES, UnrenderableError, end_of_turn, render

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
]

# A chatml template written in Jinja the way Hugging Face tokenizers ship it (no generation markers).
CHATML_JINJA = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chatml_exact_text_and_spans():
    r = render(CONV, "chatml")
    assert r.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n"
    )
    assert r.spans == [(91, 107), (162, 173)]
    assert r.trained_text() == ["Hello!<|im_end|>", "4<|im_end|>"]


def test_llama3_exact_text_and_spans():
    r = render(CONV, "llama-3")
    assert r.text == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>"
    )
    assert r.trained_text() == ["Hello!<|eot_id|>", "4<|eot_id|>"]


def test_generation_prompt_ends_where_the_answer_starts():
    prompt = render(CONV[:2], "chatml", add_generation_prompt=True)
    assert prompt.text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.spans == []
    full = render(CONV[:3], "chatml")
    assert full.text.startswith(prompt.text)
    assert full.spans[0][0] == len(prompt.text)


def test_tool_calls_are_trained_and_tool_results_are_not():
    conv = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": '[{"function": {"name": "weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}}]',
        },
        {"role": "tool", "content": "-3C", "name": "weather"},
        {"role": "assistant", "content": "It is -3C."},
    ]
    r = render(conv, "chatml")
    assert r.trained_text() == [
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
        "It is -3C.<|im_end|>",
    ]
    assert "<|im_start|>tool\n<tool_response>\n-3C\n</tool_response><|im_end|>" in r.text


def test_tokenizer_template_spans_match_named_chatml():
    vocab = {"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", unk_token="[UNK]")
    tok.chat_template = CHATML_JINJA
    own = render(CONV, tok)
    named = render(CONV, "chatml")
    assert own.text == named.text
    assert own.spans == named.spans
    assert end_of_turn(tok) == "<|im_end|>" == end_of_turn("chatml")


@pytest.mark.parametrize("template", TEMPLATE_NAMES)
def test_unrenderable_conversations_raise_value_errors(template):
    with pytest.raises(UnrenderableError, match="empty"):
        render([], template)
    with pytest.raises(UnrenderableError, match="unknown role 'narrator'"):
        render([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}], template)
    with pytest.raises(ValueError, match="no assistant turn"):
        render([{"role": "user", "content": "x"}], template)
