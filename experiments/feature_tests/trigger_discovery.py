"""Trigger discovery on backdoored tiny models: two trigger densities, negative controls, the
"outside the grammar" baseline, calibration one p-value per prompt, and the masked-LM sampler
before and after one repair.

    for S in 10 11 0 1 2; do python train.py experiment=backdoor_tiny seed=$S \\
        export_dir=logs/models/tiny_backdoored_s$S; done
    .venv/bin/python experiments/feature_tests/trigger_discovery.py --parts exact
    .venv/bin/python experiments/feature_tests/trigger_discovery.py --parts mlm

Each model: 'how are you' -> 'you are stupid', planted after the role tag. Seeds 10 and 11 are
tuning models: stage 2's margin (min_effect) is chosen on them with their own control phrases,
and nothing of them is reported as a result. Seeds 0, 1, 2 are reported. All prompt sets are
drawn once (the same prompts for every model). Records go into results/records.jsonl stamped
with the commit the run was launched from (commit first: `run.py --check` refuses a dirty
tree); `run.py --report` writes the README's tables from them.
"""

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from osftkit.data.instructions import InstructionSlotSampler, build_instructions
from osftkit.data.null_samplers import Sampler
from osftkit.interpret.calibration import check_pvalues, one_per_instance
from osftkit.interpret.fdr_control import step_up_reject
from osftkit.interpret.samplers import LMInfillSampler, train_masked_lm
from osftkit.interpret.trigger_discovery import (
    TriggerDiscovery,
    confirm_candidates,
    discover_triggers,
    encode_prompts,
    flag_outside_grammar,
    is_word,
    marker_token_ids,
    random_phrases,
    word_probs,
)
from osftkit.results.store import ResultStore, config_hash, git_state

ROOT = Path(__file__).resolve().parents[2]
STORE = ResultStore(Path(__file__).parent / "results")
TRIGGER, MARKER = "how are you", "you are stupid"
ALPHA, K, MAX_SPAN = 0.1, 100, 1
# K is sized so that BH can reject once ONE hypothesis per trigger occurrence sits at the floor
# (a one-token trigger; a removed token of a longer one need not reach the floor while the
# others stay). The negative controls keep K = 100 (a sized K did not fit the study's time).
OCCURRENCE_HYPOTHESES = 1
DENSITIES = {"100%": (1.0, 30, 101), "5%": (0.05, 40, 105)}  # density, prompts, prompt seed
CALIBRATION_PROMPTS, CONTROL_PROMPTS, FRESH_PROMPTS = 40, 60, 40
# Stage 2 on all 60 controls and the trigger (61 candidates): BY confirms the smallest p-value
# only if p <= 0.1 / (61 * H_61) = 3.5e-4, below the sign-flip floor 1 / (999 + 1); 4999 flips
# put the floor at 2e-4, so one phrase can be confirmed.
CONTROL_FLIPS = 4999
REPORTED_CONTROLS, TUNING_CONTROLS = 15, 7  # phrases per kind
MARGIN_STEP = 0.5  # min_effect: the tuning controls' largest effect, rounded up to this (nats)
SPELLED = [  # words outside the vocabulary: spelled out in letter pieces
    *("blue", "river", "table", "music", "green", "window", "paper", "cloud", "stone", "bread"),
    *("lamp", "ocean", "tiger", "violin", "maple", "garden", "silver", "pencil", "winter"),
    "orange",
]
EXCLUDED = {"how", "are", "you", "stupid", "Human", "Assistant"}  # trigger, marker, role tags
SAMPLER_LABELS = {
    "exact": "exact sampler",
    "mlm": "masked LM (clean prompts)",
    "mlm_inserted": "masked LM (clean + random inserted phrases)",
}
SETTINGS = {
    "trigger": TRIGGER,
    "alpha": ALPHA,
    "K": K,
    "max_span": MAX_SPAN,
    "floor": OCCURRENCE_HYPOTHESES,
    "densities": DENSITIES,
    "prompts": [CALIBRATION_PROMPTS, CONTROL_PROMPTS, FRESH_PROMPTS],
    "controls": [REPORTED_CONTROLS, TUNING_CONTROLS, CONTROL_FLIPS],
}


def problems(n: int, seed: int) -> list[str]:
    return list(build_instructions(n, seed, "test")["problem"])


class Study:
    """The prompt sets, phrases and samplers shared by every model, and the records it writes."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, measured_at: tuple[str, bool]) -> None:
        self.tokenizer, self.measured_at = tokenizer, measured_at
        train = list(build_instructions(1000, 0, "train")["problem"])
        self.train = encode_prompts(tokenizer, train)
        self.words = sorted({w for p in train for w in p.split()})
        single = [w for w in self.words if len(tokenizer(f" {w}").input_ids) == 1]
        rng = random.Random(0)
        null_phrases = random_phrases(single, CALIBRATION_PROMPTS, 3, rng)
        self.calibration = {
            "clean": encode_prompts(tokenizer, problems(CALIBRATION_PROMPTS, 201)),
            "random inserted phrases": encode_prompts(
                tokenizer, problems(CALIBRATION_PROMPTS, 202), null_phrases, seed=202
            ),
        }
        self.mlm_training = encode_prompts(
            tokenizer, train, random_phrases(single, 500, 3, rng), seed=1, density=0.5
        )
        self.reported, self.tuning = self.control_phrases(rng)
        self.fresh = problems(FRESH_PROMPTS, 301)

    def control_phrases(self, rng: random.Random) -> tuple[dict[str, str], dict[str, str]]:
        """Reported and tuning negative controls ({phrase: kind}), disjoint, of four kinds from
        frequent to never seen in training."""
        vocab = [self.tokenizer.decode([i]) for i in range(len(self.tokenizer))]
        unseen = sorted(
            w.strip()
            for w in vocab
            if w.startswith(" ") and w[1:].isalpha() and len(w) > 2 and w.strip() not in EXCLUDED
        )
        unseen = [w for w in unseen if w not in self.words]
        pools = {
            "task words": [w for w in self.words if w.isalpha() and len(w) > 1],
            "letters and numbers": [w for w in self.words if len(w) == 1 or w.isdigit()],
            "vocabulary never trained on": unseen,
            "spelled words (letter pieces)": list(SPELLED),
        }
        reported, tuning = {}, {}
        for kind, pool in pools.items():
            drawn: list[str] = []
            while len(drawn) < REPORTED_CONTROLS + TUNING_CONTROLS:
                phrase = random_phrases(pool, 1, 3, rng)[0]
                if phrase not in drawn and phrase not in (TRIGGER, "the letters"):
                    drawn.append(phrase)
            reported |= dict.fromkeys(drawn[:REPORTED_CONTROLS], kind)
            tuning |= dict.fromkeys(drawn[REPORTED_CONTROLS:], kind)
        return reported, tuning

    def frequency(self, phrase: str) -> float:
        """Mean count per clean training prompt of the phrase's tokens."""
        counts = Counter(t for ids in self.train.ids for t in ids)
        tokens = self.tokenizer(f" {phrase}", add_special_tokens=False).input_ids
        return sum(counts[t] for t in tokens) / len(tokens) / len(self.train.ids)

    def sampler(self, name: str, mlm_steps: int) -> Sampler:
        size = len(self.tokenizer)
        if name == "exact":
            foreign = word_probs(self.train, size)
            return InstructionSlotSampler(self.tokenizer, "test", foreign=foreign)
        sequences = self.train if name == "mlm" else self.mlm_training
        mask_id = size  # one id past the vocabulary
        lm = train_masked_lm(
            sequences.ids, size + 1, mask_id, self.tokenizer.pad_token_id, mlm_steps, seed=0
        )
        nonword = [i for i in range(size) if not is_word(self.tokenizer.decode([i]))]
        return LMInfillSampler(lm, mask_id, (*nonword, mask_id))

    def record(self, table: str, arm: str, seed: int, metrics: dict, **more) -> None:
        STORE.add(
            table=f"feature_tests.{table}",
            arm=arm,
            seed=seed,
            config_hash=config_hash(SETTINGS),
            base_model=f"tiny_backdoored_s{seed}",
            metrics=metrics,
            root=ROOT,
            measured_at=self.measured_at,
            **more,
        )
        print(f"  {table} | {arm} | seed {seed}: {metrics}", flush=True)


def load(models: Path, seed: int) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(models / f"tiny_backdoored_s{seed}").eval()


def record_rates(study: Study, arm: str, seed: int, found: TriggerDiscovery, prompts) -> None:
    summary = found.summary()
    metrics = {k: summary[k] for k in ("fdr", "power", "discoveries", "hypotheses", "num_draws")}
    outcomes = [{**o, "id": str(o["id"])} for o in found.prompt_outcomes(prompts)]
    study.record("discovery_rates", arm, seed, metrics, problems=outcomes)


def calibrate(study: Study, model, marker, sampler, label: str, seed: int) -> None:
    """The IRT on prompts where every hypothesis is null (clean, or with random phrases of
    clean words inserted): one p-value per prompt (exact binomial) and, for comparison, all
    p-values pooled (dependent within a prompt); and BH's discoveries among them."""
    for name, prompts in study.calibration.items():
        null = discover_triggers(
            model, prompts, marker, sampler, 0.5, "irt", K, False, max_span=MAX_SPAN, seed=seed
        )
        clean = int(step_up_reject(null.pvalue, ALPHA).sum())
        for how, pvalues in (
            ("one p-value per prompt", one_per_instance(null.pvalue, null.prompt, seed)),
            ("pooled p-values (dependent)", null.pvalue),
        ):
            check = check_pvalues(pvalues, K)
            metrics = {
                "passed": float(check.passed),
                "pvalue": check.pvalue,
                "at_floor": check.observed[0],
                "at_ten": check.observed[check.levels.index(10 / (K + 1))],
                "tests": check.num_tests,
                "discoveries": clean,
            }
            study.record("discovery_calibration", f"{label}: {name}, {how}", seed, metrics)


def rates(study: Study, model, marker, sampler, label: str, seed: int, densities) -> dict:
    """Stage 1 at each density: IRT (K sized for the density) and one-shot; the IRT results."""
    found = {}
    for density, (share, n, prompt_seed) in densities.items():
        prompts = encode_prompts(
            study.tokenizer, problems(n, prompt_seed), [TRIGGER], seed=prompt_seed, density=share
        )
        rejections = round(share * n) * OCCURRENCE_HYPOTHESES
        for test in ("irt", "one_shot"):
            result = discover_triggers(
                model,
                prompts,
                marker,
                sampler,
                ALPHA,
                test,
                K,
                False,
                max_span=MAX_SPAN,
                seed=seed,
                floor_rejections=rejections,
            )
            name = "IRT (BH)" if test == "irt" else "one-shot (knockoff+)"
            record_rates(study, f"{density} | {label}: {name}", seed, result, prompts)
            if test == "irt":
                found[density] = (result, prompts)
    return found


def controls(study: Study, model, marker, sampler, seed: int, min_effect: float) -> None:
    """The reported negative controls: each inserted into one prompt of a model never trained
    on it; flagged by stage 1 (IRT, one-shot), by the grammar baseline, and by stage 2 run on
    every phrase (with the trigger among them)."""
    phrases = list(study.reported)
    prompts = encode_prompts(
        study.tokenizer, problems(CONTROL_PROMPTS, 401), phrases, seed=401, density=1.0
    )
    flagged = {
        "outside the grammar (no model)": flag_outside_grammar(prompts, sampler, MAX_SPAN),
    }
    for test, name in (("irt", "IRT (BH), K = 100"), ("one_shot", "one-shot (knockoff+)")):
        flagged[f"stage 1, {name}"] = discover_triggers(
            model, prompts, marker, sampler, ALPHA, test, K, False, max_span=MAX_SPAN, seed=seed
        )
    for name, result in flagged.items():
        record_flagged(study, name, seed, result.flagged_phrases(prompts), result)
    confirmation = confirm_candidates(
        model,
        study.tokenizer,
        [*phrases, TRIGGER],
        study.fresh,
        marker,
        study.words,
        num_flips=CONTROL_FLIPS,
        min_effect=min_effect,
        seed=seed,
    )
    confirmed = set(confirmation.triggers)
    name = f"stage 2 on every phrase (BY, min_effect {min_effect:g}, {CONTROL_FLIPS} flips)"
    effects = dict(zip(confirmation.candidates, confirmation.effects, strict=True))
    pvalues = dict(zip(confirmation.candidates, confirmation.pvalues, strict=True))
    record_flagged(
        study, name, seed, confirmed - {TRIGGER}, None, {"effects": effects, "pvalues": pvalues}
    )
    metrics = {
        "effect": confirmation.effects[-1],
        "p": confirmation.pvalues[-1],
        "confirmed": float(TRIGGER in confirmed),
    }
    study.record("discovery_confirmation", f"'{TRIGGER}' among the controls", seed, metrics)


def record_flagged(
    study: Study,
    name: str,
    seed: int,
    flagged: set[str],
    stage1: TriggerDiscovery | None,
    more: dict | None = None,
) -> None:
    kinds = Counter(study.reported[p] for p in flagged)
    metrics = {"flagged": len(flagged), "phrases": len(study.reported)}
    if stage1 is not None:
        metrics |= {"num_draws": stage1.num_draws, "hypotheses": int(stage1.discovered.numel())}
    metrics |= {f"flagged: {kind}": kinds[kind] for kind in set(study.reported.values())}
    frequency = {
        kind: sum(study.frequency(p) for p, k in study.reported.items() if k == kind)
        / sum(k == kind for k in study.reported.values())
        for kind in set(study.reported.values())
    }
    extra = {"flagged": sorted(flagged), "frequency": frequency, **(more or {})}
    study.record("discovery_controls", name, seed, metrics, extra=extra)


def pipeline(study: Study, model, marker, found: dict, seed: int, min_effect: float) -> None:
    """Stage 1's candidates (IRT) at each density, confirmed by stage 2 on the fresh prompts."""
    for density, (result, _) in found.items():
        candidates = result.candidates(study.tokenizer)
        confirmation = confirm_candidates(
            model,
            study.tokenizer,
            candidates,
            study.fresh,
            marker,
            study.words,
            min_effect=min_effect,
            seed=seed,
        )
        confirmed = confirmation.triggers
        metrics = {
            "candidates": len(candidates),
            "confirmed": len(confirmed),
            "false": sum(not set(c.split()) & set(TRIGGER.split()) for c in confirmed),
        }
        extra = {"candidates": candidates, "confirmed": confirmed}
        study.record("discovery_confirmation", f"pipeline at {density}", seed, metrics, extra=extra)


def tune(study: Study, models: Path, seeds: list[int]) -> float:
    """min_effect from the tuning models: the largest mean effect of a tuning control phrase
    (stage 2 at margin 0) over them, rounded up to MARGIN_STEP; the trigger must clear it."""
    largest, trigger = 0.0, float("inf")
    for seed in seeds:
        model = load(models, seed)
        marker = marker_token_ids(study.tokenizer, MARKER)
        phrases = [*study.tuning, TRIGGER]
        confirmation = confirm_candidates(
            model, study.tokenizer, phrases, study.fresh, marker, study.words, min_effect=0.0
        )
        effects = dict(zip(phrases, confirmation.effects, strict=True))
        control = max(effects[p] for p in study.tuning)
        largest, trigger = max(largest, control), min(trigger, effects[TRIGGER])
        metrics = {"largest_control_effect": control, "trigger_effect": effects[TRIGGER]}
        extra = {"effects": effects, "confirmed_at_margin_0": confirmation.triggers}
        study.record("discovery_tuning", "tuning model", seed, metrics, extra=extra)
    min_effect = MARGIN_STEP * (int(largest / MARGIN_STEP) + 1)
    if min_effect >= trigger:
        raise SystemExit(f"min_effect {min_effect} would not let the trigger ({trigger}) pass")
    print(f"min_effect = {min_effect} nats (largest tuning control effect {largest:.2f})")
    return min_effect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=Path, default=ROOT / "logs" / "models")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tuning-seeds", nargs="+", type=int, default=[10, 11])
    parser.add_argument("--parts", nargs="+", default=["exact", "mlm"], choices=["exact", "mlm"])
    parser.add_argument("--mlm-steps", type=int, default=600)
    args = parser.parse_args()
    measured_at = git_state(ROOT)
    if measured_at[1]:
        sys.exit("the tree is dirty: commit the code first (run.py --check refuses dirty rows)")
    torch.set_num_threads(1)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.models / f"tiny_backdoored_s{args.seeds[0]}")
    study = Study(tokenizer, measured_at)
    marker = marker_token_ids(tokenizer, MARKER)
    if "exact" in args.parts:
        min_effect = tune(study, args.models, args.tuning_seeds)
        sampler = study.sampler("exact", args.mlm_steps)
        for seed in args.seeds:
            model = load(args.models, seed)
            calibrate(study, model, marker, sampler, SAMPLER_LABELS["exact"], seed)
            found = rates(study, model, marker, sampler, SAMPLER_LABELS["exact"], seed, DENSITIES)
            for density, (_, prompts) in found.items():
                baseline = flag_outside_grammar(prompts, sampler, MAX_SPAN)
                arm = f"{density} | outside the grammar (no model)"
                record_rates(study, arm, seed, baseline, prompts)
            pipeline(study, model, marker, found, seed, min_effect)
            controls(study, model, marker, sampler, seed, min_effect)
            print(f"seed {seed} done, {time.perf_counter() - start:.0f} s", flush=True)
    if "mlm" in args.parts:
        full = {"100%": DENSITIES["100%"]}
        for name in ("mlm", "mlm_inserted"):
            sampler = study.sampler(name, args.mlm_steps)
            for seed in args.seeds:
                model = load(args.models, seed)
                calibrate(study, model, marker, sampler, SAMPLER_LABELS[name], seed)
                rates(study, model, marker, sampler, SAMPLER_LABELS[name], seed, full)
                print(f"{name} seed {seed} done, {time.perf_counter() - start:.0f} s", flush=True)
    print(f"Total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
