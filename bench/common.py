"""What the benchmarks share: the peer configuration built with this project, timing, interleaved repetitions, the
peer's worker process, per-phase peak memory and the JSON report."""

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import transformers

from modeling_transfusion import TransfusionConfig, TransfusionForConditionalGeneration

# The peer configuration of ../shared/notes/peers.md: dim 256, depth 4, 4 heads of 64, an MLP of inner width 682 (the
# matrix work of the peer's GEGLU feed-forward), a 256-token vocabulary and 64 patches of 16 latent values (the
# identity autoencoder on 16x16x4 "latents" with 2x2 patches).
BOI, EOI, IMAGE = 253, 254, 255
PEER_TEXT_CONFIG = {
    "model_type": "llama",
    "vocab_size": 256,
    "hidden_size": 256,
    "intermediate_size": 682,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 4096,
}
PEER_SHAPE = "hidden 256, 4 layers, 4 heads, MLP 682, vocab 256; 64 patches of 16 latent values"
# SmolLM2-135M's backbone (random weights): width 576, 30 layers, 9 heads of 64, 3 key-value heads, MLP 1536.
SMOLLM2_TEXT_CONFIG = {
    "model_type": "llama",
    "vocab_size": 49152,
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": True,
}
SHAPES = {"small": PEER_TEXT_CONFIG, "smollm2": SMOLLM2_TEXT_CONFIG}
SHAPE_NAMES = {
    "small": PEER_SHAPE,
    "smollm2": "SmolLM2-135M's shape (random weights: hidden 576, 30 layers, 9 heads, 3 KV heads, MLP 1536, vocab "
    "49152); 64 patches of 16 latent values",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PEER_PYTHON = Path(os.environ.get("TRANSFUSION_PEER_PYTHON", "~/.cache/transfusion-bench/peer-venv/bin/python"))
BENCH_DIR = Path(__file__).resolve().parent


def add_device_arguments(parser):
    """`--shape`, `--device`, `--dtype` and `--attn-implementation`, shared by the benchmarks that run on a GPU too."""
    parser.add_argument("--shape", choices=sorted(SHAPES), default="small", help="backbone shape (random weights)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--attn-implementation", choices=["sdpa", "eager", "flex_attention"], default="sdpa")


def device_arguments(args) -> list[str]:
    """The arguments of `add_device_arguments` again, for a fresh process measuring one phase."""
    return [
        *("--shape", args.shape, "--device", args.device, "--dtype", args.dtype),
        *("--attn-implementation", args.attn_implementation),
    ]


def build_model(
    image_size: int = 16, shape: str = "small", device="cpu", dtype: str = "float32", attn_implementation="sdpa"
) -> TransfusionForConditionalGeneration:
    """A random Transfusion model of the peer's shape (or SmolLM2-135M's: `shape="smollm2"`), in eval mode. The patch
    decoder, zero-initialised for training, gets random weights so that sampling does real arithmetic. `image_size` is
    the side of the identity autoencoder's latents: `(image_size // 2) ** 2` image slots (64 at the peer's 16)."""
    config = TransfusionConfig(
        text_config=SHAPES[shape],
        image_size=image_size,
        num_channels=4,
        latent_channels=4,
        patch_size=2,
        boi_token_id=BOI,
        eoi_token_id=EOI,
        image_token_id=IMAGE,
    )
    torch.manual_seed(0)
    model = TransfusionForConditionalGeneration(config).eval()
    torch.nn.init.normal_(model.model.patch_decoder.proj.weight, std=0.02)
    model.set_attn_implementation(attn_implementation)
    return model.to(device=device, dtype=DTYPES[dtype])


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def timed(function) -> tuple[float, float]:
    """Runs `function` once; returns `(wall_seconds, cpu_seconds)`, the latter the CPU time of this process."""
    synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    function()
    synchronize()
    return time.perf_counter() - wall, time.process_time() - cpu


def synchronize():
    """Waits for the GPU's queued work, so that a timing covers it (nothing to do on CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def interleave(variants: dict, repeats: int, warmup: int = 1) -> dict[str, list[tuple[float, float]]]:
    """Times every variant `repeats` times, one repetition of each in turn, after `warmup` untimed rounds. A variant
    is a callable, or a callable returning its own `(wall, cpu)` (marked by a `returns_timing` attribute: the peer's
    worker times the call inside its own process)."""

    def measure(function):
        return function() if getattr(function, "returns_timing", False) else timed(function)

    for _ in range(warmup):
        for function in variants.values():
            measure(function)
    runs = {name: [] for name in variants}
    for _ in range(repeats):
        for name, function in variants.items():
            runs[name].append(measure(function))
    return runs


def run_interleaved(variants: dict, repeats: int, warmup: int = 1) -> tuple[dict, dict, list[float]]:
    """`interleave` between two matmul probes: the runs, their `summarise`, and the probe's GFLOP/s before and
    after."""
    gflops_start = matmul_gflops()
    runs = interleave(variants, repeats, warmup)
    return runs, summarise(runs), [gflops_start, matmul_gflops()]


def summarise(runs: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, float]]:
    """Median and minimum of the wall-clock and CPU times of each variant."""
    return {
        f"{statistic}_{clock}": {name: pick(run[index] for run in timings) for name, timings in runs.items()}
        for statistic, pick in (("median", statistics.median), ("min", min))
        for clock, index in (("wall", 0), ("cpu", 1))
    }


def matmul_gflops(size: int = 1024, repeats: int = 10) -> float:
    """A calibration probe: float32 matmul throughput now. A loaded machine shows it (peers.md discards peer runs
    whose probe fell to a third)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def _proc_status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field} line: memory is only measured on Linux")


def report_phase_memory(phase, repeats: int = 3):
    """Runs `phase` `repeats` times in this (fresh) process and prints its memory as JSON: the peak resident memory
    and the resident memory before the phase ran (imports, model, inputs). The peak is read from /proc (VmHWM), not
    from `getrusage`: a child's `ru_maxrss` starts from its parent's peak at the fork."""
    before = _proc_status_mb("VmRSS")
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    if cuda:
        cuda_before = torch.cuda.memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        phase()
    memory = {"peak_rss_mb": _proc_status_mb("VmHWM"), "before_mb": before}
    if cuda:
        memory.update(cuda_peak_mb=torch.cuda.max_memory_allocated() / 2**20, cuda_before_mb=cuda_before)
    print(json.dumps(memory))


def peer_available() -> bool:
    return PEER_PYTHON.expanduser().exists()


def optional_peer(no_peer: bool, threads: int, steps: int = 32) -> "PeerWorker | None":
    """The peer's worker, or None when `--no-peer` was given or the peer is not set up (then it says so)."""
    if no_peer:
        return None
    if not peer_available():
        print("transfusion-pytorch is not set up (bash bench/setup_peer.sh): measuring without the peer")
        return None
    return PeerWorker(steps, threads)


class PeerWorker:
    """transfusion-pytorch running in its own venv (`bench/setup_peer.sh`), driven one timed call at a time."""

    def __init__(self, steps: int, threads: int):
        if not peer_available():
            raise FileNotFoundError(f"{PEER_PYTHON} is missing: run `bash bench/setup_peer.sh` first.")
        self.args = [str(PEER_PYTHON.expanduser()), str(BENCH_DIR / "peer_worker.py"), "--steps", str(steps)]
        self.args += ["--threads", str(threads)]
        self.env = {**os.environ, "TQDM_DISABLE": "1", "LOGURU_LEVEL": "WARNING"}
        self.process = subprocess.Popen(
            self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env
        )
        hello = json.loads(self.process.stdout.readline())
        self.parameters, self.torch_version = hello["parameters"], hello["torch"]

    def request(self, op: str, **kwargs) -> dict:
        self.process.stdin.write(json.dumps({"op": op, **kwargs}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the peer worker stopped during {op!r}: run {' '.join(self.args)} to see why")
        return json.loads(line)

    def call(self, op: str, **kwargs) -> tuple[float, float]:
        reply = self.request(op, **kwargs)
        return reply["wall"], reply["cpu"]

    def timed_call(self, op: str, **kwargs):
        """A variant for `interleave`."""

        def function():
            return self.call(op, **kwargs)

        function.returns_timing = True
        return function

    def phase_memory(self, phase: str, **kwargs) -> dict[str, float]:
        """Memory of a fresh peer process that builds the model and runs `phase` three times (see
        `report_phase_memory`)."""
        extra = [item for key, value in kwargs.items() for item in (f"--{key}", str(value))]
        out = subprocess.run(
            [*self.args, "--phase", phase, *extra], capture_output=True, text=True, env=self.env, check=True
        )
        return json.loads(out.stdout.strip().splitlines()[-1])

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def phase_memory(script: str, phase: str, *args: str) -> dict[str, float]:
    """Memory of a fresh process running `script --phase phase [args]`, which calls `report_phase_memory`."""
    out = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), "--phase", phase, *args], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_cell(memory: dict[str, float]) -> str:
    """`peak (+ what the phase added)` in MB, for the tables: GPU memory allocated where the phase ran on a GPU, else
    the process's resident memory."""
    if "cuda_peak_mb" in memory:
        return f"{memory['cuda_peak_mb']:.0f} (+{memory['cuda_peak_mb'] - memory['cuda_before_mb']:.0f}) GPU"
    return f"{memory['peak_rss_mb']:.0f} (+{memory['peak_rss_mb'] - memory['before_mb']:.0f})"


def write_report(path: Path, benchmark: str, **fields):
    report = {
        "benchmark": benchmark,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        **fields,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
