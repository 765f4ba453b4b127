import copy
import types

import torch

from osftkit.rollout import HFGenerateEngine, Rollouts
from osftkit.rollout.engine import response_mask_and_truncation

EOS = 1


def test_response_mask_stops_after_first_eos():
    responses = torch.tensor([[5, 6, EOS, 0, 0], [5, EOS, EOS, 0, 0], [5, 6, 7, 8, 9]])
    mask, truncated = response_mask_and_truncation(responses, EOS)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]


def encode_left_padded(tokenizer, texts):
    ids = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    from osftkit.data.datamodule import pad_left

    return pad_left(ids, tokenizer.pad_token_id)


def generate(tiny_lm, texts, **kwargs):
    prompt_ids, prompt_mask = encode_left_padded(tiny_lm.tokenizer, texts)
    settings = {"num_samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8}
    tokens = {"eos_token_id": tiny_lm.tokenizer.eos_token_id}
    tokens["pad_token_id"] = tiny_lm.tokenizer.pad_token_id
    return HFGenerateEngine().generate(
        tiny_lm.model, prompt_ids, prompt_mask, **{**settings, **tokens, **kwargs}
    )


def test_left_padding_does_not_change_greedy_generation(tiny_lm):
    texts = ["1+2*3\n", "45+6\n", "7\n"]
    batched = generate(tiny_lm, texts)
    for i, text in enumerate(texts):
        alone = generate(tiny_lm, [text])
        n = int(alone.lengths[0])
        assert batched.response_ids[i, :n].tolist() == alone.response_ids[0, :n].tolist()


def test_rollouts_shapes_groups_and_loss_mask(tiny_lm):
    texts = ["1+2\n", "33*4\n"]
    rollouts = generate(tiny_lm, texts, num_samples=3, temperature=1.0, max_new_tokens=6)
    assert rollouts.response_ids.shape[0] == 6 and rollouts.group_size == 3
    assert rollouts.lengths.max() <= 6
    assert bool(((rollouts.lengths == 6) | ~rollouts.truncated).all())  # cut rows hit the limit
    # The loss mask picks exactly the response tokens among the next-token targets.
    targets = rollouts.sequences[:, 1:][rollouts.loss_mask.bool()]
    assert targets.tolist() == rollouts.response_ids[rollouts.response_mask.bool()].tolist()
    first, second = rollouts.split(2)
    assert torch.equal(first.prompt_ids, rollouts.prompt_ids[:3])
    assert torch.equal(second.response_ids, rollouts.response_ids[3:])


def test_model_is_left_in_training_mode(tiny_lm):
    tiny_lm.model.train()
    generate(tiny_lm, ["1+1\n"])
    assert tiny_lm.model.training


def test_bad_generation_arguments(tiny_lm):
    import pytest

    for kwargs, message in [
        ({"num_samples": 0}, "G"),
        ({"temperature": -1.0}, "temperature"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"top_p": 0.0}, "top_p"),
    ]:
        with pytest.raises(ValueError, match=message):
            generate(tiny_lm, ["1\n"], **kwargs)


def test_split_refuses_more_chunks_than_prompts():
    import pytest

    rollouts = Rollouts(
        *(torch.zeros(2, 3, dtype=torch.long) for _ in range(4)),
        truncated=torch.zeros(2, dtype=torch.bool),
        group_size=2,
    )
    with pytest.raises(ValueError, match="cannot split 1 prompts into 2"):
        rollouts.split(2)


def test_vllm_outputs_become_rollouts():
    """The conversion used by the (GPU-only) vLLM engine: padding, masks and truncation."""
    from osftkit.rollout.engine import rollouts_from_token_lists

    prompt_ids, prompt_mask = torch.tensor([[0, 7], [8, 9]]), torch.tensor([[0, 1], [1, 1]])
    responses = [[5, EOS], [5, 6, 7], [EOS], [4, 4, 4]]
    rollouts = rollouts_from_token_lists(responses, prompt_ids, prompt_mask, 2, EOS, 0)
    assert rollouts.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert rollouts.truncated.tolist() == [False, True, False, True]
    assert rollouts.prompt_ids.tolist() == [[0, 7], [0, 7], [8, 9], [8, 9]]


# ---- engine=hf: chunks, early stop, prompt embeddings ---------------------------------------
PROMPTS = ["1+2*3\n", "45+6\n", "7\n", "8*9+10\n", "3-1\n"]


def test_hf_chunks_to_a_token_budget_give_the_same_greedy_rollouts(tiny_lm):
    whole = generate(tiny_lm, PROMPTS, num_samples=2)
    engine = HFGenerateEngine(max_batch_tokens=40)
    assert engine.prompts_per_chunk(5, 20, 1) == 2 and engine.prompts_per_chunk(5, 50, 2) == 1
    prompt_ids, prompt_mask = encode_left_padded(tiny_lm.tokenizer, PROMPTS)
    chunked = engine.generate(
        tiny_lm.model,
        prompt_ids,
        prompt_mask,
        num_samples=2,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=8,
        eos_token_id=tiny_lm.tokenizer.eos_token_id,
        pad_token_id=tiny_lm.tokenizer.pad_token_id,
    )
    assert torch.equal(chunked.response_ids, whole.response_ids)
    assert torch.equal(chunked.response_mask, whole.response_mask)


def test_hf_stops_when_every_row_has_ended(tiny_lm):
    first = int(generate(tiny_lm, ["7\n"]).response_ids[0, 0])
    tokenizer = tiny_lm.tokenizer
    prompt_ids, prompt_mask = encode_left_padded(tokenizer, ["7\n", "7\n"])
    rollouts = HFGenerateEngine().generate(
        tiny_lm.model,
        prompt_ids,
        prompt_mask,
        num_samples=1,
        temperature=0.0,
        top_p=1.0,
        max_new_tokens=8,
        eos_token_id=first,  # both rows "end" at their first token
        pad_token_id=tokenizer.pad_token_id,
    )
    assert rollouts.response_ids.shape[1] == 1 and not bool(rollouts.truncated.any())


def test_hf_generation_from_prompt_embeddings_matches_token_ids(tiny_lm):
    prompt_ids, prompt_mask = encode_left_padded(tiny_lm.tokenizer, PROMPTS[:3])
    embeds = tiny_lm.model.get_input_embeddings()(prompt_ids).detach()
    settings = {"num_samples": 1, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8}
    ids = {"eos_token_id": tiny_lm.tokenizer.eos_token_id, "pad_token_id": 0}
    from_embeds = HFGenerateEngine().generate(
        tiny_lm.model, prompt_ids, prompt_mask, prompt_embeds=embeds, **settings, **ids
    )
    from_ids = HFGenerateEngine().generate(
        tiny_lm.model, prompt_ids, prompt_mask, **settings, **ids
    )
    assert torch.equal(from_embeds.response_ids, from_ids.response_ids)


# ---- engine=paged: transformers continuous batching on CPU ---------------------------------
def test_paged_greedy_equals_hf_greedy(tiny_lm):
    from osftkit.rollout import PagedEngine

    prompt_ids, prompt_mask = encode_left_padded(tiny_lm.tokenizer, PROMPTS)
    settings = {"num_samples": 2, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 8}
    ids = {"eos_token_id": tiny_lm.tokenizer.eos_token_id, "pad_token_id": 0}
    paged = PagedEngine().generate(tiny_lm.model, prompt_ids, prompt_mask, **settings, **ids)
    hf = HFGenerateEngine().generate(tiny_lm.model, prompt_ids, prompt_mask, **settings, **ids)
    assert torch.equal(paged.response_ids, hf.response_ids)
    assert torch.equal(paged.response_mask, hf.response_mask)
    assert torch.equal(paged.prompt_ids, hf.prompt_ids)


def test_paged_samples_g_rows_per_prompt(tiny_lm):
    from osftkit.rollout import PagedEngine

    tiny_lm.model.train()
    prompt_ids, prompt_mask = encode_left_padded(tiny_lm.tokenizer, PROMPTS[:2])
    rollouts = PagedEngine({"max_batch_tokens": 64}).generate(
        tiny_lm.model,
        prompt_ids,
        prompt_mask,
        num_samples=3,
        temperature=1.0,
        top_p=0.9,
        max_new_tokens=6,
        eos_token_id=tiny_lm.tokenizer.eos_token_id,
        pad_token_id=0,
    )
    assert rollouts.response_ids.shape[0] == 6 and rollouts.group_size == 3
    assert int(rollouts.lengths.max()) <= 6 and tiny_lm.model.training
    assert torch.equal(rollouts.prompt_ids[:3], prompt_ids[:1].expand(3, -1))


# ---- end of turn ------------------------------------------------------------------------------
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def chat_tokenizer():
    """The byte tokenizer as a Qwen2.5 base model's: EOS <|endoftext|>, turns end <|im_end|>."""
    from osftkit.models.tiny import build_byte_tokenizer

    tokenizer = build_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_TEMPLATE
    return tokenizer


def test_end_of_turn_ids_are_eos_the_templates_turn_end_and_the_generation_config():
    from transformers import GenerationConfig

    from osftkit.rollout.engine import end_of_turn_ids

    tokenizer = chat_tokenizer()
    eos, im_end = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn_ids(tokenizer) == [eos, im_end]
    assert end_of_turn_ids(tokenizer, GenerationConfig(eos_token_id=[im_end, 7])) == [
        eos,
        im_end,
        7,
    ]
    plain = chat_tokenizer()
    plain.chat_template = None
    assert end_of_turn_ids(plain, GenerationConfig()) == [eos]


def test_generation_and_the_loss_mask_stop_at_any_end_of_turn_token(tiny_lm):
    """Forced to say <|im_end|> (a bias on its logit), the model stops there, not at EOS."""
    responses = torch.tensor([[5, 3, 9, 9], [5, EOS, 9, 9], [5, 6, 7, 8]])
    mask, truncated = response_mask_and_truncation(responses, [EOS, 3])
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert truncated.tolist() == [False, False, True]
    model = copy.deepcopy(tiny_lm.model)
    turn_end = 40  # any id other than EOS stands for <|im_end|>
    bias = torch.zeros(model.config.vocab_size)
    bias[turn_end] = 100.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
    biased = types.SimpleNamespace(model=model, tokenizer=tiny_lm.tokenizer)
    rollouts = generate(biased, ["12\n"], eos_token_id=[tiny_lm.tokenizer.eos_token_id, turn_end])
    assert rollouts.response_ids[0, 0].item() == turn_end
    assert rollouts.lengths.tolist() == [1] and not rollouts.truncated.any()
