"""Evaluation tasks: the examples, the prompt each becomes, and how an output is scored against its reference.

Tasks: demo (the demo model's held-out set) and jsonl (generic prompt/answer lines, scored exactly or by the
GSM8K-style final number). GSM8K itself and every other benchmark run through lm-eval (task=gsm8k is an alias of
task=lm_eval, see conf/task/gsm8k.yaml). Knows nothing about models, sampling or logging: a tokenizer only turns a
prompt into ids (`prompt_ids`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Callable, Optional

from llada_xp.config import TaskConfig

# A number as written in answers: optional sign or $, thousands commas, decimals ("-$1,234.50", "3.", "7").
_NUMBER = re.compile(r"(?<![\d.])-?\$?-?\d(?:[\d,]*\d)?(?:\.\d+)?")


class TaskError(ValueError):
    """The task cannot be built from its config; the message says why."""


@dataclass(frozen=True)
class Example:
    index: int  # position in the task's example list (stable across runs, shards and resumes)
    question: str  # the question as the data has it (before prompt_template)
    reference: str  # the reference answer


@dataclass
class Task:
    name: str
    examples: list[Example]
    score: Callable[[str, str], bool]  # score(output, reference) -> correct
    cfg: TaskConfig

    def messages(self, ex: Example) -> list[dict]:
        """The chat conversation for an example: [system], the question."""
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": self.prompt(ex)}]

    def prompt(self, ex: Example) -> str:
        """The question in prompt_template: the user message (chat), the whole prompt (plain text); what
        samples.jsonl records."""
        return self.cfg.prompt_template.format(prompt=ex.question)

    def prompt_ids(self, ex: Example, tokenizer) -> list[int]:
        if self.cfg.chat:
            if not getattr(tokenizer, "chat_template", None):
                raise TaskError("task.chat=true but the tokenizer has no chat template; set task.chat=false")
            return list(tokenizer.apply_chat_template(self.messages(ex), tokenize=True, add_generation_prompt=True,
                                                      return_dict=False))
        return list(tokenizer(self.prompt(ex))["input_ids"])


# --------------------------------------------------------------------------------------------------- scoring
def extract_number(text: str) -> Optional[str]:
    """The answer number of a GSM8K-style solution: after the last "####" if there is one, else the last number
    in the text; commas and $ removed, a trailing period dropped. None when there is no number."""
    if "####" in text:
        text = text.rsplit("####", 1)[1]
        found = _NUMBER.findall(text)
        found = found[:1]  # the number right after "####"
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    s = found[0].replace(",", "").replace("$", "")
    return "-" + s.replace("-", "") if s.count("-") else s


def numbers_equal(output: str, reference: str) -> bool:
    """The `number` rule: extracted numbers are numerically equal ("18.00" == "18"); no number is wrong."""
    a, b = extract_number(output), extract_number(reference)
    if a is None or b is None:
        return False
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def exact(output: str, reference: str) -> bool:
    return output.strip() == reference.strip()


SCORING = {"exact": exact, "number": numbers_equal}


def scorer(name: str) -> Callable[[str, str], bool]:
    if name not in SCORING:
        raise TaskError(f"task.scoring must be one of {sorted(SCORING)}, got {name!r}")
    return SCORING[name]


# --------------------------------------------------------------------------------------------------- loading
def load(cfg: TaskConfig) -> Task:
    """Build the task named by cfg.name; examples cut to cfg.limit."""
    if cfg.limit is not None and cfg.limit < 1:
        raise TaskError(f"task.limit must be >= 1 or null, got {cfg.limit}")
    if "{prompt}" not in cfg.prompt_template:
        raise TaskError(f"task.prompt_template must contain {{prompt}}, got {cfg.prompt_template!r}")
    if cfg.name == "demo":
        return _demo(cfg)
    if cfg.name == "jsonl":
        return _jsonl(cfg)
    raise TaskError(f"task.name must be demo or jsonl (lm-eval's tasks: task=lm_eval), got {cfg.name!r}")


def _demo(cfg: TaskConfig) -> Task:
    from llada_xp.demo import task as demo

    if cfg.limit is not None and cfg.limit > demo.HELD_OUT_SIZE:
        raise TaskError(f"task.limit={cfg.limit} exceeds the demo held-out set ({demo.HELD_OUT_SIZE} examples)")
    exs = demo.examples(cfg.limit or demo.HELD_OUT_SIZE, demo.HELD_OUT_SEED)
    return Task("demo", [Example(i, e.prompt, e.answer) for i, e in enumerate(exs)], demo.score, cfg)


def _jsonl(cfg: TaskConfig) -> Task:
    if not cfg.path:
        raise TaskError("task.path is required for task=jsonl (a file with one {prompt, answer} object per line)")
    rows = _read_jsonl(Path(cfg.path))
    exs = [_example(i, r, cfg, cfg.path) for i, r in enumerate(rows[:cfg.limit])]
    return Task("jsonl", exs, scorer(cfg.scoring), cfg)


def _example(i: int, row: dict, cfg: TaskConfig, where: str) -> Example:
    missing = [f for f in (cfg.prompt_field, cfg.answer_field) if f not in row]
    if missing:
        raise TaskError(f"{where}: row {i} has no field {missing[0]!r} (fields: {sorted(row)}); "
                        f"set task.prompt_field / task.answer_field")
    return Example(i, str(row[cfg.prompt_field]), str(row[cfg.answer_field]))


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: not a JSON object: {e}") from e
    return rows
