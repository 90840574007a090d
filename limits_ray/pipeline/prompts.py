"""Prompt sources: load, identify, render and length-check the prompts a job samples from.

:func:`load_prompts` reads prompts from exactly one source of a :class:`~limits_ray.config.PromptsConfig`:

* ``dataset``: a Hugging Face dataset with ``split``. A name that is an existing local directory
  written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` is read with
  ``datasets.load_from_disk`` (a ``DatasetDict`` is indexed by ``split``); any other name (a hub
  name such as ``"tatsu-lab/alpaca"``, or a local directory of data files) goes through
  ``datasets.load_dataset(name, split=split)``.
* ``path``: a local ``.jsonl`` (one JSON object per line) or ``.parquet`` file.
* ``inline``: prompt texts written in the config.

Each prompt gets a stable ``prompt_id`` (the ``id_column`` value as a string, else
``sha1(text)[:16]``), is rendered (``template.format(prompt=text)`` or the tokenizer's chat
template) and its rendered token count is measured. Empty prompts and prompts longer than
``max_prompt_tokens`` are *skipped and listed*, never silently dropped or truncated.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import pyarrow.parquet as pq

from limits_ray.config import JobConfig, PromptsConfig, hub_kwargs
from limits_ray.core.errors import ConfigError

__all__ = [
    "Prompt", "PromptSet", "SkippedPrompt", "load_prompt_set", "load_prompts", "max_prompt_tokens", "prompt_id_for",
    "render_prompt",
]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
_CHUNK = 256  # prompts tokenized per tokenizer call


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for sampling.

    Attributes:
        prompt_id: stable id (the ``id_column`` value, else ``sha1(text)[:16]``).
        text: the raw prompt text from the source.
        rendered: what the model sees (template or chat template applied).
        tokens: the token count of ``rendered``.
    """

    prompt_id: str
    text: str
    rendered: str
    tokens: int


@dataclass(frozen=True)
class SkippedPrompt:
    """A prompt left out, and why (``"empty"`` or ``"too long (N tokens > max M)"``)."""

    prompt_id: str
    reason: str
    tokens: int


@dataclass
class PromptSet:
    """The prompts kept, in source order, the prompts skipped, and the repeated rows dropped
    (``duplicates[prompt_id]``: how many rows repeated that prompt; ``prompts.duplicates: drop``)."""

    prompts: list[Prompt] = field(default_factory=list)
    skipped: list[SkippedPrompt] = field(default_factory=list)
    duplicates: dict[str, int] = field(default_factory=dict)


@dataclass
class _Source:
    """Rows of one prompt source: a description for messages, its columns and a row iterator."""

    description: str
    columns: list[str]
    rows: Iterable[Mapping[str, Any]]


@dataclass(frozen=True)
class _Candidate:
    """A non-empty prompt awaiting its token count."""

    prompt_id: str
    text: str
    rendered: str


def prompt_id_for(text: str) -> str:
    """The default prompt id: the first 16 hex digits of ``sha1(text)`` (UTF-8)."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def render_prompt(text: str, config: PromptsConfig, tokenizer: Any) -> str:
    """Render ``text`` as the model sees it: the chat template (one user turn) or ``config.template``."""
    if config.chat_template:
        messages = [{"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return config.template.format(prompt=text)


def load_prompts(config: PromptsConfig, tokenizer: Any, max_prompt_tokens: int) -> PromptSet:
    """Load, render and length-check the prompts of ``config``.

    Args:
        config: the prompt source and rendering options.
        tokenizer: a Hugging Face tokenizer (``__call__`` and, for ``chat_template``,
            ``apply_chat_template``) used to render and count tokens.
        max_prompt_tokens: prompts whose rendered token count exceeds this are skipped.

    Returns:
        The kept prompts in source order (at most ``config.limit`` of them when it is > 0: the
        first ``limit`` prompts that are kept; skipped rows do not count) and the skipped ones.

    Raises:
        ConfigError: a missing column, an unusable template, a tokenizer without a chat template,
            or an unsupported file type.
        ValueError: duplicate prompt ids, a non-text prompt value, or no prompt left.
        FileNotFoundError: ``config.path`` does not exist.
    """
    if max_prompt_tokens < 1:
        raise ConfigError(f"max_prompt_tokens must be >= 1, got {max_prompt_tokens}")
    if config.limit < 0:
        raise ConfigError(f"prompts.limit must be >= 0 (0 keeps all prompts), got {config.limit}")
    _check_rendering(config, tokenizer)
    source = _open_source(config)
    _check_columns(source, config)
    result = PromptSet()
    add_special_tokens = not config.chat_template  # a chat template writes its own special tokens
    candidates = _candidates(source, config, tokenizer, result)
    while chunk := _next_chunk(candidates, config.limit, len(result.prompts)):
        counts = _count_tokens(tokenizer, [candidate.rendered for candidate in chunk], add_special_tokens)
        for candidate, tokens in zip(chunk, counts):
            _keep_or_skip(result, candidate, tokens, max_prompt_tokens)
    if not result.prompts:
        raise ValueError(_empty_message(source.description, result, max_prompt_tokens))
    return result


def _check_rendering(config: PromptsConfig, tokenizer: Any) -> None:
    """Fail early on a template with other fields or a tokenizer without a chat template."""
    if config.chat_template:
        if getattr(tokenizer, "chat_template", None) is None:
            name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
            raise ConfigError(
                f"prompts.chat_template is true but the tokenizer {name!r} has no chat template; "
                "set prompts.chat_template: false and use prompts.template, or use a tokenizer "
                "(e.g. an instruct model's) that defines one"
            )
        return
    try:
        config.template.format(prompt="")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            f"prompts.template {config.template!r} cannot be formatted with only {{prompt}} ({error!r}); "
            "write literal braces as {{ and }}"
        ) from None


def _open_source(config: PromptsConfig) -> _Source:
    """The rows of the one configured source."""
    if config.inline:
        return _Source("inline prompts", [config.column], [{config.column: text} for text in config.inline])
    needed = [column for column in (config.column, config.id_column) if column]
    if config.path:
        return _open_file(Path(config.path), needed)
    return _open_dataset(config.dataset, config.split, needed)


def _open_file(path: Path, needed: list[str]) -> _Source:
    """Rows of a local JSONL or Parquet file (of Parquet, only the ``needed`` columns are read)."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts.path {str(path)!r} is not a file")
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _open_jsonl(path)
    if suffix in PARQUET_SUFFIXES:
        parquet = pq.ParquetFile(path)
        columns = list(parquet.schema_arrow.names)
        batches = parquet.iter_batches(columns=[column for column in needed if column in columns])
        return _Source(f"file {str(path)!r}", columns, (row for batch in batches for row in batch.to_pylist()))
    raise ConfigError(
        f"prompts.path {str(path)!r}: unsupported file type {suffix or '(none)'!r}; "
        f"use JSONL ({', '.join(JSONL_SUFFIXES)}) or Parquet ({', '.join(PARQUET_SUFFIXES)})"
    )


def _open_jsonl(path: Path) -> _Source:
    """Rows of a JSONL file: one JSON object per non-blank line; columns are the union of keys."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return _Source(f"file {str(path)!r}", columns, rows)


def _open_dataset(name: str, split: str, needed: list[str]) -> _Source:
    """Rows (``needed`` columns) of a dataset split: a ``save_to_disk`` directory, else ``load_dataset``."""
    import datasets  # deferred: importing datasets takes about a second

    description = f"dataset {name!r} (split {split!r})"
    directory = Path(name).expanduser()
    if (directory / "state.json").is_file() or (directory / "dataset_dict.json").is_file():
        loaded = datasets.load_from_disk(str(directory))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ConfigError(f"prompts.split {split!r} is not a split of {name!r}; available: {list(loaded)}")
            loaded = loaded[split]
    else:
        loaded = datasets.load_dataset(name, split=split)
    columns = list(loaded.column_names)
    return _Source(description, columns, loaded.select_columns([column for column in needed if column in columns]))


def _check_columns(source: _Source, config: PromptsConfig) -> None:
    """The text column (and id column, if any) must exist in the source."""
    if config.id_column and config.inline:
        raise ConfigError("prompts.id_column does not apply to inline prompts; remove it (ids are sha1(text)[:16])")
    if not source.columns:
        return  # an empty JSONL file: no columns to check, and no rows (reported as such later)
    for key, column in (("column", config.column), ("id_column", config.id_column)):
        if column and column not in source.columns:
            raise ConfigError(
                f"prompts.{key} {column!r} is not a column of {source.description}; "
                f"available columns: {source.columns}"
            )


def _candidates(source: _Source, config: PromptsConfig, tokenizer: Any, result: PromptSet) -> Iterator[_Candidate]:
    """Non-empty, rendered prompts in source order; empty ones go to ``result.skipped``, repeated ones
    to ``result.duplicates`` (or an error, see :class:`~limits_ray.config.PromptsConfig`)."""
    seen: dict[str, tuple[int, str]] = {}
    for index, row in enumerate(source.rows):
        text = _text_of(row, config.column, index, source.description)
        if config.id_column:
            prompt_id = _id_of(row, config.id_column, index, source.description)
        else:
            prompt_id = prompt_id_for(text)
        if not text.strip():
            result.skipped.append(SkippedPrompt(prompt_id, "empty", 0))
            continue
        if prompt_id in seen:
            _check_duplicate(prompt_id, seen[prompt_id], (index, text), config, source.description)
            result.duplicates[prompt_id] = result.duplicates.get(prompt_id, 0) + 1
            continue
        seen[prompt_id] = (index, text)
        yield _Candidate(prompt_id, text, render_prompt(text, config, tokenizer))


def _check_duplicate(prompt_id: str, first: tuple[int, str], again: tuple[int, str], config: PromptsConfig,
                     description: str) -> None:
    """Refuse a repeated id with another text, and any repeat under ``duplicates: error``."""
    rows = f"rows {first[0]} and {again[0]} of {description}"
    if first[1] != again[1]:
        raise ValueError(
            f"prompt_id {prompt_id!r} names two different texts ({rows}); make prompts.id_column unique"
        )
    if config.duplicates == "error":
        raise ValueError(
            f"duplicate prompt {prompt_id!r} ({rows}); remove the repeated rows, or set "
            "prompts.duplicates: drop to keep the first and count the others"
        )


def _text_of(row: Mapping[str, Any], column: str, index: int, description: str) -> str:
    """The prompt text of ``row`` (``None`` reads as empty)."""
    if column not in row:
        raise ConfigError(f"row {index} of {description} has no column {column!r}; its columns: {list(row)}")
    value = row[column]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(
            f"row {index} of {description}: column {column!r} holds {type(value).__name__}, not text; "
            "point prompts.column at a text column"
        )
    return value


def _id_of(row: Mapping[str, Any], column: str, index: int, description: str) -> str:
    """The ``id_column`` value of ``row`` as a string."""
    value = row.get(column)
    if value is None or str(value) == "":
        raise ValueError(f"row {index} of {description}: id column {column!r} is missing or empty")
    return str(value)


def _next_chunk(candidates: Iterator[_Candidate], limit: int, kept: int) -> list[_Candidate]:
    """The next candidates to tokenize: at most ``_CHUNK``, and never more than ``limit`` still needs.

    Pulling no more than the limit can still use leaves the rows after the last kept prompt unread, so
    ``skipped`` and the duplicate check cover exactly the rows up to it.
    """
    size = min(_CHUNK, limit - kept) if limit else _CHUNK
    return list(islice(candidates, size)) if size > 0 else []


def _count_tokens(tokenizer: Any, texts: Sequence[str], add_special_tokens: bool) -> list[int]:
    """Token counts of ``texts`` (one batched tokenizer call)."""
    encoded = tokenizer(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
    return [len(ids) for ids in encoded]


def _keep_or_skip(result: PromptSet, candidate: _Candidate, tokens: int, max_prompt_tokens: int) -> None:
    """Append ``candidate`` to the kept prompts, or to the skipped ones when it is too long."""
    if tokens > max_prompt_tokens:
        reason = f"too long ({tokens} tokens > max {max_prompt_tokens})"
        result.skipped.append(SkippedPrompt(candidate.prompt_id, reason, tokens))
    else:
        result.prompts.append(Prompt(candidate.prompt_id, candidate.text, candidate.rendered, tokens))


def _empty_message(description: str, result: PromptSet, max_prompt_tokens: int) -> str:
    """Why no prompt is left, and what to change."""
    if not result.skipped:
        return (
            f"no prompts in {description}: it has no rows; check prompts.dataset/prompts.split, "
            "prompts.path or prompts.inline"
        )
    reasons = Counter("too long" if skip.reason.startswith("too long") else skip.reason for skip in result.skipped)
    fixes = []
    if reasons["empty"]:
        fixes.append("check that prompts.column names the prompt text column")
    if reasons["too long"]:
        fixes.append(f"raise the prompt token budget (now {max_prompt_tokens}, e.g. generation.max_model_len) "
                     "or shorten prompts.template")
    return (
        f"no prompts left from {description}: all {len(result.skipped)} were skipped "
        f"({', '.join(f'{count} {reason}' for reason, count in reasons.items())}); {'; '.join(fixes)}"
    )


def max_prompt_tokens(config: JobConfig, tokenizer: Any) -> int:
    """Room left for the prompt: the context length less ``max_tokens``."""
    from transformers import AutoConfig

    context = config.generation.max_model_len or AutoConfig.from_pretrained(
        config.generation.model, **hub_kwargs(config.generation.revision)).max_position_embeddings
    room = context - config.generation.max_tokens
    if room <= 0:
        raise ConfigError(f"generation.max_tokens ({config.generation.max_tokens}) leaves no room in a context of {context}")
    return room


def load_prompt_set(config: JobConfig) -> PromptSet:
    """The job's prompts, rendered and length-checked with the base model's tokenizer.

    With ``generation.kind: synthetic`` there is no model: prompts are rendered with
    ``prompts.template`` only, counted in words and not length-checked.
    """
    if config.generation.kind == "synthetic":
        from limits_ray.pipeline.generation import WordTokenizer

        return load_prompts(config.prompts, WordTokenizer(), max_prompt_tokens=sys.maxsize)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.generation.model, **hub_kwargs(config.generation.revision))
    return load_prompts(config.prompts, tokenizer, max_prompt_tokens(config, tokenizer))
