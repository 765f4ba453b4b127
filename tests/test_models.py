import copy
import json
import socket

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from osftkit.models import load_causal_lm
from osftkit.models.loading import ModelNotFoundError, _ensure_pad_token


def test_tiny_round_trip(tiny_lm, tmp_path):
    """The tiny model and tokenizer survive save_pretrained / from_pretrained unchanged."""
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "qwen2"
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    text = "12+3*4\n3*4=12\n\\boxed{24} é"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == tiny_lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    inputs = torch.tensor([ids])
    torch.testing.assert_close(model(inputs).logits, tiny_lm.model(inputs).logits)


def test_tiny_build_is_cached_and_deterministic(tmp_path):
    spec = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
    }
    first = load_causal_lm(cache_dir=str(tmp_path / "a"), tiny=spec)
    second = load_causal_lm(cache_dir=str(tmp_path / "b"), tiny=spec)
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)
    assert len(list((tmp_path / "a").iterdir())) == 2  # the model dir and its lock file


def test_missing_local_directory(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        load_causal_lm(path=str(tmp_path / "nowhere"))


def test_unreachable_hub_id_says_what_to_do():
    with pytest.raises(ModelNotFoundError, match=r"pre-download.*model\.path=/some/dir"):
        load_causal_lm(path="Qwen/Qwen2.5-Math-1.5B")


def test_dtype_knob_and_bad_dtype(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_causal_lm(path=str(tmp_path), dtype="bfloat16")
    assert next(loaded.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="model.dtype must be one of"):
        load_causal_lm(path=str(tmp_path), dtype="fp8")


def test_lora_wraps_only_adapters(tiny_lm, tmp_path):
    tiny_lm.model.save_pretrained(tmp_path)
    tiny_lm.tokenizer.save_pretrained(tmp_path)
    loaded = load_causal_lm(
        path=str(tmp_path), lora={"r": 4, "target_modules": ["q_proj", "v_proj"]}
    )
    trainable = [n for n, p in loaded.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_tokenizer_without_pad_falls_back_to_eos(tiny_lm, caplog):
    tokenizer = copy.deepcopy(tiny_lm.tokenizer)
    tokenizer.pad_token = None
    _ensure_pad_token(tokenizer, copy.deepcopy(tiny_lm.model))
    assert tokenizer.pad_token == tokenizer.eos_token
    assert tokenizer.padding_side == "left"
    assert "no pad token" in caplog.text
    tokenizer.pad_token = tokenizer.eos_token = None
    with pytest.raises(ValueError, match="neither a pad nor an EOS token"):
        _ensure_pad_token(tokenizer, tiny_lm.model)


def test_lora_knob_on_a_kit_model_config_wraps_and_trains(fast_cfg):
    """`model.lora=...` as the cookbook writes it, on a kit-built config (model=tiny): the model
    is wrapped, training moves only the adapters, and the LoRA B matrices leave their zero init."""
    from peft import PeftModel

    from osftkit.train import build_components, build_trainer

    cfg = fast_cfg("method=sft", "model.lora={r: 4, target_modules: [q_proj, v_proj]}")
    loaded, datamodule, module = build_components(cfg)
    assert isinstance(loaded.model, PeftModel)
    before = {n: p.detach().clone() for n, p in loaded.model.named_parameters()}
    build_trainer(cfg, [], []).fit(module, datamodule)
    moved = {n for n, p in loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)  # B starts at zero: the adapters now act


def test_checkpointing_recomputes_layers_with_equal_gradients(tiny_lm):
    """enable_checkpointing (the 5.23+ API here; `gradient_checkpointing_enable` on the 5.17 of
    the GPU acceptance rehearsal) turns it on and leaves the gradients unchanged."""
    from osftkit.models.loading import enable_checkpointing

    ids = torch.randint(0, tiny_lm.model.config.vocab_size, (2, 12))
    grads = []
    for checkpointing in (False, True):
        model = copy.deepcopy(tiny_lm.model).train()
        if checkpointing:
            enable_checkpointing(model)
        assert model.is_gradient_checkpointing == checkpointing
        model(ids, labels=ids).loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for plain, recomputed in zip(*grads, strict=True):
        torch.testing.assert_close(plain, recomputed)


def test_unreachable_hub_fails_at_once_from_the_cache_only(monkeypatch):
    """Online mode but the hub does not answer: one quick probe, then the local cache only (the
    hub client would retry five times with back-off first)."""
    from huggingface_hub import constants

    from osftkit.models import loading

    with socket.socket() as closed:  # a port nothing listens on: refused at once
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.delenv("https_proxy", raising=False)
    assert loading.hub_access("Qwen/Qwen2.5-Math-1.5B") == {"local_files_only": True}
    with pytest.raises(ModelNotFoundError, match=r"pre-download.*model\.path=/some/dir"):
        load_causal_lm(path="Qwen/Qwen2.5-Math-1.5B")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")  # cannot be probed: the
    assert loading.hub_access("Qwen/Qwen2.5-Math-1.5B") == {}  # hub client's own path decides


def test_reachable_hub_and_local_dirs_load_as_before(monkeypatch, tiny_lm, tmp_path):
    from huggingface_hub import constants

    from osftkit.models import loading

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert loading.hub_access("Qwen/Qwen2.5-Math-1.5B") == {}
    tiny_lm.model.save_pretrained(tmp_path)
    assert loading.hub_access(str(tmp_path)) == {}
