"""Device, distribution, seeding, optimizer, schedule, presets and logging: the setup every script shares.

A script calls setup() once; it picks the device (cuda > mps > cpu unless forced), joins the process group when
launched by torchrun (RANK, WORLD_SIZE, LOCAL_RANK in the environment) and seeds every generator. Only rank 0
prints and writes files (print0, MetricsLog, save_config).
"""
import argparse
import json
import math
import os
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from model import load_checkpoint


@dataclass
class Runtime:
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_main: bool = True
    ddp: bool = False


def pick_device(device="auto"):
    if device != "auto":
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def setup(seed, device="auto", seed_per_rank=False):
    """Runtime for this process. Every rank gets the same seed (identical model init) unless seed_per_rank,
    which adds the rank (different samples per rank, e.g. for rollouts)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    ddp = world_size > 1
    dev = pick_device(device)
    if ddp:
        if dev.type == "cuda":
            dev = torch.device("cuda", local_rank)
            torch.cuda.set_device(dev)
        elif dev.type != "cpu":
            raise SystemExit(f"data-parallel runs need cuda or cpu, not {dev.type}; pass --device cpu")
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    seed = seed + rank if seed_per_rank else seed
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds cuda too
    return Runtime(dev, rank, world_size, local_rank, rank == 0, ddp)


def autocast(rt):
    """bf16 autocast on CUDA (weights and optimizer stay float32); a no-op elsewhere."""
    if rt.device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def wrap_ddp(model, rt):
    """The model wrapped for gradient averaging across ranks; the model itself on a single process."""
    if not rt.ddp:
        return model
    return DistributedDataParallel(model, device_ids=[rt.local_rank] if rt.device.type == "cuda" else None)


def no_sync(model, last):
    """Skip DDP's gradient all-reduce on every micro-batch but the last of an accumulation step."""
    return model.no_sync() if isinstance(model, DistributedDataParallel) and not last else nullcontext()


def all_reduce_sum(x, rt):
    """Sum of tensor x over ranks (x itself on a single process)."""
    if rt.ddp:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def cleanup(rt):
    if rt.ddp and dist.is_initialized():
        dist.destroy_process_group()


def print0(rt, *message):
    """Print on rank 0 only, without breaking a tqdm bar."""
    if rt.is_main:
        tqdm.write(" ".join(str(m) for m in message))


# ---------------------------------------------------------------------------------------------- optimisation
def make_optimizer(model, lr, weight_decay, betas=(0.9, 0.95)):
    """AdamW with decay on matrices only (not on norm gains or biases). Llama 2, section 2.2: beta1 0.9,
    beta2 0.95, eps 1e-5, weight decay 0.1."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [dict(params=[p for p in params if p.dim() >= 2], weight_decay=weight_decay),
              dict(params=[p for p in params if p.dim() < 2], weight_decay=0.0)]
    on_cuda = bool(params) and all(p.is_cuda for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-5, fused=on_cuda or None)


def cosine_lr(step, total_steps, lr, warmup_steps, min_lr_ratio=0.1):
    """Learning rate at step (0-based): linear warm-up to lr over warmup_steps (step 0 already gets
    lr / warmup_steps), then cosine decay to lr * min_lr_ratio at total_steps (Llama 2 decays to 10%)."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    min_lr = lr * min_lr_ratio
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------------------------- configuration
def parse_args(parser, presets, argv=None):
    """Parse argv where --preset NAME sets defaults and flags given explicitly win.

    A preset is a dict keyed by argparse dest names (n_kv_heads, not --n-kv-heads); keys that are no flag still
    become attributes of the result (e.g. steps_base). If the parser has no --preset, one is added, defaulting
    to no preset.
    """
    if "preset" not in {a.dest for a in parser._actions}:
        parser.add_argument("--preset", choices=sorted(presets), default=None, help="named set of defaults")
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--preset", default=parser.get_default("preset"))
    name = first.parse_known_args(argv)[0].preset
    if name is not None:
        if name not in presets:
            parser.error(f"unknown preset {name!r}; choose from {sorted(presets)}")
        parser.set_defaults(**presets[name])
    return parser.parse_args(argv)


def save_config(args, rt, path=None):
    """Write the resolved arguments as JSON (default: args.out/config.json), rank 0 only."""
    if rt.is_main:
        path = path or os.path.join(args.out, "config.json")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(vars(args), f, indent=1, default=str)


class MetricsLog:
    """Appends one JSON object per log() call to path, flushed at once so a killed run keeps its history."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, step, **metrics):
        if not self.enabled:
            return
        row = {"step": step, **{k: v.item() if hasattr(v, "item") else v for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row, default=str) + "\n")
            f.flush()


# ---------------------------------------------------------------------------------------------- a training run
def start(args):
    """The opening of every training script: runtime setup, the output folder, and the checkpoint OUT/model.pt
    to continue from when --resume finds one (else None). Returns (rt, ckpt_path, resume)."""
    rt = setup(args.seed, args.device)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "model.pt")
    resume = load_checkpoint(ckpt_path) if args.resume and os.path.exists(ckpt_path) else None
    return rt, ckpt_path, resume


def resume_training(rt, optimizer, resume, ckpt_path):
    """Continue a resumed run from its optimizer and RNG states; returns its step (0 for a fresh run)."""
    if resume is None:
        return 0
    optimizer.load_state_dict(resume["optimizer"])
    set_rng_state(resume["rng"])
    print0(rt, f"resumed from {ckpt_path} at step {resume['step']}")
    return resume["step"]


def optimizer_step(model, optimizer, loss_value, grad_clip, where, ckpt_path):
    """One guarded update: stop, naming the last good checkpoint, when the loss or the gradient norm is not
    finite (a NaN never reaches the weights); else clip the gradient norm, step and zero the gradients.
    `where` names the step in the message ("step 12"). Returns the gradient norm before clipping."""
    if not math.isfinite(loss_value):
        raise SystemExit(f"loss became {loss_value} at {where}; the last good checkpoint is {ckpt_path}")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    if not torch.isfinite(grad_norm):  # e.g. an overflow in the backward pass
        raise SystemExit(f"gradient norm became {grad_norm.item()} at {where}; the last good checkpoint is "
                         f"{ckpt_path}")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ---------------------------------------------------------------------------------------------- RNG state
def rng_state():
    """Every generator's state, in plain types and tensors, for checkpoints (resume continues the streams)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = dict(python=random.getstate(), numpy=(name, keys.tolist(), pos, has_gauss, cached),
                 torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # tuples, even if the state went through JSON
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
