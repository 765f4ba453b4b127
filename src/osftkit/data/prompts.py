"""A problem -> the model's prompt: its chat template when it has one, else a plain template."""

from transformers import PreTrainedTokenizerBase

# The Online SFT paper's prompt (shared/papers/online_sft.md, "prompt"): the model's chat template
# with this system prompt (Qwen2.5-Math's own). PromptDataModule passes it by default; it reaches
# the prompt whenever the tokenizer has a chat template (the kit's tiny models have none, so their
# configs use `plain_template`).
MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    plain_template: str,
    system_prompt: str | None,
    use_chat_template: bool = True,
) -> str:
    if use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": problem}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_template.format(problem=problem)
