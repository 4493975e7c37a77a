"""Rows that carry no signal: all-empty rows and null fields are counted in the log, and data whose every
answer is empty is refused (it would train the model to stop, nothing else)."""
from __future__ import annotations

import logging

from qlorax.engine.data.templates import render, template_fields
from qlorax.errors import QloraxError
from qlorax.schema import DataConfig

log = logging.getLogger("qlorax")


def check_signal(rows: list[dict], cfg: DataConfig, source: str) -> dict[str, int]:
    """Count empty rows, null fields and empty answers; refuse when no row has an answer to learn."""
    fields = sorted({f for t in (cfg.prompt, cfg.prompt_when_empty, cfg.response) for f in template_fields(t)})
    blank = [all(not str(row.get(f) if row.get(f) is not None else "").strip() for f in fields) for row in rows]
    nulls = {f: sum(1 for row in rows if f in row and row[f] is None) for f in fields}
    no_answer = sum(1 for row in rows if not render(row, cfg)[1].strip())
    counts = {"empty_rows": sum(blank), "empty_answers": no_answer, **{f"null_{f}": n for f, n in nulls.items() if n}}
    if rows and no_answer == len(rows):
        raise QloraxError(f"data: all {len(rows)} rows of {source} render an empty answer (data.response="
                          f"{cfg.response!r}; fields {', '.join(fields)}): nothing to learn; point data.response at "
                          "the field that holds the answers, or fix the data")
    if counts["empty_rows"]:
        log.warning("data: %d of %d rows of %s are empty in every field the templates use (%s): they teach "
                    "nothing; drop them from the data", counts["empty_rows"], len(rows), source, ", ".join(fields))
    shown = {f: n for f, n in nulls.items() if n}
    if shown:
        log.warning("data: null fields rendered as empty text: %s (of %d rows); %d rows have an empty answer",
                    ", ".join(f"{f!r} in {n} rows" for f, n in shown.items()), len(rows), no_answer)
    elif no_answer:
        log.warning("data: %d of %d rows have an empty answer: they only teach the model to stop", no_answer, len(rows))
    return counts
