"""Training: sharded state, a pure jitted step, and the loop around it.

    python -m transformer.train [--preset NAME | --config FILE.py] [a.b=value ...]   # default preset: tiny

One run lives in cfg.run_dir: config.json, checkpoints/, metrics.jsonl, tensorboard/.
A run resumes from its newest good checkpoint, else starts from checkpoint.init_from
(params only), else from scratch. Batches are indexed by step, so a resumed run sees the
same data as an uninterrupted one, and the same config gives a bitwise identical loss
trace on CPU.

Optimizer: AdamW with linear warmup then cosine decay to lr * min_lr_ratio, gradients
clipped by global norm. Weight decay applies to matrices only (every param with two or
more dims besides a stacked "layers" axis: embeddings, projections, experts, routers);
norm scales and biases are not decayed. Params are kept in model.param_dtype (float32 by
default) while the model computes in model.dtype (e.g. bfloat16).

Loss: mean token cross-entropy over loss_mask, plus optim.z_loss * mean(log Z ^ 2), plus
the model's aux["aux_loss"] (MoE balancing). With optim.grad_accum_steps = M the batch is
split into M strided micro-batches (rows r, r + M, ...); token sums are accumulated so the
cross-entropy equals the full-batch one, and aux losses are averaged over micro-batches.
Each micro-batch forward updates the MoE router biases (router='sigmoid_bias').
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable

import einops
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from transformer import distributed, sharding
from transformer.checkpoint import Checkpointer, PreemptionGuard, restore_params
from transformer.config import Config, ConfigError, OptimConfig, config_from_args
from transformer.data import Dataset, make_dataset
from transformer.data.placement import local_batch, place_batch
from transformer.loss import loss_sums
from transformer.metrics import MetricsWriter, mfu, tokens_per_second
from transformer.model import build_model, flops_per_token


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
    """Whether weight decay applies: matrices (>= 2 dims not counting a stacked "layers" axis)."""
    ndim = np.ndim(variable.get_value())
    axes = getattr(variable, "logical_axes", None) or (None,) * ndim
    return sum(axis != "layers" for axis in axes) >= 2


def make_optimizer(cfg: Config, model: nnx.Module) -> optax.GradientTransformation:
    optim = cfg.optim
    flags = [decays(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param),
                                                 is_leaf=lambda x: isinstance(x, nnx.Variable))]
    mask = lambda params: jax.tree.unflatten(jax.tree.structure(params), flags)
    adamw = optax.adamw(lr_schedule(optim, cfg.steps), b1=optim.b1, b2=optim.b2, eps=optim.eps,
                        weight_decay=optim.weight_decay, mask=mask)
    return optax.chain(optax.clip_by_global_norm(optim.clip_norm), adamw) if optim.clip_norm else adamw


class TrainState(nnx.Module):
    """Everything a step reads and writes: the model, its optimizer and an RNG stream (checkpointed
    with the rest, so stochastic layers resume exactly)."""

    def __init__(self, cfg: Config):
        self.model = build_model(cfg.model, rngs=nnx.Rngs(cfg.seed))
        self.optimizer = nnx.Optimizer(self.model, make_optimizer(cfg, self.model), wrt=nnx.Param)
        self.rngs = nnx.Rngs(dropout=jax.random.fold_in(jax.random.key(cfg.seed), 1))


def abstract_train_state(cfg: Config, mesh) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, abstract state with each leaf a sharded ShapeDtypeStruct, shardings); allocates nothing."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: TrainState(cfg)))
    shardings = sharding.state_shardings(abstract, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return graphdef, abstract, shardings


def init_train_state(cfg: Config, shardings) -> nnx.State:
    """A fresh state, created directly in its shards (no device ever holds the whole model)."""
    return jax.jit(lambda: nnx.split(TrainState(cfg))[1], out_shardings=shardings)()


def load_or_init(cfg: Config, graphdef, abstract, shardings, ckpt: Checkpointer) -> tuple[nnx.State, int, str]:
    """(state, step, origin): newest checkpoint of the run > checkpoint.init_from (params only) > scratch."""
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


# ---------------------------------------------------------------- steps


def micro_batches(batch: dict, accum: int) -> dict:
    """(M, B / M, L) micro-batches; micro-batch m holds rows m, m + M, ... so each stays spread over the
    batch shards."""
    def split(x_BL):
        x_MBL = einops.rearrange(x_BL, "(B M) L -> M B L", M=accum)
        return sharding.constrain(x_MBL, (None, "batch", "length"))
    return {key: split(value) for key, value in batch.items()}


def make_train_step(cfg: Config):
    """`train_step(graphdef, state, batch) -> (state, metrics)`, pure; jit it with graphdef static."""
    accum, z_coef = cfg.optim.grad_accum_steps, cfg.optim.z_loss
    schedule = lr_schedule(cfg.optim, cfg.steps)

    def train_step(graphdef, state, batch):
        train_state = nnx.merge(graphdef, state)
        model_def, params, rest = nnx.split(train_state.model, nnx.Param, ...)
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask_BL"]), 1.0)

        def grads_of(micro, rest):
            def loss_fn(params):
                model = nnx.merge(model_def, params, rest, copy=True)
                sums, aux = loss_sums(model, micro, loss_chunk_size=cfg.loss_chunk_size, update_router_bias=True)
                loss = (sums["ce"] + z_coef * sums["z"]) / num_tokens + aux["aux_loss"] / accum
                return loss, (sums, aux, nnx.split(model, nnx.Param, ...)[2])

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
                   "grad_norm": grad_norm, "lr": lr, "finite": jnp.isfinite(total) & jnp.isfinite(grad_norm),
                   **{k: v for k, v in aux.items() if k != "aux_loss"}}
        return nnx.state(train_state), metrics

    return train_step


def make_eval_step(cfg: Config):
    """`eval_step(graphdef, state, batch) -> (masked loss sums, MoE routing statistics)` (no state change)."""

    def eval_step(graphdef, state, batch):
        model = nnx.merge(graphdef, state).model
        sums, aux = loss_sums(model, batch, loss_chunk_size=cfg.loss_chunk_size)
        return sums, {key: value for key, value in aux.items() if key.startswith("moe/")}

    return eval_step


# ---------------------------------------------------------------- loop


def evaluate_held_out(eval_step, graphdef, state, data: Dataset, mesh, num_batches: int) -> dict:
    """{"eval_loss": mean held-out token cross-entropy over `num_batches` eval batches, "eval/moe/...": the
    MoE routing statistics of those batches (means over batches)}."""
    ce = tokens = 0.0
    routing = []
    for index in range(num_batches):
        batch = place_batch(local_batch(data, index, mesh, held_out=True), mesh)
        sums, stats = jax.device_get(eval_step(graphdef, state, batch))
        ce, tokens = ce + float(sums["ce"]), tokens + float(sums["tokens"])
        routing.append(stats)
    means = {f"eval/{key}": np.mean([np.asarray(s[key]) for s in routing], axis=0) for key in routing[0]}
    return {"eval_loss": ce / max(tokens, 1.0), **means}


class Throughput:
    """Tokens/s and MFU over the steps timed since the last `reset`. A session's first step (it includes
    compilation) and time spent between `pause` and the next step (eval, checkpoints) are not counted."""

    def __init__(self, tokens_per_step: int, flops_per_token: float):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.device_kind, self.num_devices = jax.devices()[0].device_kind, jax.device_count()
        self.last = None
        self.reset()

    def reset(self) -> None:
        self.steps, self.seconds = 0, 0.0

    def step_done(self) -> None:
        now = time.perf_counter()
        if self.last is not None:
            self.steps, self.seconds = self.steps + 1, self.seconds + now - self.last
        self.last = now

    def pause(self) -> None:
        self.last = time.perf_counter()

    def report(self) -> dict[str, float]:
        if not self.steps:
            return {}
        speed = tokens_per_second(self.steps * self.tokens_per_step, self.seconds)
        utilisation = mfu(speed, self.flops_per_token, self.num_devices, self.device_kind)
        return {"tokens_per_second": speed, **({"mfu": utilisation} if utilisation is not None else {})}


def check_finite(metrics: dict, step: int, ckpt: Checkpointer) -> None:
    if not metrics["finite"]:
        saved = ckpt.all_steps()
        raise NonFiniteError(f"step {step}: non-finite loss {float(metrics['total_loss'])} or grad norm "
                             f"{float(metrics['grad_norm'])} (the first bad step; its state was not saved; "
                             f"last checkpoint: {saved[-1] if saved else 'none'})")


def train(cfg: Config) -> dict:
    """Run (or resume) the run of `cfg` in cfg.run_dir up to cfg.steps. Returns a summary: this session's
    per-step `losses`, final `step`, `origin` of the state, last `eval_loss`, `tokens_per_second`, `mfu`
    and `preempted` (stopped by SIGTERM/SIGINT after saving)."""
    cfg = cfg.validate()
    if cfg.model.architecture != "decoder":
        raise ConfigError(f"model.architecture={cfg.model.architecture!r}: transformer.train trains next-token "
                          "language models on Dataset batches; use model.architecture='decoder'")
    distributed.initialize()
    mesh = sharding.make_mesh(cfg.mesh)
    sharding.validate_for_mesh(cfg, mesh)
    data = make_dataset(cfg.data, "train")
    throughput = Throughput(cfg.data.global_batch_size * cfg.data.seq_len, flops_per_token(cfg.model, cfg.data.seq_len))

    with sharding.use_mesh(mesh):
        graphdef, abstract, shardings = abstract_train_state(cfg, mesh)
        ckpt = Checkpointer(cfg.run_dir, cfg.checkpoint, config=cfg)
        state, step, origin = load_or_init(cfg, graphdef, abstract, shardings, ckpt)
        train_step = jax.jit(make_train_step(cfg), static_argnums=0, donate_argnums=1, out_shardings=(shardings, None))
        eval_step = jax.jit(make_eval_step(cfg), static_argnums=0)
        writer = MetricsWriter(cfg.run_dir, tensorboard=cfg.tensorboard, start_step=step)
        bar = tqdm(total=cfg.steps, initial=step, desc=f"train ({origin})", dynamic_ncols=True,
                   disable=not cfg.progress_bar or jax.process_index() != 0)
        summary = {"origin": origin, "start_step": step, "losses": [], "eval_loss": None, "preempted": False}
        try:
            with PreemptionGuard() as guard:
                batch = local_batch(data, step, mesh) if step < cfg.steps else None
                while step < cfg.steps:
                    state, device_metrics = train_step(graphdef, state, place_batch(batch, mesh))
                    step += 1
                    batch = local_batch(data, step, mesh) if step < cfg.steps else None  # overlaps the step
                    metrics = jax.device_get(device_metrics)
                    if cfg.nan_guard:
                        check_finite(metrics, step, ckpt)
                    throughput.step_done()
                    summary["losses"].append(float(metrics["loss"]))
                    record = {k: v for k, v in metrics.items() if k != "finite"} | throughput.report()
                    if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps):
                        record |= evaluate_held_out(eval_step, graphdef, state, data, mesh, cfg.eval_batches)
                        summary["eval_loss"] = record["eval_loss"]
                        record["eval_perplexity"] = math.exp(min(summary["eval_loss"], 700.0))
                    if step % cfg.log_every == 0 or step == cfg.steps or "eval_loss" in record:
                        writer.write(step, record)
                        summary |= throughput.report()
                        throughput.reset()
                    bar.update(1)
                    bar.set_postfix(_postfix(record), refresh=False)
                    ckpt.maybe_save(step, state)
                    if guard.should_stop():
                        summary["preempted"] = True
                        break
                    throughput.pause()
            ckpt.maybe_save(step, state, force=True)
        finally:
            bar.close()
            writer.close()
            ckpt.close()
    summary["step"] = step
    summary["loss"] = summary["losses"][-1] if summary["losses"] else None
    return summary


def _postfix(record: dict) -> dict[str, str]:
    shown = {"loss": f"{record['loss']:.4f}"}
    if "tokens_per_second" in record:
        shown["tok/s"] = f"{record['tokens_per_second']:.0f}"
    if "mfu" in record:
        shown["mfu"] = f"{100 * record['mfu']:.1f}%"
    if "eval_loss" in record:
        shown["eval"] = f"{record['eval_loss']:.4f}"
    return shown


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: 0 when done or preempted (saved); a config error prints one line and returns 2,
    a non-finite loss prints one line naming the step and returns 1."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        cfg = config_from_args(argv)
        summary = train(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        parts = [f"step {summary['step']}", f"loss {summary['loss']}" if summary["loss"] is not None else "",
                 f"eval_loss {summary['eval_loss']:.4f}" if summary["eval_loss"] is not None else "",
                 f"tokens/s {summary['tokens_per_second']:.0f}" if "tokens_per_second" in summary else "",
                 "preempted: saved and stopped" if summary["preempted"] else ""]
        print(" | ".join(p for p in parts if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
