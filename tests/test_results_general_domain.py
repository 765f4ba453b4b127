"""The general-domain check hands a model directory to lm-evaluation-harness (local task)."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from osftkit.models.tiny import TinyQwen2Spec, save_tiny
from osftkit.results.general_domain import general_domain_eval

TASKS = Path(__file__).parent / "data" / "lm_eval"


def test_general_domain_eval_scores_a_local_task(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    save_tiny(TinyQwen2Spec(hidden_size=32, num_hidden_layers=1, intermediate_size=64), tmp_path)
    results = general_domain_eval(tmp_path, ["osftkit_arith_choice"], include_path=TASKS)
    assert results["osftkit_arith_choice"]["acc,none"] == pytest.approx(own_accuracy(tmp_path))
    assert "acc_stderr,none" in results["osftkit_arith_choice"]


def own_accuracy(model_dir: Path) -> float:
    """The task's accuracy computed here: the choice of highest log-likelihood after
    'problem=' (lm-eval puts a space between context and choice)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (TASKS / "osftkit_arith_choice.jsonl").open()]
    hits = 0
    for row in rows:
        context = tokenizer(f"{row['problem']}=")["input_ids"]
        scores = []
        for choice in row["choices"]:
            continuation = tokenizer(f" {choice}")["input_ids"]
            ids = torch.tensor([context + continuation])
            with torch.no_grad():
                logprobs = model(ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, len(context) :]
            scores.append(logprobs[len(context) - 1 :].gather(1, targets[:, None]).sum().item())
        hits += max(range(len(scores)), key=scores.__getitem__) == row["label"]
    return hits / len(rows)


def test_a_directory_without_a_model_is_one_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval")
    with pytest.raises(FileNotFoundError, match="no Hugging Face model"):
        general_domain_eval(tmp_path, ["osftkit_arith_choice"], include_path=TASKS)
