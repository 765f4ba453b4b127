import copy
import json
import logging
import random

import pandas as pd
import pytest
from hydra.utils import instantiate

from osftkit.data import DataLoadError, build_arithmetic, load_prompt_table
from osftkit.data.arithmetic import add_digit_noise
from osftkit.data.prompts import MATH_SYSTEM_PROMPT
from tests.conftest import compose_config


def test_arithmetic_is_deterministic_and_correct():
    first = build_arithmetic("train", 200, seed=3, num_ops=3, operand_max=20, ops="+-*")
    again = build_arithmetic("train", 200, seed=3, num_ops=3, operand_max=20, ops="+-*")
    other = build_arithmetic("val", 200, seed=3, num_ops=3, operand_max=20, ops="+-*")
    assert first.to_list() == again.to_list()
    assert first["problem"] != other["problem"]
    for row in first:
        assert eval(row["problem"]) == int(row["answer"])  # noqa: S307  (digits and +-* only)
        assert row["solution"].endswith(f"\\boxed{{{row['answer']}}}")
        assert row["solution"].count("\n") == 3  # one line per operation, then the box


def test_label_noise_rate_and_scope():
    rng = random.Random(0)
    text = "0123456789" * 1000
    noisy = add_digit_noise(text, 0.1, rng)
    changed = sum(a != b for a, b in zip(text, noisy, strict=True)) / len(text)
    assert 0.09 < changed < 0.11
    clean = build_arithmetic("train", 400, seed=1)
    noisy_set = build_arithmetic("train", 400, seed=1, label_noise=0.3)
    assert clean["problem"] == noisy_set["problem"]
    assert clean["answer"] == noisy_set["answer"]  # the gold answer is never corrupted
    wrong = [r for r in noisy_set if not r["solution"].endswith(f"{{{r['answer']}}}")]
    assert 0.2 * len(noisy_set) < len(wrong) < 0.9 * len(noisy_set)
    for row in wrong[:50]:  # a noisy calculator: every later step uses the corrupted value
        lines = row["solution"].split("\n")
        for line, following in zip(lines[:-2], lines[1:-1], strict=True):
            assert line.split("=")[1] in following.split("=")[0]
        assert lines[-1] == f"\\boxed{{{lines[-2].split('=')[1]}}}"


@pytest.mark.parametrize(
    "kwargs", [{"size": 0}, {"num_ops": 0}, {"label_noise": 1.5}, {"ops": "+/"}]
)
def test_arithmetic_rejects_bad_knobs(kwargs):
    with pytest.raises(ValueError, match="arithmetic"):
        build_arithmetic("train", **{"size": 10, **kwargs})


# The real sets' columns, as their hub versions have them, keyed by hub id.
REAL_ROWS = {
    "agentica-org/DeepScaleR-Preview-Dataset": {
        "problem": "1+1?",
        "answer": "2",
        "solution": r"1+1=2, \boxed{2}",
    },
    "HuggingFaceH4/MATH-500": {
        "problem": "Half of one?",
        "solution": r"\boxed{\frac{1}{2}}",
        "answer": r"\frac{1}{2}",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/1.json",
    },
    "HuggingFaceH4/aime_2024": {
        "id": 60,
        "problem": "Find x.",
        "solution": "...",
        "answer": "204",
        "url": "u",
        "year": "2024",
    },
    "math-ai/amc23": {"id": 0, "question": "How many?", "answer": 27.0, "url": "u"},
    "openai/gsm8k": {
        "question": "Natalia sold 48 clips...",
        "answer": "48/2 = 24\n48+24 = 72\n#### 72",
    },
}


def write_table(path, rows, suffix):
    frame = pd.DataFrame(rows)
    if suffix == ".parquet":
        frame.to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


GOLD = {"openai/gsm8k": "72", "math-ai/amc23": "27"}


@pytest.mark.parametrize("name", ["deepscaler", "math500", "aime24", "amc23", "gsm8k"])
@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_real_sets_load_from_local_files(name, suffix, tmp_path, tiny_lm):
    """Each data config reads local files with its hub set's real columns (train and val)."""
    cfg = compose_config([f"data={name}"])
    sources = {"train": cfg.data.train} if cfg.data.train else {}
    sources.update({f"val.{key}": source for key, source in cfg.data.val.items()})
    overrides, hub_ids = [], [source.path for source in sources.values()]
    for key, source in sources.items():
        path = write_table(tmp_path / f"{key}{suffix}", [REAL_ROWS[source.path]] * 3, suffix)
        overrides.append(f"data.{key}.path={path}")
    cfg = compose_config([f"data={name}", *overrides])
    datamodule = instantiate(cfg.data, tokenizer=tiny_lm.tokenizer)
    datamodule.setup("fit")
    loaders = (
        [datamodule.train_dataloader()] if cfg.data.train else []
    ) + datamodule.val_dataloader()
    for loader, hub_id in zip(loaders, hub_ids, strict=True):
        batch = next(iter(loader))
        assert batch["prompt_ids"].shape[0] == 3
        assert batch["answer"][0] == GOLD.get(hub_id, str(REAL_ROWS[hub_id]["answer"]))


def test_missing_column_is_named(tmp_path):
    path = write_table(tmp_path / "t.jsonl", [{"question": "q", "answer": "1"}], ".jsonl")
    with pytest.raises(DataLoadError, match=r"\['problem'\] not found.*question"):
        load_prompt_table(str(path), {"problem": "problem", "answer": "answer"})


def test_malformed_row_is_named(tmp_path):
    rows = [{"problem": "a", "answer": "1"}, {"problem": "b", "answer": None}]
    path = write_table(tmp_path / "t.jsonl", rows, ".jsonl")
    with pytest.raises(DataLoadError, match="Row 1: required column 'answer' is empty"):
        load_prompt_table(str(path), {"problem": "problem", "answer": "answer"})


def test_missing_file_and_unreachable_hub(tmp_path):
    with pytest.raises(DataLoadError, match="does not exist"):
        load_prompt_table(
            str(tmp_path / "nope.parquet"), {"problem": "problem", "answer": "answer"}
        )
    with pytest.raises(DataLoadError, match="Offline\\?"):
        load_prompt_table("no-such-org/no-such-set", {"problem": "problem", "answer": "answer"})


def test_empty_split(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text("")
    with pytest.raises((DataLoadError, ValueError)):
        load_prompt_table(str(path), {"problem": "problem", "answer": "answer"})


def test_over_long_prompts_are_skipped_and_counted(fast_cfg, tiny_lm, caplog):
    cfg = fast_cfg(
        "data.max_prompt_length=8", "data.train.operand_max=99", "data.val.arithmetic.operand_max=9"
    )
    datamodule = instantiate(cfg.data, tokenizer=tiny_lm.tokenizer)
    with caplog.at_level(logging.WARNING):
        datamodule.setup("fit")
    assert "prompts longer than max_prompt_length=8" in caplog.text
    assert all(len(ids) <= 8 for ids in datamodule.splits["train"]["prompt_ids"])


def test_batches_mask_prompts_and_padding(fast_cfg, tiny_lm):
    datamodule = instantiate(fast_cfg().data, tokenizer=tiny_lm.tokenizer)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    tok = tiny_lm.tokenizer
    for i in range(batch["input_ids"].shape[0]):
        labelled = batch["labels"][i][batch["labels"][i] != -100].tolist()
        prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        assert tok.decode(prompt) == batch["problem"][i] + "\n"
        assert labelled[-1] == tok.eos_token_id
        full = batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist()
        assert full == prompt + labelled
    assert (batch["prompt_mask"][:, -1] == 1).all()  # left padded


def verl_rows() -> list[dict]:
    """Rows as the Online SFT reference (a verl recipe) ships its benchmarks."""
    return [
        {
            "data_source": "HuggingFaceH4/MATH-500",
            "prompt": [
                {"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": f"What is {n} + 1?"},
            ],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": str(n + 1)},
            "extra_info": {"index": n},
        }
        for n in range(4)
    ]


def test_verl_format_parquet_loads_as_is(tmp_path, tiny_lm):
    """`data.val.math500.path=<verl math500.parquet>`: the user message is the problem, the
    ground truth the answer, as written by pandas/pyarrow (nested lists and structs)."""
    path = write_table(tmp_path / "math500.parquet", verl_rows(), ".parquet")
    table = load_prompt_table(str(path), {"problem": "problem", "answer": "answer"})
    assert table["problem"] == [f"What is {n} + 1?" for n in range(4)]
    assert table["answer"] == ["1", "2", "3", "4"]
    assert set(table["data_source"]) == {"HuggingFaceH4/MATH-500"}
    cfg = compose_config(["data=math500", f"data.val.math500.path={path}"])
    datamodule = instantiate(cfg.data, tokenizer=tiny_lm.tokenizer)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()[0]))
    assert batch["answer"] == ["1", "2", "3", "4"]
    prompt = tiny_lm.tokenizer.decode(batch["prompt_ids"][1], skip_special_tokens=True)
    assert prompt.endswith("Question: What is 1 + 1?\nAnswer: ")


def test_a_verl_row_without_a_user_message_is_named(tmp_path):
    rows = verl_rows()
    rows[2]["prompt"] = [{"role": "system", "content": "no question here"}]
    path = write_table(tmp_path / "bad.parquet", rows, ".parquet")
    with pytest.raises(DataLoadError, match="Row 2: required column 'problem' is empty"):
        load_prompt_table(str(path), {"problem": "problem", "answer": "answer"})


def test_chat_prompts_carry_the_papers_system_prompt(fast_cfg, tiny_lm):
    """With a chat template, each prompt is system (MATH_SYSTEM_PROMPT, the Online SFT paper's)
    + user (the problem), as the paper prompts Qwen2.5-Math."""
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
    )
    cfg = fast_cfg("data.use_chat_template=true", "data.max_prompt_length=256")
    datamodule = instantiate(cfg.data, tokenizer=tokenizer)
    datamodule.setup("validate")
    batch = next(iter(datamodule.val_dataloader()[0]))
    prompt = tokenizer.decode(batch["prompt_ids"][0], skip_special_tokens=True)
    assert prompt == f"<system>{MATH_SYSTEM_PROMPT}\n<user>{batch['problem'][0]}\n<assistant>"
    assert "boxed" in MATH_SYSTEM_PROMPT
