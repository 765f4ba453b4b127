"""A problem -> the model's prompt: its chat template when it has one, else a plain template."""

from transformers import PreTrainedTokenizerBase

MATH_SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def format_prompt(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    plain_template: str,
    system_prompt: str | None = MATH_SYSTEM_PROMPT,
    use_chat_template: bool = True,
) -> str:
    if use_chat_template and tokenizer.chat_template:
        messages = [{"role": "user", "content": problem}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return plain_template.format(problem=problem)
