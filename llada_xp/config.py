"""Typed configuration: the dataclass schemas that conf/*.yaml extend, registered in Hydra's ConfigStore.

The only place defaults live, and where values are checked (`check()` of each dataclass). The entry points turn the
composed config into these dataclasses with `load` (unknown keys and bad values are a ConfigError naming the key);
code below them never sees a DictConfig. Imports nothing of ours; importing it does not touch Hydra, `register()` does.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Optional, TypeVar

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

CACHE_MODES = ("none", "prefix", "dual")
REMASKING = ("low_confidence", "random")
SOURCES = ("demo", "hf", "dcp")
DTYPES = ("auto", "float32", "bfloat16", "float16", "float64")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
WANDB_MODES = ("online", "offline", "disabled")
# sglang-router's policies for plain (not prefill/decode) workers; round_robin measured best here (README: Replicas)
POLICIES = ("round_robin", "power_of_two", "random", "cache_aware")


class ConfigError(ValueError):
    """A composed config that cannot run: an unknown key or a value out of range; the message names the key."""


def _one_of(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def _at_least(name: str, value, low, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= low or math.isinf(value):
        raise ValueError(f"{name} must be a finite number >= {low}{' or null' if optional else ''}; got {value!r}")


@dataclass
class ModelConfig:
    """Where the weights come from and how they are placed."""

    # demo (the bundled tiny model) | hf (local folder or Hub id) | dcp (torch.distributed.checkpoint folder)
    source: str = "demo"
    # hf: a local folder in the LLaDA Hub layout or a Hub id; dcp: the checkpoint (any layout, see checkpoint.py)
    path: Optional[str] = None
    # The name served on /v1/models and written into eval results; None = derived from the path
    name: Optional[str] = None
    # Extra model names the server accepts (e.g. "llada-8b-instruct" for clients of the old server)
    aliases: list[str] = field(default_factory=list)
    # Hub revision (branch, tag or commit) for Hub ids
    revision: Optional[str] = None
    # auto = bfloat16 on GPU, float32 on CPU; or float32 | bfloat16 | float16 | float64
    dtype: str = "auto"
    # auto = cuda if available else cpu; or any torch device string
    device: str = "auto"
    # dcp: the Hugging Face model (Hub id or folder) whose config.json (and tokenizer, unless the checkpoint has
    # one) the checkpoint's weights belong to
    base_model: Optional[str] = None
    # dcp: where converted checkpoints are cached; None = $LLADA_XP_CACHE or ~/.cache/llada_xp/converted
    cache_dir: Optional[str] = None
    # torch CPU threads of this process (torch.set_num_threads); None = auto: 1 for a model under 100M parameters
    # (the demo, tiny test models: splitting their small matmuls costs more than it saves, 3.5-15x slower on a
    # loaded 2-core machine), else torch's default (the cores available). Recorded in metrics.json and /health
    threads: Optional[int] = None
    # A PEFT adapter (LoRA; a folder or Hub id) merged into the weights at load time: serve and eval run the merged
    # model, convert.py writes it (with output=). Needs the lora extra (pip install 'llada-xp[lora]'). None = none
    adapter: Optional[str] = None
    # Run the dual-cache block steps through torch.compile (static shapes: one compile per batch size and block
    # length; mode "reduce-overhead" = CUDA graphs on CUDA, the default mode on CPU). Falls back to eager, logging why,
    # when compilation is unavailable or fails. The first steps of each shape pay the compile time
    compile: bool = False
    # Special-id overrides for checkpoints that lack them (or get them wrong). None = from the model: config.json,
    # then generation_config.json, then the tokenizer (mask: its mask token or <|mdm_mask|>; EoT: <|eot_id|>;
    # pad: else EOS). The sampler decodes with the mask id, cuts answers at EOS/EoT and left-pads with pad
    mask_token_id: Optional[int] = None
    eos_token_id: Optional[int] = None
    eot_token_id: Optional[int] = None
    pad_token_id: Optional[int] = None

    def check(self) -> None:
        _one_of("source", self.source, SOURCES)
        for name in ("mask_token_id", "eos_token_id", "eot_token_id", "pad_token_id"):
            _at_least(name, getattr(self, name), 0, optional=True)
        # (a group file's `path: ???` cannot override the schema's None: Hydra keeps the typed default)
        if self.source in ("hf", "dcp") and not self.path:
            raise ValueError(f"path is required for source={self.source} (pass model.path=...)")
        if self.source == "dcp" and not self.base_model:
            raise ValueError("base_model is required for source=dcp: the Hugging Face model (Hub id or folder) the "
                             "checkpoint was trained from (pass model.base_model=...)")
        _one_of("dtype", self.dtype, DTYPES)
        _at_least("threads", self.threads, 1, optional=True)


@dataclass
class SamplerConfig:
    """Decoding settings (reference/sampling.md). Per request, the server overrides these field by field."""

    # Answer canvas length (max new tokens); the answer is cut at the first EOS/EoT
    gen_length: int = 128
    # Columns decoded together, left to right; shared by all rows of a batch
    block_length: int = 32
    # Denoising steps over the whole canvas (quota mode); spread over blocks in proportion to their length
    steps: int = 128
    # 0 = argmax (no random draw); > 0 = Gumbel-max sampling in float64
    temperature: float = 0.0
    # Classifier-free guidance scale (0 = off); shared by all rows of a batch
    cfg_scale: float = 0.0
    # low_confidence | random: which masked positions are committed first
    remasking: str = "low_confidence"
    # none | prefix | dual: Fast-dLLM KV cache mode; shared by all rows of a batch
    cache: str = "dual"
    # Fast-dLLM parallel decoding: commit every masked position with confidence >= threshold (at least one)
    threshold: Optional[float] = 0.9
    # Fast-dLLM dynamic rule (wins over threshold when set): rank n passes when (n+1)(1-c_n) <= factor
    factor: Optional[float] = None
    # Seed of the row's own generator; None = fresh randomness
    seed: Optional[int] = None
    # Ban EOS everywhere (LLaDA option); shared by all rows of a batch
    logits_eos_inf: bool = False
    # Give EOS/EoT zero confidence so they are committed last (LLaDA option); shared by all rows of a batch
    confidence_eos_eot_inf: bool = False
    # Stop strings, checked on committed text; a match ends the answer before the string
    stop: list[str] = field(default_factory=list)
    # Stop token ids (besides EOS/EoT), checked on committed tokens
    stop_token_ids: list[int] = field(default_factory=list)
    # Finish a row once it committed EOS/EoT with everything before it committed (off = reference NFE)
    early_stop: bool = True

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting (the server turns it into a 400 naming the field)."""
        for name in ("gen_length", "block_length", "steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        _at_least("temperature", self.temperature, 0)
        _at_least("cfg_scale", self.cfg_scale, 0)
        _one_of("remasking", self.remasking, REMASKING)
        _one_of("cache", self.cache, CACHE_MODES)
        if self.threshold is not None and not 0 <= self.threshold <= 1:
            raise ValueError(f"threshold must be in [0, 1] or null, got {self.threshold!r}")
        if self.factor is not None and not self.factor > 0:
            raise ValueError(f"factor must be > 0 or null, got {self.factor!r}")


@dataclass
class ServerConfig:
    """The OpenAI-compatible HTTP server (server.py) and its batching engine (engine.py)."""

    host: str = "127.0.0.1"
    port: int = 8000
    # Bearer key required on /v1/* (compared in constant time); None = api_key_file, else $LLADA_XP_API_KEY if set,
    # else no auth. For code only: serve.py refuses it from the command line or a YAML file (Hydra would save it in
    # plaintext under the output dir, and `ps` shows the command line)
    api_key: Optional[str] = None
    # A file holding the key (alone on one line) that only its owner may read (chmod 600), read when the server starts
    api_key_file: Optional[str] = None
    # Most rows (choices) decoded together in one batch; None = 16 on a GPU, 4 on a CPU (where a forward is
    # compute-bound and bigger batches only add latency)
    max_batch_size: Optional[int] = None
    # Most rows waiting for a batch; a request that would exceed it gets 429 with Retry-After
    max_queue: int = 256
    # Most time a new batch waits for as many rows as the previous batch had (0 = start at once; one client alone
    # never waits); scheduler=static only
    batch_window_ms: float = 20.0
    # continuous: waiting rows join the running rows at the next step, each at its own block (sampler.py);
    # static: a batch runs to its end and rows arriving meanwhile wait for the next one (the old behaviour)
    scheduler: str = "continuous"
    # continuous: a waiting row joins at a step where a running row starts a block (no forward of its own), or once
    # it has waited this many steps with room (0 = at the next step, always)
    join_wait_steps: int = 4
    # Log level of the server and uvicorn: critical | error | warning | info | debug | trace
    log_level: str = "info"
    # Server processes (one model each: one GPU each when GPUs exist, else an equal share of the CPU cores) behind
    # the sglang-router gateway on host:port; the replicas listen on private ports of 127.0.0.1. 1 = no gateway.
    # On SLURM the count is launcher.replicas (one task each)
    replicas: int = 1
    # How the gateway picks a replica: round_robin | power_of_two (the fewest rows in flight, from /get_load of two
    # random replicas) | random | cache_aware (prefix affinity)
    policy: str = "round_robin"
    # Port of the gateway's Prometheus /metrics (on host); None = a free port, logged and in server_info.json
    metrics_port: Optional[int] = None
    # Extra sglang-router flags (python -m sglang_router.launch_router --help), e.g. [--queue-size, "64"]
    gateway_args: list[str] = field(default_factory=list)

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        _at_least("replicas", self.replicas, 1)
        _one_of("policy", self.policy, POLICIES)
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535] or null, got {self.metrics_port}")
        _at_least("max_batch_size", self.max_batch_size, 1, optional=True)
        _at_least("max_queue", self.max_queue, 1)
        _at_least("batch_window_ms", self.batch_window_ms, 0)
        _one_of("scheduler", self.scheduler, ("continuous", "static"))
        _at_least("join_wait_steps", self.join_wait_steps, 0)
        _one_of("log_level", self.log_level, LOG_LEVELS)


@dataclass
class LauncherConfig:
    """Where serve.py and eval.py run (launch.py): here, or as SLURM jobs through submitit (eval -m: a job array)."""

    # local (this process) | slurm (a batch job; with eval.py -m one job per sweep point)
    name: str = "local"
    # sbatch --account / --partition / --qos; None = the cluster's default
    account: Optional[str] = None
    partition: Optional[str] = None
    qos: Optional[str] = None
    # Wall-clock limit: [D-]HH:MM:SS, HH:MM:SS or minutes
    time: str = "4:00:00"
    # GPUs per node (0 = none requested) and CPUs per task
    gpus: int = 1
    cpus: int = 16
    # Memory per node (sbatch --mem: 64G, 512M); None = the partition's default
    mem: Optional[str] = "64G"
    # sbatch --constraint (node features); None = any node
    constraint: Optional[str] = None
    job_name: str = "llada-api-server"
    # Extra sbatch options by long name without dashes ({exclusive: true, reservation: x}); they win over the above
    additional_parameters: dict[str, Any] = field(default_factory=dict)
    # Shell lines run in the batch script before the job starts (module load ..., source venv/bin/activate)
    setup: list[str] = field(default_factory=list)
    # A container image for the site's srun container plugin (pyxis/enroot .sqsh or a registry image); None = none
    container_image: Optional[str] = None
    # srun flags that run the job in the image; {image} = container_image, {cwd} = the submit directory
    container_flags: str = "--container-image={image} --container-mounts={cwd}:{cwd} --container-workdir={cwd}"
    # The SSH host users tunnel through; None = $SLURM_SUBMIT_HOST, else this machine's name
    login_host: Optional[str] = None
    # Ctrl-C leaves the server job running (reconnect with python -m llada_xp.connect JOB_ID) instead of cancelling
    detach_on_interrupt: bool = False
    # submitit's folder for the job's pickles, logs, API key and server-info file (%j = the job id)
    folder: str = "slurm/%j"
    # serve.py: server replicas in the one job, one SLURM task each (with launcher.gpus GPUs per node: one GPU per
    # task), spread evenly over launcher.nodes nodes; the gateway runs on the first node. 1 = the server alone
    replicas: int = 1
    nodes: int = 1

    def check(self) -> None:
        _one_of("name", self.name, ("local", "slurm"))
        _at_least("gpus", self.gpus, 0)
        _at_least("cpus", self.cpus, 1)
        _at_least("replicas", self.replicas, 1)
        _at_least("nodes", self.nodes, 1)
        if self.replicas % self.nodes:
            raise ValueError(f"replicas ({self.replicas}) must be a multiple of nodes ({self.nodes}): "
                             "SLURM runs the same number of tasks on every node")


@dataclass
class ServeConfig:
    """serve.py: which model, the server's default decoding settings (requests override them), the server."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)

    def check(self) -> None:
        if self.launcher.name == "slurm" and self.server.replicas > 1:
            raise ValueError(f"server.replicas={self.server.replicas} runs replicas on this machine; on SLURM ask for "
                             f"launcher.replicas={self.server.replicas} (one task each) instead")


@dataclass
class ConvertConfig:
    """convert.py: a DCP training checkpoint → a Hugging Face folder (checkpoint.py)."""

    # The checkpoint (model.path, any layout), its base model (model.base_model) and model.cache_dir
    model: ModelConfig = field(default_factory=ModelConfig)
    # Folder to write (must not exist yet); None = the conversion cache that model=dcp reuses
    output: Optional[str] = None
    # None = keep the checkpoint's dtypes; or float32 | bfloat16 | float16 | float64 (floating tensors only)
    dtype: Optional[str] = None
    # Largest safetensors file; bigger models are split into shards with a model.safetensors.index.json
    max_shard_size: str = "2GB"


@dataclass
class TaskConfig:
    """What to evaluate on (tasks.py): the examples, how prompts are built and how outputs are scored."""

    # demo (the demo model's held-out set) | jsonl (one {prompt, answer} object per line) | lm_eval (any
    # lm-evaluation-harness task: the fields under "lm_eval" below; conf/task/gsm8k.yaml is lm_eval's gsm8k)
    name: str = MISSING
    # jsonl: the file. demo, lm_eval: unused (lm_eval: task.include_path for local data)
    path: Optional[str] = None
    # Evaluate only the first `limit` examples (demo: the size of the held-out set drawn; lm_eval: of every task);
    # None = all
    limit: Optional[int] = None
    # True = the tokenizer's chat template (instruct models); False = plain text (base models)
    chat: bool = True
    # A system message put before the conversation (chat only); None = none
    system_prompt: Optional[str] = None
    # How a question becomes the user message (or the plain-text prompt); {prompt} is the question
    prompt_template: str = "{prompt}"
    # jsonl: the fields holding the question and the reference answer
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    # jsonl: exact (equal after stripping whitespace) | number (GSM8K-style: the number after "####", else the last
    # number, compared numerically)
    scoring: str = "exact"
    # Stop strings added to the sampler's (e.g. "Question:" when base models continue with a next question)
    stop: list[str] = field(default_factory=list)

    # ---- lm_eval only (lm_eval_adapter.py); the names and meanings of lm-eval's CLI options
    # Task or group names (lm-eval's --tasks): [gsm8k], [humaneval, mbpp], or those of include_path's YAMLs
    tasks: list[str] = field(default_factory=list)
    # k-shot examples of every task (lm-eval's --num_fewshot); None = each task's own default
    num_fewshot: Optional[int] = None
    # The tokenizer's chat template around every prompt (instruct models); the built-in tasks use `chat`
    apply_chat_template: bool = False
    # With apply_chat_template: k-shot examples as alternating user/assistant turns (else one user message)
    fewshot_as_multiturn: bool = True
    # A system message before every prompt; None = none (the built-in tasks use `system_prompt`)
    system_instruction: Optional[str] = None
    # Generation kwargs over every generate_until task's own ({max_gen_toks: 256, until: [...], steps: 64}); what
    # maps to the sampler and what is refused: lm_eval_adapter.py
    gen_kwargs: dict[str, Any] = field(default_factory=dict)
    # A folder of custom task YAMLs (lm-eval's --include_path); None = lm-eval's own tasks only
    include_path: Optional[str] = None
    # Run the model's code in code tasks (humaneval, mbpp): lm-eval refuses them without it
    confirm_run_unsafe_code: bool = False
    # loglikelihood tasks, Monte-Carlo ELBO (likelihood.py, reference/likelihood.md): samples per (prompt, answer),
    # forwards per mini-batch (mc_num must be a multiple), classifier-free guidance scale (0 = off)
    mc_num: int = 128
    mc_batch_size: int = 8
    cfg_scale: float = 0.0
    # Seed of every (prompt, answer) pair's generator: candidate answers share their masks (common random numbers)
    mc_seed: int = 0
    # Answer lm-eval's "is the continuation the greedy decode" (one decode per request); False = always False, as
    # LLaDA's eval does unless is_check_greedy (no metric of the paper needs it)
    check_greedy: bool = False

    def check(self) -> None:
        _at_least("limit", self.limit, 1, optional=True)
        if self.name != "lm_eval":
            default = TaskConfig(name=self.name)
            changed = [f for f in LM_EVAL_FIELDS if getattr(self, f) != getattr(default, f)]
            if changed:
                raise ValueError(f"{changed[0]} is an option of task=lm_eval; task={self.name} does not use it")
            return
        if not self.tasks:
            raise ValueError("tasks is empty; name the lm-eval tasks to run (task.tasks=[gsm8k])")
        _at_least("num_fewshot", self.num_fewshot, 0, optional=True)
        _at_least("mc_num", self.mc_num, 1)
        _at_least("mc_batch_size", self.mc_batch_size, 1)
        if self.mc_num % self.mc_batch_size:
            raise ValueError(f"mc_num must be a multiple of mc_batch_size={self.mc_batch_size}, got {self.mc_num}")
        _at_least("cfg_scale", self.cfg_scale, 0)
        default = TaskConfig(name=self.name)
        changed = [f for f in BUILTIN_FIELDS if getattr(self, f) != getattr(default, f)]
        if changed:
            raise ValueError(f"{changed[0]} is not used by task=lm_eval; use {BUILTIN_FIELDS[changed[0]]}")


# TaskConfig fields only task=lm_eval uses (another task refuses them rather than ignore them)
LM_EVAL_FIELDS = ("tasks", "num_fewshot", "apply_chat_template", "fewshot_as_multiturn", "system_instruction",
                  "gen_kwargs", "include_path", "confirm_run_unsafe_code", "mc_num", "mc_batch_size", "cfg_scale",
                  "mc_seed", "check_greedy")
# TaskConfig fields only the built-in tasks use, and what does their job under task=lm_eval (which refuses them
# rather than ignore them: `task=gsm8k task.chat=false` or `task.path=...` meant something before gsm8k ran in lm-eval)
_YAML = "a task YAML of your own (task.include_path)"
BUILTIN_FIELDS = {"path": _YAML, "chat": "task.apply_chat_template", "system_prompt": "task.system_instruction",
                  "prompt_template": _YAML, "prompt_field": _YAML, "answer_field": _YAML, "scoring": _YAML,
                  "stop": "task.gen_kwargs={until: [...]}"}


@dataclass
class LoggerConfig:
    """Where results are logged besides the output dir (evaluate.py, report.py)."""

    # none (logs nothing) | wandb
    name: str = "none"
    project: str = "llada-xp"
    # W&B team or user; None = the API key's default entity
    entity: Optional[str] = None
    # W&B group; None = one group per multirun (named after its sweep dir), no group for a single run
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    # online | offline | disabled; None = $WANDB_MODE if set, else online with an API key, offline without
    mode: Optional[str] = None
    # Where W&B writes its run folders; None = $WANDB_DIR or the working directory
    dir: Optional[str] = None
    # Log the per-sample table (prompt, output, reference, correct, nfe)
    log_samples: bool = True

    def check(self) -> None:
        _one_of("name", self.name, ("none", "wandb"))
        if self.mode is not None:
            _one_of("mode", self.mode, WANDB_MODES)


@dataclass
class EvalConfig:
    """eval.py: a model and decoding settings evaluated on a task; results in the output dir and the logger."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # local | slurm: with -m and launcher=slurm every sweep point is one job of a SLURM job array
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    # Prompts decoding together (batches are fixed slices of the length-sorted examples: the unit of sharding)
    batch_size: int = 16
    # continuous: a new prompt joins as soon as one finishes, so batch_size rows decode until the task runs out;
    # static: batch after batch, each run to its end (the old behaviour). The samples are the same either way
    feed: str = "continuous"
    # Data-parallel sharding: this job evaluates every num_shards-th batch starting at shard_index (task=lm_eval:
    # every num_shards-th document of each task); `python -m llada_xp.evaluate merge` joins the shards' output dirs
    shard_index: int = 0
    num_shards: int = 1
    # Where metrics.json and samples.jsonl go; None = Hydra's output dir
    output_dir: Optional[str] = None
    # Continue from the samples.jsonl already in the output dir; False = start over
    resume: bool = True
    # The metrics.json value eval.py returns (what a Hydra sweeper optimizes)
    metric: str = "accuracy"
    # Show a progress bar
    progress: bool = True

    def check(self) -> None:
        _at_least("batch_size", self.batch_size, 1)
        _one_of("feed", self.feed, ("continuous", "static"))
        if not 0 <= self.shard_index < self.num_shards:
            raise ValueError(f"shard_index must be in [0, num_shards={self.num_shards}), got {self.shard_index}")


Schema = TypeVar("Schema")


def check(cfg: Any, prefix: str = "") -> None:
    """Run `check()` of cfg and of every config inside it; a ConfigError names the full key (sampler.threshold)."""
    try:
        if hasattr(cfg, "check"):
            cfg.check()
    except ValueError as e:
        raise ConfigError(f"{prefix}{e}") from None
    for f in fields(cfg):
        sub = getattr(cfg, f.name)
        if is_dataclass(sub):
            check(sub, f"{prefix}{f.name}.")


def _no_unknown_keys(node: DictConfig, prefix: str = "") -> None:
    """Hydra's `+key=value` adds a key even to a typed node, and to_object then drops it without a word."""
    kind = OmegaConf.get_type(node)
    if is_dataclass(kind):
        names = [f.name for f in fields(kind)]
        for key in node.keys():
            if key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                hint = f"; did you mean {prefix}{near[0]}?" if near else f"; its keys are {', '.join(names)}"
                raise ConfigError(f"unknown key {prefix}{key}{hint}")
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            _no_unknown_keys(child, f"{prefix}{key}.")


def load(dc: DictConfig, schema: type[Schema]) -> Schema:
    """The composed config as its typed dataclass, checked: unknown keys (a `+sampler.threshhold=` typo, which
    Hydra adds without complaint) and values out of range raise ConfigError naming the key."""
    _no_unknown_keys(dc)
    try:
        cfg = OmegaConf.to_object(dc)  # the composed config is already typed: to_object builds its dataclasses
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} is required (pass {e.full_key}=...)") from None
    except OmegaConfBaseException as e:  # e.g. Key 'threshhold' not in 'SamplerConfig'
        raise ConfigError(f"{str(e).splitlines()[0]} (full key: {e.full_key})") from None
    if not isinstance(cfg, schema):
        raise ConfigError(f"the composed config is a {type(cfg).__name__}, not a {schema.__name__}")
    check(cfg)
    return cfg


def register() -> None:
    """Register the schemas in Hydra's ConfigStore (called by the entry points before composing, together with
    llada_xp.resolvers.register for the resolvers the YAML files use)."""
    from hydra.core.config_store import ConfigStore

    # Only the primaries' schemas: they type every group's node (a group file's unknown key fails at compose time),
    # and a schema stored inside a group would be listed by --help as one of its choices.
    cs = ConfigStore.instance()
    cs.store(name="serve_schema", node=ServeConfig)
    cs.store(name="convert_schema", node=ConvertConfig)
    cs.store(name="eval_schema", node=EvalConfig)


__all__ = ["MISSING", "ConfigError", "ConvertConfig", "EvalConfig", "LauncherConfig", "LoggerConfig", "ModelConfig", "SamplerConfig", "ServeConfig",
           "ServerConfig", "TaskConfig", "check", "load", "register"]
