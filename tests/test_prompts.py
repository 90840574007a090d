"""Tests for :mod:`limits_ray.pipeline.prompts`: every source, ids, rendering, skips and errors (all local, no hub)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from limits_ray.config import PromptsConfig, from_mapping
from limits_ray.core.errors import ConfigError
from limits_ray.pipeline.prompts import Prompt, PromptSet, SkippedPrompt, load_prompts, prompt_id_for

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message.role }}|> {{ message.content }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
ROWS = [
    {"prompt": "hello world", "uid": 7},
    {"prompt": "   ", "uid": 8},
    {"prompt": "the quick brown fox jumps over the lazy dog", "uid": 9},
    {"prompt": "tell me a story", "uid": 10},
]


def make_tokenizer(chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """A whitespace word-level tokenizer that prepends ``<s>`` as its one special token."""
    words = sorted({word for row in ROWS for word in row["prompt"].split()} | {"Q:", "A:"})
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, **{word: index + 3 for index, word in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def texts(result: PromptSet) -> list[str]:
    return [prompt.text for prompt in result.prompts]


def sha16(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def test_jsonl_source_ids_tokens_and_empty_skip(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    result = load_prompts(PromptsConfig(path=str(path)), tokenizer, max_prompt_tokens=64)
    assert texts(result) == ["hello world", ROWS[2]["prompt"], "tell me a story"]
    first = result.prompts[0]
    # plain templates count the special tokens the tokenizer adds (<s>): 2 words + 1
    assert first == Prompt(prompt_id=sha16("hello world"), text="hello world", rendered="hello world", tokens=3)
    assert result.skipped == [SkippedPrompt(prompt_id=sha16("   "), reason="empty", tokens=0)]
    assert prompt_id_for("hello world") == sha16("hello world")


def test_jsonl_blank_lines_and_bad_lines(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "hello world"}\n\n{"prompt": "tell me a story"}\n')
    assert texts(load_prompts(PromptsConfig(path=str(path)), tokenizer, 64)) == ["hello world", "tell me a story"]
    path.write_text('{"prompt": "hello world"}\nnot json\n')
    with pytest.raises(ValueError, match=r"prompts.jsonl:2: not valid JSON"):
        load_prompts(PromptsConfig(path=str(path)), tokenizer, 64)


def test_parquet_source_with_id_column(tmp_path, tokenizer):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    result = load_prompts(PromptsConfig(path=str(path), id_column="uid"), tokenizer, 64)
    assert [prompt.prompt_id for prompt in result.prompts] == ["7", "9", "10"]
    assert [skip.prompt_id for skip in result.skipped] == ["8"]


def test_inline_source_with_template(tokenizer):
    config = PromptsConfig(inline=("hello world", "", "tell me a story"), template="Q: {prompt} A:")
    result = load_prompts(config, tokenizer, 64)
    assert [prompt.rendered for prompt in result.prompts] == ["Q: hello world A:", "Q: tell me a story A:"]
    assert [prompt.tokens for prompt in result.prompts] == [5, 7]
    assert result.skipped[0].reason == "empty"


def test_inline_from_yaml_mapping(tokenizer):
    config = from_mapping(PromptsConfig, {"inline": ["hello world"]}, "prompts")
    assert texts(load_prompts(config, tokenizer, 64)) == ["hello world"]


def test_local_hf_dataset_directory(tmp_path, tokenizer):
    directory = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(directory))
    result = load_prompts(PromptsConfig(dataset=str(directory), id_column="uid"), tokenizer, 64)
    assert [prompt.prompt_id for prompt in result.prompts] == ["7", "9", "10"]
    assert texts(result)[0] == "hello world"


def test_local_hf_dataset_dict_directory_selects_split(tmp_path, tokenizer):
    directory = tmp_path / "saved_dict"
    splits = {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[3:])}
    datasets.DatasetDict(splits).save_to_disk(str(directory))
    result = load_prompts(PromptsConfig(dataset=str(directory), split="test"), tokenizer, 64)
    assert texts(result) == ["tell me a story"]
    with pytest.raises(ConfigError, match=r"split 'validation' is not a split.*\['train', 'test'\]"):
        load_prompts(PromptsConfig(dataset=str(directory), split="validation"), tokenizer, 64)


def test_hub_dataset_name_goes_through_load_dataset(monkeypatch, tokenizer):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    result = load_prompts(PromptsConfig(dataset="someone/prompts", split="eval"), tokenizer, 64)
    assert calls == [("someone/prompts", "eval")]
    assert len(result.prompts) == 3


def test_local_data_file_directory_goes_through_load_dataset(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    directory = tmp_path / "data_dir"
    directory.mkdir()
    write_jsonl(directory / "train.jsonl", ROWS)
    result = load_prompts(PromptsConfig(dataset=str(directory)), tokenizer, 64)
    assert texts(result) == ["hello world", ROWS[2]["prompt"], "tell me a story"]


def test_too_long_prompts_are_skipped_not_truncated(tokenizer):
    config = PromptsConfig(inline=tuple(row["prompt"] for row in ROWS))
    result = load_prompts(config, tokenizer, max_prompt_tokens=5)
    assert texts(result) == ["hello world", "tell me a story"]
    long = ROWS[2]["prompt"]
    assert SkippedPrompt(sha16(long), "too long (10 tokens > max 5)", 10) in result.skipped
    assert [skip.reason for skip in result.skipped] == ["empty", "too long (10 tokens > max 5)"]


def test_limit_keeps_first_kept_prompts(tokenizer):
    config = PromptsConfig(inline=tuple(row["prompt"] for row in ROWS), limit=2)
    result = load_prompts(config, tokenizer, 64)
    assert texts(result) == ["hello world", ROWS[2]["prompt"]]
    assert [skip.reason for skip in result.skipped] == ["empty"]
    # rows after the last kept prompt are not read: the repeat below goes uncounted
    config = PromptsConfig(inline=("hello world", "hello world"), limit=1, duplicates="error")
    assert texts(load_prompts(config, tokenizer, 64)) == ["hello world"]


def test_missing_column_names_available_columns(tmp_path, tokenizer):
    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS), path)
    with pytest.raises(ConfigError, match=r"prompts.column 'question' is not a column.*\['prompt', 'uid'\]"):
        load_prompts(PromptsConfig(path=str(path), column="question"), tokenizer, 64)
    with pytest.raises(ConfigError, match=r"prompts.id_column 'key' is not a column.*\['prompt', 'uid'\]"):
        load_prompts(PromptsConfig(path=str(path), id_column="key"), tokenizer, 64)
    jsonl = write_jsonl(tmp_path / "prompts.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"'question' is not a column"):
        load_prompts(PromptsConfig(path=str(jsonl), column="question"), tokenizer, 64)
    saved = tmp_path / "saved"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(saved))
    with pytest.raises(ConfigError, match=r"'question' is not a column of dataset .*\['prompt', 'uid'\]"):
        load_prompts(PromptsConfig(dataset=str(saved), column="question"), tokenizer, 64)


def test_repeated_prompts_are_dropped_with_a_count_by_default(tmp_path, tokenizer):
    rows = ["hello world", "tell me", "hello world", "hello world", "tell me"]
    result = load_prompts(PromptsConfig(inline=tuple(rows)), tokenizer, 64)
    assert texts(result) == ["hello world", "tell me"]
    assert result.duplicates == {sha16("hello world"): 2, sha16("tell me"): 1}
    path = write_jsonl(tmp_path / "ids.jsonl", [{"prompt": "hello", "uid": 7}, {"prompt": "hello", "uid": 7}])
    assert load_prompts(PromptsConfig(path=str(path), id_column="uid"), tokenizer, 64).duplicates == {"7": 1}


def test_repeated_prompts_are_refused_naming_the_rows_when_asked(tokenizer):
    config = PromptsConfig(inline=("hello world", "tell me", "hello world"), duplicates="error")
    with pytest.raises(ValueError, match=r"duplicate prompt '.*' \(rows 0 and 2 of inline prompts\).*duplicates: drop"):
        load_prompts(config, tokenizer, 64)
    with pytest.raises(ConfigError, match=r"prompts.duplicates must be one of \['drop', 'error'\], got 'keep'"):
        PromptsConfig(inline=("a",), duplicates="keep")


def test_one_id_for_two_texts_is_always_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "hello world", "uid": 1}, {"prompt": "tell", "uid": 1}])
    with pytest.raises(ValueError, match=r"prompt_id '1' names two different texts \(rows 0 and 1 .*unique"):
        load_prompts(PromptsConfig(path=str(path), id_column="uid"), tokenizer, 64)
    # the same text under distinct ids is fine
    same_text = [{"prompt": "hello world", "uid": 1}, {"prompt": "hello world", "uid": 2}]
    path = write_jsonl(tmp_path / "ok.jsonl", same_text)
    assert len(load_prompts(PromptsConfig(path=str(path), id_column="uid"), tokenizer, 64).prompts) == 2


def test_chat_template_rendering_counts_template_tokens():
    tokenizer = make_tokenizer(CHAT_TEMPLATE)
    result = load_prompts(PromptsConfig(inline=("hello world",), chat_template=True), tokenizer, 64)
    prompt = result.prompts[0]
    assert prompt.text == "hello world"
    assert prompt.rendered == "<|user|> hello world <|assistant|>"
    assert prompt.tokens == 4  # the template's own tokens, no extra <s>
    with pytest.raises(ValueError, match=r"too long|no prompts left"):
        load_prompts(PromptsConfig(inline=("hello world",), chat_template=True), tokenizer, 3)


def test_chat_template_missing_is_a_clear_error(tokenizer):
    with pytest.raises(ConfigError, match=r"has no chat template.*prompts.template"):
        load_prompts(PromptsConfig(inline=("hello world",), chat_template=True), tokenizer, 64)


def test_empty_prompt_set_names_source_and_fix(tmp_path, tokenizer):
    with pytest.raises(ValueError, match=r"no prompts left from inline prompts.*2 empty.*prompts.column"):
        load_prompts(PromptsConfig(inline=("", " ")), tokenizer, 64)
    with pytest.raises(ValueError, match=r"no prompts left from inline prompts.*1 too long.*token budget \(now 2"):
        load_prompts(PromptsConfig(inline=("tell me a story",)), tokenizer, 2)
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(ValueError, match=r"no prompts in file .*empty.jsonl.*no rows"):
        load_prompts(PromptsConfig(path=str(path)), tokenizer, 64)


def test_file_errors(tmp_path, tokenizer):
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_prompts(PromptsConfig(path=str(tmp_path / "missing.jsonl")), tokenizer, 64)
    csv = tmp_path / "prompts.csv"
    csv.write_text("prompt\nhello world\n")
    with pytest.raises(ConfigError, match=r"unsupported file type '.csv'"):
        load_prompts(PromptsConfig(path=str(csv)), tokenizer, 64)


def test_non_text_values_and_bad_templates(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": 3}])
    with pytest.raises(ValueError, match=r"row 0 .* holds int, not text"):
        load_prompts(PromptsConfig(path=str(path)), tokenizer, 64)
    with pytest.raises(ConfigError, match=r"cannot be formatted"):
        load_prompts(PromptsConfig(inline=("hello world",), template="{system} {prompt}"), tokenizer, 64)
    with pytest.raises(ConfigError, match=r"id_column does not apply to inline"):
        load_prompts(PromptsConfig(inline=("hello world",), id_column="uid"), tokenizer, 64)
    with pytest.raises(ConfigError, match=r"max_prompt_tokens must be >= 1"):
        load_prompts(PromptsConfig(inline=("hello world",)), tokenizer, 0)


def test_braces_in_prompt_text_are_literal(tokenizer):
    result = load_prompts(PromptsConfig(inline=("a {prompt} b {0}",), template="Q: {prompt}"), tokenizer, 64)
    assert result.prompts[0].rendered == "Q: a {prompt} b {0}"
