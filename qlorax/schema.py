"""Typed schemas of every config group: the only home of defaults and allowed values.

Each dataclass is registered with Hydra's ConfigStore (see ``register_configs``); the YAML
files under ``conf/`` extend them through their defaults list and only pick values.
Every field carries a ``help`` (shown by ``qlorax --help`` and in error messages) and,
where it applies, ``choices`` or numeric bounds that ``qlorax.spec`` checks.

After composition and validation the same classes, frozen, form the run spec
(``RunSpec``): the single object the launchers and the engine ever see.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


def opt(default: Any = dataclasses.MISSING, *, help: str, factory: Any = None, choices: tuple = (),
        ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None) -> Any:
    """A schema field with its documentation and the constraints validation enforces."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


class _Freezable:
    """Dataclass mixin: after ``freeze()`` any attribute assignment raises."""

    def __setattr__(self, name: str, value: Any) -> None:
        if self.__dict__.get("_frozen"):
            raise dataclasses.FrozenInstanceError(f"run spec is frozen: cannot set {name!r}")
        object.__setattr__(self, name, value)

    def freeze(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, _Freezable):
                value.freeze()
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        object.__setattr__(self, "_frozen", True)
        return self


@dataclass
class ModelConfig(_Freezable):
    name: str = opt("tiny", help="short name of the model, used in logs and run names")
    path: str = opt("builtin:tiny", help="local directory or Hugging Face hub id; 'builtin:tiny' builds the demo model")
    revision: Optional[str] = opt(None, help="hub revision (branch, tag or commit) when path is a hub id")
    trust_remote_code: bool = opt(False, help="run Python code shipped with the model; off unless you trust it")
    allow_pickle: bool = opt(False, help="allow loading pickle (.bin) weights; safetensors otherwise")
    max_seq_len: Optional[int] = opt(None, help="context length of the model; null reads it from the model config", ge=1)
    hub_token_env: str = opt("HF_TOKEN", help="name of the environment variable holding a hub token; the token itself is never stored")
    # Size hints let `qlorax plan` estimate memory for a hub id without downloading its config.
    params_b: Optional[float] = opt(None, help="size hint: parameters in billions (read from config.json when local)", gt=0)
    hidden_size: Optional[int] = opt(None, help="size hint: hidden size", ge=1)
    num_layers: Optional[int] = opt(None, help="size hint: decoder layers", ge=1)
    vocab_size: Optional[int] = opt(None, help="size hint: vocabulary size", ge=1)


@dataclass
class QuantConfig(_Freezable):
    backend: str = opt("bnb", help="4-bit backend: bnb (bitsandbytes), bigdl (ipex-llm / bigdl-llm), none (bf16 LoRA)",
                       choices=("bnb", "bigdl", "none"))
    type: str = opt("nf4", help="4-bit data type: nf4/fp4 (bnb), sym_int4 (bigdl); ignored for backend=none",
                    choices=("nf4", "fp4", "sym_int4", "asym_int4", "sym_int8", "none"))
    double_quant: bool = opt(False, help="also quantize the quantization constants (bnb only)")
    skip_modules: List[str] = opt(help="modules kept unquantized (the head; embeddings are never quantized)",
                                  factory=lambda: ["lm_head"])
    prequantized_dir: Optional[str] = opt(None, help="directory of an already-quantized checkpoint to load or to create")
    compute: str = opt("bf16", help="how the frozen base's linear layers compute: bf16 (dequantize the stored weight, "
                       "bf16 matmul) or int8 (int8 x int8 matmuls for forward and input gradient from a kept int8 "
                       "copy of the weight; ~2x the bf16 rate on VNNI/AMX Xeons, 1 byte per weight)",
                       choices=("bf16", "int8"))
    bf16_matmul: str = opt("auto", help="bf16 compute of a bitsandbytes 4-bit base: the matmul kernel: auto (qlorax's "
                           "AMX-BF16 tile kernels, which decode the 4-bit weight inside the matmul, on CPUs with AMX; "
                           "elsewhere the weight is dequantized whole for torch's matmul) or torch (dequantize whole "
                           "everywhere)", choices=("auto", "torch"))
    int8_weight: str = opt("int8", help="int8 compute: how the base weight is kept: int8 (1 byte per weight, fastest) or "
                           "int4 (4 bits plus an integer multiplier per 64 weights, unpacked to int8 per use by a native "
                           "loop: NF4's memory, 3-14% slower than int8 on the 1.1B shape; made from the local "
                           "checkpoint's original weights, not from NF4's)", choices=("int8", "int4"))
    int8_smoothing: float = opt(0.5, help="int8 compute: SmoothQuant strength alpha; outlier activation channels are "
                                "divided by max|x|^alpha / max|W|^(1-alpha), the weight multiplied; 0 disables", ge=0, le=1)
    int8_calibration_batches: int = opt(4, help="int8 compute: training micro-batches of the smoothing calibration pass",
                                        ge=1)
    int8_guard_batches: int = opt(4, help="int8 compute: held-out micro-batches on which int8 and bf16 loss are compared "
                                  "before training", ge=1)
    int8_max_loss_gap: float = opt(0.02, help="int8 compute: refuse to train when the int8 base's held-out loss exceeds "
                                   "the bf16 one by more than this fraction (0.02 = 2%)", ge=0)
    int8_saved_mlp: str = opt("int8", help="int8 compute: how the gated MLP keeps gate and up for backward: int8 (per-row "
                              "int8, half the bytes: -253 MiB at batch 4 on the 1.1B shape; the forward is unchanged, "
                              "backward sees them rounded as the int8 matmuls see their inputs) or bf16",
                              choices=("int8", "bf16"))
    int8_matmul: str = opt("auto", help="int8 compute: the int8 matmul kernel: auto (qlorax's AMX tile kernels on CPUs with "
                           "AMX-INT8, 1.4-2x the bf16 matmul where torch._int_mm reaches 1.1-1.3x; torch._int_mm "
                           "elsewhere) or torch (torch._int_mm everywhere)", choices=("auto", "torch"))
    int8_fuse: bool = opt(True, help="int8 compute: fuse the row-wise quantizers and the matmul epilogue with "
                          "torch.compile and unpack int4 weights with a native loop (needs a C++ compiler; falls "
                          "back to unfused torch ops)")


    @property
    def keeps_mlp_int8(self) -> bool:
        """The gated MLP keeps gate and up for backward as int8 rows (int8 compute with ``int8_saved_mlp=int8``)."""
        return self.compute == "int8" and self.int8_saved_mlp == "int8"


@dataclass
class DataConfig(_Freezable):
    name: str = opt("sample", help="short name of the dataset, used in logs")
    path: str = opt("builtin:sample", help="local json/jsonl/csv/parquet file, a datasets.save_to_disk directory, "
                                           "or a hub id; 'builtin:sample' and 'builtin:chat' are the shipped demo data")
    format: str = opt("auto", help="file format; auto guesses from the extension",
                      choices=("auto", "json", "jsonl", "csv", "parquet", "disk", "hub"))
    split: str = opt("train", help="split to read for datasets directories and hub ids")
    prompt: str = opt("{question} ->: ", help="template of the prompt part, with {field} placeholders")
    prompt_when_empty: Optional[str] = opt(None, help="alternative prompt used when the row's `empty_field` is blank (Alpaca's no-input form)")
    empty_field: str = opt("input", help="field whose blankness selects prompt_when_empty")
    response: str = opt("{answer}", help="template of the answer part, with {field} placeholders")
    train_on_inputs: bool = opt(True, help="compute the loss on the prompt tokens too; false masks them")
    add_eos_token: bool = opt(True, help="append the end-of-sequence token after the answer")
    cutoff_len: int = opt(256, help="maximum tokens per example; longer ones are truncated and counted", ge=8)
    packing: bool = opt(False, help="place several whole examples in each row of up to cutoff_len tokens; each "
                                    "attends only to itself (positions restart, block-diagonal mask), none is dropped")
    val_set_size: float = opt(0.05, help="held-out rows: a count (>= 1) or a fraction (< 1); 0 disables eval", ge=0)
    max_rows: Optional[int] = opt(None, help="use only the first N rows (smoke tests)", ge=1)
    shuffle_seed: int = opt(42, help="seed of the train/eval split and of the sample order")
    # Conversations (data=chat): rows hold a list of messages instead of prompt/response fields.
    chat_format: str = opt("none", help="rows are conversations: openai (messages: [{role, content}], roles "
                                        "system/user/assistant) or sharegpt (conversations: [{from, value}], from "
                                        "system/human/gpt); none uses the prompt/response templates",
                           choices=("none", "openai", "sharegpt"))
    messages_field: Optional[str] = opt(None, help="row field holding the message list; null: messages (openai), "
                                                   "conversations (sharegpt)")
    role_field: Optional[str] = opt(None, help="message field naming the speaker; null: role (openai), from (sharegpt)")
    content_field: Optional[str] = opt(None, help="message field holding the text; null: content (openai), "
                                                  "value (sharegpt)")
    chat_template: str = opt("auto", help="how conversations become text: auto uses the tokenizer's own chat "
                                          "template, else the shipped one whose markers the vocabulary has (chatml, "
                                          "llama3) or llama2 (needs only bos/eos); tokenizer insists on its own",
                             choices=("auto", "tokenizer", "chatml", "llama3", "llama2"))
    skip_bad_rows: bool = opt(False, help="skip and count malformed conversations (missing or unknown role, empty, "
                                          "ending on a user turn) instead of stopping with the row named")


@dataclass
class LoraConfig(_Freezable):
    r: int = opt(8, help="LoRA rank", ge=1, le=1024)
    alpha: float = opt(32, help="LoRA scaling numerator (scale = alpha / r)", gt=0)
    dropout: float = opt(0.05, help="dropout on the LoRA input", ge=0, lt=1)
    bias: str = opt("none", help="which biases train", choices=("none", "all", "lora_only"))
    target_modules: List[str] = opt(help="module names that get adapters; [auto]: the model family's attention "
                                         "q/k/v projections (q_proj,k_proj,v_proj on Llama, the fused qkv_proj / "
                                         "query_key_value / c_attn elsewhere; qlorax/families.py); [all-linear]: every "
                                         "linear layer but the head", factory=lambda: ["auto"])
    use_dora: bool = opt(False, help="DoRA: train a per-output magnitude besides the low-rank direction (slower)")
    use_rslora: bool = opt(False, help="rsLoRA: scale the adapter by alpha/sqrt(r) instead of alpha/r")
    init: str = opt("default", help="adapter initialisation: default (A Kaiming-uniform, B zero), gaussian (A normal); "
                    "olora and pissa (QR / top singular vectors of the base weight) are refused until merge converts "
                    "their residual-base adapters",
                    choices=("default", "gaussian", "olora", "pissa"))


@dataclass
class TrainConfig(_Freezable):
    max_steps: int = opt(200, help="optimizer steps; -1 trains for `epochs` instead", ge=-1)
    epochs: float = opt(1.0, help="passes over the data when max_steps=-1", gt=0)
    micro_batch_size: int = opt(4, help="examples per forward pass on each rank", ge=1)
    batch_size: int = opt(4, help="global batch: examples per optimizer step over all ranks", ge=1)
    learning_rate: float = opt(2e-4, help="peak learning rate", gt=0, lt=1)
    lr_scheduler: str = opt("linear", help="schedule after warmup", choices=("linear", "cosine", "constant"))
    warmup_steps: int = opt(20, help="linear warmup steps", ge=0)
    weight_decay: float = opt(0.0, help="AdamW weight decay", ge=0)
    adam_beta1: float = opt(0.9, help="AdamW beta1", ge=0, lt=1)
    adam_beta2: float = opt(0.999, help="AdamW beta2", ge=0, lt=1)
    max_grad_norm: float = opt(1.0, help="gradient-norm clipping; 0 disables", ge=0)
    precision: str = opt("auto", help="compute dtype: auto picks bf16 when the CPU has AVX512-BF16 or AMX",
                         choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = opt(False, help="recompute activations in backward: less memory, ~30% slower")
    lean_kernels: bool = opt(True, help="RMSNorm, gated-MLP and LoRA-dropout autograd functions that keep less for "
                             "backward (same forward values); false runs the model's own modules")
    logging_steps: int = opt(20, help="log loss, learning rate and epoch every N steps", ge=1)
    eval_steps: int = opt(50, help="held-out loss every N steps (and at the end)", ge=1)
    eval_max_batches: int = opt(16, help="cap on eval micro-batches per evaluation", ge=1)
    save_steps: int = opt(100, help="checkpoint every N steps (and at the end)", ge=1)
    save_total_limit: int = opt(3, help="checkpoints kept; older ones are deleted", ge=1)

    def micro_batch_for(self, workers: int) -> int:
        """The micro-batch each rank runs: never more than its share of the global batch, which
        is what the config promises (so `parallel=ccl workers=2` works with the recipe's batch of 4)."""
        return max(1, min(self.micro_batch_size, self.batch_size // max(workers, 1)))


@dataclass
class ParallelConfig(_Freezable):
    launcher: str = opt("local", help="local: one process; ccl: N ranks on this node via torchrun; k8s: render manifests",
                        choices=("local", "ccl", "k8s"))
    backend: str = opt("auto", help="torch.distributed backend: auto uses ccl when oneCCL bindings import, else gloo",
                       choices=("auto", "ccl", "gloo"))
    master_addr: str = opt("127.0.0.1", help="rendezvous address for multi-process runs")
    master_port: int = opt(0, help="rendezvous port; 0 picks a free one", ge=0, le=65535)
    preflight_timeout_s: float = opt(30.0, help="seconds the pre-flight all-reduce may take before the job fails", gt=0)
    monitor_interval_s: float = opt(5.0, help="torchrun's worker health-check interval", gt=0)
    collective_timeout_s: float = opt(1800.0, help="longest a training collective may wait (a step on a big model "
                                                  "can take minutes); rendezvous uses preflight_timeout_s", gt=0)


@dataclass
class HardwareConfig(_Freezable):
    profile: str = opt("auto", help="name of the hardware profile")
    sysfs_root: str = opt("/", help="root holding sys/devices/system/cpu (a fixture path simulates other machines)")
    cores_per_worker: Optional[int] = opt(None, help="physical cores per rank; null splits the cores evenly by socket", ge=1)
    cores: Optional[List[int]] = opt(None, help="explicit logical CPU ids to use, split between ranks")
    pin: bool = opt(True, help="bind each rank to its cores (sched_setaffinity) and set OMP/KMP affinity")
    memory_limit_gb: Optional[float] = opt(None, help="memory to plan for; null reads available memory / cgroup limit", gt=0)
    check_memory: bool = opt(True, help="refuse to start a run whose estimated peak memory does not fit")


@dataclass
class MergeConfig(_Freezable):
    base: str = opt("original", help="weights the adapter is merged into: original (bf16/fp32 checkpoint) or "
                                     "dequantized (the 4-bit weights that were trained)", choices=("original", "dequantized"))
    dtype: str = opt("auto", help="dtype of the saved merged model; auto keeps the checkpoint's", choices=("auto", "bf16", "fp32"))
    tolerance: float = opt(1e-2, help="max |logit difference| merged vs base+adapter before the merge fails", gt=0)
    parity_samples: int = opt(4, help="held-out examples used for the logit parity check", ge=1)


@dataclass
class VerifyConfig(_Freezable):
    prompts: List[str] = opt(help="prompts to generate from; empty uses the first num_prompts held-out rows", factory=list)
    num_prompts: int = opt(3, help="held-out rows rendered without their answer when prompts is empty", ge=1)
    n_predict: int = opt(32, help="new tokens to generate per prompt", ge=1)
    load_in_4bit: bool = opt(False, help="load the fine-tuned (merged) model in 4-bit for inference")
    eval_batches: int = opt(16, help="held-out micro-batches for loss / perplexity", ge=1)


@dataclass
class MetricsConfig(_Freezable):
    report_to: List[str] = opt(help="where logged steps go besides run_dir/metrics.jsonl (always written): "
                               "tensorboard (event files in run_dir/tensorboard/), mlflow (a run in "
                               "metrics.mlflow_tracking_uri); e.g. [tensorboard,mlflow]", factory=list,
                               choices=("tensorboard", "mlflow"))
    mlflow_tracking_uri: Optional[str] = opt(None, help="MLflow tracking store (sqlite:///mlflow.db, file:///path/mlruns, "
                                             "http://host:5000); null uses MLFLOW_TRACKING_URI, else MLflow's default")
    mlflow_experiment: str = opt("qlorax", help="MLflow experiment the run is logged under (created when absent)")


@dataclass
class ExportConfig(_Freezable):
    format: str = opt("gguf", help="export format: gguf (llama.cpp, ollama, LM Studio) of the merged model",
                      choices=("gguf",))
    gguf_type: str = opt("f16", help="type of the 2-D weights: f16, bf16 or q8_0 (8-bit blocks of 32; a weight whose "
                         "rows do not split into blocks of 32 stays f16); norms always stay f32",
                         choices=("f16", "bf16", "q8_0"))


@dataclass
class K8sConfig(_Freezable):
    kind: str = opt("pytorchjob", help="manifest kind", choices=("pytorchjob", "mpijob", "job"))
    namespace: str = opt("default", help="namespace of every rendered object")
    image: str = opt("qlorax:latest", help="container image with qlorax installed (see docker/)")
    image_pull_policy: str = opt("IfNotPresent", help="image pull policy", choices=("Always", "IfNotPresent", "Never"))
    cpu: str = opt("8", help="CPU request and limit per pod (Kubernetes quantity, e.g. 8 or 7500m)")
    memory: str = opt("32Gi", help="memory request and limit per pod (Kubernetes quantity)")
    threads: Optional[int] = opt(None, help="OMP threads per pod; null uses the CPU limit", ge=1)
    volume: str = opt("pvc", help="volume type holding model, data and outputs", choices=("pvc", "nfs", "hostPath"))
    claim_name: str = opt("qlorax-data", help="PersistentVolumeClaim name (volume=pvc)")
    nfs_server: str = opt("", help="NFS server (volume=nfs)")
    volume_path: str = opt("/qlorax", help="path exported by the NFS server or on the host (nfs, hostPath)")
    mount_path: str = opt("/qlorax", help="where the volume is mounted in every pod")
    node_selector: Dict[str, str] = opt(help="node labels pods must match", factory=dict)
    tolerations: List[Dict[str, Any]] = opt(help="tolerations of every pod", factory=list)
    hub_token_secret: str = opt("", help="Secret (name:key) exposed as the hub token env var; never written in clear")
    run_as_user: int = opt(1000, help="non-root UID the pods run as", ge=1)
    port: int = opt(29500, help="rendezvous port inside the pods", ge=1, le=65535)
    apply: bool = opt(False, help="kubectl apply the manifests and follow the job (needs kubectl on PATH)")


@dataclass
class RunSpec(_Freezable):
    """The whole resolved run: what ``spec.yaml`` holds."""

    model: ModelConfig = field(default_factory=ModelConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    merge: MergeConfig = field(default_factory=MergeConfig)
    verify: VerifyConfig = field(default_factory=VerifyConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    k8s: K8sConfig = field(default_factory=K8sConfig)
    workers: int = opt(1, help="number of ranks (processes or pods)", ge=1)
    run_dir: Optional[str] = opt(None, help="run directory to create or reuse; null uses Hydra's output directory")
    resume: str = opt("auto", help="auto continues the latest valid checkpoint in run_dir; never starts fresh",
                      choices=("auto", "never"))
    seed: int = opt(42, help="seed of model init, LoRA init and dropout")
    stages: List[str] = opt(help="stages `qlorax run` chains, in the order train, merge, verify, export "
                          "(export writes run_dir/export/model-<type>.gguf)", factory=lambda: ["train", "merge", "verify"])
    quiet: bool = opt(False, help="no progress bar; plain log lines only (CI)")


STAGES = ("train", "merge", "verify", "export")   # in the order `qlorax run` chains them
GROUPS = ("model", "quant", "data", "lora", "parallel", "hardware")


def register_configs() -> None:
    """Register the schemas with Hydra so the YAML files extend (and are checked against) them."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="qlorax_schema", node=RunSpec)
    for group in GROUPS:
        node = {f.name: f for f in dataclasses.fields(RunSpec)}[group].default_factory
        cs.store(group=group, name=f"{group}_schema", node=node)


def field_help(cls: type, name: str) -> str:
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}.get(name, "")
