"""Helpers of the demo lm-eval tasks (referenced from their YAMLs as !function demo_utils.NAME)."""


def closed_choices(doc: dict) -> list[str]:
    """Each choice as a whole assistant turn: the answer and the demo tokenizer's end of turn, so that a choice which
    is only the start of the right answer (an item dropped from the end) does not score as if it were complete."""
    return [c + "<|eot_id|>" for c in doc["choices"]]
