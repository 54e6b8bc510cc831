import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HOME", os.path.join(tempfile.gettempdir(), "lm_eval_bh_hf_home"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels run in its CPU interpreter; read when triton is first
    os.environ.setdefault("TRITON_INTERPRET", "1")  # imported (transformers' import below may import it)

from transformers import OlmoeConfig, OlmoeForCausalLM  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one torch thread per worker, no oversubscription
    torch.set_num_threads(1)


def subprocess_env() -> dict:
    """Environment for the CLI subprocesses of the tests: offline, this checkout importable."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def model_digest(folder: Path) -> dict:
    """{file: sha256} of a built model folder's weights and configs (not its build record, which holds times)."""
    import hashlib

    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())
            if f.suffix in (".safetensors", ".json") and f.name != "lm_eval_bh_real.json"}


def make_olmoe(seed: int = 0, dtype=torch.float32, **overrides) -> OlmoeForCausalLM:
    """A tiny random OLMoE (2 layers, 16 experts, top-4) with a heavy-tailed router, in memory."""
    cfg = dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, max_position_embeddings=256,
        norm_topk_prob=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(OlmoeConfig(**cfg)).to(dtype).eval()
    with torch.no_grad():  # trained routers have a few experts that stand out per token
        for layer in model.model.layers:
            w = layer.mlp.gate.weight
            w.normal_(0, 0.02)
            w[: w.shape[0] // 4] *= 12
    return model


@pytest.fixture
def olmoe():
    return make_olmoe()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The embedded default model (tiny OLMoE + shipped tokenizer), saved to disk for lm-eval."""
    from lm_eval_bh.tiny import build_tiny_olmoe

    return build_tiny_olmoe(tmp_path_factory.mktemp("tiny-olmoe"))


@pytest.fixture(scope="session")
def task_manager():
    """lm-eval's TaskManager with the offline tasks (tasks/): its index of lm-eval's own tasks takes
    seconds to build, so the in-process evaluations share one."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(ROOT / "tasks"))


def run_concurrently(jobs: dict, workers: int = 2) -> dict:
    """{name: CompletedProcess} for {name: (argv, extra subprocess.run kwargs)}, `workers` at a time.
    A command line of lm-eval spends most of its time in imports and in building lm-eval's task index,
    one core each: two at a time fill a two-core machine."""
    def run(argv, kw):
        kw = {"env": dict(subprocess_env(), OMP_NUM_THREADS="1"), **kw}
        return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)

    with ThreadPoolExecutor(workers) as pool:
        futures = {name: pool.submit(run, argv, kw) for name, (argv, kw) in jobs.items()}
    return {name: future.result() for name, future in futures.items()}


def module_state(model: torch.nn.Module) -> dict:
    """What a patch could leave behind, per module: every instance attribute (plain values by value,
    objects by identity, containers such as the hook dicts by their keys and values' identities; the
    parameters and buffers by name), and torch's global module hooks."""
    from torch.nn.modules import module as torch_module

    def state(value):
        if isinstance(value, dict):
            return {key: state(v) for key, v in value.items()}
        if isinstance(value, (bool, int, float, str, type(None))):
            return value
        if isinstance(value, tuple):
            return tuple(state(v) for v in value)
        return ("id", id(value))

    def attributes(m):  # parameters and buffers by name (accelerate's offload swaps them every forward)
        return {**m.__dict__, "_parameters": tuple(m._parameters), "_buffers": tuple(m._buffers)}

    out = {name: state(attributes(m)) for name, m in model.named_modules()}
    out["<global hooks>"] = {name: state(getattr(torch_module, name)) for name in dir(torch_module)
                             if name.startswith("_global_") and isinstance(getattr(torch_module, name), dict)}
    return out


def assert_unpatched(model: torch.nn.Module, before: dict) -> None:
    """`model` is as it was when `before = module_state(model)` was taken: no forward (pre-)hook, no
    instance attribute of lm-eval-bh left anywhere, every changed attribute restored."""
    after = module_state(model)
    assert after.keys() == before.keys()
    for name in before:
        assert after[name] == before[name], f"module {name or '<root>'} differs after unpatch"
    for name, m in model.named_modules():
        for key, value in m.__dict__.items():
            owner = getattr(type(value), "__module__", "") or ""
            assert not owner.startswith("lm_eval_bh"), f"{name}.{key} is lm-eval-bh's {type(value).__name__}"
