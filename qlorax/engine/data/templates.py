"""Field templates: a row's ``{field}`` placeholders rendered into prompt and response text."""
from __future__ import annotations

import string

from qlorax.errors import QloraxError
from qlorax.schema import DataConfig


def template_fields(template: str | None) -> list[str]:
    if not template:
        return []
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render(row: dict, cfg: DataConfig, with_response: bool = True) -> tuple[str, str]:
    """(prompt, response) text of one row."""
    prompt = cfg.prompt
    if cfg.prompt_when_empty is not None and not str(row.get(cfg.empty_field) or "").strip():
        prompt = cfg.prompt_when_empty
    values = {k: ("" if v is None else v) for k, v in row.items()}
    return prompt.format_map(values), (cfg.response.format_map(values) if with_response else "")


def check_fields(rows: list[dict], cfg: DataConfig, source: str) -> None:
    needed = set(template_fields(cfg.response))
    for index, row in enumerate(rows, start=1):
        prompt = cfg.prompt
        if cfg.prompt_when_empty is not None and not str(row.get(cfg.empty_field) or "").strip():
            prompt = cfg.prompt_when_empty
        missing = sorted((set(template_fields(prompt)) | needed) - set(row))
        if missing:
            raise QloraxError(f"data.prompt/data.response: field {missing[0]!r} is not in row {index} of {source} "
                              f"(its fields: {', '.join(sorted(row)) or 'none'}); fix the template, e.g. "
                              f"data.prompt=\"{{{sorted(row)[0] if row else 'text'}}} ->: \"")
