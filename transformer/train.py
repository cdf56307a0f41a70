"""Training: sharded state, a pure jitted step, and the loop around it.

    python -m transformer.train [--preset NAME | --config FILE.py] [a.b=value ...]   # default preset: tiny

One run lives in cfg.run_dir: config.json, checkpoints/, metrics.jsonl, tensorboard/,
jax_cache/ (compiled programs, so a restart skips compilation) and profile/ (profile_steps).
A run resumes from its newest good checkpoint, else starts from checkpoint.init_from
(params only), else from scratch. Batches are indexed by step, so a resumed run sees the
same data as an uninterrupted one, and the same config gives a bitwise identical loss
trace on CPU.

Optimizer: AdamW with linear warmup then cosine decay to lr * min_lr_ratio, gradients
clipped by global norm. Weight decay applies to matrices only (every param with two or
more dims besides a stacked "layers" axis: embeddings, projections, experts, routers);
norm scales and biases are not decayed. Params are kept in model.param_dtype (float32 by
default) while the model computes in model.dtype (e.g. bfloat16).

Models: every model.architecture trains here on the batches of its data.objective: a decoder on next-token
rows, an encoder on masked-token (MLM) rows, an encoder-decoder on span-corruption or seq2seq rows (a source
of data.seq_len tokens, decoder rows of the resolved target length); `loss.loss_sums` feeds each its batch.

Loss: mean token cross-entropy over loss_mask, plus optim.z_loss * mean(log Z ^ 2), plus
the model's aux["aux_loss"] (MoE balancing). With optim.grad_accum_steps = M the batch is
split into M strided micro-batches (rows r, r + M, ...); token sums are accumulated so the
cross-entropy equals the full-batch one, and aux losses are averaged over micro-batches.
Each micro-batch forward updates the MoE router biases (router='sigmoid_bias'). Metrics also carry the
accuracy of the scored tokens (argmax == target); held-out eval reports eval_loss, eval_perplexity and
eval_accuracy (next-token accuracy for a decoder, masked-token accuracy for an encoder).

LoRA (lora.rank > 0, `transformer.lora`): adapters on the base loaded from checkpoint.init_from; only they are
differentiated and have optimizer state, checkpoints hold all but the frozen base, and train prints
"trainable params: N of M (x%)" (the summary's trainable_params and params; with lora.quantize_base=int8 also the
frozen base's bytes against unquantized).

Loop: step N + 1 is dispatched before step N's metrics are read, so the device queue never
runs dry while the host logs; the NaN guard, logging, eval and checkpoint decisions run one
step behind, with the same results as reading every step at once (synchronous=true).
metrics.jsonl gets the step-time breakdown of `metrics.StepTimes` at each log step.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.experimental.compilation_cache import compilation_cache
from tqdm import tqdm

from transformer import distributed, lora, sharding
from transformer.checkpoint import Checkpointer, PreemptionGuard, SaveError, restore_params
from transformer.config import Config, ConfigError, OptimConfig, config_from_args, print_help_if_asked
from transformer.data import Dataset, make_dataset, objectives
from transformer.data.pipeline import BATCH_KEYS, SOURCE_KEYS
from transformer.data.placement import local_batch, place_batch
from transformer.loss import loss_sums
from transformer.metrics import MetricsWriter, StepTimes, mfu, tokens_per_second
from transformer.model import build_model, flops_per_token


PROFILE_DIR = "profile"


class NonFiniteError(FloatingPointError):
    """The loss or gradient norm became NaN or infinite; the message names the step."""


# ---------------------------------------------------------------- optimizer and state


def lr_schedule(optim: OptimConfig, steps: int) -> Callable[[jax.Array], jax.Array]:
    """Learning rate of optimizer step `count` (0-based): linear warmup lr * (count + 1) / warmup_steps,
    then cosine decay from lr to lr * min_lr_ratio at `steps`."""
    warmup = optim.warmup_steps
    decay_steps = max(steps - warmup, 1)

    def schedule(count):
        count = jnp.asarray(count, jnp.float32)
        warm = optim.lr * (count + 1) / max(warmup, 1)
        progress = jnp.clip((count - warmup) / decay_steps, 0.0, 1.0)
        cosine = optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
        return jnp.where(count < warmup, warm, optim.lr * cosine)

    return schedule


def decays(variable: nnx.Variable) -> bool:
    """Whether weight decay applies: matrices (>= 2 dims not counting a stacked "layers" axis), unless the param
    says weight_decay=False (T5's relative-position bias table)."""
    if variable.get_metadata().get("weight_decay", True) is False:
        return False
    ndim = np.ndim(variable.get_value())
    axes = getattr(variable, "logical_axes", None) or (None,) * ndim
    return sum(axis != "layers" for axis in axes) >= 2


def make_optimizer(cfg: Config, model: nnx.Module) -> optax.GradientTransformation:
    optim = cfg.optim
    flags = [decays(v) for v in jax.tree.leaves(nnx.state(model, lora.trainable(cfg.lora)),
                                                 is_leaf=lambda x: isinstance(x, nnx.Variable))]
    mask = lambda params: jax.tree.unflatten(jax.tree.structure(params), flags)
    adamw = optax.adamw(lr_schedule(optim, cfg.steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm else adamw


class TrainState(nnx.Module):
    """Everything a step reads and writes: the model, its optimizer and an RNG stream (checkpointed
    with the rest, so stochastic layers resume exactly). With lora.rank > 0 the model carries adapters
    (`transformer.lora`) and the optimizer holds state for them only."""

    def __init__(self, cfg: Config):
        self.model = build_model(cfg.model, rngs=nnx.Rngs(cfg.seed))
        if cfg.lora.rank:
            lora.add_adapters(self.model, cfg.lora, jax.random.fold_in(jax.random.key(cfg.seed), 2))
        if cfg.lora.quantize_base == "int8":
            lora.quantize_base(self.model)
        self.optimizer = nnx.Optimizer(self.model, make_optimizer(cfg, self.model), wrt=lora.trainable(cfg.lora))
        self.rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(cfg.seed), 1))


def abstract_train_state(cfg: Config, mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract state with each leaf a sharded ShapeDtypeStruct, shardings); allocates nothing."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainState(cfg)))
    abstract, shardings = sharding.placed(abstract, mesh)
    return graphdef, abstract, shardings


def init_train_state(cfg: Config, shardings) -> nnx.State:
    """A fresh state, created directly in its shards (no device ever holds the whole model)."""
    return jax.jit(lambda: nnx.split(TrainState(cfg))[1], out_shardings=shardings)()


def checkpointed(cfg: Config, state: nnx.State) -> nnx.State:
    """The part of the train state a checkpoint holds: all of it, or for a LoRA run all but the frozen base."""
    return lora.without_base(state) if cfg.lora.rank else state


def load_or_init(cfg: Config, graphdef, abstract, shardings, ckpt: Checkpointer) -> tuple[nnx.State, int, str]:
    """(state, step, origin): newest checkpoint of the run > checkpoint.init_from (params only) > scratch. A LoRA
    run takes its base params from init_from and the rest from its newest checkpoint, when it has one."""
    if cfg.lora.rank:
        return _load_or_init_lora(cfg, graphdef, abstract, shardings, ckpt)
    restored = ckpt.restore_latest(abstract)
    if restored is not None:
        state, step = restored
        return state, step, "checkpoint"
    state = init_train_state(cfg, shardings)
    if not cfg.checkpoint.init_from:
        return state, 0, "scratch"
    params = restore_params(cfg.checkpoint.init_from, nnx.filter_state(abstract["model"], nnx.Param))
    train_state = nnx.merge(graphdef, state)
    nnx.update(train_state.model, params)
    return nnx.state(train_state), 0, "init_from"


def _load_or_init_lora(cfg: Config, graphdef, abstract, shardings, ckpt: Checkpointer):
    restored = ckpt.restore_latest(checkpointed(cfg, abstract))
    train_state = nnx.merge(graphdef, init_train_state(cfg, shardings))
    nnx.update(train_state.model, restore_params(cfg.checkpoint.init_from,
                                                 nnx.filter_state(abstract["model"], lora.BASE)))
    if cfg.lora.quantize_base != "none":
        lora.load_quantized_base(train_state.model, _float_base(cfg, train_state.model, shardings))
    if restored is None:
        return nnx.state(train_state), 0, "init_from"
    nnx.update(train_state, restored[0])
    return nnx.state(train_state), restored[1], "checkpoint"


def _float_base(cfg: Config, model: nnx.Module, shardings) -> dict:
    """The float values (pure dict) of the model's int8 weights, read from checkpoint.init_from and sharded on the
    run's mesh (held only until they are quantized)."""
    from transformer.quantize import Int8Weight

    quantized = {tuple(path) for path, node in nnx.iter_graph(model) if isinstance(node, Int8Weight)}
    plain = nnx.state(nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    target = nnx.filter_state(plain, lambda path, _: tuple(path) in quantized)
    target, _ = sharding.placed(target, jax.tree.leaves(shardings)[0].mesh)
    return nnx.to_pure_dict(restore_params(cfg.checkpoint.init_from, target))


# ---------------------------------------------------------------- steps


def micro_batches(batch: dict, accum: int) -> dict:
    """(M, B / M, length) micro-batches of every entry (decoder rows L, sources S); micro-batch m holds rows
    m, m + M, ... so each stays spread over the batch shards."""
    def split(x_BL):
        x_MBL = einops.rearrange(x_BL, "(B M) L -> M B L", M=accum)
        return sharding.constrain(x_MBL, (None, "batch", "length"))
    return {key: split(value) for key, value in batch.items()}


def make_train_step(cfg: Config):
    """`train_step(graphdef, state, batch) -> (state, metrics)`, pure; jit it with graphdef static."""
    accum, z_coef = cfg.optim.grad_accum_steps, cfg.optim.z_loss
    schedule = lr_schedule(cfg.optim, cfg.steps)
    trained = lora.trainable(cfg.lora)

    def train_step(graphdef, state, batch):
        train_state = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(train_state.model, trained, ...)
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask_BL"]), 1.0)

        def grads_of(micro, rest):
            def loss_fn(params):
                model = nnx.merge(model_def, params, rest, copy=True)
                lora.set_training(model, True)
                sums, aux = loss_sums(model, micro, loss_chunk_size=cfg.loss_chunk_size, update_router_bias=True)
                loss = (sums["ce"] + z_coef * sums["z"]) / num_tokens + aux["aux_loss"] / accum
                return loss, (sums, aux, nnx.split(model, trained, ...)[2])

            (_, (sums, aux, rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            return grads, rest, sums, aux

        if accum == 1:
            grads, rest, sums, aux = grads_of(batch, rest)
        else:
            def accumulate(carry, micro):
                grads, rest = carry
                micro_grads, rest, sums, aux = grads_of(micro, rest)
                return (jax.tree.map(jnp.add, grads, micro_grads), rest), (sums, aux)

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, rest), (sums, aux) = jax.lax.scan(accumulate, (zeros, rest), micro_batches(batch, accum))
            sums = jax.tree.map(lambda x: jnp.sum(x, axis=0), sums)
            aux = jax.tree.map(lambda x: jnp.mean(x, axis=0), aux)

        nnx.update(train_state.model, rest)
        lr = schedule(train_state.optimizer.step[...])
        grad_norm = optax.tree.norm(grads)
        train_state.optimizer.update(train_state.model, grads)
        loss = sums["ce"] / num_tokens
        z_loss = sums["z"] / num_tokens
        total = loss + z_coef * z_loss + aux["aux_loss"]
        metrics = {"loss": loss, "z_loss": z_loss, "aux_loss": aux["aux_loss"], "total_loss": total,
                   "accuracy": sums["correct"] / num_tokens, "grad_norm": grad_norm, "lr": lr,
                   "finite": jnp.isfinite(total) & jnp.isfinite(grad_norm),
                   **{k: v for k, v in aux.items() if k != "aux_loss"}}
        return nnx.state(train_state), metrics

    return train_step


def jit_train_step(cfg: Config, shardings):
    """`make_train_step(cfg)` jitted with graphdef static, the state donated and the new state placed on
    `shardings`."""
    return jax.jit(make_train_step(cfg), static_argnums=0, donate_argnums=1, out_shardings=(shardings, None))


def make_eval_step(cfg: Config):
    """`eval_step(graphdef, state, batch) -> (masked loss sums, MoE routing statistics)` (no state change)."""

    def eval_step(graphdef, state, batch):
        model = nnx.merge(graphdef, state).model
        sums, aux = loss_sums(model, batch, loss_chunk_size=cfg.loss_chunk_size)
        return sums, {key: value for key, value in aux.items() if key.startswith("moe/")}

    return eval_step


# ---------------------------------------------------------------- loop


def evaluate_held_out(eval_step, graphdef, state, data: Dataset, mesh, num_batches: int, *,
                      causal: bool = True) -> dict:
    """{"eval_loss": mean held-out token cross-entropy over `num_batches` eval batches, "eval_accuracy": the
    fraction of their scored tokens predicted right (argmax), "eval_tokens": how many were scored,
    "eval/moe/...": the MoE routing statistics of those batches (means over batches)}. `causal`: as for
    `place_batch` (False for an encoder)."""
    totals = {"ce": 0.0, "correct": 0.0, "tokens": 0.0}
    routing = []
    for index in range(num_batches):
        batch = place_batch(local_batch(data, index, mesh, held_out=True), mesh, causal=causal)
        sums, stats = jax.device_get(eval_step(graphdef, state, batch))
        totals = {key: total + float(sums[key]) for key, total in totals.items()}
        routing.append(stats)
    means = {f"eval/{key}": np.mean([np.asarray(s[key]) for s in routing], axis=0) for key in routing[0]}
    tokens = max(totals["tokens"], 1.0)
    return {"eval_loss": totals["ce"] / tokens, "eval_accuracy": totals["correct"] / tokens,
            "eval_tokens": totals["tokens"], **means}


def check_finite(metrics: dict, step: int, ckpt: Checkpointer) -> None:
    if not metrics["finite"]:
        saved = ckpt.all_steps()
        raise NonFiniteError(f"step {step}: non-finite loss {float(metrics['total_loss'])} or grad norm "
                             f"{float(metrics['grad_norm'])} (the first bad step; its state was not saved; "
                             f"last checkpoint: {saved[-1] if saved else 'none'})")


def training_dataset(cfg: Config) -> Dataset:
    """The batches of cfg's training objective (train's `batch(step)`, held-out `eval_batch(index)`)."""
    return make_dataset(cfg.data, "train", vocab_size=cfg.model.vocab_size, architecture=cfg.model.architecture)


def target_len(cfg: Config) -> int:
    """Length L of the decoder-side rows of cfg's batches: data.seq_len, or an encoder-decoder's resolved
    data.target_len."""
    return objectives.target_length(cfg.data, cfg.objective)


def batch_shapes(cfg: Config) -> dict[str, tuple[tuple[int, int], np.dtype]]:
    """(global shape, dtype) of each entry of a batch of cfg's objective, as `Dataset.batch` yields it."""
    rows = cfg.data.global_batch_size
    shapes = {key: ((rows, target_len(cfg)), np.dtype(np.float32 if key == "loss_mask_BL" else np.int32))
              for key in BATCH_KEYS}
    if cfg.model.architecture == "encoder_decoder":
        shapes |= {key: ((rows, cfg.data.seq_len), np.dtype(np.int32)) for key in SOURCE_KEYS}
    return shapes


def step_work(cfg: Config, *, executed: bool = False) -> tuple[int, float]:
    """(tokens per step, FLOPs per token): the tokens a step reads (an encoder-decoder's data.seq_len source and
    `target_len` decoder tokens alike) and `model.flops_per_token` (model or `executed` FLOPs) spread over them,
    so that their product is the step's FLOPs."""
    seq_len = cfg.data.seq_len
    if cfg.model.architecture != "encoder_decoder":
        return cfg.data.global_batch_size * seq_len, flops_per_token(cfg.model, seq_len, executed=executed)
    length = target_len(cfg)
    per_row = seq_len + length
    flops_per_row = flops_per_token(cfg.model, seq_len, target_len=length, executed=executed) * length
    return cfg.data.global_batch_size * per_row, flops_per_row / per_row


def throughput(times: dict[str, float], tokens_per_step: int, flops_per_token: float) -> dict[str, float]:
    """Tokens/s, and MFU where the device's peak is known, of the steps of a `StepTimes.report` (eval and
    checkpoint time left out)."""
    seconds = times["time/step"] - times["time/eval"] - times["time/checkpoint"]
    speed = tokens_per_second(tokens_per_step, seconds)
    utilisation = mfu(speed, flops_per_token, jax.device_count(), jax.devices()[0].device_kind)
    return {"tokens_per_second": speed, **({"mfu": utilisation} if utilisation is not None else {})}


_cache_dir_of_train: str | None = None  # the directory use_compilation_cache last gave JAX


def use_compilation_cache(cfg: Config) -> str | None:
    """Point JAX's persistent compilation cache at cfg.compilation_cache_dir (relative: under cfg.run_dir; "":
    none), caching every program however small. A directory JAX was given otherwise (JAX_COMPILATION_CACHE_DIR,
    jax.config) wins. Returns the directory in use, or None. JAX keys entries by the program and its compile
    options, so a changed config compiles and stores a new entry instead of reusing one."""
    global _cache_dir_of_train
    current = jax.config.jax_compilation_cache_dir
    if current and current != _cache_dir_of_train:
        return current
    wanted = None
    if cfg.compilation_cache_dir:
        wanted = str((Path(cfg.run_dir) / Path(cfg.compilation_cache_dir).expanduser()).absolute())
    if wanted != current:
        jax.config.update("jax_compilation_cache_dir", wanted)
        compilation_cache.reset_cache()
    if wanted:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _cache_dir_of_train = wanted
    return wanted


class Profiler:
    """A jax.profiler trace of steps START+1..END (cfg.profile_steps) under `log_dir`, for TensorBoard's profile
    plugin (*.xplane.pb) or Perfetto (*.trace.json.gz). The device is drained before the trace starts and after
    step END, so the trace holds those steps whole; each dispatch is a "train" step annotation."""

    def __init__(self, steps: tuple[int, ...], log_dir: Path):
        self.first, self.last = steps or (0, 0)
        self.log_dir, self.active = log_dir, False

    def before_dispatch(self, step: int, state) -> None:
        """Call before dispatching step `step` + 1."""
        if not self.active and self.first <= step < self.last:
            jax.block_until_ready(state)
            jax.profiler.start_trace(self.log_dir, create_perfetto_trace=True)
            self.active = True

    def after_dispatch(self, step: int, state) -> None:
        """Call after dispatching step `step`."""
        if self.active and step >= self.last:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


class Pending(NamedTuple):
    """A dispatched step whose metrics have not been read."""

    step: int
    metrics: dict
    dispatched_at: float


class Loop:
    """The steps of one session. Step N + 1 is dispatched before step N's metrics are read, so the host prepares
    the next step while the device runs this one. Metrics are read (NaN guard, logging) one step behind, except
    for a step whose state is needed (eval, checkpoint, the last step, a stop request; every step with
    cfg.synchronous): it is read, evaluated and saved before the next dispatch donates its state."""

    def __init__(self, cfg: Config, graphdef, shardings, data: Dataset, mesh, ckpt: Checkpointer, *, origin: str,
                 step: int, started: float):
        self.cfg, self.graphdef, self.data, self.mesh, self.ckpt = cfg, graphdef, data, mesh, ckpt
        self.started = started
        self.train_step = jit_train_step(cfg, shardings)
        self.eval_step = jax.jit(make_eval_step(cfg), static_argnums=0)
        self.causal = cfg.model.causal
        self.tokens_per_step, self.flops_per_token = step_work(cfg)
        self.times = StepTimes()
        process = f"process{jax.process_index()}" if jax.process_count() > 1 else ""
        self.profiler = Profiler(cfg.profile_steps, Path(cfg.run_dir) / PROFILE_DIR / process)
        self.writer = MetricsWriter(cfg.run_dir, tensorboard=cfg.tensorboard, start_step=step)
        self.bar = tqdm(total=cfg.steps, initial=step, desc=f"train ({origin})", dynamic_ncols=True,
                        disable=not cfg.progress_bar or jax.process_index() != 0)
        self.summary = {"origin": origin, "start_step": step, "losses": [], "eval_loss": None, "eval_accuracy": None,
                        "preempted": False}
        self.shown: dict = {}  # throughput and host fraction of the last log, for the progress bar
        self.unlogged: dict = {}  # the time to the session's first step, until a record carries it

    def run(self, state, step: int):
        """Train from `state` (after `step` steps) to cfg.steps or a stop request; returns (state, step)."""
        pending = None
        with PreemptionGuard() as guard:
            while True:
                batch = self.fetch(step) if step < self.cfg.steps else None  # overlaps the step in flight
                stop = guard.should_stop()
                if pending is not None and (stop or batch is None or self.cfg.synchronous
                                            or self.state_due(pending.step)):
                    self.finish(pending, state, force_save=stop or batch is None)
                    pending = None
                if stop or batch is None:
                    self.summary["preempted"] = stop
                    return state, step
                self.profiler.before_dispatch(step, state)
                with jax.profiler.StepTraceAnnotation("train", step_num=step + 1):
                    state, device_metrics = self.train_step(self.graphdef, state, batch)
                step += 1
                dispatched = Pending(step, device_metrics, self.times.dispatched())
                self.profiler.after_dispatch(step, state)
                if pending is not None:
                    self.finish(pending)
                pending = dispatched

    def fetch(self, step: int) -> dict:
        with self.times.part("data"):
            return place_batch(local_batch(self.data, step, self.mesh), self.mesh, causal=self.causal)

    def eval_due(self, step: int) -> bool:
        return bool(self.cfg.eval_every) and (step % self.cfg.eval_every == 0 or step == self.cfg.steps)

    def state_due(self, step: int) -> bool:
        return self.eval_due(step) or self.ckpt.should_save(step)

    def finish(self, pending: Pending, state=None, *, force_save: bool = False) -> None:
        """Read, check and log the metrics of `pending`; given `state` (the state after that step), also run the
        eval and save the checkpoint due at it."""
        cfg, step = self.cfg, pending.step
        self.ckpt.check_saves()  # a failed background save stops the run at once
        metrics = self.times.read(pending.metrics, pending.dispatched_at)
        if cfg.nan_guard:
            check_finite(metrics, step, self.ckpt)
        self.summary["losses"].append(float(metrics["loss"]))
        if "first_step_seconds" not in self.summary:
            self.summary["first_step_seconds"] = time.perf_counter() - self.started
            self.unlogged = {"time/first_step": self.summary["first_step_seconds"]}
        record = {k: v for k, v in metrics.items() if k != "finite"}
        if state is not None and self.eval_due(step):
            with self.times.part("eval"):
                record |= evaluate_held_out(self.eval_step, self.graphdef, state, self.data, self.mesh,
                                            cfg.eval_batches, causal=self.causal)
            self.summary |= {key: record[key] for key in ("eval_loss", "eval_accuracy")}
            record["eval_perplexity"] = math.exp(min(record["eval_loss"], 700.0))
        if step % cfg.log_every == 0 or step == cfg.steps or "eval_loss" in record:
            self.log(step, record)
        self.bar.update(1)
        self.bar.set_postfix(_postfix(record | self.shown), refresh=False)
        if state is not None:
            with self.times.part("checkpoint"):
                self.ckpt.maybe_save(step, checkpointed(cfg, state), force=force_save)

    def log(self, step: int, record: dict) -> None:
        """Write `record` with the step-time breakdown and throughput since the last log (and, in a session's first
        record, the time to its first step)."""
        times = self.times.report()
        speed = throughput(times, self.tokens_per_step, self.flops_per_token)
        self.writer.write(step, record | times | speed | self.unlogged)
        self.unlogged = {}
        self.summary |= speed
        self.shown = speed | {"time/host_fraction": times["time/host_fraction"]}

    def close(self) -> None:
        self.profiler.stop()
        self.bar.close()
        self.writer.close()


def train(cfg: Config) -> dict:
    """Run (or resume) the run of `cfg` in cfg.run_dir up to cfg.steps. Returns a summary: this session's
    per-step `losses`, final `step`, `origin` of the state, last `eval_loss` and `eval_accuracy`,
    `tokens_per_second`, `mfu`, `first_step_seconds` (from this call to the first step's results, compilation
    included), the `compilation_cache_dir` in use and `preempted` (stopped by SIGTERM/SIGINT after saving)."""
    started = time.perf_counter()
    cfg = cfg.validate()
    distributed.initialize()
    cache_dir = use_compilation_cache(cfg)
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.validate_for_mesh(cfg, mesh)
    data = training_dataset(cfg)

    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = abstract_train_state(cfg, mesh)
        counts = dict(zip(("trainable_params", "params"), lora.parameter_counts(abstract["model"], cfg.lora)))
        if cfg.lora.rank and jax.process_index() == 0:
            quantized = ""
            if cfg.lora.quantize_base != "none":
                held, plain = lora.frozen_bytes(abstract["model"], cfg.model.param_dtype)
                quantized = f"; frozen base {held / 2**20:.1f} MiB as int8 ({plain / 2**20:.1f} MiB unquantized)"
            print(f"trainable params: {counts['trainable_params']:,} of {counts['params']:,} "
                  f"({100 * counts['trainable_params'] / counts['params']:.3f}%){quantized}", flush=True)
        ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint, config=cfg)
        try:
            state, step, origin = load_or_init(cfg, graphdef, abstract, shardings, ckpt)
            loop = Loop(cfg, graphdef, shardings, data, mesh, ckpt, origin=origin, step=step, started=started)
            try:
                state, step = loop.run(state, step)
            finally:
                loop.close()
            ckpt.maybe_save(step, checkpointed(cfg, state), force=True)
        finally:
            ckpt.close()
    summary = loop.summary | {"step": step, "compilation_cache_dir": cache_dir, **counts}
    summary["loss"] = summary["losses"][-1] if summary["losses"] else None
    return summary


def _postfix(record: dict) -> dict[str, str]:
    shown = {"loss": f"{record['loss']:.4f}"}
    if "tokens_per_second" in record:
        shown["tok/s"] = f"{record['tokens_per_second']:.0f}"
    if "mfu" in record:
        shown["mfu"] = f"{100 * record['mfu']:.1f}%"
    if "time/host_fraction" in record:
        shown["host"] = f"{100 * record['time/host_fraction']:.0f}%"
    if "eval_loss" in record:
        shown["eval"] = f"{record['eval_loss']:.4f}"
    return shown


def main(argv: list[str] | None = None) -> int:
    """CLI entry point. Returns 0 when done; distributed.PREEMPTED_EXIT_CODE (75) when SIGTERM/SIGINT stopped the
    run after saving (the same command continues it); 1 after one line naming the step of a non-finite loss or
    state, or of a failed save; 2 after one line naming a config error. A process of a multi-process run that
    fails exits at once (`distributed.exit_now`) and its peers follow."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if print_help_if_asked(argv, __doc__):
        return 0
    try:
        cfg = config_from_args(argv)
        summary = train(cfg)
    except ConfigError as e:
        return _failed(f"config error: {e}", 2)
    except (FloatingPointError, SaveError) as e:  # NonFiniteError, NonFiniteStateError, SaveError
        return _failed(f"stopped: {e}", 1)
    if jax.process_index() == 0:
        parts = [f"step {summary['step']}", f"loss {summary['loss']}" if summary["loss"] is not None else "",
                 f"eval_loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "",
                 f"eval_accuracy {summary['eval_accuracy']:.4f}" if summary["eval_accuracy"] is not None else "",
                 f"tokens/s {summary['tokens_per_second']:.0f}" if "tokens_per_second" in summary else "",
                 f"first step {summary['first_step_seconds']:.1f} s" if "first_step_seconds" in summary else "",
                 "preempted: saved and stopped" if summary["preempted"] else ""]
        print(" | ".join(p for p in parts if p))
        if cfg.sample_tokens and not summary["preempted"] and jax.process_count() == 1:
            print_sample(cfg)
    return distributed.PREEMPTED_EXIT_CODE if summary["preempted"] else 0


def _failed(message: str, code: int) -> int:
    print(message, file=sys.stderr)
    if distributed.is_multiprocess():
        distributed.exit_now(code)
    return code


def print_sample(cfg: Config) -> None:
    """Print what the trained decoder writes after cfg.sample_prompt (greedy-ish: temperature 0.7, top-p 0.9)."""
    from transformer.data import tokenizer
    from transformer.inference.generate import Generator
    from transformer.inference.sampling import SamplingConfig

    decoder = cfg.model.architecture == "decoder"
    if not decoder or cfg.data.dataset == "npy" or cfg.model.vocab_size != tokenizer.VOCAB_SIZE:
        return
    sampling = SamplingConfig(temperature=0.7, top_p=0.9, max_new_tokens=cfg.sample_tokens,
                              stop_tokens=(tokenizer.EOS,), seed=cfg.seed)
    result = Generator(cfg.run_dir).generate([tokenizer.encode(cfg.sample_prompt).tolist()], sampling)
    print(f"sample: {cfg.sample_prompt}{tokenizer.decode(result.tokens[0])}")


if __name__ == "__main__":
    sys.exit(main())
