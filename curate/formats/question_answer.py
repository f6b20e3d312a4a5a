"""Question/answer pairs (GSM8K style): the question is the user turn, the answer the assistant turn."""

from __future__ import annotations

from curate.formats.base import FormatOptions, register, require_text, rest, text_of, user_assistant


def is_question_answer(row: dict) -> bool:
    return "question" in row and "answer" in row


@register("question_answer", "question / answer pairs", is_question_answer, 82)
def convert(row: dict, options: FormatOptions) -> list[dict]:
    messages = user_assistant(text_of(row["question"], "question"), text_of(row["answer"], "answer"))
    return [{"messages": require_text(messages), "meta": rest(row, ("question", "answer"))}]
